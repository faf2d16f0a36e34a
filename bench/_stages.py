"""The trade path stage by stage, in CPU time, over frames recorded from polysim.

Used by `python -m bench ingest` (leading underscore: not a benchmark itself). In order:
  1. record(): connect one market-channel socket to polysim, subscribe every token,
     and keep the text frames read until `trades` trades arrived (books, best_bid_ask
     and the other events that come with them included, as the collector gets them);
  2. measure(): run each stage of the collector's path over the same frames, alone,
     timing this thread's CPU (time.thread_time, i.e. its own rusage, never wall time),
     best of `rounds`:
       read      the frames' wire bytes through workers.ws.Connection.read(), from a
                 socketpair a forked child writes into (the child's CPU is not counted)
       floor     decoding the same texts with the fastest JSON library here (the
                 faster of msgspec and orjson, untyped) and nothing else
       decode    workers.messages' typed decode alone
       rows      the rest of workers.messages.parse(): validation and row building
       ordinals  workers.trades.Ordinals.number()
       copy      workers.storage.rows.copy_data(): the COPY text, in batches of 5,000
       database  psycopg2 COPY of those batches into a trades table with the real
                 indexes, one commit per batch: the client's CPU, and separately the
                 server backend's CPU (/proc/<pid>/stat of pg_backend_pid())
     plus a raw COPY of the same batches into an unindexed table (rows/s, wall), the
     ceiling `bench ingest` compares the committed rate with, and into a table whose
     unique key is a 16-byte digest of the natural key (the narrower-key alternative).
Every figure is per trade (microseconds); the sum of the client stages is what one
trades process must spend at least, next to the floor.
"""

from __future__ import annotations

import gc
import io
import os
import socket
import time
from datetime import datetime, timezone

import msgspec
import orjson
import psycopg2
from websocket import ABNF

from workers import messages
from workers.storage.rows import copy_data
from workers.trades import Ordinals
from workers.ws import BufferedWebSocket, Connection, WsOptions

BATCH = 5000


def record(ws_url: str, tokens: list[str], trades: int, timeout: float = 60.0) -> list[str]:
    """Text frames from one socket subscribed to every token, until `trades` trades came."""
    conn = Connection(ws_url, WsOptions(read_timeout=5.0))
    conn.connect()
    try:
        for i in range(0, len(tokens), 100):
            chunk = tokens[i:i + 100]
            if i == 0:
                conn.send(msgspec.json.encode({"assets_ids": chunk, "type": "market",
                                               "custom_feature_enabled": True}).decode())
            else:
                conn.send(msgspec.json.encode({"operation": "subscribe", "assets_ids": chunk,
                                               "custom_feature_enabled": True}).decode())
        frames: list[str] = []
        seen = 0
        deadline = time.monotonic() + timeout
        dumps = True
        while seen < trades and time.monotonic() < deadline:
            for text in conn.read():
                out = messages.parse(text)
                if dumps and out.trades:
                    dumps = False  # the initial book dump is a one-off: keep only the steady flow
                if not dumps:
                    frames.append(text)
                    seen += len(out.trades)
        return frames
    finally:
        conn.close()


def _each(fn, items) -> None:
    """fn over items, keeping no result: a stage's output dropped at once, as the collector
    drops a frame's objects (kept alive, they would make the garbage collector's passes,
    not the stage, the measured cost)."""
    for item in items:
        fn(item)


def _cpu(fn, rounds: int) -> float:
    """Best thread CPU seconds of fn() over rounds."""
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def sender(wire: bytes) -> tuple[socket.socket, int]:
    """One end of a socketpair, and the pid of a forked child writing `wire` into the other."""
    left, right = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            left.close()
            right.sendall(wire)
            right.close()
        finally:
            os._exit(0)
    right.close()
    return left, pid


def _read_cpu(frames: list[str], rounds: int) -> float:
    """CPU of Connection.read() over the frames' wire bytes (server frames: unmasked)."""
    wire = b"".join(ABNF(1, 0, 0, 0, ABNF.OPCODE_TEXT, 0, f.encode()).format() for f in frames)
    best = float("inf")
    for _ in range(rounds):
        left, pid = sender(wire)
        ws = BufferedWebSocket(skip_utf8_validation=True)
        ws.sock, ws.connected = left, True
        conn = Connection("ws://socketpair", WsOptions(read_timeout=10.0), connector=lambda *a, **k: ws)
        conn.connect()
        got = 0
        start = time.thread_time()
        while got < len(frames):
            got += len(conn.read())
        best = min(best, time.thread_time() - start)
        left.close()
        os.waitpid(pid, 0)
    return best


def _backend_cpu(cur) -> float:
    cur.execute("SELECT pg_backend_pid()")
    pid = cur.fetchone()[0]
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")  # a server on another host: its CPU is not ours to read
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _copy_into(dsn: str, table_sql: str, batches: list[bytes], columns: str) -> tuple[float, float, float]:
    """(client CPU s, server backend CPU s, wall s) of COPYing the batches into a fresh table."""
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute("DROP TABLE IF EXISTS bench_stage_trades")
        cur.execute(table_sql)
        conn.commit()
        server0, client0, wall0 = _backend_cpu(cur), time.thread_time(), time.perf_counter()
        for data in batches:
            cur.copy_expert(f"COPY bench_stage_trades ({columns}) FROM STDIN", io.BytesIO(data), size=len(data) + 1)
            conn.commit()
        wall, client = time.perf_counter() - wall0, time.thread_time() - client0
        server = _backend_cpu(cur) - server0
        cur.execute("DROP TABLE bench_stage_trades")
        conn.commit()
        return client, server, wall
    finally:
        conn.close()


