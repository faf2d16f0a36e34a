"""Storage throughput: the Writer's batched paths vs one INSERT per row, and a spool replay.

    python -m bench.storage [--dsn DSN] [--rows N] [--naive-rows N] [--book-rows N] [--replay-rows N]

Everything runs side by side in one process and one run (the machine is
shared and noisy: compare the ratios), each case in a fresh schema that is
dropped afterwards. Cases:
  trades/orderbook  writer copy    Writer(method="copy"): add() + COPY into a temp
                                   staging table + INSERT ... SELECT ... ON CONFLICT,
                                   delivered by the flusher thread (the default)
                    writer copy fg the same with background=False (the caller delivers)
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
import io
import json
import os
import shutil
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
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    results: dict[str, dict] = {"trades": {}, "orderbook_snapshots": {}}
    try:
        cases = (("trades", trade_rows(args.rows), trade_rows(args.naive_rows, offset=5 * 10**6)),
                 ("orderbook_snapshots", book_rows(args.book_rows), book_rows(min(args.naive_rows, args.book_rows))))
        for table, rows, naive_rows in cases:
            r = results[table]
            with Schema(args.dsn) as dsn:
                r["writer_copy"], st = run_writer(dsn, table, rows, "copy", tmp)
                r["writer_copy_batches"] = st["batches"]
            with Schema(args.dsn) as dsn:
                r["writer_copy_fg"], _ = run_writer(dsn, table, rows, "copy", tmp, background=False)
            with Schema(args.dsn) as dsn:
                r["writer_values"], _ = run_writer(dsn, table, rows, "values", tmp)
            with Schema(args.dsn) as dsn:
                r["naive"] = run_naive(dsn, table, naive_rows)
            with Schema(args.dsn) as dsn:
                r["raw_copy"] = run_raw_copy(dsn, table, rows)
        with Schema(args.dsn) as dsn:
            replay = run_replay(dsn, args.replay_rows, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'table':<22}{'path':<16}{'rows/s':>12}{'x naive':>10}{'/ raw COPY':>12}")
    for table, r in results.items():
        for path in ("writer_copy", "writer_copy_fg", "writer_values", "naive", "raw_copy"):
            print(f"{table:<22}{path:<16}{r[path]:>12,.0f}{r[path] / r['naive']:>10.1f}{r[path] / r['raw_copy']:>12.2f}")
    print(f"spool replay: {replay['rows']:,} trade rows ({replay['spool_bytes'] / 1e6:.1f} MB spooled in "
          f"{replay['spool_s']:.2f} s) replayed in {replay['replay_s']:.2f} s = {replay['replay_rows_per_s']:,} rows/s")
    summary = {
        "rows": args.rows, "naive_rows": args.naive_rows, "book_rows": args.book_rows,
        **{f"{t}_{k}": (round(v) if isinstance(v, float) else v) for t, r in results.items() for k, v in r.items()},
        "trades_copy_vs_naive": round(results["trades"]["writer_copy"] / results["trades"]["naive"], 1),
        "trades_copy_vs_values": round(results["trades"]["writer_copy"] / results["trades"]["writer_values"], 2),
        "replay": replay,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
