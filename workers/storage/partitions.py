"""Partitions: the time-partitioned tables, their daily partitions, and retention.

The registry (PARTITIONED) names each range-partitioned table and its partition
column; adding a table is one line here plus its migration. Every partition holds
one UTC day: `<table>_pYYYYMMDD`, FOR VALUES FROM (day) TO (day + 1), and each of
its indexes is named after the parent's index (`trades_key_p20261203`), so a plan
names the index it uses the way an unpartitioned table's did.

Who creates partitions (no cron, no extension):
  - every collector that owns a partitioned table runs `maintain()` at start and
    every `MAINTAIN_EVERY` seconds: today's partition and AHEAD days after it;
  - the Writer, before each batch, creates any partition the batch's rows need that
    it has not seen yet (`Partitions.ensure`): a row dated far in the past or the
    future gets its own partition and is stored, never refused for want of one.
    There is no DEFAULT partition on purpose: once a default holds a row of some
    day, that day's partition can no longer be created without moving the row out.

How (the locks matter on a table the trade listener writes thousands of rows a
second into): the new day is created as a plain table `LIKE` the parent and then
ATTACHed, which takes SHARE UPDATE EXCLUSIVE on the parent (writers keep writing)
instead of the ACCESS EXCLUSIVE of CREATE TABLE ... PARTITION OF; ATTACH builds the
(empty) child's indexes itself. DDL runs with a short lock_timeout, so it never
queues in front of the writers for long; a timeout is retried on the next pass.
Creators serialize on a transaction-level advisory lock per table.

Retention (`drop_expired`): a partition whose whole day lies before now - retention
is detached (DETACH ... CONCURRENTLY, so neither readers nor writers of the other
partitions wait) and dropped. Whole partitions, never a DELETE. A detach left
pending by an interrupted run is finalized on the next one.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Iterable

from workers.errors import CollectorError

log = logging.getLogger(__name__)

UTC = timezone.utc
AHEAD = 3  # days of partitions created ahead of today
MAINTAIN_EVERY = 3600.0  # seconds between two maintenance passes of a collector
LOCK_TIMEOUT_MS = 2000  # DDL waits at most this long for a lock, then retries on a later pass
DETACH_TIMEOUT_MS = 60000  # DETACH CONCURRENTLY waits for readers of the partition to finish


@dataclass(frozen=True)
class Partitioned:
    """One range-partitioned table: its partition column and that column's type.

    kind 'timestamptz': the column is the row's own time (its key includes it);
    kind 'date': the column is the UTC day of the row's time, stored as its own
    column because the table's key must not include the time itself (trades).
    """

    table: str
    column: str
    kind: str  # 'timestamptz' | 'date'
    # kind 'date': the time column the day is computed from. Each partition gets a CHECK
    # that its rows' times lie in its day, so a query on a constant time range reads
    # only those days' partitions (constraint exclusion), not every day's index.
    time_column: str | None = None

    def time_check(self, day: date) -> str:
        """The CHECK constraint a partition of day carries on time_column (kind 'date')."""
        lo = f"'{day.isoformat()} 00:00:00+00'"
        hi = f"'{(day + timedelta(days=1)).isoformat()} 00:00:00+00'"
        return f"CHECK ({self.time_column} >= {lo} AND {self.time_column} < {hi})"

    def bound(self, day: date) -> str:
        """The SQL literal of a partition bound at the start of day (UTC)."""
        if self.kind == "date":
            return f"'{day.isoformat()}'"
        return f"'{day.isoformat()} 00:00:00+00'"


# The registry: one line per partitioned table (the table's migration creates it partitioned).
PARTITIONED: dict[str, Partitioned] = {
    p.table: p
    for p in (
        Partitioned("trades", "trade_day", "date", time_column="ts"),
        Partitioned("price_snapshots", "ts", "timestamptz"),
        Partitioned("orderbook_snapshots", "ts", "timestamptz"),
        Partitioned("book_events", "ts", "timestamptz"),  # 0025
    )
}

_SUFFIX = re.compile(r"_p(\d{8})$")
_RETENTION = re.compile(r"^\s*(\d+)\s*([dw])\s*$", re.I)


class RetentionError(CollectorError, ValueError):
    """A retention value that does not parse."""


def parse_retention(text: str | None) -> timedelta | None:
    """'90d' or '13w' -> a timedelta; '' (or None) -> None: keep for ever.

    At least one day: partitions hold whole days, and '0d' would drop today's.
    """
    if text is None or not str(text).strip():
        return None
    match = _RETENTION.match(str(text))
    if not match:
        raise RetentionError(f"expected a number of days or weeks such as 90d or 13w (empty: keep for ever), "
                             f"got {text!r}")
    days = int(match.group(1)) * (7 if match.group(2).lower() == "w" else 1)
    if days < 1:
        raise RetentionError(f"must be at least 1d (empty keeps for ever), got {text!r}")
    return timedelta(days=days)


def partition_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def utc_day(text: str) -> date:
    """The UTC day of a timestamptz text as the Writer sends it (ISO 8601 with an offset)."""
    if text.endswith("+00:00") and len(text) >= 10:
        return date(int(text[0:4]), int(text[5:7]), int(text[8:10]))
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).date()


def existing(cur, table: str) -> dict[date, bool]:
    """The table's partitions in the current schema: day -> detach pending."""
    cur.execute(
        "SELECT c.relname, i.inhdetachpending FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(%s)",
        (table,),
    )
    out: dict[date, bool] = {}
    for name, pending in cur.fetchall():
        match = _SUFFIX.search(name)
        if match and name == f"{table}_p{match.group(1)}":
            out[datetime.strptime(match.group(1), "%Y%m%d").date()] = bool(pending)
    return out


