"""workers/ws.py and workers/feed.py: one connection's state machine and the socket set.

Deadlines are driven by an injected clock; the sockets are real (polysim on loopback).
"""

from __future__ import annotations

import json
import time

import pytest

from workers.feed import Feed, subscribe_frames, unsubscribe_frames
from workers.messages import parse
from workers.ws import CLOSED, OPEN, Backoff, Connection, ConnectionFailed, WsOptions


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def tokens_of(sim, markets: int | None = None) -> list[str]:
    rows = sim.get("/gamma/markets?closed=false&limit=100")
    return [t for m in rows[:markets] for t in json.loads(m["clobTokenIds"])]


def read_until(conn: Connection, predicate, timeout: float = 10.0) -> list[str]:
    """Read messages (blocking reads, real time) until predicate(all so far) holds."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got += conn.read()
        if predicate(got):
            return got
    raise AssertionError(f"predicate not met; read {len(got)} messages")


def test_backoff_doubles_with_jitter_and_caps():
    low = Backoff(0.5, 30.0, rng=lambda: 0.0)
    high = Backoff(0.5, 30.0, rng=lambda: 1.0)
    assert [low.next() for _ in range(8)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert [high.next() for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    for _ in range(100):  # never gives up, never exceeds the cap
        assert 15.0 <= high.next() <= 30.0
    high.reset()
    assert high.next() == 0.5


def test_subscribe_frames_are_chunked_to_100_ids():
    ids = [str(10**70 + i) for i in range(250)]
    frames = [json.loads(f) for f in subscribe_frames(ids, initial=True)]
    assert [len(f["assets_ids"]) for f in frames] == [100, 100, 50]
    assert frames[0] == {"assets_ids": ids[:100], "type": "market", "custom_feature_enabled": True}
    assert all(f["operation"] == "subscribe" and f["custom_feature_enabled"] for f in frames[1:])
    assert sum((f["assets_ids"] for f in frames), []) == ids
    later = [json.loads(f) for f in subscribe_frames(ids[:5], initial=False)]
    assert later == [{"operation": "subscribe", "assets_ids": ids[:5], "custom_feature_enabled": True}]
    assert [json.loads(f) for f in unsubscribe_frames(ids[:3])] == [{"operation": "unsubscribe",
                                                                    "assets_ids": ids[:3]}]


def test_connection_dump_ping_pong_and_deadlines(polysim):
    sim = polysim(markets=4, seed=11, trade_rate=5.0)
    tokens = tokens_of(sim, 2)
    clock = Clock()
    opts = WsOptions(ping_interval=10, pong_timeout=5, stall_timeout=30, read_timeout=5)
    conn = Connection(sim.ws_url, opts, clock=clock)
    conn.connect()
    assert conn.state == OPEN and conn.fileno() >= 0
    for frame in subscribe_frames(tokens, initial=True):
        conn.send(frame)
    # The initial dump: one book per asset, as a JSON array frame.
    got = read_until(conn, lambda g: sum(len(parse(t).books) for t in g) >= len(tokens))
    assert any(t.lstrip().startswith("[") for t in got)
    # No PING before ping_interval; one at it, with a PONG deadline.
    conn.tick()
    assert conn.pong_due is None
    clock.t += 10
    conn.tick()
    assert conn.pong_due == clock.t + 5
    read_until(conn, lambda g: any(parse(t).pong for t in g))
    conn.got_pong()
    assert conn.pong_due is None
    # A missed PONG deadline fails the connection and schedules a jittered retry.
    clock.t += 10
    conn.tick()  # PING sent; pretend no PONG comes
    clock.t += 5.1
    with pytest.raises(ConnectionFailed, match="PONG"):
        conn.tick()
    assert conn.state == CLOSED and conn.reconnects == 1
    assert clock.t + 0.25 <= conn.next_attempt <= clock.t + 0.5
    # A stall (no data at all for stall_timeout) fails it too.
    conn.connect()
    clock.t += 30.1
    with pytest.raises(ConnectionFailed, match="stalled"):
        conn.tick()
    assert conn.state == CLOSED and conn.reconnects == 2


def test_connect_failure_backs_off_and_never_gives_up():
    clock = Clock()
    conn = Connection("ws://127.0.0.1:9/ws/market", WsOptions(connect_timeout=1, backoff_max=2), clock=clock)
    delays = []
    for _ in range(6):
        with pytest.raises(ConnectionFailed):
            conn.connect()
        delays.append(conn.next_attempt - clock.t)
    assert conn.state == CLOSED
    assert 0.25 <= delays[0] <= 0.5 and all(1.0 <= d <= 2.0 for d in delays[3:])


def drive(feed: Feed, seconds: float, until=None) -> list[tuple]:
    """Run tick/poll for up to `seconds` (real time); returns (conn index, text) read."""
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        feed.tick()
        for conn, texts in feed.poll(0.05):
            for text in texts:
                if parse(text).pong:
                    conn.got_pong()
                out.append((conn.index, text))
        if until is not None and until(out):
            break
    return out


def trade_tokens(read: list[tuple]) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {}
    for index, text in read:
        for row in parse(text).trades:
            seen.setdefault(row[0], set()).add(index)  # token_id
    return seen


def test_a_busy_owner_is_not_a_missing_pong_but_a_withheld_one_is(polysim):
    """A PONG deadline passed while the owner did not read (its loop was busy) fails
    nothing while the PONG waits unread; once read, all is well. A PONG the exchange
    withholds still fails the connection after a read past the deadline."""
    sim = polysim(markets=2, seed=19, trade_rate=0.0)
    clock = Clock()
    feed = Feed(sim.ws_url, WsOptions(ping_interval=10, pong_timeout=5, stall_timeout=60), clock=clock,
                connect_stagger=0.0)

    def poll_real(seconds: float) -> list[str]:
        got, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            for conn, texts in feed.poll(0.05):
                got += texts
                if any(parse(t).pong for t in texts):
                    conn.got_pong()
        return got

    try:
        feed.set_tokens(tokens_of(sim))
        feed.tick()
        conn = feed.conns[0]
        assert conn.state == OPEN
        poll_real(0.5)  # the dump
        clock.t += 10
        feed.tick()  # PING sent, PONG due at +5
        assert conn.pong_due == clock.t + 5
        time.sleep(0.3)  # the PONG arrives; the owner is busy elsewhere
        clock.t += 6
        feed.tick()
        assert conn.state == OPEN, "failed while its PONG was unread"
        assert any(parse(t).pong for t in poll_real(0.3))
        feed.tick()
        assert conn.state == OPEN and conn.pong_due is None
        sim.faults(surface="ws", kind="pong_withheld", duration=30)
        clock.t += 10
        feed.tick()  # PING, no PONG will come
        time.sleep(0.3)
        clock.t += 6
        poll_real(0.2)  # read past the deadline: nothing there
        feed.tick()
        assert conn.state == CLOSED and "PONG" in conn.last_error
    finally:
        feed.close()


def test_feed_places_both_tokens_of_a_market_on_one_socket():
    """Given token -> condition id, a market's tokens share a socket (ids far apart in
    token order); a plain token list is placed in token order. Nothing connects here."""
    markets = {f"0x{m:064x}": (f"{m + 10}", f"{90 - m}") for m in range(20)}
    by_token = {t: cid for cid, pair in markets.items() for t in pair}
    feed = Feed("ws://127.0.0.1:9/ws/market", assets_per_socket=4)
    plain = Feed("ws://127.0.0.1:9/ws/market", assets_per_socket=4)
    try:
        added, _ = feed.set_tokens(by_token)
        assert sorted(added) == sorted(by_token) and len(feed.conns) == 10
        assert all(feed.where[a] == feed.where[b] for a, b in markets.values())
        plain.set_tokens(list(by_token))
        assert sum(plain.where[a] == plain.where[b] for a, b in markets.values()) < len(markets)
    finally:
        feed.close()
        plain.close()


def test_feed_multiplexes_sockets_and_applies_changes_live(polysim):
    sim = polysim(markets=10, seed=13, trade_rate=200.0)
    tokens = tokens_of(sim)
    feed = Feed(sim.ws_url, WsOptions(ping_interval=0.5, pong_timeout=2, stall_timeout=3),
                assets_per_socket=6, connect_stagger=0.05)
    try:
        added, removed = feed.set_tokens(tokens)
        assert sorted(added) == sorted(tokens) and removed == []
        assert len(feed.conns) == -(-len(tokens) // 6)
        assert all(len(a) <= 6 for a in feed.assets.values())
        read = drive(feed, 15, until=lambda r: all(c.state == OPEN for c in feed.conns)
                     and len({i for t, s in trade_tokens(r).items() for i in s}) >= 3)
        assert all(c.state == OPEN for c in feed.conns)
        live = [e for e in feed.events if e[0] == "live"]
        assert sorted(t for e in live for t in e[2]) == sorted(tokens)
        seen = trade_tokens(read)
        assert seen and all(indexes == {feed.where[t]} for t, indexes in seen.items())  # one socket per token
        # Drop half the tokens live: unsubscribed, their trades stop; the rest keep flowing.
        keep = set(tokens[: len(tokens) // 2])
        feed.events.clear()
        added, removed = feed.set_tokens(keep)
        assert added == [] and sorted(removed) == sorted(set(tokens) - keep)
        drive(feed, 0.5)  # frames in flight before the unsubscribe took effect
        later = trade_tokens(drive(feed, 3))
        assert later and set(later) <= keep
        # Add them back: subscribe operations on the open sockets, reported live.
        added, _ = feed.set_tokens(tokens)
        assert sorted(added) == sorted(set(tokens) - keep)
        assert sorted(t for e in feed.events if e[0] == "live" for t in e[2]) == sorted(added)
        assert len(feed.conns) == -(-len(tokens) // 6)  # reused the room, no new sockets
    finally:
        feed.close()


def test_feed_reports_down_then_live_across_a_drop(polysim):
    sim = polysim(markets=4, seed=17, trade_rate=50.0)
    tokens = tokens_of(sim)
    feed = Feed(sim.ws_url, WsOptions(ping_interval=0.5, pong_timeout=2, stall_timeout=3, backoff_initial=0.1),
                assets_per_socket=4, connect_stagger=0.05)
    try:
        feed.set_tokens(tokens)
        drive(feed, 10, until=lambda r: all(c.state == OPEN for c in feed.conns) and len(r) > 20)
        feed.events.clear()
        before = time.time()
        sim.faults(surface="ws", kind="drop")
        drive(feed, 10, until=lambda r: sum(1 for e in feed.events if e[0] == "live") >= len(feed.conns))
        down = [e for e in feed.events if e[0] == "down"]
        live = [e for e in feed.events if e[0] == "live"]
        assert sorted(t for e in down for t in e[2]) == sorted(tokens)
        assert all(e[3].last_wall <= before + 1.0 for e in down)  # the socket's last data, not later
        # The feed parses nothing: only its owner, noting exchange times, makes a socket vouch.
        assert all(e[3].vouched() == 0.0 for e in down)
        assert sorted(t for e in live for t in e[2]) == sorted(tokens)
        assert sum(c.reconnects for c in feed.conns) == len(feed.conns)
        assert feed.status()["sockets_connected"] == len(feed.conns)
    finally:
        feed.close()


class RawWsServer:
    """A loopback WebSocket server by hand: the handshake, then after the client's first
    frame (its subscribe) it sends `burst` as raw bytes and keeps the socket open 0.5 s."""

    def __init__(self, burst: bytes, chunk: int = 0):
        import socket
        import threading

        self.burst = burst
        self.chunk = chunk  # > 0: send the burst this many bytes at a time (frames cut anywhere)
        self.received = b""  # what the client sent after the burst
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/ws/market"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        import base64
        import hashlib

        conn, _ = self.listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            key = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:")][0]
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            conn.recv(4096)  # the subscribe frame
            if self.chunk:
                for i in range(0, len(self.burst), self.chunk):
                    conn.sendall(self.burst[i:i + self.chunk])
                    time.sleep(0.0005)
            else:
                conn.sendall(self.burst)
            conn.settimeout(0.5)
            try:
                while chunk := conn.recv(4096):
                    self.received += chunk
            except OSError:
                pass

    def close(self):
        self.thread.join(5)
        self.listener.close()


def run_until_down(feed: Feed, seconds: float = 10.0) -> list[str]:
    """tick/poll until a "down" event; returns the texts read."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not any(e[0] == "down" for e in feed.events):
        feed.tick()
        for _, texts in feed.poll(0.05):
            got += texts
    return got


