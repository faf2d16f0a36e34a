"""PollingWorker: what the four polling collectors share (markets, prices, books, resolutions).

Lifecycle on top of workers.base.Worker:
  __init__ (parent): options converted and checked; nothing opened.
  init_process (child): the HTTP client (its Session is made on first use), the
    Writer (spool lock, first connect attempt) and a Database for queries.
  step (child, every interval): first the lease (workers/storage/lease.py; option
    `lease`, on by default): when another collectord instance holds this collector's
    advisory lock, stand by, heartbeating and trying again every `lease_retry` s,
    until it is ours (or SIGTERM). Then the subclass's cycle; it calls
    self.checkpoint() between requests, which flushes the writer when due,
    heartbeats, checks the lease (LeaseLost ends the cycle: another instance may
    poll now) and raises Stopping when SIGTERM arrived, so a long cycle ends
    within one request.
  step ends with writer.flush(): a cycle's rows are in PostgreSQL (or the
    spool) before the wait for the next interval begins.
  batches() (for the collectors of the CLOB batch endpoints): asks a list of ids
    in chunks of `batch` and splits a chunk the exchange refuses whole (too big,
    or one id it will not take) instead of losing every token in it each cycle.
  shutdown (child): writer.close() flushes to PostgreSQL or the spool, then the
    lease is released, so a standby takes over at its next attempt.
status() adds the lease's role ("active"/"standby"),  the writer's counters, HTTP totals and per-endpoint latency, the
last cycle's figures and the malformed-item count; rows_written is what the
writer committed, not what was fetched.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

import psycopg2

from workers.base import OptionError, Worker
from workers.errors import HttpError, LeaseLost, Stopping
from workers.http import Client
from workers.payload import Parsed, ProblemLog
from workers.storage import Database, Writer
from workers.storage.lease import Lease
from workers.storage.writer import RowsLostError
from workers.storage.followed import FollowedToken, followed_tokens
from workers.storage.partitions import Maintenance, RetentionError, parse_retention

log = logging.getLogger(__name__)

# Statuses with which an exchange refuses a batch request as a whole for its size or for one id in it
# (400 too many or a bad id, 413 body too large, 414 URI too long, 431 headers too large): batches()
# splits such a chunk. 404, 429, 5xx and the rest keep their meaning: the chunk is a failed batch.
SPLIT_STATUSES = frozenset({400, 413, 414, 431})
# Single ids refused in one cycle after which batches() splits no more in that cycle (see _Plan).
MAX_REJECTED_IDS = 3
REJECTED_LOG_EVERY = 60.0  # seconds between two log lines naming rejected ids


def retention_option(options: dict) -> "timedelta | None":
    """The `retention` option ('90d', '13w', '' for ever) as a timedelta; OptionError when bad."""
    try:
        return parse_retention(options.get("retention", ""))
    except RetentionError as err:
        raise OptionError("retention", str(err)) from None


def utcnow() -> datetime:
    """Now, UTC, to the millisecond (the precision the exchange uses)."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def chunks(items: list, size: int) -> list[list]:
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]


def answered_batches(figures: dict) -> int:
    """Chunks the exchange answered in a cycle that used batches(): asked minus split, rejected and failed."""
    return figures["batches"] - figures["split"] - figures["rejected"] - figures["failed_batches"]


