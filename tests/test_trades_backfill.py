"""Backfill rows, ordinals across gaps and restarts, and the backfill queue's paging (pure)."""

from __future__ import annotations

import json
import zlib
from datetime import date, datetime, timedelta, timezone

from hypothesis import given, settings, strategies as st

from tests.conftest import DATA
from workers.backfill import MAX_OFFSET, BackfillQueue, Gap, number_repeats, rows_from_data_api
from workers.messages import EPOCH
from workers.trades import Ordinals, shard_of

TOKEN = "26553519739569408724710754771025892539347464160962015583021583647211378793594"
COND = "0x93ea2f1276cc65cc94d4f987a8d6ff409436f79005466c3a7e00fb791011d7ad"


def test_data_api_row_maps_to_the_live_shape():
    payload = json.loads((DATA / "data_api_trades_row.json").read_text())
    rows, bad = rows_from_data_api(payload)
    assert bad == 0
    assert rows == [{
        "token_id": TOKEN, "condition_id": COND, "ts": datetime(2026, 8, 16, 6, 22, 30, tzinfo=timezone.utc),
        "price": "0.16", "size": "21", "side": "BUY",
        "tx_hash": "0xdb79d27479869fbbea544110dc4120a945774825369b1a321ec507c4b15a034d",
        "fee_rate_bps": None, "source": "backfill", "trade_day": date(2026, 8, 16),
    }]
    assert rows_from_data_api(payload, tokens={"1"}) == ([], 0)  # another shard's token


def test_float_noise_rounds_to_the_live_decimal_text():
    base = json.loads((DATA / "data_api_trades_row.json").read_text())[0]
    cases = [(0.709999959, 2.46, "0.71", "2.46"), (0.0999999, 10.8208189999, "0.1", "10.820819"),
             (0.585, 60, "0.585", "60"), (0.9990000001, 341.89, "0.999", "341.89"), (0.1234, 1e-06, "0.1234", "0.000001")]
    for price, size, want_price, want_size in cases:
        rows, _ = rows_from_data_api([dict(base, price=price, size=size)])
        assert (rows[0]["price"], rows[0]["size"]) == (want_price, want_size)


def test_invalid_data_api_rows_are_skipped_whole():
    base = json.loads((DATA / "data_api_trades_row.json").read_text())[0]
    bad = [dict(base, price=1.5), dict(base, price="x"), dict(base, size=0), dict(base, side="buy"),
           dict(base, timestamp="1786861350"), dict(base, timestamp=1786861350000), dict(base, asset=None),
           dict(base, price=True), dict(base, asset="\u0661\u0662"), dict(base, asset="1" * 79),
           dict(base, size=10**80), dict(base, transactionHash="0xab\x00cd"), dict(base, transactionHash="nothex"),
           dict(base, conditionId="0x\ud800"), "not an object"]
    rows, skipped = rows_from_data_api(bad + [base])
    assert len(rows) == 1 and skipped == len(bad)
    assert rows_from_data_api({"error": "x"}) == ([], 1)


def fill(tx: str, price: str, size: str, side: str = "BUY", token: str = TOKEN) -> dict:
    return {"token_id": token, "tx_hash": tx, "price": price, "size": size, "side": side,
            "ts": EPOCH + timedelta(seconds=1_786_000_000)}


