"""Sustained WebSocket message rate one polysim process delivers to one client.

For each requested trade rate: start `python -m polysim` on a free loopback port,
subscribe one websocket-client connection to every open token, let it warm up,
then count for `--seconds` what arrives (messages, frames, last_trade_price
trades) against what polysim published (its ledger size via /_sim/health) and its
engine lag (how far simulated time fell behind the wall clock). A rate is
sustained when the client received what was published and the lag stayed small.

Prints a table and, last, one JSON line with every row and the best sustained
rate. Not a test: it asserts nothing.

    .venv/bin/python bench/polysim_rate.py --rates 5000,20000,50000 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

import websocket

from bench import _polysim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(markets: int, rate: float, extra: list[str]) -> tuple[subprocess.Popen, int]:
    return _polysim.start(["--markets", str(markets), "--seed", "1", "--trade-rate", str(rate),
                           "--closed-markets", "0", *extra], timeout=30)


def get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


def tokens_of(port: int) -> list[str]:
    out, cursor = [], None
    while True:
        q = "/gamma/markets/keyset?limit=100" + (f"&after_cursor={cursor}" if cursor else "")
        page = get(port, q)
        out += [t for m in page["markets"] for t in json.loads(m["clobTokenIds"])]
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def measure(rate: float, seconds: float, warmup: float, markets: int, extra: list[str]) -> dict:
    proc, port = start(markets, rate, extra)
    try:
        tokens = tokens_of(port)
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws/market", timeout=10,
                                         skip_utf8_validation=True)
        for i in range(0, len(tokens), 100):
            ws.send(json.dumps({"assets_ids": tokens[i:i + 100], "type": "market"} if i == 0 else
                               {"operation": "subscribe", "assets_ids": tokens[i:i + 100]}))
        counts = {"messages": 0, "frames": 0, "trades": 0, "bytes": 0}
        t_end_warm = time.monotonic() + warmup
        while time.monotonic() < t_end_warm:
            ws.recv()
        h0 = get(port, "/_sim/health")
        t0 = time.monotonic()
        last_ping = t0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            if now - last_ping > 5:
                ws.send("PING")
                last_ping = now
            frame = ws.recv()
            counts["frames"] += 1
            counts["bytes"] += len(frame)
            if frame == "PONG":
                continue
            # Counting keys instead of json.loads keeps the client from being the bottleneck
            # (every message has exactly one "event_type" key; polysim frames are compact JSON).
            counts["messages"] += frame.count('"event_type":')
            counts["trades"] += frame.count('"event_type":"last_trade_price"')
        elapsed = time.monotonic() - t0
        h1 = get(port, "/_sim/health")
        ws.close()
        published = h1["trades"] - h0["trades"]
        return {
            "trade_rate": rate, "options": " ".join(extra) or "-", "seconds": round(elapsed, 2),
            "published_trades_s": round(published / elapsed),
            "recv_trades_s": round(counts["trades"] / elapsed),
            "recv_msgs_s": round(counts["messages"] / elapsed),
            "recv_frames_s": round(counts["frames"] / elapsed),
            "recv_MB_s": round(counts["bytes"] / elapsed / 1e6, 2),
            "engine_lag_s": h1["engine_lag_s"],
        }
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="2000,10000,25000,50000,100000")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--markets", type=int, default=200)
    ap.add_argument("--book-updates", action="store_true",
                    help="keep polysim's book refreshes after trades and its book-rate (default: trades only)")
    args = ap.parse_args(argv)
    extra = [] if args.book_updates else ["--no-trade-book-updates", "--book-rate", "0"]
    rows = [measure(float(r), args.seconds, args.warmup, args.markets, extra) for r in args.rates.split(",")]
    cols = list(rows[0])
    print(" | ".join(f"{c:>18}" for c in cols))
    for row in rows:
        print(" | ".join(f"{str(row[c]):>18}" for c in cols))
    sustained = [r for r in rows if r["recv_trades_s"] >= 0.97 * r["published_trades_s"]
                 and r["published_trades_s"] >= 0.9 * r["trade_rate"] and r["engine_lag_s"] < 0.25]
    best = max(sustained, key=lambda r: r["recv_msgs_s"]) if sustained else None
    print(json.dumps({"bench": "polysim_rate", "rows": rows,
                      "best_sustained_msgs_s": best["recv_msgs_s"] if best else None,
                      "best_sustained_trades_s": best["recv_trades_s"] if best else None}))


if __name__ == "__main__":
    main()
