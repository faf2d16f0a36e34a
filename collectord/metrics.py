"""Prometheus endpoint: /metrics and /healthz, served from status.json by a child process.

The supervisor runs MetricsServer like a collector (an internal child named
`metrics`, spawned when `metrics_listen = host:port` is set), so a slow or
hostile scraper can never block the supervisor's loop, and no thread lives in
the forking parent. In order:
  1. __init__ (in the supervisor, before the fork): store and check the values.
     No socket yet.
  2. attach_supervisor(fd) (in the child): heartbeats and its own counters go
     to the supervisor, like a built-in collector's, so the watchdog covers it.
  3. run() (in the child): bind `listen`, then one loop: wait (at most a second)
     on the listening socket and a wake pipe, heartbeat, serve one request.
     Every scrape reads status.json afresh through StatusCollector, a custom
     prometheus_client collector; /healthz answers 200 when status.json is fresh
     and its supervisor alive, else 503.
  4. stop() (from SIGTERM): set a flag and wake the loop; run() closes the
     socket and returns.
One request at a time, each socket operation under REQUEST_TIMEOUT: the
exposition is built from one small file, so a queue of scrapers costs
milliseconds each, and a stuck one is cut off.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import socket
import sys
import time
from typing import Any, Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collectord.status import read_status
from workers.base import Reporter

log = logging.getLogger(__name__)

STATES = ("STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL")
SUPERVISOR_STATES = ("running", "stopping")
REQUEST_TIMEOUT = 5.0  # seconds per socket operation of one request
STALE_AFTER = 30.0  # status.json older than this: unhealthy (the supervisor rewrites it every ~2 s)
EX_CONFIG = 78  # a bad listen address: a restart cannot fix it

# Counter keys a worker may report -> (metric name, kind, scale, help). Keys not
# listed here, if numeric, go to collectord_collector_value{key=...}.
KNOWN_COUNTERS: dict[str, tuple[str, str, float, str]] = {
    "rows_written": ("collectord_collector_rows_written", "counter", 1.0,
                     "Rows the collector wrote since its process started."),
    "errors": ("collectord_collector_errors", "counter", 1.0,
               "Errors the collector counted since its process started."),
    "reconnects": ("collectord_collector_socket_reconnects", "counter", 1.0,
                   "WebSocket reconnects since the collector's process started."),
    "sockets": ("collectord_collector_sockets", "gauge", 1.0, "WebSocket connections the collector holds."),
    "sockets_connected": ("collectord_collector_sockets_connected", "gauge", 1.0,
                          "WebSocket connections currently open."),
    "gaps_open": ("collectord_collector_gaps_open", "gauge", 1.0,
                  "Feed gaps opened and not yet recovered by backfill."),
    "gaps_recovered": ("collectord_collector_gaps_recovered", "counter", 1.0,
                       "Feed gaps recovered by backfill since the process started."),
    "gaps_unrecoverable": ("collectord_collector_gaps_unrecoverable", "counter", 1.0,
                           "Feed gaps ended unrecoverable (with a reason in feed_gaps) since the process started."),
    "gaps_adopted": ("collectord_collector_gaps_adopted", "counter", 1.0,
                     "Open feed gaps left by other processes or runs that this one took on since it started."),
    "spool_bytes": ("collectord_collector_spool_bytes", "gauge", 1.0,
                    "Bytes waiting in the on-disk spool for PostgreSQL."),
    "last_batch_ms": ("collectord_collector_writer_batch_latency_seconds", "gauge", 0.001,
                      "Duration of the writer's last batch into PostgreSQL."),
    "batches": ("collectord_collector_writer_batches", "counter", 1.0,
                "Batches the writer committed since the process started."),
    "db_ok": ("collectord_collector_db_up", "gauge", 1.0, "1 when the writer's last database operation succeeded."),
    "lease_active": ("collectord_collector_lease_active", "gauge", 1.0,
                     "1 when this instance holds the collector's lease and polls, 0 on standby."),
}
SOCKET_STATUS_KEY = "socket_status"  # [[index, connected, last_rx_age, reconnects, assets], ...]
# Unix time the oldest gap a collector owes started (None: it owes none), turned into an
# age at scrape time: alert on the age (a few open gaps waiting for the backfill delay
# are normal; one owed for an hour is not).
OLDEST_GAP_KEY = "gaps_oldest_open_at"


def _number(value: Any) -> float | None:
    """A finite float for int/float/bool values; None for anything else."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
        return float(value)
    return None


