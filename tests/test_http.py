"""workers.http.Client against a real polysim process, each HTTP fault switched on.

Timing bounds are generous (busy 2-core machine): they check that a wait
happened or that it was bounded, never an exact duration.
"""

from __future__ import annotations

import os
import random
import socket
import time

import pytest

from workers.errors import HttpError, Stopping
from workers.http import Bucket, Client


def client_for(sim, **kw):
    kw.setdefault("retries", 3)
    kw.setdefault("backoff", (0.05, 0.2))
    kw.setdefault("timeout", (2.0, 5.0))
    apis = {sim.gamma_url: "gamma", sim.clob_url: "clob", sim.data_url: "data"}
    return Client(apis=apis, rng=random.Random(1), **kw)


@pytest.fixture
def sim(polysim):
    return polysim(markets=6, seed=7, trade_rate=1.0)


def some_tokens(sim, n=4):
    page = sim.get("/gamma/markets?limit=10&closed=false")
    out = []
    for m in page:
        out.extend(__import__("json").loads(m["clobTokenIds"]))
    return out[:n]


def books_body(tokens):
    return [{"token_id": t} for t in tokens]


def test_plain_calls_and_per_endpoint_stats(sim):
    c = client_for(sim)
    page = c.get_json(sim.gamma_url + "/markets", {"limit": 5, "closed": "false"})
    assert isinstance(page, list) and page
    tokens = some_tokens(sim)
    books = c.post_json(sim.clob_url + "/books", books_body(tokens))
    assert {b["asset_id"] for b in books} == set(tokens)
    c.get_json(sim.gamma_url + f"/markets/{page[0]['id']}")
    stats = c.stats()
    assert stats["requests"] == 3 and stats["errors"] == 0
    eps = stats["endpoints"]
    assert set(eps) == {"gamma /markets", "clob /books", "gamma /markets/{id}"}
    assert eps["clob /books"]["p50_ms"] is not None and eps["clob /books"]["p50_ms"] > 0
    assert c.session().verify is True  # TLS verification stays on


def test_429_honours_retry_after(sim):
    tokens = some_tokens(sim)
    sim.faults(surface="clob", kind="429", count=2, retry_after=1)
    c = client_for(sim)
    t0 = time.monotonic()
    books = c.post_json(sim.clob_url + "/books", books_body(tokens))
    elapsed = time.monotonic() - t0
    assert len(books) == len(tokens)
    assert elapsed >= 1.9  # two Retry-After: 1 waits, not the 0.05-0.2 s backoff
    e = c.stats()["endpoints"]["clob /books"]
    assert e["throttled"] == 2 and e["requests"] == 3 and e["retries"] == 2 and e["wait_ms"] >= 1900


def test_429_longer_than_the_deadline_gives_up_at_once(sim):
    sim.faults(surface="clob", kind="429", retry_after=30)
    c = client_for(sim, deadline=5.0)
    t0 = time.monotonic()
    with pytest.raises(HttpError) as info:
        c.post_json(sim.clob_url + "/books", books_body(some_tokens(sim)))
    assert info.value.status == 429
    assert time.monotonic() - t0 < 4.0


def test_5xx_retried_then_given_up(sim):
    tokens = some_tokens(sim)
    sim.faults(surface="clob", kind="5xx", count=2, status=502)
    c = client_for(sim)
    assert len(c.post_json(sim.clob_url + "/books", books_body(tokens))) == len(tokens)
    assert c.stats()["endpoints"]["clob /books"]["retries"] == 2
    sim.faults(surface="gamma", kind="5xx")
    with pytest.raises(HttpError) as info:
        c.get_json(sim.gamma_url + "/markets", {"closed": "false"})
    assert info.value.status == 500 and info.value.attempts == 4  # 1 + retries=3
    assert c.stats()["endpoints"]["gamma /markets"]["errors"] == 1