def test_messages_read_just_before_the_server_hangs_up_are_returned():
    """Three text frames and a close arrive in one segment: the read that meets the close
    still hands over the three (they were published), and the socket is reported down."""
    frames = [json.dumps({"n": i}).encode() for i in range(3)]
    server = RawWsServer(b"".join(bytes([0x81, len(f)]) + f for f in frames) + bytes([0x88, 0x02, 0x03, 0xE8]))
    feed = Feed(server.url, WsOptions(backoff_initial=5.0), assets_per_socket=4, connect_stagger=0.0)
    try:
        feed.set_tokens({"1": None})
        got = run_until_down(feed)
        assert [json.loads(t)["n"] for t in got] == [0, 1, 2]
        assert [e[0] for e in feed.events] == ["live", "down"]
    finally:
        feed.close()
        server.close()


def test_a_frame_longer_than_max_message_is_refused_by_its_header():
    """A length header of 1 TiB (corrupt or hostile): the connection fails at once on the
    header, without reading or allocating the payload."""
    import resource

    server = RawWsServer(bytes([0x81, 127]) + (1 << 40).to_bytes(8, "big") + b"x" * 1000)
    feed = Feed(server.url, WsOptions(backoff_initial=5.0, max_message=1 << 20), assets_per_socket=4,
                connect_stagger=0.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        feed.set_tokens({"1": None})
        started = time.monotonic()
        assert run_until_down(feed) == []
        assert time.monotonic() - started < 5.0
        assert "over max_message" in (feed.conns[0].last_error or ""), feed.conns[0].last_error
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # kB: nothing near 1 TiB
    finally:
        feed.close()
        server.close()


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True, rsv: int = 0, mask: bytes | None = None) -> bytes:
    """One WebSocket frame as a server (or, with mask, a client) sends it (RFC 6455 §5.2)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = bytes([b0, n | (0x80 if mask else 0)])
    elif n < 65536:
        head = bytes([b0, 126 | (0x80 if mask else 0)]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, 127 | (0x80 if mask else 0)]) + n.to_bytes(8, "big")
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of the frames a client sent."""
    out, pos = [], 0
    while pos + 2 <= len(data):
        n, pos2 = data[pos + 1] & 0x7F, pos + 2
        if n == 126:
            n, pos2 = int.from_bytes(data[pos2:pos2 + 2], "big"), pos2 + 2
        elif n == 127:
            n, pos2 = int.from_bytes(data[pos2:pos2 + 8], "big"), pos2 + 8
        key, pos2 = data[pos2:pos2 + 4], pos2 + 4
        out.append((data[pos] & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(data[pos2:pos2 + n]))))
        pos = pos2 + n
    return out


