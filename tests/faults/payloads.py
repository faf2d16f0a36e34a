"""Hypothesis strategies: arbitrary JSON, and real recorded payloads mutated.

Mutations of a real payload (tests/data/), each drawn by hypothesis and so
shrinkable: drop a key, change a value's type, put a hostile value somewhere
(huge numbers, NaN-ish strings, non-ASCII digits, NUL, lone surrogates, deep
nesting, 79-digit ids, impossible dates), or, for parsers that take text,
truncate the text or splice garbage into it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from hypothesis import strategies as st

DATA = Path(__file__).resolve().parent.parent / "data"


def deep(n: int):
    out: object = "x"
    for _ in range(n):
        out = [out]
    return out


HOSTILE = [
    None, True, False, 0, -1, 1, 10**80, -(10**80), 2**63, 2**64 + 1, 1e308, -1e308, 5e-324, 0.1 + 0.2,
    float("nan"), float("inf"), float("-inf"),
    "", " ", "NaN", "nan", "sNaN", "Infinity", "-Infinity", "inf", "1e999999", "-1e999999", "1e-999999",
    "1E+400000", "0x10", "1_000", "-0", "+0.5", ".5", "5.", "0.50000000000000000001", "1.0000000001", "-0.0",
    "\u0663", "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669\u0660\u0661\u0662\u0663", "\u00b2",
    "\uff11\uff12\uff13", "\U0001d7d9", "0.5\x00", "\x00", "\ud800", "\udfff abc", "1" * 78, "1" * 79, "9" * 200,
    "12345678901234567890123456789012345678901234567890123456789012345678901234567 ",
    "1700000000000", "17000000000000000", "1700000000", "2026-13-45T99:99:99Z", "0000-00-00", "0001-01-01",
    "9999-12-31T23:59:59+14:00", "2026-11-28 15:00:00+00", "2026-11-28T15:00:00", "null", "[]", "{}",
    '["1","2"]', '["Yes"]', '["1", "0"]', '["0.5","0.5"]', '["NaN","NaN"]', "BUY", "SELL", "buy", "<html>",
    "0xZZ", "0x", "x" * 5000, [], {}, [None], [{}], {"price": "0.5"}, {"a": {"b": {"c": None}}},
    deep(60), deep(400),
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**100), max_value=10**100),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.from_regex(r"-?[0-9]{0,90}(\.[0-9]{0,30})?([eE][-+]?[0-9]{1,7})?", fullmatch=True),
    # Copied on every draw: a later mutation inside a drawn list/dict must never change HOSTILE
    # itself (hypothesis then sees a strategy that behaves differently between test cases).
    st.sampled_from(HOSTILE).map(copy.deepcopy),
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=12), kids, max_size=6),
    max_leaves=25,
)


def load(name: str):
    return json.loads((DATA / name).read_text())


def load_lines(name: str) -> list:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def _paths(obj, prefix=()):
    """Every (container path, key) in obj, depth first, the root excluded."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append(prefix + (i,))
            out.extend(_paths(v, prefix + (i,)))
    return out


def _parent(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj


def mutate(draw, obj, max_mutations: int = 4):
    """A copy of obj with 1..max_mutations drawn mutations applied."""
    obj = copy.deepcopy(obj)
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = _paths(obj)
        if not paths:
            return draw(json_values)
        path = draw(st.sampled_from(paths))
        parent = _parent(obj, path)
        op = draw(st.sampled_from(("drop", "hostile", "hostile", "json", "retype", "wrap")))
        key = path[-1]
        if op == "drop":
            del parent[key]
        elif op == "hostile":
            parent[key] = copy.deepcopy(draw(st.sampled_from(HOSTILE)))
        elif op == "json":
            parent[key] = draw(json_values)
        elif op == "retype":
            value = parent[key]
            if isinstance(value, str):
                try:
                    parent[key] = json.loads(value)
                except ValueError:
                    parent[key] = [value]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                parent[key] = str(value)
            else:
                parent[key] = json.dumps(value)
        else:  # wrap: a value inside a one-item list or an object
            parent[key] = draw(st.sampled_from(([parent[key]], {"value": parent[key]})))
    return obj


@st.composite
def mutated(draw, samples: list):
    """One of samples (real payloads), mutated."""
    return mutate(draw, draw(st.sampled_from(samples)))


@st.composite
def payloads(draw, samples: list):
    """Arbitrary JSON, a sample as is, or a mutated sample."""
    kind = draw(st.sampled_from(("mutated", "mutated", "mutated", "arbitrary", "asis")))
    if kind == "arbitrary":
        return draw(json_values)
    sample = draw(st.sampled_from(samples))
    return copy.deepcopy(sample) if kind == "asis" else mutate(draw, sample)


@st.composite
def texts(draw, samples: list):
    """Frame text: a payload as JSON, then maybe truncated or with garbage spliced in."""
    value = draw(payloads(samples))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    how = draw(st.sampled_from(("whole", "whole", "whole", "truncate", "splice", "plain")))
    if how == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif how == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=20)) + text[at:]
    elif how == "plain":
        text = draw(st.sampled_from(("PONG", "PING", "NO NEW ASSETS", "", " ", "\x00", "INVALID OPERATION")))
    return text
