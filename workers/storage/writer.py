"""Writer: batches a collector's rows into PostgreSQL, idempotently, spooling when it is down.

Life cycle (construct before the fork; everything else in the child):

    w = Writer(dsn, spool_dir, name="trades.0")     # stores values only
    w.open()                                         # spool lock, flusher thread
    w.add("trades", [{"token_id": ..., "price": Decimal("0.48"), ...}, ...])
    w.maybe_flush()                                  # from the loop: hands a due batch over
    w.close()                                        # SIGTERM/shutdown: DB, or spool

How a batch travels, in order:
  1. add() converts each row (rows.py) to the text PostgreSQL receives; a bad
     value raises here, at the caller, and none of that call's rows are kept.
  2. When due (>= max_rows buffered, or the oldest row older than max_age),
     maybe_flush() takes every table's rows as one batch (DO UPDATE tables
     keep the last row per key) and hands it to the flusher thread
     (background=True, the default; at most max_pending batches wait, so a
     slow database slows add() instead of growing memory), or delivers it
     itself (background=False). flush() does the same and waits until the
     batch is delivered.
  3. Delivery: if the spool holds anything, or the database is known down and
     not yet due for a retry, the batch is appended to the spool (nothing
     overtakes spooled rows). Otherwise the partitions its rows need that this
     Writer has not seen yet are created (partitions.py: a row of any day is
     stored), and then it is written in ONE transaction:
     per table, COPY into a temp staging table, INSERT ... SELECT ... ON CONFLICT;
     for DO NOTHING tables (trades, books, prices) first a COPY straight into
     the table, which is undone for the staging path if it meets a duplicate
     (trades within two minutes of a UTC midnight always take the staging path,
     whose guard looks for their twin in the neighbouring day: tables.py).
     Rows holding a NUL or a lone surrogate (no PostgreSQL text can) are left
     out and go to rejected.jsonl.
  4. Connection trouble -> the batch goes to the spool and retries back off
     (retry_initial doubling to retry_max). A data error (bad value,
     constraint) -> each table retried alone, then the failing table row by
     row under savepoints; rows the database refuses go to the spool's
     rejected.jsonl with the error, and are logged. Nothing is dropped
     silently, nothing poisons the spool.
  5. While the spool is not empty and the database answers, spooled records
     replay in order (replay_budget seconds at a time), replayed segments are
     deleted; when the spool is empty, writes go direct again. A spooled
     record of a table or column this version does not know is set aside in
     rejected.jsonl (logged, counted) and replay goes on after it.
  6. close(): rows that neither the database nor the spool took are logged as
     LOST, counted (rows_lost) and RowsLostError is raised.

The collector's loop never waits on the database in background mode, except
for backpressure; every database call is bounded by connect_timeout,
statement_timeout and TCP keepalives (db.py).
"""

from __future__ import annotations

import collections
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

from workers.errors import CollectorError

from .db import _inherited, connect
from .db import is_connection_error as _is_connection_error
from .partitions import PARTITIONED, Partitions
from .rows import CONVERTERS, copy_data, row_converter, unsendable
from .spool import Record, Spool
from .tables import TABLES, Table

log = logging.getLogger(__name__)

MAX_ROWS = 5000
MAX_AGE = 0.5  # seconds; with a loop calling maybe_flush often, latency stays < 1 s
METHODS = ("copy", "values")



