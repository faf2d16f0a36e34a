"""workers.base.Worker: options, the interval loop, and how errors leave run()."""

from __future__ import annotations

import logging
import time

import pytest

from workers.base import OptionError, Worker
from workers.errors import CollectorError
from workers.storage.spool import SpoolError


class Counting(Worker):
    OPTIONS = {"interval": (float, 0.05), "limit": (int, 3)}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps: list[float] = []
        self.shut = 0

    def step(self):
        self.steps.append(time.monotonic())
        if len(self.steps) == 2:
            raise ValueError("one bad cycle")
        if len(self.steps) >= self.options["limit"]:
            self.stop()

    def shutdown(self):
        self.shut += 1


def test_options_are_converted_and_bad_ones_name_their_key():
    w = Counting(name="c", interval="0.5", limit="7")
    assert w.interval == 0.5 and w.options["limit"] == 7
    with pytest.raises(OptionError) as err:
        Counting(limit="many")
    assert err.value.key == "limit"
    with pytest.raises(OptionError) as err:
        Counting(colour="red")
    assert err.value.key == "colour"


def test_a_failing_step_is_counted_and_the_loop_goes_on():
    w = Counting(name="c", limit="4")
    w.run()
    assert len(w.steps) == 4 and w.shut == 1
    assert w.counters["errors"] == 1 and "one bad cycle" in w.counters["last_error"]
    gaps = [b - a for a, b in zip(w.steps, w.steps[1:])]
    assert all(g >= 0.04 for g in gaps), gaps  # aligned to the interval, never stacked


class RefusedSpool(Worker):
    def init_process(self):
        raise SpoolError("spool directory /x is owned by another account")

    def step(self):  # never reached
        raise AssertionError


def test_a_collector_error_leaves_run_as_one_line_and_its_exit_code(caplog):
    caplog.set_level(logging.ERROR)
    with pytest.raises(SystemExit) as exit_:
        RefusedSpool(name="books").run()
    assert exit_.value.code == 78
    assert [r.getMessage() for r in caplog.records] == ["books: spool directory /x is owned by another account"]
    assert all(r.exc_info is None for r in caplog.records)


def test_stop_before_run_does_nothing():
    w = Counting(name="c")
    w.stop()
    w.run()
    assert w.steps == [] and w.shut == 0
    assert issubclass(SpoolError, CollectorError)
