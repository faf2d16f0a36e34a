"""Fixtures for the fault runs: PostgreSQL behind a Proxy, a System around the supervisor."""

from __future__ import annotations

import pytest

from tests.conftest import with_schema
from tests.faults.proxy import Proxy


@pytest.fixture
def pg_proxy():
    proxy = Proxy().start()
    yield proxy
    proxy.stop()


@pytest.fixture
def proxied_dsn(pg_dsn, pg_server_dsn, pg_proxy):
    """(DSN through the proxy, direct DSN) for the same fresh schema."""
    schema = pg_dsn.split("search_path=")[1].split("'")[0].split("&")[0]
    if "://" in pg_server_dsn:
        raise pytest.fail("fault runs expect a key=value COLLECTORD_TEST_DSN (host=... port=...)")
    parts = dict(p.split("=", 1) for p in pg_server_dsn.split())
    parts["port"] = str(pg_proxy.port)
    parts["host"] = "127.0.0.1"
    base = " ".join(f"{k}={v}" for k, v in parts.items())
    return with_schema(base, schema), pg_dsn
