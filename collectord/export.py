"""`collectord export TABLE --since T --until T --out DIR`: the command around
workers.storage.export, which owns the tables, the types and the files.

request(args) checks the command line (UsageError, exit 2, one line) before the
config is read; run(config, request) then, in order: finds the database (the
config's dsn; when it is empty, the running daemon's embedded server, else one
started for the export and stopped after it), locks OUT (one export writes
into a directory at a time), turns SIGINT/SIGTERM into Interrupted (the file in
the making is removed, the running query cancelled), exports each table, and
prints one line per file and a summary. A progress bar goes to stderr only when
it is a terminal. The DSN's password is never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from collectord import pidfile
from collectord.cli import EXPORT_TABLES
from collectord.config import Config, redact_dsn
from collectord.errors import EX_OK, CollectordError, Interrupted, UsageError
from collectord.status import read_status

UTC = dt.timezone.utc
LOCK_NAME = ".collectord-export.lock"
TIME_FORMS = "an ISO date or time in UTC, e.g. 2026-12-01, 2026-12-01T12:00, 2026-12-01T12:00:00.250+01:00"


@dataclass(frozen=True)
class Request:
    """What to export: validated, times as UTC datetimes."""

    tables: tuple[str, ...]
    out: Path
    since: dt.datetime | None
    until: dt.datetime
    force: bool = False


def parse_time(text: str, flag: str) -> dt.datetime:
    """An ISO date (midnight UTC) or time (naive = UTC, an offset converted) -> aware UTC."""
    value = text.strip()
    try:
        if len(value) == 10:
            return dt.datetime.combine(dt.date.fromisoformat(value), dt.time(), UTC)
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"export: {flag} {text!r} is not {TIME_FORMS}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def request(args: argparse.Namespace, now: dt.datetime | None = None) -> Request:
    """The command line -> Request; UsageError (exit 2) naming the bad value."""
    name = args.table
    if name == "all":
        tables = EXPORT_TABLES
    elif name in EXPORT_TABLES:
        tables = (name,)
    else:
        raise UsageError(f"export: unknown table {name!r} (one of: {', '.join(EXPORT_TABLES)}, all)")
    if not args.out:
        raise UsageError("export: --out DIR is required (where the Parquet files go)")
    since = parse_time(args.since, "--since") if args.since is not None else None
    until = parse_time(args.until, "--until") if args.until is not None else (now or dt.datetime.now(UTC))
    from workers.storage.export import EXPORTS

    by_day = [t for t in tables if EXPORTS[t].time]
    if by_day and since is None:
        raise UsageError(f"export: --since is required for {', '.join(by_day)} (exported by UTC day)")
    if since is not None and since >= until:
        raise UsageError(f"export: --since {since.isoformat()} is not before --until {until.isoformat()}")
    return Request(tables, Path(args.out), since, until, bool(args.force))


# -- where the data is ------------------------------------------------------------------


@contextlib.contextmanager
def _database(config: Config) -> Iterator[str]:
    """The DSN to read: the config's; for an empty one the running daemon's embedded
    server, else an embedded server started now and stopped on the way out."""
    dsn = config.dsn
    if not dsn:
        probe = pidfile.probe(config.pidfile)
        doc = read_status(config.status_path) if probe.running else None
        dsn = (doc or {}).get("dsn") or ""
    if dsn:
        yield dsn
        return
    from collectord import embedded as embedded_mod

    try:
        server = embedded_mod.start(config.pgdata)
    except CollectordError as err:
        raise CollectordError(f"export: {err}") from None
    try:
        yield server.uri
    finally:
        server.stop()


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold OUT/.collectord-export.lock (POSIX lock) so two exports never share a directory."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CollectordError(f"export: another collectord export is writing into {out}") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted (the handlers only raise; cleanup is the
    export's own try/finally), and a query in flight is cancelled on it."""
    from workers.storage.export import cancel_on_interrupt

    def handle(signum, frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with cancel_on_interrupt():
            yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- output -----------------------------------------------------------------------------


class Report:
    """workers.storage.export.Progress: one line per file on out, a tqdm bar on a terminal."""

    def __init__(self, out: TextIO, root: Path, terminal: bool | None = None):
        self.out, self.root = out, root
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        self.totals: dict[str, dict[str, int]] = {}

    def start(self, table, day, rows):
        if self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=rows, unit="rows", unit_scale=True, desc=f"{table} {day or ''}".strip(),
                            file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.2)

    def advance(self, rows):
        if self.bar is not None:
            self.bar.update(rows)

    def done(self, result):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        where = f"{result.table} {result.day}" if result.day else result.table
        if result.action == "written":
            rate = result.rows / result.seconds if result.seconds > 0 else 0
            line = (f"{where}: {result.rows:,} rows written ({result.bytes / 1e6:.1f} MB, "
                    f"{result.seconds:.1f} s, {rate:,.0f} rows/s) -> {result.path}")
        elif result.action == "unchanged":
            line = f"{where}: unchanged since the last export ({result.rows:,} rows), skipped"
        elif result.action == "removed":
            line = f"{where}: no rows any more, file removed"
        else:
            line = f"{where}: no rows"
        print(line, file=self.out)
        counts = self.totals.setdefault(result.table, {})
        counts[result.action] = counts.get(result.action, 0) + 1
        if result.action == "written":
            counts["rows"] = counts.get("rows", 0) + result.rows

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, seconds: float) -> str:
        parts = []
        for table, c in self.totals.items():
            bits = [f"{c.get('written', 0)} written ({c.get('rows', 0):,} rows)"]
            bits += [f"{c[k]} {label}" for k, label in (("unchanged", "unchanged"), ("empty", "empty"),
                                                          ("removed", "removed")) if c.get(k)]
            parts.append(f"{table} {', '.join(bits)}")
        return f"export done in {seconds:.1f} s: {'; '.join(parts)} under {self.root}"


# -- the command ------------------------------------------------------------------------


def run(config: Config, req: Request, *, out: TextIO) -> int:
    """Export req.tables (see the module docstring for the order); returns the exit code."""
    import psycopg2

    from workers.storage import DsnSyntaxError
    from workers.storage.export import EXPORTS, ExportError, export_table

    whole = [t for t in req.tables if not EXPORTS[t].time]
    if whole and req.since is not None and len(req.tables) == 1:
        print(f"collectord: note: {whole[0]} is exported whole (its current state); "
              f"--since/--until apply to the tables exported by day", file=sys.stderr)
    report = Report(out, req.out)
    t0 = time.monotonic()
    dsn = ""
    try:
        with _interruptible(), _locked(req.out), _database(config) as dsn:
            for table in req.tables:
                export_table(dsn, table, req.out, since=req.since, until=req.until, force=req.force,
                             progress=report)
    except Interrupted as stop:
        report.close()
        name = signal.Signals(stop.exit_code - 128).name
        print(f"collectord: export interrupted ({name}); no partial file is left under a final name",
              file=sys.stderr)
        return stop.exit_code
    except DsnSyntaxError as err:
        raise CollectordError(f"export: {err}") from None
    except ExportError as err:
        report.close()
        raise CollectordError(f"export: {err}") from None
    except psycopg2.Error as err:
        report.close()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f" ({redact_dsn(dsn)})" if dsn else ""
        raise CollectordError(f"export: database{where}: {redact_dsn(first)}") from None
    finally:
        report.close()
    print(report.summary(time.monotonic() - t0), file=out)
    return EX_OK
