"""`collectord demo`: polysim + the supervisor + an embedded PostgreSQL, in one command.

run() does, in order:
  1. picks this run's directory and says where it is: --dir D, else a new
     `run-YYYYmmdd-HHMMSS` under `collectord-demo` in the system temp directory,
     so every run starts from an empty database and earlier runs stay queryable
     (nothing is ever removed; the count of earlier runs and how to free them is
     said). Refuses a D under /root when run as root (the embedded server runs as
     its own system user and cannot enter it), one where a demo is still running
     and one that holds an earlier run's data (it says so and removes nothing);
  2. starts polysim (`python -m polysim --port 0 ...`) in its own session and
     reads the port from its ready line;
  3. writes <dir>/collectord.conf: empty dsn (embedded PostgreSQL under
     <dir>/data/pgdata), PID file, status, logs and spool under <dir>, the
     exchange URLs pointing at polysim, a small followed set and short
     intervals so rows show up within seconds;
  4. runs `collectord -c <dir>/collectord.conf start --foreground` as a child
     in its own session, its output appended to the config's logfile
     (<dir>/log/collectord.log), so the file the config names is the log;
  5. prints one line every few seconds: rows per table and each collector's
     state, until Ctrl-C / SIGTERM or --seconds after the collectors started;
  6. stops the supervisor (SIGTERM: collectors flush, the embedded server
     stops), then polysim;
  7. prints the rows per table, counted after the final flush (the embedded
     server is started once more for that), the feed gaps (opened, recovered,
     unrecoverable, still open and the oldest open one's age), where the data
     is, and the two commands that query it: `collectord -c <conf> db serve`
     (the database alone, until Ctrl-C: not `start`, whose collectors would
     retry a polysim that is gone) and the psql line it prints.
Signal handlers only set a flag and write to a wake pipe; the loop acts.
"""

from __future__ import annotations

import importlib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from collectord.config import BUILTIN_TARGETS, Config
from collectord.errors import CollectordError
from collectord.status import read_status

TABLES = ("markets", "tokens", "followed_tokens", "price_snapshots", "orderbook_snapshots",
          "trades", "resolutions", "feed_gaps")
SHORT = {"markets": "markets", "tokens": "tokens", "followed_tokens": "followed", "price_snapshots": "prices",
         "orderbook_snapshots": "books", "trades": "trades", "resolutions": "resolutions", "feed_gaps": "gaps"}
EVERY = 5.0  # seconds between progress lines
READY_TIMEOUT = 30.0  # polysim's ready line
START_TIMEOUT = 180.0  # first start: initdb of the embedded server, migrations
STOP_TIMEOUT = 90.0  # supervisor stop: graceful_timeout + embedded server stop
POLYSIM = {"markets": 30, "seed": 7, "trade-rate": 20, "resolve-rate": 0.02, "new-market-rate": 0.02}
GRACEFUL = 10  # graceful_timeout in the demo config

# Per-collector settings that make data appear within seconds; each is written
# only if the collector class has that option (a collector's OPTIONS decide).
DEMO_OPTIONS: dict[str, dict[str, str]] = {
    "markets": {"interval": "5"},
    "prices": {"interval": "2"},
    "orderbooks": {"interval": "3"},
    "resolutions": {"interval": "5"},
    "trades": {"refresh_interval": "2", "backfill_delay": "5"},
}


class DemoError(CollectordError):
    """The demo cannot start or run; the message says why."""


class _Stop:
    """SIGINT/SIGTERM -> a flag and a byte on a pipe (the loop waits on it)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.r, self.w = os.pipe()
        os.set_blocking(self.w, False)
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.close(self.r)
        os.close(self.w)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name
        try:
            os.write(self.w, b"x")
        except OSError:
            pass

    def wait(self, timeout: float) -> bool:
        """Sleep up to timeout; True as soon as a stop was requested."""
        if self.requested is None and timeout > 0:
            select.select([self.r], [], [], timeout)
        return self.requested is not None


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the demo process dies (even by SIGKILL),
    so polysim and the supervisor (which then stops its collectors) never outlive it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def default_dir() -> Path:
    """Where the runs live unless --dir says: one run-TIME directory each."""
    return Path(tempfile.gettempdir()) / "collectord-demo"


def new_run_dir(base: Path, now: float | None = None) -> Path:
    """base/run-YYYYmmdd-HHMMSS (a -2, -3 ... suffix if that exists), not yet created."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    candidate, n = base / f"run-{stamp}", 1
    while candidate.exists():
        n += 1
        candidate = base / f"run-{stamp}-{n}"
    return candidate


