"""ChildState driven by tables of scripted (event, time) histories on an injected clock.

Events: ("spawn", t) forks a new pid; ("exit", t, code) the child exits (-N: signal N);
("fire", t) timers run; ("fail", t, fatal) construction failed; ("stop", t); ("retry", t).
After each event the table names the state expected, and for BACKOFF the next start.
"""

import itertools
import math

import pytest

from collectord.child import ChildState, State, describe_exit
from collectord.config import RestartPolicy

DEFAULT = RestartPolicy()  # 5, 10, 20, 40, 60; max 5; reset 600


def play(history, policy=DEFAULT, startsecs=1.0):
    """Replay a history; return the ChildState and [(state, next_start)] after each event."""
    pids = itertools.count(100)
    st = ChildState("c", policy, startsecs, history[0][1])
    seen = []
    for ev in history:
        kind, t = ev[0], ev[1]
        if kind == "spawn":
            assert st.due(t), f"spawn at {t} but not due (state {st.state}, next {st.next_start})"
            st.on_spawn(next(pids), t)
        elif kind == "exit":
            st.on_exit(ev[2], t)
        elif kind == "fire":
            st.fire(t)
        elif kind == "fail":
            st.on_start_failed("start failed: boom", t, fatal=ev[2])
        elif kind == "stop":
            st.begin_stop(t)
        elif kind == "retry":
            st.retry(t)
        seen.append((st.state, st.next_start))
    return st, seen


def crash_loop(n_spawns, delays, code=1, start=0.0):
    """spawn, die at once, wait the delay, spawn ... as a history."""
    hist, t = [], start
    for i in range(n_spawns):
        hist.append(("spawn", t))
        hist.append(("exit", t + 0.001, code))
        if i < len(delays):
            t = t + 0.001 + delays[i]
    return hist


def test_full_schedule_then_fatal_after_fifth_restart():
    hist = crash_loop(6, [5, 10, 20, 40, 60])
    st, seen = play(hist)
    exits = [s for ev, s in zip(hist, seen) if ev[0] == "exit"]
    waits = [round(nxt - ev[1], 6) for ev, (s, nxt) in zip([e for e in hist if e[0] == "exit"], exits) if s is State.BACKOFF]
    assert waits == [5, 10, 20, 40, 60]
    assert [s for s, _ in exits] == [State.BACKOFF] * 5 + [State.FATAL]
    assert st.spawns == 6 and st.restarts == 5
    assert not st.due(10_000) and st.next_deadline() == math.inf


@pytest.mark.parametrize(
    "history, expected",
    [
        # exit 0 by itself -> EXITED, never restarted
        ([("spawn", 0), ("fire", 1), ("exit", 3, 0)], [State.STARTING, State.RUNNING, State.EXITED]),
        # exit 78 -> FATAL at once, even on the first death
        ([("spawn", 0), ("exit", 0.1, 78)], [State.STARTING, State.FATAL]),
        # exit 78 after running a while -> FATAL too
        ([("spawn", 0), ("fire", 2), ("exit", 9, 78)], [State.STARTING, State.RUNNING, State.FATAL]),
        # killed by a signal -> BACKOFF
        ([("spawn", 0), ("fire", 1), ("exit", 2, -9)], [State.STARTING, State.RUNNING, State.BACKOFF]),
        # the supervisord race: died at 0.5, reaped before the 1.0 timer -> never RUNNING
        ([("spawn", 0), ("exit", 1.5, 1), ("fire", 1.5)], [State.STARTING, State.BACKOFF, State.BACKOFF]),
        # a timer before startsecs leaves it STARTING
        ([("spawn", 0), ("fire", 0.99)], [State.STARTING, State.STARTING]),
        # stop while running -> STOPPING, its exit (any code) -> EXITED
        ([("spawn", 0), ("fire", 1), ("stop", 2), ("exit", 2.1, -15)], [State.STARTING, State.RUNNING, State.STOPPING, State.EXITED]),
        ([("spawn", 0), ("stop", 0.5), ("exit", 0.6, 78)], [State.STARTING, State.STOPPING, State.EXITED]),
        # stop while in backoff cancels the restart
        ([("spawn", 0), ("exit", 0.1, 1), ("stop", 1), ("fire", 6)], [State.STARTING, State.BACKOFF, State.EXITED, State.EXITED]),
        # construction failure: retryable -> BACKOFF, fatal (bad option) -> FATAL
        ([("fail", 0, False)], [State.BACKOFF]),
        ([("fail", 0, True)], [State.FATAL]),
        # SIGHUP retry of a FATAL child: STARTING pending, due at once
        ([("spawn", 0), ("exit", 0.1, 78), ("retry", 5), ("spawn", 5)], [State.STARTING, State.FATAL, State.STARTING, State.STARTING]),
    ],
)
def test_histories(history, expected):
    _, seen = play(history)
    assert [s for s, _ in seen] == expected


