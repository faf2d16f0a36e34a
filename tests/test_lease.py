"""workers.storage.lease against a real PostgreSQL: one holder, takeover, loss, outage.

Two Lease objects in one test process stand for two collectord instances (each has a
connection of its own, as each instance's collector process does). The database
"goes away" through the loopback proxy of the fault runs (tests/faults/proxy.py), so
the shared server keeps running.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import psycopg2
import pytest

from tests.conftest import query, with_schema
from tests.faults.proxy import Proxy
from workers.storage.lease import Lease


def until(pred, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every)


def admin(dsn: str, sql: str) -> None:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def lease_pid(dsn: str, name: str, instance: str) -> int | None:
    rows = query(dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                 (f"collectord:{name} lease {instance}",))
    return rows[0][0] if rows else None


@pytest.fixture
def proxy(pg_server_dsn):
    """The loopback proxy in front of the test server (which must be reached over TCP, as in
    tests/faults/conftest.py: the proxy relays TCP)."""
    params = psycopg2.extensions.parse_dsn(pg_server_dsn)
    host = params.get("host") or ""
    if not host or host.startswith("/"):
        pytest.fail("the lease's outage tests expect a TCP COLLECTORD_TEST_DSN (host=127.0.0.1 port=...)")
    p = Proxy((host, int(params.get("port") or 5432))).start()
    yield p
    p.stop()


def through(proxy: Proxy, dsn: str) -> str:
    """The same DSN (with its search_path) through the proxy."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params.update(host="127.0.0.1", port=str(proxy.port))
    return psycopg2.extensions.make_dsn(**params)


def test_one_holder_and_a_standby_that_takes_over_when_it_closes(pg_dsn):
    a, b = Lease(pg_dsn, "prices", retry=0.2, instance="A"), Lease(pg_dsn, "prices", retry=0.2, instance="B")
    try:
        assert a.poll() is True and a.role == "active"
        assert b.poll() is False and b.role == "standby"
        assert "collectord:prices lease A" in (b.holder or ""), b.holder  # status names who polls
        for _ in range(5):  # standing by never steals it
            time.sleep(0.25)
            assert b.poll() is False and a.poll() is True
        a.close()
        began = time.monotonic()
        assert until(b.poll, 2.0), "the standby did not take the released lease"
        assert time.monotonic() - began <= 0.2 + 0.5
        assert a.poll() is False and b.status()["lease_active"] == 1 and a.status()["role"] == "standby"
    finally:
        a.close()
        b.close()


def test_keys_differ_by_collector_and_by_schema(pg_dsn, pg_server_dsn):
    other = "t_" + uuid.uuid4().hex[:12]
    admin(pg_server_dsn, f'CREATE SCHEMA "{other}"')
    leases = [Lease(pg_dsn, "prices"), Lease(pg_dsn, "orderbooks"), Lease(with_schema(pg_server_dsn, other), "prices")]
    try:
        assert [lease.poll() for lease in leases] == [True, True, True]
        same = Lease(with_schema(pg_server_dsn, other), "prices")
        assert same.poll() is False  # the same collector in the same schema: one holder
        same.close()
    finally:
        for lease in leases:
            lease.close()
        admin(pg_server_dsn, f'DROP SCHEMA "{other}" CASCADE')


def test_a_holder_whose_session_is_terminated_never_polls_beside_the_new_holder(pg_dsn):
    a, b = Lease(pg_dsn, "markets", retry=0.2, instance="A"), Lease(pg_dsn, "markets", retry=0.2, instance="B")
    try:
        assert a.poll() and not b.poll()
        query(pg_dsn, "SELECT pg_terminate_backend(%s)", (lease_pid(pg_dsn, "markets", "A"),))
        time.sleep(0.3)
        # The standby asks first and gets it; the old holder notices at its next poll
        # (the server's message made its socket readable) and stands by.
        assert until(b.poll, 2.0)
        assert a.poll() is False and a.lost == 1
        # The other order: the holder's session ends, it polls first and takes it again.
        query(pg_dsn, "SELECT pg_terminate_backend(%s)", (lease_pid(pg_dsn, "markets", "B"),))
        time.sleep(0.2)
        assert b.poll() is True  # lost, and taken again at once (nobody else tried in between)
        assert a.poll() is False
    finally:
        a.close()
        b.close()