def _create(cur, spec: Partitioned, day: date) -> bool:
    """Create and attach one day's partition (inside the caller's transaction); False if it exists."""
    name = partition_name(spec.table, day)
    cur.execute("SELECT pg_advisory_xact_lock(hashtext('collectord.partitions'), hashtext(%s))", (spec.table,))
    cur.execute("SELECT relispartition FROM pg_class WHERE oid = to_regclass(%s)", (name,))
    found = cur.fetchone()
    if found and found[0]:
        return False
    if not found:
        cur.execute(f"CREATE TABLE {name} (LIKE {spec.table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        if spec.time_column:
            cur.execute(f"ALTER TABLE {name} ADD CONSTRAINT {name}_{spec.time_column}_day {spec.time_check(day)}")
    # else: the day's table, detached by a retention pass that died before its DROP, and
    # a row of that day arrived: it goes back, rows and all (the next pass drops it again)
    cur.execute(f"ALTER TABLE {spec.table} ATTACH PARTITION {name}"
                f" FOR VALUES FROM ({spec.bound(day)}) TO ({spec.bound(day + timedelta(days=1))})")
    # Name the child's indexes after the parent's (ATTACH gave them generated names).
    cur.execute(
        "SELECT c.relname, p.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_index x ON x.indexrelid = c.oid"
        " WHERE x.indrelid = to_regclass(%s)",
        (name,),
    )
    for child, parent in cur.fetchall():
        wanted = f"{parent}_p{day:%Y%m%d}"[:63]
        if child != wanted:
            cur.execute(f'ALTER INDEX "{child}" RENAME TO "{wanted}"')
    return True


def create(conn, table: str, days: Iterable[date]) -> list[date]:
    """Create the partitions of table for days that lack one; returns the days created.

    One transaction per partition (a lock timeout costs only that day, raised to the
    caller after the others were made), each under lock_timeout.
    """
    spec = PARTITIONED[table]
    made: list[date] = []
    failed: BaseException | None = None
    with conn.cursor() as cur:
        cur.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (table,))
        kind = cur.fetchone()
        have = existing(cur, table)
    conn.commit()
    if kind is None or kind[0] != "p":  # not migrated to partitions (yet): nothing to create
        return made
    for day in sorted(set(days) - set(have)):
        try:
            with conn.cursor() as cur:
                cur.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                if _create(cur, spec, day):
                    made.append(day)
            conn.commit()
        except Exception as err:
            conn.rollback()
            failed = failed or err
    if made:
        log.info("%s: created partition(s) %s", table, ", ".join(d.isoformat() for d in made))
    if failed is not None:
        raise failed
    return made


