"""Ingest: trades/s one trades process commits to PostgreSQL, and publish-to-commit delay.

One run, in order:
  1. start polysim (`--trade-rate R` fills/s across `--markets` markets) on a free
     loopback port, and a fresh schema in the database (`--dsn`, default
     $COLLECTORD_TEST_DSN), migrated;
  2. follow every open market (followed_tokens), construct a TradesCollector with its
     default timings and fork it (one process, one shard);
  3. once live trades arrive and the start gap is backfilled, warm up `--warmup` s, then for `--seconds` s a monitor
     polls the table every `--poll` s: count(*) of live rows at the window's ends gives
     the committed rate; the new rows of a sample of tokens (1 in `--sample`) are
     fetched with their time of first visibility, which is an upper bound of their
     commit time (at most one poll interval + one query late);
  4. each sampled row is matched to its ledger trade (token, tx, price, size, side,
     ordinal numbered in ledger order) to get polysim's publish time:
     delay = first visibility - publish time (both on this machine's wall clock);
  5. SIGTERM the collector, check it exited 0, drop the schema, stop polysim.
Published trades/s over the same window come from the ledger, so "kept up" is visible:
committed ~= published means the limit is polysim's rate, not ours; raise --trade-rate.
The collector's CPU time (utime+stime from /proc, all threads) over the window gives
CPU microseconds per committed trade: on a shared machine the wall-clock rate depends
on what else runs (polysim itself needs about a core at these rates; the load average
is printed), the CPU cost per trade much less so.

    .venv/bin/python -m bench ingest [--trade-rate 20000] [--markets 50] [--seconds 10] [--quick]

Prints a table, then one JSON line. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import psycopg2  # noqa: E402

from bench import _polysim, _stages  # noqa: E402

from workers.messages import canon_decimal  # noqa: E402
from workers.storage import migrate  # noqa: E402
from workers.trades import TradesCollector  # noqa: E402

DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"


def start_polysim(markets: int, rate: float, books: bool = True) -> tuple[subprocess.Popen, int]:
    return _polysim.start(["--markets", str(markets), "--seed", "1", "--trade-rate", str(rate),
                           "--closed-markets", "0", "--multi-fill", "0.1"]
                          + ([] if books else ["--no-trade-book-updates"]), timeout=30)


def get(port: int, path: str, timeout: float = 120.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def with_schema(dsn: str, schema: str) -> str:
    return f"{dsn} options='-csearch_path={schema}'"


def open_tokens(port: int) -> list[tuple[dict, str, str]]:
    """(market, token id, outcome) of every open market polysim lists."""
    out, cursor = [], None
    while True:
        page = get(port, "/gamma/markets/keyset?closed=false&limit=100" + (f"&after_cursor={cursor}" if cursor else ""))
        for m in page["markets"]:
            for token, outcome in zip(json.loads(m["clobTokenIds"]), json.loads(m["outcomes"])):
                out.append((m, token, outcome))
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def follow(dsn: str, listed: list[tuple[dict, str, str]]) -> list[str]:
    """Insert them into followed_tokens (since now); returns the token ids."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        for m, token, outcome in listed:
            cur.execute("INSERT INTO followed_tokens (token_id, market_id, condition_id, outcome, since)"
                        " VALUES (%s, %s, %s, %s, now()) ON CONFLICT DO NOTHING",
                        (token, m["id"], m["conditionId"], outcome))
    conn.close()
    return [token for _, token, _ in listed]


