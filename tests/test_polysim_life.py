"""polysim over time: custom-feature events, lifecycle (new -> CLOB 404 -> open -> closed ->
resolved, Gamma and WebSocket agreeing), ping timeout, determinism, CLI behaviour."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error

import pytest
import websocket

from tests.test_polysim import DATA, get, get_error, jtype, same_shape, wait_for


def fixture_lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def collect(ws, until, timeout=20.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while not until(out):
        assert time.monotonic() < deadline, f"timed out with {len(out)} messages"
        frame = ws.recv()
        if frame == "PONG":
            continue
        data = json.loads(frame)
        out += data if isinstance(data, list) else [data]
    return out


def kinds(msgs) -> set:
    return {m.get("event_type") for m in msgs}


def test_custom_feature_events_match_recorded_shapes(polysim):
    sim = polysim(markets=4, seed=21, trade_rate=40.0, book_rate=40.0, new_market_rate=2.0, resolve_rate=1.0,
                  resolve_delay=0.3, clob_delay=1.0)
    _, markets = get(sim.gamma_url + "/markets")
    tokens = [t for m in markets for t in json.loads(m["clobTokenIds"])]
    ws = websocket.create_connection(sim.ws_url, timeout=10, skip_utf8_validation=True)
    ws.send(json.dumps({"assets_ids": tokens, "type": "market", "custom_feature_enabled": True}))
    plain = websocket.create_connection(sim.ws_url, timeout=10, skip_utf8_validation=True)
    plain.send(json.dumps({"assets_ids": tokens, "type": "market"}))
    want = {"book", "price_change", "last_trade_price", "best_bid_ask", "new_market", "market_resolved"}
    msgs = collect(ws, lambda ms: want <= kinds(ms))
    recorded = fixture_lines("ws_market_messages.jsonl")
    docs = fixture_lines("ws_market_custom_feature_examples_docs.jsonl")
    real = {"book": recorded[0], "price_change": recorded[2], "best_bid_ask": recorded[3],
            "last_trade_price": recorded[4], "new_market": docs[1], "market_resolved": docs[2]}
    for m in msgs:
        ref = real.get(m["event_type"])
        if ref is None:
            continue
        keys = [k for k in ref if not (m["event_type"] == "book" and k in ("tick_size", "last_trade_price"))]
        same_shape(m, ref, keys)
        if m["event_type"] == "price_change":
            for change in m["price_changes"]:
                same_shape(change, ref["price_changes"][0], list(ref["price_changes"][0]))
    # without custom_feature_enabled: never best_bid_ask / new_market / market_resolved
    plain_msgs = collect(plain, lambda ms: len(ms) > 150)
    assert not kinds(plain_msgs) & {"best_bid_ask", "new_market", "market_resolved"}
    assert "last_trade_price" in kinds(plain_msgs)


def test_lifecycle_gamma_clob_ws_agree(polysim):
    sim = polysim(markets=3, seed=22, trade_rate=30.0, new_market_rate=1.0, resolve_rate=0.7,
                  resolve_delay=1.0, clob_delay=1.5, closed_markets=0)
    ws = websocket.create_connection(sim.ws_url, timeout=10, skip_utf8_validation=True)
    ws.send(json.dumps({"assets_ids": [], "type": "market", "custom_feature_enabled": True}))
    new = collect(ws, lambda ms: any(m["event_type"] == "new_market" for m in ms))
    nm = next(m for m in new if m["event_type"] == "new_market")
    # The new market is on Gamma at once but its book 404s on the CLOB for clob_delay.
    _, one = get(sim.gamma_url + f"/markets/{nm['id']}")
    assert json.loads(one["clobTokenIds"]) == nm["assets_ids"] and one["conditionId"] == nm["market"]
    code, _ = get_error(sim.clob_url + f"/book?token_id={nm['assets_ids'][0]}")
    assert code == 404
    wait_for(lambda: _status(sim.clob_url + f"/book?token_id={nm['assets_ids'][0]}") == 200, 10)
    resolved = collect(ws, lambda ms: any(m["event_type"] == "market_resolved" for m in ms), timeout=30)
    mr = next(m for m in resolved if m["event_type"] == "market_resolved")
    _, gm = get(sim.gamma_url + f"/markets/{mr['id']}")
    assert gm["closed"] is True and gm["umaResolutionStatus"] == "resolved"
    prices = json.loads(gm["outcomePrices"])
    tokens = json.loads(gm["clobTokenIds"])
    if prices == ["0.5", "0.5"]:
        assert mr["winning_asset_id"] == ""
    else:
        assert mr["winning_asset_id"] == tokens[prices.index("1")]
        assert mr["winning_outcome"] == json.loads(gm["outcomes"])[prices.index("1")]
    code, _ = get_error(sim.clob_url + f"/book?token_id={tokens[0]}")
    assert code == 404, "no book once closed"
    _, listed = get(sim.gamma_url + f"/markets?id={mr['id']}")
    assert listed == [], "closed markets only with closed=true"
    _, cm = get(sim.clob_url + f"/markets/{gm['conditionId']}")
    assert cm["closed"] is True
    assert [t["winner"] for t in cm["tokens"]] == [p == "1" for p in prices]


def _status(url: str) -> int:
    try:
        return get(url)[0]
    except urllib.error.HTTPError as e:
        return e.code


def test_silent_client_is_dropped_pinging_client_is_not(polysim):
    sim = polysim(markets=2, seed=23, trade_rate=20.0, ping_timeout=1.5)
    quiet = websocket.create_connection(sim.ws_url, timeout=10)
    pinger = websocket.create_connection(sim.ws_url, timeout=10)
    for ws in (quiet, pinger):
        ws.send(json.dumps({"assets_ids": [], "type": "market"}))
    t0 = time.monotonic()
    closed_at = None
    quiet.settimeout(0.2)
    while time.monotonic() - t0 < 8:
        pinger.send("PING")
        try:
            op, _ = quiet.recv_data(control_frame=True)
            if op == websocket.ABNF.OPCODE_CLOSE:
                closed_at = time.monotonic() - t0
                break
        except websocket.WebSocketTimeoutException:
            pass
        except websocket.WebSocketConnectionClosedException:
            closed_at = time.monotonic() - t0
            break
    assert closed_at is not None and closed_at >= 1.4
    pinger.send("PING")
    pinger.settimeout(5)
    while pinger.recv() != "PONG":
        pass
    assert pinger.connected


def test_deterministic_for_a_seed(polysim):
    static = dict(trade_rate=0.0, book_rate=0.0, epoch_ms=1786000000000)
    a, b, c = (polysim(markets=15, seed=s, **static) for s in (31, 31, 32))
    for path in ("/gamma/markets?limit=100", "/gamma/markets?closed=true", "/gamma/events",
                 "/clob/markets", "/gamma/markets/keyset?limit=7"):
        assert get(a.base_url + path) == get(b.base_url + path), path
    assert get(a.base_url + "/gamma/markets?limit=100") != get(c.base_url + "/gamma/markets?limit=100")
    tokens = [t for m in get(a.gamma_url + "/markets")[1] for t in json.loads(m["clobTokenIds"])]
    assert get(a.clob_url + f"/book?token_id={tokens[0]}") == get(b.clob_url + f"/book?token_id={tokens[0]}")
    # Evolution: the same trades (content and simulated timestamps) in the same order.
    live = dict(trade_rate=200.0, multi_fill=0.3, epoch_ms=1786000000000)
    d, e = polysim(markets=6, seed=33, **live), polysim(markets=6, seed=33, **live)
    wait_for(lambda: len(d.ledger()) >= 200 and len(e.ledger()) >= 200)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "published_ms"} for r in rows[:200]]
    assert strip(d.ledger()) == strip(e.ledger())


def test_cli_ready_line_sigterm_and_bad_arguments(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "polysim", "--port", "0", "--markets", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("polysim listening on http://127.0.0.1:")
        port = int(line.strip().rsplit(":", 1)[1])
        assert get(f"http://127.0.0.1:{port}/_sim/health")[1]["ok"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    bad = subprocess.run([sys.executable, "-m", "polysim", "--markets", "many"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--markets" in bad.stderr
    busy = subprocess.run([sys.executable, "-m", "polysim", "--port", str(port := _busy_port())],
                          capture_output=True, text=True, timeout=30)
    assert busy.returncode == 69 and "Traceback" not in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1


_held = []


def _busy_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _held.append(s)
    return s.getsockname()[1]


def test_real_subscription_limits(polysim):
    sim = polysim(markets=6, seed=24, trade_rate=20.0, max_frame_ids=5, max_dump_assets=3)
    _, markets = get(sim.gamma_url + "/markets")
    tokens = [t for m in markets for t in json.loads(m["clobTokenIds"])]
    big = websocket.create_connection(sim.ws_url, timeout=10)
    big.send(json.dumps({"assets_ids": tokens[:6], "type": "market"}))
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        for _ in range(1000):
            big.recv()
    ws = websocket.create_connection(sim.ws_url, timeout=10)
    ws.send(json.dumps({"assets_ids": tokens[:5], "type": "market"}))
    dump = json.loads(ws.recv())
    assert [b["asset_id"] for b in dump] == tokens[:3], "no snapshot past max_dump_assets"
    ws.close()


def test_tick_size_change_near_the_edges():
    """A 0.01-tick market whose best bid drops under 0.04 announces 0.01 -> 0.001 on both tokens."""
    from polysim.exchange import Exchange
    from polysim.options import Options

    class Capture:
        def __init__(self):
            self.out = []

        def wants(self, asset):
            return True

        def emit(self, assets, text, custom_only=False):
            self.out.append(json.loads(text))

        def emit_global(self, text):
            self.out.append(json.loads(text))

    sink = Capture()
    x = Exchange(Options(markets=10, seed=3, trade_rate=0.0, book_rate=0.0), 1786000000000, sink)
    m = next(m for m in x.markets if m.state == "open" and m.book.tick == 100)
    m.book.bids = {300: 10_000, 200: 10_000}
    m.book.asks = {9000: 10_000, 9100: 10_000, 9200: 10_000, 9300: 10_000}
    x._book_change(m)
    changes = [e for e in sink.out if e["event_type"] == "tick_size_change"]
    real = fixture_lines("ws_market_messages.jsonl")[45]
    assert sorted(c["asset_id"] for c in changes) == sorted(m.tokens)
    for c in changes:
        same_shape(c, real, list(real))
        assert (c["old_tick_size"], c["new_tick_size"]) == ("0.01", "0.001")
    assert m.book.tick == 10
