"""Supervisor scenarios (supervisor-scenarios.md) with real forked children and real signals.

Each test runs a real supervisor in a subprocess (tests.sup_targets runner) and
observes it from outside: the children's own event records (CLOCK_MONOTONIC,
comparable with this process's time.monotonic()), /proc, the log, status.json.
Delays are scaled down through [restart] except S2, which uses the real 5 s.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.sup_targets import (
    SupervisorRun,
    alive,
    children_of,
    fd_targets,
    proc_stat,
    proc_status,
    wait_for,
)

SLACK = 0.5  # upper tolerance for a timer on a busy 2-core machine
EARLY = 0.02  # a restart may never come earlier than its delay (minus clock noise)


@pytest.fixture
def sup(tmp_path):
    runs: list[SupervisorRun] = []

    def make(collectors, main=None, restart=None) -> SupervisorRun:
        run = SupervisorRun(tmp_path, collectors, main, restart)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.cleanup()


def gone_or_zombie(pid):
    st = proc_stat(pid)
    return st is None or st["state"] in ("Z", "X")


def restart_delays(run, name):
    """[next start time - previous exit time] from the child's own records."""
    evs = [e for e in run.events(name=name) if e["ev"] in ("start", "exit")]
    out, last_exit = [], None
    for e in evs:
        if e["ev"] == "exit":
            last_exit = e["t"]
        elif last_exit is not None:
            out.append(e["t"] - last_exit)
            last_exit = None
    return out


def test_s2_kill9_restarts_after_real_5s_siblings_unchanged(sup):
    run = sup(
        {n: {"target": "Sleeper"} for n in ("a", "b", "c")},
        restart={"backoff_initial": 5, "backoff_max": 60},
    ).start(wait_started=("a", "b", "c"))
    pids = {n: run.starts(n)[0]["pid"] for n in "abc"}
    before = {n: proc_stat(pids[n]) for n in "ac"}
    assert all(proc_stat(p)["ppid"] == run.pid for p in pids.values())
    t_kill = run.kill_pid(pids["b"])
    # reaped quickly: no zombie left for > 1 s
    wait_for(lambda: proc_stat(pids["b"]) is None, 1.0, 0.005, "killed child reaped")
    new = run.wait_start("b", 2, timeout=10)
    delay = new["t"] - t_kill
    assert 5.0 - EARLY <= delay <= 5.5, delay
    assert new["pid"] != pids["b"]
    for n in "ac":
        assert proc_stat(pids[n])["starttime"] == before[n]["starttime"]
        assert len(run.starts(n)) == 1
    assert run.child_status("b") is not None


def test_s3_crash_loop_schedule_then_fatal(sup):
    run = sup(
        {"crash": {"target": "Crasher"}, "ok": {"target": "Sleeper"}},
        restart={"backoff_initial": 0.2, "backoff_max": 1.6, "max_restarts": 5},
    ).start(wait_started=("ok",))
    ok_pid = run.starts("ok")[0]["pid"]
    ok_start = proc_stat(ok_pid)["starttime"]
    st = run.wait_state("crash", "FATAL", timeout=15)
    assert st["restarts"] == 5 and st["last_exit"] == "exit 1" and st["pid"] is None
    t_fatal = time.monotonic()
    delays = restart_delays(run, "crash")
    expected = [0.2, 0.4, 0.8, 1.6, 1.6]
    assert len(run.starts("crash")) == 6
    for got, want in zip(delays, expected, strict=True):
        assert want - EARLY <= got <= want + SLACK, (delays, expected)
    # FATAL: no spawn afterwards (scaled from 2 min: 10x the longest delay)
    time.sleep(max(0.0, 2.0 - (time.monotonic() - t_fatal)))
    assert len(run.starts("crash")) == 6
    assert proc_stat(ok_pid)["starttime"] == ok_start and len(run.starts("ok")) == 1
    assert "crash: pid" in run.log() and "restarts used up: FATAL" in run.log()