def test_database_outage_the_holder_polls_on_into_its_spool_a_standby_waits(pg_dsn, proxy):
    dsn = through(proxy, pg_dsn)
    a = Lease(dsn, "prices", retry=0.3, doubt_retry=0.2, timeout=1.0, instance="A")
    b = Lease(dsn, "prices", retry=0.3, timeout=1.0, instance="B")
    try:
        assert a.poll() and not b.poll()
        proxy.down()
        a.check = 0.1
        time.sleep(0.2)
        for _ in range(10):  # nobody can take it while the database is down
            assert a.poll() is True and b.poll() is False
            time.sleep(0.1)
        assert a.status().get("lease_in_doubt") == 1 and not b.reachable
        proxy.up()
        assert until(lambda: a.poll() and not a.in_doubt, 3.0), "the holder did not take its lease again"
        for _ in range(10):  # the standby's grace after the outage let the old holder in first
            time.sleep(0.1)
            assert b.poll() is False and a.poll() is True
    finally:
        a.close()
        b.close()


def test_partition_of_the_holder_alone_is_the_documented_overlap(pg_dsn, proxy):
    """The holder cut off from the database polls on (its spool); a standby that still reaches
    it takes over; when the cut-off holder reconnects it stands by at its first answer."""
    a = Lease(through(proxy, pg_dsn), "prices", retry=0.3, doubt_retry=0.2, timeout=1.0, instance="A")
    b = Lease(pg_dsn, "prices", retry=0.2, instance="B")
    try:
        assert a.poll() and not b.poll()
        proxy.down()  # closes the relayed connection: the server frees A's lock at once
        assert until(b.poll, 2.0)
        a.check = 0.1
        time.sleep(0.2)
        assert a.poll() is True and a.in_doubt  # both poll: the overlap the module docstring names
        proxy.up()
        assert until(lambda: a.poll() is False, 3.0), "the cut-off holder did not stand down"
        assert b.poll() is True and a.role == "standby"
    finally:
        a.close()
        b.close()


def test_an_instance_that_never_reached_the_database_never_polls():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    lease = Lease(f"host=127.0.0.1 port={port} dbname=test user=postgres", "prices", retry=0.1, timeout=1.0)
    try:
        for _ in range(5):
            assert lease.poll() is False
            time.sleep(0.12)
        assert lease.status()["role"] == "standby" and not lease.reachable
    finally:
        lease.close()


def test_two_prices_collectors_one_polls_the_other_stands_by_then_takes_over(tmp_path, pg_dsn, polysim):
    """The lease inside the real collector: a second PricesCollector on the same schema stands
    by (heartbeating, reporting "standby", writing nothing) until the first shuts down."""
    import threading

    from workers.markets import MarketsCollector
    from workers.prices import PricesCollector
    from workers.storage import migrate

    sim = polysim(markets=6, seed=3, trade_rate=0.0, book_rate=0.0)
    migrate(pg_dsn)

    def make(cls, name, where):
        return cls(name=name, dsn=pg_dsn, data_dir=str(tmp_path / where), selection={}, gamma_url=sim.gamma_url,
                   clob_url=sim.clob_url, data_url=sim.data_url, ws_url=sim.ws_url, rate="0", lease_retry="0.2")

    markets, first, second = make(MarketsCollector, "markets", "a"), make(PricesCollector, "prices", "a"), \
        make(PricesCollector, "prices", "b")
    for w in (markets, first, second):
        w.init_process()
    second._wake_r, second._wake_w = os.pipe()  # what run() sets up: stop() wakes its waits
    try:
        markets.step()
        first.step()
        assert first.status()["role"] == "active" and first.last_cycle["rows"] > 0
        thread = threading.Thread(target=second.step, daemon=True)
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and second.status()["role"] == "standby" and second.cycles == 0
        assert second.counters["last_success"] is not None  # standing by is healthy
        cycles = query(pg_dsn, "SELECT count(DISTINCT ts) FROM price_snapshots")[0][0]
        first.shutdown()  # releases the lease after its rows are flushed
        thread.join(5.0)
        assert not thread.is_alive() and second.cycles == 1 and second.status()["role"] == "active"
        assert query(pg_dsn, "SELECT count(DISTINCT ts) FROM price_snapshots")[0][0] == cycles + 1
    finally:
        second.stop()
        for w in (markets, second):
            w.shutdown()
