"""Exchange: the whole exchange from one host, every token followed, nothing lost.

    python -m bench exchange                 # 50,000 markets (100,000 tokens), 10,000 trades/s, 10 min
    python -m bench exchange --quick         # 5,000 markets, 1,000 trades/s, 45 s (CI)

One run, in order:
  1. polysim with `--markets` open markets (two tokens each, no resolved history) at
     `--trade-rate` fills/s across the exchange, real payload shapes (book refreshes
     after trades, best_bid_ask, 10 book changes/s), on a free loopback port; a fresh
     schema in `--dsn` (default $COLLECTORD_TEST_DSN), migrated;
  2. every open token followed (followed_tokens, from polysim's CLOB market pages);
  3. `--shards` TradesCollector processes forked (shard i of N, as the supervisor runs
     `[collector:trades] shards = N`), each with the collector's default timings except
     the Data API waits polysim does not need (backfill_delay 1 s, settle 0, margin 1 s);
     `--option KEY=VALUE` overrides any [collector:trades] option;
  4. subscribe time: polysim's count of assets with a subscriber (each one's `book`
     dump is queued the moment it is subscribed) polled until it reaches every token;
  5. a ledger thread COPYs polysim's ledger (`/_sim/ledger.tsv`, read incrementally)
     into an UNLOGGED table of the schema every few seconds;
  6. once every start gap is backfilled (or after `--backfill-wait` s: the rest of the
     start backfill then runs inside the window): a window of `--seconds` in which a monitor
     polls the new live rows of ~500 sampled tokens every `--poll` s (first visibility,
     an upper bound of commit time, minus polysim's publish time = publish-to-commit),
     and CPU (utime+stime from /proc) is taken at both ends for every shard, for the
     PostgreSQL backends of this run's collectors (pg_stat_activity pids, same host) and
     for polysim; RSS of each shard is sampled;
  7. cut-off (trades published after it may still be in flight), the collectors settle
     (every gap recovered), SIGTERM, each must exit 0;
  8. accounting in PostgreSQL, per trade key (token, tx hash, price, size, side) as
     multisets: missing = expected ledger trades (followed token, exchange time at or
     after its `since`, published before the cut-off) not stored; duplicated = stored
     rows beyond what the ledger published for their key. The schema is dropped.

Prints a table, then one JSON line. A benchmark: it asserts nothing. The collector's
CPU per trade includes everything a shard does for its tokens: trades, but also the
book refreshes and best_bid_ask messages the exchange sends after each trade, pings,
coverage marks and the followed-set refresh.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import psycopg2  # noqa: E402

from bench import _polysim  # noqa: E402
from bench.ingest import cpu_seconds, fork_collector, pct, with_schema  # noqa: E402

from workers.messages import canon_decimal  # noqa: E402
from workers.storage import migrate  # noqa: E402

DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
SAMPLE_TOKENS = 500
KEY = "token_id, tx_hash, price, size, side"


def get(url: str, timeout: float = 120.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_or_none(pid: int) -> float | None:
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError):
        return None  # a backend that ended, or one on another host


def follow(base: str, dsn: str) -> list[str]:
    """Every open token into followed_tokens (one COPY); returns them."""
    rows, cursor = [], "MA=="
    while cursor != "LTE=":
        page = get(f"{base}/clob/simplified-markets?next_cursor={cursor}")
        for m in page["data"]:
            if m["active"] and not m["closed"]:
                rows += [(t["token_id"], m["condition_id"], t["outcome"]) for t in m["tokens"]]
        cursor = page["next_cursor"]
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        text = "".join(f"{t}\t{c}\t{o}\n" for t, c, o in rows)
        cur.copy_expert("COPY followed_tokens (token_id, condition_id, outcome) FROM STDIN", io.StringIO(text))
    conn.close()
    return [t for t, _, _ in rows]


class LedgerCopy:
    """A thread that appends polysim's new ledger lines to the `ledger` table every `every` s."""

    COLUMNS = "idx, token_id, tx_hash, price, size, side, ts_ms, published_ms"

    def __init__(self, base: str, dsn: str, every: float = 5.0, page: int = 200_000):
        self.base, self.dsn, self.every, self.page = base, dsn, every, page
        self.next = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ledger-copy", daemon=True)
        self.conn = psycopg2.connect(dsn, application_name="bench:ledger")
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("CREATE UNLOGGED TABLE ledger (idx bigint, token_id text, tx_hash text, price numeric,"
                        " size numeric, side text, ts_ms bigint, published_ms bigint)")

    def start(self) -> "LedgerCopy":
        self._thread.start()
        return self

    def catch_up(self) -> int:
        """Copy everything published so far; returns the ledger's length."""
        with self._lock:
            while True:
                req = urllib.request.urlopen(f"{self.base}/_sim/ledger.tsv?since={self.next}&limit={self.page}",
                                             timeout=300)
                with req as r:
                    body = r.read()
                    nxt, total = int(r.headers["X-Ledger-Next"]), int(r.headers["X-Ledger-Total"])
                if body:
                    with self.conn.cursor() as cur:
                        cur.copy_expert(f"COPY ledger ({self.COLUMNS}) FROM STDIN", io.BytesIO(body))
                self.next = nxt
                if nxt >= total:
                    return total

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.catch_up()
            except Exception as err:  # reported in the figures; the final catch_up retries
                self.error = f"{type(err).__name__}: {err}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def backends(cur, prefix: str) -> dict[int, str]:
    cur.execute("SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE %s",
                (f"collectord:{prefix}%",))
    return dict(cur.fetchall())


