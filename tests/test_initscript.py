"""etc/init.d/collectord driven for real: start-stop-daemon, the real CLI, a real supervisor.

The script reads its settings from a temporary defaults file named by
$COLLECTORD_DEFAULTS (DAEMON = this venv's console script, CONFIG and PIDFILE
under tmp_path). The config runs one tiny collector class written into
tmp_path (on PYTHONPATH) against a fresh schema of the test PostgreSQL, with
the built-in collectors disabled: what is under test is the script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collectord.config import BUILTIN_TARGETS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "etc" / "init.d" / "collectord"
DAEMON = Path(sys.executable).with_name("collectord")

SLEEPER = '''
import time

class Sleeper:
    """Runs until stop(); stop() only sets the flag."""

    def __init__(self, **kwargs):
        self.stopping = False

    def run(self):
        while not self.stopping:
            time.sleep(0.1)

    def stop(self):
        self.stopping = True
'''

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the init script is driven as root")


def proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc_alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def initscript(tmp_path, pg_dsn):
    """run(action) -> CompletedProcess of `sh etc/init.d/collectord ACTION` with a temporary setup."""
    assert shutil.which("start-stop-daemon"), "start-stop-daemon is required (Debian: dpkg)"
    assert DAEMON.exists(), DAEMON
    (tmp_path / "demo_target_initscript.py").write_text(SLEEPER)
    pidfile = tmp_path / "run" / "collectord.pid"
    conf = tmp_path / "collectord.conf"
    lines = [
        "[collectord]",
        f"pidfile = {pidfile}",
        f"logfile = {tmp_path / 'log' / 'collectord.log'}",
        f"data_dir = {tmp_path / 'data'}",
        f"dsn = {pg_dsn}",
        "allow_root = yes",
        "graceful_timeout = 5",
        "",
    ]
    for name in BUILTIN_TARGETS:
        lines += [f"[collector:{name}]", "enabled = no", ""]
    lines += ["[collector:sleeper]", "target = demo_target_initscript:Sleeper", ""]
    conf.write_text("\n".join(lines))
    defaults = tmp_path / "default"
    defaults.write_text(f"DAEMON={DAEMON}\nCONFIG={conf}\nPIDFILE={pidfile}\nSTOP_TIMEOUT=30\n")
    env = dict(os.environ, COLLECTORD_DEFAULTS=str(defaults), PYTHONPATH=str(tmp_path),
               SYSTEMCTL_SKIP_REDIRECT="1")
    env.pop("COLLECTORD_CONFIG", None)

    def run(action: str, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(SCRIPT), action], env=dict(env, **extra_env), cwd="/",
                              capture_output=True, text=True, timeout=120)

    run.pidfile = pidfile
    run.conf = conf
    run.defaults = defaults
    yield run
    # Never leave a daemon behind, whatever failed above.
    if pidfile.exists():
        run("stop")


def read_pid(path: Path) -> int:
    return int(path.read_text().split()[0])


def test_script_syntax_sh_n():
    proc = subprocess.run(["sh", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_lsb_header_and_actions():
    text = SCRIPT.read_text()
    header = text[text.index("### BEGIN INIT INFO"): text.index("### END INIT INFO")]
    for field in ("Provides:", "Required-Start:", "Required-Stop:", "Default-Start:", "Default-Stop:",
                  "Short-Description:"):
        assert field in header
    assert "--startas" in text and "--pidfile" in text and "--retry" in text
    assert "TERM/$STOP_TIMEOUT/KILL/5" in text
    assert os.access(SCRIPT, os.X_OK)


def test_full_lifecycle(initscript):
    """status, start, status, start again, reload, force-reload, restart, stop, status, stop again."""
    r = initscript("status")
    assert r.returncode == 3, r

    r = initscript("start")
    assert r.returncode == 0, r
    pid = read_pid(initscript.pidfile)
    assert proc_alive(pid)

    r = initscript("status")
    assert r.returncode == 0, r
    assert "sleeper" in r.stdout and str(pid) in r.stdout

    r = initscript("start")  # LSB: starting a running service succeeds and changes nothing
    assert r.returncode == 0, r
    assert "already running" in r.stdout + r.stderr
    assert read_pid(initscript.pidfile) == pid

    for action in ("reload", "force-reload"):
        r = initscript(action)
        assert r.returncode == 0, r
        assert read_pid(initscript.pidfile) == pid and proc_alive(pid)
    assert "reload" in (initscript.pidfile.parent.parent / "log" / "collectord.log").read_text().lower()

    r = initscript("restart")
    assert r.returncode == 0, r
    new_pid = read_pid(initscript.pidfile)
    assert new_pid != pid and proc_alive(new_pid) and not proc_alive(pid)

    t0 = time.monotonic()
    r = initscript("stop")
    assert r.returncode == 0, r
    assert wait_gone(new_pid, 10), "supervisor still alive after stop"
    assert time.monotonic() - t0 < 30
    assert not initscript.pidfile.exists()

    r = initscript("status")
    assert r.returncode == 3, r
    r = initscript("stop")  # LSB: stopping a stopped service succeeds
    assert r.returncode == 0, r
    r = initscript("reload")  # LSB: 7 = program is not running
    assert r.returncode == 7, r


def test_stale_pidfile_of_an_unrelated_process_is_not_obeyed(initscript):
    """A PID file naming a live foreign process: stop signals nothing, start replaces it."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        initscript.pidfile.parent.mkdir(parents=True, exist_ok=True)
        initscript.pidfile.write_text(f"{bystander.pid}\n")
        r = initscript("status")
        assert r.returncode in (1, 3), r
        r = initscript("stop")
        assert r.returncode == 0, r
        assert bystander.poll() is None, "stop signalled an unrelated process"
        r = initscript("start")
        assert r.returncode == 0, r
        pid = read_pid(initscript.pidfile)
        assert pid != bystander.pid and proc_alive(pid)
        assert bystander.poll() is None
        assert initscript("stop").returncode == 0
        assert wait_gone(pid, 10)
    finally:
        bystander.kill()
        bystander.wait(timeout=10)