def fork_collector(port: int, dsn: str, data_dir: str, options: dict, *, name: str = "trades.0", shard: int = 0,
                   shards: int = 1) -> int:
    """Fork one TradesCollector shard against polysim (backfill scaled down for a benchmark)."""
    base = f"http://127.0.0.1:{port}"
    opts = dict(backfill_delay="1", backfill_settle="0", backfill_margin="1", backfill_page="10000")
    opts.update(options)
    collector = TradesCollector(name=name, dsn=dsn, data_dir=data_dir, ws_url=f"ws://127.0.0.1:{port}/ws/market",
                                data_url=base + "/data", gamma_url=base + "/gamma", clob_url=base + "/clob",
                                shard=shard, shards=shards, **opts)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            signal.signal(signal.SIGTERM, lambda *_: collector.stop())
            collector.run()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of one of its threads, in seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench ingest", description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("COLLECTORD_TEST_DSN", DEFAULT_DSN))
    ap.add_argument("--trade-rate", type=float, default=20000.0)
    ap.add_argument("--markets", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--poll", type=float, default=0.02)
    ap.add_argument("--sample", type=int, default=8, help="sample 1 in N tokens for delays")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a [collector:trades] option for the listener (repeatable), e.g. flush_age=0.25")
    ap.add_argument("--mix", choices=("books", "trades"), default="books",
                    help="books: a book refresh follows trades, as on the exchange (default); trades: trades"
                         " and the occasional book change only (a bare trade stream)")
    ap.add_argument("--stage-trades", type=int, default=100_000,
                    help="trades recorded for the stage-by-stage CPU table (0: skip it)")
    ap.add_argument("--quick", action="store_true", help="small and short (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.trade_rate, args.markets, args.seconds, args.warmup = 500.0, 10, 2.0, 1.0
        args.stage_trades = min(args.stage_trades, 1000)

    schema = "bench_ingest_" + uuid.uuid4().hex[:8]
    admin = psycopg2.connect(args.dsn)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE SCHEMA "{schema}"')
    dsn = with_schema(args.dsn, schema)
    proc, port = start_polysim(args.markets, args.trade_rate, books=args.mix == "books")
    pid = None
    data_dir = f"/tmp/{schema}"
    try:
        migrate(dsn)
        listed = open_tokens(port)
        frames = []
        if args.stage_trades:  # recorded before the follow: the collector's start gap stays short
            frames = _stages.record(f"ws://127.0.0.1:{port}/ws/market", [t for _, t, _ in listed], args.stage_trades)
        tokens = follow(dsn, listed)
        sample = sorted(tokens)[:: max(1, args.sample)]
        options = dict(o.split("=", 1) for o in args.option)
        pid = fork_collector(port, dsn, data_dir, {"refresh_interval": "2", **options})
        mon = psycopg2.connect(dsn)
        mon.autocommit = True
        cur = mon.cursor()

        def live_count() -> int:
            cur.execute("SELECT count(*) FROM trades WHERE source = 'ws'")
            return cur.fetchone()[0]

        deadline = time.monotonic() + 30
        while live_count() == 0:
            if time.monotonic() > deadline:
                raise SystemExit("no live trades within 30 s")
            time.sleep(0.1)
        # The start gap's backfill (since the follow) competes with live ingest: let it finish.
        deadline = time.monotonic() + 120
        while True:
            cur.execute("SELECT count(*), count(*) FILTER (WHERE recovered_at IS NULL) FROM feed_gaps")
            gaps, open_gaps = cur.fetchone()
            if gaps and not open_gaps:
                break
            if time.monotonic() > deadline:
                raise SystemExit("start gaps not recovered within 120 s")
            time.sleep(0.2)
        time.sleep(args.warmup)
        cur.execute("SELECT max(received_at) FROM trades")
        watermark = cur.fetchone()[0]
        def side_work() -> tuple[int, int]:
            """(backfilled rows, gaps): work that competes with live ingest when it happens."""
            cur.execute("SELECT (SELECT count(*) FROM trades WHERE source = 'backfill'), (SELECT count(*) FROM feed_gaps)")
            return cur.fetchone()

        side_start = side_work()
        t_start, n_start, cpu_start = time.time(), live_count(), cpu_seconds(pid)
        loop_start = cpu_seconds(pid, pid)  # the main thread: sockets, parsing, rows (the rest: the Writer's)
        seen: dict[tuple, float] = {}
        received_at: dict[tuple, float] = {}
        end = time.monotonic() + args.seconds
        polls = 0
        # The (token_id, ts) index bounds each poll: rows become visible in the order they
        # arrived (batches commit in order), so nothing unseen is older than the newest
        # exchange time seen minus the feed's reordering (~100 ms; 2 s of margin).
        newest_ts = watermark
        while time.monotonic() < end:
            cur.execute("SELECT token_id, tx_hash, price, size, side, ordinal, received_at, ts FROM trades"
                        " WHERE token_id = ANY(%s) AND ts > %s AND source = 'ws' AND received_at > %s",
                        (sample, newest_ts - timedelta(seconds=2), watermark))
            now = time.time()
            for token, tx, price, size, side, ordinal, received, ts in cur.fetchall():
                k = (token, tx, canon_decimal(str(price)), canon_decimal(str(size)), side, ordinal)
                seen.setdefault(k, now)
                received_at.setdefault(k, received.timestamp())
                if received > watermark:
                    watermark = received
                if ts > newest_ts:
                    newest_ts = ts
            polls += 1
            time.sleep(args.poll)
        t_end, n_end, cpu_end = time.time(), live_count(), cpu_seconds(pid)
        loop_cpu = cpu_seconds(pid, pid) - loop_start
        side_end = side_work()
        load = os.getloadavg()[0]
        ledger = get(port, "/_sim/ledger")["trades"]
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        pid = None
        stages = _stages.measure(frames, dsn) if frames else None
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        proc.terminate()
        proc.wait(10)
        admin.cursor().execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()
        subprocess.run(["rm", "-rf", data_dir], check=False)

    published_ms: dict[tuple, int] = {}
    ordinals: Counter = Counter()
    published_in_window = 0
    for t in ledger:
        k = (t["asset_id"], t["transaction_hash"], canon_decimal(t["price"]), canon_decimal(t["size"]), t["side"])
        published_ms[k + (ordinals[k],)] = t["published_ms"]
        ordinals[k] += 1
        if t_start * 1000 <= t["published_ms"] < t_end * 1000:
            published_in_window += 1
    delays = [(seen_at - published_ms[k] / 1000) * 1000 for k, seen_at in seen.items() if k in published_ms]
    to_receive = [(received_at[k] - published_ms[k] / 1000) * 1000 for k in seen if k in published_ms]
    to_commit = [(seen[k] - received_at[k]) * 1000 for k in seen]
    window = t_end - t_start
    committed = (n_end - n_start) / window
    published = published_in_window / window
    result = {
        "bench": "ingest", "mix": args.mix, "options": args.option, "trade_rate": args.trade_rate, "markets": args.markets, "tokens": len(tokens),
        "window_s": round(window, 2), "published_per_s": round(published), "committed_per_s": round(committed),
        "kept_up": committed >= 0.95 * published,
        "delay_ms_p50": round(pct(delays, 0.50), 1), "delay_ms_p99": round(pct(delays, 0.99), 1),
        "delay_ms_max": round(max(delays), 1) if delays else None, "delay_samples": len(delays),
        "publish_to_receive_ms_p50": round(pct(to_receive, 0.5), 1),
        "publish_to_receive_ms_p99": round(pct(to_receive, 0.99), 1),
        "receive_to_visible_ms_p50": round(pct(to_commit, 0.5), 1),
        "receive_to_visible_ms_p99": round(pct(to_commit, 0.99), 1),
        "backfilled_in_window": side_end[0] - side_start[0], "gaps_in_window": side_end[1] - side_start[1],
        "unmatched_samples": len(seen) - len(delays), "monitor_polls": polls, "poll_s": args.poll,
        "collector_exit": status, "collector_cpu_s": round(cpu_end - cpu_start, 2),
        "cpu_us_per_trade": round((cpu_end - cpu_start) * 1e6 / max(1, n_end - n_start), 2),
        "loop_cpu_us_per_trade": round(loop_cpu * 1e6 / max(1, n_end - n_start), 2),
        "writer_cpu_us_per_trade": round((cpu_end - cpu_start - loop_cpu) * 1e6 / max(1, n_end - n_start), 2),
        "trades_per_cpu_s": round((n_end - n_start) / max(1e-9, cpu_end - cpu_start)),
        "loadavg_1m": round(load, 2), "cpus": os.cpu_count(), "stages": stages,
    }
    if stages:
        print(_stages.table(stages))
        result["committed_vs_raw_copy"] = round(committed / stages["copy_unindexed_rows_per_s"], 3)
        result["committed_vs_indexed_copy"] = round(committed / stages["copy_indexed_rows_per_s"], 3)
        print(f"committed/s is {result['committed_vs_raw_copy']:.2f}x the raw unindexed COPY,"
              f" {result['committed_vs_indexed_copy']:.2f}x COPY with the same indexes")
    print(f"polysim {args.trade_rate:,.0f} fills/s requested over {len(tokens)} tokens; window {window:.1f} s")
    print(f"{'published/s':>12} {'committed/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'samples':>8}"
          f" {'cpu us/trade':>12} {'trades/cpu-s':>12} {'load':>5}")
    print(f"{published:12,.0f} {committed:12,.0f} {result['delay_ms_p50']:8.1f} {result['delay_ms_p99']:8.1f} "
          f"{result['delay_ms_max'] or float('nan'):8.1f} {len(delays):8d} {result['cpu_us_per_trade']:12.1f}"
          f" {result['trades_per_cpu_s']:12,d} {load:5.2f}")
    print(f"collector CPU per committed trade: {result['cpu_us_per_trade']} us = loop thread"
          f" {result['loop_cpu_us_per_trade']} + Writer thread {result['writer_cpu_us_per_trade']}"
          f" (gaps opened in the window: {result['gaps_in_window']}, rows backfilled: {result['backfilled_in_window']})")
    print(f"publish->receive p50/p99 {result['publish_to_receive_ms_p50']}/{result['publish_to_receive_ms_p99']} ms;"
          f" receive->visible p50/p99 {result['receive_to_visible_ms_p50']}/{result['receive_to_visible_ms_p99']} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
