"""Hostile environment: PID file and log file tricks, spool directories of the wrong owner
or mode, DSN passwords, TLS verification.

PID file (through the real CLI, `collectord -c CONF start`): a symlinked PID file
path, a directory owned by another user, writable by every user, or a PID file
pre-created by another user in a sticky /tmp-like directory: start refuses with
one line (exit 1), the symlink's target is untouched, nothing keeps running.
A symlinked log file is refused the same way, and never followed after a rotation.
Spool (workers.storage.Writer, non-root where permissions matter: a forked child
that drops to `nobody`): refused or reported, never rows dropped without a word.
DSN password: a supervisor run with a password in its DSN URI, a DB outage and a
kill -9, then status/check: the password appears in no log, status.json, CLI
output, spool file or process title. TLS: no code disables verification, and at
runtime the HTTP client and the WebSocket refuse a self-signed loopback server.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.faults.system import ROOT, System, proc_children, wait_for
from workers.storage import Writer
from workers.storage.spool import SpoolError

NOBODY = 65534
UTC = timezone.utc


def conf(tmp: Path, dsn: str, pidfile: Path) -> Path:
    path = tmp / "collectord.conf"
    path.write_text(
        f"[collectord]\npidfile = {pidfile}\nlogfile = {tmp}/log/collectord.log\ndata_dir = {tmp}/data\n"
        f"dsn = {dsn}\nallow_root = yes\ngraceful_timeout = 5\n"
        "[polymarket]\ngamma_url = http://127.0.0.1:9/gamma\nclob_url = http://127.0.0.1:9/clob\n"
        "data_url = http://127.0.0.1:9/data\nws_url = ws://127.0.0.1:9/ws/market\n"
        "[collector:prices]\nenabled = no\n[collector:orderbooks]\nenabled = no\n"
        "[collector:resolutions]\nenabled = no\n[collector:trades]\nenabled = no\n"
    )
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("COLLECTORD_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "collectord", "-c", str(config), *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd="/")


def refused(config: Path, victim: Path | None = None, before: bytes | None = None) -> str:
    """start must fail with one line; nothing may keep running; returns the line."""
    try:
        proc = cli(config, "start")
        line = proc.stderr.strip()
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
        assert len(line.splitlines()) == 1 and "Traceback" not in line, proc.stderr
    finally:
        cli(config, "stop", "--timeout", "10")  # in case it did start
    if victim is not None:
        assert victim.read_bytes() == before, "the symlink's target was written to"
    return line


def test_pidfile_symlink_is_refused_and_its_target_untouched(tmp_path, pg_dsn):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious contents\n")
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    (run / "collectord.pid").symlink_to(victim)
    line = refused(conf(tmp_path, pg_dsn, run / "collectord.pid"), victim, b"precious contents\n")
    assert "symlink" in line, line
    for args in (("status",), ("stop",)):  # readers must not follow it either
        proc = cli(tmp_path / "collectord.conf", *args)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 1, proc.stderr
    assert victim.read_bytes() == b"precious contents\n"


def test_pidfile_directory_owned_by_another_user_is_refused(tmp_path, pg_dsn):
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chown(run, NOBODY, NOBODY)
    line = refused(conf(tmp_path, pg_dsn, run / "collectord.pid"))
    assert str(run) in line, line
    assert not (run / "collectord.pid").exists()


def test_pidfile_directory_writable_by_everyone_is_refused(tmp_path, pg_dsn):
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    line = refused(conf(tmp_path, pg_dsn, run / "collectord.pid"))
    assert str(run) in line, line


def test_pidfile_precreated_by_another_user_in_a_sticky_directory_is_refused(tmp_path, pg_dsn):
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o1777)
    pidfile = run / "collectord.pid"
    pidfile.write_text("1\n")
    os.chown(pidfile, NOBODY, NOBODY)
    os.chmod(pidfile, 0o666)
    line = refused(conf(tmp_path, pg_dsn, pidfile))
    assert "PID file" in line, line
    assert pidfile.read_text() == "1\n"


# -- log file ---------------------------------------------------------------------------------------
def test_logfile_symlink_is_refused_at_start_and_after_a_rotation(tmp_path, pg_dsn):
    """A symlink at the log path (planted by whoever can write the log directory) is never
    followed: start refuses with one line; a running daemon whose rotated log is replaced
    by a symlink writes nothing through it, on the next line or on SIGHUP's reopen."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious contents\n")
    logdir = tmp_path / "log"
    logdir.mkdir()
    (logdir / "collectord.log").symlink_to(victim)
    config = conf(tmp_path, pg_dsn, tmp_path / "run" / "collectord.pid")
    line = refused(config, victim, b"precious contents\n")
    assert "symlink" in line and "collectord.log" in line, line

    (logdir / "collectord.log").unlink()
    try:
        started = cli(config, "start")
        assert started.returncode == 0, started.stderr
        log = logdir / "collectord.log"
        assert wait_for(lambda: log.exists() and b"starting" in log.read_bytes(), 30)
        log.rename(logdir / "collectord.log.1")  # logrotate's rename, then the attacker's symlink
        log.symlink_to(victim)
        pid = int((tmp_path / "run" / "collectord.pid").read_text().split()[0])
        os.kill(pid, signal.SIGHUP)  # reload: reopen the log, log the outcome
        time.sleep(2)
        # A log line that cannot be written is lost, never an exception out of the log call.
        assert cli(config, "status").returncode == 0, "the supervisor died of its log file"
    finally:
        stopped = cli(config, "stop", "--timeout", "10")
    assert stopped.returncode == 0, stopped.stderr
    assert victim.read_bytes() == b"precious contents\n", "the daemon wrote through the symlink"
    assert log.is_symlink()


