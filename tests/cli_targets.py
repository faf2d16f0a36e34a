"""Small collector classes the CLI/daemon tests point `target =` at.

Sleeper is a plain class (no Worker): run() blocks until stop(). Ticker is a
workers.base.Worker with a trivial step(), so it heartbeats and reports counters.
"""

from __future__ import annotations

import threading
import time

from workers.base import Worker


class Sleeper:
    """A user's plain collector: run() until stop()."""

    def __init__(self, **kwargs):
        self.name = kwargs.get("name", "sleeper")
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(0.2):
            pass

    def stop(self) -> None:
        self._stop.set()


class Ticker(Worker):
    """A built-in-style collector: one step every `interval` that counts a row."""

    OPTIONS = {"interval": (float, 0.2)}

    def step(self) -> None:
        self.success(rows=1)


class Crasher:
    """Exits 1 at once, every time (for status: BACKOFF/last_exit)."""

    def __init__(self, **kwargs):
        pass

    def run(self) -> None:
        raise SystemExit(1)

    def stop(self) -> None:
        pass


class Picky:
    """Rejects its options at construction: a config error (exit 78)."""

    def __init__(self, *, mode: str = "ok", **kwargs):
        if mode != "ok":
            err = ValueError(f"mode must be 'ok', got {mode!r}")
            err.key = "mode"
            raise err

    def run(self) -> None:
        time.sleep(0.1)

    def stop(self) -> None:
        pass