def test_bad_config_is_lsb_6_with_one_line(initscript):
    initscript.conf.write_text(initscript.conf.read_text() + "\n[collectord_typo]\n")
    r = initscript("start")
    assert r.returncode == 6, r
    assert "collectord_typo" in r.stderr and "Traceback" not in r.stderr
    assert not initscript.pidfile.exists()


def test_missing_program_and_bad_action(initscript, tmp_path):
    initscript.defaults.write_text(initscript.defaults.read_text() + f"DAEMON={tmp_path}/nope\n")
    assert initscript("start").returncode == 5
    assert initscript("status").returncode == 4
    assert initscript("stop").returncode == 0
    r = initscript("frobnicate")
    assert r.returncode == 2 and "Usage" in r.stderr


def test_daemon_behind_a_shell_wrapper(initscript, tmp_path):
    """DAEMON a /bin/sh wrapper: no interpreter to match, so stop goes through `collectord stop`."""
    wrapper = tmp_path / "collectord-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m collectord "$@"\n')
    wrapper.chmod(0o755)
    initscript.defaults.write_text(initscript.defaults.read_text() + f"DAEMON={wrapper}\n")
    r = initscript("start")
    assert r.returncode == 0, r
    pid = read_pid(initscript.pidfile)
    assert initscript("status").returncode == 0
    r = initscript("stop")
    assert r.returncode == 0, r
    assert wait_gone(pid, 10)
    assert initscript("status").returncode == 3


def test_an_unusable_config_is_lsb_6_for_stop_never_not_running(initscript):
    """collectord status says 4 (unknown) for a config that is not INI: stop and reload must not
    take that for 'not running' (LSB 0 / 7), and status reports 4."""
    assert initscript("start").returncode == 0
    pid = read_pid(initscript.pidfile)
    good = initscript.conf.read_text()
    initscript.conf.write_text("this is not INI\n" + good)
    try:
        assert initscript("status").returncode == 4
        r = initscript("stop")
        assert r.returncode == 6 and "is unknown" in r.stderr, r
        assert initscript("reload").returncode == 6
        assert proc_alive(pid)
    finally:
        initscript.conf.write_text(good)
    assert initscript("stop").returncode == 0 and wait_gone(pid, 10)
