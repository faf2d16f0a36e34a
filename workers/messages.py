"""Market-channel messages: the pure parser from one WebSocket text frame to events.

`parse(text)` is the only code that knows the market channel's wire format
(polymarket-api.md §5). In order it:
  1. recognises plain-text frames (`PONG`, `NO NEW ASSETS`, ...) before any JSON parsing;
  2. json.loads the frame, which holds one object or an array of objects;
  3. validates each object by its `event_type` and turns it into a normalised event:
     trades become complete rows for the `trades` table (minus `ordinal`, which needs
     the collector's memory, and `received_at`, which the caller knows);
  4. counts and skips what it cannot use: unknown event types, unknown fields,
     invalid events. A bad event never yields a half row and never raises.

Numbers stay exact: prices and sizes are canonical decimal strings ("0.48", never
".48" or "0.480"; the same value always has the same text, because the collector
numbers repeats of identical fills by their text, see workers/trades.py), and
millisecond timestamps become timezone-aware datetimes without a float round trip.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# Canonical decimal text: no sign, no leading zeros, no trailing fractional zeros.
_CANON = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]*[1-9])?")
_TOKEN = re.compile(r"[0-9]{1,78}")
_HEX_ID = re.compile(r"0x[0-9a-fA-F]{1,128}")
_MS_MIN, _MS_MAX = 10**11, 10**14  # 1973 .. 5138 in milliseconds: rejects seconds

TRADE_FIELDS = frozenset(
    ("event_type", "market", "asset_id", "price", "size", "side", "fee_rate_bps", "timestamp", "transaction_hash")
)
KNOWN_FIELDS: dict[str, frozenset] = {
    "last_trade_price": TRADE_FIELDS,
    "book": frozenset(
        ("event_type", "market", "asset_id", "timestamp", "hash", "bids", "asks", "tick_size", "last_trade_price",
         "buys", "sells")
    ),
    "price_change": frozenset(("event_type", "market", "timestamp", "price_changes", "asset_id", "hash", "changes")),
    "best_bid_ask": frozenset(("event_type", "market", "asset_id", "best_bid", "best_ask", "spread", "timestamp")),
    "tick_size_change": frozenset(
        ("event_type", "market", "asset_id", "old_tick_size", "new_tick_size", "timestamp", "side")
    ),
    "new_market": frozenset(
        ("event_type", "id", "question", "market", "slug", "description", "assets_ids", "outcomes", "event_message",
         "timestamp", "tags", "condition_id", "active", "clob_token_ids", "sports_market_type", "line",
         "game_start_time", "order_price_min_tick_size", "group_item_title", "taker_base_fee", "fees_enabled",
         "fee_schedule")
    ),
    "market_resolved": frozenset(
        ("event_type", "id", "market", "assets_ids", "winning_asset_id", "winning_outcome", "timestamp", "tags",
         "event_message")
    ),
}


class Invalid(ValueError):
    """One event failed validation (caught inside parse(); never escapes it)."""


class Parsed:
    """What one frame held. Counters are plain dicts, per frame; the caller adds them up.

    (A plain class with slots: one is built per frame, on the hot path.)
    """

    __slots__ = ("trades", "books", "ticks", "markets", "events", "skipped", "unknown_fields", "pong", "text",
                 "errors", "newest_ms")

    def __init__(self) -> None:
        self.trades: list[dict] = []
        self.books: list[dict] = []  # {asset_id, market, ts, hash, tick_size|None}
        self.ticks: list[dict] = []  # {asset_id, market, tick_size, ts}
        self.markets: list[dict] = []  # new_market / market_resolved, normalised
        self.events: dict[str, int] = {}  # valid events by type (incl. price_change, best_bid_ask)
        self.skipped: dict[str, int] = {}  # "invalid:<type>", "unknown_type:<type>", "not_json", ...
        self.unknown_fields: dict[str, int] = {}  # "<type>.<field>"
        self.pong = False
        self.text: str | None = None  # a plain-text frame other than PONG
        self.errors: list[str] = []  # first few reasons, for rate-limited logging
        self.newest_ms = 0  # the newest exchange timestamp of a valid event (0: none)

    def count(self, counter: dict, key: str) -> None:
        counter[key] = counter.get(key, 0) + 1


def canon_decimal(value: Any) -> str:
    """A non-negative decimal string or number -> its canonical text. Raises Invalid."""
    if type(value) is str and _CANON.fullmatch(value):
        return value
    if isinstance(value, bool) or value is None:
        raise Invalid(f"not a number: {value!r}")
    try:
        dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise Invalid(f"not a number: {value!r}") from None
    if not dec.is_finite() or dec < 0:
        raise Invalid(f"not a non-negative number: {value!r}")
    return decimal_text(dec)


def decimal_text(dec: Decimal) -> str:
    """Canonical text of a finite non-negative Decimal (no exponent, no trailing zeros)."""
    text = format(dec, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def ms_time(value: Any) -> datetime:
    """Epoch milliseconds (string or int) -> aware UTC datetime, exact to the millisecond."""
    if type(value) is str and value.isascii() and value.isdigit():
        ms = int(value)
    elif type(value) is int:
        ms = value
    else:
        raise Invalid(f"bad ms timestamp: {value!r}")
    if not _MS_MIN <= ms <= _MS_MAX:
        raise Invalid(f"timestamp out of range: {value!r}")
    return EPOCH + timedelta(milliseconds=ms)


def is_hex_id(value: Any) -> bool:
    """0x and 1 to 128 hex digits (condition ids, transaction hashes)."""
    return type(value) is str and _HEX_ID.fullmatch(value) is not None


def is_token_id(value: Any) -> bool:
    """1 to 78 ASCII digits (a uint256 in decimal)."""
    return type(value) is str and _TOKEN.fullmatch(value) is not None


def _token(value: Any) -> str:
    if is_token_id(value):
        return value
    raise Invalid(f"bad token id: {value!r}")


def _condition(value: Any) -> str:
    if type(value) is str and _HEX_ID.fullmatch(value):
        return value
    raise Invalid(f"bad condition id: {value!r}")


def _price(value: Any) -> str:
    text = canon_decimal(value)
    # Canonical text has no leading zeros: at most 1 means "1" or "0..." (no Decimal needed).
    if text[0] != "0" and text != "1":
        raise Invalid(f"price above 1: {value!r}")
    return text


def _side(value: Any) -> str:
    if value == "BUY" or value == "SELL":
        return value
    raise Invalid(f"bad side: {value!r}")


def _trade(msg: dict) -> dict:
    """last_trade_price -> a trades row without ordinal/received_at."""
    tx = msg.get("transaction_hash")
    if tx in (None, ""):
        tx = None  # 2024 recordings carry none: the trade then keys on its ms timestamp
    elif not (type(tx) is str and _HEX_ID.fullmatch(tx)):
        raise Invalid(f"bad transaction_hash: {tx!r}")
    fee = msg.get("fee_rate_bps")
    size = canon_decimal(msg.get("size"))
    if size == "0":
        raise Invalid("zero size")
    return {
        "token_id": _token(msg.get("asset_id")),
        "condition_id": _condition(msg.get("market")),
        "ts": ms_time(msg.get("timestamp")),
        "price": _price(msg.get("price")),
        "size": size,
        "side": _side(msg.get("side")),
        "tx_hash": tx.lower() if tx else None,
        "fee_rate_bps": None if fee in (None, "") else canon_decimal(fee),
        "source": "ws",
    }


_LEVEL_PRICE = re.compile(r"(?:0?\.[0-9]+|0|1(?:\.0*)?)")  # a decimal string in [0, 1]
_LEVEL_SIZE = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def _levels(levels: Any) -> None:
    """Book levels: a list of {price, size} decimal strings, price within [0, 1].

    Checked by pattern only (books are not stored by this listener and one refresh
    can carry hundreds of levels; the orderbooks collector keeps books from REST).
    """
    if not isinstance(levels, list):
        raise Invalid("levels not a list")
    price_ok, size_ok = _LEVEL_PRICE.fullmatch, _LEVEL_SIZE.fullmatch
    for level in levels:
        if not (type(level) is dict and type(p := level.get("price")) is str and price_ok(p)
                and type(z := level.get("size")) is str and size_ok(z)):
            raise Invalid(f"bad level: {str(level)[:60]}")


def _book(msg: dict) -> dict:
    # Legacy snapshots call the sides buys/sells.
    _levels(msg.get("bids", msg.get("buys")))
    _levels(msg.get("asks", msg.get("sells")))
    tick = msg.get("tick_size")
    return {
        "asset_id": _token(msg.get("asset_id")),
        "market": _condition(msg.get("market")),
        "ts": ms_time(msg.get("timestamp")),
        "hash": msg.get("hash") if type(msg.get("hash")) is str else None,
        "tick_size": None if tick in (None, "") else _price(tick),
    }


def _price_change(msg: dict) -> str:
    _condition(msg.get("market"))
    ms_time(msg.get("timestamp"))
    changes = msg.get("price_changes")
    if changes is None and isinstance(msg.get("changes"), list):
        # Legacy shape (before 2025-09-15): top-level asset_id and changes[].
        _token(msg.get("asset_id"))
        for change in msg["changes"]:
            if not isinstance(change, dict):
                raise Invalid("change not an object")
            _price(change.get("price"))
            canon_decimal(change.get("size"))
            _side(change.get("side"))
        return "price_change_legacy"
    if not isinstance(changes, list):
        raise Invalid("price_changes missing")
    for change in changes:
        if not isinstance(change, dict):
            raise Invalid("price change not an object")
        _token(change.get("asset_id"))
        _price(change.get("price"))
        canon_decimal(change.get("size"))
        _side(change.get("side"))
        for key in ("best_bid", "best_ask"):
            if change.get(key) not in (None, ""):
                _price(change[key])
    return "price_change"


def _best_bid_ask(msg: dict) -> None:
    _token(msg.get("asset_id"))
    _condition(msg.get("market"))
    ms_time(msg.get("timestamp"))
    for key in ("best_bid", "best_ask"):
        _price(msg.get(key))


def _tick(msg: dict) -> dict:
    return {
        "asset_id": _token(msg.get("asset_id")),
        "market": _condition(msg.get("market")),
        "tick_size": _price(msg.get("new_tick_size")),
        "ts": ms_time(msg.get("timestamp")),
    }


def _ids(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise Invalid("assets_ids not a list")
    return [_token(v) for v in value]


def _market_event(msg: dict, kind: str) -> dict:
    """new_market / market_resolved -> a normalised event; the raw object is kept too."""
    market_id = msg.get("id")
    if not (type(market_id) is str and market_id.isascii() and market_id.isdigit()):
        raise Invalid(f"bad market id: {market_id!r}")
    event = {
        "kind": kind,
        "market_id": market_id,
        "condition_id": _condition(msg.get("market") or msg.get("condition_id")),
        "ts": ms_time(msg.get("timestamp")),
        "asset_ids": _ids(msg.get("assets_ids")),
        "raw": msg,
    }
    if kind == "market_resolved":
        winner = msg.get("winning_asset_id")
        if winner in (None, ""):  # a void (50-50) resolution names no winner
            event["winning_token_id"] = None
        else:
            event["winning_token_id"] = _token(winner)
            if winner not in event["asset_ids"]:
                raise Invalid("winning_asset_id not among assets_ids")
        outcome = msg.get("winning_outcome")
        event["winning_outcome"] = outcome if type(outcome) is str and outcome else None
    else:
        outcomes = msg.get("outcomes")
        if not isinstance(outcomes, list) or len(outcomes) != len(event["asset_ids"]):
            raise Invalid("outcomes do not match assets_ids")
        event["outcomes"] = outcomes
        event["question"] = msg.get("question") if type(msg.get("question")) is str else None
        event["slug"] = msg.get("slug") if type(msg.get("slug")) is str else None
    return event


def _one(msg: Any, out: Parsed) -> None:
    """Validate one object and append what it yields to out (all or nothing)."""
    if not isinstance(msg, dict):
        out.count(out.skipped, "not_object")
        return
    kind = msg.get("event_type")
    known = KNOWN_FIELDS.get(kind) if type(kind) is str else None
    if known is None:
        out.count(out.skipped, f"unknown_type:{str(kind)[:40]}")
        return
    try:
        if kind == "last_trade_price":
            row = _trade(msg)
            out.trades.append(row)
        elif kind == "book":
            out.books.append(_book(msg))
        elif kind == "price_change":
            kind = _price_change(msg)
        elif kind == "best_bid_ask":
            _best_bid_ask(msg)
        elif kind == "tick_size_change":
            out.ticks.append(_tick(msg))
        else:
            out.markets.append(_market_event(msg, kind))
    except (Invalid, TypeError, ValueError, AttributeError, InvalidOperation) as err:
        out.count(out.skipped, f"invalid:{kind}")
        if len(out.errors) < 3:
            out.errors.append(f"{kind}: {err}"[:200])
        return
    out.count(out.events, kind)
    ms = int(msg["timestamp"])  # every event type's parser validated it
    if ms > out.newest_ms:
        out.newest_ms = ms
    if not known.issuperset(msg):
        for key in msg:
            if key not in known:
                out.count(out.unknown_fields, f"{kind}.{str(key)[:40]}")


def parse(text: str | bytes) -> Parsed:
    """One WebSocket text frame -> Parsed. Never raises."""
    out = Parsed()
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        stripped = text.strip()
        if not stripped.startswith(("{", "[")):
            # Heartbeat replies and notices are plain text, not JSON.
            if stripped == "PONG":
                out.pong = True
            else:
                out.text = stripped[:200]
                out.count(out.skipped, "text")
            return out
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        out.count(out.skipped, "not_json")
        out.errors.append(f"not JSON: {err}"[:200])
        return out
    if isinstance(data, list):
        for msg in data:
            _one(msg, out)
    else:
        _one(data, out)
    return out