def store(table: set, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on the trade key."""
    for r in rows:
        table.add((r["token_id"], r["tx_hash"], r["price"], r["size"], r["side"], r["ordinal"]))


def test_transaction_straddling_a_restart_lands_exactly_once():
    truth = [fill("0xa", "0.5", "10"), fill("0xa", "0.5", "10"), fill("0xa", "0.5", "10"), fill("0xa", "0.49", "3")]
    table: set = set()
    first = Ordinals()  # process 1 sees the first fill, then is killed
    row = dict(truth[0])
    first.assign(row)
    store(table, [row])
    second = Ordinals()  # process 2 (fresh counters) sees the last two fills live
    rows = [dict(r) for r in truth[2:]]
    for r in rows:
        second.assign(r)
    store(table, rows)
    assert len(table) == 2  # the live restart re-used ordinal 0: one real fill is not there yet
    # The restart gap's backfill fetches the whole transaction and numbers it 0..k-1.
    store(table, number_repeats([dict(r) for r in truth]))
    assert len(table) == len(truth)
    assert sorted(k[5] for k in table if k[2] == "0.5") == [0, 1, 2]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["0xa", "0xb"]), st.sampled_from(["0.5", "0.51"]),
                          st.sampled_from(["10", "20"]), st.sampled_from(["BUY", "SELL"])), min_size=1, max_size=12),
       st.lists(st.tuples(st.booleans(), st.booleans()), min_size=12, max_size=12))
def test_any_mix_of_live_gaps_restarts_and_backfill_stores_each_fill_once(fills, fates):
    """Each fill is seen live or lost in a gap; the live counter may restart anywhere (a new
    process); the backfill then fetches every transaction touched. Result: the truth, exactly."""
    truth = [fill(*f) for f in fills]
    table: set = set()
    ordinals = Ordinals()
    for row, (seen_live, restart_before) in zip(truth, fates):
        if restart_before:
            ordinals = Ordinals()
        if seen_live:
            live = dict(row)
            ordinals.assign(live)
            store(table, [live])
    store(table, number_repeats([dict(r) for r in truth]))
    assert len(table) == len(truth)
    by_key: dict = {}
    for r in truth:
        k = (r["tx_hash"], r["price"], r["size"], r["side"])
        by_key[k] = by_key.get(k, 0) + 1
    for (_, tx, price, size, side, ordinal) in table:
        assert ordinal < by_key[(tx, price, size, side)]


def test_ordinals_remember_recent_transactions_only():
    clock = [0.0]
    ordinals = Ordinals(memory=10, clock=lambda: clock[0])
    rows = [fill("0xa", "0.5", "10") for _ in range(3)]
    for r in rows[:2]:
        ordinals.assign(r)
    clock[0] = 11
    ordinals.maybe_rotate()  # one rotation: still remembered
    ordinals.assign(rows[2])
    assert [r["ordinal"] for r in rows] == [0, 1, 2]
    clock[0] = 22
    ordinals.maybe_rotate()
    clock[0] = 33
    ordinals.maybe_rotate()
    late = fill("0xa", "0.5", "10")
    ordinals.assign(late)
    assert late["ordinal"] == 0  # forgotten after two rotations (a restart would forget it too)


def test_shards_partition_by_market_stably():
    tokens = [(f"0x{i:064x}", str(10**76 + i)) for i in range(200)]
    for shards in (1, 2, 5):
        owners = [shard_of(c, t, shards) for c, t in tokens]
        assert all(0 <= o < shards for o in owners)
        assert owners == [shard_of(c, t, shards) for c, t in tokens]  # stable
        assert len(set(owners)) == shards
    # Both tokens of a market belong to the same shard.
    assert shard_of("0xabc", "1", 7) == shard_of("0xabc", "2", 7)
    # crc32 of the condition id: a fixed value, not Python's per-run hash().
    assert shard_of("0x" + "ab" * 32, "1", 4) == zlib.crc32(b"0x" + b"ab" * 32) % 4


class DataApi:
    """In-memory `/trades` with the real paging rules (newest first, offset cap)."""

    def __init__(self, rows: list[dict]):
        self.rows = sorted(rows, key=lambda r: -r["timestamp"])
        self.calls: list[dict] = []

    def get_json(self, url: str, params: dict):
        self.calls.append(dict(params))
        assert params["offset"] <= MAX_OFFSET, "offset beyond 10000 is a 400"
        markets = set(params["market"].split(","))
        hit = [r for r in self.rows if r["conditionId"] in markets and params["start"] <= r["timestamp"] <= params["end"]]
        return hit[params["offset"]:params["offset"] + params["limit"]]


def api_row(i: int, ts: int, cond: str = COND, token: str = TOKEN, tx: str | None = None) -> dict:
    return {"asset": token, "conditionId": cond, "price": 0.5, "size": 10 + i % 7, "side": "BUY",
            "timestamp": ts, "transactionHash": tx or f"0x{i:064x}"}


def run_queue(queue: BackfillQueue, tokens: set[str], steps: int = 1000):
    done = []
    for _ in range(steps):
        result = queue.step(tokens)
        if result is not None:
            done.append(result)
        if not len(queue):
            break
    return done


def test_backfill_pages_and_counts_what_the_gap_held():
    t0 = 1_786_000_000
    other = "0x" + "cd" * 32
    rows = [api_row(i, t0 + i) for i in range(250)] + [api_row(1000 + i, t0 + i, cond=other, token="7") for i in range(40)]
    api = DataApi(rows)
    now = [float(t0 + 1000)]
    queue = BackfillQueue(api.get_json, "http://x/data", shard="0/1", delay=5, margin=2, page=100,
                          wall=lambda: now[0])
    start = datetime.fromtimestamp(t0 + 10, timezone.utc)
    end = datetime.fromtimestamp(t0 + 109.5, timezone.utc)
    queue.add(Gap(TOKEN, COND, start, end, "disconnect"))
    queue.add(Gap("7", other, start, end, "disconnect"))
    done = run_queue(queue, {TOKEN, "7"})
    assert len(done) == 1  # same window: one job for both markets
    assert api.calls[0]["market"] == ",".join(sorted([COND, other])) and api.calls[0]["start"] == t0 + 8
    assert api.calls[0]["end"] == t0 + 112 and api.calls[0]["takerOnly"] == "true"
    trades = done[0].trades
    assert len(trades) == 105 + 32  # t0+8 .. t0+112 for the first market, t0+8 .. t0+39 for the other
    assert all(t["ordinal"] == 0 for t in trades)
    found = {g["token_id"]: g["recovered_trades"] for g in done[0].gaps}
    assert found == {TOKEN: 101, "7": 30}  # inside [t0+10, t0+110] at second resolution
    assert all(g["recovered_at"] is not None and g["ended_at"] == end for g in done[0].gaps)


def test_backfill_waits_for_the_data_api_delay():
    api = DataApi([api_row(1, 100)])
    now = [200.0]
    queue = BackfillQueue(api.get_json, "http://x/data", shard="0/1", delay=30, margin=1, wall=lambda: now[0])
    queue.add(Gap(TOKEN, COND, datetime.fromtimestamp(90, timezone.utc), datetime.fromtimestamp(180, timezone.utc), "stall"))
    assert not queue.pending(now[0]) and queue.step({TOKEN}) is None and api.calls == []
    now[0] = 211.0
    assert queue.pending(now[0])
    assert len(run_queue(queue, {TOKEN})[0].trades) == 1


def test_backfill_splits_windows_too_deep_for_offset_paging():
    t0 = 1_786_000_000
    # 12,500 fills over 100 s; one transaction of 3 identical fills sits on the split point.
    rows = [api_row(i, t0 + i // 125) for i in range(12_500)]
    rows += [api_row(99_999, t0 + 49, tx="0x" + "ee" * 32) for _ in range(3)]
    api = DataApi(rows)
    queue = BackfillQueue(api.get_json, "http://x/data", shard="0/1", delay=0, margin=0, page=1000,
                          wall=lambda: float(t0 + 500))
    queue.add(Gap(TOKEN, COND, datetime.fromtimestamp(t0, timezone.utc),
                  datetime.fromtimestamp(t0 + 99, timezone.utc), "restart"))
    done = run_queue(queue, {TOKEN})
    trades = done[0].trades
    assert len(trades) == 12_503 and done[0].gaps[0]["recovered_trades"] == 12_503
    assert len({(t["tx_hash"], t["ordinal"]) for t in trades}) == 12_503
    assert sorted(t["ordinal"] for t in trades if t["tx_hash"] == "0x" + "ee" * 32) == [0, 1, 2]
    assert max(c["offset"] for c in api.calls) < MAX_OFFSET


def test_a_gap_without_market_ends_unrecoverable_with_its_reason():
    api = DataApi([api_row(1, 100)])
    queue = BackfillQueue(api.get_json, "http://x/data", shard="0/1", delay=0, wall=lambda: 500.0)
    queue.add(Gap(TOKEN, None, datetime.fromtimestamp(90, timezone.utc), datetime.fromtimestamp(180, timezone.utc),
                  "start"))
    done = queue.step({TOKEN})
    assert api.calls == [] and len(queue) == 0 and queue.unrecoverable == 1 and done.trades == []
    (row,) = done.gaps
    assert row["recovered_at"] is None and "no market" in row["unrecoverable"]
    assert queue.step({TOKEN}) is None and not queue.pending(500.0)


class RefusingDataApi(DataApi):
    """Answers 404 for one market (as an HttpError from workers.http would carry it)."""

    def __init__(self, rows, refused: str):
        super().__init__(rows)
        self.refused = refused

    def get_json(self, url, params):
        from workers.errors import HttpError

        if self.refused in params["market"].split(","):
            self.calls.append(dict(params))
            raise HttpError("data /trades: HTTP 404: market not found", status=404)
        return super().get_json(url, params)


def test_a_market_refused_for_good_ends_its_gaps_alone_and_transient_errors_retry():
    from workers.errors import HttpError

    other = "0x" + "cd" * 32
    api = RefusingDataApi([api_row(1, 100), api_row(2, 120, cond=other, token="7")], refused=COND)
    queue = BackfillQueue(api.get_json, "http://x/data", shard="0/1", delay=0, margin=0, refusals=3,
                          wall=lambda: 500.0)
    start, end = datetime.fromtimestamp(90, timezone.utc), datetime.fromtimestamp(180, timezone.utc)
    queue.add(Gap(TOKEN, COND, start, end, "restart"))
    queue.add(Gap("7", other, start, end, "restart"))
    outcomes = []
    for _ in range(10):
        try:
            done = queue.step({TOKEN, "7"})
        except HttpError as err:
            outcomes.append(err.status)
            continue
        if done is None:
            break
        outcomes.append(done)
    # Refused together: split by market; the other market is recovered; the refused one
    # is given up on after 3 refusals in a row, with the reason, never retried again.
    assert outcomes[0] == 404 and len(queue) == 0 and queue.unrecoverable == 1
    rows = {g["token_id"]: g for d in outcomes if not isinstance(d, int) for g in d.gaps}
    assert rows["7"]["recovered_at"] is not None and rows["7"]["recovered_trades"] == 1
    assert rows[TOKEN]["recovered_at"] is None and "refused market" in rows[TOKEN]["unrecoverable"]
    assert sum(1 for c in api.calls if c["market"] == COND) == 3
    # A 5xx, a timeout (status None), a throttle or a Cloudflare 403 block is transient:
    # raised, the job kept for a retry, however often.
    for status in (503, None, 429, 403):
        flaky = BackfillQueue(lambda url, params: (_ for _ in ()).throw(HttpError("failed", status=status)),
                              "http://x/data", shard="0/1", delay=0, wall=lambda: 500.0)
        flaky.add(Gap(TOKEN, COND, start, end, "restart"))
        for _ in range(5):
            try:
                flaky.step({TOKEN})
            except HttpError:
                pass
        assert len(flaky) == 1 and flaky.unrecoverable == 0, status


def test_window_reaches_past_the_gap_by_margin_and_settlement():
    # Fills matched just before the gap's end settle on chain 20 s later: the Data API
    # stamps them with the block time, so the window must reach that far.
    api = DataApi([api_row(1, 1000), api_row(2, 1203), api_row(3, 1226)])
    queue = BackfillQueue(api.get_json, "http://x/data", shard="0/1", delay=0, margin=5, settle=20,
                          wall=lambda: 2000.0)
    queue.add(Gap(TOKEN, COND, datetime.fromtimestamp(1010, timezone.utc), datetime.fromtimestamp(1200, timezone.utc),
                  "disconnect"))
    done = run_queue(queue, {TOKEN})
    assert (api.calls[0]["start"], api.calls[0]["end"]) == (1005, 1225)
    assert [t["ts"].timestamp() for t in done[0].trades] == [1203.0]


class GrowingDataApi(DataApi):
    """New fills keep arriving inside the window while it is paged (the Data API's index lag)."""

    def __init__(self, rows, arrive_at: int):
        super().__init__(rows)
        self.arrive_at, self.serial = arrive_at, 0

    def get_json(self, url, params):
        for _ in range(30):
            self.serial += 1
            self.rows.insert(0, api_row(10**6 + self.serial, self.arrive_at))
        return super().get_json(url, params)


def test_pages_never_overlap_while_rows_arrive():
    """Offset paging over newest-first rows returns a row twice when rows arrive at the head;
    with no trade id that duplicate would be stored as an exact repeat. Time paging cannot."""
    t0 = 1_786_000_000
    api = GrowingDataApi([api_row(i, t0 + i // 10) for i in range(3_000)], arrive_at=t0 + 299)
    queue = BackfillQueue(api.get_json, "http://x/data", shard="0/1", delay=0, margin=0, page=500,
                          wall=lambda: float(t0 + 10_000))
    queue.add(Gap(TOKEN, COND, datetime.fromtimestamp(t0, timezone.utc),
                  datetime.fromtimestamp(t0 + 299, timezone.utc), "disconnect"))
    trades = run_queue(queue, {TOKEN})[0].trades
    assert all(t["ordinal"] == 0 for t in trades)  # every fill has its own tx: no repeat may appear
    assert len({t["tx_hash"] for t in trades}) == len(trades) >= 3_000
    assert {f"0x{i:064x}" for i in range(3_000)} <= {t["tx_hash"] for t in trades}


def test_a_second_fuller_than_a_page_is_read_by_offset():
    t0 = 1_786_000_000
    rows = [api_row(i, t0 + 5) for i in range(1_200)] + [api_row(5_000 + i, t0 + i) for i in range(5)]
    api = DataApi(rows)
    queue = BackfillQueue(api.get_json, "http://x/data", shard="0/1", delay=0, margin=0, page=500,
                          wall=lambda: float(t0 + 1_000))
    queue.add(Gap(TOKEN, COND, datetime.fromtimestamp(t0, timezone.utc),
                  datetime.fromtimestamp(t0 + 5, timezone.utc), "stall"))
    trades = run_queue(queue, {TOKEN})[0].trades
    assert len(trades) == 1_205 and len({t["tx_hash"] for t in trades}) == 1_205
    assert any(c["offset"] > 0 and c["start"] == c["end"] == t0 + 5 for c in api.calls)


def test_a_second_too_full_for_offset_paging_is_split_by_market():
    t0 = 1_786_000_000
    other = "0x" + "cd" * 32
    # 12,000 fills in one second over two markets: past the 10,000 offset cap together,
    # within it for each market alone.
    rows = [api_row(i, t0, cond=COND if i % 2 else other, token=TOKEN if i % 2 else "7") for i in range(12_000)]
    api = DataApi(rows)
    queue = BackfillQueue(api.get_json, "http://x/data", shard="0/1", delay=0, margin=0, page=1000,
                          wall=lambda: float(t0 + 1_000))
    for token, cond in ((TOKEN, COND), ("7", other)):
        queue.add(Gap(token, cond, datetime.fromtimestamp(t0, timezone.utc), datetime.fromtimestamp(t0, timezone.utc),
                      "stall"))
    trades = run_queue(queue, {TOKEN, "7"})[0].trades
    assert len(trades) == 12_000 and len({t["tx_hash"] for t in trades}) == 12_000
    assert max(c["offset"] for c in api.calls) < MAX_OFFSET
    assert {c["market"] for c in api.calls} >= {COND, other}


def test_numbering_rows_matches_numbering_dicts():
    """Ordinals.number (the listener's rows, in TRADE_COLUMNS order) counts repeats exactly
    as assign() does for dicts, per fill and across frames, and stamps received_at."""
    from workers.messages import ORDINAL, RECEIVED_AT

    fills = [("0xa", "0.5", "10"), ("0xa", "0.5", "10"), ("0xa", "0.5", "11"), ("0xb", "0.5", "10"),
             ("0xa", "0.5", "10")] * 30
    by_dict, by_row = Ordinals(), Ordinals()
    dicts = [fill(tx, price, size) for tx, price, size in fills]
    for d in dicts:
        by_dict.assign(d)
    rows = [[TOKEN, COND, "2026-08-14T17:27:47.101+00:00", price, size, "BUY", tx, None, "0", "ws", None]
            for tx, price, size in fills]
    for i in range(0, len(rows), 7):  # frames of 7 rows: the memory spans frames
        by_row.number(rows[i:i + 7], "R")
    assert [int(r[ORDINAL]) for r in rows] == [d["ordinal"] for d in dicts]
    assert max(int(r[ORDINAL]) for r in rows) == 89 and all(r[RECEIVED_AT] == "R" for r in rows)
    no_tx = [[TOKEN, COND, "2024-08-25T05:35:36.087+00:00", "0.491", "5", "SELL", None, None, None, "ws", None]] * 2
    by_row.number([list(r) for r in no_tx], "R")  # keyed by ts: no crash, counted separately from tx fills


def test_fills_in_adjacent_reads_meet_however_long_the_pause_between():
    """One rotation per loop turn: a fill read just before the process stood still (SIGSTOP,
    a slow commit) still numbers its twin read just after, whatever the pause."""
    clock = [0.0]
    ordinals = Ordinals(memory=30, clock=lambda: clock[0])
    first = [[TOKEN, COND, "t", "0.5", "10", "BUY", "0xa", None, "0", "ws", None]]
    ordinals.number(first, "R")
    clock[0] = 3600.0  # an hour stopped between two reads
    ordinals.maybe_rotate()  # the loop turn between them
    second = [[TOKEN, COND, "t", "0.5", "10", "BUY", "0xa", None, "0", "ws", None]]
    ordinals.number(second, "R")
    assert (first[0][7], second[0][7]) == ("0", "1")


def test_pending_is_cheap_and_right_with_many_gaps_waiting():
    """pending() runs every loop turn: with 20,000 start gaps waiting it must answer from
    the earliest due time, and still say True exactly when the first gap is due."""
    wall = [1_786_000_000.0]
    queue = BackfillQueue(lambda url, params: [], "http://x/data", shard="0/1", delay=60.0, margin=5.0, settle=0.0,
                          wall=lambda: wall[0])
    start = EPOCH + timedelta(seconds=wall[0] - 100)
    for i in range(20_000):
        queue.add(Gap(str(i), COND, start, start + timedelta(seconds=50 + i % 7), "start"))
    due = min(queue._due_at(g) for g in queue.waiting)
    assert not queue.pending(due - 0.01) and queue.pending(due)
    import time as clock
    began = clock.perf_counter()
    for _ in range(1000):
        queue.pending(due - 0.01)
    assert clock.perf_counter() - began < 0.05  # 1,000 calls: no walk over 20,000 gaps each