def earlier_runs(base: Path, current: Path) -> list[Path]:
    """The run directories under base other than current, oldest first."""
    try:
        found = [p for p in base.iterdir() if p.name.startswith("run-") and p.is_dir() and p != current]
    except OSError:
        return []
    return sorted(found)


def holds_data(directory: Path) -> bool:
    """True when directory/data holds anything (an earlier run's database or spool)."""
    try:
        return any((directory / "data").iterdir())
    except OSError:
        return False


def self_command() -> str:
    """How to run this collectord again, as a user can paste it: `collectord` when that is
    the one on PATH, else the console script's absolute path, else python -m collectord."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "collectord" and os.path.isfile(argv0):
        on_path = shutil.which("collectord")
        try:
            if on_path and os.path.samefile(on_path, argv0):
                return "collectord"
        except OSError:
            pass
        return shlex.quote(os.path.abspath(argv0))
    return f"{shlex.quote(sys.executable)} -m collectord"


def demo_options(name: str, wanted: dict[str, str]) -> dict[str, str]:
    """The wanted options the built-in collector `name` actually has (its OPTIONS)."""
    module, _, cls = BUILTIN_TARGETS[name].partition(":")
    try:
        options = getattr(importlib.import_module(module), cls).OPTIONS
    except Exception:  # the supervisor reports a broken collector itself
        return {}
    return {k: v for k, v in wanted.items() if k in options}


def write_config(directory: Path, port: int) -> Path:
    """<dir>/collectord.conf for this run: everything under <dir>, URLs at polysim."""
    base = f"http://127.0.0.1:{port}"
    lines = [
        "# Written by `collectord demo` for the run in this directory. polysim stopped with",
        "# the demo: `collectord -c THIS_FILE db serve` serves the data collected (not `start`,",
        "# whose collectors would retry an exchange that is gone).",
        "[collectord]",
        f"pidfile = {directory / 'run' / 'collectord.pid'}",
        "# the demo runs the supervisor in the foreground, its output appended to this file",
        f"logfile = {directory / 'log' / 'collectord.log'}",
        "loglevel = INFO",
        f"data_dir = {directory / 'data'}",
        "# empty: an embedded PostgreSQL under data_dir/pgdata",
        "dsn =",
        f"graceful_timeout = {GRACEFUL}",
        "health_interval = 10",
    ]
    if os.geteuid() == 0:
        lines += ["# the demo runs as whoever started it, root included", "allow_root = yes"]
    lines += [
        "",
        "[restart]",
        "backoff_initial = 1",
        "backoff_max = 5",
        "",
        "[polymarket]",
        f"gamma_url = {base}/gamma",
        f"clob_url = {base}/clob",
        f"data_url = {base}/data",
        f"ws_url = ws://127.0.0.1:{port}/ws/market",
        "",
        "[selection]",
        "max_markets = 10",
    ]
    for name in BUILTIN_TARGETS:
        options = demo_options(name, DEMO_OPTIONS.get(name, {}))
        if options:
            lines += ["", f"[collector:{name}]"] + [f"{k} = {v}" for k, v in options.items()]
    path = directory / "collectord.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_polysim(directory: Path) -> tuple[subprocess.Popen, int]:
    """polysim on a free loopback port, output in <dir>/log/polysim.log; (process, port)."""
    log_path = directory / "log" / "polysim.log"
    cmd = [sys.executable, "-m", "polysim", "--port", "0"]
    for key, value in POLYSIM.items():
        cmd += [f"--{key}", str(value)]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        m = re.search(r"listening on http://[^\s:]+:(\d+)", text)
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    terminate(proc, 5)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise DemoError(f"polysim did not start: {tail[0]} (log: {log_path})")


def terminate(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM, wait up to timeout, then SIGKILL; the exit status."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None


def count_rows(dsn: str) -> dict[str, int | None]:
    """{table: rows} (None for a table not there yet), with short timeouts."""
    import psycopg2

    conn = psycopg2.connect(dsn, connect_timeout=5, options="-c statement_timeout=5000")
    try:
        conn.autocommit = True
        counts: dict[str, int | None] = {}
        with conn.cursor() as cur:
            for table in TABLES:
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
                if not cur.fetchone()[0]:
                    counts[table] = None
                    continue
                cur.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 (names from TABLES)
                counts[table] = cur.fetchone()[0]
        return counts
    finally:
        conn.close()


def progress_line(elapsed: float, counts: dict[str, int | None] | None, doc: dict | None) -> str:
    if counts:
        rows = "  ".join(f"{SHORT[t]} {counts[t]}" for t in TABLES if counts.get(t) is not None)
    else:
        rows = "database not answering yet"
    states = ", ".join(f"{c.get('name')} {c.get('state')}" for c in (doc or {}).get("children") or ())
    return f"[{elapsed:5.0f}s] {rows} | {states or 'starting'}"


def gap_figures(dsn: str) -> dict | None:
    """workers.storage.gaps.figures() of the demo's database; None when there is no feed_gaps."""
    from workers.storage import gaps as store
    from workers.storage.db import Database

    with Database(dsn, application_name="collectord demo", statement_timeout=10) as db:
        if not db.query("SELECT to_regclass('feed_gaps') IS NOT NULL")[0][0]:
            return None
        return store.figures(db)


