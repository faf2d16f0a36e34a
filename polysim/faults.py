"""Faults: what an operator (a test) asked polysim to break, and for how long.

A fault is {surface, kind, probability, count, duration, params}. `surface` is
gamma | clob | data | ws | all; the `path` parameter narrows an HTTP fault to the
requests whose path starts with it (e.g. "/gamma/markets/keyset"). It is active until its duration ends or its
count is used up (whichever first; neither given = until cleared). Each time a
surface serves something it asks `pick()` whether a fault of the kinds it can
apply fires; draws come from a seeded RNG of their own, so faults never perturb
the market's event streams.

Kinds:
  HTTP surfaces (gamma, clob, data):
    429        status 429 with Retry-After (params: retry_after seconds, default 1)
    5xx        status 500 (params: status, e.g. 502/503)
    slow       the answer is delayed (params: delay seconds, default 2)
    malformed  200 with a body that is not JSON
    truncated  200 with the first half of the real JSON body
    cut        headers announce the full body, half is sent, the connection is closed
    extra_fields  unknown keys added to every object of the answer
    html403    Cloudflare-style 403 HTML page
    refuse     the connection is dropped without an answer
  ws:
    drop          close connections abruptly now (params: every seconds to repeat
                  for the duration; clean=true sends a close frame instead)
    stall         connections stay open but get nothing, PONG included (params: seconds)
    pong_withheld PINGs go unanswered; data still flows
    unknown_events frames gain unknown event types and unknown fields
    malformed     extra non-JSON / truncated text frames are interleaved (never
                  replacing a real message: nothing published is withheld)
    huge_frame    one very large frame of valid book messages (params: bytes)
    refuse, 429, 5xx  the upgrade is dropped / answered with that status
  all:
    listener_down the listening socket is closed for `seconds` (connection refused)
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field

SURFACES = ("gamma", "clob", "data", "ws", "all")
HTTP_KINDS = ("429", "5xx", "slow", "malformed", "truncated", "cut", "extra_fields", "html403", "refuse")
WS_KINDS = ("drop", "stall", "pong_withheld", "unknown_events", "malformed", "huge_frame",
            "refuse", "429", "5xx")
ALL_KINDS = ("listener_down",) + HTTP_KINDS
KINDS = {"gamma": HTTP_KINDS, "clob": HTTP_KINDS, "data": HTTP_KINDS, "ws": WS_KINDS, "all": ALL_KINDS}


class FaultError(ValueError):
    """A fault spec that cannot be applied (answered with 400 and this message)."""


@dataclass
class Fault:
    id: int
    surface: str
    kind: str
    probability: float = 1.0
    count: int | None = None
    until: float | None = None  # monotonic deadline
    params: dict = field(default_factory=dict)
    fired: int = 0

    def describe(self, now: float) -> dict:
        return {"id": self.id, "surface": self.surface, "kind": self.kind,
                "probability": self.probability, "count_left": self.count,
                "seconds_left": None if self.until is None else round(max(0.0, self.until - now), 3),
                "params": self.params, "fired": self.fired}


class Faults:
    """The active faults; one instance per server."""

    def __init__(self, seed: int, clock=time.monotonic):
        self.rng = random.Random(f"polysim:{seed}:faults")
        self.clock = clock
        self.items: list[Fault] = []
        self._ids = itertools.count(1)

    def add(self, spec: dict) -> Fault:
        """Validate a spec and activate it; raises FaultError on a bad one."""
        if not isinstance(spec, dict):
            raise FaultError("a fault is a JSON object")
        spec = dict(spec)
        surface = str(spec.pop("surface", ""))
        kind = str(spec.pop("kind", ""))
        if surface not in SURFACES:
            raise FaultError(f"surface must be one of {', '.join(SURFACES)}")
        if kind not in KINDS[surface]:
            raise FaultError(f"kind for {surface} must be one of {', '.join(KINDS[surface])}")
        try:
            probability = float(spec.pop("probability", 1.0))
            count = spec.pop("count", None)
            count = None if count is None else int(count)
            duration = spec.pop("duration", None)
            duration = None if duration is None else float(duration)
        except (TypeError, ValueError):
            raise FaultError("probability/duration must be numbers, count an integer") from None
        if not 0.0 <= probability <= 1.0:
            raise FaultError("probability must be within [0, 1]")
        for key, value in spec.items():
            if key not in ("retry_after", "status", "delay", "seconds", "every", "bytes", "clean", "path"):
                raise FaultError(f"unknown fault parameter {key!r}")
            if key == "path":
                if not isinstance(value, str) or not value.startswith("/"):
                    raise FaultError("fault parameter 'path' must be a path starting with /")
            elif key != "clean" and not isinstance(value, (int, float)):
                raise FaultError(f"fault parameter {key!r} must be a number")
        if kind in ("stall", "listener_down") and duration is None:
            duration = float(spec.get("seconds", 5.0))
        fault = Fault(id=next(self._ids), surface=surface, kind=kind, probability=probability,
                      count=count, until=None if duration is None else self.clock() + duration,
                      params=spec)
        self.items.append(fault)
        return fault

    def clear(self, surface: str | None = None, kind: str | None = None) -> int:
        before = len(self.items)
        self.items = [f for f in self.items
                      if not ((surface is None or f.surface == surface) and (kind is None or f.kind == kind))]
        return before - len(self.items)

    def active(self) -> list[Fault]:
        now = self.clock()
        self.items = [f for f in self.items
                      if (f.until is None or f.until > now) and (f.count is None or f.count > 0)]
        return self.items

    def pick(self, surface: str, kinds: tuple[str, ...], path: str = "") -> Fault | None:
        """The first active fault for this surface (or 'all') of one of `kinds` that fires now
        (for a fault with a `path` parameter: only on a request path starting with it)."""
        if not self.items:
            return None
        for f in self.active():
            if f.kind in kinds and f.surface in (surface, "all") and path.startswith(f.params.get("path", "")):
                if f.probability < 1.0 and self.rng.random() >= f.probability:
                    continue
                if f.count is not None:
                    f.count -= 1
                f.fired += 1
                return f
        return None

    def describe(self) -> list[dict]:
        now = self.clock()
        return [f.describe(now) for f in self.active()]
