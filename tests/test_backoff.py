"""backoff.delay: 5, 10, 20, 40, 60 from the defaults; scaled policies double and cap the same way."""

import pytest

from collectord import backoff
from collectord.config import RestartPolicy


@pytest.mark.parametrize(
    "policy, expected",
    [
        (RestartPolicy(), [5, 10, 20, 40, 60]),
        (RestartPolicy(backoff_initial=0.1, backoff_max=1.0, max_restarts=6), [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]),
        (RestartPolicy(backoff_initial=0, backoff_max=0), [0, 0, 0, 0, 0]),
        (RestartPolicy(backoff_initial=7, backoff_max=7, max_restarts=3), [7, 7, 7]),
    ],
)
def test_schedule(policy, expected):
    assert backoff.schedule(policy) == pytest.approx(expected)


def test_delay_edges():
    policy = RestartPolicy()
    assert backoff.delay(0, policy) == 0
    assert backoff.delay(-3, policy) == 0
    assert backoff.delay(6, policy) == 60
    assert backoff.delay(10_000, policy) == 60  # no overflow for a huge attempt count


def test_resets_at_reset_after():
    policy = RestartPolicy(reset_after=600)
    assert not backoff.resets(599.9, policy)
    assert backoff.resets(600, policy)