# -- spool directory ------------------------------------------------------------------------------
TRADE = {"token_id": "1", "price": "0.5", "size": "1", "side": "BUY", "tx_hash": "0xab", "ordinal": 0,
         "source": "ws"}
DEAD_DSN = "host=127.0.0.1 port=9 dbname=x user=x"  # nothing listens on the discard port


def as_nobody(body) -> dict:
    """Run body() in a forked child as uid/gid nobody; returns the dict it sends back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        result: dict = {}
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = body()
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            result = {"escaped": f"{type(err).__name__}: {err}"}
        os.write(w, json.dumps(result, default=str).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b"{}")


@pytest.fixture
def open_dir():
    """A fresh directory every user can traverse (pytest's tmp_path is root-only: 0700)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="faults-spool-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage()))


def test_spool_directory_the_writer_cannot_write_is_refused_clearly(open_dir):
    spool = open_dir / "spool"
    (spool / "w").mkdir(parents=True)
    os.chmod(spool, 0o755)
    os.chmod(spool / "w", 0o755)  # root's, not writable by nobody

    def body():
        writer = Writer(DEAD_DSN, spool, name="w", background=False, connect_timeout=1)
        try:
            writer.open()
        except (SpoolError, OSError) as err:
            return {"refused": str(err)}
        return {"opened": True}

    result = as_nobody(body)
    assert "refused" in result, result
    assert str(spool / "w") in result["refused"], result


def test_spool_directory_owned_by_another_user_and_world_writable_is_refused_or_reported(tmp_path):
    """Another account can drop segments into such a directory, and the Writer replays spool
    segments into PostgreSQL as they are: forged rows. The Writer must refuse it or say so."""
    spool = tmp_path / "spool" / "w"
    spool.mkdir(parents=True)
    os.chown(spool, NOBODY, NOBODY)
    os.chmod(spool, 0o777)
    handler = Records()
    logging.getLogger().addHandler(handler)
    try:
        writer = Writer(DEAD_DSN, tmp_path / "spool", name="w", background=False, connect_timeout=1)
        try:
            writer.open()
        except SpoolError:
            return
        writer.close()
    finally:
        logging.getLogger().removeHandler(handler)
    warned = [m for level, m in handler.lines if level >= logging.WARNING and str(spool) in m
              and re.search(r"owner|owned|writable|permission", m, re.I)]
    assert warned, f"a foreign-owned, world-writable spool directory was used without a word: {handler.lines}"


def test_rows_the_spool_cannot_take_are_never_dropped_without_a_word(open_dir):
    """Database down, and the spool directory turns unwritable: the Writer holds the rows in
    memory. When close() then cannot save them anywhere, it must raise or log an error saying
    rows are lost (and how many), not return as if they were safe."""
    spool = open_dir / "spool"
    (spool / "w").mkdir(parents=True)
    os.chown(spool, NOBODY, NOBODY)
    os.chown(spool / "w", NOBODY, NOBODY)

    def body():
        handler = Records()
        logging.getLogger().addHandler(handler)
        writer = Writer(DEAD_DSN, spool, name="w", background=False, connect_timeout=1, close_timeout=1)
        writer.open()
        os.chmod(spool / "w", 0o500)
        writer.add("trades", [dict(TRADE, ts=datetime.now(UTC))])
        writer.flush()
        held = writer.stats()["held_batches"]
        before = len(handler.lines)
        try:
            writer.close()
        except Exception as err:  # noqa: BLE001
            return {"held": held, "raised": f"{type(err).__name__}: {err}"}
        said = [m for level, m in handler.lines[before:] if level >= logging.ERROR]
        return {"held": held, "close_errors": said, "stats": writer.stats()}

    result = as_nobody(body)
    assert "escaped" not in result, result
    assert result["held"] >= 1, result  # the scenario happened: rows were neither written nor spooled
    if "raised" in result:
        return
    lost = [m for m in result["close_errors"] if re.search(r"\blost\b|\bdropp|\bdiscard", m, re.I)]
    assert lost, f"close() returned while rows were held and said only: {result['close_errors']}"


# -- DSN password ---------------------------------------------------------------------------------
SECRET = "s3cretPW9fq"


def test_dsn_password_never_in_logs_status_or_cli_output(tmp_path, proxied_dsn, pg_proxy, polysim):
    """A supervisor run with all collectors, a password in the DSN URI (trust auth ignores it),
    a database outage and a kill -9; then status, status --json and check. Nothing written
    anywhere under the run's directory (but the config) and no output holds the password."""
    _, direct = proxied_dsn
    schema = direct.split("search_path=")[1].split("'")[0]
    dsn = f"postgresql://postgres:{SECRET}@127.0.0.1:{pg_proxy.port}/test?options=-csearch_path%3D{schema}"
    sim = polysim(markets=6, seed=11, trade_rate=30.0)
    system = System(tmp_path, dsn, sim, shards=1)
    outputs = []
    try:
        system.start()
        for pid in proc_children(system.proc.pid):
            for part in ("cmdline", "environ"):
                try:
                    outputs.append(Path(f"/proc/{pid}/{part}").read_bytes().decode("utf-8", "replace"))
                except OSError:
                    pass
        pg_proxy.down()
        time.sleep(2.5)
        pg_proxy.up()
        victim = system.pid_of("trades")
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: system.pid_of("trades") not in (None, victim), 20), system.log_tail()
        time.sleep(2)
        for args in (("status",), ("status", "--json"), ("check",)):
            proc = system.cli(*args)
            outputs += [proc.stdout, proc.stderr]
        status_text = system.status_path.read_text()
        outputs.append(status_text)
    finally:
        system.close()
    leaks = [text[max(0, text.find(SECRET) - 80):text.find(SECRET) + 20] for text in outputs if SECRET in text]
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != system.conf:
            data = path.read_bytes().decode("utf-8", "replace")
            if SECRET in data:
                leaks.append(f"{path}: ...{data[max(0, data.find(SECRET) - 80):data.find(SECRET) + 20]}")
    assert not leaks, leaks
    assert "postgres:***@" in status_text, status_text[:300]  # the DSN is there, redacted
    assert re.search(r"database (unreachable|unavailable|connection lost)", system.log_text())  # outage seen


