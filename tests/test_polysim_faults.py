"""Every polysim fault, observed from a real client over loopback."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
import websocket

from tests.test_polysim import get, wait_for


def raw_get(url: str, timeout: float = 30.0):
    """(status, headers, body bytes); HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def first_token(sim) -> str:
    _, markets = get(sim.gamma_url + "/markets")
    return json.loads(markets[0]["clobTokenIds"])[0]


@pytest.fixture
def sim(polysim):
    return polysim(markets=4, seed=11, trade_rate=50.0)


def test_http_status_faults_with_count_and_listing(sim):
    book = sim.clob_url + f"/book?token_id={first_token(sim)}"
    sim.faults(surface="clob", kind="429", retry_after=3, count=2)
    listed = sim.get("/_sim/faults")["faults"]
    assert [(f["surface"], f["kind"], f["count_left"]) for f in listed] == [("clob", "429", 2)]
    for _ in range(2):
        status, headers, body = raw_get(book)
        assert status == 429 and headers["Retry-After"] == "3"
        assert json.loads(body)["retry_after_seconds"] == 3
    assert raw_get(book)[0] == 200, "count used up"
    assert raw_get(sim.gamma_url + "/markets")[0] == 200, "other surfaces untouched"
    sim.faults(surface="gamma", kind="5xx", status=503, count=1)
    status, _, body = raw_get(sim.gamma_url + "/markets")
    assert status == 503 and json.loads(body)["type"] == "internal error"
    sim.faults(surface="data", kind="html403", count=1)
    status, headers, body = raw_get(sim.data_url + "/trades")
    assert status == 403 and headers["Content-Type"].startswith("text/html") and b"<html" in body
    assert sim.get("/_sim/faults")["faults"] == []
    with pytest.raises(urllib.error.HTTPError) as e:
        sim.faults(surface="clob", kind="nonsense")
    assert e.value.code == 400


def test_http_fault_narrowed_to_a_path(sim):
    sim.faults(surface="gamma", kind="5xx", status=404, path="/gamma/markets/keyset")
    assert raw_get(sim.gamma_url + "/markets/keyset?limit=2")[0] == 404
    assert raw_get(sim.gamma_url + "/markets?limit=2")[0] == 200, "a path outside the prefix is untouched"
    assert raw_get(sim.gamma_url + "/markets/keyset?limit=2")[0] == 404, "no count: it stays"
    assert sim.get("/_sim/faults")["faults"][0]["fired"] == 2
    for bad in ("markets", 5):
        with pytest.raises(urllib.error.HTTPError) as e:
            sim.faults(surface="gamma", kind="5xx", path=bad)
        assert e.value.code == 400


def test_http_body_faults(sim):
    url = sim.gamma_url + "/markets"
    sim.faults(surface="gamma", kind="malformed", count=1)
    status, _, body = raw_get(url)
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)
    sim.faults(surface="gamma", kind="truncated", count=1)
    status, _, body = raw_get(url)
    assert status == 200 and body
    with pytest.raises(ValueError):
        json.loads(body)
    sim.faults(surface="gamma", kind="extra_fields", count=1)
    _, _, body = raw_get(url)
    rows = json.loads(body)
    assert rows and all("polysimExtraField" in r for r in rows)
    sim.faults(surface="gamma", kind="cut", count=1)
    with pytest.raises(http.client.IncompleteRead):
        raw_get(url)
    assert json.loads(raw_get(url)[2]), "back to normal"


def test_slow_refuse_probability_duration(sim):
    url = sim.data_url + "/trades?limit=1"
    sim.faults(surface="data", kind="slow", delay=1.0, count=1)
    t0 = time.monotonic()
    assert raw_get(url)[0] == 200
    assert time.monotonic() - t0 >= 0.9
    sim.faults(surface="data", kind="refuse", count=1)
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected)):
        urllib.request.urlopen(url, timeout=10).read()
    assert raw_get(url)[0] == 200
    sim.faults(surface="data", kind="5xx", probability=0.0)
    assert all(raw_get(url)[0] == 200 for _ in range(5)), "probability 0 never fires"
    sim.faults(clear=True)
    sim.faults(surface="all", kind="5xx", duration=1.0)
    assert raw_get(url)[0] == 500 and raw_get(sim.gamma_url + "/markets")[0] == 500
    wait_for(lambda: raw_get(url)[0] == 200, 10)
    assert sim.get("/_sim/faults")["faults"] == [], "expired faults disappear"