def flatten(counters: dict, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(joined key, leaf key, value) for every leaf; nested dicts join keys with '_'.

    A writer's stats nested as {"writer": {"spool_bytes": ..}} give
    ("writer_spool_bytes", "spool_bytes", ..), so known names match either way.
    """
    for key, value in counters.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, f"{name}_")
        else:
            yield name, str(key), value


def pid_alive(pid: Any) -> bool:
    """True when pid names a live (non-zombie) process."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return True  # no /proc: kill() said it exists
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


_TICKS = os.sysconf("SC_CLK_TCK") if "SC_CLK_TCK" in os.sysconf_names else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if "SC_PAGE_SIZE" in os.sysconf_names else 4096


def proc_usage(pid: Any) -> tuple[float, float] | None:
    """(CPU seconds, resident bytes) of a live process from /proc/PID/stat; None if unknown."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        # after the command: state(0) ... utime(11) stime(12) ... rss(21), in pages
        return (int(fields[11]) + int(fields[12])) / _TICKS, int(fields[21]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def health(doc: dict | None, now: float, alive: Callable[[Any], bool] = pid_alive,
           stale_after: float = STALE_AFTER) -> tuple[bool, str]:
    """(healthy, one-line reason): status.json present, fresh, and its supervisor alive."""
    if doc is None:
        return False, "no status.json"
    updated = _number(doc.get("updated_at"))
    if updated is None:
        return False, "status.json has no updated_at"
    age = now - updated
    if age > stale_after:
        return False, f"status.json is {age:.0f}s old (limit {stale_after:g}s)"
    if not alive(doc.get("pid")):
        return False, f"supervisor pid {doc.get('pid')} is not running"
    if doc.get("state") != "running":
        return False, f"supervisor is {doc.get('state')}"
    return True, f"ok: supervisor pid {doc['pid']}, status.json {max(age, 0.0):.1f}s old"


class StatusCollector(Collector):
    """prometheus_client collector: one read of status.json per scrape -> metric families.

    Missing keys are simply absent from the output; a missing or unreadable
    status.json yields collectord_up 0 and nothing else.
    """

    def __init__(self, status_path: str, clock: Callable[[], float] = time.time,
                 alive: Callable[[Any], bool] = pid_alive, stale_after: float = STALE_AFTER):
        self.status_path = status_path
        self.clock = clock
        self.alive = alive
        self.stale_after = stale_after
        self.last_pid: int | None = None  # the supervisor pid of the latest scrape

    def supervisor_pid(self) -> str:
        """For prometheus_client's ProcessCollector, collected right after this one."""
        return str(self.last_pid) if self.last_pid else "-"

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on what status.json holds at scrape time

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        doc = read_status(self.status_path)
        pid = (doc or {}).get("pid")
        self.last_pid = pid if isinstance(pid, int) and not isinstance(pid, bool) and self.alive(pid) else None
        ok, _ = health(doc, now, self.alive, self.stale_after)
        up = GaugeMetricFamily("collectord_up", "1 when status.json is fresh and its supervisor is alive.")
        up.add_metric([], 1.0 if ok else 0.0)
        yield up
        if doc is None:
            return
        yield from self._supervisor(doc, now)
        children = [c for c in doc.get("children") or () if isinstance(c, dict) and isinstance(c.get("name"), str)]
        yield from self._children(children, now)

    def _supervisor(self, doc: dict, now: float) -> Iterator[Metric]:
        alive = GaugeMetricFamily("collectord_supervisor_up", "1 when the supervisor pid in status.json is alive.")
        alive.add_metric([], 1.0 if self.alive(doc.get("pid")) else 0.0)
        yield alive
        updated = _number(doc.get("updated_at"))
        if updated is not None:
            age = GaugeMetricFamily("collectord_status_age_seconds", "Seconds since the supervisor wrote status.json.")
            age.add_metric([], max(0.0, now - updated))
            yield age
        started = _number(doc.get("started_at"))
        if started is not None:
            fam = GaugeMetricFamily("collectord_supervisor_start_time_seconds",
                                    "Unix time the supervisor started.")
            fam.add_metric([], started)
            yield fam
        state = GaugeMetricFamily("collectord_supervisor_state", "Supervisor state (one-hot).", labels=["state"])
        for name in SUPERVISOR_STATES:
            state.add_metric([name], 1.0 if doc.get("state") == name else 0.0)
        yield state

    def _children(self, children: list[dict], now: float) -> Iterator[Metric]:
        fams: dict[str, Metric] = {}

        def family(name: str, kind: str, doc: str, labels: tuple[str, ...] = ("collector",)) -> Metric:
            if name not in fams:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fams[name] = cls(name, doc, labels=list(labels))
            return fams[name]

        info = family("collectord_collector_info", "gauge", "Each child process and its target class.",
                      ("collector", "target"))
        for child in children:
            name = child["name"]
            info.add_metric([name, str(child.get("target") or "")], 1.0)
            state = family("collectord_collector_state", "gauge", "Child state (one-hot).", ("collector", "state"))
            for s in STATES:
                state.add_metric([name, s], 1.0 if child.get("state") == s else 0.0)
            for key, metric, help_text in (
                ("restarts", "collectord_collector_restarts", "Consecutive restarts (reset after reset_after s up)."),
                ("uptime", "collectord_collector_uptime_seconds", "Seconds the child process has been up."),
                ("heartbeat_age", "collectord_collector_heartbeat_age_seconds",
                 "Seconds since the child's last heartbeat."),
                ("next_start_in", "collectord_collector_next_start_seconds",
                 "Seconds until a child in BACKOFF is started again."),
            ):
                value = _number(child.get(key))
                if value is not None:
                    family(metric, "gauge", help_text).add_metric([name], value)
            usage = proc_usage(child.get("pid")) if child.get("state") in ("STARTING", "RUNNING", "STOPPING") else None
            if usage is not None:
                family("collectord_collector_cpu_seconds_total", "counter",
                       "User and system CPU seconds of the child process.").add_metric([name], usage[0])
                family("collectord_collector_resident_memory_bytes", "gauge",
                       "Resident memory of the child process (RSS; forked pages shared with the parent "
                       "count in each).").add_metric([name], usage[1])
            counters = child.get("counters")
            if isinstance(counters, dict):
                self._counters(name, counters, now, family)
        yield from fams.values()

    def _counters(self, name: str, counters: dict, now: float, family: Callable[..., Metric]) -> None:
        last = _number(counters.get("last_success"))
        if last is not None:
            family("collectord_collector_last_success_timestamp_seconds", "gauge",
                   "Unix time of the collector's last successful cycle.").add_metric([name], last)
            family("collectord_collector_last_success_age_seconds", "gauge",
                   "Seconds since the collector's last successful cycle.").add_metric([name], max(0.0, now - last))
        if OLDEST_GAP_KEY in counters:
            oldest = _number(counters.get(OLDEST_GAP_KEY))
            family("collectord_feed_gap_oldest_open_seconds", "gauge",
                   "Age of the oldest feed gap the collector owes (0 when it owes none).").add_metric(
                [name], max(0.0, now - oldest) if oldest is not None else 0.0)
        sockets = counters.get(SOCKET_STATUS_KEY)
        if isinstance(sockets, list):
            self._sockets(name, sockets, family)
        taken: set[str] = set()  # one sample per known metric: the top-level key wins, then the first nested
        for key, leaf, value in sorted(flatten(counters), key=lambda item: item[0] != item[1]):
            if key in ("last_success", "last_error", SOCKET_STATUS_KEY, OLDEST_GAP_KEY):
                continue
            number = _number(value)
            if number is None:
                continue
            known = KNOWN_COUNTERS.get(key) or KNOWN_COUNTERS.get(leaf)
            if known is not None and known[0] not in taken:
                metric, kind, scale, help_text = known
                taken.add(metric)
                family(metric, kind, help_text).add_metric([name], number * scale)
            else:
                family("collectord_collector_value", "gauge", "Any other numeric counter a collector reports.",
                       ("collector", "key")).add_metric([name, key], number)

    @staticmethod
    def _sockets(name: str, sockets: list, family: Callable[..., Metric]) -> None:
        """Per-socket rows [index, connected, last_message_age, reconnects, assets] (trades)."""
        labels = ("collector", "socket")
        columns = (
            (1, "collectord_socket_connected", "gauge", "1 when the WebSocket is open."),
            (2, "collectord_socket_last_message_age_seconds", "gauge", "Seconds since the socket's last message."),
            (3, "collectord_socket_reconnects", "counter", "Reconnects of this socket."),
            (4, "collectord_socket_assets", "gauge", "Assets subscribed on this socket."),
        )
        for row in sockets:
            if not isinstance(row, list) or not row or _number(row[0]) is None:
                continue
            index = str(int(row[0]))
            for col, metric, kind, help_text in columns:
                value = _number(row[col]) if len(row) > col else None
                if value is not None:
                    family(metric, kind, help_text, labels).add_metric([name, index], value)


class _Handler(WSGIRequestHandler):
    """One request; every socket operation times out; access lines go to DEBUG."""

    timeout = REQUEST_TIMEOUT  # StreamRequestHandler sets it on the connection

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("metrics %s: " + format, self.address_string(), *args)

    def get_stderr(self):  # wsgiref prints application tracebacks here
        return _LogStream()


class _LogStream:
    def write(self, text: str) -> None:
        if text.strip():
            log.error("metrics: %s", text.rstrip())

    def flush(self) -> None:
        pass


def parse_listen(listen: str) -> tuple[int, str, int]:
    """'host:port' / '[v6]:port' / ':port' -> (family, host, port). ValueError when malformed."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected host:port, got {listen!r}")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port_text)
    if ":" in host:
        return socket.AF_INET6, host, int(port_text)
    if host in ("", "*"):
        host = "0.0.0.0"
    return socket.AF_INET, host, int(port_text)


class MetricsServer:
    """The metrics child: construct in the supervisor, run() in the child, stop() on SIGTERM."""

    def __init__(self, *, status_path: str, listen: str, stale_after: float = STALE_AFTER,
                 name: str = "metrics", **_ignored: Any):
        self.name = name
        self.status_path = status_path
        self.listen = listen
        self.family, self.host, self.port = parse_listen(listen)
        self.stale_after = float(stale_after)
        self.counters: dict[str, Any] = {"rows_written": 0, "errors": 0, "last_success": None,
                                         "last_error": None, "scrapes": 0}
        self.reporter: Reporter | None = None
        self.server: WSGIServer | None = None
        self._stopping = False
        self._wake_r = self._wake_w = -1

    # -- supervisor seam -----------------------------------------------------
    def attach_supervisor(self, fd: int, heartbeat_every: float = 5.0) -> None:
        self.reporter = Reporter(fd, every=heartbeat_every)

    def stop(self) -> None:
        """Signal-handler safe: set the flag, wake the loop."""
        self._stopping = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    # -- WSGI ----------------------------------------------------------------
    def app(self) -> Callable:
        """The WSGI application: /metrics (prometheus_client), /healthz, / (an index)."""
        registry = CollectorRegistry(auto_describe=False)
        collector = StatusCollector(self.status_path, stale_after=self.stale_after)
        registry.register(collector)
        # collectord_supervisor_process_*: CPU, memory, fds of the supervisor (the
        # registry collects in registration order, so the pid is this scrape's).
        ProcessCollector(namespace="collectord_supervisor", pid=collector.supervisor_pid, registry=registry)
        metrics_app = make_wsgi_app(registry)

        def application(environ, start_response):
            path = environ.get("PATH_INFO") or "/"
            if path == "/metrics":
                self.counters["scrapes"] += 1
                self.counters["last_success"] = round(time.time(), 3)
                return metrics_app(environ, start_response)
            if path == "/healthz":
                ok, reason = health(read_status(self.status_path), time.time(), stale_after=self.stale_after)
                status = "200 OK" if ok else "503 Service Unavailable"
                body = (reason + "\n").encode()
            elif path == "/":
                status, body = "200 OK", b"collectord metrics: /metrics /healthz\n"
            else:
                status, body = "404 Not Found", b"not found\n"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Length", str(len(body)))])
            return [body]

        return application

    def bind(self) -> WSGIServer:
        """Create the listening server (in the child). A bad address exits 78; in use: 1."""
        family = self.family

        class Server(WSGIServer):
            address_family = family
            request_queue_size = 16

            def handle_error(self, request, client_address):
                """A peer that timed out or went away is one line; anything else a traceback."""
                err = sys.exc_info()[1]
                peer = client_address[0] if client_address else "?"
                if isinstance(err, OSError):
                    log.info("metrics: request from %s dropped: %s", peer, err)
                else:
                    log.warning("metrics: request from %s failed", peer, exc_info=True)

        try:
            server = Server((self.host, self.port), _Handler)
        except OSError as err:
            log.error("metrics: cannot listen on %s: %s", self.listen, err.strerror or err)
            if err.errno in (errno.EADDRINUSE,):
                raise SystemExit(1) from None  # may free up: retried with backoff
            raise SystemExit(EX_CONFIG) from None
        server.set_app(self.app())
        server.timeout = 0  # handle_request() runs only after our select said readable
        return server

    # -- the loop ------------------------------------------------------------
    def run(self) -> None:
        """Bind, then serve until stop(): select on listener + wake pipe, heartbeat, one request."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        if self._stopping:
            return
        self.server = self.bind()
        log.info("metrics: serving http://%s:%d/metrics", self.host, self.server.server_address[1])
        try:
            listener = self.server.fileno()
            while not self._stopping:
                self._beat()
                readable, _, _ = select.select([listener, self._wake_r], [], [], 1.0)
                if self._wake_r in readable:
                    try:
                        os.read(self._wake_r, 64)
                    except BlockingIOError:
                        pass
                if listener in readable and not self._stopping:
                    try:
                        self.server.handle_request()
                    except Exception as err:  # one bad request never ends the server
                        self.counters["errors"] += 1
                        self.counters["last_error"] = f"{type(err).__name__}: {err}"[:300]
                        log.warning("metrics: request failed: %s", err)
        finally:
            self.server.server_close()
            if self.reporter is not None:
                self.reporter.send(dict(self.counters), force=True)

    def _beat(self) -> None:
        if self.reporter is not None:
            self.reporter.send(dict(self.counters))
