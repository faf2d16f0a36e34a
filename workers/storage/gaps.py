"""The trade listener's queries: feed coverage, open feed_gaps, market events.

Gap rows and coverage marks themselves are written through the Writer (tables
`feed_gaps`, key (token_id, started_at), merged so a later write fills in
ended_at/recovered_at, and `feed_coverage`): they then share the spool with the
trades when PostgreSQL is down, in order. This module holds the reads a listener
needs at start and on each followed-set refresh, the gap figures the status and the
demo show, and the two small writes that are not rows of a Writer table (releasing
marks, market events; migration 0020).
Every function takes a `workers.storage.db.Database` (one connection, opened after
the fork) and raises psycopg2 errors to the caller, which retries on its next turn.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Iterable

import psycopg2

from .db import Database

log = logging.getLogger(__name__)


def followed(db: Database) -> dict[str, tuple[str | None, datetime | None]]:
    """The followed set: token_id -> (condition_id, since)."""
    rows = db.query("SELECT token_id, condition_id, since FROM followed_tokens")
    return {token: (condition, since) for token, condition, since in rows}


def followed_version(db: Database) -> tuple[int, int]:
    """A fingerprint of the followed set (how many tokens, and an order-free sum of their
    ids' and markets' hashes): equal fingerprints mean the set did not change, so a
    listener need not read 100,000 rows again to find that out."""
    (count, total), = db.query(
        "SELECT count(*), COALESCE(sum(hashtext(token_id || '|' || COALESCE(condition_id, ''))), 0)"
        " FROM followed_tokens")
    return int(count), int(total)


def coverage(db: Database, tokens: Iterable[str]) -> dict[str, datetime]:
    """token_id -> covered_until, for the tokens that have a coverage mark."""
    rows = db.query("SELECT token_id, covered_until FROM feed_coverage WHERE token_id = ANY(%s)", (list(tokens),))
    return dict(rows)


def unreleased(db: Database) -> list[tuple[str, str | None, datetime]]:
    """Coverage marks of tokens nobody follows that are not settled yet:
    (token_id, condition_id, covered_until). What lies after such a mark is owed."""
    return db.query(
        "SELECT c.token_id, COALESCE(c.condition_id, t.condition_id), c.covered_until FROM feed_coverage c"
        " LEFT JOIN tokens t ON t.token_id = c.token_id WHERE c.released_at IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM followed_tokens f WHERE f.token_id = c.token_id)"
    )


def release(db: Database, until: dict[str, datetime]) -> int:
    """Settle the marks of unfollowed tokens whose debt is now a durable gap ending at `until`."""
    if not until:
        return 0
    tokens = sorted(until)
    return db.execute(
        "UPDATE feed_coverage c SET released_at = now(), covered_until = GREATEST(c.covered_until, u.until),"
        " updated_at = now() FROM unnest(%s::text[], %s::timestamptz[]) AS u(t, until)"
        " WHERE c.token_id = u.t AND c.released_at IS NULL",
        (tokens, [until[t] for t in tokens]),
    )


def last_trades(db: Database, tokens: Iterable[str]) -> dict[str, datetime]:
    """token_id -> time of its newest stored trade (tokens without coverage only)."""
    rows = db.query(
        "SELECT t, (SELECT max(ts) FROM trades WHERE token_id = t) FROM unnest(%s::text[]) AS t",
        (list(tokens),),
    )
    return {token: ts for token, ts in rows if ts is not None}


# A gap is owed until it is recovered or ends unrecoverable (migration 0021).
OPEN = "g.recovered_at IS NULL AND g.unrecoverable IS NULL"


def open_gaps(db: Database) -> list[tuple[str, str | None, datetime, datetime | None, str | None]]:
    """Every open gap, followed or not: (token_id, condition_id, started_at, ended_at, reason).

    The market is the gap row's own, else the followed set's or the tokens table's
    for that token (rows written before migration 0021 may lack it). Oldest first.
    """
    return db.query(
        "SELECT g.token_id, COALESCE(g.condition_id, f.condition_id, t.condition_id), g.started_at, g.ended_at,"
        " g.reason FROM feed_gaps g LEFT JOIN followed_tokens f ON f.token_id = g.token_id"
        f" LEFT JOIN tokens t ON t.token_id = g.token_id WHERE {OPEN} ORDER BY g.started_at"
    )


def debt(db: Database) -> tuple[int, datetime | None]:
    """(gaps open, started_at of the oldest open one): what a stopped run still owes. Cheap
    (the partial index of migration 0021), for `collectord status`."""
    return db.query(f"SELECT count(*), min(g.started_at) FROM feed_gaps g WHERE {OPEN}")[0]


def figures(db: Database) -> dict:
    """Gap figures over the whole table: opened, recovered, unrecoverable, open and the
    oldest open gap's start (a full scan: for summaries, not for every status call)."""
    (opened, recovered, unrecoverable, still_open, oldest, trades), = db.query(
        "SELECT count(*), count(g.recovered_at), count(*) FILTER (WHERE g.unrecoverable IS NOT NULL"
        f" AND g.recovered_at IS NULL), count(*) FILTER (WHERE {OPEN}), min(g.started_at) FILTER (WHERE {OPEN}),"
        " coalesce(sum(g.recovered_trades), 0) FROM feed_gaps g"
    )
    return {"opened": opened, "recovered": recovered, "unrecoverable": unrecoverable, "open": still_open,
            "oldest_open_started_at": oldest, "trades_recovered": int(trades)}


def record_market_events(db: Database, events: list[dict], received_at: datetime) -> int:
    """Store new_market / market_resolved announcements once (first copy wins).

    Each event under its own savepoint: one the database refuses (a NUL or a lone
    surrogate in a text, say) is logged and dropped, never retried forever and never
    blocking the others. Returns how many were new.
    """
    if not events:
        return 0

    def insert(cur) -> int:
        count = 0
        for e in events:
            cur.execute("SAVEPOINT market_event")
            try:
                cur.execute(
                    "INSERT INTO market_events (kind, market_id, condition_id, token_ids, winning_token_id,"
                    " winning_outcome, ts, raw, received_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (kind, market_id) DO NOTHING",
                    (e["kind"], e["market_id"], e["condition_id"], json.dumps(e["asset_ids"]),
                     e.get("winning_token_id"), e.get("winning_outcome"), e["ts"], json.dumps(e["raw"]),
                     received_at),
                )
            except (psycopg2.DataError, psycopg2.IntegrityError, ValueError) as err:
                cur.execute("ROLLBACK TO SAVEPOINT market_event")
                log.warning("market event %s %s refused: %s", e.get("kind"), e.get("market_id"),
                            str(err).splitlines()[0][:200])
                continue
            count += cur.rowcount
            cur.execute("RELEASE SAVEPOINT market_event")
        return count

    return db.run(insert)