class _Plan:
    """One cycle's chunks for PollingWorker.batches(): what is left to ask, the size in force, what was refused.

    A chunk refused whole is split in halves, asked next (first half first), down to single ids. Once both
    halves of one split were answered, the size was the problem, not an id: the size in force drops to the
    larger half's for the rest of the cycle, and longer chunks still queued are cut to it before they are
    asked. (An id the exchange will not take never lets both halves of its chunk through, so it does not
    lower the size: it costs about 2 * log2(batch) requests and is then skipped.)

    The bound: after MAX_REJECTED_IDS single ids were refused in a cycle, nothing more is split; every
    refused chunk is a failed batch, as without splitting. An exchange that refuses everything (an API
    change) therefore costs a cycle of n ids in chunks of B at most ceil(n / B) + 2 * (ceil(log2 B) + 1)
    requests (every split adds two), instead of ~2n.
    """

    def __init__(self, ids: list, size: int):
        self.size = self.limit = max(1, int(size))
        self.pending: deque[tuple[list, int | None]] = deque((c, None) for c in chunks(ids, self.size))
        self.halves: dict[int, list[int]] = {}  # split number -> [halves not answered yet, larger half's size]
        self.splits = 0
        self.rejected: list[str] = []
        self.status: int | None = None  # the status that caused the last split

    def next(self) -> tuple[list, int | None] | None:
        """The next chunk and the split it came from (None: all asked); a chunk over the size in force is cut."""
        while self.pending:
            chunk, split = self.pending.popleft()
            if len(chunk) <= self.limit:
                return chunk, split
            self.pending.extendleft((c, None) for c in reversed(chunks(chunk, self.limit)))
        return None

    def answered(self, split: int | None) -> None:
        """A chunk was answered; when it completes both halves of a split, lower the size in force to theirs."""
        left = self.halves.get(split)
        if left is None:
            return
        left[0] -= 1
        if left[0] == 0:
            del self.halves[split]
            self.limit = min(self.limit, left[1])

    def refused(self, chunk: list, status: int | None) -> str:
        """A chunk refused whole: the figure it counts in ("split", "rejected" or "failed_batches").

        Not a SPLIT_STATUSES status, or MAX_REJECTED_IDS ids already rejected: failed. One id: rejected
        (skipped this cycle). Otherwise its halves are queued first.
        """
        if status not in SPLIT_STATUSES or len(self.rejected) >= MAX_REJECTED_IDS:
            return "failed_batches"
        if len(chunk) == 1:
            self.rejected.append(chunk[0])
            return "rejected"
        self.splits += 1
        self.status = status
        half = (len(chunk) + 1) // 2
        self.halves[self.splits] = [2, half]
        self.pending.extendleft([(chunk[half:], self.splits), (chunk[:half], self.splits)])
        return "split"