def drop_expired(conn, table: str, retention: timedelta | None, now: datetime | None = None) -> list[date]:
    """Detach and drop every partition of table whose day ended before now - retention.

    conn must be in autocommit mode (DETACH ... CONCURRENTLY runs outside a
    transaction block). Returns the days dropped. retention None keeps everything.
    One process at a time per table (a session advisory lock; another holder means
    this pass skips the table: the holder is doing the work).
    """
    if retention is None:
        return []
    now = now or datetime.now(UTC)
    horizon = now - retention
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(hashtext('collectord.retention'), hashtext(%s))", (table,))
        if not cur.fetchone()[0]:
            return []
        try:
            return _drop_expired(cur, table, retention, horizon)
        finally:
            cur.execute("SELECT pg_advisory_unlock(hashtext('collectord.retention'), hashtext(%s))", (table,))


def _drop_expired(cur, table: str, retention: timedelta, horizon: datetime) -> list[date]:
    """In order, for each expired day: finish or start its detach, then drop the table.

    A partition detached by an earlier pass whose DROP failed (lock timeout) is no
    longer listed by pg_inherits: such leftovers (<table>_pYYYYMMDD, not a partition)
    are dropped too.
    """
    days = {day: ("pending" if pending else "attached") for day, pending in existing(cur, table).items()}
    cur.execute("SELECT c.relname FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace"
                " AND c.relkind = 'r' AND NOT c.relispartition AND c.relname ~ %s", (f"^{table}_p[0-9]{{8}}$",))
    for (name,) in cur.fetchall():
        days.setdefault(datetime.strptime(name[-8:], "%Y%m%d").date(), "detached")
    dropped = []
    for day, state in sorted(days.items()):
        if datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1) > horizon:
            continue
        name = partition_name(table, day)
        cur.execute(f"SET statement_timeout = {DETACH_TIMEOUT_MS}")
        if state == "pending":  # an earlier DETACH CONCURRENTLY was interrupted
            cur.execute(f"ALTER TABLE {table} DETACH PARTITION {name} FINALIZE")
        elif state == "attached":
            cur.execute(f"ALTER TABLE {table} DETACH PARTITION {name} CONCURRENTLY")
        cur.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        cur.execute(f"DROP TABLE {name}")
        cur.execute("RESET lock_timeout")
        cur.execute("RESET statement_timeout")
        dropped.append(day)
    if dropped:
        log.info("%s: retention %s dropped partition(s) %s", table, retention,
                 ", ".join(d.isoformat() for d in dropped))
    return dropped