def test_frames_cut_anywhere_fragmented_and_interleaved_with_pings_come_out_whole():
    """Every length encoding (7-bit, 16-bit, 64-bit), a text message in three fragments
    with a ping between them, all delivered 3 bytes at a time: the messages come out
    exactly, in order, and the ping is answered with a pong carrying its payload."""
    big = json.dumps({"n": 2, "pad": "x" * 70_000}).encode()
    mid = json.dumps({"n": 1, "pad": "y" * 300}).encode()
    whole = json.dumps({"n": 3, "parts": "abc" * 50}).encode()
    burst = (frame(json.dumps({"n": 0}).encode()) + frame(mid) + frame(big)
             + frame(whole[:40], fin=False) + frame(b"are you there", opcode=0x9)
             + frame(whole[40:90], opcode=0x0, fin=False) + frame(whole[90:], opcode=0x0)
             + frame(json.dumps({"n": 4}).encode()))
    server = RawWsServer(burst, chunk=997)
    feed = Feed(server.url, WsOptions(backoff_initial=5.0), assets_per_socket=4, connect_stagger=0.0)
    try:
        feed.set_tokens({"1": None})
        got = run_until_down(feed, seconds=8)
        assert [json.loads(t)["n"] for t in got] == [0, 1, 2, 3, 4]
        assert json.loads(got[2]) == json.loads(big) and json.loads(got[3]) == json.loads(whole)
    finally:
        feed.close()
        server.close()
    assert (0xA, b"are you there") in client_frames(server.received)


