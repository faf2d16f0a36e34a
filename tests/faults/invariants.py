"""What a row a parser produces must satisfy before it may reach the Writer.

A parser may skip an item (and count it); it may never emit a half row. Here a
row is whole when, for its table (workers/storage/tables.py is the truth):
  1. it names only columns of the table and carries every required column;
  2. the Writer's own converter takes it (what add() would do);
  3. each value has the type its column needs, exactly: token ids are 1-78 ASCII
     digits, prices are finite decimals in [0, 1], sizes and depths >= 0,
     numerics fit PostgreSQL's numeric (131072 integer digits, 16383 fraction
     digits), timestamps are aware datetimes, text holds no NUL and no lone
     surrogate (PostgreSQL refuses both), jsonb is strict JSON (no NaN/Infinity,
     no \\u0000).
`check_row(table, row)` raises AssertionError naming the column and the value.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from decimal import Decimal, InvalidOperation

from workers.storage.rows import row_converter
from workers.storage.tables import TABLES

TOKEN = re.compile(r"[0-9]{1,78}")
PRICE_COLUMNS = {"price", "best_bid", "best_ask", "mid", "last_trade_price"}
NONNEGATIVE = {"size", "bid_depth", "ask_depth", "volume", "volume_24h", "liquidity", "fee_rate_bps"}
TOKEN_COLUMNS = {"token_id", "winning_token_id"}
REQUIRED = {
    "trades": ("token_id", "ts", "price", "size", "side", "source"),
    "markets": ("market_id", "condition_id"),
    "tokens": ("token_id", "market_id", "outcome_index"),
    "price_snapshots": ("token_id", "ts"),
    "orderbook_snapshots": ("token_id", "condition_id", "ts", "hash", "bids", "asks"),
    "resolutions": ("market_id", "status"),
}
_CONVERTERS = {name: row_converter(t.columns) for name, t in TABLES.items()}


def _strict_json(text: str) -> None:
    def bad(const):
        raise AssertionError(f"jsonb holds {const}, which PostgreSQL refuses")

    json.loads(text, parse_constant=bad)
    if "\\u0000" in text or "\x00" in text:
        raise AssertionError("jsonb holds \\u0000, which PostgreSQL refuses")
    text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError


def _decimal(column: str, value) -> Decimal:
    if isinstance(value, bool):
        raise AssertionError(f"{column}: bool {value!r} in a numeric column")
    if isinstance(value, float):
        raise AssertionError(f"{column}: float {value!r} (inexact) in a numeric column")
    try:
        dec = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        raise AssertionError(f"{column}: {str(value)[:60]!r} is not a decimal") from None
    assert dec.is_finite(), f"{column}: {value!r} is not finite"
    sign, digits, exp = dec.as_tuple()
    integer_digits = max(0, len(digits) + exp)
    fraction_digits = max(0, -exp)
    assert integer_digits <= 131072 and fraction_digits <= 16383, \
        f"{column}: {str(value)[:40]!r} overflows PostgreSQL numeric"
    return dec


def check_row(table: str, row: dict) -> None:
    """Raise AssertionError unless row is a whole, valid row of table."""
    assert table in TABLES, f"unknown table {table}"
    cols = dict(TABLES[table].columns)
    assert isinstance(row, dict), f"{table}: row is {type(row).__name__}"
    unknown = set(row) - set(cols)
    assert not unknown, f"{table}: unknown columns {sorted(unknown)}"
    for col in REQUIRED.get(table, ()):
        assert row.get(col) is not None, f"{table}.{col} missing in {str(row)[:200]}"
    if table == "trades":
        assert row.get("tx_hash") or row.get("ts"), "trades: neither tx_hash nor ts"
        assert row["side"] in ("BUY", "SELL"), f"trades.side {row['side']!r}"
        assert row["source"] in ("ws", "backfill"), f"trades.source {row['source']!r}"
        assert _decimal("size", row["size"]) > 0, f"trades.size {row['size']!r} not > 0"
    _CONVERTERS[table](row)  # what Writer.add() does; raises TypeError/ValueError
    for col, value in row.items():
        if value is None:
            continue
        kind = cols[col]
        if col in TOKEN_COLUMNS:
            assert type(value) is str and TOKEN.fullmatch(value), f"{table}.{col}: bad token id {str(value)[:90]!r}"
        if kind == "numeric":
            dec = _decimal(f"{table}.{col}", value)
            if col in PRICE_COLUMNS:
                assert 0 <= dec <= 1, f"{table}.{col}: price {value!r} outside [0, 1]"
            if col in NONNEGATIVE:
                assert dec >= 0, f"{table}.{col}: {value!r} < 0"
        elif kind == "timestamptz":
            assert isinstance(value, datetime) and value.utcoffset() is not None, \
                f"{table}.{col}: {value!r} is not an aware datetime"
        elif kind == "text":
            assert isinstance(value, str), f"{table}.{col}: {type(value).__name__}"
            assert "\x00" not in value, f"{table}.{col}: NUL in text"
            value.encode("utf-8")
        elif kind in ("int", "bigint"):
            assert type(value) is int and -2**31 <= value < 2**31, f"{table}.{col}: {value!r}"
        elif kind == "boolean":
            assert type(value) is bool, f"{table}.{col}: {value!r}"
        elif kind == "jsonb":
            text = value if isinstance(value, str) else json.dumps(
                value, default=lambda v: str(v) if isinstance(v, Decimal) else v.isoformat(), ensure_ascii=False)
            _strict_json(text)
