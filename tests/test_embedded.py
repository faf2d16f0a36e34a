"""The embedded PostgreSQL: start, migrate, write (from a forked child too), stop, start again."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psycopg2
import pytest

from workers.storage import Writer, migrate
from workers.storage.embedded import EmbeddedError, start


@pytest.fixture
def base():
    # Not under /root: as root the server runs as its own user (see embedded.py).
    d = Path(tempfile.mkdtemp(prefix="collectord-emb-", dir="/tmp"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def count(uri: str) -> int:
    conn = psycopg2.connect(uri, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM trades")
            return cur.fetchone()[0]
    finally:
        conn.close()


def row(i: int) -> dict:
    return {"token_id": "9" * 78, "ts": "2026-05-25T22:00:00Z", "price": "0.5", "size": "1", "side": "SELL",
            "tx_hash": f"0x{i:x}", "source": "ws"}


def test_start_migrate_write_stop_start_again_keeps_data(base):
    server = start(base / "data" / "pgdata")
    try:
        assert server.uri.startswith("postgresql://postgres@/collectord?host=")
        assert ":@" not in server.uri and "password" not in server.uri
        assert migrate(server.uri)  # a brand-new database: everything applies
        w = Writer(server.uri, base / "spool", name="emb").open()
        w.add("trades", [row(i) for i in range(50)])
        w.close()
        assert w.stats()["rows_written"] == 50

        # A forked child connects with the same URI and leaves with os._exit:
        # the wheel's exit handlers never run there, the server keeps running.
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                cw = Writer(server.uri, base / "spool", name="child").open()
                cw.add("trades", [row(i) for i in range(50, 60)])
                cw.close()
                code = 0 if cw.stats()["rows_written"] == 10 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert count(server.uri) == 60
    finally:
        server.stop()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(server.uri, connect_timeout=2).close()

    again = start(base / "data" / "pgdata")
    try:
        assert migrate(again.uri) == []  # already migrated: the data persisted
        assert count(again.uri) == 60
    finally:
        again.stop()


def test_stop_only_in_the_starting_process(base):
    server = start(base / "pgdata")
    try:
        pid = os.fork()
        if pid == 0:
            try:
                server.stop()  # a child must not stop the parent's server
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        conn = psycopg2.connect(server.uri, connect_timeout=5)
        conn.close()
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the /root rule only applies when running as root")
def test_root_refuses_pgdata_under_root():
    with pytest.raises(EmbeddedError, match="/root"):
        start("/root/collectord-test-never-created/pgdata")
    assert not Path("/root/collectord-test-never-created").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only as root does pg_ctl run as another user")
def test_stop_works_when_a_parent_directory_turned_private(base):
    """Seen in the wild: a concurrent pytest chmods /tmp/pytest-of-root to 0700 while the server runs."""
    server = start(base / "private" / "pgdata")
    try:
        os.chmod(base / "private", 0o700)  # the server's user can no longer reach pgdata by path
        server.stop()
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(server.uri, connect_timeout=2).close()
    finally:
        os.chmod(base / "private", 0o755)
        server.stop()
