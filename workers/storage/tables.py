"""The tables the Writer writes: columns, natural keys and conflict rules.

The single source of truth the Writer builds its SQL from; it must agree with
migrations/*.sql (tests check that every column named here exists with this
type). Rows reach the Writer as dicts keyed by these column names; a missing
key is NULL (or the column's COALESCE default below), an unknown key is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping


@dataclass(frozen=True)
class Table:
    """One target table.

    columns: (name, postgres type) in write order (the serial id is never written).
    key: the natural unique key (documented in the migration).
    merge: True for DO UPDATE tables: rows with the same key inside one batch
      are collapsed to the last one, because ON CONFLICT DO UPDATE cannot touch
      one row twice in one statement.
    conflict: the ON CONFLICT clause.
    select: column -> SQL expression over the staging row `s` (defaults for NULL).
    direct: the Writer may COPY straight into the table (under a savepoint) and
      fall back to staging + ON CONFLICT only when that COPY fails. Only for
      DO NOTHING tables whose select defaults are all on NOT NULL columns: a
      duplicate then fails with a unique violation and a NULL that needed its
      default with a not-null violation, so the fallback sees every case the
      staging path handles, and a direct COPY that succeeds stores exactly what
      the staging path would have.
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]
    conflict: str
    merge: bool = False
    select: Mapping[str, str] = field(default_factory=dict)
    direct: bool = False
    guard: str = ""
    near: Callable[[list], bool] | None = None
    fill: Callable[[list], None] | None = None

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    def insert_from(self, source: str) -> str:
        """INSERT INTO <table> (...) SELECT ... FROM <source> s <conflict>.

        source is a staging table or a VALUES list aliased with the column names.
        """
        names = self.column_names
        exprs = ", ".join(self.select.get(n, f"s.{n}") for n in names)
        where = f" WHERE NOT ({self.guard})" if self.guard else ""
        return f"INSERT INTO {self.name} ({', '.join(names)}) SELECT {exprs} FROM {source}{where} {self.conflict}"


def _merge_set(table: str, cols: list[str], keep_old_when_null: bool) -> str:
    if keep_old_when_null:
        return ", ".join(f"{c} = COALESCE(EXCLUDED.{c}, {table}.{c})" for c in cols)
    return ", ".join(f"{c} = EXCLUDED.{c}" for c in cols)


def _changed(table: str, cols: list[str], keep_old_when_null: bool = False) -> str:
    old = ", ".join(f"{table}.{c}" for c in cols)
    if keep_old_when_null:
        new = ", ".join(f"COALESCE(EXCLUDED.{c}, {table}.{c})" for c in cols)
    else:
        new = ", ".join(f"EXCLUDED.{c}" for c in cols)
    return f"({old}) IS DISTINCT FROM ({new})"


# -- markets --------------------------------------------------------------------
_MARKET_COLS = (
    ("market_id", "text"),
    ("condition_id", "text"),
    ("question_id", "text"),
    ("slug", "text"),
    ("question", "text"),
    ("event_id", "text"),
    ("neg_risk_market_id", "text"),
    ("active", "boolean"),
    ("closed", "boolean"),
    ("archived", "boolean"),
    ("neg_risk", "boolean"),
    ("start_date", "timestamptz"),
    ("end_date", "timestamptz"),
    ("closed_time", "timestamptz"),
    ("volume", "numeric"),
    ("volume_24h", "numeric"),
    ("liquidity", "numeric"),
    ("outcomes", "jsonb"),
    ("tags", "jsonb"),
    ("uma_resolution_status", "text"),
    ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
    ("raw", "jsonb"),
    ("first_seen_at", "timestamptz"),
    ("last_seen_at", "timestamptz"),
)
_MARKET_DATA = [c for c, _ in _MARKET_COLS if c not in ("market_id", "first_seen_at", "last_seen_at")]
# A row is rewritten when its payload changed and it is not older than what is
# stored (Gamma's updatedAt; NULL on either side counts as newer). When nothing
# changed, only last_seen_at moves, and at most once an hour, so a periodic full
# scan does not rewrite every market every time.
_MARKET_FRESH = (
    "(markets.raw IS DISTINCT FROM EXCLUDED.raw"
    " AND COALESCE(EXCLUDED.updated_at >= markets.updated_at, true))"
)
_MARKETS_CONFLICT = (
    "ON CONFLICT (market_id) DO UPDATE SET "
    + ", ".join(f"{c} = CASE WHEN {_MARKET_FRESH} THEN EXCLUDED.{c} ELSE markets.{c} END" for c in _MARKET_DATA)
    + ", last_seen_at = GREATEST(markets.last_seen_at, EXCLUDED.last_seen_at)"
    + f" WHERE {_MARKET_FRESH} OR markets.last_seen_at < EXCLUDED.last_seen_at - interval '1 hour'"
)

