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


def to_date(value: Any) -> str | None:
    """date: a date (not a datetime: its day depends on a time zone), or a string PostgreSQL parses."""
    if value is None or type(value) is str:
        return value
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"expected date, got {type(value).__name__}")


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
    # book_events (rows arrive as text from workers/bookevents.py; PostgreSQL validates)
    '"char"': to_text,
    "bytea": to_text,
    "numeric[]": to_text,
    "date": to_date,
    "jsonb": to_jsonb,
}

_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_needs_escape = re.compile(r"[\\\t\n\r]").search


def copy_text(rows: list[list[str | None]]) -> str:
    """Rows in COPY text format (tab-separated, \\N for NULL, backslash escapes).

    Almost no value needs escaping, so the rows are joined as they are, and the
    whole text is checked once: when it holds exactly one backslash per NULL
    marker, one tab per separator, one line break per row and no carriage
    return, nothing needed escaping. Otherwise it is rebuilt row by row with
    escapes (_escaped_copy_text). Rows without NULLs (the common case) are joined
    in one pass at C speed; only when that meets a None are the rows holding
    one joined with their markers.
    """
    n = len(rows)
    if not n:
        return ""
    try:
        text = "\n".join(map("\t".join, rows)) + "\n"
        nulls = 0
    except TypeError:  # a None somewhere (or a non-str, which the slow join reports)
        lines = []
        append = lines.append
        join = "\t".join
        nulls = 0
        for row in rows:
            if None in row:
                nulls += row.count(None)
                append(join(["\\N" if v is None else v for v in row]))
            else:
                append(join(row))
        append("")
        text = "\n".join(lines)
    if (
        text.count("\\") != nulls
        or text.count("\t") != sum(map(len, rows)) - n
        or text.count("\n") != n
        or "\r" in text
    ):
        return _escaped_copy_text(rows)
    return text


def _escaped_copy_text(rows: list[list[str | None]]) -> str:
    """copy_text the slow way: a row whose joined line could be ambiguous is rebuilt with escapes."""
    needs, esc = _needs_escape, _ESCAPE
    out = []
    append = out.append
    for row in rows:
        line = "\t".join(["\\N" if v is None else v for v in row])
        if (
            line.count("\\") != row.count(None)
            or line.count("\t") != len(row) - 1
            or "\n" in line
            or "\r" in line
        ):
            line = "\t".join(["\\N" if v is None else (v.translate(esc) if needs(v) else v) for v in row])
        append(line)
    append("")
    return "\n".join(out)


def unsendable(row: list[str | None]) -> str | None:
    """Why PostgreSQL cannot take this converted row as text (None when it can).

    A NUL character (no text or jsonb value may hold one) or a lone surrogate
    (JSON "\\ud800" decodes to one; it has no UTF-8 encoding) in any value.
    Either would fail the whole COPY, so such rows are refused one by one.
    """
    for value in row:
        if value is None:
            continue
        if "\x00" in value:
            return "NUL character in a text value"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "lone surrogate in a text value (not encodable as UTF-8)"
    return None


def copy_data(rows: list[list[str | None]]) -> tuple[bytes, list[list[str | None]], list[tuple[list, str]]]:
    """(COPY text as UTF-8 bytes, the rows in it, [(row, reason)] for rows left out).

    The common case costs one scan and one encode of the whole text; only when
    that finds a NUL or a lone surrogate are rows checked one by one.
    """
    text = copy_text(rows)
    if "\x00" not in text:
        try:
            return text.encode("utf-8"), rows, []
        except UnicodeEncodeError:
            pass
    kept, refused = [], []
    for row in rows:
        reason = unsendable(row)
        if reason is None:
            kept.append(row)
        else:
            refused.append((row, reason))
    return copy_text(kept).encode("utf-8"), kept, refused


# Fast paths inlined per column type (the common value types skip a function
# call); anything else falls back to the converter above, which validates.
_INLINE = {
    "text": "({v} if ({v} := get({c!r})).__class__ is str or {v} is None else to_text({v}))",
    "numeric": "({v} if ({v} := get({c!r})).__class__ is str or {v} is None else "
               "(str({v}) if {v}.__class__ is Decimal else to_numeric({v})))",
    # A datetime's text is remembered (one (object, text) tuple, replaced whole:
    # safe across threads) and reused while the next row passes the same object:
    # collectors stamp a whole message's rows with one received_at.
    "timestamptz": "({v} if ({v} := get({c!r})).__class__ is str or {v} is None else "
                   "(_c{i}[1] if (_c{i} := _k{i}[0])[0] is {v} else _ts_miss({v}, _k{i})))",
    "int": "(str({v}) if ({v} := get({c!r})).__class__ is int else ({v} if {v} is None or {v}.__class__ is str "
           "else to_int({v})))",
}


_NOTHING = object()


def _ts_miss(value: Any, cache: list) -> str | None:
    """to_timestamptz(value); a datetime and its text become the column's remembered pair."""
    text = to_timestamptz(value)
    if value.__class__ is datetime:
        cache[0] = (value, text)
    return text


def row_converter(columns: tuple[tuple[str, str], ...]) -> Callable[[Any], list]:
    """A function row(dict) -> [text-or-None per column], compiled for these columns.

    Same results as applying CONVERTERS column by column, about three times
    faster (the Writer converts every row a collector adds).
    """
    parts = []
    namespace = {"Decimal": Decimal, "datetime": datetime, "CONVERTERS": CONVERTERS, "to_text": to_text,
                 "to_numeric": to_numeric, "to_timestamptz": to_timestamptz, "to_int": to_int,
                 "_ts_miss": _ts_miss}
    for i, (col, kind) in enumerate(columns):
        if not col.isidentifier():
            raise ValueError(f"bad column name {col!r}")
        template = _INLINE.get(kind)
        parts.append(template.format(v=f"v{i}", c=col, i=i) if template else f"CONVERTERS[{kind!r}](get({col!r}))")
        if kind == "timestamptz":
            namespace[f"_k{i}"] = [(_NOTHING, None)]  # per column: the last datetime and its text
    source = "def convert(row):\n    get = row.get\n    return [" + ",\n        ".join(parts) + "]\n"
    exec(compile(source, f"<row_converter {','.join(c for c, _ in columns)}>", "exec"), namespace)
    return namespace["convert"]
