"""Connections to PostgreSQL: the one place that opens them.

Every connection is opened in the process that uses it (after the fork), with a
connect timeout, a server-side statement timeout and TCP keepalives, so no call
into the database can block a collector forever. `Database` owns one lazily
opened connection for the few non-batch queries collectors need
(followed set, feed gaps, ...); batch writes go through `Writer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any, Callable, Iterator, Sequence, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT = 5  # seconds; libpq's own timeout for the TCP/unix connect + startup
STATEMENT_TIMEOUT = 30.0  # seconds; the server cancels any statement running longer
# Dead-peer detection for TCP connections (ignored on unix sockets): probe after
# 10 s idle, every 5 s, give up after 3 misses; unacknowledged sends fail after 20 s.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
TCP_USER_TIMEOUT_MS = 20000

# Connections found open in a process other than the one that opened them. They
# are parked here and never closed: closing would send a Terminate message on a
# socket the parent still uses, and letting them be garbage collected does the same.
_inherited: list[Any] = []


class DsnSyntaxError(psycopg2.ProgrammingError):
    """The DSN does not parse. The message never quotes the DSN: libpq's own does
    (`missing "=" after "<word>"`), and that word can be part of a password."""


# libpq's connection keywords: the only words of a broken DSN a message may name.
_KEYWORDS = frozenset(
    "host hostaddr port dbname user password passfile channel_binding connect_timeout client_encoding options "
    "application_name fallback_application_name keepalives keepalives_idle keepalives_interval keepalives_count "
    "tcp_user_timeout replication gssencmode sslmode requiressl sslcompression sslcert sslkey sslpassword "
    "sslrootcert sslcrl sslcrldir sslsni requirepeer ssl_min_protocol_version ssl_max_protocol_version krbsrvname "
    "gsslib service target_session_attrs load_balance_hosts".split()
)


def parse_dsn(dsn: str) -> dict[str, str]:
    """The DSN's parameters (URI or key=value form); DsnSyntaxError if it does not parse."""
    try:
        return psycopg2.extensions.parse_dsn(dsn or "")
    except psycopg2.ProgrammingError:
        pass
    text = dsn or ""
    if "://" in text.split("?")[0]:
        hint = "a postgresql:// URI; percent-encode special characters in the user name and password"
    else:
        keys = [k for k in dict.fromkeys(re.findall(r"([A-Za-z_]+)\s*=", text)) if k in _KEYWORDS]
        hint = "key=value pairs; single-quote a value that holds spaces or quotes"
        if keys:
            hint += f"; keys seen: {', '.join(keys)}"
    raise DsnSyntaxError(f"invalid dsn syntax ({hint})") from None


def connect(
    dsn: str,
    *,
    application_name: str | None = None,
    statement_timeout: float | None = STATEMENT_TIMEOUT,
    connect_timeout: int = CONNECT_TIMEOUT,
) -> psycopg2.extensions.connection:
    """Open a connection to dsn (URI or key=value form).

    In order: parse the DSN (DsnSyntaxError, which never quotes it, when
    it does not parse), add connect_timeout, keepalives and
    tcp_user_timeout unless the DSN sets them, append `-c statement_timeout=...`
    to the DSN's own `options` (which may carry a search_path), connect.
    statement_timeout None or 0 leaves the server's setting alone.
    """
    params = parse_dsn(dsn)
    params.setdefault("connect_timeout", str(max(1, int(connect_timeout))))
    for key, value in KEEPALIVES.items():
        params.setdefault(key, str(value))
    params.setdefault("tcp_user_timeout", str(TCP_USER_TIMEOUT_MS))
    if application_name:
        params.setdefault("application_name", application_name[:63])
    if statement_timeout:
        extra = f"-c statement_timeout={int(statement_timeout * 1000)}"
        params["options"] = f"{params['options']} {extra}" if params.get("options") else extra
    return psycopg2.connect(**params)


# Rejected by the database for what the rows hold, not for being unreachable:
# class 22 data exception, class 23 integrity violation, text that cannot be encoded.
DATA_ERRORS = (psycopg2.DataError, psycopg2.IntegrityError, UnicodeError)


def is_data_error(err: BaseException) -> bool:
    """True when the database rejected the rows themselves (bad value, constraint)."""
    return isinstance(err, DATA_ERRORS)


