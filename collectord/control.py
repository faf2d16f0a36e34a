"""The operator's commands: start, stop, restart, reload, status, check, db upgrade, export, demo.

run(args) loads the config once (-c, $COLLECTORD_CONFIG, /etc, built-in
defaults), dispatches to one command and returns its exit code. Commands talk
to a running daemon only through its PID file: the lock holder, verified by
/proc to be collectord, is the only pid ever signalled (pidfd, so a pid
recycled between the check and the signal cannot be hit).

Output: one line per fact on stdout; errors raise CollectordError (the CLI
prints one line and exits with its code). DSN passwords are always redacted.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import importlib.util
import json
import math
import os
import select
import signal
import stat
import sys
import time
from typing import TextIO

from collectord import config as config_mod
from collectord import pidfile
from collectord.config import Config, redact_dsn
from collectord.status import read_status
from collectord.errors import (
    EX_FAILURE,
    EX_NOTRUNNING,
    EX_OK,
    CollectordError,
    ConfigError,
    NotConfigured,
    NotRunning,
    StatusUnknown,
    StopTimeout,
)

STATUS_RUNNING, STATUS_DEAD, STATUS_STOPPED = 0, 1, EX_NOTRUNNING  # LSB status codes


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Load the config, run args.command, return the exit code."""
    out = out or sys.stdout
    cli_path = os.path.abspath(args.config) if getattr(args, "config", None) else None
    # Absolute, so the daemon (cwd /) re-reads the same file on SIGHUP.
    command = args.command
    if command == "demo":  # it writes a config of its own: a broken /etc or $COLLECTORD_CONFIG is not its business
        return _demo(args)
    if command == "export":  # bad arguments (2) are told before a bad config (78)
        from collectord import export

        request = export.request(args)
    try:
        config = config_mod.load(cli_path)
    except ConfigError as err:
        if command not in ("stop", "status"):
            raise
        # A broken config must not keep an operator from stopping or watching the
        # daemon that runs with the previous one: find its PID file and go on.
        config = _fallback_config(cli_path, err, command)
    if command == "start":
        return cmd_start(config, foreground=args.foreground, out=out)
    if command == "stop":
        return cmd_stop(config, timeout=args.timeout, out=out)
    if command == "restart":
        _validate(config)  # a config that cannot start must not stop the running daemon
        cmd_stop(config, timeout=args.timeout, out=out)
        return cmd_start(config, foreground=False, out=out)
    if command == "reload":
        return cmd_reload(config, out=out)
    if command == "status":
        return cmd_status(config, as_json=args.json, out=out)
    if command == "check":
        return cmd_check(config, out=out)
    if command == "export":
        return export.run(config, request, out=out)
    if command == "book":
        from collectord import book

        return book.cmd_book(config, args.token, args.at, depth=args.depth, as_json=args.json, out=out)
    if command == "db":
        if args.db_command == "serve":
            from collectord import embedded

            return embedded.serve(config, out=out)
        return cmd_db_upgrade(config, out=out)
    raise CollectordError(f"unknown command {command!r}")