def gap_line(gaps: dict, now: float) -> str:
    """The summary's feed gap line (pure)."""
    line = (f"feed gaps: {gaps['opened']} opened, {gaps['recovered']} recovered, "
            f"{gaps['unrecoverable']} unrecoverable, {gaps['open']} still open")
    oldest = gaps.get("oldest_open_started_at")
    if gaps["open"] and oldest is not None:
        line += (f" (the oldest started {max(0, now - oldest.timestamp()):.0f}s ago): the trades they hold are "
                 "owed, and the next start fetches them")
    return line


def final_counts(pgdata: Path) -> tuple[dict[str, int | None] | None, str, dict | None]:
    """Rows per table and gap figures after the supervisor stopped: start the embedded
    server once more. Returns (counts, the server's URI, gaps) or (None, why not, None).
    """
    from collectord import embedded

    try:
        server = embedded.start(pgdata)
    except Exception as err:
        return None, str(err), None
    try:
        return count_rows(server.uri), server.uri, gap_figures(server.uri)
    except Exception as err:
        return None, f"{type(err).__name__}: {err}", None
    finally:
        server.stop()


def run(args: Any, config: Config | None = None) -> int:
    """`collectord demo [--dir D] [--seconds S]` -> exit code (0 after a clean stop)."""
    seconds = getattr(args, "seconds", None)
    base = None
    if getattr(args, "dir", None):
        directory = Path(os.path.abspath(args.dir))
    else:
        base = default_dir()
        directory = new_run_dir(base)
    if os.geteuid() == 0 and (directory == Path("/root") or Path("/root") in directory.parents):
        raise DemoError(f"{directory}: as root the demo directory must be outside /root "
                        "(the embedded PostgreSQL runs as its own user); use --dir")
    conf = directory / "collectord.conf"
    if conf.exists() and _running(conf):
        raise DemoError(f"a demo is already running in {directory}: "
                        f"{self_command()} -c {conf} stop (or use another --dir)")
    if holds_data(directory):
        # Never wiped unasked: it may be the only copy of what a user wants to query.
        raise DemoError(f"{directory} holds an earlier run's data: query it with `{self_command()} -c {conf} db serve`, "
                        f"or remove it (rm -r {directory / 'data'}) or choose another --dir "
                        "(without --dir every run gets a new directory)")
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)  # the embedded server's user must traverse it
    for sub in ("log", "run"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)  # the embedded server's user must traverse it
    status_path = directory / "run" / "status.json"
    print(f"collectord demo: directory {directory}", flush=True)
    if base is not None:
        earlier = earlier_runs(base, directory)
        if earlier:
            print(f"collectord demo: {len(earlier)} earlier run(s) kept under {base} (the latest: "
                  f"{earlier[-1].name}); free them with: rm -r {base}/run-*", flush=True)
    status_path.unlink(missing_ok=True)

    stop = _Stop()
    stop.install()
    sim = supervisor = None
    try:
        sim, port = start_polysim(directory)
        print(f"collectord demo: polysim (simulated exchange) on http://127.0.0.1:{port}", flush=True)
        conf = write_config(directory, port)
        log_path = directory / "log" / "collectord.log"
        out = open(log_path, "ab")
        with out:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "collectord", "-c", str(conf), "start", "--foreground"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent)
        print(f"collectord demo: supervisor pid {supervisor.pid} starting (first start initialises "
              f"the embedded PostgreSQL); log {log_path}", flush=True)
        _watch(supervisor, status_path, stop, seconds, directory)
    finally:
        stopped_by = stop.requested
        code = _shutdown(supervisor, sim)
        stop.restore()
    return _summary(directory, conf, code, stopped_by)


