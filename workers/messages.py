"""Market-channel messages: the pure parser from one WebSocket text frame to events.

`parse(text)` is the only code that knows the market channel's wire format
(polymarket-api.md §5). In order it:
  1. recognises plain-text frames (`PONG`, `NO NEW ASSETS`, ...) before any JSON parsing;
  2. decodes the frame, which holds one object or an array of objects, on one of two paths:
     - fast: msgspec decodes it straight into typed objects of the known event types
       (`last_trade_price`, `book`, `price_change`, `best_bid_ask`, `tick_size_change`),
       refusing unknown fields and types in C. A frame that does not fit (an unknown event
       type or field, a `new_market`, a non-object, a wrong JSON type) takes
     - the general path: a plain JSON decode (msgspec, or json.loads for what msgspec
       refuses but Python's JSON accepts) and one validator per object, which counts
       unknown fields and types;
  3. validates each event by its `event_type` and turns it into a normalised event:
     trades become rows for the `trades` table in its column order (TRADE_COLUMNS),
     as the text PostgreSQL receives, with `ordinal` and `received_at` left None for
     the caller (the first needs the collector's memory, the second it knows);
  4. counts and skips what it cannot use: unknown event types, unknown fields,
     invalid events. A bad event never yields a half row and never raises.

Numbers stay exact: prices and sizes are canonical decimal strings ("0.48", never
".48" or "0.480"; the same value always has the same text, because the collector
numbers repeats of identical fills by their text, see workers/trades.py), and
millisecond timestamps become timestamp text without a float round trip.

Validate, do not reconstruct: the exchange already sends canonical text, so a trade
whose fields are canonical as sent is stored with the very strings it arrived in.
Each field is checked once per distinct value (tokens, condition ids, prices, fees and
millisecond timestamps repeat; `_Valid` remembers the values that passed, bounded),
sizes and transaction hashes by a regular expression each. A field that is not
canonical as sent (".48", an upper-case hash, no hash) sends that one trade through
the general validator, which canonicalises it; both paths produce identical rows.
"""


from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# The trades table's columns, in the order of the rows parse() yields (workers/storage/tables.py).
TRADE_COLUMNS = ("token_id", "condition_id", "ts", "price", "size", "side", "tx_hash", "ordinal", "fee_rate_bps",
                 "source", "received_at", "trade_day")
ORDINAL, RECEIVED_AT = 7, 10  # the two places the caller fills in

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
                 "errors", "newest_ms", "book_events")

    def __init__(self) -> None:
        self.trades: list[list] = []  # rows in TRADE_COLUMNS order (ordinal, received_at None)
        self.books: list[dict] = []  # {asset_id, market, ms (epoch ms), hash, tick_size|None}
        self.ticks: list[dict] = []  # {asset_id, market, tick_size, ts}
        self.markets: list[dict] = []  # new_market / market_resolved, normalised
        self.events: dict[str, int] = {}  # valid events by type (incl. price_change, best_bid_ask)
        self.skipped: dict[str, int] = {}  # "invalid:<type>", "unknown_type:<type>", "not_json", ...
        self.unknown_fields: dict[str, int] = {}  # "<type>.<field>"
        self.pong = False
        self.text: str | None = None  # a plain-text frame other than PONG
        self.errors: list[str] = []  # first few reasons, for rate-limited logging
        self.newest_ms = 0  # the newest exchange timestamp of a valid event (0: none)
        # parse(books=True) only: valid `book` and `price_change` events as decoded (loose
        # structs with undecoded sides, or dicts), for workers/bookevents.py to look into.
        self.book_events: list = []

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


def ms_value(value: Any) -> int:
    """Epoch milliseconds (string or int) -> int, checked. Raises Invalid."""
    if type(value) is str and value.isascii() and value.isdigit():
        ms = int(value)
    elif type(value) is int:
        ms = value
    else:
        raise Invalid(f"bad ms timestamp: {value!r}")
    if not _MS_MIN <= ms <= _MS_MAX:
        raise Invalid(f"timestamp out of range: {value!r}")
    return ms


def ms_time(value: Any) -> datetime:
    """Epoch milliseconds (string or int) -> aware UTC datetime, exact to the millisecond."""
    return EPOCH + timedelta(milliseconds=ms_value(value))


