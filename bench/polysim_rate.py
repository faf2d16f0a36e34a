"""Sustained WebSocket message rate one polysim process delivers to one client.

For each requested trade rate: start `python -m polysim` on a free loopback port,
subscribe one websocket-client connection to every open token, let it warm up,
then count for `--seconds` what arrives (messages, frames, last_trade_price
trades) against what polysim published (its ledger size via /_sim/health) and its
engine lag (how far simulated time fell behind the wall clock). A rate is
sustained when the client received what was published and the lag stayed small.

With `--connections N` (N > 1) the tokens are spread over N connections instead,
each subscribed in one go and read raw (bytes counted, messages and trades
counted by their `"event_type":...` keys in the raw stream), so the client side
stays cheap next to polysim; that is how a fan-out to many consumers looks.
Every row also carries polysim's own CPU over the window (utime + stime from
/proc): `polysim_cores` and `polysim_us_per_trade` (CPU per published trade).

Prints a table and, last, one JSON line with every row and the best sustained
rate. Not a test: it asserts nothing.

    .venv/bin/python bench/polysim_rate.py --rates 5000,20000,50000 --seconds 5
    # the full mix (book events on) over the whole exchange, 252 consumers:
    .venv/bin/python bench/polysim_rate.py --book-updates --markets 50000 --rates 4000 \
        --connections 252 --warmup 10 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import time
import urllib.request

import websocket

from bench import _polysim
from bench.ingest import cpu_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(markets: int, rate: float, extra: list[str]) -> tuple[subprocess.Popen, int]:
    return _polysim.start(["--markets", str(markets), "--seed", "1", "--trade-rate", str(rate),
                           "--closed-markets", "0", *extra], timeout=120)


def get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


def tokens_of(port: int) -> list[str]:
    """Every token on the CLOB, from /clob/simplified-markets (1,000 markets a page)."""
    out, cursor = [], "MA=="
    while cursor != "LTE=":
        page = get(port, f"/clob/simplified-markets?next_cursor={cursor}")
        out += [t["token_id"] for m in page["data"] for t in m["tokens"]]
        cursor = page["next_cursor"]
    return out


def read_one(port: int, pid: int, tokens: list[str], seconds: float, warmup: float) -> tuple:
    """One websocket-client connection subscribed to every token, frames read whole.
    Returns (counts, elapsed, health before, health after, polysim CPU seconds in between)."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws/market", timeout=10,
                                     skip_utf8_validation=True)
    for i in range(0, len(tokens), 100):
        ws.send(json.dumps({"assets_ids": tokens[i:i + 100], "type": "market"} if i == 0 else
                           {"operation": "subscribe", "assets_ids": tokens[i:i + 100]}))
    counts = {"messages": 0, "frames": 0, "trades": 0, "bytes": 0, "dropped": 0}
    t_end_warm = time.monotonic() + warmup
    while time.monotonic() < t_end_warm:
        ws.recv()
    h0 = get(port, "/_sim/health")
    c0 = cpu_seconds(pid)
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
    cpu = cpu_seconds(pid) - c0
    ws.close()
    return counts, elapsed, h0, h1, cpu