@pytest.mark.parametrize("bad, why", [
    (frame(b'{"n": 9}', mask=b"\x01\x02\x03\x04"), "masked frame"),
    (frame(b'{"n": 9}', rsv=0x40), "reserved bits"),
    (frame(b'{"n": 9}', opcode=0x0), "continuation frame without a message"),
    (frame(b'{"n": 9}', opcode=0x3), "unknown opcode"),
    (frame(b"p" * 126, opcode=0x9), "bad control frame"),
    (frame(b"p", opcode=0x9, fin=False), "bad control frame"),
    (frame(b'{"n"', fin=False) + frame(b'{"n": 9}'), "new message inside a fragmented one"),
])
def test_a_frame_no_server_may_send_fails_the_connection_after_what_came_before(bad, why):
    server = RawWsServer(frame(json.dumps({"n": 0}).encode()) + bad + frame(json.dumps({"n": 1}).encode()))
    feed = Feed(server.url, WsOptions(backoff_initial=5.0), assets_per_socket=4, connect_stagger=0.0)
    try:
        feed.set_tokens({"1": None})
        got = run_until_down(feed)
        assert [json.loads(t)["n"] for t in got] == [0]
        assert why in (feed.conns[0].last_error or ""), feed.conns[0].last_error
    finally:
        feed.close()
        server.close()