class PollingWorker(Worker):
    """Base of the polling collectors. Subclasses set OPTIONS (extending these) and step()."""

    OPTIONS = {
        "interval": (float, 30.0),
        "rate": (float, 0.4),  # share of the published per-10-s limits (workers.http)
        "timeout": (float, 10.0),  # read timeout, seconds
        "connect_timeout": (float, 3.05),
        "retries": (int, 4),
        "deadline": (float, 60.0),  # seconds one HTTP call may take, retries included
        "flush_rows": (int, 5000),
        "flush_age": (float, 0.5),
        "lease": (bool, True),  # active/standby between collectord instances sharing the database
        "lease_retry": (float, 3.0),  # seconds between a standby's attempts to take the lease
    }

    # The partitioned tables this collector owns: it creates their partitions ahead and
    # applies its `retention` option to them (workers/storage/partitions.py).
    PARTITIONED_TABLES: tuple[str, ...] = ()

    # Options that must be > 0 (convert_options already refuses negatives).
    POSITIVE = ("timeout", "connect_timeout", "deadline", "flush_rows", "batch", "page_size", "max_markets",
                "downgrade_after", "lease_retry")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for key in self.POSITIVE:
            if key in self.options and not self.options[key] > 0:
                raise OptionError(key, f"must be > 0, got {self.options[key]!r}")
        self.retention = retention_option(self.options)
        self.maintenance: Maintenance | None = None
        self.client: Client | None = None
        self.writer = None
        self.db = None
        self.problems = ProblemLog(logging.getLogger(f"workers.{self.name}"))
        self.last_cycle: dict[str, Any] = {}
        self.cycles = 0
        self._followed: list[FollowedToken] | None = None
        self._db_warned = float("-inf")
        self._rejected_warned = float("-inf")
        # Values only: the lease's connection opens in the child, at its first poll().
        self.lease = Lease(self.dsn, self.name, retry=self.options["lease_retry"]) if self.options["lease"] else None

    # -- lifecycle -------------------------------------------------------------------
    def init_process(self) -> None:
        o = self.options
        apis = {self.urls.get("gamma_url", ""): "gamma", self.urls.get("clob_url", ""): "clob",
                self.urls.get("data_url", ""): "data"}
        self.client = Client(timeout=(o["connect_timeout"], o["timeout"]), rate=o["rate"], retries=o["retries"],
                             deadline=o["deadline"], apis=apis, wait=self._wait_or_stop,
                             should_stop=lambda: self.stopping)
        self.writer = Writer(self.dsn, os.path.join(self.data_dir or ".", "spool"), name=self.name,
                             max_rows=o["flush_rows"], max_age=o["flush_age"])
        self.writer.open()
        self.db = Database(self.dsn, application_name=f"collectord:{self.name}")
        if self.PARTITIONED_TABLES:
            self.maintenance = Maintenance(self.dsn, {t: self.retention for t in self.PARTITIONED_TABLES},
                                           name=self.name)

    def shutdown(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except RowsLostError:
                raise  # rows went nowhere: the process must not exit 0
            except Exception:
                log.exception("%s: closing the writer failed", self.name)
        if self.lease is not None:
            self.lease.close()  # after the last rows are flushed: the next holder starts after them
        if self.db is not None:
            self.db.close()
        if self.client is not None:
            self.client.close()

    def standby(self) -> bool:
        """Wait until this instance holds the lease; False when stopping first.

        While another instance holds it: heartbeat (a standby is healthy, not hung),
        count a success each time the database answered the attempt, and try again
        every lease_retry s (Lease.poll decides when an attempt is due).
        """
        if self.lease is None:
            return True
        while not self.lease.poll():
            if self.lease.reachable:
                self.success()
            if self._wait_or_stop(min(1.0, self.lease.retry)):  # heartbeats; works before run() too
                return False
        return True

    def step(self) -> None:
        """One cycle once the lease is ours; Stopping (SIGTERM mid-cycle) or LeaseLost ends it
        quietly, the rows so far are kept."""
        if not self.standby():
            return
        started = time.monotonic()
        requests_before = self.client.requests_made if self.client else 0
        figures: dict[str, Any] = {}
        if self.maintenance is not None:
            self.maintenance.maybe_start()  # partitions ahead, retention: in a thread of its own
        try:
            self.cycle(figures)
        except Stopping:
            figures["interrupted"] = True
        except LeaseLost:
            figures["interrupted"] = "lease lost"
        except psycopg2.Error as err:
            # The database is down or restarting: rows go to the writer's spool; a
            # query the cycle needed failed. Counted and logged (at most once a
            # minute), never a traceback per cycle; the next cycle tries again.
            figures["database_error"] = type(err).__name__
            self.failure(f"database: {type(err).__name__}: {str(err).strip()[:200]}")
            self._warn_db(err)
        finally:
            figures["seconds"] = round(time.monotonic() - started, 3)
            figures["requests"] = (self.client.requests_made if self.client else 0) - requests_before
            self.last_cycle = figures
            self.cycles += 1
            if self.writer is not None:
                # Rows never wait a whole interval in memory: to PostgreSQL (or the
                # fsynced spool) at the end of every cycle.
                self.writer.flush()

    def cycle(self, figures: dict) -> None:
        """The subclass's work for one interval; fill `figures` with what the cycle did."""
        raise NotImplementedError

    # -- helpers for cycles --------------------------------------------------------------
    def _wait_or_stop(self, seconds: float) -> bool:
        """The HTTP client's sleep: heartbeats and wakes on stop() (Worker.wait) once run() set it up."""
        if self._wake_r < 0:
            deadline = time.monotonic() + seconds
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            return self.stopping
        return self.wait(seconds)

    def _warn_db(self, err: BaseException) -> None:
        now = time.monotonic()
        if now - self._db_warned >= 60.0:
            self._db_warned = now
            log.warning("%s: database unavailable (%s: %s)", self.name, type(err).__name__, str(err).strip()[:200])

    def followed(self) -> list[FollowedToken]:
        """The followed set from the database; the last one read while the database is down."""
        try:
            self._followed = followed_tokens(self.db)
        except psycopg2.Error as err:
            if self._followed is None:
                raise
            self._warn_db(err)
        return self._followed

    def checkpoint(self) -> None:
        """Between requests: flush when due, heartbeat, and leave the cycle if stopping or
        if the lease was lost (another instance may be polling now)."""
        if self.writer is not None:
            self.writer.maybe_flush()
        self.beat()
        if self.stopping:
            raise Stopping("stopping")
        if self.lease is not None and not self.lease.poll():
            raise LeaseLost("lease lost")

    def batches(self, ids: list, size: int, fetch: Callable[[list], Any],
                figures: dict) -> Iterator[tuple[list, Any]]:
        """Yield (chunk, fetch(chunk)) over ids in chunks of `size`; a chunk refused whole is split (see _Plan).

        Per chunk, in order: checkpoint(); fetch(chunk), which raises HttpError when the exchange
        does not answer; an answer is yielded; a refusal is counted in figures (split: its halves
        are asked next; rejected: a single id skipped this cycle; failed_batches: given up, as any
        error other than 400/413/414/431) and failed and rejected ones go to failure(). At the end
        the refusals are logged (see _log_refusals). figures gets batches (chunks asked, halves
        included), failed_batches, split and rejected; answered_batches(figures) is what came back.
        """
        plan = _Plan(ids, size)
        figures.update(batches=0, failed_batches=0, split=0, rejected=0)
        while (item := plan.next()) is not None:
            chunk, split = item
            self.checkpoint()
            figures["batches"] += 1
            try:
                answer = fetch(chunk)
            except HttpError as err:
                outcome = plan.refused(chunk, err.status)
                figures[outcome] += 1
                if outcome != "split":
                    self.failure(str(err))
                continue
            plan.answered(split)
            yield chunk, answer
        self._log_refusals(plan)

    def _log_refusals(self, plan: _Plan) -> None:
        """A WARNING when the batch size was lowered (each cycle it happens); the rejected ids at most once a minute."""
        if plan.limit < plan.size:
            log.warning("%s: batch = %d is too large for the exchange (HTTP %s); batches of %d ids worked: "
                        "lower `batch` to %d or less", self.name, plan.size, plan.status, plan.limit, plan.limit)
        now = time.monotonic()
        if plan.rejected and now - self._rejected_warned >= REJECTED_LOG_EVERY:
            self._rejected_warned = now
            stopped = (f"; after {MAX_REJECTED_IDS} no chunk is split for the rest of a cycle (does the exchange "
                       "refuse every batch?)") if len(plan.rejected) >= MAX_REJECTED_IDS else ""
            log.warning("%s: the exchange refused %d id(s) on their own, skipped this cycle: %s%s", self.name,
                        len(plan.rejected), ", ".join(plan.rejected), stopped)

    def skipped(self, what: str, parsed: Parsed) -> None:
        """Count and (rate-limited) log what a parser skipped."""
        self.problems.report(f"{self.name}: {what}", parsed)

    def status(self) -> dict:
        out = super().status()
        if self.writer is not None:
            w = self.writer.stats()
            out["rows_written"] = w.get("rows_written", 0)
            out["db_ok"] = w.get("db_ok")
            out["spool_bytes"] = w.get("spool_bytes")
            out["last_batch_ms"] = w.get("last_batch_ms")
        if self.lease is not None:
            out.update(self.lease.status())
        if self.maintenance is not None:
            out.update(self.maintenance.counters)
        out["malformed"] = self.problems.total
        out["cycles"] = self.cycles
        out["last_cycle"] = self.last_cycle
        if self.client is not None:
            h = self.client.stats()
            out["http_requests"] = h["requests"]
            out["http_errors"] = h["errors"]
            out["http_throttled"] = h["throttled"]
            out["latency_ms"] = {name: [e["p50_ms"], e["p99_ms"]] for name, e in h["endpoints"].items()}
        return out
