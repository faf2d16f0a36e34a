"""Market-channel parser throughput against json.loads alone on the same recorded bytes.

The inputs are the real recorded WebSocket messages in tests/data (one message per
line: books, price changes, best bid/ask, 41 trades, tick-size change, the 2024
shapes, the documented custom-feature events). Three input sets:
  all      every recorded message, one frame each
  trades   only the recorded `last_trade_price` messages, one frame each (the hot path)
  array    the recorded trades joined into array frames of 100 (how a busy socket
           delivers them; polysim batches up to 500)
For each set, json.loads(text) and workers.messages.parse(text) run alternately in
rounds of about `--round` seconds (A/B/A/B, so machine noise hits both), and the
best round of each is reported in messages/s; the ratio parse/json.loads says what
validation and row building cost over the floor of decoding the JSON at all.

Then the frame reader, on the `all` set's messages one frame each (the exchange
sends mostly one event per frame), sent through a socketpair by a forked process:
CPU of this thread per frame for workers.ws.Connection.read() (our frame reader)
against websocket-client's own `recv_data_frame` on the same bytes, alternately.

    .venv/bin/python -m bench parse [--seconds 6] [--round 0.5] [--quick]

Prints a table, then one JSON line. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from workers.messages import parse  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
FILES = ("ws_market_messages.jsonl", "ws_market_messages_2024.jsonl", "ws_market_custom_feature_examples_docs.jsonl")


def recorded() -> list[str]:
    out = []
    for name in FILES:
        with open(os.path.join(DATA, name), encoding="utf-8") as f:
            out += [line.rstrip("\n") for line in f if line.strip()]
    return out


def measure(fn, frames: list[str], messages: int, seconds: float) -> float:
    """Messages per second of fn over frames, for about `seconds`."""
    loops = 0
    start = time.perf_counter()
    while True:
        for frame in frames:
            fn(frame)
        loops += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return loops * messages / elapsed


def read_cpu(wire: bytes, frames: int, ours: bool) -> float:
    """This thread's CPU seconds to read `frames` frames of `wire`, sent by a forked child."""
    import websocket

    from bench._stages import sender
    from workers.ws import BufferedWebSocket, Connection, WsOptions

    left, pid = sender(wire)
    left.settimeout(10)
    got = 0
    try:
        if ours:
            ws = BufferedWebSocket(skip_utf8_validation=True)
            ws.sock, ws.connected = left, True
            conn = Connection("ws://socketpair", WsOptions(read_timeout=10.0), connector=lambda *a, **k: ws)
            conn.connect()
            start = time.thread_time()
            while got < frames:
                got += len(conn.read())
        else:
            ws = websocket.WebSocket(skip_utf8_validation=True)
            ws.sock, ws.connected = left, True
            start = time.thread_time()
            while got < frames:
                _, frame = ws.recv_data_frame(True)
                frame.data.decode("utf-8", "replace")
                got += 1
        return time.thread_time() - start
    finally:
        left.close()
        os.waitpid(pid, 0)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench parse", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="total time per input set")
    ap.add_argument("--round", type=float, default=0.5, help="seconds per A/B round")
    ap.add_argument("--quick", action="store_true", help="a second per set (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.round = 1.0, 0.25

    lines = recorded()
    trades = [t for t in lines if json.loads(t).get("event_type") == "last_trade_price"]
    # Five array frames of 100 trades each, cycling through the recorded trades.
    arrays = ["[" + ",".join(trades[(k * 100 + i) % len(trades)] for i in range(100)) + "]" for k in range(5)]
    sets = {
        "all": (lines, len(lines)),
        "trades": (trades, len(trades)),
        "array": (arrays, sum(len(json.loads(a)) for a in arrays)),
    }
    # Sanity: the parser accepts every recorded message (else the figures mean nothing).
    bad = [t[:60] for t in lines if parse(t).skipped]
    if bad:
        print(f"parser skipped recorded messages: {bad}", file=sys.stderr)
        return 1

    results = {}
    print(f"{'input':8} {'messages':>8} {'json.loads msg/s':>17} {'parse msg/s':>12} {'parse/json':>10}")
    for name, (frames, messages) in sets.items():
        best_json = best_parse = 0.0
        rounds = max(1, int(args.seconds / (2 * args.round)))
        for _ in range(rounds):
            best_json = max(best_json, measure(json.loads, frames, messages, args.round))
            best_parse = max(best_parse, measure(parse, frames, messages, args.round))
        ratio = best_parse / best_json
        results[name] = {"messages": messages, "json_loads_msgs_per_s": round(best_json),
                         "parse_msgs_per_s": round(best_parse), "parse_over_json": round(ratio, 3)}
        print(f"{name:8} {messages:8d} {best_json:17,.0f} {best_parse:12,.0f} {ratio:10.2f}")
    from websocket import ABNF

    copies = 100 if args.quick else 1000
    wire = b"".join(ABNF(1, 0, 0, 0, ABNF.OPCODE_TEXT, 0, t.encode()).format() for t in lines) * copies
    frames = len(lines) * copies
    best = {True: float("inf"), False: float("inf")}
    for _ in range(3 if args.quick else 7):
        for ours in (False, True):
            best[ours] = min(best[ours], read_cpu(wire, frames, ours))
    reader = {"frames": frames, "ours_us_per_frame": round(best[True] / frames * 1e6, 2),
              "websocket_client_us_per_frame": round(best[False] / frames * 1e6, 2),
              "ours_over_library": round(best[True] / best[False], 3)}
    print(f"frame reader, {frames:,} frames of one message: ours {reader['ours_us_per_frame']} us/frame,"
          f" websocket-client's recv_data_frame {reader['websocket_client_us_per_frame']} us/frame"
          f" ({reader['ours_over_library']:.2f}x the CPU)")
    print(json.dumps({"bench": "parse", "python": sys.version.split()[0], "results": results,
                      "frame_reader": reader}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
