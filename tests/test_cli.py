"""The operator commands against real daemons: status, reload, restart, stop --timeout,
check, db upgrade; and the status table rendering (pure).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from collectord import control, pidfile
from tests.cli_targets import Env, alive, children_of, wait_for

PASSWORD = "hunter2-secret"


@pytest.fixture
def env(tmp_path, pg_dsn):
    # trust auth ignores the password, so the DSN works and still carries one to hide
    e = Env(tmp_path, f"{pg_dsn} password={PASSWORD}")
    yield e
    e.close()


def _start(env: Env, *args, **kwargs) -> int:
    r = env.cli("start", *args, **kwargs)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().rsplit(" ", 1)[1].rstrip(")"))


def _status_json(env: Env) -> tuple[int, dict]:
    r = env.cli("status", "--json")
    return r.returncode, json.loads(r.stdout)


def test_status_table_and_json_while_running(env):
    pid = _start(env)
    kids = {pidfile.process_info(k).title.split(": ", 1)[1]: k for k in children_of(pid)}

    def ticked():
        code, doc = _status_json(env)
        tick = [c for c in doc.get("children", []) if c["name"] == "tick"]
        running = all(c["state"] == "RUNNING" for c in doc.get("children", []))
        return doc if code == 0 and running and tick and tick[0]["counters"].get("rows_written", 0) > 0 else None

    doc = wait_for(ticked, 15, every=0.2)
    assert doc, "the Ticker's rows never reached status.json"
    assert doc["version"] == 1 and doc["pid"] == pid and doc["state"] == "running"
    assert {c["name"]: c["pid"] for c in doc["children"]} == kids
    assert "password=***" in doc["dsn"]

    r = env.cli("status")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"collectord is running (pid {pid}, up ") and str(env.conf) in lines[0]
    assert lines[1].startswith("database: ") and "password=***" in lines[1]
    header = lines[2].split()
    assert header[:4] == ["COLLECTOR", "STATE", "PID", "UPTIME"] and "RESTARTS" in header and "ROWS" in header
    rows = {line.split()[0]: line.split() for line in lines[3:5]}
    assert rows["sleep"][1] == "RUNNING" and rows["sleep"][2] == str(kids["sleep"])
    assert rows["tick"][1] == "RUNNING" and rows["tick"][2] == str(kids["tick"])
    assert rows["tick"][5].endswith("s") and rows["tick"][6] == "ago"  # last success age
    assert int(rows["tick"][7]) > 0  # rows written
    assert lines[-1].startswith("(status written ")
    for text in (r.stdout, env.status_path.read_text(), env.log()):
        assert PASSWORD not in text


def test_status_shows_a_crashing_collector(env):
    env.write(
        collectors="[collector:sleep]\ntarget = tests.cli_targets:Sleeper\n"
        "[collector:crash]\ntarget = tests.cli_targets:Crasher\n"
    )
    _start(env)

    def crashed():
        code, doc = _status_json(env)
        crash = [c for c in doc.get("children", []) if c["name"] == "crash"]
        return crash[0] if crash and crash[0]["restarts"] >= 1 and crash[0]["last_exit"] else None

    crash = wait_for(crashed, 15, every=0.2)
    assert crash and crash["last_exit"] == "exit 1"
    r = env.cli("status")
    assert r.returncode == 0
    row = next(line for line in r.stdout.splitlines() if line.startswith("crash "))
    assert row.split()[1] in ("BACKOFF", "STARTING", "RUNNING", "FATAL")
    assert "exit 1" in row


def test_status_json_when_dead_and_when_stopped(env):
    pid = _start(env)
    kids = children_of(pid)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(pid) and not any(alive(k) for k in kids), 5)
    code, doc = _status_json(env)
    assert code == 1 and doc["state"] == "dead" and doc["pid"] is None
    assert f"pid {pid} is dead" in doc["reason"]
    env.pidfile.unlink()
    code, doc = _status_json(env)
    assert code == 3 and doc["state"] == "stopped" and doc["children"] == []


def test_reload_rereads_the_config_given_by_a_relative_path(env):
    """The daemon runs in /, so -c must reach it as an absolute path for SIGHUP."""
    r = subprocess.run(
        [sys.executable, "-m", "collectord", "-c", env.conf.name, "start"],
        capture_output=True, text=True, timeout=60, env=env.env(), cwd=str(env.base),
    )
    assert r.returncode == 0, r.stderr
    pid = env.file_pid()
    before = set(children_of(pid))
    env.write(
        collectors="[collector:sleep]\ntarget = tests.cli_targets:Sleeper\n"
        "[collector:tick]\ntarget = tests.cli_targets:Ticker\ninterval = 0.2\n"
        "[collector:extra]\ntarget = tests.cli_targets:Sleeper\n"
    )
    r = env.cli("reload")
    assert r.returncode == 0 and r.stdout.strip() == f"collectord reloading (SIGHUP sent to pid {pid})"
    found = wait_for(lambda: [k for k in children_of(pid) if pidfile.process_info(k).title == "collectord: extra"], 10)
    assert found, env.log()[-2000:]
    assert before <= set(children_of(pid))  # unchanged collectors kept their pids


def test_restart_and_reload_when_stopped(env):
    r = env.cli("reload")
    assert r.returncode == 3 and r.stderr.strip() == "collectord: not running"
    pid = _start(env)
    r = env.cli("restart")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"collectord stopped (pid {pid}, ")
    new = int(lines[1].rsplit(" ", 1)[1].rstrip(")"))
    assert new != pid and env.file_pid() == new and not alive(pid)
    assert len(children_of(new)) == 2


def test_stop_timeout_then_second_stop_kills(env):
    env.write(collectors="[collector:stubborn]\ntarget = tests.cli_targets:Stubborn\n")
    pid = _start(env)
    kid = children_of(pid)[0]
    t0 = time.monotonic()
    r = env.cli("stop", "--timeout", "0.5")
    assert r.returncode == 1
    assert r.stderr.strip() == f"collectord: still running after 0.5 s (pid {pid}); try again or kill it"
    assert time.monotonic() - t0 < 5
    assert alive(pid) and alive(kid)
    # A second SIGTERM during the stop means SIGKILL now (well before graceful_timeout = 5 s).
    t0 = time.monotonic()
    r = env.cli("stop")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took < 4.0, took
    assert not alive(kid) and not env.pidfile.exists()


def test_stop_leaves_a_lock_holder_that_is_not_collectord_alone(env):
    env.pidfile.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(env.pidfile)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, b'%d\\n' % os.getpid())\n"
         "print('locked', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        s = env.cli("status")
        assert s.returncode == 1 and f"locked by pid {holder.pid}, which is not collectord" in s.stdout
        r = env.cli("stop")
        assert r.returncode == 0 and "nothing signalled" in r.stdout
        r = env.cli("start")
        assert r.returncode == 1
        assert f"is locked by pid {holder.pid}, which is not collectord" in r.stderr
        assert len(r.stderr.splitlines()) == 1
        time.sleep(0.1)
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


# -- check -------------------------------------------------------------------------


class _Gamma(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"[]" if self.path.startswith("/gamma/markets") else b'{"error": "not found"}'
        self.send_response(200 if body == b"[]" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def exchange():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gamma)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _polymarket(base: str) -> str:
    return (f"[polymarket]\ngamma_url = {base}/gamma\nclob_url = {base}/clob\n"
            f"data_url = {base}/data\nws_url = ws://127.0.0.1:1/ws/market\n")


def test_check_ok(env, exchange):
    env.conf.write_text(env.conf.read_text() + _polymarket(exchange))
    r = env.cli("check")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0] == f"config: ok ({env.conf}; collectors: sleep, tick)"
    assert lines[1].startswith("database: ok ") and "password=***" in lines[1] and "PostgreSQL 1" in lines[1]
    assert lines[2].startswith(f"exchange: ok {exchange}/gamma/markets (")
    assert PASSWORD not in r.stdout + r.stderr


def test_check_database_down_is_exit_1(env, exchange):
    env.write(dsn=f"host=127.0.0.1 port={_closed_port()} dbname=x user=u password={PASSWORD} connect_timeout=2")
    env.conf.write_text(env.conf.read_text() + _polymarket(exchange))
    r = env.cli("check")
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith("config: ok")
    assert lines[1].startswith("database: FAILED ") and "password=***" in lines[1]
    assert lines[2].startswith("exchange: ok")
    assert PASSWORD not in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_check_exchange_down_is_exit_1(env):
    env.conf.write_text(env.conf.read_text() + _polymarket(f"http://127.0.0.1:{_closed_port()}"))
    r = env.cli("check")
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[1].startswith("database: ok")
    assert lines[2].startswith("exchange: FAILED http://127.0.0.1:")
    assert len(lines) == 3 and "Traceback" not in r.stderr


def test_check_bad_collector_is_exit_78(env):
    env.write(collectors="[collector:picky]\ntarget = tests.cli_targets:Picky\nmode = loud\n")
    r = env.cli("check")
    assert r.returncode == 78
    assert r.stderr.strip().startswith(f"collectord: {env.conf}, [collector:picky], mode: ")
    env.write(collectors="[collector:ghost]\ntarget = tests.no_such_module:Ghost\n")
    r = env.cli("check")
    assert r.returncode == 78
    assert r.stderr.strip().startswith(f"collectord: {env.conf}, [collector:ghost], target: cannot import")


# -- db upgrade --------------------------------------------------------------------


def test_db_upgrade_applies_then_reports_up_to_date(env):
    r = env.cli("db", "upgrade")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("applied migrations 0001") and "password=***" in r.stdout
    r = env.cli("db", "upgrade")
    assert r.returncode == 0 and r.stdout.startswith("schema already up to date (")
    assert PASSWORD not in r.stdout + r.stderr


def test_db_upgrade_unreachable_is_one_line(env):
    env.write(dsn=f"host=127.0.0.1 port={_closed_port()} dbname=x user=u password={PASSWORD} connect_timeout=2")
    r = env.cli("db", "upgrade")
    assert r.returncode == 1
    assert r.stderr.startswith("collectord: db upgrade failed on ") and len(r.stderr.splitlines()) == 1
    assert PASSWORD not in r.stderr


# -- the table (pure) ----------------------------------------------------------------


def test_status_lines_render_every_column():
    now = 1_000_000.0
    doc = {
        "children": [
            {"name": "trades.0", "state": "RUNNING", "pid": 42, "started_at": now - 3725, "uptime": 1,
             "restarts": 2, "counters": {"rows_written": 1234, "errors": 1, "last_success": now - 4,
                                         "last_error": "HttpError: 503\nfrom upstream"}},
            {"name": "prices", "state": "BACKOFF", "pid": None, "started_at": None, "uptime": 12.0,
             "restarts": 3, "next_start_in": 20.0, "last_exit": "signal 9", "counters": {}},
            {"name": "markets", "state": "FATAL", "pid": None, "restarts": 5, "last_exit": "exit 78"},
        ]
    }
    lines = control.status_lines(doc, now)
    assert lines[0].split() == ["COLLECTOR", "STATE", "PID", "UPTIME", "RESTARTS", "LAST", "OK", "ROWS", "ERRORS",
                                "LAST", "ERROR"]
    assert lines[1].split() == ["trades.0", "RUNNING", "42", "1h02m", "2", "4s", "ago", "1234", "1",
                                "HttpError:", "503", "from", "upstream"]
    assert lines[2].split() == ["prices", "BACKOFF", "(20s)", "-", "12s", "3", "-", "0", "0", "signal", "9"]
    assert lines[3].split() == ["markets", "FATAL", "-", "-", "5", "-", "0", "0", "exit", "78"]
    # columns line up
    assert len({line.index("RUNNING") if "RUNNING" in line else None for line in lines[1:2]}) == 1
    assert lines[0].index("STATE") == lines[1].index("RUNNING") == lines[2].index("BACKOFF")


def test_a_stopped_runs_feed_gap_debt_is_shown_from_the_database(env, pg_dsn):
    import psycopg2
    from workers.storage import migrate

    migrate(pg_dsn)
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO feed_gaps (token_id, started_at, ended_at, recovered_at, unrecoverable) VALUES"
                    " ('1', now() - interval '1 hour', now(), NULL, NULL), ('2', now() - interval '2 minutes', NULL,"
                    " NULL, NULL), ('3', now() - interval '1 day', now(), now(), NULL),"
                    " ('4', now() - interval '2 days', now(), NULL, 'Data API refused')")
    conn.close()
    r = env.cli("status")
    assert r.returncode == 3
    assert r.stdout.splitlines() == ["collectord is not running",
                                     "feed gaps: 2 open (trades owed until backfilled), the oldest started 1h00m ago"]
    code, doc = _status_json(env)
    assert code == 3 and doc["feed_gaps"]["open"] == 2
    assert 3590 < time.time() - doc["feed_gaps"]["oldest_open_started_at"] < 3700


def test_feed_gap_line():
    assert control.feed_gap_line({"open": 0, "oldest_open_started_at": None}, 100.0).startswith("feed gaps: none open")
    assert control.feed_gap_line({"open": 3, "oldest_open_started_at": 100.0}, 225.0) == (
        "feed gaps: 3 open (trades owed until backfilled), the oldest started 2m05s ago")
    assert control.feed_gap_line({"error": "connection refused"}, 0) == "feed gaps: unknown (connection refused)"
    dead = control.feed_gap_debt("host=127.0.0.1 port=1 dbname=x user=u password=hunter2 connect_timeout=1")
    assert "error" in dead and "hunter2" not in dead["error"]


def test_ages():
    assert [control._age(s) for s in (None, 0, 59.9, 61, 3600, 90000)] == ["-", "0s", "59s", "1m01s", "1h00m", "1d01h"]


def test_broken_config_neither_stops_nor_blocks_the_running_daemon(env):
    pid = _start(env)
    good = env.conf.read_text()
    env.write(collectors="[collector:picky]\ntarget = tests.cli_targets:Picky\nmode = loud\n")
    for command in ("restart", "reload"):
        r = env.cli(command)
        assert r.returncode == 78 and "[collector:picky], mode:" in r.stderr
        assert alive(pid) and env.file_pid() == pid  # not stopped, not signalled
    env.conf.write_text(good.replace("graceful_timeout = 5", "graceful_timeout = later"))
    s = env.cli("status")
    assert s.returncode == 0 and "graceful_timeout" in s.stderr  # a warning, the status still shown
    r = env.cli("stop")
    assert r.returncode == 0 and r.stdout.startswith(f"collectord stopped (pid {pid}")
    assert not alive(pid)


def test_no_collector_enabled_is_a_config_error(env):
    env.write(collectors="[collector:sleep]\ntarget = tests.cli_targets:Sleeper\nenabled = no\n")
    for command in ("start", "check"):
        r = env.cli(command)
        assert r.returncode == 78
        assert r.stderr.strip() == f"collectord: {env.conf}: no collector is enabled (every [collector:NAME] has enabled = no)"


# -- a new user's first hour (issue 15) ------------------------------------------------


def _raw_cli(env: Env, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """The CLI with exactly these arguments (Env.cli puts -c before the command)."""
    return subprocess.run([sys.executable, "-m", "collectord", *args], capture_output=True, text=True,
                          timeout=60, env=env.env(), cwd=str(env.base), **kwargs)


def test_config_option_is_accepted_after_the_command_too(env):
    r = _raw_cli(env, "start", "-c", str(env.conf))
    assert r.returncode == 0, r.stderr
    pid = env.file_pid()
    for args in (("status", "-c", str(env.conf)), ("status", "--json", "--config", str(env.conf)),
                 ("-c", "/nonexistent.conf", "status", "-c", str(env.conf))):  # after the command wins
        r = _raw_cli(env, *args)
        assert r.returncode == 0, (args, r.stderr)
        assert str(pid) in r.stdout and r.stderr == ""
    r = _raw_cli(env, "db", "upgrade", "-c", str(env.conf))
    assert r.returncode == 0, r.stderr
    r = _raw_cli(env, "stop", "-c", str(env.conf))
    assert r.returncode == 0 and r.stdout.startswith(f"collectord stopped (pid {pid}"), r.stderr


def _status_into_closed_pipe(env: Env, *args: str) -> tuple[int, str]:
    """status whose reader has gone before it writes a byte (what `| head -1` does to the
    rest of the output); its exit code and stderr."""
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "collectord", "-c", str(env.conf), "status", *args],
                            stdout=w, stderr=subprocess.PIPE, text=True, env=env.env(), cwd=str(env.base))
    os.close(w)
    os.close(r)  # long before the interpreter is up: its first write meets EPIPE
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_status_into_a_closed_pipe_keeps_its_lsb_code(env):
    assert _status_into_closed_pipe(env) == (3, "")
    pid = _start(env)
    assert _status_into_closed_pipe(env) == (0, "")
    assert _status_into_closed_pipe(env, "--json") == (0, "")
    # And what `| head -1` shows is the first line, with status's code under pipefail.
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m collectord -c {env.conf} status | head -1"],
                       capture_output=True, text=True, timeout=60, env=env.env(), cwd=str(env.base))
    assert r.returncode == 0 and r.stdout.startswith(f"collectord is running (pid {pid}") and r.stderr == ""


def test_status_names_the_config_the_daemon_runs_with(env):
    pid = _start(env)
    other = env.base / "other.conf"  # another file naming the same PID file
    other.write_text(env.conf.read_text())
    assert wait_for(lambda: env.status_path.exists(), 10)
    r = _raw_cli(env, "status", "-c", str(other))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"collectord is running (pid {pid}, up ") and lines[0].endswith(f", config {env.conf})")
    assert lines[1] == f"note: it runs with {env.conf}, not {other}"
    r = env.cli("status")
    assert not any(line.startswith("note:") for line in r.stdout.splitlines())


@pytest.mark.parametrize("broken", ["missing", "unreadable", "unparsable"])
def test_an_unusable_config_never_says_not_running(env, broken):
    pid = _start(env)
    bad = env.base / "bad.conf"
    if broken == "unreadable":
        bad.mkdir()  # root reads any file: a directory is what cannot be read here
    elif broken == "unparsable":
        bad.write_text("pidfile = /somewhere/else.pid\nthis is not INI\n")
    r = _raw_cli(env, "status", "-c", str(bad))
    assert r.returncode == 4, r.stdout + r.stderr
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"collectord: {bad}")
    assert "cannot tell whether collectord runs" in r.stderr
    assert _raw_cli(env, "status", "--json", "-c", str(bad)).returncode == 4
    r = _raw_cli(env, "stop", "-c", str(bad))
    assert r.returncode == 6 and "nothing stopped" in r.stderr and len(r.stderr.splitlines()) == 1
    assert "not running" not in r.stdout + r.stderr
    time.sleep(0.2)
    assert alive(pid) and env.file_pid() == pid


def test_a_typod_config_shows_the_running_daemons_database(env, pg_dsn):
    pid = _start(env)
    assert wait_for(lambda: env.status_path.exists(), 10)
    typo = env.base / "typo.conf"
    typo.write_text(env.conf.read_text().replace("graceful_timeout = 5", "graceful_timout = 5"))
    r = _raw_cli(env, "status", "-c", str(typo))
    assert r.returncode == 0 and "graceful_timout: unknown key" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"collectord is running (pid {pid}") and f"config {env.conf})" in lines[0]
    assert lines[2] == f"database: {pg_dsn} password=***"
    assert PASSWORD not in r.stdout + r.stderr
    # With no daemon, nothing is made up from the broken file's defaults either.
    env.cli("stop")
    r = _raw_cli(env, "status", "-c", str(typo))
    assert r.returncode == 3 and r.stdout.splitlines()[0] == "collectord is not running"


def test_an_unknown_collector_option_is_named_once_with_a_hint(env):
    env.write(collectors="[collector:tick]\ntarget = tests.cli_targets:Ticker\nintervall = 0.2\n")
    for command in ("check", "start"):
        r = env.cli(command)
        assert r.returncode == 78
        assert r.stderr == (f"collectord: {env.conf}, [collector:tick], intervall: unknown option "
                            "(did you mean interval? Ticker takes: interval)\n")


def test_db_serve_refuses_what_it_cannot_serve(env):
    r = env.cli("db", "serve")  # the dsn names a server
    assert r.returncode == 1 and r.stderr.startswith("collectord: db serve: dsn = ") and "password=***" in r.stderr
    assert PASSWORD not in r.stderr and len(r.stderr.splitlines()) == 1
    env.write(dsn="")
    r = env.cli("db", "serve")  # embedded, but never created: no empty cluster made by mistake
    assert r.returncode == 1
    assert r.stderr.strip() == (f"collectord: db serve: no database under {env.data_dir / 'pgdata'} yet "
                                "(`collectord start` or `collectord db upgrade` creates it)")
    assert not (env.data_dir / "pgdata").exists()


def test_the_database_line_is_the_running_daemons(tmp_path):
    """Pure: status.json's dsn and pgdata win over the caller's config; a broken config
    with no daemon to ask says it cannot tell."""
    import dataclasses

    from collectord import config as config_mod

    mine = config_mod.parse(f"[collectord]\ndsn = host=elsewhere password={PASSWORD}\n", "/etc/c.conf")
    broken = dataclasses.replace(config_mod.parse("", "/etc/typo.conf"), broken="typo")
    uri = "postgresql://postgres@/collectord?host=/srv/demo/data/pgdata&port=5432"
    embedded = {"dsn": uri, "pgdata": "/srv/demo/data/pgdata"}
    served = {"dsn": "host=db password=***", "pgdata": None}
    for config in (mine, broken):
        assert control._database_line(config, embedded) == (
            f"database: embedded PostgreSQL under /srv/demo/data/pgdata; connect with: psql '{uri}'")
        assert control._database_line(config, served) == "database: host=db password=***"
    assert control._database_line(broken, None) == "database: unknown (/etc/typo.conf is broken)"
    assert control._database_line(mine, None) == "database: host=elsewhere password=***"
