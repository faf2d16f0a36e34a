"""Minimal reproductions of hostile inputs the property tests (test_parsers_fuzz.py) found.

Each test names the parser, the input and what must happen instead of what does.
They are kept as plain examples so a failure reads as one precise defect.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from datetime import datetime, timezone

import psycopg2
import pytest

from tests.faults import payloads as P
from tests.faults.invariants import check_row
from workers import backfill, markets, orderbooks, prices
from workers.storage import Writer, migrate
from workers.storage.spool import HEADER, Spool

UTC = timezone.utc
NOW = datetime(2026, 11, 28, 16, 0, tzinfo=UTC)


def framed(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


# -- workers/payload.py epoch_ms / epoch_s (used by orderbooks, prices...) ---------------------------
@pytest.mark.parametrize("stamp", ["\u00b2", "1\u00b2\u00b3", "\u2460"])
def test_book_timestamp_with_unicode_digit_characters_is_skipped_not_raised(stamp):
    """'²'.isdigit() is True but int('²') raises ValueError: parse() must count the book, not raise."""
    book = P.load("clob_book_empty_ask.json")
    book["timestamp"] = stamp
    out = orderbooks.parse([book, P.load("clob_book_559651_yes.json")], received_at=NOW)
    assert out.skipped == 1
    assert len(out.table("orderbook_snapshots")) == 1


# -- workers/backfill.py rows_from_data_api ------------------------------------------------------------
def test_data_api_huge_size_is_skipped_not_raised():
    """size 1e80: Decimal.quantize raises InvalidOperation outside _quantized's try; one hostile row
    must cost that row, not the whole backfill request (which would then be retried forever)."""
    rows = P.load("data_api_trades_row.json")
    good = dict(rows[0], transactionHash="0x" + "ab" * 32)
    bad = dict(rows[0], size=10**80)
    out, skipped = backfill.rows_from_data_api([bad, good])
    assert skipped == 1 and len(out) == 1


@pytest.mark.parametrize("asset", ["\u0661\u0662\u0663", "\uff11\uff12", "1" * 79, " 123", "123\n"])
def test_data_api_token_id_must_be_1_to_78_ascii_digits(asset):
    rows = P.load("data_api_trades_row.json")
    out, skipped = backfill.rows_from_data_api([dict(rows[0], asset=asset)])
    assert out == [] and skipped == 1, out


@pytest.mark.parametrize("tx", ["0x\ud800", "0xab\x00cd", "not a hash", "0x" + "ab" * 200])
def test_data_api_transaction_hash_must_be_hex(tx):
    """transactionHash goes into the trade key as text: a lone surrogate or NUL makes PostgreSQL
    refuse the row (a surrogate even stalls the Writer, see below); the live parser refuses such
    hashes (workers/messages.py _HEX_ID), the backfill must too."""
    rows = P.load("data_api_trades_row.json")
    out, skipped = backfill.rows_from_data_api([dict(rows[0], transactionHash=tx)])
    assert out == [] and skipped == 1, out


# -- workers/markets.py parse: text/jsonb values PostgreSQL refuses --------------------------------------
@pytest.mark.parametrize("field,value", [
    ("question", "Will it\x00 rain?"),       # NUL: text columns refuse it
    ("slug", "\ud800"),                      # lone surrogate: not encodable as UTF-8
    ("description", float("nan")),           # NaN in raw: jsonb refuses it
    ("description", "nul \x00 inside"),      # \u0000 in raw: jsonb refuses it
])
def test_gamma_market_never_yields_a_row_postgresql_refuses(field, value, pg_dsn, tmp_path):
    """A market whose row the database would refuse must be skipped (and counted) or cleaned,
    not handed to the Writer, where it ends in rejected.jsonl and the market is never stored."""
    market = P.load("gamma_market_live_559651_include_tag.json")
    market[field] = value
    out = markets.parse([market], seen_at=NOW)
    for row in out.table("markets"):
        check_row("markets", row)


# -- workers/storage/spool.py read ---------------------------------------------------------------------
@pytest.mark.parametrize("payload", [
    {"t": None, "c": [], "r": None},
    {"t": "trades", "c": ["token_id"], "r": {"not": "a list"}},
    {"t": "trades", "c": ["token_id", "price"], "r": [["1"]]},
    {"t": "trades", "c": ["token_id"], "r": [[1]]},
])
def test_spool_record_of_the_wrong_shape_is_corruption(payload, tmp_path):
    """A CRC-valid record whose fields have the wrong types must be reported as corruption
    (and saved aside), not yielded as a record the Writer then fails on."""
    spool = Spool(tmp_path / "s", fsync=False)
    spool.open()
    seg = tmp_path / "s" / "000000000001.seg"
    seg.write_bytes(framed(json.dumps(payload).encode()))
    try:
        records = list(spool.read(seg))
    finally:
        spool.close()
    assert records == [] and len(spool.corruptions) == 1


def test_spool_unknown_table_does_not_stall_the_writer(pg_dsn, tmp_path):
    """A spool segment holding a record for a table this version does not know (written by
    another version, or damaged) must not block the spool forever: the rows added after it
    must reach PostgreSQL, and close() must not raise."""
    migrate(pg_dsn)
    directory = tmp_path / "spool" / "w"
    directory.mkdir(parents=True)
    payload = json.dumps({"t": "table_of_a_newer_version", "c": ["a"], "r": [["1"]]}).encode()
    (directory / "000000000001.seg").write_bytes(framed(payload))
    writer = Writer(pg_dsn, tmp_path / "spool", name="w", close_timeout=3, retry_initial=0.1)
    writer.open()
    row = {"token_id": "1", "ts": NOW, "price": "0.5", "size": "1", "side": "BUY", "tx_hash": "0xab",
           "ordinal": 0, "source": "ws"}
    writer.add("trades", [row])
    time.sleep(0.5)
    error = None
    try:
        writer.close()
    except Exception as err:  # noqa: BLE001 - the assertion below reports it
        error = err
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM trades")
        stored = cur.fetchone()[0]
    conn.close()
    assert error is None and stored == 1, f"close() raised {error!r}; trades stored: {stored}"


def test_lone_surrogate_in_a_text_value_does_not_take_the_database_down(pg_dsn, tmp_path):
    """JSON "\\ud800" decodes to a lone surrogate; a row carrying one cannot be encoded for COPY.
    That is a data error of one row: the Writer must reject that row (rejected.jsonl) and keep
    writing the others, not mark PostgreSQL unreachable and spool everything from then on."""
    migrate(pg_dsn)
    writer = Writer(pg_dsn, tmp_path / "spool", name="w", background=False, close_timeout=3)
    writer.open()
    bad = {"token_id": "1", "ts": NOW, "price": "0.5", "size": "1", "side": "BUY", "tx_hash": "0x\ud800",
           "ordinal": 0, "source": "ws"}
    good = dict(bad, token_id="2", tx_hash="0xab")
    writer.add("trades", [bad, good])
    writer.flush()
    writer.add("trades", [dict(good, token_id="3")])
    writer.flush()
    stats = writer.stats()
    writer.close()
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT token_id FROM trades ORDER BY 1")
        stored = [r[0] for r in cur.fetchall()]
    conn.close()
    assert stored == ["2", "3"], (stored, stats)
    assert stats["db_ok"] and stats["spool_bytes"] == 0, stats
