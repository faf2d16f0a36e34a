"""Export throughput and memory: `collectord export` (the real CLI) on tables of growing size.

    python -m bench export [--dsn DSN] [--rows N] [--days D] [--books N]

In a fresh schema (dropped afterwards), SQL fills trades with N rows on each of D
UTC days (78-digit token ids, 3-decimal prices, 6-decimal sizes, distinct tx
hashes) and orderbook_snapshots with N/10 books of 30 levels a side on one day.
Then, each case a subprocess of its own whose peak RSS comes from wait4():
  trades 1 day / 10     one day of N/10 rows (a day of the first D, cut by --until)
  trades 1 day          one day of N rows
  trades D days         D x N rows: peak RSS must not grow with the rows
  rerun (unchanged)     the D days again: every file skipped (fingerprints only)
  books 1 day           N/10 books, 60 levels each
Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2

from workers.storage import migrate

ROOT = Path(__file__).resolve().parent.parent


def _with_schema(dsn: str, schema: str) -> str:
    return f"{dsn} options='-csearch_path={schema}'"


def _execute(dsn: str, sql: str) -> None:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def fill(dsn: str, rows: int, days: int, books: int) -> None:
    from datetime import date, timedelta

    from workers.storage import partitions

    step_ms = 86_400_000 / rows
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:  # the day partitions these INSERTs need (the Writer and the collectors make their own)
        for table in ("trades", "orderbook_snapshots"):
            partitions.create(conn, table, [date(2026, 11, 1) + timedelta(days=d) for d in range(days + 1)])
    finally:
        conn.close()
    _execute(dsn, f"""
        INSERT INTO trades (token_id, condition_id, ts, price, size, side, tx_hash, ordinal, source, received_at,
                            trade_day)
        SELECT (10::numeric ^ 77 + (i % 2000))::text, '0x' || md5((i % 1000)::text), ts,
               round((i % 999 + 1) * 0.001, 3), round(((i * 7919) % 100000) / 1000.0 + 0.000001, 6),
               CASE WHEN i % 2 = 0 THEN 'BUY' ELSE 'SELL' END, '0x' || md5(i::text), 0, 'ws',
               ts + interval '120 ms', (ts AT TIME ZONE 'UTC')::date
        FROM generate_series(0::bigint, {rows * days - 1}::bigint) i,
             LATERAL (SELECT timestamptz '2026-11-01 00:00:00+00' + i * interval '1 millisecond' * {step_ms}) AS t(ts)""")
    _execute(dsn, f"""
        INSERT INTO orderbook_snapshots (token_id, condition_id, ts, hash, best_bid, best_ask, bids, asks,
                                         bid_levels, ask_levels)
        SELECT (10::numeric ^ 77 + (i % 2000))::text, '0xc',
               timestamptz '2026-11-01 00:00:00+00' + i * interval '1 millisecond' * {86_400_000 / max(books, 1)},
               md5(i::text), 0.48, 0.52,
               (SELECT jsonb_agg(jsonb_build_array(to_char(0.48 - k * 0.01, 'FM0.00'), (k * 13.5 + 0.000001)::text)
                       ORDER BY k) FROM generate_series(0, 29) k),
               (SELECT jsonb_agg(jsonb_build_array(to_char(0.52 + k * 0.01, 'FM0.00'), (k * 7.25 + 1)::text)
                       ORDER BY k) FROM generate_series(0, 29) k), 30, 30
        FROM generate_series(0::bigint, {books - 1}::bigint) i""")
    _execute(dsn, "ANALYZE trades; ANALYZE orderbook_snapshots")


def run_case(conf: Path, out: Path, *args: str) -> dict:
    """One `collectord export` subprocess: wall time, its own peak RSS (wait4), its output."""
    cmd = [sys.executable, "-m", "collectord", "-c", str(conf), "export", *args, "--out", str(out)]
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (Popen would drop it)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - t0
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    if proc.returncode != 0:
        raise SystemExit(f"export failed ({proc.returncode}): {stderr.strip()}")
    return {"seconds": seconds, "stdout": stdout, "rss_kb": usage.ru_maxrss, "user_s": usage.ru_utime}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench export", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("COLLECTORD_TEST_DSN",
                                                        "host=127.0.0.1 port=5432 dbname=test user=postgres"))
    parser.add_argument("--rows", type=int, default=1_000_000, help="trades per day")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--books", type=int, default=None, help="books on one day (default rows/10)")
    parser.add_argument("--quick", action="store_true", help="20,000 trades a day, 2 days, 2,000 books")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.days, args.books = 20_000, 2, 2_000
    books = args.books if args.books is not None else max(1, args.rows // 10)

    schema = "bench_export_" + uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    _execute(args.dsn, f'CREATE SCHEMA "{schema}"')
    try:
        dsn = _with_schema(args.dsn, schema)
        migrate(dsn)
        t0 = time.monotonic()
        fill(dsn, args.rows, args.days, books)
        filled = time.monotonic() - t0
        conf = tmp / "collectord.conf"
        conf.write_text(f"[collectord]\ndsn = {dsn}\ndata_dir = {tmp / 'data'}\n")
        last = f"2026-11-{1 + args.days:02d}"
        cases = [
            ("trades 1 day / 10", args.rows // 10, tmp / "a",
             ("trades", "--since", "2026-11-01", "--until", f"2026-11-01T{2:02d}:24")),
            ("trades 1 day", args.rows, tmp / "b", ("trades", "--since", "2026-11-01", "--until", "2026-11-02")),
            (f"trades {args.days} days", args.rows * args.days, tmp / "c",
             ("trades", "--since", "2026-11-01", "--until", last)),
            ("rerun (unchanged)", args.rows * args.days, tmp / "c", ("trades", "--since", "2026-11-01", "--until", last)),
            ("books 1 day", books, tmp / "d",
             ("orderbook_snapshots", "--since", "2026-11-01", "--until", "2026-11-02")),
        ]
        figures = {"rows_per_day": args.rows, "days": args.days, "books": books, "fill_s": round(filled, 1),
                   "cases": {}}
        print(f"{'case':<20} {'rows':>11} {'wall s':>8} {'rows/s':>10} {'user s':>7} {'peak RSS MB':>12}")
        for name, rows, out, case_args in cases:
            r = run_case(conf, out, *case_args)
            rate = rows / r["seconds"] if r["seconds"] else 0
            rss = r["rss_kb"] / 1024
            print(f"{name:<20} {rows:>11,} {r['seconds']:>8.1f} {rate:>10,.0f} {r['user_s']:>7.1f} {rss:>12.0f}")
            figures["cases"][name] = {"rows": rows, "seconds": round(r["seconds"], 2), "rows_per_s": round(rate),
                                      "user_s": round(r["user_s"], 2), "peak_rss_mb": round(rss, 1)}
        size = sum(p.stat().st_size for p in (tmp / "c").rglob("*.parquet"))
        figures["trades_bytes_per_row"] = round(size / (args.rows * args.days), 1)
        print(json.dumps(figures))
    finally:
        _execute(args.dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
