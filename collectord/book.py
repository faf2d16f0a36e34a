"""`collectord book TOKEN --at TIME`: print a token's order book at an instant, rebuilt
from book_events by workers.storage.replay.book_at (this module only parses, connects
and prints).

In order: checks the token id and the time (exit 2 with one line when either is not
one), finds the database (the config's dsn, else the running daemon's embedded one),
rebuilds, prints. Exit 1 with one line when the database cannot be reached or holds
nothing to rebuild that book from (unknown token, no checkpoint before TIME).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import TextIO

from collectord import pidfile
from collectord.config import Config, redact_dsn
from collectord.errors import EX_OK, EX_USAGE, CollectordError
from collectord.status import read_status

_TOKEN = re.compile(r"[0-9]{1,78}")


class UsageError(CollectordError):
    exit_code = EX_USAGE


def parse_time(text: str) -> datetime:
    """ISO 8601 (no zone: UTC), `now`, or epoch milliseconds / seconds -> an aware datetime."""
    value = text.strip()
    try:
        if value == "now":
            return datetime.now(timezone.utc)
        if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
            number = float(value)
            return datetime.fromtimestamp(number / 1000 if number >= 1e11 else number, timezone.utc)
        at = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise UsageError(f"book: --at {text!r} is not a time (ISO 8601 such as 2026-08-14T17:27:47.101Z, "
                         "epoch milliseconds or seconds, or now)") from None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def _dsn(config: Config) -> str:
    if config.dsn:
        return config.dsn
    probe = pidfile.probe(config.pidfile)
    doc = read_status(config.status_path) if probe.running else None
    dsn = str((doc or {}).get("dsn") or "")
    if not dsn:
        raise CollectordError("book: no database: dsn is empty and no collectord runs with an embedded one "
                              "(start it, or `collectord db serve`)")
    return dsn


def _levels(bids: list, asks: list, depth: int) -> list[str]:
    lines = [f"{'bid size':>16} {'bid':>8}   {'ask':<8} {'ask size':<16}"]
    for i in range(min(max(len(bids), len(asks)), depth)):
        b = bids[i] if i < len(bids) else ("", "")
        a = asks[i] if i < len(asks) else ("", "")
        lines.append(f"{b[1]:>16} {b[0]:>8}   {a[0]:<8} {a[1]:<16}".rstrip())
    if max(len(bids), len(asks)) > depth:
        lines.append(f"({len(bids)} bid and {len(asks)} ask levels; --depth shows more)")
    return lines


def cmd_book(config: Config, token: str, at_text: str, *, depth: int, as_json: bool, out: TextIO) -> int:
    if not _TOKEN.fullmatch(token):
        raise UsageError(f"book: {token!r} is not a token id (1 to 78 decimal digits)")
    at = parse_time(at_text)
    if depth < 1:
        raise UsageError("book: --depth must be at least 1")
    from workers import storage
    from workers.storage.replay import ReplayError, book_at

    dsn = _dsn(config)
    try:
        conn = storage.connect(dsn, application_name="collectord book", statement_timeout=60, connect_timeout=5)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CollectordError(f"book: cannot reach the database {redact_dsn(dsn)}: {redact_dsn(first)}") from None
    try:
        try:
            book = book_at(conn, token, at)
        except ReplayError as err:
            raise CollectordError(f"book: {err}") from None
        except Exception as err:  # e.g. a schema without book_events: one line, not a traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CollectordError(f"book: {type(err).__name__}: {first}") from None
    finally:
        conn.close()
    if as_json:
        print(json.dumps(book.as_dict()), file=out)
        return EX_OK
    print(f"book of {token} at {at.isoformat()}", file=out)
    print(f"as of {book.ts.isoformat()} (hash {book.hash}): checkpoint {book.checkpoint_ts.isoformat()}"
          f" + {book.events} change(s)", file=out)
    print(f"hash checks: {book.hash_checked} recomputed, {book.hash_mismatches} mismatch(es),"
          f" {book.hash_unverified} unverifiable", file=out)
    if book.gap is None:
        print("gap: none (the stream was whole from the checkpoint to this instant)", file=out)
    else:
        g = book.gap
        since = g["started_at"].isoformat() if g["started_at"] else "the start"
        print(f"gap: WARNING: {g['reason']} since {since}: events may be missing, the book may be wrong", file=out)
    for line in _levels(book.bids, book.asks, depth):
        print(line, file=out)
    return EX_OK
