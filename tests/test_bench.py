"""Every benchmark runs in a quick mode and prints its figures as a final JSON line.

These are not timed tests: they assert only that each benchmark completes from
this checkout with the README's command (`python -m bench NAME`) and ends with one
JSON object (and, for the exchange, that it lost and duplicated nothing). The
figures themselves are read by people (README "Performance").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

QUICK = {
    "storage": ["--rows", "3000", "--naive-rows", "200", "--book-rows", "300", "--replay-rows", "2000", "--rounds", "1",
                "--migrate-rows", "3000", "--cases", "writer,partitions,formats,keys", "--key-rows", "20000"],
    "books": ["--markets", "60", "--cycles", "1"],
    "book_events": ["--quick"],
    "ingest": ["--quick"],
    "exchange": ["--quick"],
    "parse": ["--quick"],
    "polysim_rate": ["--rates", "2000", "--seconds", "1", "--warmup", "0.5", "--markets", "10"],
    "supervisor": ["--quick"],
    "soak": ["--quick"],
    "export": ["--quick"],
    "twohost": ["--quick"],
}


def test_every_benchmark_has_a_quick_mode_here():
    from bench.__main__ import available

    assert set(available()) == set(QUICK), "a benchmark without a quick mode in this test, or a stale entry"


@pytest.mark.parametrize("name", sorted(QUICK))
def test_benchmark_quick_mode_completes_and_prints_json(name, pg_server_dsn, tmp_path):
    env = dict(os.environ, COLLECTORD_TEST_DSN=pg_server_dsn, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", name, *QUICK[name]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    figures = json.loads(last)
    assert isinstance(figures, dict) and figures, last
    if name == "twohost":  # both instances' trades against the ledger, and the takeovers measured
        assert figures["published_followed"] > 0 and figures["missing"] == 0 and figures["duplicated"] == 0, last
        assert figures["takeover_kill_rows_s"] is not None and figures["takeover_stop_rows_s"] is not None, last
    if name == "exchange":  # nothing lost, nothing stored twice, every shard stopped cleanly
        assert figures["expected"] > 0 and figures["missing"] == 0 and figures["duplicated"] == 0, last
        assert all(s["exit"] == 0 for s in figures["per_shard"].values()), last
