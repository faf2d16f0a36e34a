"""Market metadata from Gamma: parse() and the markets collector.

parse(payload) is pure: a Gamma payload (a bare /markets array, a /markets/keyset
page, one market, or /events with embedded markets) -> rows for `markets` and
`tokens`. Every field but `id` and `conditionId` is optional (Gamma omits empty
keys and sends "", 0 or null for documented non-null fields); unknown keys are
ignored. A market whose fields cannot be decoded is skipped whole (its tokens too)
and counted: never half-written.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterator

from workers import payload as p
from workers.errors import PayloadError

TAG_KEYS = ("id", "label", "slug")


def market_objects(payload: Any) -> Iterator[tuple[Any, dict | None]]:
    """Yield (market object, enclosing event or None) from any Gamma payload shape.

    Shapes: [market, ...] (GET /markets), {"markets": [...], "next_cursor"} (keyset),
    a single market object (GET /markets/{id}), [event, ...] or {"events": [...]}
    (events endpoints: each event embeds its markets), a single event object.
    Items that are not objects are yielded as they are so the caller counts them.
    """
    if isinstance(payload, dict):
        if _is_market(payload):
            yield payload, None
            return
        if isinstance(payload.get("markets"), list):
            if _is_event(payload):
                yield from ((m, payload) for m in payload["markets"])
            else:
                yield from ((m, None) for m in payload["markets"])
            return
        if isinstance(payload.get("events"), list):
            for event in payload["events"]:
                yield from market_objects(event) if isinstance(event, dict) else [(event, None)]
            return
        yield payload, None
        return
    if isinstance(payload, list):
        for item in payload:
            if isinstance(item, dict) and _is_event(item):
                yield from ((m, item) for m in item.get("markets") or [])
            else:
                yield item, None
        return
    raise PayloadError(f"expected a JSON array or object, got {type(payload).__name__}")


def _is_market(obj: dict) -> bool:
    return "conditionId" in obj or "clobTokenIds" in obj


def _is_event(obj: dict) -> bool:
    return isinstance(obj.get("markets"), list) and not _is_market(obj)


def _tags(value: Any) -> list[dict] | None:
    """Trimmed tag objects [{id, label, slug}]; None when the payload had none."""
    if not value:
        return None
    if not isinstance(value, list):
        raise PayloadError("tags: expected an array")
    out = []
    for tag in value:
        if isinstance(tag, dict):
            out.append({k: str(tag[k]) for k in TAG_KEYS if tag.get(k) not in (None, "")})
        elif isinstance(tag, str):
            out.append({"label": tag})
    return out


def outcome_tokens(obj: dict) -> list[tuple[str, str]]:
    """[(token_id, outcome), ...] in `outcomes` order; [] for a market with no CLOB tokens.

    Gamma sends both as strings holding JSON arrays. Token i belongs to outcome i;
    lists of different lengths or repeated token ids mean the market is malformed.
    """
    tokens = p.json_list(obj.get("clobTokenIds"), "clobTokenIds") or []
    outcomes = p.json_list(obj.get("outcomes"), "outcomes") or []
    if not tokens:
        return []
    if len(tokens) != len(outcomes):
        raise PayloadError(f"clobTokenIds has {len(tokens)} ids for {len(outcomes)} outcomes")
    ids = [p.token_id(t, "clobTokenIds[]") for t in tokens]
    if len(set(ids)) != len(ids):
        raise PayloadError("clobTokenIds: repeated token id")
    return [(tid, str(name)) for tid, name in zip(ids, outcomes)]


def parse_market(obj: Any, event: dict | None = None, seen_at: datetime | None = None) -> tuple[dict, list[dict]]:
    """One Gamma market object -> (markets row, tokens rows). Raises PayloadError."""
    if not isinstance(obj, dict):
        raise PayloadError(f"market: expected an object, got {type(obj).__name__}")
    market_id = p.ident(obj.get("id"), "id")
    condition_id = p.ident(obj.get("conditionId"), "conditionId")
    outcomes = p.json_list(obj.get("outcomes"), "outcomes")
    pairs = outcome_tokens(obj)
    events = obj.get("events")
    event_id = None
    if isinstance(events, list) and events and isinstance(events[0], dict):
        event_id = p.opt_text(events[0].get("id"))
    elif event is not None:
        event_id = p.opt_text(event.get("id"))
    tags = _tags(obj.get("tags"))
    if tags is None and event is not None:
        tags = _tags(event.get("tags"))
    end_date = p.timestamp(obj.get("endDate"), "endDate") or p.timestamp(obj.get("endDateIso"), "endDateIso")
    volume = obj.get("volume24hr") if obj.get("volume24hr") is not None else obj.get("volume24hrClob")
    liquidity = obj.get("liquidityNum") if obj.get("liquidityNum") is not None else obj.get("liquidity")
    row = {
        "market_id": market_id,
        "condition_id": condition_id,
        "question_id": p.opt_text(obj.get("questionID")),
        "slug": p.opt_text(obj.get("slug")),
        "question": p.opt_text(obj.get("question")),
        "event_id": event_id,
        "active": p.opt_bool(obj.get("active"), "active"),
        "closed": p.opt_bool(obj.get("closed"), "closed"),
        "archived": p.opt_bool(obj.get("archived"), "archived"),
        "neg_risk": p.opt_bool(obj.get("negRisk"), "negRisk"),
        "end_date": end_date,
        "closed_time": p.timestamp(obj.get("closedTime"), "closedTime"),
        "volume_24h": p.decimal(volume, "volume24hr"),
        "liquidity": p.decimal(liquidity, "liquidity"),
        "outcomes": [str(o) for o in outcomes] if outcomes is not None else None,
        "tags": tags,
        "uma_resolution_status": p.opt_text(obj.get("umaResolutionStatus")),
        "created_at": p.timestamp(obj.get("createdAt"), "createdAt"),
        "updated_at": p.timestamp(obj.get("updatedAt"), "updatedAt"),
        "raw": obj,
    }
    if seen_at is not None:
        row["first_seen_at"] = seen_at
        row["last_seen_at"] = seen_at
    tokens = [
        {"token_id": tid, "market_id": market_id, "condition_id": condition_id, "outcome": name, "outcome_index": i}
        for i, (tid, name) in enumerate(pairs)
    ]
    return row, tokens


def parse(payload: Any, seen_at: datetime | None = None) -> p.Parsed:
    """A Gamma payload -> Parsed with `markets` and `tokens` rows; bad markets skipped.

    seen_at (the time the payload was received) fills first_seen_at/last_seen_at;
    the storage upsert keeps the first first_seen_at.
    """
    out = p.Parsed(rows={"markets": [], "tokens": []})
    try:
        items = list(market_objects(payload))
    except PayloadError as err:
        out.skip(f"payload: {err}")
        return out
    markets: dict[str, dict] = {}
    by_token: dict[str, dict] = {}
    for obj, event in items:
        try:
            row, tokens = parse_market(obj, event, seen_at)
        except PayloadError as err:
            mid = obj.get("id") if isinstance(obj, dict) else None
            out.skip(f"market {mid!r}: {err}")
            continue
        # One row per key: a market listed twice (two events) must not hit the
        # same ON CONFLICT key twice in one batch.
        markets[row["market_id"]] = row
        for token in tokens:
            by_token[token["token_id"]] = token
    out.rows["markets"] = list(markets.values())
    out.rows["tokens"] = list(by_token.values())
    return out
