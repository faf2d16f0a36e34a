"""Who the collectors run as: the root policy, the directories, the switch of user.

The rule (what an operator gets):
  * `user = NAME` set and started as root: the directories (PID, log, data,
    spool) are created owned by NAME, the PID file is opened and locked as root,
    then the process switches to NAME (initgroups, setgid, setuid) before the
    supervisor forks any collector. `group =` overrides NAME's primary group.
  * `user = NAME` set and started as NAME itself: runs as is (no switch needed).
    Started as any other non-root user: refused (it cannot become NAME).
  * `user` unset and started as root: refused with a one-line hint unless
    `allow_root = yes`. Refused the same way in the foreground: a systemd unit
    running `start --foreground` as root is exactly the case the rule is for,
    so the one switch that accepts the risk is in the config file, where it is
    visible and reviewed. (`collectord demo` builds its own config under its own
    directory and sets allow_root there.)
  * `user` unset and not root: runs as the invoking user.
  * `user` naming root (uid 0) counts as root: it needs `allow_root = yes` too.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from collectord.config import Config
from collectord.errors import ConfigError, StartError


@dataclass(frozen=True)
class Identity:
    """The account collectors run as; switch=True when this process must become it."""

    name: str
    uid: int
    gid: int
    home: str
    switch: bool

    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) to chown what root creates for it, or None when nothing changes hands."""
        return (self.uid, self.gid) if self.switch else None


def plan(config: Config, *, euid: int | None = None, egid: int | None = None) -> Identity:
    """Decide who the collectors run as (no side effect). Raises ConfigError / StartError."""
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    path = config.path or "<built-in defaults>"

    def err(key, message):
        return ConfigError(message, path=path, section="collectord", key=key)

    if not config.user:
        if config.group:
            raise err("group", "group is only used together with user = NAME")
        if euid == 0 and not config.allow_root:
            raise err(
                "user",
                "refusing to run collectors as root: set user = NAME (an unprivileged account) "
                "or allow_root = yes",
            )
        try:
            me = pwd.getpwuid(euid)
            name, home = me.pw_name, me.pw_dir
        except KeyError:
            name, home = str(euid), os.environ.get("HOME", "/")
        return Identity(name, euid, egid, home, switch=False)

    try:
        account = pwd.getpwnam(config.user)
    except KeyError:
        raise err("user", f"no such user {config.user!r} (create it, e.g. useradd --system {config.user})") from None
    gid = account.pw_gid
    if config.group:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError:
            raise err("group", f"no such group {config.group!r}") from None
    if account.pw_uid == 0 and not config.allow_root:
        raise err("user", f"user {config.user!r} is root: refusing unless allow_root = yes")

    if euid == 0:
        return Identity(account.pw_name, account.pw_uid, gid, account.pw_dir, switch=account.pw_uid != 0 or gid != egid)
    if euid != account.pw_uid:
        raise StartError(
            f"configured to run as user {config.user!r} but started as uid {euid}: "
            f"start it as root (it switches user) or as {config.user!r}"
        )
    if gid != egid and gid not in os.getgroups():
        raise StartError(f"configured group {config.group!r} but this process is not in it")
    return Identity(account.pw_name, account.pw_uid, gid, account.pw_dir, switch=False)


def _writable_by(st: os.stat_result, ident: Identity, groups: set[int]) -> bool:
    if ident.uid == 0:
        return True
    if st.st_uid == ident.uid:
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


def directories(config: Config) -> list[str]:
    """The directories the daemon writes to: PID file's, log file's, data, spool."""
    dirs = [str(Path(config.pidfile).parent)]
    if config.logfile and config.logfile != "-":
        dirs.append(str(Path(config.logfile).parent))
    dirs += [config.data_dir, config.spool_dir]
    out: list[str] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def prepare(config: Config, ident: Identity) -> None:
    """Create the daemon's directories; as root for another user, owned by that user.

    A directory that already exists is never chowned (it may be shared, like /run
    or /var/log): it must already be writable by the account, else a one-line
    error says which and how to fix it. An existing log file left by a root run is
    handed over, so that the account can reopen it after logrotate.
    """
    groups = {ident.gid}
    if ident.switch:
        try:
            groups.update(os.getgrouplist(ident.name, ident.gid))
        except OSError:
            pass
    for d in directories(config):
        path = Path(d)
        if not path.exists():
            missing = []
            p = path
            while not p.exists():
                missing.append(p)
                p = p.parent
            try:
                os.makedirs(path, 0o755, exist_ok=True)
            except OSError as err:
                raise StartError(f"cannot create directory {path}: {err.strerror}") from None
            # The PID file's directory stays world-readable so `status` works for any
            # user (monitoring); the others keep the daemon's umask (027).
            if d == directories(config)[0]:
                os.chmod(path, 0o755)
            if ident.owner is not None:
                # Only the directory itself (and parents we had to create for it) change hands.
                for created in missing:
                    os.chown(created, *ident.owner)
            continue
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise StartError(f"{path} is not a directory")
        if not _writable_by(st, ident, groups):
            raise StartError(f"directory {path} is not writable by user {ident.name!r} (chown {ident.name} {path})")
    if ident.owner is not None and config.logfile and config.logfile != "-":
        try:
            st = os.lstat(config.logfile)
        except FileNotFoundError:
            return
        if stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_nlink == 1:
            os.chown(config.logfile, *ident.owner, follow_symlinks=False)


def _can_enter(path: str, ident: Identity, groups: set[int], *, read: bool) -> bool:
    """Whether ident could reach path (x on every ancestor; r+x on path when read)."""
    parts = Path(path).resolve().parts
    current = Path(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        current = current / part
        try:
            st = os.stat(current)
        except OSError:
            return False
        need = stat.S_IXUSR | (stat.S_IRUSR if read and i == len(parts) - 1 else 0)
        if st.st_uid == ident.uid:
            bits = st.st_mode & 0o700
        elif st.st_gid in groups:
            bits = (st.st_mode & 0o070) << 3
        else:
            bits = (st.st_mode & 0o007) << 6
        if bits & need != need:
            return False
    return True


def runtime_warning(ident: Identity) -> str | None:
    """A one-line warning when the account cannot read the Python installation.

    The running interpreter goes on after the switch, but any module first
    imported later (by a collector, in a child) would fail with a puzzling
    ImportError. Checked before the switch, from the permission bits.
    """
    if not ident.switch or ident.uid == 0:
        return None
    groups = {ident.gid}
    try:
        groups.update(os.getgrouplist(ident.name, ident.gid))
    except OSError:
        pass
    stdlib = os.path.dirname(os.__file__)
    for path in (stdlib, str(Path(__file__).resolve().parent)):
        if not _can_enter(path, ident, groups, read=True):
            return (
                f"user {ident.name!r} cannot read {path}: modules imported after the switch will fail; "
                "install Python and collectord where that user can read them"
            )
    return None


def drop(ident: Identity) -> None:
    """Become the account for good: supplementary groups, gid, then uid (that order).

    Verified afterwards: if the uid could still be set back to 0, the switch did
    not take and the daemon refuses to go on.
    """
    if not ident.switch:
        return
    try:
        os.initgroups(ident.name, ident.gid)
        os.setgid(ident.gid)
        os.setuid(ident.uid)
    except OSError as err:
        raise StartError(f"cannot switch to user {ident.name!r}: {err.strerror}") from None
    if ident.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise StartError(f"switching to user {ident.name!r} did not drop root; refusing to run")
    os.environ.update(HOME=ident.home, USER=ident.name, LOGNAME=ident.name)