MARKETS = Table(
    "markets",
    _MARKET_COLS,
    key=("market_id",),
    merge=True,
    conflict=_MARKETS_CONFLICT,
    select={"first_seen_at": "COALESCE(s.first_seen_at, now())", "last_seen_at": "COALESCE(s.last_seen_at, now())"},
)

# -- tokens / followed_tokens ---------------------------------------------------
_TOKEN_DATA = ["market_id", "condition_id", "outcome", "outcome_index"]
TOKENS = Table(
    "tokens",
    (("token_id", "text"), ("market_id", "text"), ("condition_id", "text"), ("outcome", "text"), ("outcome_index", "int")),
    key=("token_id",),
    merge=True,
    # A partial row (NULL fields) never erases what is known.
    conflict=(
        f"ON CONFLICT (token_id) DO UPDATE SET {_merge_set('tokens', _TOKEN_DATA, True)}"
        f" WHERE {_changed('tokens', _TOKEN_DATA, True)}"
    ),
)

_FOLLOWED_DATA = ["market_id", "condition_id", "outcome"]
FOLLOWED_TOKENS = Table(
    "followed_tokens",
    (("token_id", "text"), ("market_id", "text"), ("condition_id", "text"), ("outcome", "text"), ("since", "timestamptz")),
    key=("token_id",),
    merge=True,
    # `since` keeps the first time the token was followed.
    conflict=(
        f"ON CONFLICT (token_id) DO UPDATE SET {_merge_set('followed_tokens', _FOLLOWED_DATA, True)}"
        f" WHERE {_changed('followed_tokens', _FOLLOWED_DATA, True)}"
    ),
    select={"since": "COALESCE(s.since, now())"},
)

# -- snapshots and trades: immutable facts, first write wins --------------------
PRICE_SNAPSHOTS = Table(
    "price_snapshots",
    (
        ("token_id", "text"),
        ("ts", "timestamptz"),
        ("condition_id", "text"),
        ("best_bid", "numeric"),
        ("best_ask", "numeric"),
        ("mid", "numeric"),
        ("last_trade_price", "numeric"),
        ("received_at", "timestamptz"),
    ),
    key=("token_id", "ts"),
    conflict="ON CONFLICT DO NOTHING",
    direct=True,
)

ORDERBOOK_SNAPSHOTS = Table(
    "orderbook_snapshots",
    (
        ("token_id", "text"),
        ("condition_id", "text"),
        ("ts", "timestamptz"),
        ("hash", "text"),
        ("best_bid", "numeric"),
        ("best_ask", "numeric"),
        ("spread", "numeric"),
        ("bid_depth", "numeric"),
        ("ask_depth", "numeric"),
        ("bid_levels", "int"),
        ("ask_levels", "int"),
        ("bids", "jsonb"),
        ("asks", "jsonb"),
        ("received_at", "timestamptz"),
    ),
    key=("token_id", "ts", "hash"),
    conflict="ON CONFLICT DO NOTHING",
    select={"hash": "COALESCE(s.hash, '')"},  # hash is NOT NULL
    direct=True,
)

# The trades partition column: the UTC day of the exchange time, computed the same
# way from a live millisecond and from its backfilled second (migrations/0023). A
# row that does not carry it (a dict row without it, a spool of an older version)
# gets it from ts here.
_TRADE_DAY = "COALESCE(s.trade_day, (s.ts AT TIME ZONE 'UTC')::date)"
# Seconds around midnight (UTC) within which a trade's two sources could disagree on
# the day: should the Data API's second not be the live millisecond truncated (polysim's
# is) but the later block time (backfill_settle: 30 s by default), a trade matched less
# than that before midnight is stamped after it. A multiple of 60 (see _CLOCK_NEAR).
DAY_GUARD = 120
_TRADE_NEAR = (f"(s.ts AT TIME ZONE 'UTC')::time NOT BETWEEN time '00:00:00' + interval '{DAY_GUARD} s'"
               f" AND time '23:59:59.999999' - interval '{DAY_GUARD} s'")