def measure(frames: list[str], dsn: str, rounds: int = 3) -> dict:
    """Per-trade microseconds of each stage over frames (see the module docstring)."""
    parsed = [messages.parse(f) for f in frames]
    # The inputs stay alive through every stage: out of the garbage collector's sight, as
    # a collector holds nothing like 100,000 rows at once.
    gc.freeze()
    trades = sum(len(p.trades) for p in parsed)
    if not trades:
        raise SystemExit("no trades recorded")
    fast = 0
    for f in frames:
        try:
            messages._fast_decode(f)
            fast += 1
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
    floor = min(_cpu(lambda: _each(msgspec.json.decode, frames), rounds),
                _cpu(lambda: _each(orjson.loads, frames), rounds))

    def typed() -> None:
        for f in frames:
            try:
                messages._fast_decode(f)
            except (msgspec.ValidationError, msgspec.DecodeError):
                msgspec.json.decode(f)

    decode = _cpu(typed, rounds)
    parse = _cpu(lambda: _each(messages.parse, frames), rounds)
    received = datetime.now(timezone.utc).isoformat()

    def number() -> None:
        ordinals = Ordinals()
        for p in parsed:
            ordinals.number(p.trades, received)

    ordinal = _cpu(number, rounds)
    rows = [r for p in parsed for r in p.trades]
    chunks = [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]
    copy = _cpu(lambda: _each(copy_data, chunks), rounds)
    batches = [copy_data(c)[0] for c in chunks]
    columns = ", ".join(messages.TRADE_COLUMNS)
    like = ("CREATE TABLE bench_stage_trades (LIKE trades INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
            " INCLUDING INDEXES)")
    bare = "CREATE TABLE bench_stage_trades (LIKE trades INCLUDING DEFAULTS)"
    db_client, db_server, db_wall = _copy_into(dsn, like, batches, columns)
    _, bare_server, bare_wall = _copy_into(dsn, bare, batches, columns)
    # The narrower unique key the natural one could become: a 16-byte digest of it,
    # computed by the server from canonical text (trim_scale keeps 0.48 = 0.480, as the
    # numeric key does), with the (token_id, ts) and BRIN indexes kept.
    digest = ("CREATE TABLE bench_stage_trades (LIKE trades INCLUDING DEFAULTS INCLUDING CONSTRAINTS,"
              " key uuid GENERATED ALWAYS AS (CASE WHEN tx_hash IS NOT NULL THEN md5(token_id || '|' || tx_hash"
              " || '|' || trim_scale(price)::text || '|' || trim_scale(size)::text || '|' || side || '|'"
              " || ordinal::text)::uuid END) STORED);"
              " CREATE UNIQUE INDEX ON bench_stage_trades (key);"
              " CREATE UNIQUE INDEX ON bench_stage_trades (token_id, ts, price, size, side, ordinal)"
              " WHERE tx_hash IS NULL;"
              " CREATE INDEX ON bench_stage_trades (token_id, ts);"
              " CREATE INDEX ON bench_stage_trades USING brin (ts)")
    _, digest_server, digest_wall = _copy_into(dsn, digest, batches, columns)
    read = _read_cpu(frames, rounds)
    gc.unfreeze()
    us = 1e6 / trades
    stages = {"read": read * us, "decode": decode * us, "rows": max(0.0, parse - decode) * us,
              "ordinals": ordinal * us, "copy": copy * us, "database_client": db_client * us}
    return {
        "frames": len(frames), "trades": trades, "events_per_frame": round(
            sum(sum(p.events.values()) for p in parsed) / len(frames), 1),
        "fast_path_frames": fast,
        "floor_us": round(floor * us, 3),
        "stages_us": {k: round(v, 3) for k, v in stages.items()},
        "client_total_us": round(sum(stages.values()), 3),
        "client_total_vs_floor": round(sum(stages.values()) / (floor * us), 2),
        "server_us_per_row": round(db_server * us, 3),
        "server_us_per_row_unindexed": round(bare_server * us, 3),
        "server_us_per_row_digest_key": round(digest_server * us, 3),
        "copy_digest_key_rows_per_s": round(trades / digest_wall),
        "copy_indexed_rows_per_s": round(trades / db_wall),
        "copy_unindexed_rows_per_s": round(trades / bare_wall),
    }


def table(result: dict) -> str:
    s = result["stages_us"]
    lines = [f"trade path over {result['trades']:,} recorded trades in {result['frames']:,} frames"
             f" ({result['events_per_frame']} events a frame, {result['fast_path_frames']:,} on the fast path),"
             " CPU us per trade:",
             f"{'read':>8} {'decode':>8} {'rows':>8} {'ordinals':>8} {'copy':>8} {'db client':>9} {'total':>8}"
             f" {'floor':>8} {'x floor':>8} {'pg/row':>8}",
             f"{s['read']:8.2f} {s['decode']:8.2f} {s['rows']:8.2f} {s['ordinals']:8.2f} {s['copy']:8.2f}"
             f" {s['database_client']:9.2f} {result['client_total_us']:8.2f} {result['floor_us']:8.2f}"
             f" {result['client_total_vs_floor']:8.2f} {result['server_us_per_row']:8.2f}",
             f"raw COPY of the same rows: {result['copy_unindexed_rows_per_s']:,} rows/s unindexed,"
             f" {result['copy_indexed_rows_per_s']:,} rows/s with the trades indexes"
             f" (server CPU {result['server_us_per_row_unindexed']:.2f} / {result['server_us_per_row']:.2f} us a row);"
             f" with a 16-byte digest key instead of the natural one: {result['copy_digest_key_rows_per_s']:,} rows/s,"
             f" {result['server_us_per_row_digest_key']:.2f} us a row"]
    return "\n".join(lines)