def ms_text(value: Any) -> str:
    """Epoch milliseconds (string or int) -> timestamptz text, exact: '2026-08-14T17:27:47.101+00:00'."""
    return (EPOCH + timedelta(milliseconds=ms_value(value))).isoformat(timespec="milliseconds")


class _Valid(set):
    """Values of one field that passed validation (a bounded memo: emptied when full)."""

    __slots__ = ("limit",)

    def __init__(self, initial=(), limit: int = 200_000):
        super().__init__(initial)
        self.limit = limit

    def remember(self, value) -> None:
        if len(self) >= self.limit:
            self.clear()
        self.add(value)


_valid_tokens = _Valid()
_valid_markets = _Valid()
_valid_prices = _Valid()
_valid_fees = _Valid((None,))
# 13-digit ms string -> its timestamptz text. Small on purpose: a busy feed repeats only
# the last few milliseconds (tens of trades each), so a larger memo hits no more often and
# costs a cache miss a trade (measured: 200,000 entries made parse ~20% slower live).
_ts_texts: dict[str, str] = {}
_sec_texts: dict[str, str] = {}  # 10-digit epoch second -> 'YYYY-MM-DDTHH:MM:SS' (UTC)
TS_MEMO = 2048


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


def _trade(msg: dict) -> list:
    """last_trade_price -> a trades row (TRADE_COLUMNS) without ordinal/received_at.

    Values that were canonical as sent are remembered for the fast path (_fast_trades).
    """
    tx = msg.get("transaction_hash")
    if tx in (None, ""):
        tx = None  # 2024 recordings carry none: the trade then keys on its ms timestamp
    elif not (type(tx) is str and _HEX_ID.fullmatch(tx)):
        raise Invalid(f"bad transaction_hash: {tx!r}")
    fee = msg.get("fee_rate_bps")
    size = canon_decimal(msg.get("size"))
    if size == "0":
        raise Invalid("zero size")
    raw_ts = msg.get("timestamp")
    row = [
        _token(msg.get("asset_id")),
        _condition(msg.get("market")),
        ms_text(raw_ts),
        _price(msg.get("price")),
        size,
        _side(msg.get("side")),
        tx.lower() if tx else None,
        None,
        None if fee in (None, "") else canon_decimal(fee),
        "ws",
        None,
    ]
    row.append(row[2][:10])  # trade_day: ts is UTC ISO text (ms_text), so its date part is the UTC day
    # All valid: remember what arrived canonical, so the next trade like it is checked by lookups.
    _valid_tokens.remember(row[0])
    _valid_markets.remember(row[1])
    if row[3] == msg.get("price"):
        _valid_prices.remember(row[3])
    if row[8] is not None and row[8] == fee:
        _valid_fees.remember(fee)
    if type(raw_ts) is str and len(raw_ts) == 13:
        if len(_ts_texts) >= TS_MEMO:
            _ts_texts.clear()
        _ts_texts[raw_ts] = row[2]
    return row


def row_dict(row: list) -> dict:
    """A trades row as {column: value} with `ts` as a datetime (for tests and diagnostics)."""
    out = dict(zip(TRADE_COLUMNS, row))
    out["ts"] = datetime.fromisoformat(out["ts"])
    for key in ("ordinal", "received_at"):
        if out[key] is None:
            del out[key]
    return out


def _present(msg: dict, *names: str) -> None:
    """Book sides, price changes, best bid/ask: present, not looked into.

    The trade listener's hot path stores none of them, and on a busy socket they are
    most of the bytes: the real market channel sends far more price changes than
    trades, and a book after every trade. What it uses of them, their timestamp (how
    far a socket vouches) and identity, is checked like every event's. With
    `books = yes` it records them: parse(books=True) hands the events over as decoded
    and workers/bookevents.py checks every level there (all or nothing per event).
    """
    if not any(name in msg for name in names):
        raise Invalid(f"{names[0]} missing")


def _remember(token: str | None, market: str) -> None:
    if token is not None:
        _valid_tokens.remember(token)
    _valid_markets.remember(market)


def _book(msg: dict) -> dict:
    # Legacy snapshots call the sides buys/sells.
    _present(msg, "bids", "buys")
    _present(msg, "asks", "sells")
    tick = msg.get("tick_size")
    book = {
        "asset_id": _token(msg.get("asset_id")),
        "market": _condition(msg.get("market")),
        "ms": ms_value(msg.get("timestamp")),
        "hash": msg.get("hash") if type(msg.get("hash")) is str else None,
        "tick_size": None if tick in (None, "") else _price(tick),
    }
    _remember(book["asset_id"], book["market"])
    if book["tick_size"] is not None and book["tick_size"] == tick:
        _valid_prices.remember(tick)
    return book


