"""Replay: a token's order book at any instant, rebuilt from `book_events`.

book_at(conn, token, at), in order:
  1. takes the last checkpoint (kind 'b') of the token stamped at or before `at`;
  2. applies every price_change ('p') and tick_size_change ('t') stamped after it and up
     to `at`, in (ts, received_at) order: a size sets its level, "0" deletes it;
  3. after each event that carries the exchange's hash, recomputes the hash of the REST
     summary of the book then (polymarket-api.md §3.1: compact JSON in wire field order,
     bids ascending, asks descending, with min_order_size, tick_size, neg_risk and
     last_trade_price) and counts it verified or a mismatch; what the summary needs and
     the database does not know (the market's min_order_size / neg_risk when `markets`
     has no row for it) makes the check unverifiable, never a failure. The last trade
     price is the token's trade with the latest ts at or before the event (any of the
     fills sharing that millisecond, or the checkpoint's own last_trade_price);
  4. says whether `at` lies in a gap of the event stream: a `feed_gaps` row of the token
     that started at or before `at` and had not ended when the checkpoint was received
     (the next checkpoint received after a gap ends it), an event the listener refused
     (kind 'x') since the checkpoint, or `at` past the token's coverage mark
     (feed_coverage: nothing vouches for the stream after it).
A mismatch or a gap never raises: both are reported in the result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from workers.messages import decimal_text


SECOND = timedelta(seconds=1)


class ReplayError(Exception):
    """The book cannot be rebuilt (unknown token, nothing recorded before `at`)."""


@dataclass
class Rebuilt:
    token_id: str
    at: datetime
    ts: datetime  # the exchange time of the last event applied (the book's `timestamp`)
    hash: str | None  # the exchange's hash of that state (None: the last event carried none)
    bids: list[tuple[str, str]]  # best first
    asks: list[tuple[str, str]]
    checkpoint_ts: datetime
    events: int  # changes applied after the checkpoint
    hash_checked: int = 0
    hash_mismatches: int = 0
    hash_unverified: int = 0
    gap: dict | None = None  # {"started_at", "ended_at", "reason"} when `at` may have missed events
    context: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("token_id", "hash", "events", "hash_checked", "hash_mismatches",
                                             "hash_unverified")}
        for k in ("at", "ts", "checkpoint_ts"):
            out[k] = getattr(self, k).isoformat()
        out["context"] = dict(self.context)
        out["bids"] = [list(x) for x in self.bids]
        out["asks"] = [list(x) for x in self.asks]
        out["gap"] = None if self.gap is None else {k: (v.isoformat() if isinstance(v, datetime) else v)
                                                    for k, v in self.gap.items()}
        return out


def _text(value) -> str:
    return decimal_text(value) if isinstance(value, Decimal) else str(value)


def _ms(ts: datetime) -> str:
    return str(round(ts.timestamp() * 1000))


class BookState:
    """One token's levels as {price text: size text} per side (pure)."""

    def __init__(self, bids, asks):
        self.bids = {_text(p): _text(s) for p, s in bids or ()}
        self.asks = {_text(p): _text(s) for p, s in asks or ()}

    def apply(self, bids, asks) -> None:
        for side, changes in ((self.bids, bids), (self.asks, asks)):
            for p, s in changes or ():
                p, s = _text(p), _text(s)
                if Decimal(s) == 0:
                    side.pop(p, None)
                else:
                    side[p] = s

    def best_first(self) -> tuple[list, list]:
        bids = sorted(self.bids.items(), key=lambda kv: Decimal(kv[0]), reverse=True)
        asks = sorted(self.asks.items(), key=lambda kv: Decimal(kv[0]))
        return bids, asks

    def rest_hash(self, market: str, token: str, ts_ms: str, min_order_size: str, tick_size: str,
                  neg_risk: bool, last_trade_price: str) -> str:
        """The hash the exchange gives the REST summary of this book (polymarket-api.md §3.1)."""
        bids, asks = self.best_first()
        body = {"market": market, "asset_id": token, "timestamp": ts_ms, "hash": "",
                "bids": [{"price": p, "size": s} for p, s in reversed(bids)],
                "asks": [{"price": p, "size": s} for p, s in reversed(asks)],
                "min_order_size": min_order_size, "tick_size": tick_size, "neg_risk": neg_risk,
                "last_trade_price": last_trade_price}
        return hashlib.sha1(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


def _one(cur, sql: str, params) -> tuple | None:
    cur.execute(sql, params)
    return cur.fetchone()


def _context(cur, token: str, at: datetime) -> dict:
    """What the REST summary holds besides levels: market, min_order_size, neg_risk, the tick."""
    row = _one(cur, "SELECT condition_id FROM followed_tokens WHERE token_id = %s AND condition_id IS NOT NULL"
                    " UNION ALL SELECT condition_id FROM tokens WHERE token_id = %s AND condition_id IS NOT NULL"
                    " LIMIT 1", (token, token))
    ctx = {"market": row[0] if row else None, "min_order_size": None, "neg_risk": None, "tick_size": None}
    if ctx["market"]:
        row = _one(cur, "SELECT neg_risk, raw->>'orderMinSize', raw->>'orderPriceMinTickSize' FROM markets"
                        " WHERE condition_id = %s ORDER BY updated_at DESC NULLS LAST LIMIT 1", (ctx["market"],))
        if row:
            ctx["neg_risk"] = row[0]
            ctx["min_order_size"] = decimal_text(Decimal(row[1])) if row[1] else None
            ctx["tick_size"] = decimal_text(Decimal(row[2])) if row[2] else None
    row = _one(cur, "SELECT tick_size FROM book_events WHERE token_id = %s AND ts <= %s AND tick_size IS NOT NULL"
                    " AND kind IN ('b', 't') ORDER BY ts DESC, received_at DESC LIMIT 1", (token, at))
    if row:
        ctx["tick_size"] = decimal_text(row[0])
    return ctx


def book_at(conn, token: str, at: datetime) -> Rebuilt:
    """The book of `token` at `at` (see the module docstring). Raises ReplayError."""
    with conn.cursor() as cur:
        cur.execute("SET LOCAL statement_timeout = '60s'")
        row = _one(cur, "SELECT ts, hash, bids, asks, tick_size, last_trade_price, received_at FROM book_events"
                        " WHERE token_id = %s AND kind = 'b' AND ts <= %s ORDER BY ts DESC, received_at DESC LIMIT 1",
                   (token, at))
        if row is None:
            known = _one(cur, "SELECT 1 FROM book_events WHERE token_id = %s LIMIT 1", (token,))
            if known is None:
                raise ReplayError(f"no book events recorded for token {token}")
            raise ReplayError(f"no book checkpoint of token {token} at or before {at.isoformat()}")
        c_ts, c_hash, c_bids, c_asks, c_tick, c_last, c_received = row
        cur.execute("SELECT ts, kind, hash, bids, asks, tick_size FROM book_events WHERE token_id = %s"
                    " AND kind IN ('p', 't', 'x') AND ts > %s AND ts <= %s ORDER BY ts, received_at", (token, c_ts, at))
        changes = cur.fetchall()
        ctx = _context(cur, token, c_ts)
        if c_tick is not None:
            ctx["tick_size"] = decimal_text(c_tick)
        # trades for last_trade_price: the latest millisecond at or before the checkpoint, and all after it
        # (from the last one surely before the checkpoint: 2 s before it, whatever its source)
        cur.execute("SELECT ts, price, source = 'backfill' FROM trades WHERE token_id = %s AND ts <= %s"
                    " AND ts >= COALESCE((SELECT max(ts) FROM trades WHERE token_id = %s"
                    " AND ts <= %s - interval '2 seconds'), '-infinity') ORDER BY ts", (token, at, token, c_ts))
        trades = [(ts, decimal_text(p), backfilled) for ts, p, backfilled in cur.fetchall()]
        if c_last is None:
            # A refresh carries no last_trade_price; an earlier initial book does, and it
            # stands while no recorded trade is surely later (trades before the listener
            # subscribed reach `trades` only with the start gap's backfill).
            row = _one(cur, "SELECT last_trade_price FROM book_events WHERE token_id = %s AND kind = 'b'"
                            " AND ts <= %s AND last_trade_price IS NOT NULL ORDER BY ts DESC LIMIT 1", (token, c_ts))
            c_last = row[0] if row else None
        cur.execute("SELECT started_at, ended_at, reason FROM feed_gaps WHERE token_id = %s AND started_at <= %s"
                    " AND (ended_at IS NULL OR ended_at > %s) ORDER BY started_at LIMIT 1", (token, at, c_received))
        gap = cur.fetchone()
        cover = _one(cur, "SELECT covered_until FROM feed_coverage WHERE token_id = %s", (token,))
    conn.rollback()

    state = BookState(c_bids, c_asks)
    out = Rebuilt(token_id=token, at=at, ts=c_ts, hash=bytes(c_hash).hex(), bids=[], asks=[], checkpoint_ts=c_ts,
                  events=len(changes), context=ctx)
    first_last = [c_last] if c_last is not None else []

    def last_prices(ts: datetime) -> set[str]:
        """Every price the token's last trade at ts may have had. A live fill happened at its
        ts; a backfilled one somewhere in [ts, ts + 1 s) (the Data API stamps whole seconds).
        The latest fill surely at or before ts bounds them: every fill that may lie between
        it and ts is a candidate (with none, the checkpoint's own last_trade_price too)."""
        before = [t for t in trades if t[0] <= ts]
        sure = [t for t, _, b in before if not b or t + SECOND <= ts]
        low = max(sure) if sure else None
        out = {p for t, p, b in before if low is None or t >= low or (b and t + SECOND > low)}
        if low is None:
            out |= {decimal_text(p) for p in first_last}
        return out or {""}

    def check(ts: datetime, want: str) -> None:
        if None in (ctx["market"], ctx["min_order_size"], ctx["neg_risk"], ctx["tick_size"]):
            out.hash_unverified += 1
            return
        out.hash_checked += 1
        for last in last_prices(ts):
            if state.rest_hash(ctx["market"], token, _ms(ts), ctx["min_order_size"], ctx["tick_size"],
                               ctx["neg_risk"], last) == want:
                return
        out.hash_mismatches += 1
        out.context.setdefault("first_mismatch", ts.isoformat())

    check(c_ts, out.hash)
    refused = None
    for ts, kind, hash_, bids, asks, tick in changes:
        if kind == "t":
            ctx["tick_size"] = decimal_text(tick)
            continue
        if kind == "x":
            refused = refused or ts
            continue
        state.apply(bids, asks)
        out.ts, out.hash = ts, bytes(hash_).hex()
        check(ts, out.hash)
    out.bids, out.asks = state.best_first()
    out.events = sum(1 for c in changes if c[1] == "p")
    if gap is not None:
        out.gap = {"started_at": gap[0], "ended_at": gap[1], "reason": gap[2]}
    elif refused is not None:
        out.gap = {"started_at": refused, "ended_at": None, "reason": "refused book event"}
    elif cover is None or cover[0] < at:
        out.gap = {"started_at": cover[0] if cover else None, "ended_at": None, "reason": "uncovered"}
    return out