def account(cur, cutoff_ms: int) -> dict:
    """missing / duplicated per trade key as multisets (module docstring, step 8)."""
    cur.execute("SET work_mem = '256MB'")
    cur.execute("CREATE TEMP TABLE got AS SELECT token_id, lower(tx_hash) AS tx_hash, price, size, side,"
                " count(*) AS n FROM trades GROUP BY 1, 2, 3, 4, 5")
    cur.execute(f"CREATE TEMP TABLE pub AS SELECT {KEY}, count(*) AS n,"
                " count(*) FILTER (WHERE l.published_ms <= %s"
                "   AND l.ts_ms >= floor(extract(epoch FROM f.since) * 1000)) AS expected"
                f" FROM ledger l LEFT JOIN followed_tokens f USING (token_id) GROUP BY 1, 2, 3, 4, 5",
                (cutoff_ms,))
    cur.execute(f"SELECT coalesce(sum(p.expected), 0), coalesce(sum(greatest(p.expected - coalesce(g.n, 0), 0)), 0)"
                f" FROM pub p LEFT JOIN got g USING ({KEY})")
    expected, missing = cur.fetchone()
    cur.execute(f"SELECT coalesce(sum(greatest(g.n - coalesce(p.n, 0), 0)), 0), coalesce(sum(g.n), 0)"
                f" FROM got g LEFT JOIN pub p USING ({KEY})")
    duplicated, stored = cur.fetchone()
    cur.execute("SELECT count(*) FILTER (WHERE source = 'ws'), count(*) FILTER (WHERE source = 'backfill') FROM trades")
    live, backfilled = cur.fetchone()
    cur.execute("SELECT count(*), count(*) FILTER (WHERE recovered_at IS NULL), coalesce(sum(recovered_trades), 0)"
                " FROM feed_gaps")
    gaps, open_gaps, recovered_trades = cur.fetchone()
    return {"expected": int(expected), "missing": int(missing), "duplicated": int(duplicated),
            "rows": int(stored), "live_rows": live, "backfilled_rows": backfilled,
            "gaps": gaps, "gaps_open": open_gaps}


def delays(cur, seen: dict[tuple, float | None], sample: list[str]) -> list[float]:
    """Publish-to-visible ms of the sampled rows (ordinals numbered in ledger order, as live)."""
    cur.execute(f"SELECT {KEY}, published_ms FROM ledger JOIN unnest(%s::text[]) AS s(token_id) USING (token_id)"
                " ORDER BY idx", (sample,))
    published, ordinals = {}, Counter()
    for token, tx, price, size, side, pub in cur.fetchall():
        k = (token, tx, canon_decimal(str(price)), canon_decimal(str(size)), side)
        published[k + (ordinals[k],)] = pub
        ordinals[k] += 1
    return [(at - published[k] / 1000) * 1000 for k, at in seen.items() if at is not None and k in published]