def test_slow_answers_time_out_and_retry(sim):
    tokens = some_tokens(sim)
    sim.faults(surface="clob", kind="slow", count=1, delay=5)
    c = client_for(sim, timeout=(2.0, 0.5))
    t0 = time.monotonic()
    assert len(c.post_json(sim.clob_url + "/books", books_body(tokens))) == len(tokens)
    assert time.monotonic() - t0 < 4.5  # the read timeout cut the 5 s wait short
    assert c.stats()["endpoints"]["clob /books"]["retries"] == 1
    sim.faults(surface="clob", kind="slow", delay=5)
    c = client_for(sim, timeout=(2.0, 0.3), retries=1)
    with pytest.raises(HttpError) as info:
        c.post_json(sim.clob_url + "/books", books_body(tokens))
    assert info.value.status is None and "Timeout" in str(info.value)


@pytest.mark.parametrize("kind", ["malformed", "truncated", "cut", "html403", "refuse"])
def test_broken_answers_are_retried(sim, kind):
    tokens = some_tokens(sim)
    sim.faults(surface="clob", kind=kind, count=1)
    c = client_for(sim)
    assert len(c.post_json(sim.clob_url + "/books", books_body(tokens))) == len(tokens)
    e = c.stats()["endpoints"]["clob /books"]
    assert e["retries"] == 1 and e["errors"] == 0


def test_permanently_malformed_body_is_an_http_error_not_a_crash(sim):
    sim.faults(surface="clob", kind="malformed")
    c = client_for(sim, retries=2)
    with pytest.raises(HttpError) as info:
        c.post_json(sim.clob_url + "/books", books_body(some_tokens(sim)))
    assert "not JSON" in str(info.value) and info.value.attempts == 3


def test_listener_down_then_back(sim):
    tokens = some_tokens(sim)
    sim.faults(surface="all", kind="listener_down", seconds=1.0)
    c = client_for(sim, retries=8, backoff=(0.2, 1.0), deadline=20.0)
    t0 = time.monotonic()
    assert len(c.post_json(sim.clob_url + "/books", books_body(tokens))) == len(tokens)
    assert time.monotonic() - t0 < 15.0
    assert c.stats()["endpoints"]["clob /books"]["retries"] >= 1


def test_connection_refused_gives_up_bounded():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Client(retries=2, backoff=(0.05, 0.1), rng=random.Random(2))
    t0 = time.monotonic()
    with pytest.raises(HttpError) as info:
        c.get_json(f"http://127.0.0.1:{port}/clob/book", {"token_id": "1"})
    assert info.value.status is None and info.value.attempts == 3
    assert "ConnectionError" in str(info.value)
    assert time.monotonic() - t0 < 5.0


def test_client_errors_are_not_retried(sim):
    c = client_for(sim)
    with pytest.raises(HttpError) as info:
        c.get_json(sim.clob_url + "/book", {"token_id": "12345"})
    assert info.value.status in (400, 404) and info.value.attempts == 1
    assert not info.value.retryable
    with pytest.raises(HttpError) as info:
        c.get_json(sim.gamma_url + "/markets", {"limit": 100, "offset": 10 ** 7})
    assert info.value.status == 422 and info.value.attempts == 1


def test_stopping_aborts_a_backoff(sim):
    sim.faults(surface="clob", kind="429", retry_after=20)
    stop = {"flag": False}

    def wait(seconds):
        time.sleep(min(seconds, 0.2))
        stop["flag"] = True  # SIGTERM arrived during the wait
        return True

    c = client_for(sim, wait=wait, should_stop=lambda: stop["flag"], deadline=60)
    t0 = time.monotonic()
    with pytest.raises(Stopping):
        c.post_json(sim.clob_url + "/books", books_body(some_tokens(sim)))
    assert time.monotonic() - t0 < 3.0
    with pytest.raises(Stopping):  # no new request once stopping
        c.get_json(sim.gamma_url + "/markets")


def test_client_side_rate_limit_spaces_requests(sim):
    tokens = some_tokens(sim, 2)
    # 20 per 10 s at rate 1.0 -> 2/s with a burst of 4: 10 calls need >= 3 s.
    c = client_for(sim, rate=1.0, limits={("clob", "/books"): 20})
    t0 = time.monotonic()
    for _ in range(10):
        c.post_json(sim.clob_url + "/books", books_body(tokens))
    assert time.monotonic() - t0 >= 2.5
    assert c.stats()["endpoints"]["clob /books"]["wait_ms"] >= 2500
    # gamma calls do not queue behind the clob bucket
    t0 = time.monotonic()
    c.get_json(sim.gamma_url + "/markets", {"limit": 1})
    assert time.monotonic() - t0 < 1.0