def test_dsn_password_not_echoed_by_a_dsn_syntax_error(tmp_path):
    """libpq names the offending word of a malformed key=value DSN; when that word is part of the
    password (a password with a space, unquoted), `check` must not print it."""
    config = conf(tmp_path, f"host=127.0.0.1 port=5432 dbname=test user=postgres password=abc {SECRET}",
                  tmp_path / "run" / "collectord.pid")
    proc = cli(config, "check")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_config_holding_a_password_readable_by_every_user_is_flagged(tmp_path, pg_server_dsn):
    """A DSN password in a world-readable config file is every local user's: check and start
    say so in one line (without the password); mode 0640 silences it."""
    config = conf(tmp_path, f"{pg_server_dsn} password={SECRET}", tmp_path / "run" / "collectord.pid")
    os.chmod(config, 0o644)
    proc = cli(config, "check")
    warned = [line for line in proc.stdout.splitlines() if "readable by every user" in line]
    assert len(warned) == 1 and str(config) in warned[0], proc.stdout
    assert SECRET not in proc.stdout + proc.stderr
    os.chmod(config, 0o640)
    proc = cli(config, "check")
    assert "readable by every user" not in proc.stdout + proc.stderr, proc.stdout
    os.chmod(config, 0o644)
    plain = conf(tmp_path, pg_server_dsn, tmp_path / "run" / "collectord.pid")  # no password: nothing to say
    assert "readable by every user" not in cli(plain, "check").stdout