def test_s4_counter_resets_after_stable_uptime(sup):
    # 'stable' stays up 1.0 s > reset_after: every restart waits the initial 0.3 s.
    # 'short' stays up 0.3 s < reset_after: its delays double.
    run = sup(
        {"stable": {"target": "Crasher", "after": "1.0"}, "short": {"target": "Crasher", "after": "0.3"}},
        restart={"backoff_initial": 0.3, "backoff_max": 5, "max_restarts": 5, "reset_after": 0.8},
    ).start()
    run.wait_start("stable", 4, timeout=15)
    run.wait_start("short", 4, timeout=15)
    stable = restart_delays(run, "stable")[:3]
    short = restart_delays(run, "short")[:3]
    for got in stable:
        assert 0.3 - EARLY <= got <= 0.3 + SLACK, stable
    for got, want in zip(short, [0.3, 0.6, 1.2]):
        assert want - EARLY <= got <= want + SLACK, short


def test_s5_fast_crashers_fatal_after_six_spawns_never_running(sup):
    cols = {f"crash{i}": {"target": "Crasher"} for i in range(3)}
    cols.update({f"ok{i}": {"target": "Sleeper"} for i in range(2)})
    run = sup(cols, main={"startsecs": 0.5}, restart={"backoff_initial": 0.05, "backoff_max": 0.4}).start()
    for i in range(3):
        run.wait_state(f"crash{i}", "FATAL", timeout=15)
    ok_pids = [run.starts(f"ok{i}")[0]["pid"] for i in range(2)]
    log = run.log()
    for i in range(3):
        assert len(run.starts(f"crash{i}")) == 6
        assert f"crash{i}: STARTING -> RUNNING" not in log
    for i in range(2):
        assert run.wait_state(f"ok{i}", "RUNNING")["pid"] == ok_pids[i]
        assert len(run.starts(f"ok{i}")) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_s6_stop_all_cooperative(sup, sig):
    names = [f"w{i}" for i in range(5)]
    run = sup({n: {"target": "Sleeper"} for n in names}).start(wait_started=tuple(names))
    pids = [run.starts(n)[0]["pid"] for n in names]
    wait_for(lambda: run.status_path.exists(), 2, what="status.json")
    t0 = run.send(sig)
    assert run.wait_exit(5) == 0
    assert time.monotonic() - t0 <= 1.0
    for n in names:
        assert len(run.events("term", n)) == 1  # exactly one SIGTERM each
        assert len(run.events("exit", n)) == 1
    assert not any(alive(p) for p in pids)
    assert not run.pidfile.exists() and not run.status_path.exists()


def test_s7_stop_with_one_ignoring_sigterm(sup):
    names = [f"w{i}" for i in range(4)]
    cols = {n: {"target": "Sleeper"} for n in names}
    cols["stubborn"] = {"target": "Ignorer"}
    run = sup(cols, main={"graceful_timeout": 2}).start(wait_started=tuple(names) + ("stubborn",))
    stubborn = run.starts("stubborn")[0]["pid"]
    t0 = run.send(signal.SIGTERM)
    wait_for(lambda: run.events("term", "stubborn"), 2, what="stubborn got SIGTERM")
    t_gone = wait_for(lambda: gone_or_zombie(stubborn) and time.monotonic(), 5, 0.005, "stubborn killed")
    assert run.wait_exit(5) == 0
    elapsed = time.monotonic() - t0
    assert 2.0 - EARLY <= t_gone - t0 <= 2.0 + SLACK
    assert elapsed <= 2.0 + 1.0
    for n in names:
        assert run.events("exit", n)[0]["t"] - t0 <= 1.0
    assert "SIGKILL" in run.log()


def test_s8_second_sigterm_kills_now(sup):
    run = sup({"stubborn": {"target": "Ignorer"}, "w": {"target": "Sleeper"}}, main={"graceful_timeout": 30}).start(
        wait_started=("stubborn", "w")
    )
    stubborn = run.starts("stubborn")[0]["pid"]
    run.send(signal.SIGTERM)
    wait_for(lambda: run.events("term", "stubborn"), 2, 0.005, "first SIGTERM reached the child")
    t1 = run.send(signal.SIGTERM)
    wait_for(lambda: gone_or_zombie(stubborn), 2, 0.002, "stubborn killed")
    latency = time.monotonic() - t1
    assert latency <= 0.2, latency
    assert run.wait_exit(5) == 0


