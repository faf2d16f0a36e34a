"""collectord.metrics: the exposition built from status.json, and the real endpoint over loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from collectord import metrics
from collectord.status import write as write_status

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000.0


def status_doc(pid: int, updated_at: float, state: str = "running") -> dict:
    return {
        "version": 1, "pid": pid, "started_at": updated_at - 100, "updated_at": updated_at,
        "config": "/etc/collectord/collectord.conf", "dsn": "host=db password=***", "state": state,
        "children": [
            {"name": "markets", "target": "workers.markets:MarketsCollector", "state": "RUNNING", "pid": 11,
             "started_at": updated_at - 90, "uptime": 90.0, "restarts": 0, "last_exit": None,
             "next_start_in": None, "heartbeat_age": 0.5,
             "counters": {"rows_written": 1234, "errors": 2, "last_success": updated_at - 3,
                          "last_error": "HttpError: 503", "spool_bytes": 0, "last_batch_ms": 12.5,
                          "db_ok": True, "writer": {"batches": 7}}},
            {"name": "trades.0", "target": "workers.trades:TradesCollector", "state": "BACKOFF", "pid": None,
             "started_at": None, "uptime": None, "restarts": 3, "last_exit": "signal 9",
             "next_start_in": 17.5, "heartbeat_age": None,
             "counters": {"rows_written": 50, "errors": 0, "last_success": None, "last_error": None,
                          "reconnects": 4, "gaps_open": 2, "sockets": 2, "sockets_connected": 1,
                          "gaps_oldest_open_at": updated_at - 600, "gaps_unrecoverable": 1,
                          "socket_status": [[0, 1, 0.3, 1, 400], [1, 0, None, 3, 12]]}},
        ],
    }


def scrape_registry(path: str, now: float = NOW, alive=lambda pid: pid == 4242) -> dict:
    """{(name, labels-tuple): value} of one collect() through prometheus_client's parser."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.StatusCollector(path, clock=lambda: now, alive=alive))
    return samples(generate_latest(registry).decode())


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def test_exposition_from_status_json(tmp_path):
    path = tmp_path / "status.json"
    path.write_text(json.dumps(status_doc(4242, NOW - 1)))
    got = scrape_registry(str(path))
    assert got[("collectord_up", ())] == 1
    assert got[("collectord_supervisor_up", ())] == 1
    assert got[("collectord_status_age_seconds", ())] == pytest.approx(1.0)
    assert got[("collectord_supervisor_state", (("state", "running"),))] == 1
    m = (("collector", "markets"),)
    t = (("collector", "trades.0"),)
    assert got[("collectord_collector_state", m + (("state", "RUNNING"),))] == 1
    assert got[("collectord_collector_state", m + (("state", "FATAL"),))] == 0
    assert got[("collectord_collector_state", t + (("state", "BACKOFF"),))] == 1
    assert got[("collectord_collector_restarts", t)] == 3
    assert got[("collectord_collector_next_start_seconds", t)] == 17.5
    assert ("collectord_collector_uptime_seconds", t) not in got  # null -> absent
    assert got[("collectord_collector_rows_written_total", m)] == 1234
    assert got[("collectord_collector_errors_total", m)] == 2
    assert got[("collectord_collector_last_success_age_seconds", m)] == pytest.approx(4.0)
    assert ("collectord_collector_last_success_age_seconds", t) not in got
    assert got[("collectord_collector_writer_batch_latency_seconds", m)] == pytest.approx(0.0125)
    assert got[("collectord_collector_spool_bytes", m)] == 0
    assert got[("collectord_collector_db_up", m)] == 1
    assert got[("collectord_collector_writer_batches_total", m)] == 7  # nested writer.batches
    assert got[("collectord_collector_socket_reconnects_total", t)] == 4
    assert got[("collectord_collector_gaps_open", t)] == 2
    # The oldest owed gap as an age at scrape time (alert on it); only collectors that owe gaps.
    assert got[("collectord_feed_gap_oldest_open_seconds", t)] == pytest.approx(601.0)
    assert ("collectord_feed_gap_oldest_open_seconds", m) not in got
    assert got[("collectord_collector_gaps_unrecoverable_total", t)] == 1
    assert not any(dict(k[1]).get("key") == "gaps_oldest_open_at" for k in got)
    assert got[("collectord_collector_sockets_connected", t)] == 1
    assert got[("collectord_socket_connected", t + (("socket", "1"),))] == 0
    assert got[("collectord_socket_assets", t + (("socket", "0"),))] == 400
    assert ("collectord_socket_last_message_age_seconds", t + (("socket", "1"),)) not in got
    assert got[("collectord_collector_info", (("collector", "markets"), ("target", "workers.markets:MarketsCollector")))] == 1
    # The password-redacted DSN and error texts are not metrics.
    assert not any("password" in str(k) or "503" in str(k) for k in got)


