"""Choosing the followed set: pure, from [selection] and market rows.

choose(selection, markets, now) decides which markets the prices, orderbooks and
trades collectors follow; the markets collector stores the result in
`followed_tokens`. The rules, in order:

1. Eligible: the market has CLOB tokens, is not archived, its order book is not
   disabled (`enableOrderBook` false), and it is open (`closed` false) -- or it
   closed within the last `recent_closed_hours` (0 = none).
2. `slugs`: markets named here are pinned: followed whatever their volume, and
   never cut by the cap.
3. `tags` / `slugs` given: only markets matching one of the tags (by tag slug,
   label or id, case-insensitive) or one of the slugs are candidates.
   `exclude_tags` removes a market unless its slug is pinned.
4. `min_volume_24h` > 0: a floor on Gamma's 24h volume (unpinned markets).
5. Highest 24h volume first (then market id, so ties are stable); `max_markets`
   > 0 caps the count (pinned ones count toward it but are never dropped).
min_volume_24h = 0 with max_markets = 0 and no tags/slugs follows every open market.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class Candidate:
    """What selection needs to know about one market."""

    market_id: str
    condition_id: str
    slug: str | None = None
    volume_24h: Decimal | None = None
    tags: tuple[str, ...] = ()  # lower-cased tag slugs, labels and ids
    closed: bool | None = False
    archived: bool | None = False
    enable_order_book: bool | None = True
    closed_time: datetime | None = None
    tokens: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (token_id, outcome) in outcome order


def tag_words(tags: Any) -> tuple[str, ...]:
    """The stored tags jsonb ([{id, label, slug}] or [str]) -> lower-cased match words."""
    out = []
    for tag in tags or ():
        if isinstance(tag, dict):
            out.extend(str(tag[k]).strip().lower() for k in ("id", "label", "slug") if tag.get(k) not in (None, ""))
        elif isinstance(tag, str):
            out.append(tag.strip().lower())
    return tuple(out)


def _words(values: Iterable[str] | None) -> set[str]:
    return {str(v).strip().lower() for v in values or () if str(v).strip()}


def choose(selection: Mapping[str, Any], markets: Iterable[Candidate], now: datetime) -> list[Candidate]:
    """Apply the rules of the module doc; the followed markets, in selection order."""
    min_volume = Decimal(str(selection.get("min_volume_24h") or 0))
    cap = int(selection.get("max_markets") or 0)
    tags = _words(selection.get("tags"))
    slugs = _words(selection.get("slugs"))
    excluded = _words(selection.get("exclude_tags"))
    hours = float(selection.get("recent_closed_hours") or 0)
    closed_since = now - timedelta(hours=hours) if hours > 0 else None

    pinned: list[Candidate] = []
    rest: list[Candidate] = []
    for m in markets:
        if not m.tokens or m.archived or m.enable_order_book is False:
            continue
        if m.closed:
            if closed_since is None or m.closed_time is None or not (closed_since <= m.closed_time <= now):
                continue
        slug = (m.slug or "").lower()
        if slug and slug in slugs:
            pinned.append(m)
            continue
        words = set(m.tags)
        if (tags or slugs) and not (words & tags):
            continue
        if words & excluded:
            continue
        if min_volume > 0 and (m.volume_24h is None or m.volume_24h < min_volume):
            continue
        rest.append(m)

    def order(m: Candidate):
        return (-(m.volume_24h or Decimal(0)), m.market_id)

    pinned.sort(key=order)
    rest.sort(key=order)
    if cap > 0:
        rest = rest[: max(0, cap - len(pinned))]
    return pinned + rest


def followed_rows(chosen: Iterable[Candidate]) -> list[dict]:
    """Chosen markets -> followed_tokens rows (token_id, market_id, condition_id, outcome)."""
    rows: dict[str, dict] = {}
    for m in chosen:
        for token, outcome in m.tokens:
            rows.setdefault(token, {"token_id": token, "market_id": m.market_id, "condition_id": m.condition_id,
                                    "outcome": outcome})
    return list(rows.values())
