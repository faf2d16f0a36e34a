"""Book events: market-channel `book`, `price_change` and `tick_size_change` messages as
`book_events` rows (pure; workers/messages.py hands them over undecoded).

One row per token and message, in BOOK_EVENT_COLUMNS order, as the text PostgreSQL
receives (migrations/0022_book_events.sql):
  kind 'b'  a `book`: a checkpoint, every level of both sides;
  kind 'p'  a `price_change`: the levels of this token it sets (new absolute sizes, "0"
            deletes the level), both sides as they come; one message usually covers
            both tokens of a market and yields one row for each;
  kind 't'  a `tick_size_change`: tick_size only;
  kind 'x'  an event refused (a level that is not one): no levels; the book of that
            token may be wrong from here to the next checkpoint.
Sides are 2-D numeric arrays of [price, size], best level first (bids descending,
asks ascending) for a book; a price_change keeps the message's order (the last entry
for a price wins, as it would on the exchange). `hash` is the exchange's 40-hex hash
as bytea; a message without one (or with a malformed one) is keyed by the SHA-1 of
its own content instead, so a replay still meets it.

rows() in order: reads the fields, validates every level (a price in [0, 1] and a size
>= 0, canonical decimal text), sorts or groups, and only then builds rows: an event
with one bad level yields none (never a partial book), and nothing here raises
except Invalid, which the caller counts.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Iterable

import msgspec

from workers.messages import (TS_MEMO, Invalid, _condition, _price, _token, _ts_texts, _valid_markets, _valid_prices,
                               _valid_tokens, canon_decimal, ms_text)

BOOK_EVENT_COLUMNS = ("token_id", "ts", "kind", "hash", "bids", "asks", "tick_size", "last_trade_price",
                      "received_at")
_HASH = re.compile(r"[0-9a-fA-F]{40}").fullmatch
_TOKEN_TEXT = re.compile(r"[0-9]{1,78}").fullmatch
MAX_LEVELS = 20_000  # per side; a real book has a few hundred at most


class Level(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    price: Any
    size: Any


class Change(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    asset_id: Any
    price: Any
    size: Any
    side: Any
    hash: Any = None


_levels = msgspec.json.Decoder(list[Level]).decode
_changes = msgspec.json.Decoder(list[Change]).decode


def _decoded(value: Any, decode, cls) -> list:
    """A side or a change list: undecoded JSON (msgspec.Raw) or already-decoded lists."""
    if value.__class__ is msgspec.Raw:
        try:
            return decode(value)
        except (msgspec.ValidationError, msgspec.DecodeError) as err:
            raise Invalid(f"bad {cls.__name__.lower()} list: {err}") from None
    if not isinstance(value, list):
        raise Invalid(f"{cls.__name__.lower()} list is not a list")
    out = []
    for item in value:
        if not isinstance(item, dict):
            raise Invalid(f"{cls.__name__.lower()} is not an object")
        try:
            out.append(cls(**{k: item[k] for k in cls.__struct_fields__ if k in item}))
        except TypeError:
            raise Invalid(f"{cls.__name__.lower()} misses a field") from None
    return out


def _price_fast(value: Any) -> str:
    """_price(value), by a lookup when the value already passed as sent (messages' memo)."""
    if value in _valid_prices and value.__class__ is str:
        return value
    text = _price(value)
    if text == value:
        _valid_prices.remember(text)
    return text


def _token_fast(value: Any) -> str:
    if value in _valid_tokens and value.__class__ is str:
        return value
    return _token(value)


def _condition_fast(value: Any) -> str:
    if value in _valid_markets and value.__class__ is str:
        return value
    return _condition(value)


def _ts_text(value: Any) -> str:
    """ms_text(value), remembered for 13-digit strings (messages' memo)."""
    text = _ts_texts.get(value) if value.__class__ is str else None
    if text is None:
        text = ms_text(value)
        if value.__class__ is str and len(value) == 13:
            if len(_ts_texts) >= TS_MEMO:
                _ts_texts.clear()
            _ts_texts[value] = text
    return text


def _side_text(levels: Iterable[tuple[str, str]]) -> str:
    """[(price, size)] -> a 2-D numeric array literal ('{}' when empty)."""
    inner = ",".join([f"{{{p},{s}}}" for p, s in levels])
    return "{" + inner + "}" if inner else "{}"


def _hash_value(value: Any, *content: str) -> str:
    """The exchange's hash as bytea text, else the SHA-1 of the event's own content."""
    if type(value) is str and _HASH(value):
        return "\\x" + value.lower()
    return "\\x" + hashlib.sha1("\x1f".join(content).encode()).hexdigest()


def _book_side(value: Any, best_high: bool) -> list[tuple[str, str]]:
    levels = _decoded(value, _levels, Level)
    if len(levels) > MAX_LEVELS:
        raise Invalid("too many levels")
    out = {}
    for lv in levels:
        price = _price_fast(lv.price)
        if price in out:
            raise Invalid(f"price {price} twice on one side")
        out[price] = canon_decimal(lv.size)
    # Text does not sort as value ("0.1" < "0.09"): by value. A float orders distinct
    # canonical prices exactly while they have at most 15 significant digits.
    exact = all(len(p) <= 16 for p in out)
    return sorted(out.items(), key=(lambda kv: float(kv[0])) if exact else (lambda kv: Decimal(kv[0])),
                  reverse=best_high)


def book_rows(msg: Any, received_at: str) -> list[list]:
    """A `book` message (dict or loose struct) -> one row, kind 'b'. Raises Invalid."""
    get = msg.get if isinstance(msg, dict) else lambda k, d=None: getattr(msg, k, d)
    token = _token_fast(get("asset_id"))
    _condition_fast(get("market"))
    ts = _ts_text(get("timestamp"))
    bids_in = get("bids") if get("bids") not in (None, msgspec.UNSET) else get("buys")
    asks_in = get("asks") if get("asks") not in (None, msgspec.UNSET) else get("sells")
    if bids_in in (None, msgspec.UNSET) or asks_in in (None, msgspec.UNSET):
        raise Invalid("book side missing")
    bids = _side_text(_book_side(bids_in, True))
    asks = _side_text(_book_side(asks_in, False))
    tick, last = get("tick_size"), get("last_trade_price")
    tick = None if tick in (None, "", msgspec.UNSET) else _price(tick)
    last = None if last in (None, "", msgspec.UNSET) else _price(last)
    return [[token, ts, "b", _hash_value(get("hash"), token, ts, bids, asks), bids, asks, tick, last, received_at]]


def price_change_rows(msg: Any, received_at: str, wanted=None) -> list[list]:
    """A `price_change` (current shape) -> one row per token it names (kind 'p'), only
    tokens in `wanted` when given. Raises Invalid (legacy shape included: not stored)."""
    get = msg.get if isinstance(msg, dict) else lambda k, d=None: getattr(msg, k, d)
    _condition_fast(get("market"))
    ts = _ts_text(get("timestamp"))
    changes = get("price_changes")
    if changes in (None, msgspec.UNSET):
        raise Invalid("price_changes missing (legacy shape)")
    per: dict[str, list] = {}  # token -> [bids {price: size}, asks {price: size}, hash]
    for ch in _decoded(changes, _changes, Change):
        token = _token_fast(ch.asset_id)
        if ch.side == "BUY":
            k = 0
        elif ch.side == "SELL":
            k = 1
        else:
            raise Invalid(f"bad side: {ch.side!r}")
        entry = per.get(token)
        if entry is None:
            entry = per[token] = [{}, {}, None]
        price = _price_fast(ch.price)
        entry[k].pop(price, None)  # a repeated price moves to where it was set last
        entry[k][price] = canon_decimal(ch.size)
        entry[2] = ch.hash
    rows = []
    for token, (bids, asks, hash_) in per.items():
        if wanted is not None and token not in wanted:
            continue
        b = _side_text(bids.items()) if bids else None
        a = _side_text(asks.items()) if asks else None
        rows.append([token, ts, "p", _hash_value(hash_, token, ts, b or "", a or ""), b, a, None, None, received_at])
    return rows


def tick_rows(tick: dict, received_at: str) -> list[list]:
    """A tick_size_change as messages.parse() normalised it -> one row, kind 't'."""
    ts = tick["ts"].isoformat(timespec="milliseconds")
    token, size = tick["asset_id"], tick["tick_size"]
    return [[token, ts, "t", _hash_value(None, token, ts, size), None, None, size, None, received_at]]


class Stamps:
    """received_at texts strictly increasing within a process (microseconds apart): events
    stamped with the same exchange millisecond keep their arrival order in the table."""

    def __init__(self) -> None:
        self.last = datetime(1970, 1, 1, tzinfo=timezone.utc)

    def next(self, now: datetime) -> str:
        return self.take(now, 1)[0]

    def take(self, now: datetime, n: int) -> list[str]:
        """n stamps from max(now, the last one + 1 us) on, 1 us apart (one isoformat a frame)."""
        one = timedelta(microseconds=1)
        first = now if now > self.last else self.last + one
        self.last = first + one * (n - 1)
        if first.microsecond + n <= 1_000_000 and first.utcoffset() == timedelta(0) and n > 1:
            head = first.replace(microsecond=0).isoformat()[:19]  # 'YYYY-MM-DDTHH:MM:SS'
            return [f"{head}.{first.microsecond + i:06d}+00:00" for i in range(n)]
        return [(first + one * i).isoformat() for i in range(n)]


def _refused(ev: Any, wanted) -> list[list]:
    """An event refused whole still happened: a row of kind 'x' for each token it names
    (else, for a price_change naming none readably, each wanted token of its market), so
    a rebuild across it knows the book may be wrong until the next checkpoint. Only its
    ids and timestamp are used (messages.parse checked those); none readable: nothing."""
    get = ev.get if isinstance(ev, dict) else lambda k, d=None: getattr(ev, k, d)
    try:
        market = _condition_fast(get("market"))
        ts = _ts_text(get("timestamp"))
        tokens: list[str] = []
        if (ev.get("event_type") if isinstance(ev, dict) else ev.__struct_config__.tag) == "book":
            tokens = [_token_fast(get("asset_id"))]
        else:
            changes = get("price_changes")
            raw = bytes(changes) if changes.__class__ is msgspec.Raw else None
            try:
                items = msgspec.json.decode(raw) if raw is not None else changes
            except msgspec.DecodeError:
                items = None
            if isinstance(items, list):
                for item in items:
                    a = item.get("asset_id") if isinstance(item, dict) else None
                    if a.__class__ is str and _TOKEN_TEXT(a) and a not in tokens:
                        tokens.append(a)
            if not tokens and isinstance(wanted, dict):
                tokens = [t for t, c in wanted.items() if c == market]
    except (Invalid, TypeError, ValueError, AttributeError, OverflowError):
        return []
    return [[t, ts, "x", _hash_value(None, t, ts, "refused"), None, None, None, None, ""]
            for t in tokens if wanted is None or t in wanted]


def rows(events: list, ticks: list[dict], stamps: Stamps, now: datetime, wanted=None) -> tuple[list[list], int]:
    """messages.Parsed.book_events and .ticks of one frame -> (rows, invalid events).

    Each event is all or nothing (a refused one leaves only 'x' markers, _refused);
    tokens outside `wanted` (a set, or a dict token -> condition id) are left out.
    """
    out: list[list] = []
    bad = 0
    for ev in events:
        try:
            kind = ev.get("event_type") if isinstance(ev, dict) else ev.__struct_config__.tag
            if kind == "book":
                got = book_rows(ev, "")
                if wanted is not None and got[0][0] not in wanted:
                    continue
            else:
                got = price_change_rows(ev, "", wanted)
        except (Invalid, TypeError, ValueError, AttributeError, OverflowError):
            bad += 1
            out += _refused(ev, wanted)
            continue
        out += got
    for tick in ticks:
        if wanted is None or tick["asset_id"] in wanted:
            out += tick_rows(tick, "")
    if out:
        for row, stamp in zip(out, stamps.take(now, len(out))):
            row[-1] = stamp
    return out, bad