def test_a_collector_owing_no_gap_reports_an_oldest_age_of_zero(tmp_path):
    doc = status_doc(4242, NOW)
    doc["children"][1]["counters"].update(gaps_open=0, gaps_oldest_open_at=None)
    path = tmp_path / "status.json"
    path.write_text(json.dumps(doc))
    got = scrape_registry(str(path))
    assert got[("collectord_feed_gap_oldest_open_seconds", (("collector", "trades.0"),))] == 0


def test_missing_status_json_is_down_and_nothing_else(tmp_path):
    got = scrape_registry(str(tmp_path / "nope.json"))
    assert got == {("collectord_up", ()): 0}


def test_unknown_numeric_counters_go_to_the_generic_family(tmp_path):
    doc = status_doc(4242, NOW)
    doc["children"][0]["counters"]["cycle_seconds"] = 1.5
    doc["children"][0]["counters"]["weird"] = "text"
    path = tmp_path / "status.json"
    path.write_text(json.dumps(doc))
    got = scrape_registry(str(path))
    assert got[("collectord_collector_value", (("collector", "markets"), ("key", "cycle_seconds")))] == 1.5
    assert not any(dict(k[1]).get("key") == "weird" for k in got)


@pytest.mark.parametrize(
    "doc, alive, healthy, reason",
    [
        (None, True, False, "no status.json"),
        (status_doc(4242, NOW - 5), True, True, "ok"),
        (status_doc(4242, NOW - 31), True, False, "old"),
        (status_doc(4242, NOW - 5), False, False, "not running"),
        (status_doc(4242, NOW - 5, state="stopping"), True, False, "stopping"),
        ({"pid": 4242}, True, False, "updated_at"),
    ],
)
def test_health_verdicts(doc, alive, healthy, reason):
    ok, why = metrics.health(doc, NOW, alive=lambda pid: alive, stale_after=30)
    assert ok is healthy and reason in why


def test_pid_alive_checks_the_process():
    assert metrics.pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    assert not metrics.pid_alive(proc.pid)
    assert not metrics.pid_alive(None) and not metrics.pid_alive(True) and not metrics.pid_alive(0)


@pytest.mark.parametrize("listen, want", [
    ("127.0.0.1:9108", (socket.AF_INET, "127.0.0.1", 9108)),
    (":9108", (socket.AF_INET, "0.0.0.0", 9108)),
    ("[::1]:9108", (socket.AF_INET6, "::1", 9108)),
])
def test_parse_listen(listen, want):
    assert metrics.parse_listen(listen) == want


def test_bad_listen_is_refused_at_construction():
    with pytest.raises(ValueError):
        metrics.MetricsServer(status_path="/nonexistent", listen="localhost")


# -- the real endpoint, in its own process, over loopback ----------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 20.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_listening(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


SERVE = """
import os, signal, sys
from collectord.metrics import MetricsServer
server = MetricsServer(status_path=sys.argv[1], listen=sys.argv[2], name="metrics")
server.attach_supervisor(int(sys.argv[3]))
signal.signal(signal.SIGTERM, lambda *_: server.stop())
server.run()
os._exit(0)
"""


@pytest.fixture
def endpoint(tmp_path):
    """A MetricsServer process on a free loopback port, its heartbeat pipe and status path."""
    status_path = tmp_path / "status.json"
    port = free_port()
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(status_path), f"127.0.0.1:{port}", str(w)],
                            pass_fds=(w,), cwd=ROOT)
    os.close(w)
    try:
        wait_listening(port, time.monotonic() + 30)
        yield proc, port, status_path, r
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(r)


def test_endpoint_scraped_over_loopback(endpoint):
    proc, port, status_path, hb = endpoint
    base = f"http://127.0.0.1:{port}"
    code, body = get(base + "/healthz")
    assert code == 503 and "no status.json" in body
    doc = status_doc(os.getpid(), time.time())
    doc["children"][0]["pid"] = os.getpid()  # a live process to measure
    write_status(str(status_path), doc)
    code, body = get(base + "/metrics")
    assert code == 200
    got = samples(body)
    assert got[("collectord_up", ())] == 1
    assert got[("collectord_collector_rows_written_total", (("collector", "markets"),))] == 1234
    # CPU and memory of the supervisor (prometheus_client's ProcessCollector) and of a child (/proc).
    assert got[("collectord_supervisor_process_resident_memory_bytes", ())] > 1e6
    assert got[("collectord_collector_resident_memory_bytes", (("collector", "markets"),))] > 1e6
    assert got[("collectord_collector_cpu_seconds_total", (("collector", "markets"),))] > 0
    assert ("collectord_collector_resident_memory_bytes", (("collector", "trades.0"),)) not in got  # BACKOFF
    code, body = get(base + "/healthz")
    assert code == 200 and body.startswith("ok")
    assert get(base + "/nope")[0] == 404
    # Stale status.json, then a dead supervisor pid: unhealthy, and collectord_up 0.
    write_status(str(status_path), status_doc(os.getpid(), time.time() - 120))
    code, body = get(base + "/healthz")
    assert code == 503 and "old" in body
    assert samples(get(base + "/metrics")[1])[("collectord_up", ())] == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    write_status(str(status_path), status_doc(dead.pid, time.time()))
    code, body = get(base + "/healthz")
    assert code == 503 and "not running" in body
    # The child reports heartbeats and its scrape count to the supervisor pipe.
    os.set_blocking(hb, False)
    lines = [json.loads(x) for x in os.read(hb, 65536).decode().splitlines() if x]
    assert any("hb" in m for m in lines)
    assert any(isinstance(m.get("status"), dict) and "scrapes" in m["status"] for m in lines)
    # SIGTERM: stop() wakes the loop, the process exits 0 promptly.
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 5


