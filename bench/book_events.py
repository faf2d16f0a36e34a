"""Book events: what `[collector:trades] books = yes` costs the trade listener, and the
bytes a book event takes in PostgreSQL.

In order:
  1. frames: polysim's engine, in process and seeded, publishes `--seconds` of simulated
     market-channel traffic to a subscriber of every token (`--markets` markets,
     `--trade-rate` fills/s, `--book-rate` level changes/s): last_trade_price, the
     price_change each trade and each level change sends, the coalesced book after
     trades, best_bid_ask; batched into array frames as polysim's feed sends them;
  2. CPU: the listener's per-frame work on those frames (workers.messages.parse, the
     repeat numbering of trades, and with books on workers.bookevents.rows), books off
     and on alternately (`--rounds` each, so machine noise hits both), CPU time from
     resource.getrusage over the fixed set; reported per message, per book event, and
     as messages/s one core sustains;
  3. PostgreSQL (skipped with --no-db): the rows of one pass written through the
     Writer (COPY) into a fresh schema of `--dsn` (default $COLLECTORD_TEST_DSN): bytes
     per row and per book event (heap + TOAST + indexes, after VACUUM), rows/s written,
     and the trades table's bytes per row beside it.
  4. end to end (--e2e S): polysim as a process and a real forked listener, books off
     then on, S seconds each: the listener process's CPU (utime+stime from /proc, all
     threads, its Writer's included) per message polysim delivered to it.
Prints a table, then one JSON line. Asserts nothing.

    COLLECTORD_TEST_DSN='host=127.0.0.1 port=5432 dbname=test user=postgres' \\
        .venv/bin/python -m bench book_events [--markets 50] [--trade-rate 500] [--book-rate 2000] [--e2e 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import psycopg2  # noqa: E402

from polysim.exchange import Exchange  # noqa: E402
from polysim.options import Options  # noqa: E402
from workers import bookevents  # noqa: E402
from workers.messages import parse  # noqa: E402
from workers.trades import Ordinals  # noqa: E402

DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
BOOK_KINDS = ('"event_type":"book"', '"event_type":"price_change"', '"event_type":"tick_size_change"')


class Sink:
    """Every message of every token, as polysim's feed queues them for one subscriber of all."""

    def __init__(self) -> None:
        self.pending: list[str] = []

    def wants(self, asset: str) -> bool:
        return True

    def emit(self, assets, text: str, custom_only: bool = False) -> None:
        self.pending.append(text)

    def emit_global(self, text: str) -> None:
        pass


def frames(markets: int, trade_rate: float, book_rate: float, seconds: float, batch: int = 500) -> list[str]:
    """Simulated traffic as the frames one socket subscribed to every token receives."""
    sink = Sink()
    x = Exchange(Options(markets=markets, seed=1, trade_rate=trade_rate, book_rate=book_rate, multi_fill=0.1,
                         closed_markets=0), 1786000000000, sink)
    out = ["[" + ",".join(x.book_text(m, k, initial=True) for m in x.markets for k in (0, 1)) + "]"]
    t = 0.0
    while t < seconds:
        t += 0.01  # polysim's engine tick
        x.advance(t, 1786000000000 + int(t * 1000))
        pending, sink.pending = sink.pending, []
        for i in range(0, len(pending), batch):
            chunk = pending[i:i + batch]
            out.append(chunk[0] if len(chunk) == 1 else "[" + ",".join(chunk) + "]")
    return out


def count(texts: list[str]) -> tuple[int, int]:
    """(messages, book events) in the frames."""
    messages = books = 0
    for text in texts:
        messages += text.count('"event_type":')
        books += sum(text.count(k) for k in BOOK_KINDS)
    return messages, books


