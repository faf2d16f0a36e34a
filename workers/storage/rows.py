"""Row values -> the exact text PostgreSQL receives.

The Writer converts every row when it is added (so a wrong type fails at the
collector's add() call, not later inside a batch) into a list of str-or-None:
the same list is COPYed, passed to INSERT, or spooled as JSON, and nothing
is lost on the way (Decimal, 78-digit ids, timestamps stay exact).
"""

from __future__ import annotations

import json
import math
import re
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Callable

Converter = Callable[[Any], "str | None"]


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def to_text(value: Any) -> str | None:
    """text: str as is; int as its decimal digits (exact, any size); nothing else."""
    if value is None or type(value) is str:
        return value
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"expected str, got {type(value).__name__}")
    if isinstance(value, (int, str)):
        return str(value)
    raise TypeError(f"expected str, got {type(value).__name__}")


def to_numeric(value: Any) -> str | None:
    """numeric: decimal string as is (PostgreSQL validates), Decimal/int exact, float by repr."""
    kind = type(value)
    if value is None or kind is str:
        return value
    if kind is Decimal or kind is int:
        return str(value)
    if kind is float:
        if math.isnan(value):
            return "NaN"
        return repr(value) if math.isfinite(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bool):
        raise TypeError("expected a number, got bool")
    if isinstance(value, (Decimal, int, str)):
        return str(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def to_int(value: Any) -> str | None:
    if value is None or type(value) is str:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected int, got {type(value).__name__}")
    return str(value)


def to_bool(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "t" if value else "f"
    raise TypeError(f"expected bool, got {type(value).__name__}")


def to_timestamptz(value: Any) -> str | None:
    """timestamptz: an aware datetime (naive ones are ambiguous: refused), a date, or a string PostgreSQL parses."""
    if value is None or type(value) is str:
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime (no time zone)")
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"expected datetime, got {type(value).__name__}")


def to_jsonb(value: Any) -> str | None:
    """jsonb: a str is taken as JSON text already; anything else is serialized (Decimal as a string)."""
    if value is None or type(value) is str:
        return value
    return json.dumps(value, default=_json_default, ensure_ascii=False, separators=(",", ":"))


CONVERTERS: dict[str, Converter] = {
    "text": to_text,
    "numeric": to_numeric,
    "int": to_int,
    "bigint": to_int,
    "boolean": to_bool,
    "timestamptz": to_timestamptz,
    "jsonb": to_jsonb,
}

_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_needs_escape = re.compile(r"[\\\t\n\r]").search


def copy_text(rows: list[list[str | None]]) -> str:
    """Rows in COPY text format (tab-separated, \\N for NULL, backslash escapes)."""
    needs, esc = _needs_escape, _ESCAPE
    lines = [
        "\t".join(["\\N" if v is None else (v.translate(esc) if needs(v) else v) for v in row]) for row in rows
    ]
    lines.append("")
    return "\n".join(lines)
