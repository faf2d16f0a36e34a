"""The exchange's encodings, decoded one way for every parser (polymarket-api.md §1, §9).

- Decimals: CLOB sends strings ("0.48", ".48"), Gamma and the Data API numbers;
  both become exact Decimal (never float). A float from JSON is converted through
  repr(), the shortest text that round-trips, i.e. the digits the server sent.
- JSON inside JSON: Gamma `outcomes`, `outcomePrices`, `clobTokenIds` are strings
  holding JSON arrays; newer fields are native arrays. json_list() takes both.
- Times: ISO-8601 with Z or an offset, date-only, Postgres text ("2026-05-25
  22:43:31+00"), epoch milliseconds as a string (CLOB, WS), epoch seconds (Data API).
  All become timezone-aware UTC datetimes.
- Token ids: decimal strings up to 78 digits; kept as text.
- What PostgreSQL refuses never reaches a row: ids holding NUL or lone
  surrogates make the item malformed; descriptive text and the raw jsonb are
  cleaned (NUL and lone surrogates -> U+FFFD, NaN/Infinity -> null); decimals
  beyond 100 integer or 1000 fraction digits are malformed.

Parsers raise PayloadError for a bad item; the caller skips that item whole and
counts it in a Parsed result, and ProblemLog logs it at a bounded rate.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

from workers.errors import PayloadError

_TOKEN_RE = re.compile(r"^[0-9]{1,78}$")
_DIGITS_RE = re.compile(r"^[0-9]{1,20}$")  # str.isdigit() also takes '²' and Arabic digits
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")  # PostgreSQL text/jsonb refuse NUL; UTF-8 has no lone surrogates
MAX_INT_DIGITS = 100
MAX_FRACTION_DIGITS = 1000
_EPOCH_MIN = datetime(2000, 1, 1, tzinfo=timezone.utc).timestamp()
_EPOCH_MAX = datetime(2200, 1, 1, tzinfo=timezone.utc).timestamp()
MAX_PROBLEMS = 20  # problem lines a Parsed result keeps (the count is exact)


@dataclass
class Parsed:
    """What a parser returns: rows per table, plus what it had to skip and why."""

    rows: dict[str, list[dict]] = field(default_factory=dict)
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, table: str, row: dict) -> None:
        self.rows.setdefault(table, []).append(row)

    def skip(self, problem: str) -> None:
        self.skipped += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem[:300])

    def table(self, name: str) -> list[dict]:
        return self.rows.get(name, [])


class ProblemLog:
    """Logs skipped items at most once per `every` seconds (with a count of the rest).

    A broken feed can produce thousands of bad items a second; the log gets one
    line per interval, the status counters get the exact count.
    """

    def __init__(self, logger: logging.Logger, every: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.every = every
        self.clock = clock
        self.total = 0
        self._last = float("-inf")
        self._suppressed = 0

    def report(self, what: str, parsed: Parsed) -> None:
        if not parsed.skipped:
            return
        self.total += parsed.skipped
        now = self.clock()
        if now - self._last >= self.every:
            self._last = now
            extra = f" (+{self._suppressed} more since the last report)" if self._suppressed else ""
            self.logger.warning("%s: skipped %d malformed item(s)%s; first: %s", what, parsed.skipped, extra,
                                parsed.problems[0] if parsed.problems else "?")
            self._suppressed = 0
        else:
            self._suppressed += parsed.skipped


# -- text PostgreSQL accepts ----------------------------------------------------------
def clean_text(value: str) -> str:
    """NUL and lone surrogates (refused by PostgreSQL / not UTF-8) -> U+FFFD."""
    return _BAD_TEXT.sub("\ufffd", value) if _BAD_TEXT.search(value) else value


def clean_json(value: Any, depth: int = 0) -> Any:
    """A decoded JSON value PostgreSQL's jsonb accepts: strings (and keys) cleaned,
    NaN/Infinity -> None, nesting deeper than 100 levels -> None."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= 100 and isinstance(value, (dict, list)):
        return None
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_json(v, depth + 1) for v in value]
    return value