def _demo(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("collectord.demo") is None:
        raise CollectordError("demo is not available in this installation (collectord.demo is missing)")
    from collectord import demo  # type: ignore[attr-defined]

    return demo.run(args)


def _fallback_config(cli_path: str | None, err: ConfigError, command: str) -> Config:
    """Defaults plus the file's [collectord] pidfile, read leniently; warns on stderr.

    Only when the file can be read as INI is its PID file known (the one it names,
    or the default when it names none). A missing, unreadable or unparsable file
    leaves it unknown: then nothing may be reported as "not running" (the daemon
    may run with a PID file named in that very file), so status raises
    StatusUnknown (4) and stop NotConfigured (6).
    """
    path = config_mod.resolve_path(cli_path)
    unknown = StatusUnknown if command == "status" else NotConfigured
    verb = "cannot tell whether collectord runs" if command == "status" else "nothing stopped"
    raw = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        with open(path, encoding="utf-8") as fh:
            raw.read_file(fh, source=path)
        pidfile_path = raw.get("collectord", "pidfile", fallback=None)
    except (configparser.Error, OSError, UnicodeDecodeError):
        raise unknown(f"{err}: the PID file it names is unknown, so {verb}") from None
    text = f"[collectord]\npidfile = {pidfile_path}\n" if pidfile_path is not None else ""
    try:
        config = config_mod.parse(text, path)
    except ConfigError:
        raise unknown(f"{err}: the PID file it names is unusable, so {verb}") from None
    print(f"collectord: warning: {err}; using PID file {config.pidfile}", file=sys.stderr)
    return dataclasses.replace(config, broken=str(err))


# -- start / stop / reload ------------------------------------------------------------


def _validate(config: Config) -> list:
    """Every collector constructed once (78 naming the section and key), at least one
    enabled, and the account to run as resolvable: what start needs before forking."""
    from collectord import privileges, spec

    specs = spec.validate(config)
    if not specs:
        raise ConfigError("no collector is enabled (every [collector:NAME] has enabled = no)", path=config.path)
    privileges.plan(config)
    return specs


def _exposed_password(config: Config) -> str | None:
    """A warning when the config file holds a DSN password every local user can read."""
    if not config.path or not config.dsn or redact_dsn(config.dsn) == config.dsn:
        return None
    try:
        mode = os.stat(config.path).st_mode
    except OSError:
        return None
    if not mode & stat.S_IROTH:
        return None
    return (f"{config.path} holds a database password and is readable by every user "
            f"(chmod o-r {config.path}; see docs/operations.md)")


def cmd_start(config: Config, *, foreground: bool, out: TextIO) -> int:
    """Validate (exit 78 on a bad config or collector), warn about a readable password, then start."""
    from collectord import daemon

    _validate(config)
    exposed = _exposed_password(config)
    if exposed:
        print(f"collectord: warning: {exposed}", file=sys.stderr)
    if not foreground and config.logfile in ("", "-"):
        print("collectord: warning: logfile = - sends a daemon's log to /dev/null; "
              "set logfile or use start --foreground", file=sys.stderr)
    if foreground:
        return daemon.foreground(config)
    return daemon.start(config, out=out)


def _signal_verified(probe: pidfile.Probe, sig: int) -> int:
    """Send sig to the verified lock holder through a pidfd; returns the pidfd (caller closes).

    Raises NotRunning when the holder is gone or is no longer the same process.
    """
    pid = probe.holder
    assert pid and probe.process is not None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotRunning("not running (it exited just now)") from None
    try:
        # The pidfd pins this exact process; re-check it is still the one we verified.
        if not pidfile.same_process(probe.process, pidfile.process_info(pid)):
            raise NotRunning("not running (it exited just now)")
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except PermissionError:
            raise CollectordError(
                f"not permitted to signal pid {pid} (run this as root or as the daemon's user)"
            ) from None
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


def _wait_gone(probe: pidfile.Probe, pidfd: int, timeout: float) -> bool:
    """Wait until the lock is released or the process has exited (pidfd readable:
    it is a zombie or gone). Not kill(pid, 0): an orphaned zombie can wait
    seconds for its reaper while its lock is long released."""
    deadline = time.monotonic() + timeout
    step = 0.01
    while True:
        if select.select([pidfd], [], [], 0)[0]:
            return True
        again = pidfile.probe(probe.path)
        if again.holder != probe.holder:
            # Lock released: the daemon is in its last steps (interpreter exit).
            # Give it a moment to be gone too, so nothing of it outlives `stop`.
            select.select([pidfd], [], [], max(0.0, min(2.0, deadline - time.monotonic())))
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        select.select([pidfd], [], [], min(step, left))
        step = min(step * 2, 0.1)


def cmd_stop(config: Config, *, timeout: float | None, out: TextIO) -> int:
    """SIGTERM the verified lock holder and wait; nothing running -> say so, exit 0."""
    probe = pidfile.probe(config.pidfile)
    if not probe.running:
        detail = "" if not probe.exists else f" ({probe.stale_reason()}; nothing signalled)"
        print(f"collectord is not running{detail}", file=out)
        return EX_OK
    timeout = config.graceful_timeout + 10 if timeout is None else timeout
    t0 = time.monotonic()
    try:
        pidfd = _signal_verified(probe, signal.SIGTERM)
    except NotRunning:
        print("collectord is not running (it exited just now)", file=out)
        return EX_OK
    try:
        gone = _wait_gone(probe, pidfd, timeout)
    finally:
        os.close(pidfd)
    if not gone:
        raise StopTimeout(f"still running after {timeout:g} s (pid {probe.holder}); try again or kill it")
    print(f"collectord stopped (pid {probe.holder}, {time.monotonic() - t0:.2f} s)", file=out)
    return EX_OK


def cmd_reload(config: Config, *, out: TextIO) -> int:
    """SIGHUP to the verified lock holder."""
    probe = pidfile.probe(config.pidfile)
    if not probe.running:
        raise NotRunning("not running" + ("" if not probe.exists else f" ({probe.stale_reason()})"))
    # The supervisor would keep its old config on a bad one; say so here, with the key.
    from collectord import spec

    spec.validate(config)
    os.close(_signal_verified(probe, signal.SIGHUP))
    print(f"collectord reloading (SIGHUP sent to pid {probe.holder})", file=out)
    return EX_OK


# -- status ---------------------------------------------------------------------------


def _age(seconds) -> str:
    """3s, 4m05s, 2h03m, 3d04h; '-' for None or anything not a finite number."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def status_lines(doc: dict, now: float) -> list[str]:
    """The per-collector table from a status.json document (pure).

    A damaged or other-version document never raises: entries that are not
    objects are skipped and values of the wrong type show as '-'.
    """
    rows = [["COLLECTOR", "STATE", "PID", "UPTIME", "RESTARTS", "LAST OK", "ROWS", "ERRORS", "LAST ERROR"]]
    children = doc.get("children") if isinstance(doc, dict) else None
    for child in children if isinstance(children, list) else []:
        if not isinstance(child, dict):
            continue
        counters = child.get("counters")
        counters = counters if isinstance(counters, dict) else {}
        started = child.get("started_at")
        uptime = child.get("uptime")
        if child.get("state") in ("STARTING", "RUNNING") and isinstance(started, (int, float)):
            uptime = now - started
        last_ok = counters.get("last_success")
        state = str(child.get("state") or "?")
        if state == "BACKOFF" and child.get("next_start_in") is not None:
            state += f" ({_age(child['next_start_in'])})"
        role = counters.get("role")
        if state == "RUNNING" and role in ("active", "standby"):
            state += f" ({role})"  # a polling collector's lease: which instance polls
        last_exit = child.get("last_exit")
        # A plain class reports no counters: its last abnormal exit is its last error.
        last_error = counters.get("last_error") or (last_exit if last_exit and last_exit != "exit 0" else None)
        rows.append(
            [
                str(child.get("name", "?")),
                state,
                str(child.get("pid") or "-"),
                _age(uptime),
                str(child.get("restarts", 0)),
                _age(now - last_ok) + " ago" if _age(last_ok) != "-" else "-",
                str(counters.get("rows_written", 0)),
                str(counters.get("errors", 0)),
                (str(last_error).replace("\n", " ")[:70] if last_error else "-"),
            ]
        )
    return _table(rows)


def _database_line(config: Config, doc: dict | None) -> str:
    """Where the data goes: the running daemon's own view (status.json) when there is
    one, so a caller's different or broken config cannot make it up; else the config's."""
    uri = redact_dsn(str((doc or {}).get("dsn") or ""))
    if uri:
        pgdata = doc.get("pgdata")
        if pgdata or ("pgdata" not in doc and not config.broken and not config.dsn):
            return f"database: embedded PostgreSQL under {pgdata or config.pgdata}; connect with: psql '{uri}'"
        return f"database: {uri}"
    if config.broken:
        return f"database: unknown ({config.path} is broken)"
    if config.dsn:
        return f"database: {redact_dsn(config.dsn)}"
    return f"database: embedded PostgreSQL under {config.pgdata} (started by `collectord start`)"


def _debt_dsn(config: Config, doc: dict | None, running: bool) -> str:
    """The DSN to read the feed gap debt from: the config's, unless the running daemon
    uses another database; the daemon's (redacted) DSN only when it holds no password."""
    daemon = str((doc or {}).get("dsn") or "") if running else ""
    mine = "" if config.broken else config.dsn
    if mine and (not daemon or redact_dsn(mine) == daemon):
        return mine
    return daemon if daemon and redact_dsn(daemon) == daemon and "***" not in daemon else ""


def feed_gap_debt(dsn: str) -> dict | None:
    """What the trade listeners still owe, from feed_gaps: {"open": n, "oldest_open_started_at":
    unix time or None}, {"error": one line} when the database does not answer, None when
    there is no feed_gaps table (no listener ever ran there). Short timeouts: `status`
    must answer even with the database down."""
    from workers.storage import gaps as store
    from workers.storage.db import Database

    try:
        with Database(dsn, application_name="collectord status", statement_timeout=5, connect_timeout=2) as db:
            (table, owner), = db.query(
                "SELECT to_regclass('feed_gaps') IS NOT NULL, EXISTS (SELECT 1 FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = 'feed_gaps'"
                " AND column_name = 'unrecoverable')")
            if not table:
                return None
            if not owner:
                return {"error": "schema older than migration 0021 (run `collectord db upgrade`)"}
            count, oldest = store.debt(db)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return {"error": redact_dsn(first)[:200]}
    return {"open": count, "oldest_open_started_at": oldest.timestamp() if oldest else None}


def feed_gap_line(debt: dict, now: float) -> str:
    """One line for `status`: how many gaps are owed and since when (pure)."""
    if "error" in debt:
        return f"feed gaps: unknown ({debt['error']})"
    if not debt.get("open"):
        return "feed gaps: none open (every trade recorded or recovered)"
    return (f"feed gaps: {debt['open']} open (trades owed until backfilled), the oldest started "
            f"{_age(now - debt['oldest_open_started_at'])} ago")


def cmd_status(config: Config, *, as_json: bool, out: TextIO) -> int:
    """LSB: 0 running, 1 dead but PID file left, 3 stopped; the table from status.json."""
    probe = pidfile.probe(config.pidfile)
    doc = read_status(config.status_path)
    now = time.time()
    if probe.running:
        code = STATUS_RUNNING
        if doc is not None and doc.get("pid") != probe.pid:
            doc = None  # an earlier run's document
    else:
        code = STATUS_DEAD if probe.exists else STATUS_STOPPED
    # The debt is read from the database: also a stopped run's (an embedded one only while it runs).
    dsn = _debt_dsn(config, doc, code == STATUS_RUNNING)
    debt = feed_gap_debt(dsn) if dsn else None
    if as_json:
        if code == STATUS_RUNNING and doc is not None:
            shown = dict(doc)
        else:
            shown = {"version": 1, "pid": probe.pid, "state": "running" if code == 0 else ("dead" if code == 1 else "stopped"), "children": []}
            if code == STATUS_DEAD:
                shown["reason"] = probe.stale_reason()
        shown["dsn"] = redact_dsn(str(shown.get("dsn") or config.dsn or ""))
        shown["pidfile"] = config.pidfile
        if debt is not None:
            shown["feed_gaps"] = debt
        print(json.dumps(shown, indent=1, default=str), file=out)
        return code

    if code == STATUS_STOPPED:
        print("collectord is not running", file=out)
        if debt is not None:
            print(feed_gap_line(debt, now), file=out)
        return code
    if code == STATUS_DEAD:
        print(f"collectord is not running: {probe.stale_reason()} ({config.pidfile})", file=out)
        if debt is not None:
            print(feed_gap_line(debt, now), file=out)
        return code
    head = f"collectord is running (pid {probe.pid}"
    if doc is not None and isinstance(doc.get("started_at"), (int, float)):
        head += f", up {_age(now - doc['started_at'])}"
    # The daemon's own config (it may differ from the caller's: two files naming one PID file).
    running_with = doc.get("config") if doc is not None else config.path
    head += f", config {running_with or 'built-in defaults'})"
    if doc is not None and doc.get("state") == "stopping":
        head += " - stopping"
    print(head, file=out)
    if doc is not None and config.path and running_with and not _same_file(config.path, running_with):
        print(f"note: it runs with {running_with}, not {config.path}", file=out)
    print(_database_line(config, doc), file=out)
    if doc is None:
        print(f"no status yet ({config.status_path})", file=out)
        return code
    for line in status_lines(doc, now):
        print(line, file=out)
    if debt is not None:
        print(feed_gap_line(debt, now), file=out)
    updated = doc.get("updated_at")
    if isinstance(updated, (int, float)):
        print(f"(status written {_age(now - updated)} ago)", file=out)
    return code


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


# -- check / db upgrade -----------------------------------------------------------------


def _check_database(config: Config) -> tuple[bool, str]:
    """Connect, ask the server's version and the schema's migration level."""
    dsn = config.dsn
    if not dsn:
        probe = pidfile.probe(config.pidfile)
        doc = read_status(config.status_path) if probe.running else None
        dsn = (doc or {}).get("dsn") or ""
        if not dsn:
            return True, f"database: embedded PostgreSQL under {config.pgdata} (started by `collectord start`; not running now)"
    try:
        from workers import storage
    except ImportError as err:
        return False, f"database: cannot load the storage module ({err})"
    try:
        conn = storage.connect(dsn, application_name="collectord check", statement_timeout=10, connect_timeout=5)
    except storage.DsnSyntaxError as err:  # unparsable: where its password ends is unknown, so no DSN shown
        return False, f"database: FAILED: {err}"
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return False, f"database: FAILED {redact_dsn(dsn)}: {redact_dsn(first)}"
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            version = cur.fetchone()[0]
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            level = "no schema yet (start or `db upgrade` creates it)"
            if cur.fetchone()[0]:
                cur.execute("SELECT max(version) FROM schema_migrations")
                level = f"schema version {cur.fetchone()[0]}"
    except Exception as err:
        return False, f"database: FAILED {redact_dsn(dsn)}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    finally:
        conn.close()
    return True, f"database: ok {redact_dsn(dsn)} (PostgreSQL {version}, {level})"


def _check_exchange(config: Config) -> tuple[bool, str]:
    """One small Gamma request through the collectors' own HTTP client."""
    url = f"{config.exchange.gamma_url}/markets"
    t0 = time.monotonic()
    try:
        from workers.http import Client
    except ImportError:
        Client = None
    try:
        if Client is not None:
            client = Client(timeout=(3.05, 10), rate=0, retries=1, deadline=25)
            try:
                client.get_json(url, params={"limit": 1})
            finally:
                client.close()
        else:
            import requests

            resp = requests.get(url, params={"limit": 1}, timeout=(3.05, 10))
            resp.raise_for_status()
            resp.json()
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return False, f"exchange: FAILED {url}: {first[:200]}"
    return True, f"exchange: ok {url} ({(time.monotonic() - t0) * 1000:.0f} ms)"


def cmd_check(config: Config, *, out: TextIO) -> int:
    """Config (every collector constructed once), database, exchange: one line each.

    0 all fine, 1 database or exchange unreachable, 78 config error (raised).
    """
    specs = _validate(config)
    names = ", ".join(s.name for s in specs)
    print(f"config: ok ({config.path or 'built-in defaults'}; collectors: {names})", file=out)
    exposed = _exposed_password(config)
    if exposed:
        print(f"config: warning: {exposed}", file=out)
    ok_db, line_db = _check_database(config)
    print(line_db, file=out)
    ok_ex, line_ex = _check_exchange(config)
    print(line_ex, file=out)
    return EX_OK if ok_db and ok_ex else EX_FAILURE


def cmd_db_upgrade(config: Config, *, out: TextIO) -> int:
    """Apply pending migrations to the configured DSN (the embedded server when empty)."""
    from workers import storage

    dsn = config.dsn
    embedded = None
    if not dsn:
        probe = pidfile.probe(config.pidfile)
        doc = read_status(config.status_path) if probe.running else None
        dsn = (doc or {}).get("dsn") or ""
    try:
        if not dsn:
            from collectord import embedded as embedded_mod

            try:
                embedded = embedded_mod.start(config.pgdata)
            except CollectordError as err:
                raise CollectordError(f"db upgrade: {err}") from None
            dsn = embedded.uri
        try:
            applied = storage.migrate(dsn)
        except storage.DsnSyntaxError as err:  # unparsable: where its password ends is unknown, so no DSN shown
            raise CollectordError(f"db upgrade failed: {err}") from None
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CollectordError(f"db upgrade failed on {redact_dsn(dsn)}: {redact_dsn(first)}") from None
    finally:
        if embedded is not None:
            embedded.stop()
    if applied:
        print(f"applied migrations {', '.join(f'{v:04d}' for v in applied)} to {redact_dsn(dsn)}", file=out)
    else:
        print(f"schema already up to date ({redact_dsn(dsn)})", file=out)
    return EX_OK


