"""Property tests over every parser: hostile input never escapes as an exception
and never becomes a half row.

Each test drives one parser with hypothesis (arbitrary JSON, and the real
recorded payloads of tests/data/ mutated: keys dropped, types changed, huge
numbers, NaN-ish strings, non-ASCII digits, NUL, lone surrogates, deep nesting,
truncated text), checks every row it produces with invariants.check_row, and
at the end writes all the rows it collected through the real Writer into a real
PostgreSQL schema: the database must accept every one (rows_rejected == 0).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults import payloads as P
from tests.faults.invariants import check_row
from workers import backfill, markets, messages, orderbooks, prices, resolutions
from workers.storage import Writer, migrate
from workers.storage.spool import HEADER, Record, Spool, encode

UTC = timezone.utc
NOW = datetime(2026, 11, 28, 16, 0, tzinfo=UTC)
# Random exploration on a developer's machine; under CI (CI=true, as .ci/run runs)
# the same examples every run, so a green CI cannot turn red by chance and the
# "rows were exercised" self-checks below cannot flake.
FUZZ = settings(max_examples=250, deadline=None, derandomize=bool(os.environ.get("CI")), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
KEEP = 400  # rows per table kept for the database round


class Collected:
    """Rows the parser produced during the run, per table (a bounded sample)."""

    def __init__(self):
        self.rows: dict[str, list[dict]] = {}
        self.count = 0

    def add(self, table: str, rows) -> None:
        for row in rows:
            check_row(table, row)
            self.count += 1
            kept = self.rows.setdefault(table, [])
            if len(kept) < KEEP:
                kept.append(dict(row))


def database_accepts(dsn: str, tmp_path: Path, collected: Collected) -> None:
    """Write every collected row through the real Writer; PostgreSQL must refuse none."""
    migrate(dsn)
    writer = Writer(dsn, tmp_path / "spool", name="fuzz", background=False, max_rows=10**9, max_age=10**9)
    writer.open()
    try:
        for table, rows in collected.rows.items():
            if table == "tokens":  # tokens reference markets in some schemas: markets first
                continue
            writer.add(table, rows)
        writer.add("tokens", collected.rows.get("tokens", []))
        writer.flush()
    finally:
        writer.close()
    stats = writer.stats()
    rejected = tmp_path / "spool" / "fuzz" / "rejected.jsonl"
    detail = rejected.read_text()[:3000] if rejected.exists() else ""
    assert stats["rows_rejected"] == 0, f"PostgreSQL refused parser rows: {detail}"
    assert stats["spool_bytes"] == 0 and stats["db_ok"], stats


# -- WebSocket market channel -----------------------------------------------------------------
WS_SAMPLES = (P.load_lines("ws_market_messages.jsonl") + P.load_lines("ws_market_messages_2024.jsonl")
              + P.load_lines("ws_market_custom_feature_examples_docs.jsonl")
              + [P.load("ws_book_snapshot_2026-08-13_nautilus.json")])
WS_SAMPLES.append(WS_SAMPLES[:6])  # an array frame


def test_ws_frames_never_raise_never_half_a_trade(pg_dsn, tmp_path):
    collected = Collected()

    @FUZZ
    @given(text=P.texts(WS_SAMPLES), as_bytes=st.booleans())
    def run(text, as_bytes):
        frame = text.encode("utf-8", "surrogatepass") if as_bytes else text
        out = messages.parse(frame)
        rows = []
        for i, row in enumerate(out.trades):
            row = dict(messages.row_dict(row), ordinal=i, received_at=NOW)
            rows.append(row)
        collected.add("trades", rows)
        for book in out.books:
            assert isinstance(book["asset_id"], str) and book["asset_id"].isascii()
        assert all(isinstance(v, int) and v > 0 for v in out.skipped.values())

    run()
    assert collected.count > 3, "the mutations never left a trade intact: the test is not exercising rows"
    database_accepts(pg_dsn, tmp_path, collected)


def test_ws_invalid_bytes_and_huge_frames():
    """Bytes that are not UTF-8, a 5 MB frame, 100 000-deep nesting: counted, never raised."""
    for frame in (b"\xff\xfe{", b'{"event_type":"last_trade_price","price":"\xc3"}', "[" * 100_000 + "]" * 100_000,
                  "[" * 100_000, json.dumps([P.load_lines("ws_market_messages.jsonl")[0]] * 20000)):
        out = messages.parse(frame)
        assert out.skipped or out.trades or out.events, frame[:40]
        for row in out.trades:
            check_row("trades", dict(messages.row_dict(row), ordinal=0, received_at=NOW))


# -- Gamma: markets/tokens and resolutions -----------------------------------------------------
GAMMA_FILES = sorted(p.name for p in P.DATA.glob("gamma_*.json"))
GAMMA_SAMPLES = [P.load(n) for n in GAMMA_FILES]
GAMMA_SAMPLES.append({"markets": P.load("gamma_markets_list_assembled.json")[:3], "next_cursor": "abc"})


def test_gamma_markets_never_raise_never_half_a_row(pg_dsn, tmp_path):
    collected = Collected()

    @FUZZ
    @given(payload=P.payloads(GAMMA_SAMPLES))
    def run(payload):
        out = markets.parse(payload, seen_at=NOW)
        collected.add("markets", out.table("markets"))
        collected.add("tokens", out.table("tokens"))
        ids = {r["market_id"] for r in out.table("markets")}
        for token in out.table("tokens"):
            assert token["market_id"] in ids, "a token row without its market row"

    run()
    assert collected.count > 5
    database_accepts(pg_dsn, tmp_path, collected)


def test_gamma_resolutions_never_raise_never_half_a_row(pg_dsn, tmp_path):
    collected = Collected()

    @FUZZ
    @given(payload=P.payloads(GAMMA_SAMPLES))
    def run(payload):
        out, verdicts = resolutions.parse(payload, seen_at=NOW)
        collected.add("resolutions", out.table("resolutions"))
        for row in out.table("resolutions"):
            assert row["status"] in resolutions.FINAL
            assert isinstance(row["payouts"], list) and all(isinstance(v, str) for v in row["payouts"])
            if row["status"] == "resolved":
                assert row["winning_outcome"] is not None

    run()
    assert collected.count > 3
    database_accepts(pg_dsn, tmp_path, collected)


# -- CLOB: books and prices --------------------------------------------------------------------
BOOK_SAMPLES = [P.load(n) for n in sorted(p.name for p in P.DATA.glob("clob_book_*.json"))]
BOOK_SAMPLES.append(list(BOOK_SAMPLES))


def test_clob_books_never_raise_never_half_a_row(pg_dsn, tmp_path):
    collected = Collected()

    @FUZZ
    @given(payload=P.payloads(BOOK_SAMPLES))
    def run(payload):
        out = orderbooks.parse(payload, received_at=NOW)
        collected.add("orderbook_snapshots", out.table("orderbook_snapshots"))
        for row in out.table("orderbook_snapshots"):
            for side in ("bids", "asks"):
                assert len(row[side]) == row[f"{side[:3]}_levels"]
                for price_text, size_text in row[side]:
                    check_row("trades", {"token_id": "1", "ts": NOW, "price": price_text, "size": size_text,
                                         "side": "BUY", "source": "ws"})

    run()
    assert collected.count > 5
    database_accepts(pg_dsn, tmp_path, collected)


TOKENS = [b["asset_id"] for b in BOOK_SAMPLES[:-1]]
PRICE_SAMPLES = [
    {"prices": {TOKENS[0]: {"BUY": "0.045", "SELL": "0.046"}, TOKENS[1]: {"BUY": 0.954, "SELL": "0.955"}},
     "midpoints": {TOKENS[0]: "0.0455", TOKENS[1]: {"mid": "0.9545"}},
     "last": [{"token_id": TOKENS[0], "price": "0.045", "side": "BUY"},
              {"token_id": TOKENS[1], "price": "0.5", "side": ""}]},
    {"prices": {TOKENS[2]: {"BUY": "0", "SELL": "0.5"}}, "midpoints": {TOKENS[2]: "0.25"},
     "last": {TOKENS[2]: {"price": "0.3", "side": "SELL"}}},
]


def test_clob_prices_never_raise_never_half_a_row(pg_dsn, tmp_path):
    collected = Collected()

    @FUZZ
    @given(sample=P.payloads(PRICE_SAMPLES), restrict=st.booleans())
    def run(sample, restrict):
        if isinstance(sample, dict):
            args = (sample.get("prices"), sample.get("midpoints"), sample.get("last"))
        else:
            args = (sample, None, sample)
        out = prices.parse(*args, tokens=TOKENS if restrict else None, ts=NOW, received_at=NOW)
        collected.add("price_snapshots", out.table("price_snapshots"))

    run()
    assert collected.count > 5
    database_accepts(pg_dsn, tmp_path, collected)


# -- Data API backfill mapping ---------------------------------------------------------------------
DATA_SAMPLES = [P.load("data_api_trades_row.json")]
DATA_SAMPLES.append(DATA_SAMPLES[0] * 3)


def test_data_api_backfill_rows_never_raise_never_half_a_row(pg_dsn, tmp_path):
    collected = Collected()

    @FUZZ
    @given(payload=P.payloads(DATA_SAMPLES))
    def run(payload):
        rows, skipped = backfill.rows_from_data_api(payload)
        assert skipped >= 0
        rows = backfill.number_repeats(rows)
        collected.add("trades", [dict(r, received_at=NOW) for r in rows])

    run()
    assert collected.count > 5
    database_accepts(pg_dsn, tmp_path, collected)


# -- spool record reader ---------------------------------------------------------------------------
def framed(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


GOOD = Record("trades", ["token_id", "price"], [["123", "0.5"], ["456", None]])


@st.composite
def segments(draw):
    """A spool segment: good records, then bytes flipped, cut, or a CRC-valid record of arbitrary JSON."""
    good = encode(GOOD)
    how = draw(st.sampled_from(("flip", "cut", "junk", "arbitrary", "arbitrary", "length")))
    data = good * draw(st.integers(1, 3))
    if how == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif how == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "junk":
        data += draw(st.binary(max_size=64))
    elif how == "length":
        data += struct.pack(">II", draw(st.integers(0, 2**32 - 1)), 0) + b"x" * draw(st.integers(0, 16))
    else:
        value = draw(st.one_of(P.json_values, st.fixed_dictionaries(
            {"t": P.json_values, "c": P.json_values, "r": P.json_values})))
        data += framed(json.dumps(value).encode())
    return data


def test_spool_reader_never_raises_never_half_a_record(tmp_path):
    counter = iter(range(10**9))

    @FUZZ
    @given(data=segments())
    def run(data):
        directory = tmp_path / f"s{next(counter)}"
        spool = Spool(directory, fsync=False)
        spool.open()
        try:
            seg = directory / "000000000001.seg"
            seg.write_bytes(data)
            for record, end in spool.read(seg):
                assert isinstance(record.table, str) and record.table, record
                assert isinstance(record.columns, list) and all(isinstance(c, str) for c in record.columns), record
                assert isinstance(record.rows, list), record
                for row in record.rows:
                    assert isinstance(row, list) and len(row) == len(record.columns), record
                    assert all(v is None or isinstance(v, str) for v in row), record
                assert 0 < end <= len(data)
        finally:
            spool.close()

    run()


def test_spool_reader_deeply_nested_record(tmp_path):
    """A CRC-valid record nested 100 000 deep (a hostile or damaged file) is corruption, not a crash."""
    directory = tmp_path / "deep"
    spool = Spool(directory, fsync=False)
    spool.open()
    seg = directory / "000000000001.seg"
    seg.write_bytes(encode(GOOD) + framed(b"[" * 100_000 + b"]" * 100_000))
    try:
        records = list(spool.read(seg))
    finally:
        spool.close()
    assert [r.table for r, _ in records] == ["trades"]
    assert spool.corruptions and spool.corruptions[0].offset == len(encode(GOOD))