def ws_open(sim, token, custom=False):
    ws = websocket.create_connection(sim.ws_url, timeout=10, skip_utf8_validation=True)
    ws.send(json.dumps({"assets_ids": [token], "type": "market", "custom_feature_enabled": custom}))
    dump = json.loads(ws.recv())
    assert isinstance(dump, list) and dump[0]["asset_id"] == token
    return ws


def recv_json(ws, n=1):
    out = []
    while len(out) < n:
        frame = ws.recv()
        if frame != "PONG":
            data = json.loads(frame)
            out += data if isinstance(data, list) else [data]
    return out


def test_ws_drop_now_and_every(sim):
    token = first_token(sim)
    a, b = ws_open(sim, token), ws_open(sim, token)
    res = sim.faults(surface="ws", kind="drop")
    assert res["effects"][0]["dropped"] == 2
    for ws in (a, b):
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            for _ in range(10_000):
                ws.recv()
    sim.faults(surface="ws", kind="drop", every=0.5, duration=3)
    c = ws_open(sim, token)
    t0 = time.monotonic()
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        for _ in range(10_000):
            c.recv()
    assert time.monotonic() - t0 < 3
    wait_for(lambda: sim.get("/_sim/faults")["faults"] == [], 10)


def test_ws_stall_then_resume_and_pong_withheld(sim):
    token = first_token(sim)
    ws = ws_open(sim, token)
    recv_json(ws)  # data flows
    sim.faults(surface="ws", kind="stall", seconds=1.5)
    t0 = time.monotonic()
    ws.send("PING")
    ws.settimeout(0.3)
    silent_until = None
    while time.monotonic() - t0 < 5:
        try:
            frame = ws.recv()
        except websocket.WebSocketTimeoutException:
            continue
        assert frame != "PONG" or time.monotonic() - t0 > 1.4, "PONG during the stall"
        silent_until = time.monotonic() - t0
        break
    assert silent_until is not None and silent_until >= 1.3, "socket stayed open and silent, then resumed"
    ws.settimeout(10)
    sim.faults(surface="ws", kind="pong_withheld", duration=1.0)
    ws.send("PING")
    got = []
    t0 = time.monotonic()
    ws.settimeout(0.2)
    while time.monotonic() - t0 < 0.8:
        try:
            got.append(ws.recv())
        except websocket.WebSocketTimeoutException:
            pass
    assert got and "PONG" not in got, "data flows, PONG withheld"
    time.sleep(0.4)
    ws.settimeout(10)
    ws.send("PING")
    deadline = time.monotonic() + 10
    while ws.recv() != "PONG":
        assert time.monotonic() < deadline


def test_ws_unknown_events_malformed_huge(sim):
    token = first_token(sim)
    ws = ws_open(sim, token)
    sim.faults(surface="ws", kind="unknown_events", count=1)
    sim.faults(surface="ws", kind="malformed", count=1)
    seen_unknown = seen_field = seen_bad = False
    deadline = time.monotonic() + 15
    while not (seen_unknown and seen_field and seen_bad):
        assert time.monotonic() < deadline
        frame = ws.recv()
        if frame == "PONG":
            continue
        try:
            data = json.loads(frame)
        except ValueError:
            seen_bad = True
            continue
        for m in data if isinstance(data, list) else [data]:
            seen_unknown |= m.get("event_type") == "polysim_unknown_event"
            seen_field |= "polysim_unknown_field" in m
    res = sim.faults(surface="ws", kind="huge_frame", bytes=3_000_000)
    assert res["effects"][0]["sent_to"] == 1
    while True:
        frame = ws.recv()
        if len(frame) >= 3_000_000:
            break
    msgs = json.loads(frame)
    assert all(m["event_type"] == "book" and m["asset_id"] == token for m in msgs)