def test_never_running_after_early_death():
    """A child dying in < startsecs, repeatedly: RUNNING never appears in its transitions."""
    st, _ = play(crash_loop(6, [5, 10, 20, 40, 60]) + [("fire", 1000)])
    assert all(State.RUNNING not in edge for edge in st.transitions)
    assert st.state is State.FATAL


def test_reset_after_stable_uptime():
    """crash, restart at +5, stay up reset_after + a little, crash: next restart at +5 again."""
    hist = [
        ("spawn", 0), ("exit", 0.1, 1),            # restart #1 at 5.1
        ("spawn", 5.1), ("fire", 6.1),
        ("fire", 605.2),                           # up 600.1 s: count starts afresh
        ("exit", 606, 1),
    ]
    st, seen = play(hist)
    assert seen[1] == (State.BACKOFF, pytest.approx(5.1))
    assert st.state is State.BACKOFF and st.next_start == pytest.approx(611)
    assert st.restarts == 1


def test_reset_on_exit_without_timer():
    """The reset also holds when no timer ran in between (uptime = exit time - fork time)."""
    st, _ = play([("spawn", 0), ("exit", 0.1, 1), ("spawn", 5.1), ("exit", 5.1 + 600, -9)])
    assert st.restarts == 1 and st.next_start == pytest.approx(5.1 + 600 + 5)


def test_no_reset_just_below_reset_after():
    st, _ = play([("spawn", 0), ("exit", 0.1, 1), ("spawn", 5.1), ("exit", 5.1 + 599, 1)])
    assert st.restarts == 2 and st.next_start == pytest.approx(5.1 + 599 + 10)


def test_failed_starts_count_like_crashes():
    policy = RestartPolicy(backoff_initial=1, backoff_max=4, max_restarts=3)
    st = ChildState("c", policy, 1.0, 0.0)
    t, waits = 0.0, []
    while st.state is not State.FATAL:
        assert st.due(t)
        st.on_start_failed("start failed: ImportError", t, fatal=False)
        if st.state is State.BACKOFF:
            waits.append(st.next_start - t)
            t = st.next_start
    assert waits == [1, 2, 4] and st.spawns == 4


def test_scaled_policy_deadlines():
    policy = RestartPolicy(backoff_initial=0.2, backoff_max=1.0, max_restarts=5, reset_after=3)
    st = ChildState("c", policy, 0.5, 10.0)
    assert st.next_deadline() == 10.0 and st.due(10.0)
    st.on_spawn(1, 10.0)
    assert st.next_deadline() == 10.5
    st.fire(10.5)
    assert st.state is State.RUNNING and st.next_deadline() == math.inf  # nothing to reset
    st.on_exit(1, 11.0)
    assert st.next_deadline() == pytest.approx(11.2)


def test_describe_exit():
    assert describe_exit(1) == "exit 1"
    assert describe_exit(-9) == "signal 9"
    assert describe_exit(0) == "exit 0"