def test_bucket_with_an_injected_clock():
    now = [100.0]
    b = Bucket(rate=2.0, burst=4.0, clock=lambda: now[0])
    assert [b.take() for _ in range(4)] == [0.0] * 4
    assert b.take() == pytest.approx(0.5)
    assert b.take() == pytest.approx(1.0)
    now[0] += 10.0
    assert b.take() == 0.0
    b.hold(now[0] + 7.0)
    assert b.take() == pytest.approx(7.0)


def test_classify_endpoints():
    c = Client(apis={"http://h:1/gamma": "gamma", "http://h:1/clob": "clob", "http://h:1/data": "data"})
    assert c.classify("http://h:1/gamma/markets/keyset?x=1") == ("gamma", "/markets", "gamma /markets/keyset")
    assert c.classify("http://h:1/gamma/markets/559651") == ("gamma", "/markets", "gamma /markets/{id}")
    assert c.classify("http://h:1/clob/books") == ("clob", "/books", "clob /books")
    assert c.classify("http://h:1/data/v2/trades") == ("data", "/trades", "data /trades")
    assert c.classify("https://clob.polymarket.com/midpoints")[:2] == ("clob", "/midpoints")
    assert c.classify("https://gamma-api.polymarket.com/events")[:2] == ("gamma", "/events")


def test_session_is_made_after_fork(sim):
    c = client_for(sim)
    c.get_json(sim.gamma_url + "/markets", {"limit": 1})
    parent = c.session()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's pooled connection
        try:
            c.get_json(sim.gamma_url + "/markets", {"limit": 1})
            os.write(w, b"1" if c.session() is not parent else b"0")
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1" and status == 0
    os.close(r)
    assert c.session() is parent


# -- hostile servers: a raw loopback socket answering as the test says ---------------------------
class RawServer:
    """One loopback listener; each connection gets respond(conn) after its request head."""

    def __init__(self, respond):
        import threading

        self.respond = respond
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/clob/book"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(10)
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(4096)
                    if not data:
                        break
                    head += data
                try:
                    self.respond(conn, self.stop)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join(15)
        self.sock.close()


def test_a_body_trickling_forever_is_cut_at_the_deadline():
    """One byte every 0.2 s never trips a 1 s read timeout; the call's deadline ends it."""
    def trickle(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n[")
        while not stop.wait(0.2):
            conn.sendall(b" ")

    server = RawServer(trickle)
    try:
        c = Client(timeout=(1.0, 1.0), retries=0, deadline=2.0, rng=random.Random(3))
        t0 = time.monotonic()
        with pytest.raises(HttpError) as info:
            c.get_json(server.url, {"token_id": "1"})
        took = time.monotonic() - t0
    finally:
        server.close()
    assert "deadline" in str(info.value), info.value
    assert 1.5 < took < 6.0, took  # the 2 s deadline, plus one read at most


def test_an_answer_over_max_body_is_refused_not_retried_and_not_held_in_memory():
    def huge(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n[")
        chunk = b"0," * 32768
        for _ in range(50_000_000 // len(chunk)):
            if stop.is_set():
                return
            conn.sendall(chunk)

    server = RawServer(huge)
    try:
        c = Client(timeout=(1.0, 5.0), retries=3, rng=random.Random(4), max_body=1 << 20)
        with pytest.raises(HttpError) as info:
            c.get_json(server.url, {"token_id": "1"})
    finally:
        server.close()
    assert f"over {1 << 20} bytes" in str(info.value) and info.value.attempts == 1


def test_a_gzip_bomb_is_refused_by_its_decoded_size():
    import gzip

    bomb = gzip.compress(b" " * (40 << 20), 9)  # 40 MB of spaces: ~40 kB on the wire

    def answer(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(bomb) + bomb)

    server = RawServer(answer)
    try:
        c = Client(timeout=(1.0, 5.0), retries=0, rng=random.Random(5), max_body=4 << 20)
        with pytest.raises(HttpError) as info:
            c.get_json(server.url, {"token_id": "1"})
    finally:
        server.close()
    assert len(bomb) < (1 << 20) and "over" in str(info.value)