# -- TLS verification -----------------------------------------------------------------------------
def test_no_code_disables_tls_verification():
    pattern = re.compile(r"verify\s*=\s*False|CERT_NONE|cert_reqs|check_hostname\s*=\s*False|"
                         r"_create_unverified_context|sslopt|disable_warnings|PYTHONHTTPSVERIFY")
    hits = []
    for package in ("collectord", "workers"):
        for path in (ROOT / package).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, hits


@pytest.fixture
def tls_server(tmp_path):
    """A loopback HTTPS server with a self-signed certificate for 127.0.0.1; counts requests served."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True, timeout=60)
    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            served.append(self.path)
            body = b"[]"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], served, cert
    server.shutdown()
    server.server_close()


def test_http_client_refuses_a_self_signed_server(tls_server):
    from workers.errors import HttpError
    from workers.http import Client

    port, served, cert = tls_server
    client = Client(retries=0, deadline=10)
    assert client.session().verify is True
    with pytest.raises(HttpError):
        client.get_json(f"https://127.0.0.1:{port}/markets")
    assert served == [], "the client sent a request over an unverified TLS connection"
    # The same server is reachable when its certificate is trusted: the refusal was verification.
    import requests

    assert requests.get(f"https://127.0.0.1:{port}/x", verify=str(cert), timeout=10).json() == []


def test_websocket_refuses_a_self_signed_server(tls_server):
    from workers.ws import Connection, ConnectionFailed, WsOptions

    port, served, _ = tls_server
    conn = Connection(f"wss://127.0.0.1:{port}/ws/market", WsOptions(connect_timeout=5, read_timeout=5))
    with pytest.raises(ConnectionFailed):
        conn.connect()
    assert "CERTIFICATE_VERIFY_FAILED" in (conn.last_error or "") or "certificate" in (conn.last_error or ""), \
        conn.last_error
    assert served == []


def test_status_json_is_never_written_through_a_planted_symlink(tmp_path):
    from collectord.status import read_status, write

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious contents\n")
    path = tmp_path / "status.json"
    (tmp_path / f".status.json.{os.getpid()}.tmp").symlink_to(victim)  # the tmp name is predictable
    write(str(path), {"version": 1, "children": []})
    assert read_status(str(path)) == {"version": 1, "children": []}
    assert victim.read_bytes() == b"precious contents\n"
    assert not path.is_symlink()
