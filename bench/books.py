"""One orderbooks cycle and one prices cycle for 10,000 followed tokens, against polysim.

In order:
  1. start `python -m polysim` with --markets N (2 tokens each: 5,000 -> 10,000)
     on a free loopback port; make a fresh schema in PostgreSQL and migrate it;
  2. run the markets collector once in-process (full keyset scan, followed set
     from an empty [selection] = every open market);
  3. run `--cycles` orderbooks cycles and prices cycles with production options
     (client-side rate limit at 0.4 of the published limits, batch 250):
     seconds, HTTP requests, rows. A cycle ends with its own writer flush, so
     its seconds include the PostgreSQL writes ("flush s" is what was left);
  4. side by side, the same books fetched raw (no rate limit, no database):
     POST /books in batches of 250 vs one GET /book per token, plus the lower
     bound the published limits put on each (requests / limit per second).
Prints a table and one JSON line. Not a test: it asserts nothing.

    COLLECTORD_TEST_DSN='host=127.0.0.1 port=5432 dbname=test user=postgres' \\
        .venv/bin/python -m bench books --markets 5000 --cycles 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import psycopg2

from bench import _polysim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_polysim(markets: int, seed: int, trade_rate: float) -> tuple[subprocess.Popen, int]:
    return _polysim.start(["--markets", str(markets), "--seed", str(seed), "--trade-rate", str(trade_rate),
                           "--closed-markets", "0"], timeout=120)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench books", description=__doc__.splitlines()[0])
    ap.add_argument("--markets", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--trade-rate", type=float, default=20.0)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--dsn", default=os.environ.get("COLLECTORD_TEST_DSN",
                                                    "host=127.0.0.1 port=5432 dbname=test user=postgres"))
    args = ap.parse_args(argv)

    from workers.http import PUBLISHED_LIMITS, Client
    from workers.markets import MarketsCollector
    from workers.orderbooks import OrderbooksCollector
    from workers.prices import PricesCollector
    from workers.storage import migrate
    from workers.storage.followed import followed_tokens

    proc, port = start_polysim(args.markets, args.seed, args.trade_rate)
    base = f"http://127.0.0.1:{port}"
    schema = "bench_books_" + uuid.uuid4().hex[:8]
    admin = psycopg2.connect(args.dsn, connect_timeout=10)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE SCHEMA "{schema}"')
    dsn = f"{args.dsn} options='-csearch_path={schema}'"
    data_dir = tempfile.mkdtemp(prefix="bench-books-")
    workers = []
    try:
        migrate(dsn)
        urls = dict(gamma_url=base + "/gamma", clob_url=base + "/clob", data_url=base + "/data",
                    ws_url=f"ws://127.0.0.1:{port}/ws/market")

        def make(cls, name, **opts):
            w = cls(name=name, dsn=dsn, data_dir=data_dir, selection={}, **urls,
                    **{k: str(v) for k, v in opts.items()})
            w.init_process()
            workers.append(w)
            return w

        markets = make(MarketsCollector, "markets")
        _, t_markets = timed(markets.step)
        tokens = [t.token_id for t in followed_tokens(markets.db)]
        print(f"polysim: {args.markets} markets; markets cycle {t_markets:.2f} s, "
              f"{markets.last_cycle['requests']} requests; followed tokens: {len(tokens)}")

        rows = []
        books = make(OrderbooksCollector, "orderbooks", batch=args.batch)
        prices = make(PricesCollector, "prices", batch=args.batch)
        for i in range(args.cycles):
            for label, w in (("orderbooks", books), ("prices", prices)):
                w.step()
                cycle = dict(w.last_cycle)
                _, flush_s = timed(w.writer.flush)
                rows.append({"collector": label, "cycle": i + 1, "seconds": cycle["seconds"],
                             "flush_s": round(flush_s, 3), "requests": cycle["requests"],
                             "tokens": cycle["tokens"],
                             "rows": cycle.get("written", cycle.get("rows")),
                             "unchanged": cycle.get("unchanged"), "missing": cycle.get("missing"),
                             "failed_batches": cycle["failed_batches"]})
        print(f"\n{'collector':<11} {'cycle':>5} {'seconds':>8} {'flush s':>8} {'requests':>8} {'tokens':>7} "
              f"{'rows':>6} {'unchanged':>9} {'missing':>7}")
        for r in rows:
            print(f"{r['collector']:<11} {r['cycle']:>5} {r['seconds']:>8.2f} {r['flush_s']:>8.2f} "
                  f"{r['requests']:>8} {r['tokens']:>7} {r['rows']:>6} {str(r['unchanged']):>9} "
                  f"{r['missing']:>7}")
        for w in (books, prices):
            print(f"{w.name} HTTP latency p50/p99 ms: {w.status().get('latency_ms')}")

        # Side by side: the same books, raw (no client-side limit, no database).
        raw = Client(rate=0, apis={urls["clob_url"]: "clob"})
        batches = [tokens[i:i + args.batch] for i in range(0, len(tokens), args.batch)]
        got, t_batch = timed(lambda: sum(len(raw.post_json(urls["clob_url"] + "/books",
                                                           [{"token_id": t} for t in b])) for b in batches))
        single = Client(rate=0, apis={urls["clob_url"]: "clob"})
        got_single, t_single = timed(lambda: sum(
            1 for t in tokens if single.get_json(urls["clob_url"] + "/book", {"token_id": t})))
        limit_batch = PUBLISHED_LIMITS[("clob", "/books")] / 10.0
        limit_single = PUBLISHED_LIMITS[("clob", "/book")] / 10.0
        side = [
            {"mode": f"POST /books x{args.batch}", "requests": len(batches), "books": got, "seconds": t_batch,
             "floor_at_limit_s": len(batches) / limit_batch, "floor_at_0.4_s": len(batches) / (0.4 * limit_batch)},
            {"mode": "GET /book per token", "requests": len(tokens), "books": got_single, "seconds": t_single,
             "floor_at_limit_s": len(tokens) / limit_single, "floor_at_0.4_s": len(tokens) / (0.4 * limit_single)},
        ]
        print(f"\nsame {len(tokens)} books, raw over loopback (no rate limit, no DB):")
        print(f"{'mode':<22} {'requests':>8} {'books':>6} {'seconds':>8} {'floor@limit s':>13} {'floor@0.4 s':>11}")
        for s in side:
            print(f"{s['mode']:<22} {s['requests']:>8} {s['books']:>6} {s['seconds']:>8.2f} "
                  f"{s['floor_at_limit_s']:>13.1f} {s['floor_at_0.4_s']:>11.1f}")
        print(f"ratio GET-per-token / batched: {t_single / t_batch:.1f}x time, "
              f"{len(tokens) / max(1, len(batches)):.0f}x requests")
        print(json.dumps({"markets": args.markets, "tokens": len(tokens), "cycles": rows, "side_by_side": side}))
        return 0
    finally:
        for w in workers:
            w.shutdown()
        admin.cursor().execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
