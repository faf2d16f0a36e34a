"""Storage throughput: the Writer's batched paths vs one INSERT per row, and a spool replay.

    python -m bench.storage [--dsn DSN] [--rows N] [--naive-rows N] [--book-rows N] [--replay-rows N]
                            [--rounds N]

Everything runs side by side in one process and one run (the machine is
shared and noisy: compare the ratios), each case in a fresh schema that is
dropped afterwards. Cases:
  trades/orderbook  writer copy    Writer(method="copy"): add() + COPY into a temp
                                   staging table + INSERT ... SELECT ... ON CONFLICT,
                                   delivered by the flusher thread (the default)
                    writer copy fg the same with background=False (the caller delivers)
  trades            frames writer  the producer does real work first: json.loads of
                                   WebSocket-like frames and building each row, then
                                   add()/maybe_flush(): flusher thread vs foreground
                                   (_fg), to show what the thread overlaps
                    writer values  Writer(method="values"): add() + execute_values
                    naive          one INSERT ... ON CONFLICT per row, commit each
                    raw COPY       COPY straight into the table, nothing else
                                   (the database's limit here; no idempotence)
  spool replay      N trade rows spooled while the database is unreachable,
                    then replayed by a new Writer until the spool is empty.
Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg2

from workers.storage import TABLES, Writer, migrate
from workers.storage.rows import CONVERTERS, copy_text

T0 = datetime(2026, 5, 25, 22, 0, 0, tzinfo=timezone.utc)
TOKENS = [str(10**77 + 7919 * k) for k in range(200)]  # 78-digit ids


def trade_rows(n: int, offset: int = 0) -> list[dict]:
    now = datetime.now(timezone.utc)
    return [
        {
            "token_id": TOKENS[i % len(TOKENS)],
            "condition_id": f"0x{(i % len(TOKENS)) // 2:064x}",
            "ts": T0 + timedelta(milliseconds=i),
            "price": Decimal(f"0.{(i * 37) % 999 + 1:03d}"),
            "size": Decimal(f"{(i * 13) % 5000}.{i % 1000000:06d}"),
            "side": "BUY" if i % 3 else "SELL",
            "tx_hash": f"0x{i:064x}",
            "ordinal": 0,
            "fee_rate_bps": Decimal("0"),
            "source": "ws",
            "received_at": now,
        }
        for i in range(offset, offset + n)
    ]


def book_rows(n: int, levels: int = 20) -> list[dict]:
    now = datetime.now(timezone.utc)
    out = []
    for i in range(n):
        bids = [[f"0.{480 - j:03d}", f"{100 + j}.25"] for j in range(levels)]
        asks = [[f"0.{490 + j:03d}", f"{200 + j}.5"] for j in range(levels)]
        out.append({
            "token_id": TOKENS[i % len(TOKENS)], "condition_id": "0x" + "ab" * 32,
            "ts": T0 + timedelta(seconds=i // len(TOKENS)), "hash": f"{i:040x}",
            "best_bid": bids[0][0], "best_ask": asks[0][0], "spread": "0.010",
            "bid_depth": "2190.0", "ask_depth": "4190.0", "bid_levels": levels, "ask_levels": levels,
            "bids": bids, "asks": asks, "received_at": now,
        })
    return out


class Schema:
    """A fresh migrated schema on the server; dropped on exit."""

    def __init__(self, dsn: str):
        self.server = dsn
        self.name = "bench_" + uuid.uuid4().hex[:10]

    def __enter__(self) -> str:
        conn = psycopg2.connect(self.server, connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{self.name}"')
        conn.close()
        params = psycopg2.extensions.parse_dsn(self.server)
        opt = f"-csearch_path={self.name}"
        params["options"] = f"{params['options']} {opt}" if params.get("options") else opt
        self.dsn = psycopg2.extensions.make_dsn(**params)
        migrate(self.dsn)
        return self.dsn

    def __exit__(self, *exc) -> None:
        conn = psycopg2.connect(self.server, connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
        conn.close()


def count(dsn: str, table: str) -> int:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        n = cur.fetchone()[0]
    conn.close()
    return n


def run_writer(dsn: str, table: str, rows: list[dict], method: str, tmp: Path,
               background: bool = True) -> tuple[float, dict]:
    """rows/s through Writer.add + maybe_flush (the collector's calls), all committed."""
    w = Writer(dsn, tmp / f"spool-{uuid.uuid4().hex[:6]}", name="bench", method=method,
               background=background).open()
    chunk = 100  # collectors add a message's worth at a time
    started = time.perf_counter()
    for i in range(0, len(rows), chunk):
        w.add(table, rows[i : i + chunk])
        w.maybe_flush()
    w.flush()
    elapsed = time.perf_counter() - started
    stats = w.stats()
    w.close()
    assert stats["rows_written"] == len(rows) and stats["rows_spooled"] == 0, stats
    assert count(dsn, table) == len(rows)
    return len(rows) / elapsed, stats


def frames_for(n: int, per_frame: int = 20) -> list[str]:
    """WebSocket-like text frames of last_trade_price events (what the trade listener parses)."""
    frames = []
    for f in range(0, n, per_frame):
        events = [
            {"event_type": "last_trade_price", "asset_id": TOKENS[i % len(TOKENS)], "market": f"0x{i % 100:064x}",
             "price": f"0.{(i * 37) % 999 + 1:03d}", "size": f"{(i * 13) % 5000}.{i % 1000000:06d}",
             "side": "BUY" if i % 3 else "SELL", "fee_rate_bps": "0", "timestamp": str(1779746400000 + i),
             "transaction_hash": f"0x{i:064x}"}
            for i in range(f, min(n, f + per_frame))
        ]
        frames.append(json.dumps(events))
    return frames


def run_writer_frames(dsn: str, frames: list[str], n: int, tmp: Path, background: bool) -> float:
    """rows/s when the producer does real work per row: json.loads + build the row, then add()."""
    w = Writer(dsn, tmp / f"spool-{uuid.uuid4().hex[:6]}", name="frames", background=background).open()
    started = time.perf_counter()
    for text in frames:
        now = datetime.now(timezone.utc)
        rows = [
            {"token_id": e["asset_id"], "condition_id": e["market"],
             "ts": datetime.fromtimestamp(int(e["timestamp"]) / 1000, timezone.utc),
             "price": Decimal(e["price"]), "size": Decimal(e["size"]), "side": e["side"],
             "tx_hash": e["transaction_hash"], "ordinal": 0, "fee_rate_bps": Decimal(e["fee_rate_bps"]),
             "source": "ws", "received_at": now}
            for e in json.loads(text)
        ]
        w.add("trades", rows)
        w.maybe_flush()
    w.flush()
    elapsed = time.perf_counter() - started
    stats = w.stats()
    w.close()
    assert stats["rows_written"] == n and count(dsn, "trades") == n, stats
    return n / elapsed


def run_naive(dsn: str, table: str, rows: list[dict]) -> float:
    """One INSERT ... ON CONFLICT DO NOTHING per row, one commit per row."""
    t = TABLES[table]
    cols = t.column_names
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) ON CONFLICT DO NOTHING"
    conn = psycopg2.connect(dsn, connect_timeout=10)
    started = time.perf_counter()
    with conn.cursor() as cur:
        for row in rows:
            values = [row.get(c) for c in cols]
            values = [json.dumps(v) if isinstance(v, (list, dict)) else v for v in values]
            cur.execute(sql, values)
            conn.commit()
    elapsed = time.perf_counter() - started
    conn.close()
    return len(rows) / elapsed


