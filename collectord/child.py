"""ChildState: the life of one supervised child, as a pure state machine.

No OS calls and no clock of its own: the supervisor feeds it events with the
time they happened (monotonic seconds) and asks it what is due. The states are
the contract's (DESIGN §3):

  STARTING  forked (or about to be, pid None), not yet up for startsecs
  RUNNING   up for at least startsecs
  BACKOFF   died; waiting for next_start
  STOPPING  SIGTERM sent by the supervisor; waiting for the exit
  EXITED    exited 0 by itself, or stopped by the supervisor: not restarted
  FATAL     exit 78, a bad option, or died again after max_restarts restarts

Only `_set()` writes `state`; every call site names its transition.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from collectord import backoff
from collectord.config import RestartPolicy

EX_CONFIG = 78


class State(str, enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


def describe_exit(returncode: int) -> str:
    """'exit 1' / 'signal 9' from a multiprocessing-style returncode (-N = signal N)."""
    return f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"


@dataclass
class ChildState:
    """One child's state; created pending (STARTING, pid None, due at `now`)."""

    name: str
    policy: RestartPolicy
    startsecs: float
    now: float
    state: State = State.STARTING
    pid: int | None = None
    spawned_at: float | None = None  # fork time, monotonic
    next_start: float | None = None  # when a pending start is due
    restarts: int = 0  # consecutive restarts so far
    spawns: int = 0
    last_exit: str | None = None
    exited_at: float | None = None
    transitions: list[tuple[State, State]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.next_start = self.now

    # -- the one writer ---------------------------------------------------
    def _set(self, new: State) -> None:
        """Write the state (the only place that does) and remember the edge."""
        if new is not self.state:
            self.transitions.append((self.state, new))
            del self.transitions[:-32]  # bounded: a long-lived child must not grow
        self.state = new

    # -- queries -----------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.pid is not None

    @property
    def scheduled(self) -> bool:
        """Waiting to be spawned (first start, or restart after backoff)."""
        return self.pid is None and self.next_start is not None and self.state in (State.STARTING, State.BACKOFF)

    @property
    def finished(self) -> bool:
        return self.state in (State.EXITED, State.FATAL)

    def due(self, now: float) -> bool:
        """True when the supervisor should fork this child now."""
        return self.scheduled and now >= self.next_start

    def uptime(self, now: float) -> float | None:
        return None if self.spawned_at is None or self.pid is None else now - self.spawned_at

    def next_deadline(self) -> float:
        """The earliest time fire() or due() can change something (inf: none)."""
        if self.scheduled:
            return self.next_start
        if self.pid is not None and self.spawned_at is not None:
            if self.state is State.STARTING:
                return self.spawned_at + self.startsecs
            if self.state is State.RUNNING and self.restarts:
                return self.spawned_at + self.policy.reset_after
        return math.inf

    # -- events --------------------------------------------------------------
    def on_spawn(self, pid: int, now: float) -> None:
        """Forked with `pid` at `now`."""
        self.pid, self.spawned_at, self.next_start = pid, now, None
        self.spawns += 1
        self._set(State.STARTING)  # STARTING(pending)|BACKOFF -> STARTING

    def fire(self, now: float) -> None:
        """Apply timers: promote to RUNNING after startsecs; reset the count after reset_after.

        The supervisor reaps before it calls this, so a child that already died
        is never promoted (the supervisord 4.3 race).
        """
        if self.pid is None or self.spawned_at is None:
            return
        up = now - self.spawned_at
        if self.state is State.STARTING and up >= self.startsecs:
            self._set(State.RUNNING)  # STARTING -> RUNNING
        if self.state is State.RUNNING and self.restarts and backoff.resets(up, self.policy):
            self.restarts = 0

    def on_exit(self, returncode: int, now: float) -> State:
        """The child exited with returncode (-N: killed by signal N) at `now`."""
        uptime = now - self.spawned_at if self.spawned_at is not None else 0.0
        self.pid, self.exited_at = None, now
        self.last_exit = describe_exit(returncode)
        if self.state is State.STOPPING:
            self._set(State.EXITED)  # STOPPING -> EXITED (we asked it to stop)
            return self.state
        if backoff.resets(uptime, self.policy):
            self.restarts = 0
        if returncode == 0:
            self._set(State.EXITED)  # STARTING|RUNNING -> EXITED (done by itself)
        elif returncode == EX_CONFIG:
            self._set(State.FATAL)  # STARTING|RUNNING -> FATAL (a restart cannot fix a bad config)
        else:
            self._schedule_restart(now)
        return self.state

    def on_start_failed(self, reason: str, now: float, *, fatal: bool) -> State:
        """Constructing the target failed before any fork (import error, bad option)."""
        self.pid, self.exited_at = None, now
        self.last_exit = reason
        if fatal:
            self._set(State.FATAL)  # STARTING|BACKOFF -> FATAL (bad option: a restart cannot fix it)
        else:
            self.spawns += 1  # a failed start is an attempt like a crash
            self._schedule_restart(now)
        return self.state

    def _schedule_restart(self, now: float) -> None:
        if self.restarts >= self.policy.max_restarts:
            self.next_start = None
            self._set(State.FATAL)  # STARTING|RUNNING|BACKOFF -> FATAL (max_restarts used up)
            return
        self.restarts += 1
        self.next_start = now + backoff.delay(self.restarts, self.policy)
        self._set(State.BACKOFF)  # STARTING|RUNNING -> BACKOFF

    def begin_stop(self, now: float) -> None:
        """The supervisor is stopping this child: SIGTERM goes out, or a pending start is cancelled."""
        self.next_start = None
        if self.pid is not None:
            self._set(State.STOPPING)  # STARTING|RUNNING -> STOPPING
        elif self.state in (State.STARTING, State.BACKOFF):
            self._set(State.EXITED)  # BACKOFF -> EXITED (pending restart cancelled)

    def retry(self, now: float) -> None:
        """SIGHUP: a FATAL (or EXITED) child gets a fresh count and starts now."""
        if self.pid is None and self.finished:
            self.restarts = 0
            self.next_start = now
            self._set(State.STARTING)  # FATAL|EXITED -> STARTING (pending)