# -- decimals -------------------------------------------------------------------
def decimal(value: Any, name: str = "value", *, empty_ok: bool = True) -> Decimal | None:
    """A JSON string or number -> exact finite Decimal; None or "" -> None (if empty_ok)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if empty_ok:
            return None
        raise PayloadError(f"{name}: missing")
    if isinstance(value, bool):
        raise PayloadError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, int):
        return in_range(Decimal(value), name)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(f"{name}: not finite: {value!r}")
        return in_range(Decimal(repr(value)), name)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise PayloadError(f"{name}: not finite: {value!r}")
        return in_range(value, name)
    if isinstance(value, str):
        try:
            out = Decimal(value.strip())
        except InvalidOperation:
            raise PayloadError(f"{name}: not a decimal: {value[:40]!r}") from None
        if not out.is_finite():
            raise PayloadError(f"{name}: not finite: {value[:40]!r}")
        return in_range(out, name)
    raise PayloadError(f"{name}: expected a number, got {type(value).__name__}")


def in_range(d: Decimal, name: str = "value") -> Decimal:
    """d, unless it has more integer or fraction digits than any real quantity (PayloadError)."""
    if d and d.adjusted() >= MAX_INT_DIGITS or d.as_tuple().exponent < -MAX_FRACTION_DIGITS:
        raise PayloadError(f"{name}: out of range: {str(d)[:40]}")
    return d


def amount(value: Any, name: str = "amount") -> Decimal | None:
    """A size, volume or liquidity: a decimal >= 0 (None when absent)."""
    out = decimal(value, name)
    if out is not None and out < 0:
        raise PayloadError(f"{name}: negative: {str(out)[:40]}")
    return out


def price(value: Any, name: str = "price", *, empty_ok: bool = True) -> Decimal | None:
    """A probability price: a decimal in [0, 1]."""
    out = decimal(value, name, empty_ok=empty_ok)
    if out is not None and not (0 <= out <= 1):
        raise PayloadError(f"{name}: outside [0, 1]: {out}")
    return out


def text(d: Decimal | None) -> str | None:
    """Plain decimal text (no exponent), the digits as sent: '.48' -> '0.48'."""
    if d is None:
        return None
    out = format(d, "f")
    return "0" if out in ("-0", "") else out


# -- JSON inside JSON ------------------------------------------------------------
def json_list(value: Any, name: str) -> list | None:
    """A native JSON array, or a string holding one -> list; None/"" -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise PayloadError(f"{name}: not a JSON array: {value[:60]!r}") from None
    if not isinstance(value, list):
        raise PayloadError(f"{name}: expected an array, got {type(value).__name__}")
    return value


# -- identifiers -----------------------------------------------------------------
def token_id(value: Any, name: str = "token_id") -> str:
    """A token id as text: decimal digits, at most 78 (a uint256)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value.strip()):
        raise PayloadError(f"{name}: not a token id: {str(value)[:90]!r}")
    return value.strip()


def ident(value: Any, name: str) -> str:
    """A required id (Gamma id, condition id): non-empty text, no NUL or lone surrogate.

    An id is never "cleaned" (that would make it another id): a bad one makes
    the item malformed.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise PayloadError(f"{name}: missing")
    if _BAD_TEXT.search(value) or len(value) > 200:
        raise PayloadError(f"{name}: not an id: {value[:60]!r}")
    return value.strip()


def opt_id(value: Any, name: str) -> str | None:
    """An optional id: None or "" -> None, else as ident()."""
    if value is None or value == "":
        return None
    return ident(value, name)


def opt_text(value: Any) -> str | None:
    """Optional text: None or "" -> None; numbers become text; cleaned for PostgreSQL."""
    if value is None or value == "":
        return None
    if isinstance(value, (dict, list)):
        raise PayloadError(f"expected text, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return clean_text(str(value))


def opt_bool(value: Any, name: str) -> bool | None:
    """Optional bool: absent stays None (absent is not false; polymarket-api.md §8)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PayloadError(f"{name}: expected a bool, got {value!r}")


# -- times -----------------------------------------------------------------------
def timestamp(value: Any, name: str = "time") -> datetime | None:
    """Any Gamma time text -> aware UTC datetime; None/"" -> None.

    Takes ISO-8601 ('Z', offsets, fractions), Postgres text ('2026-05-25 22:43:31+00')
    and date-only ('2026-06-01' -> midnight UTC). Naive times are taken as UTC.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{name}: expected a time string, got {type(value).__name__}")
    s = value.strip()
    try:
        out = datetime.fromisoformat(s)
    except ValueError:
        try:
            out = datetime.combine(date.fromisoformat(s[:10]), datetime.min.time()) if len(s) == 10 else None
        except ValueError:
            out = None
        if out is None:
            raise PayloadError(f"{name}: not a time: {s[:40]!r}") from None
    if out.tzinfo is None:
        out = out.replace(tzinfo=timezone.utc)
    return out.astimezone(timezone.utc)


def epoch_ms(value: Any, name: str = "timestamp") -> datetime:
    """Epoch milliseconds (string or integer) -> aware UTC datetime, exact to the ms."""
    if isinstance(value, str) and _DIGITS_RE.fullmatch(value.strip()):
        ms = int(value.strip())
    elif isinstance(value, int) and not isinstance(value, bool):
        ms = value
    else:
        raise PayloadError(f"{name}: not epoch milliseconds: {str(value)[:40]!r}")
    if not (_EPOCH_MIN <= ms / 1000 <= _EPOCH_MAX):
        raise PayloadError(f"{name}: out of range: {ms}")
    seconds, millis = divmod(ms, 1000)
    return datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=millis * 1000)


def epoch_s(value: Any, name: str = "timestamp") -> datetime:
    """Epoch seconds (integer or numeric string) -> aware UTC datetime."""
    if isinstance(value, str) and _DIGITS_RE.fullmatch(value.strip()):
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or not (_EPOCH_MIN <= value <= _EPOCH_MAX):
        raise PayloadError(f"{name}: not epoch seconds: {str(value)[:40]!r}")
    return datetime.fromtimestamp(value, timezone.utc)
