"""PID file: POSIX lock held by a real process, probed from another one.

A POSIX lock is dropped when its holder closes ANY fd of the file, so the lock
is always taken in a forked helper process and probed from the test process.
"""

from __future__ import annotations

import os
import signal
import stat
import time

import pytest

from collectord import pidfile
from collectord.errors import AlreadyRunning, PidFileError


def _wait(pred, timeout=5.0, every=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    return pred()


class Holder:
    """A forked process that acquires the PID file, writes its pid and waits.

    title: process title to set (e.g. 'collectord: supervisor').
    grandchild: fork a process that inherits the locked fd and outlives us.
    """

    def __init__(self, path, *, title=None, grandchild=False):
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 0
            try:
                os.close(r)
                os.close(go_w)
                if title:
                    import setproctitle

                    setproctitle.setproctitle(title)
                pf = pidfile.PidFile(path)
                try:
                    pf.acquire()
                except AlreadyRunning as err:
                    os.write(w, f"busy {err}\n".encode())
                    os._exit(3)
                pf.write()
                extra = ""
                if grandchild:
                    gc = os.fork()
                    if gc == 0:
                        os.set_inheritable(pf.fd, True)
                        time.sleep(30)
                        os._exit(0)
                    extra = f" {gc}"
                os.write(w, f"ok{extra}\n".encode())
                os.read(go_r, 1)  # until the test says go (or dies)
                pf.remove()
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        os.close(go_r)
        self._go = go_w
        self.reply = os.read(r, 200).decode().strip()
        os.close(r)
        self.grandchild = int(self.reply.split()[1]) if self.reply.startswith("ok ") else None

    def release(self):
        os.write(self._go, b"x")
        _, status = os.waitpid(self.pid, 0)
        os.close(self._go)
        return os.waitstatus_to_exitcode(status)

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self._go)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "run" / "collectord.pid")


def test_acquire_creates_dir_writes_pid_and_locks(path):
    h = Holder(path, title="collectord: supervisor")
    try:
        assert h.reply == "ok"
        with open(path) as fh:
            assert fh.read() == f"{h.pid}\n"
        p = pidfile.probe(path)
        assert p.exists and p.holder == h.pid and p.file_pid == h.pid
        assert p.running and p.pid == h.pid
        assert p.process.title.startswith("collectord: supervisor")
    finally:
        assert h.release() == 0
    assert not os.path.exists(path)  # removed while locked, then released
    assert pidfile.probe(path) == pidfile.Probe(path, False, None, None, None)


def test_second_acquire_is_refused_with_the_holders_pid(path):
    h = Holder(path, title="collectord: supervisor")
    try:
        second = Holder(path)
        assert second.reply == f"busy already running (pid {h.pid})"
        second.kill()
        with open(path) as fh:
            assert fh.read() == f"{h.pid}\n"  # the loser did not touch the file
    finally:
        h.release()


def test_kill_9_releases_lock_and_next_acquire_rewrites(path):
    h = Holder(path, title="collectord: supervisor")
    h.kill()
    p = pidfile.probe(path)
    assert p.exists and p.holder is None and p.file_pid == h.pid and not p.running
    assert "dead" in p.stale_reason()
    h2 = Holder(path)
    try:
        assert h2.reply == "ok"
        with open(path) as fh:
            assert fh.read() == f"{h2.pid}\n"
    finally:
        h2.release()


def test_lock_is_not_kept_by_a_forked_child_holding_the_fd(path):
    """lockf, not flock: the holder's surviving child (same open file) holds nothing."""
    h = Holder(path, title="collectord: supervisor", grandchild=True)
    gc = h.grandchild
    try:
        assert gc and pidfile.process_info(gc) is not None
        h.kill()
        p = pidfile.probe(path)
        assert p.holder is None and not p.running
        assert pidfile.process_info(gc) is not None  # still alive, fd still open
    finally:
        os.kill(gc, signal.SIGKILL)


def test_write_keeps_the_locked_inode(tmp_path):
    """The pid is written into the locked file, not renamed over it."""
    path = str(tmp_path / "c.pid")
    with open(path, "w") as fh:
        fh.write("garbage that is longer than a pid\n")
    ino = os.stat(path).st_ino
    h = Holder(path, title="collectord: supervisor")
    try:
        assert os.stat(path).st_ino == ino
        with open(path) as fh:
            assert fh.read() == f"{h.pid}\n"
        assert pidfile.probe(path).holder == h.pid
    finally:
        h.release()


def test_remove_leaves_a_replaced_file_alone(tmp_path):
    path = str(tmp_path / "c.pid")
    pf = pidfile.PidFile(path)
    pf.acquire()
    pf.write()
    os.unlink(path)
    with open(path, "w") as fh:
        fh.write("99999\n")
    pf.remove()
    assert open(path).read() == "99999\n"
    assert pf.fd == -1