def run_raw_copy(dsn: str, table: str, rows: list[dict]) -> float:
    """COPY straight into the table in 5000-row transactions (serialization included)."""
    t = TABLES[table]
    convs = [(c, CONVERTERS[k]) for c, k in t.columns]
    conn = psycopg2.connect(dsn, connect_timeout=10)
    started = time.perf_counter()
    with conn.cursor() as cur:
        for i in range(0, len(rows), 5000):
            text = copy_text([[f(r.get(c)) for c, f in convs] for r in rows[i : i + 5000]])
            cur.copy_expert(f"COPY {table} ({', '.join(t.column_names)}) FROM STDIN", io.StringIO(text))
            conn.commit()
    elapsed = time.perf_counter() - started
    conn.close()
    return len(rows) / elapsed


def run_replay(dsn: str, n: int, tmp: Path) -> dict:
    """Spool n trade rows with the database unreachable, then time a fresh Writer draining it."""
    spool = tmp / "replay-spool"
    down = Writer("host=127.0.0.1 port=1 dbname=none", spool, name="replay", connect_timeout=1).open()
    started = time.perf_counter()
    rows = trade_rows(n, offset=10**7)
    for i in range(0, n, 5000):
        down.add("trades", rows[i : i + 5000])
        down.flush()
    down.close()
    spool_s = time.perf_counter() - started
    stats = down.stats()
    assert stats["rows_spooled"] == n, stats
    w = Writer(dsn, spool, name="replay", replay_budget=3600).open()
    started = time.perf_counter()
    while w.stats()["spool_segments"]:  # the flusher thread replays; poll gently
        time.sleep(0.005)
    replay_s = time.perf_counter() - started
    w.close()
    assert count(dsn, "trades") == n
    return {"rows": n, "spool_bytes": stats["spool_bytes"], "spool_s": round(spool_s, 3),
            "replay_s": round(replay_s, 3), "replay_rows_per_s": round(n / replay_s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("COLLECTORD_TEST_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres"))
    parser.add_argument("--rows", type=int, default=200_000, help="trade rows per batched case")
    parser.add_argument("--naive-rows", type=int, default=5_000, help="rows for the one-INSERT-per-row case")
    parser.add_argument("--book-rows", type=int, default=20_000, help="order-book rows (20 levels a side)")
    parser.add_argument("--replay-rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (medians reported)")
    args = parser.parse_args(argv)
    logging.getLogger("workers.storage").setLevel(logging.ERROR)  # the replay case warns by design

    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    runs: dict[str, dict[str, list[float]]] = {"trades": {}, "orderbook_snapshots": {}}
    replays: list[dict] = []

    def record(table: str, key: str, value: float) -> None:
        runs[table].setdefault(key, []).append(value)

    try:
        trades_rows, trades_naive = trade_rows(args.rows), trade_rows(args.naive_rows, offset=5 * 10**6)
        books, books_naive = book_rows(args.book_rows), book_rows(min(args.naive_rows, args.book_rows))
        frames = frames_for(args.rows)
        # The inputs are millions of objects a real collector never holds at once;
        # keep the cyclic GC from re-scanning them during every timed case.
        gc.collect()
        gc.freeze()
        # Rounds interleave every case, so a burst of load from other users of the
        # machine hits all of them alike; the table shows medians.
        for _ in range(args.rounds):
            for table, rows, naive_rows in (("trades", trades_rows, trades_naive),
                                            ("orderbook_snapshots", books, books_naive)):
                with Schema(args.dsn) as dsn:
                    record(table, "writer_copy", run_writer(dsn, table, rows, "copy", tmp)[0])
                with Schema(args.dsn) as dsn:
                    record(table, "writer_copy_fg", run_writer(dsn, table, rows, "copy", tmp, background=False)[0])
                with Schema(args.dsn) as dsn:
                    record(table, "writer_values", run_writer(dsn, table, rows, "values", tmp)[0])
                with Schema(args.dsn) as dsn:
                    record(table, "naive", run_naive(dsn, table, naive_rows))
                with Schema(args.dsn) as dsn:
                    record(table, "raw_copy", run_raw_copy(dsn, table, rows))
            for background, key in ((True, "frames_writer"), (False, "frames_writer_fg")):
                with Schema(args.dsn) as dsn:
                    record("trades", key, run_writer_frames(dsn, frames, args.rows, tmp, background))
            with Schema(args.dsn) as dsn:
                replays.append(run_replay(dsn, args.replay_rows, tmp))
            shutil.rmtree(tmp / "replay-spool", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results = {t: {k: statistics.median(v) for k, v in r.items()} for t, r in runs.items()}
    replay = sorted(replays, key=lambda r: r["replay_s"])[len(replays) // 2]
    print(f"median of {args.rounds} interleaved round(s); naive = one INSERT + COMMIT per row")
    print(f"{'table':<22}{'path':<18}{'rows/s':>10}{'x naive':>9}{'/ raw COPY':>12}   all rounds")
    for table, r in results.items():
        for path in ("writer_copy", "writer_copy_fg", "writer_values", "naive", "raw_copy", "frames_writer",
                     "frames_writer_fg"):
            if path not in r:
                continue
            every = " ".join(f"{v:,.0f}" for v in runs[table][path])
            print(f"{table:<22}{path:<18}{r[path]:>10,.0f}{r[path] / r['naive']:>9.1f}"
                  f"{r[path] / r['raw_copy']:>12.2f}   {every}")
    print(f"spool replay: {replay['rows']:,} trade rows ({replay['spool_bytes'] / 1e6:.1f} MB spooled in "
          f"{replay['spool_s']:.2f} s) replayed in {replay['replay_s']:.2f} s = {replay['replay_rows_per_s']:,} rows/s"
          f" (all rounds: {', '.join('%.2f s' % r['replay_s'] for r in replays)})")
    summary = {
        "rounds": args.rounds, "rows": args.rows, "naive_rows": args.naive_rows, "book_rows": args.book_rows,
        **{f"{t}_{k}": round(v) for t, r in results.items() for k, v in r.items()},
        "trades_copy_vs_naive": round(results["trades"]["writer_copy"] / results["trades"]["naive"], 1),
        "trades_copy_vs_values": round(results["trades"]["writer_copy"] / results["trades"]["writer_values"], 2),
        "books_copy_vs_naive": round(results["orderbook_snapshots"]["writer_copy"]
                                     / results["orderbook_snapshots"]["naive"], 1),
        "replay": replay,
        "replay_s_all": [r["replay_s"] for r in replays],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