def wait_until(what: str, pred, timeout: float, every: float = 0.5, proc=None):
    """pred() true within timeout, else a one-line exit (also when polysim ended)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench exchange: polysim exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"bench exchange: {what} not within {timeout:g} s")
        time.sleep(every)


def _terminated(signum, frame):
    raise SystemExit(f"bench exchange: signal {signum}, cleaning up")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench exchange", description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", default=os.environ.get("COLLECTORD_TEST_DSN", DEFAULT_DSN))
    ap.add_argument("--markets", type=int, default=50_000, help="open markets (two tokens each)")
    ap.add_argument("--trade-rate", type=float, default=10_000.0, help="fills/s across the exchange")
    ap.add_argument("--seconds", type=float, default=600.0, help="measured window")
    ap.add_argument("--shards", type=int, default=4, help="trade shards (forked TradesCollector processes)")
    ap.add_argument("--poll", type=float, default=0.2, help="seconds between the monitor's polls")
    ap.add_argument("--backfill-wait", type=float, default=300.0,
                    help="longest wait for the start gaps' backfill before the window starts anyway")
    ap.add_argument("--settle", type=float, default=300.0,
                    help="longest wait after the window for every gap to be recovered")
    ap.add_argument("--trades-only", action="store_true",
                    help="polysim without book refreshes after trades or book changes (not the real exchange's"
                         " shape: shows what the collectors pay for the book messages they skip)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a [collector:trades] option for every shard (repeatable), e.g. connect_stagger=0.1")
    ap.add_argument("--quick", action="store_true", help="5,000 markets, 1,000 trades/s, 45 s, 2 shards (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.markets, args.trade_rate, args.seconds, args.shards = 5000, 1000.0, 45.0, 2
    if args.markets < 1 or args.trade_rate <= 0 or args.seconds <= 0 or args.shards < 1:
        print("bench exchange: --markets, --trade-rate, --seconds and --shards must be positive", file=sys.stderr)
        return 2
    try:
        options = dict(o.split("=", 1) for o in args.option)
    except ValueError:
        print(f"bench exchange: --option wants KEY=VALUE, got {args.option}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _terminated)  # the finally below still stops and drops everything
    signal.signal(signal.SIGINT, _terminated)
    run = uuid.uuid4().hex[:8]
    schema = "bench_exchange_" + run
    admin = psycopg2.connect(args.dsn)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE SCHEMA "{schema}"')
    dsn = with_schema(args.dsn, schema)
    data_dir = f"/tmp/{schema}"
    t_begin = time.monotonic()
    shape = ["--no-trade-book-updates", "--book-rate", "0"] if args.trades_only else []
    proc, port = _polysim.start(["--markets", str(args.markets), "--seed", "1", "--trade-rate", str(args.trade_rate),
                                 "--closed-markets", "0", *shape], timeout=300)
    started_s = time.monotonic() - t_begin
    base = f"http://127.0.0.1:{port}"
    pids: dict[str, int] = {}
    ledger = None
    out: dict = {}
    try:
        migrate(dsn)
        tokens = follow(base, dsn)
        ledger = LedgerCopy(base, dsn)
        t0 = time.monotonic()
        for i in range(args.shards):
            name = f"trades.{i}.{run}"
            pids[name] = fork_collector(port, dsn, data_dir, options, name=name, shard=i, shards=args.shards)
        ledger.start()  # threads after the forks
        health = lambda: get(base + "/_sim/health")  # noqa: E731
        wait_until("every token subscribed", lambda: health()["subscribed_assets"] >= len(tokens), 300, 0.1, proc)
        subscribe_s = time.monotonic() - t0
        mon = psycopg2.connect(dsn, application_name="bench:monitor")
        mon.autocommit = True
        cur = mon.cursor()
        # The monitor must cost the machine little: without this each poll launched two
        # parallel workers (~0.3 core of PostgreSQL at 5 polls/s, taken from polysim).
        cur.execute("SET max_parallel_workers_per_gather = 0")

        def open_gaps() -> int | None:
            """Gaps not yet recovered (None before the first gap row)."""
            cur.execute("SELECT count(*), count(*) FILTER (WHERE recovered_at IS NULL) FROM feed_gaps")
            gaps, still_open = cur.fetchone()
            return still_open if gaps else None

        def start_gaps_done() -> bool:
            return open_gaps() == 0

        # The window starts when the start gaps are backfilled, or after --backfill-wait
        # (the rest of the start backfill then runs inside the window, and is counted).
        try:
            wait_until("start gaps recovered", start_gaps_done, args.backfill_wait, proc=proc)
        except SystemExit:
            if proc.poll() is not None:
                raise
        backfilled_s = time.monotonic() - t0
        open_at_window = open_gaps()
        sample = sorted(tokens)[:: max(1, len(tokens) // SAMPLE_TOKENS)]
        procs = {name: pid for name, pid in pids.items()}
        db0 = {pid: cpu_or_none(pid) for pid in backends(cur, "trades.")}
        cpu0 = {name: cpu_seconds(pid) for name, pid in procs.items()}
        sim_cpu0, h0, w0 = cpu_seconds(proc.pid), health(), time.time()
        cur.execute("SELECT count(*) FROM trades")
        rows0 = cur.fetchone()[0]
        # The monitor: sampled live rows received in the last 10 s (shards commit independently,
        # so a row received earlier may become visible later), first sighting kept. Rows seen
        # by the poll before the window (None) are not timed.
        seen: dict[tuple, float | None] = {}

        def poll(at: float | None) -> None:
            cur.execute("SELECT token_id, tx_hash, price, size, side, ordinal FROM trades"
                        " WHERE token_id = ANY(%s) AND source = 'ws' AND ts > now() - interval '60 s'"
                        " AND received_at > now() - interval '10 s'"
                        # the partitions are days: prune the later (empty) ones and earlier days
                        " AND trade_day >= (now() AT TIME ZONE 'UTC')::date - 1", (sample,))
            for token, tx, price, size, side, ordinal in cur.fetchall():
                seen.setdefault((token, tx, canon_decimal(str(price)), canon_decimal(str(size)), side, ordinal), at)

        poll(None)
        rss: dict[str, list[float]] = {name: [] for name in procs}
        polls, next_rss = 0, 0.0
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            poll(time.time())
            polls += 1
            if time.monotonic() >= next_rss:
                next_rss = time.monotonic() + 5
                for name, pid in procs.items():
                    rss[name].append(rss_mb(pid) or 0.0)
            time.sleep(args.poll)
        w1, h1 = time.time(), health()
        cpu1 = {name: cpu_seconds(pid) for name, pid in procs.items()}
        sim_cpu1 = cpu_seconds(proc.pid)
        db1 = {pid: cpu_or_none(pid) for pid in backends(cur, "trades.")}
        cur.execute("SELECT count(*) FROM trades")
        rows1 = cur.fetchone()[0]
        load = os.getloadavg()[0]
        window = w1 - w0
        cutoff_ms = int(time.time() * 1000) - 2000
        time.sleep(3)
        if proc.poll() is not None:
            raise SystemExit(f"bench exchange: polysim exited ({proc.returncode}) during the window")
        try:  # unrecovered gaps are counted as missing trades, not a failed run
            wait_until("gaps recovered after the window", start_gaps_done, args.settle, proc=proc)
            settled = True
        except SystemExit:
            if proc.poll() is not None:
                raise
            settled = False
        for name, pid in list(pids.items()):
            os.kill(pid, signal.SIGTERM)
        exits = {}
        for name, pid in list(pids.items()):
            _, status = os.waitpid(pid, 0)
            exits[name] = os.waitstatus_to_exitcode(status)
            del pids[name]
        ledger.stop()
        total = ledger.catch_up()
        t_acc = time.monotonic()
        figures = account(cur, cutoff_ms)
        accounting_s = time.monotonic() - t_acc
        lat = delays(cur, seen, sample)
        db_cpu = sum(db1[p] - db0[p] for p in db1 if db0.get(p) is not None and db1[p] is not None)
        shard_cpu = {name: cpu1[name] - cpu0[name] for name in procs}
        committed = rows1 - rows0
        published = h1["trades"] - h0["trades"]
        out = {
            "bench": "exchange", "markets": args.markets, "tokens": len(tokens), "trade_rate": args.trade_rate,
            "trades_only": args.trades_only,
            "shards": args.shards, "options": args.option, "window_s": round(window, 1),
            **figures, "settled": settled, "ledger_trades": total, "ledger_copy_error": ledger.error,
            "published_per_s": round(published / window), "committed_per_s": round(committed / window),
            "ws_messages_per_s": round((h1["ws_messages_out"] - h0["ws_messages_out"]) / window),
            "sockets": h1["connections"], "sockets_opened": h1["ws_connections_total"],
            "polysim_start_s": round(started_s, 1), "subscribe_s": round(subscribe_s, 1),
            "start_gaps_backfilled_s": round(backfilled_s, 1), "gaps_open_at_window_start": open_at_window,
            "delay_ms_p50": round(pct(lat, 0.5), 1), "delay_ms_p99": round(pct(lat, 0.99), 1),
            "delay_ms_max": round(max(lat), 1) if lat else None, "delay_samples": len(lat),
            "monitor_polls": polls,
            "collector_cpu_cores": round(sum(shard_cpu.values()) / window, 3),
            "collector_cpu_us_per_trade": round(sum(shard_cpu.values()) * 1e6 / max(1, committed), 1),
            "db_backends_cpu_cores": round(db_cpu / window, 3), "db_backends": len(db1),
            "polysim_cpu_cores": round((sim_cpu1 - sim_cpu0) / window, 3), "polysim_rss_mb": rss_mb(proc.pid),
            "per_shard": {name.split(".")[1]: {"cpu_cores": round(shard_cpu[name] / window, 3),
                                               "rss_mb_max": round(max(rss[name], default=0.0), 1),
                                               "rss_mb_end": round(rss[name][-1], 1) if rss[name] else None,
                                               "exit": exits[name]} for name in procs},
            "accounting_s": round(accounting_s, 1), "loadavg_1m": round(load, 2), "cpus": os.cpu_count(),
            "total_s": round(time.monotonic() - t_begin, 1),
        }
    finally:
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if ledger is not None:
            ledger.stop()
            ledger.conn.close()
        proc.terminate()
        proc.wait(30)
        admin.cursor().execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()
        shutil.rmtree(data_dir, ignore_errors=True)

    o = out
    print(f"exchange: {o['markets']:,} markets ({o['tokens']:,} tokens followed), {o['trade_rate']:,.0f} trades/s"
          f" requested{' (trades only)' if o['trades_only'] else ''}, {o['shards']} trade shards, {o['sockets']}"
          f" sockets ({o['sockets_opened']} opened), {o['ws_messages_per_s']:,} WS messages/s;"
          f" window {o['window_s']:.0f} s{'' if o['settled'] else '; NOT settled: gaps still open'}")
    print(f"  {'expected':>10} {'missing':>8} {'duplicated':>10} {'rows':>10} {'backfilled':>10} {'gaps':>6}"
          f" {'published/s':>11} {'committed/s':>11}")
    print(f"  {o['expected']:>10,} {o['missing']:>8,} {o['duplicated']:>10,} {o['rows']:>10,}"
          f" {o['backfilled_rows']:>10,} {o['gaps']:>6,} {o['published_per_s']:>11,} {o['committed_per_s']:>11,}")
    print(f"  polysim ready {o['polysim_start_s']} s; every token subscribed {o['subscribe_s']} s after the shards"
          f" started; window from {o['start_gaps_backfilled_s']} s with {o['gaps_open_at_window_start']} start gaps"
          " still to backfill")
    print(f"  publish->visible p50/p99/max {o['delay_ms_p50']}/{o['delay_ms_p99']}/{o['delay_ms_max']} ms"
          f" ({o['delay_samples']} samples, polled every {args.poll:g} s)")
    print(f"  CPU (cores): collectors {o['collector_cpu_cores']} ({o['collector_cpu_us_per_trade']} us/trade),"
          f" their {o['db_backends']} PostgreSQL backends {o['db_backends_cpu_cores']},"
          f" polysim {o['polysim_cpu_cores']}; load {o['loadavg_1m']} on {o['cpus']} CPUs")
    print(f"  {'shard':>6} {'cpu cores':>10} {'rss MB max':>11} {'rss MB end':>11} {'exit':>5}")
    for shard, s in o["per_shard"].items():
        print(f"  {shard:>6} {s['cpu_cores']:>10} {s['rss_mb_max']:>11} {s['rss_mb_end']:>11} {s['exit']:>5}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