def _price_change(msg: dict) -> str:
    market = _condition(msg.get("market"))
    ms_value(msg.get("timestamp"))
    if "price_changes" not in msg and "changes" in msg:
        # Legacy shape (before 2025-09-15): top-level asset_id and changes[].
        _token(msg.get("asset_id"))
        return "price_change_legacy"
    _present(msg, "price_changes")
    _remember(None, market)
    return "price_change"


def _best_bid_ask(msg: dict) -> None:
    _present(msg, "best_bid")
    _present(msg, "best_ask")
    _remember(_token(msg.get("asset_id")), _condition(msg.get("market")))
    ms_value(msg.get("timestamp"))


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


def _one(msg: Any, out: Parsed, books: bool = False) -> None:
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
            if books:
                out.book_events.append(msg)
        elif kind == "price_change":
            kind = _price_change(msg)
            if books and kind == "price_change":
                out.book_events.append(msg)
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


# -- the fast path -------------------------------------------------------------------
class Trade(msgspec.Struct, tag_field="event_type", tag="last_trade_price", forbid_unknown_fields=True, gc=False):
    """`last_trade_price` as decoded (types checked, values not yet). gc=False: decoded
    JSON holds no cycles, so the collector need not track one object per trade."""

    market: str
    asset_id: str
    price: str
    size: str
    side: str
    timestamp: str
    fee_rate_bps: str | None = None
    transaction_hash: str | None = None


def _loose(kind: str, raw: tuple[str, ...] = (), text: tuple[str, ...] = ()) -> type:
    """A struct for another event type: its known fields, absent = UNSET; those named in
    raw are kept as undecoded JSON (msgspec.Raw: checked well-formed, never built), those
    in text must be strings (anything else sends the frame to the general path)."""
    def kind_of(name: str) -> Any:
        return msgspec.Raw if name in raw else str if name in text else Any

    fields = [(name, kind_of(name), msgspec.UNSET) for name in sorted(KNOWN_FIELDS[kind] - {"event_type"})]
    return msgspec.defstruct(f"Loose_{kind}", fields, tag_field="event_type", tag=kind, forbid_unknown_fields=True,
                             gc=False)


# Raw sides: a side's first byte says "array"
# Sides, changes and quotes are kept as undecoded JSON (the listener does not look into them).
_IDS = ("asset_id", "market", "timestamp")
Book = _loose("book", raw=("bids", "asks", "buys", "sells"), text=_IDS + ("tick_size",))
PriceChange = _loose("price_change", raw=("price_changes", "changes"), text=_IDS)
BestBidAsk = _loose("best_bid_ask", raw=("best_bid", "best_ask", "spread"), text=_IDS)
_QUICK = (Book, PriceChange, BestBidAsk)
_Event = Trade | Book | PriceChange | BestBidAsk | _loose("tick_size_change")
_fast_decode = msgspec.json.Decoder(list[_Event] | _Event).decode
_any_decode = msgspec.json.Decoder().decode
_SIZE = re.compile(r"(?:[1-9][0-9]*(?:\.[0-9]*[1-9])?|0\.[0-9]*[1-9])").fullmatch  # canonical, above zero
_TX = re.compile(r"0x[0-9a-f]{1,128}").fullmatch  # lower case, as stored