def is_connection_error(err: BaseException) -> bool:
    """True when err means "the database is not reachable / not usable now".

    Those are retried later (spooled), never blamed on the data: lost or
    refused connections, admin shutdown, read-only standby, statement
    timeout, a missing table (not migrated yet), socket errors.
    """
    if isinstance(err, DATA_ERRORS):
        return False
    return isinstance(err, (psycopg2.Error, OSError))


class Database:
    """One connection, opened lazily after the fork, reconnected when dropped.

    Usage (in other storage modules such as followed.py or gaps.py):

        db = Database(dsn, application_name="collectord:markets")   # before or after fork
        rows = db.query("SELECT token_id FROM followed_tokens")       # after fork
        db.execute("UPDATE feed_gaps SET ... WHERE id = %s", (gap_id,))
        with db.cursor() as cur:                                      # one transaction
            cur.execute(...); cur.execute(...)
        db.run(lambda cur: ...)                                       # retried once on a dropped connection

    query/execute/run are retried once on a fresh connection when the
    connection was lost before the transaction committed (safe: nothing was
    committed). cursor() cannot re-run your block: it drops the broken
    connection and re-raises, and the next call reconnects.
    Not thread-safe: one Database per thread.
    """

    def __init__(
        self,
        dsn: str,
        *,
        application_name: str | None = None,
        statement_timeout: float | None = STATEMENT_TIMEOUT,
        connect_timeout: int = CONNECT_TIMEOUT,
    ):
        self.dsn = dsn
        self.application_name = application_name
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self._conn: psycopg2.extensions.connection | None = None
        self._pid = 0

    # -- connection ---------------------------------------------------------
    def connection(self) -> psycopg2.extensions.connection:
        """The live connection, opening a new one if there is none, it was
        closed, or it was opened in another process (inherited through a fork)."""
        conn = self._conn
        if conn is not None and self._pid != os.getpid():
            _inherited.append(conn)  # never close a parent's socket from the child
            conn = self._conn = None
        if conn is None or conn.closed:
            conn = self._conn = connect(
                self.dsn,
                application_name=self.application_name,
                statement_timeout=self.statement_timeout,
                connect_timeout=self.connect_timeout,
            )
            self._pid = os.getpid()
        return conn

    def close(self) -> None:
        """Close the connection (only if this process opened it)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._pid != os.getpid():
            _inherited.append(conn)
            return
        with contextlib.suppress(Exception):
            conn.close()

    def _drop(self) -> None:
        """Forget a broken connection so the next call reconnects."""
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def cursor(self) -> Iterator[psycopg2.extensions.cursor]:
        """A cursor inside one transaction: commit on success, rollback on error.

        A connection error drops the connection (the next call reconnects) and
        is re-raised; any other error rolls back and is re-raised.
        """
        conn = self.connection()
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except BaseException as err:
            if _is_disconnect(conn, err):
                self._drop()
            else:
                with contextlib.suppress(Exception):
                    conn.rollback()
                if conn.closed:
                    self._drop()
            raise

    def run(self, fn: Callable[[psycopg2.extensions.cursor], T], *, retry: bool = True) -> T:
        """fn(cursor) in one transaction; on a lost connection, reconnect and run it once more."""
        try:
            with self.cursor() as cur:
                return fn(cur)
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as err:
            if not retry or (self._conn is not None and not self._conn.closed):
                raise
            log.warning("database connection lost (%s); reconnecting once", type(err).__name__)
            with self.cursor() as cur:
                return fn(cur)

    def query(self, sql: str, params: Sequence[Any] | dict | None = None) -> list[tuple]:
        """Rows of one SELECT (retried once on a dropped connection)."""

        def fetch(cur):
            cur.execute(sql, params)
            return cur.fetchall()

        return self.run(fetch)

    def execute(self, sql: str, params: Sequence[Any] | dict | None = None) -> int:
        """Run one statement in its own transaction; returns its rowcount."""

        def do(cur):
            cur.execute(sql, params)
            return cur.rowcount

        return self.run(do)

    def ping(self) -> bool:
        """True when a round trip to the server succeeds now."""
        try:
            self.query("SELECT 1")
            return True
        except psycopg2.Error:
            return False

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_disconnect(conn, err: BaseException) -> bool:
    """The error left the connection unusable (closed, or lost mid-transaction)."""
    if conn.closed:
        return True
    if isinstance(err, psycopg2.InterfaceError):
        return True
    try:
        status = conn.get_transaction_status()
    except Exception:
        return True
    return status == psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN
