"""The Writer through real database outages: spool, replay in order, SIGTERM flush.

The outage is real: the Writer talks to PostgreSQL through a TCP proxy on
loopback that the test stops (listener closed, every connection cut) and
starts again; the shared server itself is never stopped.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest

from workers.base import Worker
from workers.storage import Writer, migrate

T0 = datetime(2026, 5, 25, 22, 0, 0, tzinfo=timezone.utc)
TOKEN = "5" * 78


class Proxy:
    """A loopback TCP proxy to the PostgreSQL server that can be cut and restored."""

    def __init__(self, target: tuple[str, int] | str):
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _dial(self) -> socket.socket:
        if isinstance(self.target, str):
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.settimeout(5)
        up.connect(self.target)
        up.settimeout(None)
        return up

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self._dial()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        """Refuse new connections and cut every open one (the database is 'down')."""
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def proxied(dsn: str, proxy_port: int) -> tuple[str, tuple[str, int] | str]:
    """(dsn through the proxy, proxy target) for a server DSN."""
    params = psycopg2.extensions.parse_dsn(dsn)
    host = params.get("host") or "/var/run/postgresql"
    port = int(params.get("port") or 5432)
    target: tuple[str, int] | str = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
    params.update(host="127.0.0.1", port=str(proxy_port))
    return psycopg2.extensions.make_dsn(**params), target


@pytest.fixture
def db(pg_dsn):
    migrate(pg_dsn)
    return pg_dsn


@pytest.fixture
def proxy(db):
    params = psycopg2.extensions.parse_dsn(db)
    host = params.get("host") or "/var/run/postgresql"
    port = int(params.get("port") or 5432)
    p = Proxy(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port))
    p.start()
    p.dsn = proxied(db, p.port)[0]
    yield p
    p.stop()


def trades(start: int, n: int) -> list[dict]:
    return [
        {"token_id": TOKEN, "ts": T0 + timedelta(milliseconds=i), "price": Decimal("0.480"),
         "size": Decimal("12.000001"), "side": "BUY", "tx_hash": f"0x{i:064x}", "ordinal": i, "source": "ws",
         "received_at": T0}
        for i in range(start, start + n)
    ]


def stored_in_commit_order(dsn: str) -> list[int]:
    """Trade ordinals in the order they were committed (transaction id, then position)."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ordinal FROM trades ORDER BY xmin::text::bigint, ctid")
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def wait_until(predicate, timeout: float = 30.0, step=None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if step is not None:
            step()
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("background", [True, False], ids=["flusher-thread", "foreground"])
def test_outage_spools_then_replays_everything_once_in_order(db, proxy, tmp_path, background):
    w = Writer(proxy.dsn, tmp_path / "spool", name="trades.0", max_rows=100, max_age=0.02, background=background,
               connect_timeout=2, retry_initial=0.05, retry_max=0.2, replay_budget=0.05).open()
    try:
        w.add("trades", trades(0, 100))
        w.flush()
        assert w.stats()["db_ok"] and w.stats()["rows_written"] == 100

        proxy.stop()  # the database goes away mid-run
        for k in range(1, 11):  # keep collecting: 10 batches of 100
            w.add("trades", trades(k * 100, 100))
            w.flush()
        st = w.stats()
        assert not st["db_ok"]
        assert st["rows_spooled"] == 1000 and st["spool_segments"] >= 1 and st["spool_bytes"] > 0
        assert st["rows_written"] == 100

        proxy.start()  # it comes back; new rows keep arriving while the spool replays
        added = [1100]

        def step():
            if added[0] < 1500:
                w.add("trades", trades(added[0], 50))
                added[0] += 50
            w.maybe_flush()

        assert wait_until(lambda: added[0] >= 1500 and w.stats()["spool_segments"] == 0 and w.stats()["buffered"] == 0,
                          timeout=60, step=step), w.stats()
        st = w.stats()
        assert st["db_ok"] and st["rows_replayed"] >= 1000 and st["rows_rejected"] == 0
    finally:
        w.close()
    assert stored_in_commit_order(db) == list(range(1500))  # every row once, in the order collected
    assert not list((tmp_path / "spool" / "trades.0").glob("*.seg"))  # replayed segments deleted


def test_terminated_backend_is_survived(db, tmp_path):
    """pg_terminate_backend on the writer's session: the batch spools, the next retry replays it."""
    w = Writer(db, tmp_path / "spool", name="killed", max_rows=1000, max_age=60,
               retry_initial=0.05, retry_max=0.1).open()
    try:
        w.add("trades", trades(0, 10))
        w.flush()
        admin = psycopg2.connect(db, connect_timeout=10)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'collectord:killed'")
            assert cur.fetchall() == [(True,)]
        admin.close()
        w.add("trades", trades(10, 10))
        w.flush()  # fails on the dead session: spooled
        assert wait_until(lambda: w.stats()["spool_segments"] == 0, timeout=20, step=w.maybe_flush), w.stats()
        assert w.stats()["db_errors"] >= 1
    finally:
        w.close()
    assert stored_in_commit_order(db) == list(range(20))


def test_close_with_database_down_spools_and_next_start_replays(db, proxy, tmp_path):
    w = Writer(proxy.dsn, tmp_path / "spool", name="c", max_rows=10**6, max_age=3600, connect_timeout=2).open()
    w.add("trades", trades(0, 300))
    proxy.stop()
    started = time.monotonic()
    w.close()  # nothing buffered may be lost
    assert time.monotonic() - started < 10  # bounded: one failed connection attempt
    assert w.stats()["rows_spooled"] == 300
    assert stored_in_commit_order(db) == []
    w2 = Writer(db, tmp_path / "spool", name="c").open()
    assert wait_until(lambda: w2.stats()["spool_segments"] == 0, timeout=20, step=w2.maybe_flush), w2.stats()
    w2.close()
    assert stored_in_commit_order(db) == list(range(300))
    # The spool kept every value exactly: 78-digit id, decimal spelling, millisecond time.
    conn = psycopg2.connect(db, connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute("SELECT token_id, price::text, size::text, ts FROM trades WHERE ordinal = 7")
        assert cur.fetchone() == (TOKEN, "0.480", "12.000001", T0 + timedelta(milliseconds=7))
    conn.close()


def test_truncated_spool_segment_replays_intact_prefix(db, tmp_path):
    spool = tmp_path / "spool"
    w = Writer("host=127.0.0.1 port=1 dbname=nowhere connect_timeout=1", spool, name="p", max_rows=10**6,
               max_age=3600, connect_timeout=1).open()
    for k in range(3):
        w.add("trades", trades(k * 10, 10))
        w.flush()  # database unreachable: three records in the spool
    w.close()
    (seg,) = sorted((spool / "p").glob("*.seg"))
    os.truncate(seg, seg.stat().st_size - 7)  # power loss tore the last record
    w2 = Writer(db, spool, name="p").open()
    assert wait_until(lambda: w2.stats()["spool_segments"] == 0, timeout=20, step=w2.maybe_flush), w2.stats()
    assert w2.stats()["spool_corruptions"] == 1
    w2.close()
    assert stored_in_commit_order(db) == list(range(20))  # the two intact records
    (corrupt,) = (spool / "p").glob("*.corrupt")
    assert corrupt.stat().st_size > 0  # the torn bytes are kept for inspection, not dropped


class TradesWorker(Worker):
    """A minimal collector: adds rows every step, flushes only on shutdown (huge max_age)."""

    OPTIONS = {"interval": (float, 0.05)}

    def init_process(self):
        self.writer = Writer(self.dsn, Path(self.data_dir) / "spool", name=self.name, max_rows=10**6, max_age=3600,
                             connect_timeout=2).open()
        self.next = 0

    def step(self):
        self.writer.add("trades", trades(self.next, 10))
        self.next += 10
        if self.next == 100:
            os.write(self.ready_fd, b"r")

    def shutdown(self):
        self.writer.close()


def run_forked(worker: TradesWorker) -> int:
    """Fork, run the worker with SIGTERM -> stop(), signal readiness after 100 rows; return the pid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            worker.ready_fd = w
            signal.signal(signal.SIGTERM, lambda *_: worker.stop())
            worker.run()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 30)
    assert ready, "worker never got going"
    os.read(r, 1)
    os.close(r)
    return pid


def wait_exit(pid: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("worker did not exit after SIGTERM")


def test_sigterm_flushes_buffered_rows_to_the_database(db, tmp_path):
    pid = run_forked(TradesWorker(name="trades.0", dsn=db, data_dir=str(tmp_path)))
    os.kill(pid, signal.SIGTERM)
    assert wait_exit(pid) == 0
    got = stored_in_commit_order(db)
    assert len(got) >= 100 and got == list(range(len(got)))  # every buffered row, once


def test_sigterm_with_database_down_flushes_to_the_spool(db, proxy, tmp_path):
    pid = run_forked(TradesWorker(name="trades.1", dsn=proxy.dsn, data_dir=str(tmp_path)))
    proxy.stop()
    os.kill(pid, signal.SIGTERM)
    assert wait_exit(pid) == 0
    assert stored_in_commit_order(db) == []
    assert list((tmp_path / "spool" / "trades.1").glob("*.seg"))
    w = Writer(db, tmp_path / "spool", name="trades.1").open()  # the restarted collector
    assert wait_until(lambda: w.stats()["spool_segments"] == 0, timeout=20, step=w.maybe_flush), w.stats()
    w.close()
    got = stored_in_commit_order(db)
    assert len(got) >= 100 and got == list(range(len(got)))


def test_bad_row_in_the_spool_is_quarantined_not_poisoning(db, tmp_path):
    """A spooled batch the database refuses for one row's data: the rest lands, the row is kept aside."""
    spool = tmp_path / "spool"
    down = Writer("host=127.0.0.1 port=1 dbname=nowhere", spool, name="q", connect_timeout=1, background=False).open()
    rows = trades(0, 5)
    rows[2]["side"] = "HOLD"  # violates the trades CHECK constraint: a data error, not an outage
    down.add("trades", rows)
    down.flush()
    down.add("trades", trades(5, 5))
    down.flush()
    down.close()
    assert down.stats()["rows_spooled"] == 10
    w = Writer(db, spool, name="q").open()
    assert wait_until(lambda: w.stats()["spool_segments"] == 0, timeout=20), w.stats()
    st = w.stats()
    w.close()
    assert st["rows_rejected"] == 1 and st["db_ok"]
    assert stored_in_commit_order(db) == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    import json

    (line,) = (spool / "q" / "rejected.jsonl").read_text().splitlines()
    rejected = json.loads(line)
    assert rejected["row"]["side"] == "HOLD" and rejected["row"]["ordinal"] == "2" and "check" in rejected["error"].lower()


def test_unmigrated_schema_spools_until_migrated(pg_dsn, tmp_path):
    """A missing table is the database not being ready, not bad data: rows wait in the spool."""
    w = Writer(pg_dsn, tmp_path / "spool", name="early", retry_initial=0.05, retry_max=0.1).open()
    try:
        w.add("trades", trades(0, 10))
        w.flush()
        st = w.stats()
        assert st["rows_spooled"] == 10 and st["rows_rejected"] == 0 and "UndefinedTable" in st["last_error"]
        migrate(pg_dsn)
        assert wait_until(lambda: w.stats()["spool_segments"] == 0, timeout=20), w.stats()
    finally:
        w.close()
    assert stored_in_commit_order(pg_dsn) == list(range(10))


def test_close_is_bounded_when_the_database_hangs(db, tmp_path):
    """A table locked by someone else: close() gives up after close_timeout and spools the rows."""
    locker = psycopg2.connect(db, connect_timeout=10)
    with locker.cursor() as cur:
        cur.execute("LOCK TABLE trades IN ACCESS EXCLUSIVE MODE")  # held until rollback below
    try:
        w = Writer(db, tmp_path / "spool", name="hang", max_rows=10**6, max_age=3600, close_timeout=1.0).open()
        w.add("trades", trades(0, 50))
        started = time.monotonic()
        w.close()
        took = time.monotonic() - started
        assert took < 8, took  # not the 30 s statement_timeout of normal writes
        assert w.stats()["rows_spooled"] == 50
    finally:
        locker.rollback()
        locker.close()
    w2 = Writer(db, tmp_path / "spool", name="hang").open()
    assert wait_until(lambda: w2.stats()["spool_segments"] == 0, timeout=20), w2.stats()
    w2.close()
    assert stored_in_commit_order(db) == list(range(50))


def test_collector_errors_from_storage_are_one_tree_with_exit_codes():
    """Storage errors that can escape a collector's run() carry the exit code the
    supervisor acts on: a refused spool is EX_CONFIG (FATAL, fixed by the operator)."""
    from workers.errors import CollectorError
    from workers.storage.embedded import EmbeddedError
    from workers.storage.migrate import MigrationError
    from workers.storage.spool import SpoolError
    from workers.storage.writer import RowsLostError

    for cls in (SpoolError, RowsLostError, MigrationError, EmbeddedError):
        assert issubclass(cls, CollectorError)
    assert SpoolError.exit_code == 78 and RowsLostError.exit_code == 1