def test_ws_upgrade_refused_and_listener_down(sim):
    sim.faults(surface="ws", kind="429", count=1)
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(sim.ws_url, timeout=5)
    assert e.value.status_code == 429
    sim.faults(surface="ws", kind="refuse", count=1)
    with pytest.raises((websocket.WebSocketException, ConnectionError)):
        websocket.create_connection(sim.ws_url, timeout=5)
    sim.faults(surface="all", kind="listener_down", seconds=1.5)
    time.sleep(0.3)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sim.port), timeout=2).close()
    wait_for(lambda: raw_get(sim.gamma_url + "/markets")[0] == 200 if _connectable(sim.port) else False, 10)
    ws = websocket.create_connection(sim.ws_url, timeout=5)
    ws.close()


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_hostile_queries_never_crash_the_server(polysim):
    """Arbitrary query strings and bodies get 2xx/4xx answers, never a 500 or a dead server."""
    from urllib.parse import urlencode

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    sim = polysim(markets=4, seed=12, trade_rate=20.0)
    paths = ["/gamma/markets", "/gamma/markets/keyset", "/gamma/events", "/gamma/markets/1",
             "/gamma/markets/abc", "/clob/book", "/clob/price", "/clob/prices", "/clob/midpoint",
             "/clob/markets", "/clob/last-trade-price", "/clob/last-trades-prices", "/data/trades",
             "/_sim/ledger", "/clob/tick-size", "/clob/spread"]
    keys = st.sampled_from(["limit", "offset", "closed", "active", "id", "slug", "order", "ascending",
                            "after_cursor", "token_id", "token_ids", "side", "sides", "next_cursor",
                            "market", "start", "end", "since", "tag_id", "end_date_min", "eventId"])
    values = st.one_of(st.text(max_size=30), st.integers(-10**12, 10**12).map(str),
                       st.sampled_from(["true", "false", "", "-1", "LTE=", "MA==", "BUY", "SELL", "%%"]))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(paths), query=st.lists(st.tuples(keys, values), max_size=5))
    def probe(path, query):
        status, _, _ = raw_get(sim.base_url + path + "?" + urlencode(query), timeout=10)
        assert status in (200, 400, 404, 422), (path, query, status)

    probe()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/clob/books", "/clob/prices", "/clob/midpoints", "/clob/last-trades-prices",
                                 "/_sim/faults"]),
           body=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                             lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                             max_leaves=8))
    def probe_post(path, body):
        req = urllib.request.Request(sim.base_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        assert status in (200, 400), (path, body, status)

    probe_post()
    sim.faults(clear=True)
    assert sim.health()["ok"] is True


def test_slow_consumer_is_dropped_and_the_exchange_goes_on(polysim):
    """A client that stops reading is dropped; the engine keeps publishing to the others.

    Regression: dropping a slow consumer removed it from the set being iterated
    (RuntimeError: Set changed size during iteration) and stopped the engine.
    """
    sim = polysim(markets=4, seed=5, trade_rate=3000.0, max_pending=200)
    token = first_token(sim)
    slow = websocket.create_connection(sim.ws_url, timeout=10, skip_utf8_validation=True)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    _, markets = get(sim.gamma_url + "/markets")
    every = [t for m in markets for t in json.loads(m["clobTokenIds"])]
    slow.send(json.dumps({"assets_ids": every, "type": "market"}))
    before = len(sim.ledger())
    time.sleep(3)  # the slow client reads nothing: far more than 200 messages queue up
    assert len(sim.ledger()) > before + 1000, "the engine stopped publishing"
    live = ws_open(sim, token)
    try:
        trades = [m for m in recv_json(live, 20) if m.get("event_type") == "last_trade_price"]
        assert trades, "a fresh client gets no trades after a slow one was dropped"
    finally:
        live.close()
        slow.close()
    assert sim.proc.poll() is None, "polysim exited"