_TRADE_TWIN = (
    f"{_TRADE_NEAR} AND s.tx_hash IS NOT NULL AND EXISTS (SELECT 1 FROM trades o"
    f" WHERE o.trade_day IN ({_TRADE_DAY} - 1, {_TRADE_DAY} + 1) AND o.token_id = s.token_id"
    " AND o.tx_hash = s.tx_hash AND o.price = s.price::numeric AND o.size = s.size::numeric AND o.side = s.side"
    " AND o.ordinal = COALESCE(s.ordinal, 0))"
)
# HH:MM of the UTC times within DAY_GUARD of midnight
_CLOCK_NEAR = frozenset([f"00:{m:02d}" for m in range(DAY_GUARD // 60)]
                        + [f"23:{59 - m:02d}" for m in range(DAY_GUARD // 60)])


def trade_near_midnight(row: list) -> bool:
    """A trades row (text, TABLES order) within DAY_GUARD seconds of a UTC midnight."""
    text = row[2]
    if text is None:
        return False
    if text.endswith("+00:00") and len(text) > 16:
        return text[11:16] in _CLOCK_NEAR
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc).strftime("%H:%M") in _CLOCK_NEAR
    except ValueError:
        return True  # not a text this code reads: let the guarded path decide


def fill_trade_day(row: list) -> None:
    """trade_day from ts when a row does not carry it (the UTC day of its text)."""
    if row[11] is None and row[2] is not None:
        from .partitions import utc_day

        try:
            row[11] = utc_day(row[2]).isoformat()
        except ValueError:
            pass  # the staging path computes it in SQL (or refuses the ts)


TRADES = Table(
    "trades",
    (
        ("token_id", "text"),
        ("condition_id", "text"),
        ("ts", "timestamptz"),
        ("price", "numeric"),
        ("size", "numeric"),
        ("side", "text"),
        ("tx_hash", "text"),
        ("ordinal", "int"),
        ("fee_rate_bps", "numeric"),
        ("source", "text"),
        ("received_at", "timestamptz"),
        ("trade_day", "date"),
    ),
    # (token_id, tx_hash, price, size, side, ordinal); without tx_hash, ts replaces it.
    # trade_day, the partition column, is part of both unique indexes (0023).
    key=("token_id", "tx_hash", "price", "size", "side", "ordinal"),
    # No conflict target: DO NOTHING then honours both partial unique indexes.
    conflict="ON CONFLICT DO NOTHING",
    select={"ordinal": "COALESCE(s.ordinal, 0)", "trade_day": _TRADE_DAY},  # both NOT NULL
    direct=True,
    guard=_TRADE_TWIN,
    near=trade_near_midnight,
    fill=fill_trade_day,
)

BOOK_EVENTS = Table(
    "book_events",
    (
        ("token_id", "text"),
        ("ts", "timestamptz"),
        ("kind", '"char"'),
        ("hash", "bytea"),
        ("bids", "numeric[]"),
        ("asks", "numeric[]"),
        ("tick_size", "numeric"),
        ("last_trade_price", "numeric"),
        ("received_at", "timestamptz"),
    ),
    key=("token_id", "ts", "kind", "hash"),
    conflict="ON CONFLICT DO NOTHING",
    direct=True,
)

# -- resolutions: corrected in place when the exchange corrects itself ----------
_RESOLUTION_DATA = ["condition_id", "winning_token_id", "winning_outcome", "payouts", "status", "resolved_at"]
RESOLUTIONS = Table(
    "resolutions",
    (
        ("market_id", "text"),
        ("condition_id", "text"),
        ("winning_token_id", "text"),
        ("winning_outcome", "text"),
        ("payouts", "jsonb"),
        ("status", "text"),
        ("resolved_at", "timestamptz"),
        ("updated_at", "timestamptz"),
        ("first_seen_at", "timestamptz"),
    ),
    key=("market_id",),
    merge=True,
    conflict=(
        f"ON CONFLICT (market_id) DO UPDATE SET {_merge_set('resolutions', _RESOLUTION_DATA, False)},"
        " updated_at = EXCLUDED.updated_at"
        f" WHERE {_changed('resolutions', _RESOLUTION_DATA)}"
    ),
    select={"updated_at": "COALESCE(s.updated_at, now())", "first_seen_at": "COALESCE(s.first_seen_at, now())"},
)

# -- feed_gaps --------------------------------------------------------------------
# Re-recording a gap fills in what is now known (end, recovery, market), never erases
# it. Two processes may write one gap (an adopter that recovered it while its old
# owner, still closing, records a later end): the end only ever grows, and a
# recovery counts only for the end it was fetched for, so a gap re-recorded with a
# later end is owed again (recovered_at NULL) until someone fetches the wider window.
_GAP_SET = {
    "ended_at": "GREATEST(feed_gaps.ended_at, EXCLUDED.ended_at)",
    "reason": "COALESCE(EXCLUDED.reason, feed_gaps.reason)",
    "recovered_at": (
        "CASE WHEN EXCLUDED.ended_at > feed_gaps.ended_at AND EXCLUDED.recovered_at IS NULL THEN NULL"
        " WHEN EXCLUDED.ended_at < feed_gaps.ended_at THEN feed_gaps.recovered_at"
        " ELSE COALESCE(EXCLUDED.recovered_at, feed_gaps.recovered_at) END"
    ),
    "recovered_trades": "COALESCE(EXCLUDED.recovered_trades, feed_gaps.recovered_trades)",
    "shard": "COALESCE(EXCLUDED.shard, feed_gaps.shard)",
    "condition_id": "COALESCE(EXCLUDED.condition_id, feed_gaps.condition_id)",
    "unrecoverable": "COALESCE(EXCLUDED.unrecoverable, feed_gaps.unrecoverable)",
}
FEED_GAPS = Table(
    "feed_gaps",
    (
        ("token_id", "text"),
        ("started_at", "timestamptz"),
        ("ended_at", "timestamptz"),
        ("reason", "text"),
        ("recovered_at", "timestamptz"),
        ("recovered_trades", "int"),
        ("shard", "text"),
        ("condition_id", "text"),
        ("unrecoverable", "text"),
    ),
    key=("token_id", "started_at"),
    merge=True,
    conflict=(
        "ON CONFLICT (token_id, started_at) DO UPDATE SET "
        + ", ".join(f"{c} = {e}" for c, e in _GAP_SET.items())
        + f" WHERE ({', '.join(f'feed_gaps.{c}' for c in _GAP_SET)}) IS DISTINCT FROM ({', '.join(_GAP_SET.values())})"
    ),
)

# -- feed_coverage: the trade listener's coverage marks -------------------------------
# A mark says "every live trade of this token received before covered_until is durable".
# Written through the Writer, after the rows it vouches for: the Writer delivers batches
# in order, each in one transaction (or appends them to the spool in order), and writes
# this table last inside a batch, so a mark is never durable before the trades it covers.
# Marks only move forward; a mark that moves is live again (released_at cleared).
FEED_COVERAGE = Table(
    "feed_coverage",
    (("token_id", "text"), ("covered_until", "timestamptz"), ("shard", "text"), ("updated_at", "timestamptz"),
     ("condition_id", "text")),
    key=("token_id",),
    merge=True,
    conflict=(
        "ON CONFLICT (token_id) DO UPDATE SET covered_until = EXCLUDED.covered_until, shard = EXCLUDED.shard,"
        " updated_at = EXCLUDED.updated_at, released_at = NULL,"
        " condition_id = COALESCE(EXCLUDED.condition_id, feed_coverage.condition_id)"
        " WHERE feed_coverage.covered_until < EXCLUDED.covered_until"
    ),
    select={"updated_at": "COALESCE(s.updated_at, now())"},
)

# Write order inside one batch: metadata before the facts that refer to it, and coverage
# marks after the facts they vouch for.
TABLES: dict[str, Table] = {
    t.name: t
    for t in (MARKETS, TOKENS, FOLLOWED_TOKENS, RESOLUTIONS, PRICE_SNAPSHOTS, ORDERBOOK_SNAPSHOTS, TRADES, BOOK_EVENTS,
              FEED_GAPS, FEED_COVERAGE)
}