def test_s9_kill9_supervisor_children_follow(sup):
    names = ("a", "b", "c")
    run = sup({n: {"target": "Sleeper"} for n in names}).start(wait_started=names)
    pids = [run.starts(n)[0]["pid"] for n in names]
    t0 = run.kill_pid(run.pid)
    run.wait_exit(5)
    wait_for(lambda: not any(alive(p) for p in pids), 1.0, 0.01, "children gone after supervisor kill -9")
    assert time.monotonic() - t0 <= 1.0
    for n in names:  # they got SIGTERM (PR_SET_PDEATHSIG) and exited by themselves
        assert run.events("term", n)


@pytest.mark.parametrize("ignore", ["no", "yes"])
def test_s12_grandchildren_gone_after_stop(sup, ignore):
    run = sup(
        {
            "plain": {"target": "Forker", "mode": "plain", "ignore_term": ignore},
            "setsid": {"target": "Forker", "mode": "setsid", "ignore_term": ignore},
        },
        main={"graceful_timeout": 1.5},
    ).start(wait_started=("plain", "setsid"))
    grand = wait_for(lambda: (lambda g: g if len(g) == 2 else None)(run.events("grandchild")), 5, what="grandchildren")
    gpids = [g["pid"] for g in grand]
    assert all(alive(p) for p in gpids)
    kids = [run.starts(n)[0]["pid"] for n in ("plain", "setsid")]
    setsid_g = [g["pid"] for g in grand if g["mode"] == "setsid"][0]
    assert proc_stat(setsid_g)["sid"] == setsid_g  # really left the child's session
    t0 = run.send(signal.SIGTERM)
    assert run.wait_exit(5) == 0
    wait_for(lambda: not any(alive(p) for p in gpids + kids), 1.0, 0.01, "grandchildren gone")
    assert time.monotonic() - t0 <= 1.5 + 1.0


def test_s12_orphaned_grandchild_of_crashed_child_stopped(sup):
    """A child that dies leaves a setsid grandchild: it is re-parented to us and stopped with us."""
    run = sup(
        {"forker": {"target": "Forker", "mode": "setsid"}, "w": {"target": "Sleeper"}},
        main={"graceful_timeout": 1.5},
        restart={"backoff_initial": 30, "backoff_max": 30},
    ).start(wait_started=("forker", "w"))
    g = wait_for(lambda: run.events("grandchild"), 5, what="grandchild")[0]["pid"]
    run.kill_pid(run.starts("forker")[0]["pid"])
    wait_for(lambda: proc_stat(g) and proc_stat(g)["ppid"] == run.pid, 2, what="orphan adopted by the supervisor")
    run.send(signal.SIGTERM)
    assert run.wait_exit(5) == 0
    wait_for(lambda: not alive(g), 1.0, what="orphan gone")


def test_s13_stop_during_backoff(sup):
    run = sup(
        {"crash": {"target": "Crasher"}, "w": {"target": "Sleeper"}},
        restart={"backoff_initial": 2, "backoff_max": 2},
    ).start(wait_started=("crash", "w"))
    run.wait_state("crash", "BACKOFF")
    t0 = run.send(signal.SIGTERM)
    assert run.wait_exit(5) == 0
    assert time.monotonic() - t0 <= 1.0
    time.sleep(2.3 - (time.monotonic() - t0))  # past the moment the restart was due
    assert len(run.starts("crash")) == 1


