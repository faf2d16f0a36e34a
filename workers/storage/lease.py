"""Lease: which of several collectord instances runs a polling collector (active/standby).

Two hosts (or two instances on one) may run the same polling collectors against one
database; only one of them may poll, or every snapshot is stored twice. The lease is
a PostgreSQL session-level advisory lock held on a connection of its own: the server
frees it when that session ends, whether its process stopped, crashed, was killed
with kill -9 or its host lost power (see the keepalive settings below). No table, no
coordinator: whoever holds the lock polls, the others stand by and retry.

The key: hashtextextended('collectord.lease:' || current_schema() || ':' || name, 0),
so two deployments in different schemas of one database never share a lease, and
each collector (markets, prices, orderbooks, resolutions) has its own. Advisory locks
are per database already.

poll() is called often from the collector's loop (at every checkpoint); it returns
whether this process may poll now and does at most one round trip, in order:
  1. active and the lease connection is readable (the server terminated it, or said
     something) or its last check is `check` s old: a `SELECT 1` on it. An answer
     -> still active. A connection error -> the lease is lost: go to 3 at once.
  2. standby, and `retry` s passed since the last attempt: go to 3.
  3. (re)connect and pg_try_advisory_lock(key). Got it -> active. Held by another
     session -> standby. The database cannot be reached:
       - we were active until this moment ("in doubt"): stay active, so the collector
         keeps polling into its spool as it did before leases (nobody else can take
         the lock while the database is down); retried every `doubt_retry` s, and the
         first answer decides (the lock again, or standby if another instance took it);
       - we were standby, or never held it: stay standby. An instance never starts
         polling because it cannot reach the database. After the database is back it
         waits `grace` s before its first attempt, so the instance that was active
         (and retries every `doubt_retry` s) takes the lock again first.

Bounds (with the defaults: check 2 s, timeout 3 s, retry 3 s):
  - a holder killed with kill -9 or stopped: its socket closes, the server frees the
    lock at once; a standby takes it at its next attempt, <= `retry` s later.
  - a holder whose host vanished (power, network): the session sets the server's
    tcp_keepalives_idle/interval/count to 5/2/3 and tcp_user_timeout to 10 s, so the
    server ends it 10-11 s after the host's last packet; a standby takes it <= `retry`
    s after that (~15 s; the design target is 30 s).
  - no two holders polling at once: a holder round-trips at least every `check` s
    while polling and gives up when an answer takes more than `timeout` s, so it
    stops (at its next checkpoint) within check + timeout = 5 s of losing its
    connection, before the server (10 s at the soonest) can grant the lock to anyone
    else. The one exception is documented above: a holder that cannot reach the
    database at all keeps polling into its spool; if only it was cut off (a network
    partition, not a database outage) a standby that still reaches the database
    takes over after ~10 s and both poll until the cut-off host reconnects and steps
    down. Snapshots of that overlap land twice (at different instants).

Every blocking call is bounded: connect_timeout, statement_timeout and the client's
own TCP keepalives/tcp_user_timeout on the lease connection (db.connect).
Construct before the fork (values only); the connection opens in the child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from typing import Callable

import psycopg2

from .db import _inherited, connect

log = logging.getLogger(__name__)

# The server-side settings of the lease session (user-settable GUCs): how soon the
# server notices that a holder's host is gone and frees its lock. Ignored on unix sockets.
SERVER_SETTINGS = (("tcp_keepalives_idle", "5"), ("tcp_keepalives_interval", "2"),
                   ("tcp_keepalives_count", "3"), ("tcp_user_timeout", "10000"))
# The client side: a dead server (or path to it) fails a check within `timeout`.
CLIENT_SETTINGS = {"keepalives": "1", "keepalives_idle": "2", "keepalives_interval": "1", "keepalives_count": "2"}

ACTIVE, STANDBY = "active", "standby"


def lease_key_sql() -> str:
    """The SQL expression of the lock key for a collector name passed as %s."""
    # COALESCE: a search_path naming no existing schema has no current_schema(); a NULL
    # key would make pg_try_advisory_lock answer NULL (never ours) instead of locking.
    return "hashtextextended('collectord.lease:' || COALESCE(current_schema(), '') || ':' || %s, 0)"


class Lease:
    """Session-level advisory lock on a connection of its own: active or standby. See the module docstring."""

    def __init__(self, dsn: str, name: str, *, retry: float = 3.0, check: float = 2.0, timeout: float = 3.0,
                 doubt_retry: float = 1.0, grace: float | None = None, instance: str = "",
                 clock: Callable[[], float] = time.monotonic):
        self.dsn = dsn
        self.name = name
        self.retry = max(0.1, float(retry))
        self.check = max(0.1, float(check))
        self.timeout = max(1.0, float(timeout))
        self.doubt_retry = max(0.1, float(doubt_retry))
        self.grace = 2 * self.retry if grace is None else max(0.0, float(grace))
        self.instance = instance or socket.gethostname()
        self.clock = clock
        self.held = False
        self.in_doubt = False  # active without an answer from the database (see the module docstring)
        self.holder: str | None = None  # who holds it, as the database names them (standby only)
        self.acquired = 0  # times this process took the lock
        self.lost = 0  # times this process lost it (connection gone, or taken by another while in doubt)
        self.since = clock()  # when the current role began
        self._conn = None
        self._pid = 0
        self._last_ok = float("-inf")  # last round trip that answered
        self._next_try = clock()  # standby / in doubt: the next attempt
        self._unreachable = False  # the last attempt could not reach the database

    @property
    def reachable(self) -> bool:
        """The last attempt reached the database (a standby that answers is healthy)."""
        return not self._unreachable

    @property
    def role(self) -> str:
        return ACTIVE if self.held else STANDBY

    # -- the one entry point ----------------------------------------------------------
    def poll(self) -> bool:
        """True while this process may poll (see the module docstring, steps 1-3)."""
        now = self.clock()
        if self.held and not self.in_doubt:
            if self._readable() or now - self._last_ok >= self.check:
                if self._ping():
                    return True
                log.warning("%s: lease connection lost; taking the lock again", self.name)
                self._attempt(was_holder=True)  # held until a moment ago: try again at once
            return self.held
        if now >= self._next_try:
            self._attempt(was_holder=self.held)
        return self.held

    def close(self) -> None:
        """End the session (frees the lock if held): the next instance takes over at its next attempt."""
        self._drop()
        if self.held:  # given up on purpose: not counted as lost
            self.held = False
            self.since = self.clock()
            log.info("%s: lease released", self.name)
        self.in_doubt = False

    def status(self) -> dict:
        """Counters for the collector's status: role, how long, who holds it when we do not."""
        out = {"role": self.role, "lease_active": 1 if self.held else 0,
               "lease_role_seconds": round(self.clock() - self.since, 1),
               "lease_acquired": self.acquired, "lease_lost": self.lost}
        if self.in_doubt:
            out["lease_in_doubt"] = 1
        if not self.held and self.holder:
            out["lease_holder"] = self.holder
        return out

    # -- steps -------------------------------------------------------------------------
    def _attempt(self, was_holder: bool) -> None:
        """Connect if need be, then pg_try_advisory_lock; decide the role (step 3)."""
        now = self.clock()
        try:
            conn = self._fresh()
            if self._unreachable and not was_holder:
                # The database is back after an outage: give the instance that was
                # active the first attempt (it retries every doubt_retry s).
                self._unreachable = False
                self._next_try = now + self.grace
                return
            with conn.cursor() as cur:
                cur.execute(f"SELECT pg_try_advisory_lock({lease_key_sql()})", (self.name,))
                got = bool(cur.fetchone()[0])
                holder = None if got else self._holder(cur)
        except psycopg2.Error as err:
            self._drop()
            if not self._unreachable:
                log.warning("%s: lease: database unreachable (%s); %s", self.name, type(err).__name__,
                            "polling on into the spool until it answers" if was_holder and self.held
                            else "standing by until it answers")
            self._unreachable = True
            self.in_doubt = was_holder and self.held
            self._next_try = now + (self.doubt_retry if self.in_doubt else self.retry)
            return
        self._unreachable = False
        self._last_ok = self.clock()
        self.holder = holder
        self.in_doubt = False
        if got:
            if not self.held:
                self.acquired += 1
            self._set(True, "lock acquired")
        else:
            self._set(False, f"held by {holder or 'another session'}")
            self._next_try = now + self.retry

    def _holder(self, cur) -> str | None:
        """application_name and client of the session holding the lock (best effort)."""
        try:
            cur.execute(
                "SELECT a.application_name, host(a.client_addr), a.pid FROM pg_locks l"
                " JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
                " AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                f" AND ((l.classid::bigint << 32) | l.objid::bigint) = {lease_key_sql()} LIMIT 1",
                (self.name,))
            row = cur.fetchone()
        except psycopg2.Error:
            return None
        if row is None:
            return None
        app, addr, pid = row
        return f"{app or '?'} (pid {pid}{', ' + addr if addr else ''})"

    def _ping(self) -> bool:
        """One round trip on the lease connection; False when it is gone."""
        conn = self._conn
        if conn is None or conn.closed:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchone()
        except psycopg2.Error:
            self._drop()
            return False
        self._last_ok = self.clock()
        return True

    def _readable(self) -> bool:
        """The server sent something unasked (an error before it closes us, or EOF)."""
        conn = self._conn
        if conn is None or conn.closed:
            return True
        try:
            ready, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError, psycopg2.Error):
            return True
        return bool(ready)

    def _set(self, held: bool, why: str) -> None:
        if held != self.held:
            if not held:
                self.lost += 1
            log.info("%s: %s (%s)", self.name, ACTIVE if held else STANDBY, why)
            self.since = self.clock()
        self.held = held

    # -- the connection ----------------------------------------------------------------
    def _fresh(self):
        """The lease connection, checked: one kept since the last attempt may have been ended by
        the server meanwhile (a terminated backend, a restart), which says nothing about whether
        the database answers now, so such a connection is replaced once before anything is decided."""
        conn = self._conn
        if conn is not None and not conn.closed and self._pid == os.getpid():
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                return conn
            except psycopg2.Error:
                self._drop()
        return self._connection()

    def _connection(self):
        """The lease connection, opened in this process: autocommit, short timeouts, server keepalives."""
        conn = self._conn
        if conn is not None and self._pid != os.getpid():
            _inherited.append(conn)  # never close a parent's socket from the child
            conn = self._conn = None
        if conn is not None and not conn.closed:
            return conn
        dsn = self.dsn
        params = psycopg2.extensions.parse_dsn(dsn or "")
        for key, value in CLIENT_SETTINGS.items():
            params.setdefault(key, value)
        params.setdefault("tcp_user_timeout", str(int(self.timeout * 1000)))
        conn = connect(psycopg2.extensions.make_dsn(**params),
                       application_name=f"collectord:{self.name} lease {self.instance}",
                       statement_timeout=self.timeout, connect_timeout=int(self.timeout))
        conn.autocommit = True
        with conn.cursor() as cur:
            for key, value in SERVER_SETTINGS:
                try:
                    cur.execute("SELECT set_config(%s, %s, false)", (key, value))
                except psycopg2.Error:  # an older server without tcp_user_timeout: keepalives still apply
                    pass
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()