def test_a_stuck_scraper_is_cut_off(endpoint):
    """A client that connects and sends nothing holds the server at most REQUEST_TIMEOUT."""
    proc, port, status_path, _ = endpoint
    write_status(str(status_path), status_doc(os.getpid(), time.time()))
    stuck = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        time.sleep(0.2)  # let the server accept the silent one first
        t0 = time.monotonic()
        code, _ = get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        waited = time.monotonic() - t0
        assert code == 200
        assert waited < metrics.REQUEST_TIMEOUT + 10
    finally:
        stuck.close()
    assert proc.poll() is None


def test_port_in_use_exits_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-c",
             "from collectord.metrics import MetricsServer as M; import sys; "
             f"M(status_path='{tmp_path}/s.json', listen='127.0.0.1:{port}').run()"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr



# -- under the real supervisor ---------------------------------------------------

SLEEPER = '''
import time

class Sleeper:
    def __init__(self, **kwargs):
        self.stopping = False

    def run(self):
        while not self.stopping:
            time.sleep(0.1)

    def stop(self):
        self.stopping = True
'''


def test_supervisor_runs_the_metrics_child(tmp_path, pg_dsn):
    """metrics_listen set: `collectord start` spawns `metrics`; a scrape shows every child."""
    from collectord.config import BUILTIN_TARGETS

    (tmp_path / "metrics_target_sleeper.py").write_text(SLEEPER)
    port = free_port()
    lines = ["[collectord]", f"pidfile = {tmp_path / 'run' / 'collectord.pid'}",
             f"logfile = {tmp_path / 'collectord.log'}", f"data_dir = {tmp_path / 'data'}",
             f"dsn = {pg_dsn}", "allow_root = yes", f"metrics_listen = 127.0.0.1:{port}", "graceful_timeout = 5", ""]
    for name in BUILTIN_TARGETS:
        lines += [f"[collector:{name}]", "enabled = no", ""]
    lines += ["[collector:sleeper]", "target = metrics_target_sleeper:Sleeper", ""]
    conf = tmp_path / "collectord.conf"
    conf.write_text("\n".join(lines))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    cli = [sys.executable, "-m", "collectord", "-c", str(conf)]
    start = subprocess.run(cli + ["start"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    try:
        wait_listening(port, time.monotonic() + 60)
        deadline = time.monotonic() + 60
        while True:
            got = samples(get(f"http://127.0.0.1:{port}/metrics")[1])
            running = {dict(k[1])["collector"] for k, v in got.items()
                       if k[0] == "collectord_collector_state" and dict(k[1])["state"] == "RUNNING" and v == 1}
            if {"sleeper", "metrics"} <= running and got.get(("collectord_up", ())) == 1:
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.5)
        code, body = get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200, body
    finally:
        stop = subprocess.run(cli + ["stop"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_polling_collectors_lease_is_a_gauge_and_its_role_shows_in_status(tmp_path):
    """lease_active (workers/storage/lease.py) -> collectord_collector_lease_active; the role and
    the holder's name are text: in `collectord status` ("RUNNING (standby)"), not in /metrics."""
    from collectord.control import status_lines

    doc = status_doc(4242, NOW)
    doc["children"][0]["counters"].update(role="standby", lease_active=0, lease_holder="collectord:markets lease a")
    path = tmp_path / "status.json"
    path.write_text(json.dumps(doc))
    got = scrape_registry(str(path))
    assert got[("collectord_collector_lease_active", (("collector", "markets"),))] == 0
    assert not any(dict(k[1]).get("key") in ("role", "lease_holder") for k in got)
    lines = status_lines(doc, NOW)
    assert lines[1].split()[:3] == ["markets", "RUNNING", "(standby)"], lines
    doc["children"][0]["counters"]["role"] = "active"
    assert status_lines(doc, NOW)[1].split()[:3] == ["markets", "RUNNING", "(active)"]
