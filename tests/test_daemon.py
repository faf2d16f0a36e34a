"""start / stop as an operator runs them: real daemons, real signals, real PostgreSQL.

Each test drives `python -m collectord -c CONF ...` in a subprocess against a
temporary installation (tests/cli_targets.Env) whose collectors are the small
classes in tests/cli_targets.py, with dsn = a fresh schema of the test server
(so no embedded PostgreSQL is started). Observed from outside through /proc.
Scenario numbers refer to shared/supervisor-scenarios.md.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from collectord import pidfile
from tests.cli_targets import Env, alive, children_of, proc_status, wait_for


@pytest.fixture
def env(tmp_path, pg_dsn):
    e = Env(tmp_path, pg_dsn)
    yield e
    e.close()


def _started_pid(r) -> int:
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("collectord started (pid "), line
    return int(line.rsplit(" ", 1)[1].rstrip(")"))


def test_s1_start_returns_ready_with_locked_pidfile_and_children(env):
    t0 = time.monotonic()
    r = env.cli("start")
    elapsed = time.monotonic() - t0
    pid = _started_pid(r)
    kids = children_of(pid)  # right when start returned
    assert elapsed < 2.0, f"start took {elapsed:.2f} s"
    assert r.stderr == ""
    assert env.file_pid() == pid
    probe = pidfile.probe(str(env.pidfile))
    assert probe.holder == pid and probe.running
    assert len(kids) == 2 and all(alive(k) for k in kids)
    # A child sets its title just after the fork: give it a moment.
    want = ["collectord: sleep", "collectord: tick"]
    titles = wait_for(lambda: (lambda t: t if t == want else None)(sorted(pidfile.process_info(k).title for k in kids)), 5)
    assert titles == want, [pidfile.process_info(k).title for k in kids]
    assert pidfile.process_info(pid).title == "collectord: supervisor"
    for k in kids:
        assert pidfile.process_info(k).ppid == pid
        # S14 (the part that is ours): no child holds the PID file open.
        for fd in os.listdir(f"/proc/{k}/fd"):
            try:
                target = os.readlink(f"/proc/{k}/fd/{fd}")
            except FileNotFoundError:
                continue
            assert target != str(env.pidfile)


def test_s22_daemon_hygiene(env):
    pid = _started_pid(env.cli("start"))
    info = pidfile.process_info(pid)
    me = pidfile.process_info(os.getpid())
    # Orphaned by the double fork: adopted by init, or by a subreaper among our
    # ancestors (a test in this process may have made pytest one).
    ancestors, p = set(), os.getpid()
    while p > 1:
        ancestors.add(p)
        p = pidfile.process_info(p).ppid
    assert info.ppid == 1 or info.ppid in ancestors, info.ppid
    assert info.session != pid, "a session leader could acquire a controlling terminal"
    assert info.session != me.session and info.pgrp != me.pgrp
    assert info.tty_nr == 0
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") in ("/dev/null", str(env.logfile))
    assert proc_status(pid)["Umask"] == "0027"
    # ... yet the PID file and its directory stay readable for `status` by anyone
    assert stat.S_IMODE(env.pidfile.stat().st_mode) == 0o644
    assert stat.S_IMODE(env.pidfile.parent.stat().st_mode) == 0o755


def test_start_twice_second_refused(env):
    pid = _started_pid(env.cli("start"))
    r = env.cli("start")
    assert r.returncode == 1
    assert r.stderr.strip() == f"collectord: already running (pid {pid})"
    assert env.file_pid() == pid and pidfile.probe(str(env.pidfile)).holder == pid


def test_stop_ends_everything_and_status_says_stopped(env):
    pid = _started_pid(env.cli("start"))
    kids = children_of(pid)
    assert len(kids) == 2
    t0 = time.monotonic()
    r = env.cli("stop")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"collectord stopped (pid {pid}, ")
    assert elapsed < 5.0
    assert not env.pidfile.exists()
    assert not alive(pid)
    assert wait_for(lambda: not any(alive(k) for k in kids), 2.0)
    s = env.cli("status")
    # A stopped run's debt is still shown: the database says no feed gap is owed.
    assert s.returncode == 3 and s.stdout.splitlines() == [
        "collectord is not running", "feed gaps: none open (every trade recorded or recovered)"]
    again = env.cli("stop")
    assert again.returncode == 0 and again.stdout.strip() == "collectord is not running"


def test_s9_kill_9_supervisor_children_exit_and_next_start_works(env):
    pid = _started_pid(env.cli("start"))
    kids = children_of(pid)
    assert len(kids) == 2
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert wait_for(lambda: not any(alive(k) for k in kids), 5.0)
    gone_after = time.monotonic() - t0
    assert gone_after < 1.5, f"children outlived the supervisor by {gone_after:.2f} s"
    # The PID file is left behind, unlocked: dead but PID file left.
    assert env.file_pid() == pid
    s = env.cli("status")
    assert s.returncode == 1, s.stdout
    assert "dead" in s.stdout
    pid2 = _started_pid(env.cli("start"))
    assert pid2 != pid and env.file_pid() == pid2
    assert pidfile.probe(str(env.pidfile)).holder == pid2


def test_s10_pidfile_naming_live_unrelated_process(env):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        env.pidfile.parent.mkdir(parents=True, exist_ok=True)
        env.pidfile.write_text(f"{victim.pid}\n")
        s = env.cli("status")
        assert s.returncode == 1
        assert f"pid {victim.pid} is alive but not collectord" in s.stdout
        r = env.cli("stop")
        assert r.returncode == 0
        assert "not running" in r.stdout and "nothing signalled" in r.stdout
        time.sleep(0.1)
        assert victim.poll() is None and alive(victim.pid)
        pid = _started_pid(env.cli("start"))
        assert env.file_pid() == pid != victim.pid
        assert victim.poll() is None
        env.cli("stop")
        assert victim.poll() is None  # stopping the real daemon left it alone too
    finally:
        victim.kill()
        victim.wait()


def test_s11_unparsable_unlocked_pidfile_is_replaced(env):
    env.pidfile.parent.mkdir(parents=True, exist_ok=True)
    env.pidfile.write_bytes(b"\x00garbage\nmore\n")
    s = env.cli("status")
    assert s.returncode == 1
    pid = _started_pid(env.cli("start"))
    assert env.pidfile.read_text() == f"{pid}\n"


def test_symlinked_pidfile_refused(env, tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    env.pidfile.parent.mkdir(parents=True, exist_ok=True)
    env.pidfile.symlink_to(target)
    r = env.cli("start")
    assert r.returncode == 1
    assert r.stderr.strip() == f"collectord: PID file {env.pidfile} is a symlink; refusing to follow it"
    assert target.read_text() == "keep me\n"
    assert env.cli("status").returncode == 1
    assert env.cli("stop").returncode == 1


def test_foreign_writable_pid_dir_refused(env):
    env.pidfile.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(env.pidfile.parent, 0o777)
    r = env.cli("start")
    assert r.returncode == 1
    assert "writable by every user" in r.stderr and len(r.stderr.splitlines()) == 1


def test_bad_collector_option_is_exit_78_before_forking(env):
    env.write(collectors="[collector:picky]\ntarget = tests.cli_targets:Picky\nmode = loud\n")
    r = env.cli("start")
    assert r.returncode == 78
    assert r.stderr.strip() == (
        f"collectord: {env.conf}, [collector:picky], mode: mode must be 'ok', got 'loud'"
    )
    assert not env.pidfile.exists()


def test_root_without_user_is_refused_with_a_hint(env):
    if os.geteuid() != 0:
        pytest.skip("the root policy applies to root only")
    env.write(main="allow_root = no")
    for args in (["start"], ["start", "--foreground"]):
        r = env.cli(*args)
        assert r.returncode == 78
        assert r.stderr.strip() == (
            f"collectord: {env.conf}, [collectord], user: refusing to run collectors as root: "
            "set user = NAME (an unprivileged account) or allow_root = yes"
        )
    assert not env.pidfile.exists()


def test_daemon_dying_before_ready_reports_why(env):
    env.write(dsn="host=127.0.0.1 port=1 dbname=x user=u password=hunter2 connect_timeout=2")
    r = env.cli("start", timeout=90)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and "hunter2" not in r.stderr
    # the reason itself (the supervisor raises it) or where to read it
    assert "port 1 failed" in r.stderr or str(env.logfile) in r.stderr
    assert not env.pidfile.exists()
    assert "hunter2" not in env.log()


def test_foreground_uses_the_same_pidfile_and_stops_on_sigterm(env):
    proc = subprocess.Popen(
        [sys.executable, "-m", "collectord", "-c", str(env.conf), "start", "--foreground"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.env(), cwd=str(Path(__file__).parent.parent),
    )
    try:
        assert wait_for(lambda: pidfile.probe(str(env.pidfile)).holder == proc.pid, 15)
        assert env.file_pid() == proc.pid
        assert wait_for(lambda: len(children_of(proc.pid)) == 2, 10)
        r = env.cli("start")
        assert r.returncode == 1 and f"already running (pid {proc.pid})" in r.stderr
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "collectord: supervisor" in err and "supervisor exiting with code 0" in err  # logged to stderr
    assert not env.pidfile.exists()


# -- privilege drop, for real --------------------------------------------------------

TEST_USER = "collectord-test"


@pytest.fixture
def account():
    if os.geteuid() != 0:
        pytest.skip("switching user needs root")
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
             TEST_USER],
            check=False, capture_output=True, timeout=30,
        )
        return pwd.getpwnam(TEST_USER)


@pytest.fixture
def open_base():
    """A base directory the unprivileged account can traverse (pytest's tmp is 0700 root)."""
    base = Path(tempfile.mkdtemp(prefix="collectord-priv-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    subprocess.run(["rm", "-rf", str(base)], timeout=30)


def _uids(pid: int) -> list[int]:
    return [int(x) for x in proc_status(pid)["Uid"].split()]


def _gids(pid: int) -> list[int]:
    return [int(x) for x in proc_status(pid)["Gid"].split()]


def test_root_switches_to_user_before_forking(account, open_base, pg_dsn):
    env = Env(open_base, pg_dsn, main=f"user = {TEST_USER}")
    os.chmod(env.conf, 0o644)
    try:
        r = env.cli("start")
        pid = _started_pid(r)
        stdlib = os.path.dirname(os.__file__)
        if not os.stat("/root").st_mode & 0o001 and stdlib.startswith("/root/"):
            # This machine's interpreter is out of the account's reach: start says so.
            assert f"collectord: warning: user '{TEST_USER}' cannot read {stdlib}" in r.stderr
        kids = children_of(pid)
        assert len(kids) == 2
        for p in (pid, *kids):
            assert _uids(p) == [account.pw_uid] * 4, p
            assert _gids(p) == [account.pw_gid] * 4, p
            assert "0" not in proc_status(p)["Groups"].split()
        for d in (env.pidfile.parent, env.logfile.parent, env.data_dir, env.data_dir / "spool"):
            st = d.stat()
            assert (st.st_uid, st.st_gid) == (account.pw_uid, account.pw_gid), d
        st = env.pidfile.stat()
        assert (st.st_uid, st.st_gid) == (account.pw_uid, account.pw_gid)
        assert pidfile.probe(str(env.pidfile)).holder == pid
        # root operates the daemon that now runs as the account; anyone may ask its status
        assert env.cli("status").returncode == 0
        code, out = _run_as(pwd.getpwnam("nobody"), ["-c", str(env.conf), "status"])
        assert code == 0 and out.startswith(f"collectord is running (pid {pid}"), out
        r = env.cli("reload")
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: "reload" in env.log().lower(), 5)
        assert env.cli("stop").returncode == 0
        assert not env.pidfile.exists()  # the account could unlink it in its own directory
    finally:
        env.close()


def _run_as(account, argv: list[str]) -> tuple[int, str]:
    """collectord.cli.main(argv) in a forked child that became the account first.

    In-process because this machine's interpreter lives under /root (0700): the
    account could not exec it, but a process already running it can go on. Every
    module the command needs is imported here, before the switch.
    """
    import importlib.readers  # noqa: F401  (the migrations' resources.files() needs it)

    import collectord.cli  # noqa: F401
    import collectord.control  # noqa: F401
    import collectord.daemon  # noqa: F401
    import collectord.supervisor  # noqa: F401

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            code = collectord.cli.main(argv)
        except BaseException as err:
            os.write(2, f"{type(err).__name__}: {err}\n".encode())
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


def test_started_as_the_user_directly(account, open_base, pg_dsn):
    env = Env(open_base, pg_dsn, main=f"user = {TEST_USER}")
    os.chmod(env.conf, 0o644)
    for d in (env.pidfile.parent, env.logfile.parent, env.data_dir):
        d.mkdir(parents=True)
        os.chown(d, account.pw_uid, account.pw_gid)
    conf = ["-c", str(env.conf)]
    try:
        code, out = _run_as(account, [*conf, "start"])
        assert code == 0, out + env.log()
        pid = env.file_pid()
        assert out.strip() == f"collectord started (pid {pid})"
        assert _uids(pid) == [account.pw_uid] * 4
        kids = children_of(pid)
        assert len(kids) == 2 and all(_uids(k) == [account.pw_uid] * 4 for k in kids)
        assert _run_as(account, [*conf, "status"])[0] == 0
        code, out = _run_as(account, [*conf, "stop"])
        assert code == 0, out
        assert not env.pidfile.exists()
        # The account cannot be asked to be someone else.
        env.write(main="user = root\nallow_root = yes")
        os.chmod(env.conf, 0o644)  # the account must read it (no password in this one)
        code, out = _run_as(account, [*conf, "start"])
        assert code == 1
        assert "configured to run as user 'root' but started as uid" in out
    finally:
        env.close()


def test_unknown_user_is_a_config_error(env):
    if os.geteuid() != 0:
        pytest.skip("root only")
    env.write(main="user = no-such-user-here")
    r = env.cli("start")
    assert r.returncode == 78
    assert r.stderr.startswith(f"collectord: {env.conf}, [collectord], user: no such user 'no-such-user-here'")


def test_two_concurrent_starts_one_wins(env):
    procs = [
        subprocess.Popen([sys.executable, "-m", "collectord", "-c", str(env.conf), "start"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env.env())
        for _ in range(2)
    ]
    results = sorted((p.wait(timeout=60), *p.communicate(timeout=60)) for p in procs)
    (ok, out, _), (lost, _, err) = results
    assert (ok, lost) == (0, 1), results
    winner = int(out.strip().rsplit(" ", 1)[1].rstrip(")"))
    assert err.strip() == f"collectord: already running (pid {winner})"
    assert env.file_pid() == winner and pidfile.probe(str(env.pidfile)).holder == winner
    assert len(children_of(winner)) == 2


def test_another_user_cannot_stop_it_and_gets_one_line(account, open_base, pg_dsn):
    env = Env(open_base, pg_dsn)  # runs as root (allow_root)
    os.chmod(env.conf, 0o644)
    try:
        pid = _started_pid(env.cli("start"))
        code, out = _run_as(pwd.getpwnam("nobody"), ["-c", str(env.conf), "stop"])
        assert code == 1
        assert out == f"collectord: not permitted to signal pid {pid} (run this as root or as the daemon's user)\n"
        assert alive(pid) and pidfile.probe(str(env.pidfile)).holder == pid
    finally:
        env.close()


def test_existing_directory_the_user_cannot_write_is_named(account, open_base, pg_dsn):
    env = Env(open_base, pg_dsn, main=f"user = {TEST_USER}")
    env.data_dir.mkdir(mode=0o755)  # root's, left by an earlier root run: never chowned behind one's back
    env.logfile.parent.mkdir(mode=0o755)
    env.logfile.write_text("old root line\n")
    os.chown(env.logfile.parent, account.pw_uid, account.pw_gid)
    try:
        r = env.cli("start")
        assert r.returncode == 1
        assert r.stderr.strip() == (
            f"collectord: directory {env.data_dir} is not writable by user '{TEST_USER}' "
            f"(chown {TEST_USER} {env.data_dir})"
        )
        assert env.data_dir.stat().st_uid == 0 and not env.pidfile.exists()
        os.chown(env.data_dir, account.pw_uid, account.pw_gid)
        pid = _started_pid(env.cli("start"))
        # the log file a root run left behind is handed over, so the account can append and reopen it
        assert env.logfile.stat().st_uid == account.pw_uid
        assert env.logfile.read_text().startswith("old root line\n")
        assert wait_for(lambda: "supervisor pid" in env.log(), 5)
        assert _uids(pid)[0] == account.pw_uid
    finally:
        env.close()