def test_s14_100_restarts_no_fd_or_memory_growth(sup):
    cols = {"crash": {"target": "Crasher"}, "w": {"target": "Sleeper"}, "v": {"target": "Sleeper"}}
    restart = {"backoff_initial": 0, "backoff_max": 0, "max_restarts": 0}
    run = sup(cols, restart=restart).start(wait_started=("w", "v"))
    run.wait_state("crash", "FATAL")
    time.sleep(0.3)
    fds0 = len(fd_targets(run.pid))
    rss0 = int(proc_status(run.pid)["VmRSS"].split()[0])
    # SIGHUP with a larger max_restarts: the FATAL child is retried -> 101 spawns.
    run.write_config(cols, restart=dict(restart, max_restarts=100))
    run.send(signal.SIGHUP)
    wait_for(lambda: len(run.starts("crash")) >= 101, 60, 0.05, "100 restarts")
    run.wait_state("crash", "FATAL", timeout=10)
    time.sleep(0.3)
    fds1 = len(fd_targets(run.pid))
    rss1 = int(proc_status(run.pid)["VmRSS"].split()[0])
    assert len(run.starts("crash")) == 102  # 1 before reload + 101 after
    assert abs(fds1 - fds0) <= 1, (fds0, fds1)
    assert rss1 - rss0 < 2048, (rss0, rss1)
    # A child's fds: no PID file, no lock, no sibling's pipe (only its own heartbeat pipe).
    w = run.starts("w")[0]["pid"]
    v = run.starts("v")[0]["pid"]
    fds_w = fd_targets(w)
    assert not any(str(run.pidfile) in t for t in fds_w.values())
    with open("/proc/locks") as fh:
        lock_pids = {int(line.split()[4]) for line in fh if len(line.split()) > 4}
    assert w not in lock_pids and v not in lock_pids
    assert run.pid in lock_pids
    # Beyond 0-2 the child holds only the pipe its own run() made (Sleeper's wake pipe):
    # nothing shared with its sibling or the supervisor.
    own = {t for fd, t in fds_w.items() if fd > 2}
    assert all(t.startswith("pipe:") for t in own) and len(own) <= 1, fds_w
    shared = own & (set(fd_targets(v).values()) | set(fd_targets(run.pid).values()))
    assert not shared, shared


def test_s15_idle_supervisor_cpu_and_wakeups(sup):
    names = tuple(f"w{i}" for i in range(5))
    run = sup({n: {"target": "Sleeper"} for n in names}).start(wait_started=names)
    for n in names:
        run.wait_state(n, "RUNNING")
    time.sleep(0.5)  # let the last status write and promotions pass
    window = 10.0
    cpu0 = proc_stat(run.pid)["cpu_ticks"]
    sw0 = int(proc_status(run.pid)["voluntary_ctxt_switches"]) + int(proc_status(run.pid)["nonvoluntary_ctxt_switches"])
    time.sleep(window)
    cpu1 = proc_stat(run.pid)["cpu_ticks"]
    sw1 = int(proc_status(run.pid)["voluntary_ctxt_switches"]) + int(proc_status(run.pid)["nonvoluntary_ctxt_switches"])
    # 60 ms per 60 s scaled to 10 s is 10 ms: one clock tick; allow one more for tick rounding.
    assert (cpu1 - cpu0) <= 2, f"{(cpu1 - cpu0) * 10} ms CPU in {window}s"
    assert sw1 - sw0 <= 2, f"{sw1 - sw0} context switches in {window}s idle"


