"""Market metadata from Gamma: parse() and the markets collector.

parse(payload) is pure: a Gamma payload (a bare /markets array, a /markets/keyset
page, one market, or /events with embedded markets) -> rows for `markets` and
`tokens`. Every field but `id` and `conditionId` is optional (Gamma omits empty
keys and sends "", 0 or null for documented non-null fields); unknown keys are
ignored. A market whose fields cannot be decoded is skipped whole (its tokens too)
and counted: never half-written.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any, Iterator

import psycopg2

from workers import payload as p
from workers.errors import HttpError, PayloadError
from workers.polling import PollingWorker, utcnow
from workers.selection import choose, followed_rows
from workers.storage.followed import replace_followed, selection_candidates

log = logging.getLogger(__name__)

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
            out.append({k: p.clean_text(str(tag[k])) for k in TAG_KEYS if tag.get(k) not in (None, "")})
        elif isinstance(tag, str):
            out.append({"label": p.clean_text(tag)})
    return out


def _first(obj: dict, *keys: str) -> Any:
    """The first of keys that holds a value (not absent, None or "")."""
    for key in keys:
        if obj.get(key) not in (None, ""):
            return obj[key]
    return None


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
    return [(tid, p.clean_text(str(name))) for tid, name in zip(ids, outcomes)]


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
    volume = _first(obj, "volume24hr", "volume24hrClob")
    liquidity = _first(obj, "liquidity", "liquidityNum")  # the string form carries every digit
    row = {
        "market_id": market_id,
        "condition_id": condition_id,
        "question_id": p.opt_text(obj.get("questionID")),
        "slug": p.opt_text(obj.get("slug")),
        "question": p.opt_text(obj.get("question")),
        "event_id": event_id,
        "neg_risk_market_id": p.opt_text(obj.get("negRiskMarketID")),
        "active": p.opt_bool(obj.get("active"), "active"),
        "closed": p.opt_bool(obj.get("closed"), "closed"),
        "archived": p.opt_bool(obj.get("archived"), "archived"),
        "neg_risk": p.opt_bool(obj.get("negRisk"), "negRisk"),
        "start_date": p.timestamp(obj.get("startDate"), "startDate") or p.timestamp(obj.get("startDateIso"),
                                                                                  "startDateIso"),
        "end_date": end_date,
        "closed_time": p.timestamp(obj.get("closedTime"), "closedTime"),
        "volume": p.amount(_first(obj, "volume", "volumeNum"), "volume"),
        "volume_24h": p.amount(volume, "volume24hr"),
        "liquidity": p.amount(liquidity, "liquidity"),
        "outcomes": [p.clean_text(str(o)) for o in outcomes] if outcomes is not None else None,
        "tags": tags,
        "uma_resolution_status": p.opt_text(obj.get("umaResolutionStatus")),
        "created_at": p.timestamp(obj.get("createdAt"), "createdAt"),
        "updated_at": p.timestamp(obj.get("updatedAt"), "updatedAt"),
        "raw": p.clean_json(obj),  # what jsonb accepts (no NUL, NaN, lone surrogates)
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


# -- the collector -------------------------------------------------------------------

class FullScan:
    """Progress of one full keyset scan: open markets first, then closed ones."""

    def __init__(self):
        self.phases = [False, True]  # the value of Gamma's `closed` filter per phase
        self.cursor: str | None = None
        self.offset = 0  # used when keyset paging is unavailable (legacy offset paging)
        self.legacy = False
        self.pages = 0
        self.markets = 0

    @property
    def closed(self) -> bool:
        return self.phases[0]

    def next_phase(self) -> bool:
        """Advance to the next phase; False when the scan is complete."""
        self.phases.pop(0)
        self.cursor, self.offset = None, 0
        return bool(self.phases)


class MarketsCollector(PollingWorker):
    """Keeps `markets` and `tokens` complete and decides the followed set.

    Each cycle, in order:
      1. a full scan starts when none ran yet or the last one finished
         full_scan_interval ago: /markets/keyset with after_cursor, closed=false
         then closed=true (Gamma's `closed` defaults to false: both are asked
         explicitly); the open phase of the first scan runs to its end in one
         cycle (nothing can be followed before), later pages go
         full_scan_pages per cycle so the frequent scan keeps its pace;
      2. the frequent scan: /markets ordered by updatedAt descending (open and
         closed), paging until it reaches what the previous scan saw (minus an
         overlap) or recent_pages; plus one page of the newest by createdAt:
         newly listed and newly closed markets land within one interval;
      3. rows flushed, then the followed set recomputed from the database with
         [selection] (workers.selection) and replaced in one transaction;
      4. the running full scan advances by full_scan_pages pages.
    """

    OPTIONS = {
        **PollingWorker.OPTIONS,
        "interval": (float, 60.0),
        "full_scan_interval": (float, 3600.0),
        "full_scan_pages": (int, 200),
        "recent_pages": (int, 10),
        "page_size": (int, 100),
        "overlap": (float, 300.0),  # seconds of updatedAt overlap (Gamma answers can be 5 min stale)
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._scan: FullScan | None = None
        self._scans_done = 0
        self._last_full_done: float | None = None
        # Newest updatedAt stored so far per `closed` value (any scan), and the mark a
        # frequent scan pages down to: it moves only when a frequent scan reached
        # the previous mark, so a scan cut short by recent_pages leaves no hole.
        self._newest_seen: dict[bool, datetime | None] = {False: None, True: None}
        self._recent_mark: dict[bool, datetime | None] = {False: None, True: None}
        self.recent_truncated = 0
        self.followed_count = 0

    @property
    def gamma(self) -> str:
        return self.urls.get("gamma_url", "https://gamma-api.polymarket.com").rstrip("/")

    def status(self) -> dict:
        out = super().status()
        out.update(followed=self.followed_count, full_scans=self._scans_done, recent_truncated=self.recent_truncated)
        return out

    def cycle(self, figures: dict) -> None:
        figures.update(markets=0, tokens=0, pages=0)
        errors = 0
        now = time.monotonic()
        if self._scan is None and (self._last_full_done is None
                                   or now - self._last_full_done >= self.options["full_scan_interval"]):
            self._scan = FullScan()
        if self._scans_done == 0 and self._scan is not None and not self._scan.closed:
            errors += self._full_scan(figures, pages=None)  # first open pass: to the end
        for closed in (False, True):
            errors += self._recent_scan(closed, figures)
        errors += self._newest(figures)
        self.checkpoint()
        # The followed set before the rest of a full scan: the other collectors
        # should not wait for pages of closed markets to start on the open ones.
        errors += self._refresh_followed(figures)
        if self._scan is not None:
            errors += self._full_scan(figures, pages=self.options["full_scan_pages"])
        figures["followed"] = self.followed_count
        figures["full_scan"] = ("running" if self._scan else "idle")
        if errors == 0:
            self.success()

    # -- fetching ---------------------------------------------------------------------
    def _store(self, data: Any, figures: dict) -> list[dict]:
        """Parse one page, buffer its rows; returns the market rows."""
        parsed = parse(data, seen_at=utcnow())
        if parsed.skipped:
            self.skipped("gamma markets", parsed)
        rows = parsed.table("markets")
        self.writer.add("markets", rows)
        self.writer.add("tokens", parsed.table("tokens"))
        figures["markets"] += len(rows)
        figures["tokens"] += len(parsed.table("tokens"))
        figures["pages"] += 1
        for row in rows:
            closed = bool(row["closed"])
            seen = self._newest_seen[closed]
            if row["updated_at"] and (seen is None or row["updated_at"] > seen):
                self._newest_seen[closed] = row["updated_at"]
        return rows

    def _full_scan(self, figures: dict, pages: int | None) -> int:
        """Advance the running full scan by up to `pages` pages (None: to the end of the phase)."""
        scan = self._scan
        done = 0
        while scan is not None and (pages is None or done < pages):
            self.checkpoint()
            size = self.options["page_size"]
            params = {"limit": size, "closed": "true" if scan.closed else "false", "include_tag": "true"}
            try:
                if scan.legacy:
                    params.update(offset=scan.offset, order="id", ascending="true")
                    data = self.client.get_json(f"{self.gamma}/markets", params)
                    items = data if isinstance(data, list) else []
                    scan.offset += size
                    more = bool(items)
                else:
                    if scan.cursor:
                        params["after_cursor"] = scan.cursor
                    data = self.client.get_json(f"{self.gamma}/markets/keyset", params)
                    nxt = data.get("next_cursor") if isinstance(data, dict) else None
                    if nxt and nxt == scan.cursor:
                        log.warning("%s: keyset cursor echoed back; ending this phase", self.name)
                        nxt = None
                    scan.cursor = nxt or None
                    more = bool(nxt)
            except HttpError as err:
                if not scan.legacy and scan.cursor is None and err.status in (404, 405, 501, 503):
                    log.warning("%s: keyset paging unavailable (%s); using offset paging", self.name, err)
                    scan.legacy = True
                    continue
                if scan.legacy and err.status == 422:  # "offset too large": as far as legacy paging goes
                    more, data = False, []
                else:
                    self.failure(str(err))
                    return 1  # resume from the same cursor next cycle
            rows = self._store(data, figures)
            scan.pages += 1
            scan.markets += len(rows)
            done += 1
            if not more:
                log.info("%s: full scan of %s markets done (%d pages)", self.name,
                         "closed" if scan.closed else "open", scan.pages)
                if not scan.next_phase():
                    self._scan = None
                    self._scans_done += 1
                    self._last_full_done = time.monotonic()
                    return 0
                if pages is None:
                    return 0  # the first pass stops after the open phase
        return 0

    def _recent_scan(self, closed: bool, figures: dict) -> int:
        """Recently updated markets, newest first, down to the previous scan's mark (minus overlap).

        Without a mark yet: down to the newest market a full scan stored, or one
        page. A scan that ends at recent_pages before reaching the mark keeps the
        old mark (the next one pages down to it again; the full scan is the
        backstop) and is counted in recent_truncated.
        """
        mark = self._recent_mark[closed] or self._newest_seen[closed]
        size = self.options["page_size"]
        newest = None
        reached = False
        for page in range(max(1, self.options["recent_pages"])):
            self.checkpoint()
            params = {"limit": size, "offset": page * size, "closed": "true" if closed else "false",
                      "order": "updatedAt", "ascending": "false", "include_tag": "true"}
            try:
                data = self.client.get_json(f"{self.gamma}/markets", params)
            except HttpError as err:
                if err.status != 422:  # 422: offset too deep, as far as this scan can go
                    self.failure(str(err))
                    return 1
                reached = True
                break
            rows = self._store(data, figures)
            times = [r["updated_at"] for r in rows if r["updated_at"]]
            if times and (newest is None or max(times) > newest):
                newest = max(times)
            if not rows or mark is None or not times or min(times) < mark - timedelta(seconds=self.options["overlap"]):
                reached = True
                break
        if reached:
            if newest is not None and (self._recent_mark[closed] is None or newest > self._recent_mark[closed]):
                self._recent_mark[closed] = newest
        else:
            self.recent_truncated += 1
            figures["recent_truncated"] = figures.get("recent_truncated", 0) + 1
        return 0

    def _newest(self, figures: dict) -> int:
        """One page of the newest open markets by createdAt (a new market may not be the most updated)."""
        self.checkpoint()
        params = {"limit": self.options["page_size"], "closed": "false", "order": "createdAt",
                  "ascending": "false", "include_tag": "true"}
        try:
            self._store(self.client.get_json(f"{self.gamma}/markets", params), figures)
        except HttpError as err:
            self.failure(str(err))
            return 1
        return 0

    # -- the followed set ------------------------------------------------------------------
    def _refresh_followed(self, figures: dict) -> int:
        """Flush, choose from the database with [selection], replace followed_tokens atomically."""
        self.writer.flush()
        now = utcnow()
        hours = float(self.selection.get("recent_closed_hours") or 0)
        try:
            candidates = selection_candidates(self.db, now - timedelta(hours=hours) if hours > 0 else None)
            rows = followed_rows(choose(self.selection, candidates, now))
            added, removed = replace_followed(self.db, rows, now)
        except psycopg2.Error as err:
            self.failure(f"followed set not updated: database: {type(err).__name__}")
            self._warn_db(err)
            return 1
        self.followed_count = len(rows)
        figures.update(followed_added=added, followed_removed=removed)
        if added or removed:
            log.info("%s: following %d tokens (+%d -%d)", self.name, len(rows), added, removed)
        return 0