def read_raw(port: int, pid: int, tokens: list[str], seconds: float, warmup: float,
             connections: int) -> tuple:
    """The tokens spread over `connections` connections, read raw without decoding frames
    (a text PING on each every 5 s keeps them alive). Returns what read_one does;
    `frames` is not counted (0)."""
    sel = selectors.DefaultSelector()
    conns = []
    per = (len(tokens) + connections - 1) // connections
    for i in range(connections):
        part = tokens[i * per:(i + 1) * per]
        if not part:
            break
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws/market", timeout=10,
                                         skip_utf8_validation=True)
        for j in range(0, len(part), 1000):
            ws.send(json.dumps({"assets_ids": part[j:j + 1000], "type": "market"} if j == 0 else
                               {"operation": "subscribe", "assets_ids": part[j:j + 1000]}))
        ws.sock.setblocking(False)
        sel.register(ws.sock, selectors.EVENT_READ, ws)
        conns.append(ws)
    counts = {"messages": 0, "frames": 0, "trades": 0, "bytes": 0, "dropped": 0}
    tails: dict = {}  # per socket, the last bytes read (a key split over two reads is counted once)

    def pump(until: float, count: bool) -> None:
        last_ping = time.monotonic()
        while time.monotonic() < until:
            for key, _ in sel.select(0.2):
                try:
                    data = key.fileobj.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # polysim closed it (a slow consumer, a missed PING)
                    sel.unregister(key.fileobj)
                    conns.remove(key.data)
                    counts["dropped"] += 1
                    continue
                if count:
                    tail = tails.get(key.fd, b"")
                    joined = tail + data
                    counts["bytes"] += len(data)
                    counts["messages"] += joined.count(b'"event_type":') - tail.count(b'"event_type":')
                    counts["trades"] += (joined.count(b'"event_type":"last_trade_price"')
                                         - tail.count(b'"event_type":"last_trade_price"'))
                    tails[key.fd] = data[-40:]
            if time.monotonic() - last_ping > 5:
                last_ping = time.monotonic()
                for ws in conns:
                    ws.sock.setblocking(True)
                    try:
                        ws.send("PING")
                    except (OSError, websocket.WebSocketException):
                        pass  # closed by polysim: the next read counts it
                    ws.sock.setblocking(False)

    try:
        pump(time.monotonic() + warmup, False)
        h0 = get(port, "/_sim/health")
        c0 = cpu_seconds(pid)
        t0 = time.monotonic()
        pump(t0 + seconds, True)
        elapsed = time.monotonic() - t0
        h1 = get(port, "/_sim/health")
        cpu = cpu_seconds(pid) - c0
    finally:
        for ws in conns:
            sel.unregister(ws.sock)
            ws.sock.close()
        sel.close()
    return counts, elapsed, h0, h1, cpu


def measure(rate: float, seconds: float, warmup: float, markets: int, extra: list[str],
            connections: int = 1) -> dict:
    proc, port = start(markets, rate, extra)
    try:
        tokens = tokens_of(port)
        if connections > 1:
            counts, elapsed, h0, h1, cpu = read_raw(port, proc.pid, tokens, seconds, warmup, connections)
        else:
            counts, elapsed, h0, h1, cpu = read_one(port, proc.pid, tokens, seconds, warmup)
        published = h1["trades"] - h0["trades"]
        return {
            "trade_rate": rate, "options": " ".join(extra) or "-", "seconds": round(elapsed, 2),
            "published_trades_s": round(published / elapsed),
            "recv_trades_s": round(counts["trades"] / elapsed),
            "recv_msgs_s": round(counts["messages"] / elapsed),
            "recv_frames_s": round(counts["frames"] / elapsed),
            "recv_MB_s": round(counts["bytes"] / elapsed / 1e6, 2),
            "engine_lag_s": h1["engine_lag_s"],
            "dropped_conns": counts["dropped"],
            "polysim_cores": round(cpu / elapsed, 3),
            "polysim_us_per_trade": round(cpu / max(published, 1) * 1e6, 1),
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
    ap.add_argument("--connections", type=int, default=1,
                    help="spread the tokens over this many connections read raw (default 1: one connection, frames read whole)")
    args = ap.parse_args(argv)
    extra = [] if args.book_updates else ["--no-trade-book-updates", "--book-rate", "0"]
    rows = [measure(float(r), args.seconds, args.warmup, args.markets, extra, args.connections) for r in args.rates.split(",")]
    cols = list(rows[0])
    print(" | ".join(f"{c:>20}" for c in cols))
    for row in rows:
        print(" | ".join(f"{str(row[c]):>20}" for c in cols))
    sustained = [r for r in rows if r["recv_trades_s"] >= 0.97 * r["published_trades_s"]
                 and r["published_trades_s"] >= 0.9 * r["trade_rate"] and r["engine_lag_s"] < 0.25 and r["dropped_conns"] == 0]
    best = max(sustained, key=lambda r: r["recv_msgs_s"]) if sustained else None
    print(json.dumps({"bench": "polysim_rate", "rows": rows,
                      "best_sustained_msgs_s": best["recv_msgs_s"] if best else None,
                      "best_sustained_trades_s": best["recv_trades_s"] if best else None}))


if __name__ == "__main__":
    main()
