"""The followed set and what the resolutions collector needs, in PostgreSQL.

The markets collector is the only writer of `followed_tokens` (replace_followed,
one transaction, so a reader sees the old set or the new one, never a mix). Every
other process reads it with followed_tokens(); no IPC between collectors.

    from workers.storage.db import Database
    from workers.storage.followed import followed_tokens, shard_of
    db = Database(dsn)                                   # after the fork
    mine = followed_tokens(db, shard=2, shards=4)        # list[FollowedToken]

Sharding: token t belongs to shard int(t) % shards (token ids are uniform random
256-bit numbers, so the split is even and stable across restarts and hosts).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Iterable, NamedTuple

from psycopg2.extras import execute_values

from workers.selection import Candidate, tag_words


class FollowedToken(NamedTuple):
    token_id: str
    market_id: str
    condition_id: str
    outcome: str | None


def shard_of(token_id: str, shards: int) -> int:
    """The shard that owns a token: int(token_id) % shards (0 when shards <= 1)."""
    if shards <= 1:
        return 0
    try:
        return int(token_id) % shards
    except ValueError:  # not a decimal id: still stable, just not numeric
        import zlib
        return zlib.crc32(token_id.encode()) % shards


def followed_tokens(db, shard: int | None = None, shards: int = 1) -> list[FollowedToken]:
    """The followed set (optionally one shard's part), ordered by token_id.

    db is a workers.storage.db.Database. shard=None (or shards <= 1) returns all.
    """
    rows = db.query(
        "SELECT token_id, market_id, condition_id, outcome FROM followed_tokens ORDER BY token_id"
    )
    out = [FollowedToken(*row) for row in rows]
    if shard is None or shards <= 1:
        return out
    return [t for t in out if shard_of(t.token_id, shards) == shard]


def replace_followed(db, rows: Iterable[dict], now: datetime) -> tuple[int, int]:
    """Make followed_tokens exactly `rows` in one transaction; returns (added, removed).

    Tokens that stay keep their `since`; new ones get `now`; market/condition/
    outcome are refreshed. Readers never see a half-replaced set.
    """
    values = [(r["token_id"], r["market_id"], r["condition_id"], r.get("outcome")) for r in rows]

    def swap(cur):
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS followed_next "
            "(token_id text PRIMARY KEY, market_id text, condition_id text, outcome text) ON COMMIT DELETE ROWS"
        )
        if values:
            execute_values(cur, "INSERT INTO followed_next VALUES %s ON CONFLICT DO NOTHING", values, page_size=2000)
        cur.execute("DELETE FROM followed_tokens f WHERE NOT EXISTS "
                    "(SELECT 1 FROM followed_next n WHERE n.token_id = f.token_id)")
        removed = cur.rowcount
        cur.execute(
            "INSERT INTO followed_tokens (token_id, market_id, condition_id, outcome, since) "
            "SELECT token_id, market_id, condition_id, outcome, %s FROM followed_next "
            "ON CONFLICT (token_id) DO UPDATE SET market_id = EXCLUDED.market_id, "
            "condition_id = EXCLUDED.condition_id, outcome = EXCLUDED.outcome "
            "WHERE (followed_tokens.market_id, followed_tokens.condition_id, followed_tokens.outcome) "
            "IS DISTINCT FROM (EXCLUDED.market_id, EXCLUDED.condition_id, EXCLUDED.outcome) "
            "RETURNING (xmax = 0)",
            (now,),
        )
        added = sum(1 for (inserted,) in cur.fetchall() if inserted)
        return added, removed

    return db.run(swap)


def selection_candidates(db, closed_since: datetime | None) -> list[Candidate]:
    """Markets that may be followed: not closed, or closed at/after closed_since.

    One query over markets + tokens; what selection needs and nothing else.
    """
    rows = db.query(
        """
        SELECT m.market_id, m.condition_id, m.slug, m.volume_24h, m.tags, m.closed, m.archived,
               m.raw -> 'enableOrderBook', m.closed_time,
               array_agg(t.token_id ORDER BY t.outcome_index), array_agg(t.outcome ORDER BY t.outcome_index)
        FROM markets m JOIN tokens t ON t.market_id = m.market_id
        WHERE m.archived IS NOT TRUE
          AND (m.closed IS NOT TRUE OR (%s::timestamptz IS NOT NULL AND m.closed_time >= %s::timestamptz))
        GROUP BY m.market_id
        """,
        (closed_since, closed_since),
    )
    out = []
    for (market_id, condition_id, slug, volume, tags, closed, archived, enable_book, closed_time,
         token_ids, outcomes) in rows:
        out.append(Candidate(
            market_id=market_id, condition_id=condition_id, slug=slug,
            volume_24h=Decimal(volume) if volume is not None else None,
            tags=tag_words(tags), closed=closed, archived=archived,
            enable_order_book=enable_book if isinstance(enable_book, bool) else None,
            closed_time=closed_time, tokens=tuple(zip(token_ids, outcomes)),
        ))
    return out


_UNSETTLED = """
    FROM markets m LEFT JOIN resolutions r ON r.market_id = m.market_id
    WHERE m.closed IS TRUE
      AND (r.market_id IS NULL OR r.status NOT IN ('resolved', 'void', 'scalar', 'unknown')
           OR r.first_seen_at >= %(recheck)s)
"""


def unsettled_markets(db, after: str, limit: int, recheck_since: datetime) -> tuple[list[str], list[str]]:
    """Closed markets the resolutions collector must (re)ask Gamma about -> (recent, rotation).

    Unsettled: no resolution row, or a non-final one (disputed/pending), or a
    final one first seen at/after recheck_since (a recent resolution the
    exchange may still correct). `recent`: up to limit // 2 of them, most
    recently closed first, so a market that just closed is asked about within a
    cycle however long the backlog; `rotation`: up to the rest, by market_id >
    after, so the caller walks the whole backlog in pages and starts again.
    """
    recent_n = max(1, limit // 2)
    params = {"recheck": recheck_since, "after": after, "recent": recent_n, "rest": max(1, limit - recent_n)}
    recent = [r[0] for r in db.query(
        "SELECT m.market_id" + _UNSETTLED + "ORDER BY m.closed_time DESC NULLS LAST, m.market_id LIMIT %(recent)s",
        params)]
    rotation = [r[0] for r in db.query(
        "SELECT m.market_id" + _UNSETTLED + "AND m.market_id > %(after)s ORDER BY m.market_id LIMIT %(rest)s",
        params)]
    return recent, rotation


def resolution_rows(db, market_ids: list[str]) -> dict[str, dict]:
    """The stored resolutions of these markets, {market_id: row}."""
    if not market_ids:
        return {}
    rows = db.query(
        "SELECT market_id, condition_id, winning_token_id, winning_outcome, payouts, status, resolved_at "
        "FROM resolutions WHERE market_id = ANY(%s)",
        (list(market_ids),),
    )
    keys = ("market_id", "condition_id", "winning_token_id", "winning_outcome", "payouts", "status", "resolved_at")
    return {r[0]: dict(zip(keys, r)) for r in rows}