class RowsLostError(CollectorError):
    """close() could deliver some rows neither to the database nor to the spool (they are gone)."""

    def __init__(self, message: str, rows: int):
        super().__init__(message)
        self.rows = rows


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
        background: bool = True,
        max_pending: int = 2,
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
        self.background = background
        self.max_pending = max(1, int(max_pending))
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

        # Two locks: _buf guards the buffers (the collector's side, held briefly);
        # _io guards the connection and the spool (held while a batch is delivered).
        self._buf = threading.Lock()
        self._io = threading.RLock()
        self._cv = threading.Condition(threading.Lock())  # the hand-over queue
        self._buffers: dict[str, list[list[str | None]]] = {t: [] for t in TABLES}
        self._count = 0
        self._oldest: float | None = None
        self._queue: collections.deque[tuple[int, list[Record]]] = collections.deque()
        self._submitted = 0
        self._delivered = 0
        self._thread: threading.Thread | None = None
        self._stop_thread = False
        self._held: list[Record] = []  # batches neither written nor spooled (spool failed)
        self._conn: psycopg2.extensions.connection | None = None
        self._conn_pid = 0
        self._db_ok = False
        self._next_try = 0.0
        self._delay = retry_initial
        self._replay_at: tuple[Path, int] | None = None
        self._close_deadline: float | None = None  # time.monotonic() by which close() must be done
        self.spool: Spool | None = None
        self._opened = False
        self._closed = False
        self._converters = {t.name: [(c, CONVERTERS[kind]) for c, kind in t.columns] for t in TABLES.values()}
        self._row = {t.name: row_converter(t.columns) for t in TABLES.values()}
        # Per direct table: whether the next batch tries COPY straight into it
        # (dropped after a batch that met duplicates, back after one that met none).
        self._direct: dict[str, bool] = {}
        self._allowed = {t.name: frozenset(t.column_names) for t in TABLES.values()}
        self._fill = {t.name: t.fill for t in TABLES.values() if t.fill is not None}
        self.partitions = Partitions({t.name: t.column_names for t in TABLES.values()})
        self.counters: dict[str, Any] = {
            "rows_written": 0,  # rows committed to PostgreSQL (new, changed, or already there)
            "rows_inserted": 0,  # of those, rows that inserted or changed a row
            "batches": 0,
            "rows_spooled": 0,
            "rows_replayed": 0,
            "rows_rejected": 0,
            "rows_lost": 0,  # rows close() could put neither in the database nor in the spool
            "spool_corruptions": 0,
            "db_errors": 0,
            "last_batch_ms": None,
            "last_error": None,
        }

    # -- lifecycle ------------------------------------------------------------
    def open(self) -> "Writer":
        """After the fork: lock and scan the spool, try to connect once, start the flusher."""
        with self._io:
            if self._opened:
                return self
            self.spool = Spool(self.spool_path, segment_bytes=self.segment_bytes, fsync=self.fsync)
            self.spool.open()
            self._opened = True
            if self.spool.pending():
                log.warning("%s: %d spool segment(s) from an earlier run will replay", self.name, self.spool.count)
            self._db_usable()
        if self.background:
            self._thread = threading.Thread(target=self._flusher, name=f"writer-{self.name}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Flush everything buffered to the database, or to the spool if it is unreachable.

        In order: hand the last rows over, let the flusher deliver what it
        holds and stop it; make one more connection attempt (whatever the
        backoff) and deliver what is left; if the spool holds rows and the
        database answers, replay while time is left (the rest replays at the
        next start); close the connection and the spool.

        Bounded: from here every statement runs with a statement_timeout of
        what is left of close_timeout (a write that cannot finish in time is
        spooled instead), plus at most one connect_timeout; so a supervisor's
        graceful_timeout above close_timeout + connect_timeout never has to
        SIGKILL a writer holding rows only in memory.

        Rows that end in neither (database down and the spool unwritable) are
        logged at error level as LOST, counted in rows_lost, and RowsLostError
        is raised after everything is closed: the caller must not exit 0.
        """
        if self._closed:
            return
        if not self._opened:
            self.open()
        self._close_deadline = time.monotonic() + self.close_timeout
        with self._buf:
            batch = self._take()
            self._closed = True
        try:
            if self._thread is not None:
                with self._cv:
                    self._stop_thread = True
                    self._cv.notify_all()
                self._thread.join()
                self._thread = None
            with self._io:
                self._next_try = 0.0
                left = max(0.0, self._close_deadline - time.monotonic())
                self._deliver_and_replay(batch, replay_budget=left)
        except Exception as err:  # whatever it was, the rows still in memory are reported below
            log.exception("%s: closing failed", self.name)
            self.counters["last_error"] = _one_line(err)
        finally:
            with self._io:
                lost, self._held = self._held, []
                self._drop_connection()
                if self.spool is not None:
                    self.spool.close()
        if lost:
            self._lost(lost)

    def _lost(self, records: list[Record]) -> None:
        """Rows that reached neither the database nor the spool at close: say so, count them, raise."""
        rows = sum(len(r.rows) for r in records)
        tables = sorted({r.table for r in records})
        cause = self.counters["last_error"] or "unknown"
        self.counters["rows_lost"] += rows
        log.error(
            "%s: %d row(s) of %s LOST at close: the database is unreachable and the spool %s cannot take "
            "them (%s)", self.name, rows, ", ".join(tables), self.spool_path, cause,
        )
        raise RowsLostError(f"{self.name}: {rows} row(s) lost at close: neither the database nor the spool "
                            f"{self.spool_path} took them ({cause})", rows)

    def __enter__(self) -> "Writer":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the collector's calls ---------------------------------------------------
    def add(self, table: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Buffer rows (dicts keyed by column name) for table; returns how many.

        Raises KeyError for an unknown table, ValueError for an unknown column or
        a value of the wrong type (then none of these rows are buffered).
        Hands a batch over when max_rows is reached.
        """
        try:
            convert = self._row[table]
        except KeyError:
            raise KeyError(f"unknown table {table!r}") from None
        allowed = self._allowed[table]
        converted = []
        append = converted.append
        for row in rows:
            if not allowed.issuperset(row):
                raise ValueError(f"{table}: unknown column(s) {sorted(set(row) - allowed)}")
            try:
                append(convert(row))
            except (TypeError, ValueError, AttributeError):
                self._explain(table, row)  # raises naming the column
        fill = self._fill.get(table)
        if fill is not None:
            for row in converted:
                fill(row)
        return self._buffer(table, converted)

    def add_rows(self, table: str, rows: list[list[str | None]]) -> int:
        """Buffer rows that are already the text PostgreSQL receives, in the table's column
        order (a parser that validated every value built them); returns how many.

        The trade listener's path: no conversion per value. Raises ValueError (none of
        these rows buffered) for a row of the wrong length; the database still checks
        every value, and a row it refuses is isolated and set aside like any other.
        """
        width = len(self._allowed[table])
        if any(len(row) != width for row in rows):
            raise ValueError(f"{table}: a row without exactly {width} values")
        return self._buffer(table, rows)

    def _buffer(self, table: str, rows: list[list[str | None]]) -> int:
        """Append converted rows to table's buffer; hand a batch over when max_rows is reached."""
        if not rows:
            return 0
        with self._buf:
            if self._closed:
                raise RuntimeError(f"{self.name}: writer is closed")
            self._buffers[table].extend(rows)
            if self._count == 0:
                self._oldest = self.clock()
            self._count += len(rows)
            full = self._count >= self.max_rows and self._opened
            batch = self._take() if full else None
        if batch:
            self._dispatch(batch, wait=False)
        return len(rows)

    def _explain(self, table: str, row: Mapping[str, Any]) -> None:
        """Raise ValueError naming the first column whose value does not convert."""
        for col, conv in self._converters[table]:
            try:
                conv(row.get(col))
            except (TypeError, ValueError, AttributeError) as err:
                raise ValueError(f"{table}.{col}: {err} (value {row.get(col)!r:.80})") from None
        raise ValueError(f"{table}: row does not convert: {row!r:.200}")

    def due(self) -> bool:
        """True when a flush is due (size, age), or in foreground mode a spool retry."""
        now = self.clock()
        oldest = self._oldest
        if self._count >= self.max_rows or (self._count and oldest is not None and now - oldest >= self.max_age):
            return True
        if self.background:
            return False  # the flusher thread retries the spool by itself
        return bool(self._held) or (self.spool is not None and self.spool.pending() and now >= self._next_try)

    def maybe_flush(self) -> bool:
        """Hand a batch over if one is due; cheap when not. Returns True when it did something."""
        if not self._opened or self._closed or not self.due():
            return False
        with self._buf:
            batch = self._take()
        self._dispatch(batch, wait=False)
        return True

    def flush(self) -> None:
        """Deliver everything buffered now (to the database or the spool) and wait for it."""
        if not self._opened or self._closed:
            raise RuntimeError(f"{self.name}: the writer is {'closed' if self._closed else 'not open'}")
        with self._buf:
            batch = self._take()
        self._dispatch(batch, wait=True)

    def stats(self) -> dict:
        """Counters for status/metrics (safe to call from any thread)."""
        out = dict(self.counters)
        out.update(
            db_ok=self._db_ok,
            buffered=self._count,
            queued_batches=len(self._queue),
            spool_bytes=self.spool.bytes if self.spool is not None else 0,
            spool_segments=self.spool.count if self.spool is not None else 0,
            held_batches=len(self._held),
        )
        return out

    # -- hand-over -----------------------------------------------------------------
    def _take(self) -> list[Record]:
        """Every table's buffered rows as records, in TABLES order; buffers emptied (_buf held)."""
        records = []
        for name, rows in self._buffers.items():
            if not rows:
                continue
            table = TABLES[name]
            if table.merge:  # the last row of each key (one column: the coverage marks' token)
                idx = [table.column_names.index(k) for k in table.key]
                # In key order: two collectord instances merging the same keys (feed_gaps,
                # feed_coverage) then lock rows in one order, and cannot deadlock each other.
                if len(idx) == 1:
                    i = idx[0]
                    last = {row[i]: row for row in rows}
                    rows = [last[k] for k in sorted(last, key=lambda k: "" if k is None else str(k))]
                else:
                    last = {tuple(row[i] for i in idx): row for row in rows}
                    rows = [last[k] for k in sorted(last, key=lambda k: tuple("" if v is None else str(v) for v in k))]
            records.append(Record(name, list(table.column_names), rows))
            self._buffers[name] = []
        self._count = 0
        self._oldest = None
        return records

    def _dispatch(self, batch: list[Record], *, wait: bool) -> None:
        if self._thread is None or not self._thread.is_alive():  # foreground: deliver here
            with self._io:
                while self._queue:  # left by a flusher that is gone: keep the order
                    self._deliver_and_replay(self._queue.popleft()[1])
                self._deliver_and_replay(batch)
            return
        with self._cv:
            # Backpressure: a slow database slows the producer, memory stays bounded.
            while len(self._queue) >= self.max_pending and self._thread is not None and self._thread.is_alive():
                self._cv.wait(0.1)
            self._submitted += 1
            ticket = self._submitted
            self._queue.append((ticket, batch))
            self._cv.notify_all()
            if wait:
                while self._delivered < ticket and self._thread is not None and self._thread.is_alive():
                    self._cv.wait(0.1)

    def _flusher(self) -> None:
        """Thread body: deliver handed-over batches in order; retry the spool while idle."""
        while True:
            with self._cv:
                if not self._queue and not self._stop_thread:
                    self._cv.wait(self._idle_wait())
                item = self._queue.popleft() if self._queue else None
                if item is not None and self._queue:
                    item = self._join_queued(item)
                stop = self._stop_thread and not self._queue
            ticket, batch = item if item else (0, [])
            try:
                with self._io:
                    self._deliver_and_replay(batch)
            except Exception as err:  # a bug must not lose the batch (held again above) or kill the thread
                log.exception("%s: flusher failed; holding the batch", self.name)
                self.counters["last_error"] = _one_line(err)
            with self._cv:
                if ticket:
                    self._delivered = ticket
                self._cv.notify_all()
            if stop and item is None:
                return

    def _join_queued(self, item: tuple[int, list[Record]]) -> tuple[int, list[Record]]:
        """Under load (batches waiting behind item): take them along as one batch (_cv held).

        Larger transactions when the database falls behind: fewer commits and
        round trips per row. Bounded by 4 x max_rows. Only DO NOTHING tables'
        records are concatenated (their rows do not interact); a DO UPDATE
        table's records stay separate, applied in order in the same transaction.
        """
        ticket, batch = item
        size = sum(len(r.rows) for r in batch)
        joined: dict[str, Record] = {}
        out: list[Record] = []

        def take(records: list[Record]) -> None:
            for r in records:
                table = TABLES.get(r.table)
                if table is None or table.merge or r.columns != list(table.column_names):
                    out.append(r)
                elif r.table in joined:
                    joined[r.table].rows.extend(r.rows)
                else:
                    joined[r.table] = Record(r.table, r.columns, list(r.rows))
                    out.append(joined[r.table])

        take(batch)
        while self._queue and size < 4 * self.max_rows:
            ticket, more = self._queue.popleft()
            size += sum(len(r.rows) for r in more)
            take(more)
        return ticket, out

    def _idle_wait(self) -> float:
        """How long the flusher may sleep: until the next spool retry, at most 0.5 s."""
        if self.spool is None or (not self.spool.pending() and not self._held):
            return 0.5
        return min(0.5, max(0.01, self._next_try - self.clock()))

    # -- delivery (under _io) -----------------------------------------------------------
    def _deliver_and_replay(self, batch: list[Record], replay_budget: float | None = None) -> None:
        """Held batches first, then batch: to the database or the spool; then replay the spool.

        If delivery raises (a bug), every record of it is held again (writing a
        record twice is harmless: ON CONFLICT), so nothing leaves memory unsaved.
        """
        if self._held:
            batch = self._held + batch
            self._held = []
        if batch:
            try:
                self._deliver(batch)
            except BaseException:
                again = [r for r in self._held if not any(r is b for b in batch)]
                self._held = batch + again
                raise
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
                # Disk full or unwritable: keep the rest in memory and retry next time.
                log.error("%s: cannot spool (%s); holding %d batch(es) in memory", self.name, err, len(batch) - i)
                self.counters["last_error"] = f"spool: {err}"[:300]
                self._held.extend(batch[i:])
                return
            self.counters["rows_spooled"] += len(record.rows)

    # -- database ------------------------------------------------------------------
    def _connection(self) -> psycopg2.extensions.connection:
        conn = self._conn
        if conn is not None and self._conn_pid != os.getpid():
            _inherited.append(conn)  # opened before a fork: never touch the parent's socket
            conn = self._conn = None
        if conn is None or conn.closed:
            conn = connect(
                self.dsn,
                application_name=f"collectord:{self.name}",
                statement_timeout=self.statement_timeout,
                connect_timeout=self.connect_timeout,
            )
            self._conn_pid = os.getpid()
            self.partitions.forget()  # a new connection: maybe another server, or partitions dropped
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
        """All records in one transaction; raises (after rollback) on any error.

        First, in transactions of their own, the partitions the batch's rows need and
        this Writer has not seen yet are created (partitions.py). If the batch still
        meets a missing partition (one dropped by retention meanwhile), the known set
        is forgotten and the batch tried once more.
        """
        try:
            self._write_once(batch)
        except psycopg2.IntegrityError as err:
            if not _no_partition(err):
                raise
            self.partitions.forget()
            self._write_once(batch)

    def _ensure_partitions(self, conn, batch: list[Record]) -> None:
        for record in batch:
            if record.table in PARTITIONED:
                rows = record.rows
                if record.columns != list(TABLES[record.table].column_names):
                    rows = [self._aligned(TABLES[record.table], record, row) for row in rows]
                self.partitions.ensure(conn, record.table, self.partitions.days(record.table, rows))

    def _write_once(self, batch: list[Record]) -> None:
        """_write's one attempt. Rows no PostgreSQL text can carry (NUL, lone surrogate) are
        left out of the transaction and, once it committed, go to rejected.jsonl."""
        conn = self._connection()
        self._ensure_partitions(conn, batch)
        started = time.perf_counter()
        inserted = 0
        refused: list[tuple[str, list, str]] = []
        try:
            staged: set[str] = set()
            with conn.cursor() as cur:
                fresh = not self._bound_by_close(cur)  # nothing done yet in this transaction
                for record in batch:
                    inserted += self._insert(cur, TABLES[record.table], record, staged, refused, fresh)
                    fresh = False
            conn.commit()
        except BaseException:
            self._rollback(conn)
            raise
        self.counters["last_batch_ms"] = round((time.perf_counter() - started) * 1000, 2)
        self.counters["batches"] += 1
        self.counters["rows_written"] += sum(len(r.rows) for r in batch) - len(refused)
        self.counters["rows_inserted"] += inserted
        for table, row, reason in refused:
            self._rejected(table, TABLES[table].column_names, row, reason)

    def _rejected(self, table: str, columns, row: list, error: str) -> None:
        self.spool.reject(table, list(columns), row, error)
        self.counters["rows_rejected"] += 1
        log.error("%s: %s row rejected: %s (kept in %s)", self.name, table, error, self.spool_path / "rejected.jsonl")

    def _bound_by_close(self, cur) -> bool:
        """While closing: this transaction's statements may only use what is left of close_timeout.

        Returns True when it ran a statement.
        """
        if self._close_deadline is not None:
            ms = max(200, int((self._close_deadline - time.monotonic()) * 1000))
            cur.execute(f"SET LOCAL statement_timeout = {ms}")
            return True
        return False

    def _rollback(self, conn) -> None:
        try:
            conn.rollback()
        except Exception:
            self._drop_connection()
        if conn.closed:
            self._drop_connection()

    def _insert(self, cur, table: Table, record: Record, staged: set[str], refused: list, fresh: bool = False) -> int:
        """One record into its table (inside the caller's transaction); returns rows inserted/changed.

        Rows PostgreSQL cannot receive as text are appended to refused as
        (table, row, reason) instead of failing the whole statement. fresh: the
        transaction has run nothing yet (a failed direct COPY may roll it all back).
        """
        rows = record.rows
        if record.columns != list(table.column_names):
            # A spool written by another version of the table list: align by name.
            rows = [self._aligned(table, record, row) for row in rows]
        if self.method == "copy":
            data, rows, bad = copy_data(rows)
            refused.extend((table.name, row, reason) for row, reason in bad)
            if not rows:
                return 0
            columns = ", ".join(table.column_names)
            guarded = table.near is not None and any(map(table.near, rows))
            if table.direct and self._direct.get(table.name, True) and not guarded:
                if self._copy_direct(cur, table, columns, data, savepoint=not fresh):
                    return len(rows)
                self._direct[table.name] = False  # duplicates around: stage until a batch has none
            stage = f"_stage_{table.name}"
            if table.name in staged:  # a second record of this table in one transaction
                cur.execute(f"DELETE FROM {stage}")
            staged.add(table.name)
            # One read of the whole buffer: psycopg2 would otherwise read 8 kB at a
            # time, re-taking the GIL for each chunk (slow when another thread runs).
            cur.copy_expert(f"COPY {stage} ({columns}) FROM STDIN", io.BytesIO(data), size=len(data) + 1)
            cur.execute(table.insert_from(f"{stage} AS s"))
            if table.direct and cur.rowcount == len(rows) and not guarded:
                self._direct[table.name] = True  # nothing was there already: try the direct COPY again
            return cur.rowcount  # the staged rows vanish at commit (ON COMMIT DELETE ROWS)
        kept = []
        for row in rows:
            reason = unsendable(row)
            if reason is None:
                kept.append(row)
            else:
                refused.append((table.name, row, reason))
        if not kept:
            return 0
        sql, template = _values_sql(table)
        psycopg2.extras.execute_values(cur, sql, kept, template=template, page_size=max(1, len(kept)))
        return cur.rowcount

    @staticmethod
    def _copy_direct(cur, table: Table, columns: str, data: bytes, savepoint: bool) -> bool:
        """COPY straight into table; False (undone) if the rows need the staging path.

        About a third less work for the server than staging + INSERT ... SELECT
        (measured on trades), for the common case of a batch of new rows. A
        unique or not-null violation (a row already stored, a duplicate in the
        batch, a NULL the staging path would default) or any other data error
        undoes the COPY; the caller then stages, which handles or reports each
        of them. Other errors (connection, timeout) are raised.

        Undone by rolling back to a savepoint, or, when this COPY is the
        transaction's first statement (savepoint=False), the whole transaction:
        one round trip less per batch, which counts because each one may wait
        a GIL switch interval for the collector's thread. The savepoint is never
        released: the commit does that.
        """
        if savepoint:
            cur.execute("SAVEPOINT direct")
        try:
            cur.copy_expert(f"COPY {table.name} ({columns}) FROM STDIN", io.BytesIO(data), size=len(data) + 1)
        except (psycopg2.DataError, psycopg2.IntegrityError):
            if savepoint:
                cur.execute("ROLLBACK TO SAVEPOINT direct")
            else:
                cur.connection.rollback()
            return False
        return True

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
                self._bound_by_close(cur)
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
            self._rejected(record.table, record.columns, row, f"refused by the database: {error}")

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
                foreign = self._unwritable(record)
                if foreign:
                    self._quarantine(record, foreign)
                    offset = end
                    self._replay_at = (segment, offset)
                    continue
                try:
                    self._write([record])
                except Exception as err:
                    if _is_connection_error(err):
                        self._down(err)
                        self._replay_at = (segment, offset)
                        return
                    if self._isolate([record], err):
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

    @staticmethod
    def _unwritable(record: Record) -> str | None:
        """Why a spooled record cannot be written by this version (None when it can).

        A table or column this version does not know (a spool written by a newer
        version, or damaged): writing it would raise for ever, or silently drop
        the unknown columns' values.
        """
        table = TABLES.get(record.table)
        if table is None:
            return f"unknown table {record.table!r}"
        unknown = set(record.columns) - set(table.column_names)
        if unknown:
            return f"unknown column(s) {sorted(unknown)} in {record.table}"
        return None

    def _quarantine(self, record: Record, reason: str) -> None:
        """Set a spooled record aside in rejected.jsonl (replay goes on after it), loudly."""
        self.spool.reject_rows(record.table, record.columns, record.rows, f"not replayable: {reason}")
        self.counters["rows_rejected"] += len(record.rows)
        self.counters["last_error"] = f"spool: {reason}"[:300]
        log.error("%s: spooled record with %d row(s) not replayable (%s); kept in %s", self.name,
                  len(record.rows), reason, self.spool_path / "rejected.jsonl")


def _no_partition(err: BaseException) -> bool:
    """PostgreSQL found no partition for a row (check_violation from the partition router)."""
    return getattr(err, "pgcode", None) == "23514" and "no partition" in str(err)


def _is_row_error(err: BaseException) -> bool:
    """Errors one row can cause that are not about the connection (ON CONFLICT cardinality)."""
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
