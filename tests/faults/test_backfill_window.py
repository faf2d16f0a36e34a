"""A backfill must never store more copies of a trade than the exchange published.

workers.backfill.BackfillQueue pages the Data API newest-first with `offset`. A job
planned before its window has closed (gap end + backfill_margin + backfill_settle
still in the future: TradesCollector accepts backfill_delay below margin + settle)
pages a result set that grows at the top while it reads it: each new trade shifts
the next page down, the rows at the page boundary come back twice, and
number_repeats() numbers the copy ordinal 1, a row the exchange never published.
Found by test_system_faults with backfill_settle at its 30 s default and a 6 s
backfill_delay (1 064 duplicated trades in one run). Real PostgreSQL is not needed:
the rows the queue returns are what the collector writes.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone

from tests.faults.accounting import trade_key
from workers.backfill import BackfillQueue, Gap
from workers.http import Client

UTC = timezone.utc


def test_backfill_of_a_window_still_filling_never_doubles_a_trade(polysim):
    sim = polysim(markets=4, seed=21, trade_rate=200.0)
    time.sleep(2.0)
    first = sim.ledger()[0]
    token, condition = first["asset_id"], first["market"]
    http = Client(timeout=(3.05, 10), rate=0, retries=0, deadline=15.0, apis={sim.data_url: "data"})
    # As TradesCollector builds it with backfill_delay (0) below margin + settle (1 + 5).
    queue = BackfillQueue(http.get_json, sim.data_url, shard="0/1", delay=0.0, margin=1.0, settle=5.0, page=20,
                          markets_per_request=20)
    now = datetime.now(UTC)
    queue.add(Gap(token, condition, datetime.fromtimestamp(now.timestamp() - 2, UTC), now, "restart"))
    rows = []
    deadline = time.monotonic() + 60
    while len(queue) and time.monotonic() < deadline:
        done = queue.step({token})
        if done is not None:
            rows += done.trades
        time.sleep(0.05)  # the exchange keeps trading between pages, as it does between real requests
    assert not len(queue), "the backfill job did not finish"
    published = Counter(trade_key(t["asset_id"], t["transaction_hash"], t["price"], t["size"], t["side"])
                        for t in sim.ledger())
    stored = Counter(trade_key(r["token_id"], r["tx_hash"], r["price"], r["size"], r["side"]) for r in rows)
    doubled = {k: (n, published[k]) for k, n in stored.items() if n > published[k]}
    assert rows, "the window held no trade: the test did not exercise paging"
    assert not doubled, f"{len(doubled)} trades backfilled more often than published, e.g. {list(doubled.items())[:3]}"
