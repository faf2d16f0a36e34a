"""Restart delays: backoff_initial doubling to backoff_max (5, 10, 20, 40, 60 s).

Pure functions of the attempt number and the [restart] policy; the child state
machine decides when the count starts afresh (a child that stayed up
reset_after seconds).
"""

from __future__ import annotations

from collectord.config import RestartPolicy


def delay(attempt: int, policy: RestartPolicy) -> float:
    """Seconds to wait before restart number `attempt` (1-based).

    attempt 1 -> backoff_initial, each further attempt doubles it, capped at
    backoff_max. attempt <= 0 means no wait.
    """
    if attempt <= 0:
        return 0.0
    # Cap the exponent so a huge attempt count cannot overflow a float.
    return min(policy.backoff_initial * (2.0 ** min(attempt - 1, 64)), policy.backoff_max)


def schedule(policy: RestartPolicy) -> list[float]:
    """Every delay a child gets before FATAL: [delay(1), ..., delay(max_restarts)]."""
    return [delay(n, policy) for n in range(1, policy.max_restarts + 1)]


def resets(uptime: float, policy: RestartPolicy) -> bool:
    """True when a child that stayed up `uptime` seconds starts its count afresh."""
    return uptime >= policy.reset_after