def test_symlink_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "c.pid"
    link.symlink_to(target)
    with pytest.raises(PidFileError, match="symlink"):
        pidfile.PidFile(str(link)).acquire()
    with pytest.raises(PidFileError, match="symlink"):
        pidfile.probe(str(link))
    assert target.read_text() == ""


def test_world_writable_dir_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(PidFileError, match="writable by every user"):
        pidfile.PidFile(str(d / "c.pid")).acquire()
    os.chmod(d, 0o1777)  # sticky like /tmp: others cannot replace our file
    pf = pidfile.PidFile(str(d / "c.pid"))
    pf.acquire()
    pf.remove()


def test_file_writable_by_others_or_foreign_owner_is_refused(tmp_path):
    path = tmp_path / "c.pid"
    path.write_text("1\n")
    os.chmod(path, 0o666)
    with pytest.raises(PidFileError, match="writable by other users"):
        pidfile.PidFile(str(path)).acquire()
    os.chmod(path, 0o644)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        with pytest.raises(PidFileError, match="belongs to uid 65534"):
            pidfile.PidFile(str(path)).acquire()
        other = tmp_path / "theirs"
        other.mkdir()
        os.chown(other, 65534, 65534)
        with pytest.raises(PidFileError, match="belongs to uid 65534"):
            pidfile.PidFile(str(other / "c.pid")).acquire()
        # ... unless that uid is the account the daemon switches to
        pf = pidfile.PidFile(str(path), trusted_uids={65534}, trusted_gids={65534})
        pf.acquire()
        pf.remove()


def test_directory_or_hardlink_in_place_of_file_is_refused(tmp_path):
    (tmp_path / "d.pid").mkdir()
    with pytest.raises(PidFileError):
        pidfile.PidFile(str(tmp_path / "d.pid")).acquire()
    (tmp_path / "orig").write_text("")
    os.link(tmp_path / "orig", tmp_path / "h.pid")
    with pytest.raises(PidFileError, match="hard links"):
        pidfile.PidFile(str(tmp_path / "h.pid")).acquire()


def test_live_unrelated_pid_in_unlocked_file_is_stale(tmp_path):
    path = str(tmp_path / "c.pid")
    with open(path, "w") as fh:
        fh.write(f"{os.getpid()}\n")  # this pytest process: alive, not collectord
    p = pidfile.probe(path)
    assert p.exists and p.file_pid == os.getpid() and p.holder is None and not p.running
    assert "not collectord" in p.stale_reason()


def test_lock_held_by_a_process_that_is_not_collectord_is_not_running(path):
    h = Holder(path)  # a forked pytest: its command line is not collectord's
    try:
        p = pidfile.probe(path)
        assert p.holder == h.pid and not p.running and p.pid is None
        assert "not collectord" in p.stale_reason()
    finally:
        h.release()


def test_unparsable_file_is_stale(tmp_path):
    path = str(tmp_path / "c.pid")
    with open(path, "wb") as fh:
        fh.write(b"\x00\xffnot a pid")
    p = pidfile.probe(path)
    assert p.file_pid is None and not p.running
    assert "no valid pid" in p.stale_reason()


@pytest.mark.parametrize(
    "text,pid",
    [("123\n", 123), (" 42 ", 42), ("7\nextra", 7), ("", None), ("-5", None), ("0", None), ("12ab", None),
     ("99999999999", None), (b"\xff\xfe", None)],
)
def test_parse_pid(text, pid):
    assert pidfile.parse_pid(text) == pid


@pytest.mark.parametrize(
    "argv,ours",
    [
        (("collectord: supervisor",), True),
        (("collectord: trades.0",), True),
        (("/usr/bin/python3", "/usr/local/bin/collectord", "start"), True),
        (("/work/.venv/bin/python", "-m", "collectord", "-c", "x.conf", "start"), True),
        (("python", "-m", "collectord.cli", "start"), True),
        (("vi", "/etc/collectord/collectord.conf"), False),
        (("sleep", "100"), False),
        (("python", "-m", "pytest", "tests/collectord"), False),
        ((), False),
    ],
)
def test_is_collectord(argv, ours):
    info = pidfile.ProcessInfo(pid=1, state="S", ppid=0, pgrp=1, session=1, tty_nr=0, start_ticks=1, argv=argv)
    assert info.is_collectord is ours


def test_process_info_reads_proc():
    me = pidfile.process_info(os.getpid())
    assert me.pid == os.getpid() and me.ppid == os.getppid() and me.start_ticks > 0
    assert me.state in "RS"
    assert pidfile.process_info(2**22 + 1) is None
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    z = _wait(lambda: (lambda i: i if i and i.zombie else None)(pidfile.process_info(pid)))
    assert z and z.zombie and not pidfile.same_process(me, z)
    os.waitpid(pid, 0)
