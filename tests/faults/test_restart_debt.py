"""A run stopped early and started again for longer ends owing nothing, as a new user runs it.

The real supervisor with the markets and trades collectors against polysim, whose
markets close and resolve while it runs (the markets collector then drops them from
the followed set), some while their gaps are open. Run 1 (2 trade shards) is stopped while its start gaps still wait
for the backfill delay: `collectord status` shows the debt. Run 2 (3 shards, a short
delay) starts later and runs longer. At the end every trade polysim published for
every token the system ever followed, while it followed it, is stored exactly once:
each token up to the cut-off (taken once no gap was owed) or, if dropped before, up to
the last moment it was seen in followed_tokens.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from datetime import datetime, timezone

from tests.faults import accounting
from tests.faults import scenario as S
from tests.faults.system import System, wait_for


class FollowedWatcher:
    """Samples followed_tokens every 0.25 s: token -> (since, last time seen followed, ms)."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.seen: dict[str, tuple[datetime, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="followed-watcher", daemon=True)

    def sample(self) -> None:
        now_ms = accounting.now_ms()
        for token, since in S.query(self.dsn, "SELECT token_id, since FROM followed_tokens"):
            self.seen[token] = (since, now_ms)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.sample()
            except Exception:  # a sample missed is a shorter window, never a wrong one
                pass

    def __enter__(self) -> "FollowedWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def test_stopped_early_then_run_longer_owes_nothing(tmp_path, pg_dsn, polysim):
    sim = polysim(markets=16, seed=61, trade_rate=120.0, multi_fill=0.3, resolve_rate=0.7, resolve_delay=0.5,
                  closed_markets=0)
    with FollowedWatcher(pg_dsn) as followed:
        first = System(tmp_path, pg_dsn, sim, shards=2, polling=False, trades={"backfill_delay": "60"})
        try:
            first.start()
            assert wait_for(lambda: S.query(pg_dsn, "SELECT count(*) FROM trades")[0][0] > 200, 30), \
                first.log_tail()
        finally:
            first.close()
        followed.sample()
        owed = S.query(pg_dsn, "SELECT count(*) FROM feed_gaps WHERE recovered_at IS NULL")[0][0]
        assert owed > 0
        status = first.cli("status")
        assert status.returncode == 3, status.stdout + status.stderr
        assert re.search(rf"^feed gaps: {owed} open \(trades owed until backfilled\), the oldest started ",
                         status.stdout, re.M), status.stdout
        time.sleep(2.0)  # markets close and trade on while nothing runs

        second = System(tmp_path, pg_dsn, sim, shards=3, polling=False, trades={"backfill_delay": "1"})
        try:
            second.start()
            time.sleep(2.0)  # run 2 runs longer than run 1 in any case: it waits for a drop and the quiesce
            current = lambda: {t for t, in S.query(pg_dsn, "SELECT token_id FROM followed_tokens")}  # noqa: E731
            assert wait_for(lambda: set(followed.seen) - current(), 30), "no market left the followed set"
            assert S.quiesce(second, pg_dsn, timeout=60), second.log_tail()
            cutoff = accounting.now_ms() - 2000
            followed.sample()
        finally:
            second.close()
    now_followed = {t for t, in S.query(pg_dsn, "SELECT token_id FROM followed_tokens")}
    dropped = set(followed.seen) - now_followed
    assert dropped, "no market closed during the run: the test proves nothing about dropped tokens"

    expected, published = Counter(), Counter()
    for t in sim.ledger():
        k = accounting.trade_key(t["asset_id"], t["transaction_hash"], t["price"], t["size"], t["side"])
        published[k] += 1
        seen = followed.seen.get(t["asset_id"])
        if seen is None:
            continue
        since, last_ms = seen
        until = min(cutoff, last_ms)  # markets keep closing: one dropped after the cut-off was live until it
        if t["published_ms"] <= until and datetime.fromtimestamp(int(t["timestamp"]) / 1000, timezone.utc) >= since:
            expected[k] += 1
    stored = Counter(accounting.trade_key(*r) for r in S.query(
        pg_dsn, "SELECT token_id, tx_hash, price::text, size::text, side FROM trades"))
    missing, duplicated = expected - stored, stored - published
    gone = sum(n for k, n in expected.items() if k[0] in dropped)
    reasons = S.query(pg_dsn, "SELECT reason, count(*) FROM feed_gaps GROUP BY 1")
    print(f"\nexpected {sum(expected.values())} (of dropped tokens {gone}), missing {sum(missing.values())}, "
          f"duplicated {sum(duplicated.values())}; gaps {reasons}")
    assert gone > 0
    assert not missing and not duplicated, (sum(missing.values()), sum(duplicated.values()), list(missing)[:3])
    # Markets closed and resolved while their gaps were open (a gap opened while followed,
    # recovered only after the token had left the followed set, by whichever shard owned it).
    closed = {m["conditionId"] for m in sim.get("/gamma/markets?closed=true&limit=100")}
    late = [token for token, condition, recovered in S.query(
        pg_dsn, "SELECT token_id, condition_id, max(recovered_at) FROM feed_gaps"
                " WHERE reason IN ('start', 'restart') GROUP BY 1, 2")
        if token in dropped and condition in closed and recovered.timestamp() * 1000 > followed.seen[token][1]]
    assert late, "no closed market had a gap open when it left the followed set"