def _fast(items: list, out: Parsed, books: bool = False) -> None:
    """Typed events -> out: trades by lookups and two regular expressions; books, price
    changes and best bid/asks by their timestamp and ids; the rest as dicts.

    An event any of whose values is not one already seen valid (or, for a trade, not
    canonical as sent) goes through the general validator instead (_one), whatever
    it holds: both paths accept and build the same.
    """
    trades = out.trades
    append = trades.append
    tokens, markets, prices, fees, ts_texts = _valid_tokens, _valid_markets, _valid_prices, _valid_fees, _ts_texts
    sec_texts = _sec_texts
    size_ok, tx_ok = _SIZE, _TX
    newest = ""  # the newest 13-digit timestamp of the events taken here (string order = time order)
    fast = 0
    other = [0, 0, 0]  # book, price_change, best_bid_ask taken here
    UNSET = msgspec.UNSET
    for x in items:
        if x.__class__ is Trade:
            ts = x.timestamp
            text = ts_texts.get(ts)
            if text is None and len(ts) == 13 and ts.isascii() and ts.isdigit():
                if len(ts_texts) >= TS_MEMO:
                    ts_texts.clear()
                # Most trades carry a millisecond not seen before, but a second that was:
                # its text is formatted once ('2026-08-14T17:27:47'), the milliseconds appended.
                second = sec_texts.get(ts[:10])
                if second is None:
                    if len(sec_texts) >= TS_MEMO:
                        sec_texts.clear()
                    second = sec_texts[ts[:10]] = ms_text(ts[:10] + "000")[:19]
                text = ts_texts[ts] = f"{second}.{ts[10:]}+00:00"
            tx = x.transaction_hash
            side = x.side
            if (text is not None and x.asset_id in tokens and x.market in markets and x.price in prices
                    and x.fee_rate_bps in fees and (side == "BUY" or side == "SELL") and size_ok(x.size)
                    and tx is not None and tx_ok(tx)):
                append([x.asset_id, x.market, text, x.price, x.size, side, tx, None, x.fee_rate_bps, "ws", None,
                        text[:10]])
                if ts > newest:
                    newest = ts
                fast += 1
                continue
        elif x.__class__ in _QUICK:
            # book, price_change, best_bid_ask: a 13-digit timestamp and ids already seen valid
            ts = x.timestamp
            if ts is not UNSET and len(ts) == 13 and ts.isascii() and ts.isdigit() and x.market in markets:
                cls = x.__class__
                if cls is Book:
                    tick, hash_ = x.tick_size, x.hash
                    if (x.asset_id in tokens and (x.bids is not UNSET or x.buys is not UNSET)
                            and (x.asks is not UNSET or x.sells is not UNSET)
                            and (tick is UNSET or tick in prices) and (hash_ is UNSET or hash_.__class__ is str)):
                        out.books.append({"asset_id": x.asset_id, "market": x.market, "ms": int(ts),
                                          "hash": None if hash_ is UNSET else hash_,
                                          "tick_size": None if tick is UNSET else tick})
                        other[0] += 1
                        if books:
                            out.book_events.append(x)
                        if ts > newest:
                            newest = ts
                        continue
                elif cls is PriceChange:
                    if x.price_changes is not UNSET and x.asset_id is UNSET:
                        other[1] += 1
                        if books:
                            out.book_events.append(x)
                        if ts > newest:
                            newest = ts
                        continue
                elif cls is BestBidAsk:
                    if x.asset_id in tokens and x.best_bid is not UNSET and x.best_ask is not UNSET:
                        other[2] += 1
                        if ts > newest:
                            newest = ts
                        continue
        msg = {name: value for name in x.__struct_fields__ if (value := getattr(x, name)) is not UNSET}
        msg["event_type"] = x.__struct_config__.tag
        _one(msg, out, books)
    for kind, n in zip(("book", "price_change", "best_bid_ask"), other):
        if n:
            out.events[kind] = out.events.get(kind, 0) + n
    if fast:
        out.events["last_trade_price"] = out.events.get("last_trade_price", 0) + fast
    if newest and int(newest) > out.newest_ms:
        out.newest_ms = int(newest)


def parse(text: str | bytes, books: bool = False) -> Parsed:
    """One WebSocket text frame -> Parsed. Never raises. With books, the valid `book` and
    `price_change` events are kept as decoded too (Parsed.book_events)."""
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
        try:
            data = _fast_decode(text)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            pass
        else:
            try:
                _fast(data if data.__class__ is list else [data], out, books)
                return out
            except Exception:  # never expected; the general path decides, from a clean slate
                out = Parsed()
        try:
            data = _any_decode(text)
        except (msgspec.ValidationError, msgspec.DecodeError):
            # What msgspec refuses but Python's JSON takes (a lone surrogate escape, NaN,
            # an out-of-range float): decided the way it always was.
            data = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        out.count(out.skipped, "not_json")
        out.errors.append(f"not JSON: {err}"[:200])
        return out
    if isinstance(data, list):
        for msg in data:
            _one(msg, out, books)
    else:
        _one(data, out, books)
    return out