class Maintenance:
    """A collector's partition upkeep, off its main loop.

    maybe_start() (from the loop, cheap): when due, starts one pass of maintain() in a
    daemon thread with a connection of its own, unless the last pass still runs.
    Due at once, then every `every` seconds; a failed pass is retried after
    `retry` seconds (logged, counted). The loop never waits on DDL: a DETACH that
    waits for a long reader must not stall a socket loop.
    """

    def __init__(self, dsn: str, tables: dict[str, timedelta | None], *, name: str = "partitions",
                 every: float = MAINTAIN_EVERY, retry: float = 60.0, clock=None):
        self.dsn, self.tables, self.name = dsn, dict(tables), name
        self.every, self.retry = every, retry
        self.clock = clock or time.monotonic
        self._next = 0.0
        self._thread = None
        self.counters = {"partitions_created": 0, "partitions_dropped": 0, "partition_errors": 0,
                         "partition_last_error": None}

    def maybe_start(self) -> bool:
        """Start a pass if one is due and none runs; True when it started one."""
        if not self.tables or self.clock() < self._next or (self._thread is not None and self._thread.is_alive()):
            return False
        self._next = self.clock() + self.every
        self._thread = threading.Thread(target=self._pass, name=f"partitions-{self.name}", daemon=True)
        self._thread.start()
        return True

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _pass(self) -> None:
        try:
            done = maintain(self.dsn, self.tables, application_name=f"collectord:{self.name}:partitions")
        except Exception as err:
            self.counters["partition_errors"] += 1
            self.counters["partition_last_error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]
            self._next = min(self._next, self.clock() + self.retry)
            log.warning("%s: partition maintenance failed (%s); retrying in %.0f s", self.name,
                        self.counters["partition_last_error"], self.retry)
            return
        for figures in done.values():
            self.counters["partitions_created"] += len(figures["created"])
            self.counters["partitions_dropped"] += len(figures["dropped"])


def ahead(now: datetime | None = None, days: int = AHEAD) -> list[date]:
    """Today (UTC) and the `days` days after it."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    return [today + timedelta(days=i) for i in range(days + 1)]


def maintain(dsn: str, tables: dict[str, timedelta | None], *, now: datetime | None = None,
             application_name: str = "collectord:partitions") -> dict[str, dict]:
    """One maintenance pass: for each table, create today's and AHEAD days' partitions,
    then drop what its retention no longer keeps. Returns {table: {created, dropped}}.

    Opens its own connection (autocommit for DETACH CONCURRENTLY) and closes it.
    """
    from .db import connect

    out: dict[str, dict] = {}
    conn = connect(dsn, application_name=application_name, statement_timeout=60.0)
    try:
        for table, retention in tables.items():
            conn.autocommit = False
            made = create(conn, table, ahead(now))
            conn.autocommit = True
            dropped = drop_expired(conn, table, retention, now)
            out[table] = {"created": made, "dropped": dropped}
    finally:
        conn.close()
    return out


class Partitions:
    """The Writer's side: the partitions known to exist, and creating missing ones on demand.

    `days(table, rows)` computes the days a record's rows need from the row texts;
    `ensure(conn, table, days)` creates those not yet seen (its own transactions,
    before the batch's) and remembers them.
    """

    def __init__(self, columns: dict[str, tuple[str, ...]]):
        self.known: dict[str, set[date]] = {t: set() for t in PARTITIONED}
        # per table: the partition column's index, and that of `ts` (a date column left
        # NULL is computed from ts by the insert, so its day is ts's)
        self._index = {t: (columns[t].index(p.column), columns[t].index("ts"))
                       for t, p in PARTITIONED.items() if t in columns}

    def days(self, table: str, rows: list[list]) -> set[date]:
        """The days (UTC) the rows of table fall on."""
        where = self._index.get(table)
        if where is None:
            return set()
        i, ts = where
        kind = PARTITIONED[table].kind
        out = set()
        for text in {row[i] for row in rows}:
            try:
                if text is None:
                    out.update(utc_day(row[ts]) for row in rows if row[i] is None and row[ts] is not None)
                else:
                    out.add(date.fromisoformat(text[:10]) if kind == "date" else utc_day(text))
            except ValueError:
                continue  # not a time this code parses: the database decides (and says why)
        return out

    def ensure(self, conn, table: str, days: set[date]) -> None:
        missing = days - self.known[table]
        if not missing:
            return
        create(conn, table, missing)
        self.known[table] |= missing

    def forget(self) -> None:
        """After a reconnect: the database may be another one (or partitions were dropped)."""
        for known in self.known.values():
            known.clear()
