"""PollingWorker: what the four polling collectors share (markets, prices, books, resolutions).

Lifecycle on top of workers.base.Worker:
  __init__ (parent): options converted and checked; nothing opened.
  init_process (child): the HTTP client (its Session is made on first use), the
    Writer (spool lock, first connect attempt) and a Database for queries.
  step (child, every interval): the subclass's cycle; it calls self.checkpoint()
    between requests, which flushes the writer when due, heartbeats, and raises
    Stopping when SIGTERM arrived, so a long cycle ends within one request.
  step ends with writer.flush(): a cycle's rows are in PostgreSQL (or the
    spool) before the wait for the next interval begins.
  shutdown (child): writer.close() flushes to PostgreSQL or the spool.
status() adds the writer's counters, HTTP totals and per-endpoint latency, the
last cycle's figures and the malformed-item count; rows_written is what the
writer committed, not what was fetched.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

import psycopg2

from workers.base import OptionError, Worker
from workers.errors import Stopping
from workers.http import Client
from workers.payload import Parsed, ProblemLog
from workers.storage import Database, Writer
from workers.storage.writer import RowsLostError
from workers.storage.followed import FollowedToken, followed_tokens

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Now, UTC, to the millisecond (the precision the exchange uses)."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def chunks(items: list, size: int) -> list[list]:
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]


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
    }

    # Options that must be > 0 (convert_options already refuses negatives).
    POSITIVE = ("timeout", "connect_timeout", "deadline", "flush_rows", "batch", "page_size", "max_markets",
                "downgrade_after")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for key in self.POSITIVE:
            if key in self.options and not self.options[key] > 0:
                raise OptionError(key, f"must be > 0, got {self.options[key]!r}")
        self.client: Client | None = None
        self.writer = None
        self.db = None
        self.problems = ProblemLog(logging.getLogger(f"workers.{self.name}"))
        self.last_cycle: dict[str, Any] = {}
        self.cycles = 0
        self._followed: list[FollowedToken] | None = None
        self._db_warned = float("-inf")

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

    def shutdown(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except RowsLostError:
                raise  # rows went nowhere: the process must not exit 0
            except Exception:
                log.exception("%s: closing the writer failed", self.name)
        if self.db is not None:
            self.db.close()
        if self.client is not None:
            self.client.close()

    def step(self) -> None:
        """One cycle; Stopping (SIGTERM mid-cycle) ends it quietly, the rows so far are kept."""
        started = time.monotonic()
        requests_before = self.client.requests_made if self.client else 0
        figures: dict[str, Any] = {}
        try:
            self.cycle(figures)
        except Stopping:
            figures["interrupted"] = True
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
        """Between requests: flush when due, heartbeat, and leave the cycle if stopping."""
        if self.writer is not None:
            self.writer.maybe_flush()
        self.beat()
        if self.stopping:
            raise Stopping("stopping")

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