def test_s16_exit_detection_latency(sup):
    run = sup({"w": {"target": "Sleeper"}, "v": {"target": "Sleeper"}}, restart={"backoff_initial": 0, "backoff_max": 0, "max_restarts": 100}).start(
        wait_started=("w", "v")
    )
    latencies = []
    for i in range(5):
        old = run.starts("w")[-1]["pid"]
        wait_for(lambda: old in children_of(run.pid), 2, what="child listed")
        t0 = run.kill_pid(old)
        new = wait_for(lambda: [p for p in children_of(run.pid) if p != old and p != run.starts("v")[0]["pid"]], 2, 0.0005, "new child")
        latencies.append(time.monotonic() - t0)
        run.recorded.update(new)
        run.wait_start("w", i + 2)
    latencies.sort()
    assert latencies[len(latencies) // 2] <= 0.05, latencies
    assert latencies[-1] <= 0.5, latencies


def test_s17_signal_storm_while_crashing(sup):
    cols = {
        "crash1": {"target": "Exiter", "code": "3"},
        "crash2": {"target": "Exiter", "code": "3"},
        "w": {"target": "Sleeper"},
    }
    run = sup(cols, restart={"backoff_initial": 0.02, "backoff_max": 0.05, "max_restarts": 100000}).start(wait_started=("w",))
    w = run.starts("w")[0]["pid"]
    t_end = time.monotonic() + 1.0
    for i in range(200):
        run.send(signal.SIGHUP if i % 2 == 0 else signal.SIGUSR1)
        time.sleep(max(0.0, (t_end - time.monotonic()) / max(1, 200 - i)))
    time.sleep(0.3)
    assert run.proc.poll() is None
    run.send(signal.SIGTERM)
    assert run.wait_exit(5) == 0
    log = run.log()
    assert "reentrant call" not in log and "Traceback" not in log
    for n in ("crash1", "crash2"):
        spawned = log.count(f"{n}: spawned pid")
        exits = run.events("exit", n)
        assert len(run.starts(n)) == spawned >= 10
        accounted = log.count(f"{n}: pid ")  # one line per reaped exit
        assert accounted == spawned == len(exits), (accounted, spawned, len(exits))
    assert run.starts("w")[0]["pid"] == w and len(run.starts("w")) == 1


def test_s18_unimportable_and_raising_targets(sup):
    cols = {
        "noimport": {"target": "tests.no_such_module:Nothing"},
        "initraise": {"target": "InitRaiser"},
        "badopt": {"target": "Beater", "interval": "abc"},
        "exit78": {"target": "Exiter", "code": "78"},
        "w": {"target": "Sleeper"},
    }
    run = sup(cols, restart={"backoff_initial": 0.1, "backoff_max": 0.2, "max_restarts": 2}).start(wait_started=("w",))
    for n in ("noimport", "initraise", "badopt", "exit78"):
        run.wait_state(n, "FATAL", timeout=10)
    log = run.log()
    assert "noimport: cannot start (tests.no_such_module:Nothing): cannot import tests.no_such_module" in log
    assert log.count("noimport: cannot start") == 3  # failed starts retried with backoff
    assert log.count("initraise: cannot start") == 3 and "RuntimeError: init_raiser: cannot construct" in log
    assert log.count("badopt: cannot start") == 1 and "option interval" in log  # bad option: FATAL at once
    assert len(run.starts("exit78")) == 1 and "exit 78 (configuration error): FATAL" in log
    assert run.proc.poll() is None
    assert run.wait_state("w", "RUNNING")["pid"] == run.starts("w")[0]["pid"]


def test_s19_sigterm_while_starting(sup):
    names = tuple(f"s{i}" for i in range(5))
    run = sup({n: {"target": "SlowInit", "init_delay": "0.4"} for n in names}).start()
    wait_for(lambda: len(run.events("start")) >= 2, 10, 0.005, "2 of 5 spawned")
    t0 = run.send(signal.SIGTERM)
    assert run.wait_exit(5) == 0
    assert time.monotonic() - t0 <= 1.0
    assert len(run.events("start")) <= 3
    assert not any(alive(e["pid"]) for e in run.events())
    assert not run.pidfile.exists() and not run.status_path.exists()


def test_s20_sighup_during_stop_restarts_nothing(sup):
    run = sup({"stubborn": {"target": "Ignorer"}, "w": {"target": "Sleeper"}}, main={"graceful_timeout": 1.5}).start(
        wait_started=("stubborn", "w")
    )
    run.send(signal.SIGTERM)
    time.sleep(0.5)
    run.send(signal.SIGHUP)
    assert run.wait_exit(5) == 0
    assert len(run.starts("w")) == 1 and len(run.starts("stubborn")) == 1
    assert "SIGHUP while stopping: ignored" in run.log()


def test_s21_reload_changed_added_removed_and_fatal_retried(sup):
    cols = {
        "same": {"target": "Sleeper"},
        "changed": {"target": "Sleeper", "x": "1"},
        "removed": {"target": "Sleeper"},
        "fatal": {"target": "Exiter", "code": "78"},
    }
    run = sup(cols).start(wait_started=("same", "changed", "removed", "fatal"))
    run.wait_state("fatal", "FATAL")
    same = run.starts("same")[0]["pid"]
    same_start = proc_stat(same)["starttime"]
    removed = run.starts("removed")[0]["pid"]
    # A broken config is refused and changes nothing.
    run.ini.write_text(run.ini.read_text() + "\n[collectord]\nbogus = 1\n")
    run.send(signal.SIGHUP)
    wait_for(lambda: "reload failed, keeping the running configuration" in run.log(), 3, what="bad reload logged")
    new_cols = dict(cols)
    new_cols["changed"] = {"target": "Sleeper", "x": "2"}
    new_cols["added"] = {"target": "Sleeper"}
    del new_cols["removed"]
    run.write_config(new_cols)
    run.send(signal.SIGHUP)
    run.wait_start("changed", 2)
    run.wait_start("added", 1)
    run.wait_start("fatal", 2)
    wait_for(lambda: not alive(removed), 3, what="removed collector stopped")
    time.sleep(0.5)
    assert len(run.starts("changed")) == 2 and run.events("term", "changed")
    assert run.events("term", "removed") and len(run.starts("removed")) == 1
    assert proc_stat(same)["starttime"] == same_start and len(run.starts("same")) == 1
    assert run.child_status("removed") is None
    assert run.proc.poll() is None


@pytest.mark.parametrize("sig, line", [(signal.SIGHUP, "reloaded"), (signal.SIGUSR1, "log files reopened")])
def test_s23_log_renamed_then_reload(sup, sig, line):
    run = sup({"w": {"target": "Sleeper"}, "b": {"target": "Beater"}}).start(wait_started=("w", "b"))
    wait_for(lambda: run.log_path.exists() and "spawned pid" in run.log(), 3, what="log written")
    rotated = run.log_path.with_name("collectord.log.1")
    run.log_path.rename(rotated)
    t0 = run.send(sig)
    wait_for(lambda: run.log_path.exists(), 1.0, 0.005, "new log file")
    assert time.monotonic() - t0 <= 1.0
    wait_for(lambda: line in run.log(), 2, what="reopen logged in the new file")
    rotated.unlink()  # logrotate compresses and deletes the old file
    time.sleep(0.2)
    for pid in [run.pid] + [run.starts(n)[0]["pid"] for n in ("w", "b")]:
        held = [t for t in fd_targets(pid).values() if "collectord.log" in t and "(deleted)" in t]
        assert not held, (pid, held)


def test_s24_hung_children_killed_by_watchdog(sup):
    cols = {
        "hang": {"target": "Beater", "hang_after": "0.6", "interval": "0.1"},
        "stopped": {"target": "Beater", "interval": "0.1"},
        "plain": {"target": "Sleeper"},
    }
    run = sup(cols, main={"watchdog_timeout": 2}, restart={"backoff_initial": 0.3, "backoff_max": 0.3}).start(
        wait_started=("hang", "stopped", "plain")
    )
    hang_pid = run.starts("hang")[0]["pid"]
    stopped_pid = run.starts("stopped")[0]["pid"]
    wait_for(lambda: (run.child_status("stopped") or {}).get("heartbeat_age") is not None, 3, what="heartbeats seen")
    t_stop = run.kill_pid(stopped_pid, signal.SIGSTOP)
    t_hang = wait_for(lambda: run.events("hang", "hang"), 5, what="hang")[0]["t"]
    wait_for(lambda: gone_or_zombie(stopped_pid), 5, 0.01, "SIGSTOPped child killed")
    t_killed_stopped = time.monotonic()
    wait_for(lambda: gone_or_zombie(hang_pid), 5, 0.01, "hung child killed")
    t_killed_hang = time.monotonic()
    # Killed watchdog_timeout after the last heartbeat (sent at most 1 s before the hang).
    assert 2 - 1 <= t_killed_stopped - t_stop <= 2 + 1
    assert 2 - 1 <= t_killed_hang - t_hang <= 2 + 1
    for n in ("hang", "stopped"):
        new = run.wait_start(n, 2, timeout=5)
        assert new["pid"] not in (hang_pid, stopped_pid)
    assert "silent for" in run.log() and "watchdog" in run.log()
    st = wait_for(lambda: (lambda c: c if c and c["restarts"] >= 1 else None)(run.child_status("stopped")), 3,
                  what="restart counted in status.json")
    assert st["last_exit"] == "watchdog: signal 9"
    assert len(run.starts("plain")) == 1  # never heartbeats: never watched


def test_plain_classes_get_the_kwargs_they_accept(sup):
    run = sup(
        {"named": {"target": "Named", "interval": "7"}, "kw": {"target": "Sleeper", "extra": "x"}},
        main={"health_interval": 0.5},
    ).start(wait_started=("named", "kw"))
    assert run.starts("named")[0]["interval"] == "7"
    kwargs = set(run.starts("kw")[0]["kwargs"])
    assert {"dsn", "data_dir", "gamma_url", "selection", "extra"} <= kwargs
    title = open(f"/proc/{run.starts('kw')[0]['pid']}/cmdline").read()
    assert title.startswith("collectord: kw")
    assert open(f"/proc/{run.pid}/cmdline").read().startswith("collectord: supervisor")
    doc = wait_for(run.status, 3, what="status.json")
    assert "secret" not in (doc["dsn"] or "") and doc["pid"] == run.pid
    assert "secret" not in run.log()
    # one health line per collector every health_interval
    wait_for(lambda: "health named: RUNNING uptime" in run.log() and "health kw: RUNNING uptime" in run.log(), 3,
             what="health lines")
    assert "rows +0 errors 0 last_success never" in run.log()


def test_exits_1_when_nothing_left(sup):
    run = sup({"done": {"target": "Exiter", "code": "0"}, "bad": {"target": "Exiter", "code": "78"}}).start()
    assert run.wait_exit(10) == 1
    assert "no collector is running or scheduled" in run.log()


def test_s5_dead_child_never_promoted_when_supervisor_wakes_late(sup):
    """The supervisord 4.3 race, forced: the child dies before startsecs while the supervisor
    is stopped (SIGSTOP); it wakes after startsecs with both the exit and the timer due.
    Reaping comes first, so the child goes to BACKOFF and is never RUNNING."""
    run = sup(
        {"crash": {"target": "Crasher", "after": "0.2"}, "w": {"target": "Sleeper"}},
        main={"startsecs": 1.0},
        restart={"backoff_initial": 30, "backoff_max": 30},
    ).start(wait_started=("w",))
    first = run.wait_start("crash")
    run.kill_pid(run.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: run.events("exit", "crash"), 3, what="crash exit while the supervisor is stopped")
        time.sleep(max(0.0, first["t"] + 1.3 - time.monotonic()))  # past startsecs
    finally:
        run.kill_pid(run.pid, signal.SIGCONT)
    st = run.wait_state("crash", "BACKOFF", timeout=5)
    assert st["restarts"] == 1
    assert "crash: STARTING -> RUNNING" not in run.log()


def test_reload_with_unopenable_log_keeps_logging_and_running(sup, tmp_path):
    cols = {"w": {"target": "Sleeper"}}
    run = sup(cols).start(wait_started=("w",))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    run.write_config(cols, main={"logfile": blocker / "x.log"})
    run.send(signal.SIGHUP)
    wait_for(lambda: "reload: cannot open the log file" in run.log(), 3, what="log error in the old log")
    wait_for(lambda: "reloaded" in run.log(), 3, what="reload applied")
    assert run.proc.poll() is None
    run.wait_state("w", "RUNNING")
    assert len(run.starts("w")) == 1
    run.send(signal.SIGTERM)
    assert run.wait_exit(5) == 0
