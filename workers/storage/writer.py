"""Writer: batches a collector's rows into PostgreSQL, idempotently, spooling when it is down.

Life cycle (construct before the fork; everything else in the child):

    w = Writer(dsn, spool_dir, name="trades.0")     # stores values only
    w.open()                                         # spool lock; first connect attempt
    w.add("trades", [{"token_id": ..., "price": Decimal("0.48"), ...}, ...])
    w.maybe_flush()                                  # from the loop: flushes when due
    w.close()                                        # SIGTERM/shutdown: DB, or spool

How a batch travels, in order:
  1. add() converts each row (rows.py) to the text PostgreSQL receives; a bad
     value raises here, at the caller.
  2. flush (size >= max_rows, or oldest row older than max_age) takes every
     table's rows as one batch; DO UPDATE tables keep the last row per key.
  3. If the spool holds anything, or the database is known down and not due
     for a retry, the batch is appended to the spool (order is kept: nothing
     overtakes spooled rows). Otherwise it is written in ONE transaction:
     per table, COPY into a temp staging table, INSERT ... SELECT ... ON CONFLICT.
  4. Connection trouble -> the batch goes to the spool, retries back off
     (retry_initial doubling to retry_max). A data error (bad value, constraint)
     -> each table retried alone, then the failing table row by row under
     savepoints; rows the database refuses go to the spool's rejected.jsonl
     with the error, logged. Nothing is dropped silently, nothing poisons the spool.
  5. While the spool is not empty and the database answers, each flush /
     maybe_flush replays spooled records in order for at most replay_budget
     seconds, deleting replayed segments; when it is empty, writes go direct again.

Not thread-safe across threads without the internal lock: add/flush/close
take it, so a second thread may add rows.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from .db import _inherited, connect
from .rows import CONVERTERS, copy_text
from .spool import SEGMENT_BYTES, Record, Spool
from .tables import TABLES, Table

log = logging.getLogger(__name__)

MAX_ROWS = 5000
MAX_AGE = 0.5  # seconds; with a loop calling maybe_flush often, latency stays < 1 s
METHODS = ("copy", "values")

# Rejected by the database for what the rows hold, not for being unreachable.
_DATA_ERRORS = (psycopg2.DataError, psycopg2.IntegrityError, UnicodeError)


def _is_connection_error(err: BaseException) -> bool:
    if isinstance(err, _DATA_ERRORS):
        return False
    return isinstance(err, (psycopg2.Error, OSError))


class Writer:
    """Batching, idempotent, spooling writer for one collector process."""

    def __init__(
        self,
        dsn: str,
        spool_dir: str | os.PathLike,
        *,
        name: str = "writer",
        max_rows: int = MAX_ROWS,
        max_age: float = MAX_AGE,
        method: str = "copy",
        statement_timeout: float = 30.0,
        connect_timeout: int = 3,
        retry_initial: float = 0.5,
        retry_max: float = 15.0,
        replay_budget: float = 0.5,
        close_timeout: float = 10.0,
        segment_bytes: int = 8 * 1024 * 1024,
        fsync: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad writer name {name!r}")
        self.dsn = dsn
        self.name = name
        self.spool_path = Path(spool_dir) / name
        self.max_rows = max(1, int(max_rows))
        self.max_age = float(max_age)
        self.method = method
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.replay_budget = replay_budget
        self.close_timeout = close_timeout
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.clock = clock

        self._lock = threading.RLock()
        self._buffers: dict[str, list[list[str | None]]] = {t: [] for t in TABLES}
        self._count = 0
        self._oldest: float | None = None
        self._held: list[Record] = []  # batches neither written nor spooled (spool failed)
        self._conn: psycopg2.extensions.connection | None = None
        self._conn_pid = 0
        self._db_ok = False
        self._next_try = 0.0
        self._delay = retry_initial
        self._replay_at: tuple[Path, int] | None = None
        self.spool: Spool | None = None
        self._opened = False
        self._closed = False
        self._converters = {
            t.name: [(c, CONVERTERS[kind]) for c, kind in t.columns] for t in TABLES.values()
        }
        self._allowed = {t.name: frozenset(t.column_names) for t in TABLES.values()}
        self.counters: dict[str, Any] = {
            "rows_written": 0,  # rows committed to PostgreSQL (new or already there)
            "rows_inserted": 0,  # of those, rows that inserted or changed a row
            "batches": 0,
            "rows_spooled": 0,
            "rows_replayed": 0,
            "rows_rejected": 0,
            "spool_corruptions": 0,
            "db_errors": 0,
            "last_batch_ms": None,
            "last_error": None,
        }

    # -- lifecycle ------------------------------------------------------------
    def open(self) -> "Writer":
        """After the fork: lock and scan the spool, try to connect once (bounded)."""
        with self._lock:
            if self._opened:
                return self
            self.spool = Spool(self.spool_path, segment_bytes=self.segment_bytes, fsync=self.fsync)
            self.spool.open()
            self._opened = True
            pending = self.spool.segments()
            if pending:
                log.warning("%s: %d spool segment(s) from an earlier run will replay", self.name, len(pending))
            self._db_usable()
            return self

    def close(self) -> None:
        """Flush everything buffered to the database, or to the spool if it is unreachable.

        Then, if the spool holds rows and the database answers, replay for up
        to close_timeout seconds (what is left replays on the next start).
        """
        with self._lock:
            if self._closed:
                return
            if not self._opened:
                self.open()
            try:
                self._next_try = 0.0  # one more connection attempt now, whatever the backoff
                self._flush_locked(replay_budget=self.close_timeout)
            finally:
                self._closed = True
                self._drop_connection()
                if self.spool is not None:
                    self.spool.close()

    def __enter__(self) -> "Writer":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the collector's calls ---------------------------------------------------
    def add(self, table: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Buffer rows (dicts keyed by column name) for table; returns how many.

        Raises KeyError for an unknown table, ValueError for an unknown column or
        a value of the wrong type (then none of these rows are buffered).
        Flushes when max_rows is reached.
        """
        try:
            converters = self._converters[table]
        except KeyError:
            raise KeyError(f"unknown table {table!r}") from None
        allowed = self._allowed[table]
        converted = []
        for row in rows:
            if not allowed.issuperset(row):
                raise ValueError(f"{table}: unknown column(s) {sorted(set(row) - allowed)}")
            get = row.get
            try:
                converted.append([conv(get(col)) for col, conv in converters])
            except (TypeError, ValueError):
                converted.append(self._explain(table, row))  # raises with the column name
        if not converted:
            return 0
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: writer is closed")
            self._buffers[table].extend(converted)
            if self._count == 0:
                self._oldest = self.clock()
            self._count += len(converted)
            if self._count >= self.max_rows and self._opened:
                self._flush_locked()
        return len(converted)

    def _explain(self, table: str, row: Mapping[str, Any]) -> list:
        for col, conv in self._converters[table]:
            try:
                conv(row.get(col))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{table}.{col}: {err} (value {row.get(col)!r:.80})") from None
        raise AssertionError("unreachable")

    def due(self) -> bool:
        """True when a flush (size, age) or a spool retry is due now."""
        now = self.clock()
        if self._count >= self.max_rows or (self._count and now - (self._oldest or now) >= self.max_age):
            return True
        if self._held:
            return True
        return self.spool is not None and self.spool.pending() and now >= self._next_try

    def maybe_flush(self) -> bool:
        """Flush if due; cheap when not. Returns True when it flushed or replayed."""
        with self._lock:
            if not self._opened or self._closed or not self.due():
                return False
            self._flush_locked()
            return True

    def flush(self) -> None:
        """Write (or spool) everything buffered now, then replay the spool if due."""
        with self._lock:
            if not self._opened:
                raise RuntimeError(f"{self.name}: open() the writer first")
            self._flush_locked()

    def stats(self) -> dict:
        """Counters for status/metrics."""
        with self._lock:
            out = dict(self.counters)
            spool_bytes, segments = self.spool.size() if self.spool is not None else (0, 0)
            out.update(
                db_ok=self._db_ok,
                buffered=self._count,
                spool_bytes=spool_bytes,
                spool_segments=segments,
                held_batches=len(self._held),
            )
            return out

    # -- flushing -----------------------------------------------------------------
    def _take(self) -> list[Record]:
        """Every table's buffered rows as records, in TABLES order; buffers emptied."""
        records = []
        for name, rows in self._buffers.items():
            if not rows:
                continue
            table = TABLES[name]
            if table.merge:
                idx = [table.column_names.index(k) for k in table.key]
                last: dict[tuple, list] = {}
                for row in rows:
                    last[tuple(row[i] for i in idx)] = row
                rows = list(last.values())
            records.append(Record(name, list(table.column_names), rows))
            self._buffers[name] = []
        self._count = 0
        self._oldest = None
        return records

    def _flush_locked(self, replay_budget: float | None = None) -> None:
        batch = self._held + self._take()
        self._held = []
        if batch:
            self._deliver(batch)
        self._replay(self.replay_budget if replay_budget is None else replay_budget)

    def _deliver(self, batch: list[Record]) -> None:
        """Write batch in one transaction, or spool it (see the module docstring)."""
        if self.spool.pending() or not self._db_usable():
            self._to_spool(batch)
            return
        try:
            self._write(batch)
        except Exception as err:
            if _is_connection_error(err):
                self._down(err)
                self._to_spool(batch)
            else:
                left = self._isolate(batch, err)
                if left:
                    self._to_spool(left)

    def _to_spool(self, batch: list[Record]) -> None:
        for i, record in enumerate(batch):
            try:
                self.spool.append(record)
            except OSError as err:
                # Disk full or unwritable: keep the rest in memory and retry next flush.
                log.error("%s: cannot spool (%s); holding %d batch(es) in memory", self.name, err, len(batch) - i)
                self.counters["last_error"] = f"spool: {err}"[:300]
                self._held.extend(batch[i:])
                return
            self.counters["rows_spooled"] += len(record.rows)

    # -- database ------------------------------------------------------------------
    def _connection(self) -> psycopg2.extensions.connection:
        conn = self._conn
        if conn is not None and self._conn_pid != os.getpid():
            _inherited.append(conn)
            conn = self._conn = None
        if conn is None or conn.closed:
            conn = connect(
                self.dsn,
                application_name=f"collectord:{self.name}",
                statement_timeout=self.statement_timeout,
                connect_timeout=self.connect_timeout,
            )
            self._conn_pid = os.getpid()
            try:
                with conn.cursor() as cur:
                    for table in TABLES.values():
                        cols = ", ".join(f"{c} {kind}" for c, kind in table.columns)
                        cur.execute(
                            f"CREATE TEMP TABLE IF NOT EXISTS _stage_{table.name} ({cols}) ON COMMIT DELETE ROWS"
                        )
                conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            self._conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._conn_pid != os.getpid():
            _inherited.append(conn)
            return
        with contextlib.suppress(Exception):
            conn.close()

    def _db_usable(self) -> bool:
        """An open connection, or a new one if a retry is due (bounded by connect_timeout)."""
        if self._conn is not None and not self._conn.closed and self._conn_pid == os.getpid():
            return True
        if self.clock() < self._next_try:
            return False
        try:
            self._connection()
        except Exception as err:
            if not _is_connection_error(err):
                raise
            self._down(err)
            return False
        if not self._db_ok:
            log.info("%s: database reachable", self.name)
        self._db_ok = True
        self._delay = self.retry_initial
        return True

    def _down(self, err: BaseException) -> None:
        if self._db_ok:
            log.warning("%s: database unreachable (%s); spooling to %s", self.name, _one_line(err), self.spool_path)
        self._db_ok = False
        self.counters["db_errors"] += 1
        self.counters["last_error"] = _one_line(err)
        self._drop_connection()
        self._next_try = self.clock() + self._delay
        self._delay = min(self._delay * 2, self.retry_max)

    def _write(self, batch: list[Record]) -> None:
        """All records in one transaction; raises (after rollback) on any error."""
        conn = self._connection()
        started = time.perf_counter()
        inserted = 0
        try:
            staged: set[str] = set()
            with conn.cursor() as cur:
                for record in batch:
                    inserted += self._insert(cur, TABLES[record.table], record, staged)
            conn.commit()
        except BaseException:
            self._rollback(conn)
            raise
        self.counters["last_batch_ms"] = round((time.perf_counter() - started) * 1000, 2)
        self.counters["batches"] += 1
        self.counters["rows_written"] += sum(len(r.rows) for r in batch)
        self.counters["rows_inserted"] += inserted

    def _rollback(self, conn) -> None:
        try:
            conn.rollback()
        except Exception:
            self._drop_connection()
        if conn.closed:
            self._drop_connection()

    def _insert(self, cur, table: Table, record: Record, staged: set[str]) -> int:
        if record.columns != list(table.column_names):
            # A spool written by another version of the table list: reorder by name.
            pos = [record.columns.index(c) if c in record.columns else None for c in table.column_names]
            rows = [[row[i] if i is not None else None for i in pos] for row in record.rows]
        else:
            rows = record.rows
        if self.method == "copy":
            stage = f"_stage_{table.name}"
            if table.name in staged:  # a second record of this table in one transaction
                cur.execute(f"DELETE FROM {stage}")
            staged.add(table.name)
            cur.copy_expert(
                f"COPY {stage} ({', '.join(table.column_names)}) FROM STDIN", io.StringIO(copy_text(rows))
            )
            cur.execute(table.insert_from(f"{stage} AS s"))
            return cur.rowcount  # the staged rows vanish at commit (ON COMMIT DELETE ROWS)
        sql, template = _values_sql(table)
        psycopg2.extras.execute_values(cur, sql, rows, template=template, page_size=max(1, len(rows)))
        return cur.rowcount

    def _isolate(self, batch: list[Record], first: BaseException) -> list[Record]:
        """After a data error: each record alone, then the failing ones row by row.

        Returns the records not written because the connection failed meanwhile
        (the caller spools them).
        """
        log.warning("%s: batch rejected (%s); isolating the bad rows", self.name, _one_line(first))
        for i, record in enumerate(batch):
            try:
                self._write([record])
                continue
            except Exception as err:
                if _is_connection_error(err):
                    self._down(err)
                    return batch[i:]
            try:
                self._row_by_row(record)
            except Exception as err:
                if _is_connection_error(err):
                    self._down(err)
                    return batch[i:]
                raise
        return []

    def _row_by_row(self, record: Record) -> None:
        """One transaction, one savepoint per row; refused rows go to rejected.jsonl after commit."""
        table = TABLES[record.table]
        sql, template = _values_sql(table)
        one = sql.replace("%s", template, 1)
        conn = self._connection()
        rejected: list[tuple[list, str]] = []
        written = inserted = 0
        try:
            with conn.cursor() as cur:
                for row in record.rows:
                    cur.execute("SAVEPOINT row")
                    try:
                        cur.execute(one, self._aligned(table, record, row))
                        inserted += cur.rowcount
                        written += 1
                    except Exception as err:
                        if _is_connection_error(err) and not _is_row_error(err):
                            raise
                        cur.execute("ROLLBACK TO SAVEPOINT row")
                        rejected.append((row, _one_line(err)))
                    else:
                        cur.execute("RELEASE SAVEPOINT row")
            conn.commit()
        except BaseException:
            self._rollback(conn)
            raise
        self.counters["batches"] += 1
        self.counters["rows_written"] += written
        self.counters["rows_inserted"] += inserted
        for row, error in rejected:
            self.spool.reject(record.table, record.columns, row, error)
            log.error("%s: %s row rejected by the database: %s (kept in %s)", self.name, record.table, error,
                      self.spool_path / "rejected.jsonl")
        self.counters["rows_rejected"] += len(rejected)

    @staticmethod
    def _aligned(table: Table, record: Record, row: list) -> list:
        if record.columns == list(table.column_names):
            return row
        by_name = dict(zip(record.columns, row))
        return [by_name.get(c) for c in table.column_names]

    # -- spool replay -----------------------------------------------------------------
    def _replay(self, budget: float) -> None:
        """Replay spooled records in order for at most budget seconds (if the database answers)."""
        spool = self.spool
        if spool is None or not spool.pending() or self._held:
            return
        if not self._db_usable():
            return
        deadline = self.clock() + budget
        while True:
            sealed = spool.sealed()
            if not sealed:
                if spool.active is None:
                    break  # spool empty: direct writes from now on
                spool.seal()  # everything older is replayed: the active segment is next
                continue
            segment = sealed[0]
            offset = self._replay_at[1] if self._replay_at and self._replay_at[0] == segment else 0
            corrupt_before = len(spool.corruptions)
            for record, end in spool.read(segment, offset):
                try:
                    self._write([record])
                except Exception as err:
                    if _is_connection_error(err):
                        self._down(err)
                        self._replay_at = (segment, offset)
                        return
                    left = self._isolate([record], err)
                    if left:
                        self._replay_at = (segment, offset)
                        return
                self.counters["rows_replayed"] += len(record.rows)
                offset = end
                self._replay_at = (segment, offset)
                if self.clock() >= deadline:
                    return
            self.counters["spool_corruptions"] += len(spool.corruptions) - corrupt_before
            spool.remove(segment)
            self._replay_at = None
            log.info("%s: replayed spool segment %s", self.name, segment.name)
            if self.clock() >= deadline:
                return


def _is_row_error(err: BaseException) -> bool:
    """Errors a single row can cause that are not about the connection (e.g. cardinality)."""
    return isinstance(err, psycopg2.ProgrammingError) and getattr(err, "pgcode", None) == "21000"


_VALUES_CACHE: dict[str, tuple[str, str]] = {}


def _values_sql(table: Table) -> tuple[str, str]:
    """(INSERT ... SELECT ... FROM (VALUES %s) s(...) ON CONFLICT ..., row template with casts)."""
    cached = _VALUES_CACHE.get(table.name)
    if cached is None:
        names = ", ".join(table.column_names)
        template = "(" + ", ".join(f"%s::{kind}" for _, kind in table.columns) + ")"
        cached = (table.insert_from(f"(VALUES %s) AS s({names})"), template)
        _VALUES_CACHE[table.name] = cached
    return cached


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]
