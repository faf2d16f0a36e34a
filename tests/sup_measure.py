"""Supervisor figures, printed (a measurement, never a timed test).

    .venv/bin/python -m tests.sup_measure detect [N]       exit-detection latency (backoff 0), N kills
    .venv/bin/python -m tests.sup_measure schedule         real 5,10,20,40,60 restart delays vs schedule (~2.5 min)
    .venv/bin/python -m tests.sup_measure stop N           time to stop N cooperative children
    .venv/bin/python -m tests.sup_measure idle S [beat] [health=N]
                                                           supervisor CPU and wakeups over S idle seconds
                                                           (5 plain children; `beat`: 5 heartbeating Workers;
                                                           health_interval N, default 3600 = no health line)
    .venv/bin/python -m tests.sup_measure rss              RSS/PSS of the supervisor and of one child

Each runs a real supervisor (tests.sup_targets runner) in a temporary directory.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.sup_targets import SupervisorRun, children_of, proc_stat, proc_status, wait_for

TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")


def _run(collectors, main=None, restart=None) -> SupervisorRun:
    tmp = Path(tempfile.mkdtemp(prefix="sup-measure-"))
    return SupervisorRun(tmp, collectors, main, restart)


def _fmt(values):
    values = sorted(values)
    return (
        f"n={len(values)} min={values[0] * 1000:.1f} ms median={statistics.median(values) * 1000:.1f} ms "
        f"max={values[-1] * 1000:.1f} ms"
    )


def detect(n: int = 20) -> None:
    run = _run({"w": {"target": "Sleeper"}, "v": {"target": "Sleeper"}},
               restart={"backoff_initial": 0, "backoff_max": 0, "max_restarts": 1000})
    try:
        run.start(wait_started=("w", "v"))
        v = run.starts("v")[0]["pid"]
        reaped, forked, running = [], [], []
        for i in range(n):
            old = run.starts("w")[-1]["pid"]
            wait_for(lambda: old in children_of(run.pid), 2)
            time.sleep(0.2)
            t0 = run.kill_pid(old)
            t_reaped = t_forked = None
            while t_reaped is None or t_forked is None:
                now = time.monotonic()
                if t_reaped is None and proc_stat(old) is None:
                    t_reaped = now
                if t_forked is None and [p for p in children_of(run.pid) if p not in (old, v)]:
                    t_forked = now
                if now - t0 > 5:
                    raise RuntimeError("no restart within 5 s")
            rec = run.wait_start("w", i + 2)
            reaped.append(t_reaped - t0)
            forked.append(t_forked - t0)
            running.append(rec["t"] - t0)
        print(f"kill -9 -> old pid reaped:          {_fmt(reaped)}")
        print(f"kill -9 -> new child pid exists:     {_fmt(forked)}")
        print(f"kill -9 -> new child runs run():     {_fmt(running)}")
    finally:
        run.send(signal.SIGTERM)
        run.wait_exit(10)
        run.cleanup()


def schedule() -> None:
    run = _run({"crash": {"target": "Crasher"}, "w": {"target": "Sleeper"}},
               restart={"backoff_initial": 5, "backoff_max": 60, "max_restarts": 5})
    try:
        run.start(wait_started=("w",))
        run.wait_state("crash", "FATAL", timeout=200)
        evs = [e for e in run.events(name="crash") if e["ev"] in ("start", "exit")]
        last_exit, delays = None, []
        for e in evs:
            if e["ev"] == "exit":
                last_exit = e["t"]
            elif last_exit is not None:
                delays.append(e["t"] - last_exit)
        for got, want in zip(delays, [5, 10, 20, 40, 60]):
            print(f"restart after {want:>2} s: measured {got:.4f} s, error {(got - want) * 1000:+.1f} ms")
        print(f"spawns: {len(run.starts('crash'))}, state {run.child_status('crash')['state']}")
    finally:
        run.send(signal.SIGTERM)
        run.wait_exit(10)
        run.cleanup()


def stop(n: int) -> None:
    names = tuple(f"w{i}" for i in range(n))
    run = _run({name: {"target": "Sleeper"} for name in names}, main={"graceful_timeout": 20})
    try:
        run.start()
        wait_for(lambda: len(run.events("start")) >= n, 60)
        for name in names:
            run.wait_state(name, "RUNNING", timeout=30)
        t0 = run.send(signal.SIGTERM)
        code = run.wait_exit(60)
        print(f"stop {n} children: supervisor exited {code} after {(time.monotonic() - t0) * 1000:.1f} ms")
    finally:
        run.cleanup()


def idle(seconds: float, beat: bool = False, health: float = 3600) -> None:
    target = "Beater" if beat else "Sleeper"
    opts = {"target": target, "interval": "3600"} if beat else {"target": target}
    names = tuple(f"w{i}" for i in range(5))
    run = _run({name: dict(opts) for name in names}, main={"health_interval": health})
    try:
        run.start(wait_started=names)
        for name in names:
            run.wait_state(name, "RUNNING")
        time.sleep(1.0)
        st0, ps0 = proc_stat(run.pid), proc_status(run.pid)
        time.sleep(seconds)
        st1, ps1 = proc_stat(run.pid), proc_status(run.pid)
        vol = int(ps1["voluntary_ctxt_switches"]) - int(ps0["voluntary_ctxt_switches"])
        inv = int(ps1["nonvoluntary_ctxt_switches"]) - int(ps0["nonvoluntary_ctxt_switches"])
        cpu = (st1["cpu_ticks"] - st0["cpu_ticks"]) * TICK_MS
        kind = "heartbeating Workers" if beat else "plain children"
        print(f"idle {seconds:.0f} s, 5 {kind}, health_interval {health:g}: supervisor CPU {cpu:.0f} ms, "
              f"wakeups (voluntary ctxt switches) {vol} = {vol / seconds:.2f}/s, involuntary {inv}")
    finally:
        run.send(signal.SIGTERM)
        run.wait_exit(10)
        run.cleanup()


def _pss(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def rss() -> None:
    names = ("w", "b")
    run = _run({"w": {"target": "Sleeper"}, "b": {"target": "Beater", "interval": "1"}})
    try:
        run.start(wait_started=names)
        for name in names:
            run.wait_state(name, "RUNNING")
        time.sleep(1.0)
        print(f"supervisor pid {run.pid}: VmRSS {proc_status(run.pid)['VmRSS']}, Pss {_pss(run.pid)}")
        for name in names:
            pid = run.starts(name)[0]["pid"]
            print(f"child {name} ({run.child_status(name)['target']}) pid {pid}: "
                  f"VmRSS {proc_status(pid)['VmRSS']}, Pss {_pss(pid)}")
    finally:
        run.send(signal.SIGTERM)
        run.wait_exit(10)
        run.cleanup()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "detect":
        detect(int(rest[0]) if rest else 20)
    elif cmd == "schedule":
        schedule()
    elif cmd == "stop":
        stop(int(rest[0]) if rest else 5)
    elif cmd == "idle":
        health = [float(a.split("=", 1)[1]) for a in rest if a.startswith("health=")]
        idle(float(rest[0]) if rest else 60.0, beat="beat" in rest, health=health[0] if health else 3600)
    elif cmd == "rss":
        rss()
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