def handle(texts: list[str], books: bool, wanted=None) -> list[list]:
    """The listener's per-frame work (workers/trades.py TradesCollector._handle, without
    the socket and the Writer's buffer append): parse, number trades, build book rows."""
    ordinals, stamps = Ordinals(), bookevents.Stamps()
    rows: list[list] = []
    for text in texts:
        now = datetime.now(timezone.utc)
        out = parse(text, books)
        if out.trades:
            ordinals.number(out.trades, now.isoformat())
        if books and (out.book_events or out.ticks):
            got, _ = bookevents.rows(out.book_events, out.ticks, stamps, now, wanted)
            rows += got
    return rows


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure_cpu(texts: list[str], rounds: int, wanted) -> dict:
    best = {False: float("inf"), True: float("inf")}
    for _ in range(rounds):
        for books in (False, True):
            c0 = cpu()
            handle(texts, books, wanted)
            best[books] = min(best[books], cpu() - c0)
    return best


def with_schema(dsn: str, schema: str) -> str:
    opt = f"-csearch_path={schema}"
    if "://" in dsn:
        return f"{dsn}{'&' if '?' in dsn else '?'}options={opt.replace('=', '%3D')}"
    return f"{dsn} options='{opt}'"


def measure_db(dsn: str, rows: list[list], trade_rows: int) -> dict:
    from workers.storage import Writer, migrate

    schema = "bench_books_" + uuid.uuid4().hex[:8]
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    sdsn = with_schema(dsn, schema)
    try:
        migrate(sdsn)
        with tempfile.TemporaryDirectory() as spool:
            w = Writer(sdsn, spool, name="bench", max_rows=5000, max_age=1.0).open()
            t0 = time.monotonic()
            for i in range(0, len(rows), 5000):
                w.add_rows("book_events", rows[i:i + 5000])
            w.close()
            seconds = time.monotonic() - t0
        with admin.cursor() as cur:
            cur.execute(f"VACUUM ANALYZE {schema}.book_events")
            cur.execute(f"SELECT count(*), pg_table_size('{schema}.book_events'),"
                        f" pg_indexes_size('{schema}.book_events') FROM {schema}.book_events")
            n, heap, index = cur.fetchone()
            cur.execute(f"SELECT kind, count(*), avg(pg_column_size(b.*)) FROM {schema}.book_events b GROUP BY kind")
            kinds = {k: (c, float(a)) for k, c, a in cur.fetchall()}
        return {"rows": n, "rows_offered": len(rows), "write_s": seconds, "heap_bytes": heap, "index_bytes": index,
                "bytes_per_row": (heap + index) / n, "heap_per_row": heap / n, "index_per_row": index / n,
                "row_bytes_by_kind": {k: round(a, 1) for k, (c, a) in kinds.items()},
                "rows_by_kind": {k: c for k, (c, a) in kinds.items()}}
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def e2e(dsn: str, markets: int, trade_rate: float, book_rate: float, seconds: float) -> dict:
    """polysim as a process, a forked listener books off then on: CPU per delivered message."""
    from bench import _polysim
    from bench.ingest import cpu_seconds, follow, fork_collector, open_tokens
    from workers.storage import migrate

    out = {}
    for books in (False, True):
        proc, port = _polysim.start(["--markets", str(markets), "--seed", "1", "--trade-rate", str(trade_rate),
                                     "--book-rate", str(book_rate), "--closed-markets", "0"], timeout=30)
        schema = "bench_books_" + uuid.uuid4().hex[:8]
        admin = psycopg2.connect(dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE SCHEMA {schema}")
        sdsn = with_schema(dsn, schema)
        pid = None
        try:
            migrate(sdsn)
            follow(sdsn, open_tokens(port))
            with tempfile.TemporaryDirectory() as data_dir:
                pid = fork_collector(port, sdsn, data_dir, {"books": "true" if books else "false"})
                time.sleep(3.0)  # connect, initial dump, start gap

                def delivered() -> int:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/health", timeout=30) as r:
                        return json.loads(r.read())["ws_messages_out"]

                m0, c0, t0 = delivered(), cpu_seconds(pid), time.monotonic()
                time.sleep(seconds)
                m1, c1, t1 = delivered(), cpu_seconds(pid), time.monotonic()
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
                pid = None
            out["on" if books else "off"] = {"messages": m1 - m0, "messages_s": (m1 - m0) / (t1 - t0),
                                             "cpu_s": c1 - c0, "cpu_us_per_message": (c1 - c0) / max(1, m1 - m0) * 1e6}
        finally:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            with admin.cursor() as cur:
                cur.execute(f"DROP SCHEMA {schema} CASCADE")
            admin.close()
            proc.terminate()
            proc.wait(30)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench book_events", description=__doc__.split("\n")[0])
    ap.add_argument("--markets", type=int, default=50)
    ap.add_argument("--trade-rate", type=float, default=500.0)
    ap.add_argument("--book-rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=10.0, help="simulated seconds of traffic (the fixed set)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dsn", default=os.environ.get("COLLECTORD_TEST_DSN", DEFAULT_DSN))
    ap.add_argument("--no-db", action="store_true", help="skip the PostgreSQL part")
    ap.add_argument("--e2e", type=float, default=0.0, metavar="S", help="also run polysim + a real listener, S s each")
    ap.add_argument("--quick", action="store_true", help="small and short (tests/test_bench.py)")
    a = ap.parse_args(argv)
    if a.quick:
        a.markets, a.seconds, a.rounds = 10, 2.0, 1
    texts = frames(a.markets, a.trade_rate, a.book_rate, a.seconds)
    messages, book_msgs = count(texts)
    rows = handle(texts, True)
    trades = sum(len(parse(t).trades) for t in texts)
    best = measure_cpu(texts, a.rounds, None)
    off, on = best[False], best[True]
    result = {
        "markets": a.markets, "trade_rate": a.trade_rate, "book_rate": a.book_rate, "sim_seconds": a.seconds,
        "frames": len(texts), "messages": messages, "book_messages": book_msgs, "trades": trades,
        "book_rows": len(rows), "bytes_on_wire": sum(len(t) for t in texts),
        "cpu_off_s": off, "cpu_on_s": on,
        "us_per_message_off": off / messages * 1e6, "us_per_message_on": on / messages * 1e6,
        "us_per_book_message_extra": (on - off) / max(1, book_msgs) * 1e6,
        "messages_per_cpu_s_off": messages / off, "messages_per_cpu_s_on": messages / on,
    }
    print(f"{messages:,} messages in {len(texts):,} frames ({book_msgs:,} book events -> {len(rows):,} rows; "
          f"{trades:,} trades), {a.markets} markets, {a.seconds:g} simulated s")
    print(f"{'listener work per frame':<28}{'books off':>14}{'books on':>14}")
    print(f"{'CPU s (best of ' + str(a.rounds) + ')':<28}{off:>14.3f}{on:>14.3f}")
    print(f"{'us CPU per message':<28}{result['us_per_message_off']:>14.2f}{result['us_per_message_on']:>14.2f}")
    print(f"{'messages per CPU second':<28}{result['messages_per_cpu_s_off']:>14,.0f}"
          f"{result['messages_per_cpu_s_on']:>14,.0f}")
    print(f"extra us CPU per book event with books on: {result['us_per_book_message_extra']:.2f}")
    if not a.no_db:
        db = measure_db(a.dsn, rows, trades)
        result["db"] = db
        per_event = (db["heap_bytes"] + db["index_bytes"]) / book_msgs
        result["db"]["bytes_per_book_message"] = per_event
        print(f"PostgreSQL: {db['rows']:,} rows stored of {db['rows_offered']:,} offered (duplicates merged), "
              f"{db['rows_offered'] / db['write_s']:,.0f} rows/s through the Writer")
        print(f"  bytes per row {db['bytes_per_row']:.0f} (heap {db['heap_per_row']:.0f} + indexes "
              f"{db['index_per_row']:.0f}); per book event {per_event:.0f}; row size by kind "
              f"{db['row_bytes_by_kind']}")
    if a.e2e > 0:
        result["e2e"] = e2e(a.dsn, a.markets, a.trade_rate, a.book_rate, a.e2e)
        for k, v in result["e2e"].items():
            print(f"end to end, books {k}: {v['messages_s']:,.0f} messages/s delivered, "
                  f"{v['cpu_us_per_message']:.2f} us listener CPU per message")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
