"""Database: the reconnecting single connection other storage modules build on."""

from __future__ import annotations

import os

import psycopg2
import pytest

from workers.storage import Database, connect, migrate


@pytest.fixture
def db(pg_dsn):
    migrate(pg_dsn)
    return pg_dsn


def terminate(dsn: str, app: str) -> int:
    admin = psycopg2.connect(dsn, connect_timeout=10)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s", (app,))
        n = cur.fetchone()[0]
    admin.close()
    return n


def test_connect_keeps_dsn_options_and_sets_timeouts(db):
    conn = connect(db, statement_timeout=7.5, application_name="collectord:t")
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "7500ms"
            cur.execute("SELECT to_regclass('trades') IS NOT NULL")  # the DSN's search_path survived
            assert cur.fetchone()[0] is True
            cur.execute("SHOW application_name")
            assert cur.fetchone()[0] == "collectord:t"
    finally:
        conn.close()


def test_statement_timeout_bounds_a_stuck_query(db):
    d = Database(db, statement_timeout=0.2)
    with pytest.raises(psycopg2.errors.QueryCanceled):
        d.query("SELECT pg_sleep(5)")
    assert d.query("SELECT 1") == [(1,)]  # the connection is still usable
    d.close()


def test_cursor_commits_and_rolls_back(db):
    d = Database(db)
    with d.cursor() as cur:
        cur.execute("INSERT INTO followed_tokens (token_id) VALUES ('1')")
    with pytest.raises(RuntimeError):
        with d.cursor() as cur:
            cur.execute("INSERT INTO followed_tokens (token_id) VALUES ('2')")
            raise RuntimeError("caller failed")
    assert d.query("SELECT token_id FROM followed_tokens") == [("1",)]
    assert d.execute("DELETE FROM followed_tokens WHERE token_id = %s", ("1",)) == 1
    d.close()


def test_reconnects_once_after_the_connection_dropped(db):
    d = Database(db, application_name="collectord:dbtest")
    assert d.ping()
    assert terminate(db, "collectord:dbtest") == 1
    assert d.query("SELECT 42") == [(42,)]  # retried once on a fresh connection
    # cursor() cannot re-run the block: it raises, and the next call reconnects.
    assert terminate(db, "collectord:dbtest") == 1
    with pytest.raises(psycopg2.OperationalError):
        with d.cursor() as cur:
            cur.execute("SELECT 1")
    with d.cursor() as cur:
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)
    d.close()


def test_a_connection_never_crosses_a_fork(db):
    d = Database(db)
    parent_backend = d.query("SELECT pg_backend_pid()")[0][0]  # opened in the parent
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # The child gets its own connection; the parent's socket is left alone.
            code = 0 if d.query("SELECT pg_backend_pid()")[0][0] != parent_backend else 3
            d.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert d.query("SELECT 2") == [(2,)]  # the parent's connection still works
    d.close()



@pytest.mark.parametrize("dsn", ["host=127.0.0.1 password=abc s3cretPW9fq", "host='127.0.0.1 password=s3cretPW9fq",
                                 "postgresql://u:s3cretPW9fq%zz@127.0.0.1/db"])
def test_a_dsn_syntax_error_never_quotes_the_dsn(dsn):
    from workers.storage import DsnSyntaxError, connect
    with pytest.raises(DsnSyntaxError) as caught:
        connect(dsn)
    assert "s3cretPW9fq" not in str(caught.value) and "invalid dsn syntax" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