def _running(conf: Path) -> bool:
    proc = subprocess.run([sys.executable, "-m", "collectord", "-c", str(conf), "status"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    return proc.returncode == 0


def _watch(supervisor: subprocess.Popen, status_path: Path, stop: _Stop, seconds: float | None,
           directory: Path) -> None:
    """Progress lines until a stop request, --seconds after the collectors started, or a dead supervisor."""
    began = time.monotonic()
    started = None  # when status.json first listed children (the supervisor is ready)
    next_line = began
    while True:
        now = time.monotonic()
        if supervisor.poll() is not None:
            tail = _tail(directory / "log" / "collectord.log")
            raise DemoError(f"the supervisor exited with status {supervisor.returncode}: {tail} "
                            f"(logs: {directory / 'log'})")
        doc = read_status(status_path)
        if started is None and doc and doc.get("children"):
            started = now
        if started is None and now - began > START_TIMEOUT:
            raise DemoError(f"the supervisor was not ready after {START_TIMEOUT:.0f}s (logs: {directory / 'log'})")
        if seconds is not None and started is not None and now - started >= seconds:
            return
        if now >= next_line:
            counts = None
            dsn = (doc or {}).get("dsn")
            if dsn:
                try:
                    counts = count_rows(dsn)
                except Exception:
                    counts = None
            print(progress_line(now - began, counts, doc), flush=True)
            next_line = now + EVERY
        wait = next_line - time.monotonic()
        if seconds is not None and started is not None:
            wait = min(wait, started + seconds - time.monotonic())
        if stop.wait(max(0.05, min(wait, 1.0))):
            print(f"\ncollectord demo: {stop.requested}, stopping", flush=True)
            return


def _shutdown(supervisor: subprocess.Popen | None, sim: subprocess.Popen | None) -> int | None:
    """Supervisor first (its collectors flush into the database), then polysim."""
    code = None
    if supervisor is not None:
        print("collectord demo: stopping the supervisor (collectors flush, then the database stops)", flush=True)
        code = terminate(supervisor, STOP_TIMEOUT)
    if sim is not None:
        terminate(sim, 10)
    return code


def _tail(path: Path) -> str:
    """The supervisor's last error line (else its last line): why it exited."""
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no output"
    errors = [x for x in lines if " ERROR " in x or " CRITICAL " in x or x.startswith("collectord: ")]
    return (errors or lines or ["no output"])[-1]


def _summary(directory: Path, conf: Path, code: int | None, stopped_by: str | None) -> int:
    from collectord.embedded import has_cluster, psql_command

    pgdata = directory / "data" / "pgdata"
    created = has_cluster(pgdata)
    counts, uri, gaps = final_counts(pgdata) if created else (None, "no database was created", None)
    print("")
    print(f"collectord demo: supervisor exited with status {code}" + (f" after {stopped_by}" if stopped_by else ""))
    if counts is None:
        print(f"collectord demo: cannot count rows: {uri}")
        uri = f"postgresql://postgres@/collectord?host={pgdata}"
    else:
        print("rows per table:")
        for table in TABLES:
            value = counts.get(table)
            print(f"  {table:<20} {'(missing)' if value is None else value:>8}")
        if gaps is not None:
            print(gap_line(gaps, time.time()))
    if created:
        print(f"data: embedded PostgreSQL, data directory {pgdata}, database collectord "
              "(kept; polysim and the collectors stopped with the demo)")
        print(f"  serve it:  {self_command()} -c {conf} db serve   (the database only, until Ctrl-C)")
        print(f"  query it, from another terminal meanwhile:  {psql_command(uri)} -c 'SELECT count(*) FROM trades'")
    print(f"logs: {directory / 'log' / 'collectord.log'}   config: {conf}")
    return 0 if code == 0 and counts is not None else 1
