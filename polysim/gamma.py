"""Gamma API (/gamma): market and event metadata with the real encodings and query rules.

Rules owed by the real API (polymarket-api.md §2): `closed` defaults to false
(closed markets only with closed=true, even when asking by id/slug/token/
condition); `limit` clamped to 100 (default 20 here, unconfirmed upstream); deep
`offset` -> 422; keyset paging via `after_cursor` (a `cursor`/`next_cursor`
parameter is ignored, i.e. page 1 again); keyset rejects `offset`; the last keyset
page has no `next_cursor`. Encodings: JSON-in-JSON `outcomes`/`outcomePrices`/
`clobTokenIds`/`umaResolutionStatuses`; `volume`/`liquidity` strings, `*Num` and
`volume24hr` numbers; `closedTime` in Postgres text form.

Handlers return (status, payload); the server encodes and applies faults.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone

from polysim.book import ONE, PRICE_TEXT
from polysim.exchange import TICK_TEXT, Exchange
from polysim.market import Market

LIMIT_CAP = 100
OFFSET_CAP = 2000
ORDER_FIELDS = ("id", "volume24hr", "volume", "volumeNum", "liquidity", "liquidityNum", "startDate",
                "endDate", "closedTime", "createdAt", "updatedAt")


class QueryError(Exception):
    """A query Gamma answers with 422 {"type": "validation error", "error": ...}."""


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def iso_us(ms: int) -> str:
    return _dt(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}{(ms * 7) % 1000:03d}Z"


def iso_ms(ms: int) -> str:
    return _dt(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def iso_s(ms: int) -> str:
    return _dt(ms).strftime("%Y-%m-%dT%H:%M:%SZ")


def pg_text(ms: int) -> str:
    return _dt(ms).strftime("%Y-%m-%d %H:%M:%S+00")


def date_only(ms: int) -> str:
    return _dt(ms).strftime("%Y-%m-%d")


def _parse_bool(name: str, value: str | None) -> bool | None:
    if value is None:
        return None
    low = value.strip().lower()
    if low in ("true", "1"):
        return True
    if low in ("false", "0"):
        return False
    raise QueryError(f"invalid boolean for {name}")


def _parse_int(name: str, value: str | None, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise QueryError(f"invalid integer for {name}") from None
    if n < 0:
        raise QueryError(f"{name} must be >= 0")
    return n


def _parse_time(name: str, value: str) -> int:
    try:
        text = value.strip().replace("Z", "+00:00")
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(f"invalid date-time for {name}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


class Gamma:
    def __init__(self, exchange: Exchange):
        self.x = exchange

    # -- rendering -------------------------------------------------------------------
    def prices(self, m: Market) -> tuple[str, str]:
        """outcomePrices: final when resolved, else the (cached display) mid and its complement."""
        if m.final_prices is not None:
            return m.final_prices
        mid = m.proposal_mid if m.state == "proposed" else m.book.mid(0)
        if mid is None:
            mid = ONE // 2
        return PRICE_TEXT[mid], PRICE_TEXT[ONE - mid]

    def market(self, m: Market, include_tag: bool = False, schema: bool = False, embedded: bool = False) -> dict:
        """One Gamma market object, keys in the order of the recorded payloads."""
        closed = m.closed
        resolved = m.state == "resolved"
        volume = m.volume_cents / 100 + (m.index % 97) * 1013.37
        book = m.book
        liquidity = round(sum(p * s for p, s in book.bids.items()) / ONE / 100
                          + sum((ONE - p) * s for p, s in book.asks.items()) / ONE / 100, 5)
        bb, ba = book.best_bid(0), book.best_ask(0)
        o: dict = {}
        if schema:
            o["$schema"] = "https://gamma-api.polymarket.com/schemas/Market.json"
        o.update({
            "id": m.gamma_id, "question": m.question, "conditionId": m.condition_id, "slug": m.slug,
            "resolutionSource": "", "endDate": iso_s(m.end_ms),
            "liquidity": repr(liquidity), "startDate": iso_ms(m.start_ms),
            "image": f"https://polysim.invalid/{m.slug}.png", "icon": f"https://polysim.invalid/{m.slug}.png",
            "description": m.description,
            "outcomes": json.dumps(list(m.outcomes)),
            "outcomePrices": json.dumps(list(self.prices(m))),
            "volume": repr(volume), "active": True, "closed": closed, "marketMakerAddress": "",
            "createdAt": iso_us(m.created_ms), "updatedAt": iso_us(m.updated_ms),
        })
        if closed:
            o["closedTime"] = pg_text(m.closed_ms)
        o.update({
            "new": False, "featured": False,
            "submitted_by": "0x91430CaD2d3975766499717fA0D66A78D814E5c5", "archived": False,
            "resolvedBy": "0x65070BE91477460D8A7AeEb94ef92fe056C2f2A7", "restricted": True,
            "groupItemTitle": m.outcomes[0] if m.event.neg_risk else "", "groupItemThreshold": "0",
            "questionID": m.question_id,
        })
        if resolved:
            o["umaEndDate"] = iso_s(m.resolved_ms)
        o.update({"enableOrderBook": True, "orderPriceMinTickSize": float(TICK_TEXT[book.tick]),
                  "orderMinSize": 5})
        if closed:
            o["umaResolutionStatus"] = "resolved" if resolved else "proposed"
        o.update({
            "volumeNum": volume, "liquidityNum": liquidity,
            "endDateIso": date_only(m.end_ms), "startDateIso": date_only(m.start_ms),
            "hasReviewedDates": True, "volume24hr": round(volume / 37, 6),
            "volume1wk": round(volume / 7, 6), "volume1mo": round(volume / 2, 6), "volume1yr": volume,
            "clobTokenIds": json.dumps(list(m.tokens)), "umaBond": "500", "umaReward": "5",
            "volume24hrClob": round(volume / 37, 6), "volumeClob": volume, "liquidityClob": liquidity,
            "makerBaseFee": 1000 if m.fee_rate_bps != "0" else 0,
            "takerBaseFee": 1000 if m.fee_rate_bps != "0" else 0,
            "customLiveness": 0, "acceptingOrders": m.state == "open", "negRisk": m.event.neg_risk,
        })
        if m.event.neg_risk:
            o["negRiskMarketID"] = m.event.neg_risk_market_id
        o.update({"negRiskRequestID": "", "ready": False, "funded": False,
                  "acceptingOrdersTimestamp": iso_s(m.start_ms)})
        if include_tag:
            o["tags"] = [{"id": t["id"], "label": t["label"], "slug": t["slug"], "forceShow": False,
                          "createdAt": "2023-11-02T22:05:44.48Z", "updatedAt": "2026-04-17T20:47:56.524437Z",
                          "requiresTranslation": False} for t in m.tags]
        o.update({"cyom": False, "competitive": 0.8, "pagerDutyNotificationEnabled": False,
                  "approved": True, "rewardsMinSize": 0, "rewardsMaxSpread": 0})
        if bb is not None and ba is not None:
            o["spread"] = (ba - bb) / ONE
        if resolved:
            o["automaticallyResolved"] = True
        o["oneDayPriceChange"] = 0.001
        last = m.last_trade[0]
        if last is not None:
            o["lastTradePrice"] = last[0] / ONE
        if bb is not None:
            o["bestBid"] = bb / ONE
        if ba is not None:
            o["bestAsk"] = ba / ONE
        o.update({
            "automaticallyActive": True, "clearBookOnStart": True, "manualActivation": False,
            "negRiskOther": False,
            "umaResolutionStatuses": json.dumps(["proposed"]) if closed else "[]",
            "pendingDeployment": False, "deploying": False, "rfqEnabled": False,
            "holdingRewardsEnabled": False, "feesEnabled": m.fee_rate_bps != "0",
            "requiresTranslation": False,
        })
        if not embedded:  # markets inside an event carry no `events` back-reference
            o["events"] = [self.event_stub(m)]
        if closed:
            for key in ("liquidity", "liquidityNum", "liquidityClob", "competitive"):
                o.pop(key, None)
        return o

    def event_stub(self, m: Market) -> dict:
        e = m.event
        return {"id": e.id, "ticker": e.ticker, "slug": e.slug, "title": e.title,
                "negRisk": e.neg_risk, "active": True, "closed": self._event_closed(e.id)}

    def _event_markets(self, event_id: str) -> list[Market]:
        return self.x.by_event.get(event_id, [])

    def _event_closed(self, event_id: str) -> bool:
        return all(m.closed for m in self._event_markets(event_id))

    def event(self, event_id: str, markets: list[Market]) -> dict:
        e = markets[0].event
        volume = sum(m.volume_cents for m in markets) / 100
        closed = all(m.closed for m in markets)
        o = {
            "id": e.id, "ticker": e.ticker, "slug": e.slug, "title": e.title,
            "description": markets[0].description, "startDate": iso_ms(min(m.start_ms for m in markets)),
            "creationDate": iso_us(e.created_ms), "endDate": iso_s(max(m.end_ms for m in markets)),
            "active": True, "closed": closed, "archived": False, "new": False, "featured": False,
            "restricted": True, "liquidity": 0.0, "volume": volume, "openInterest": 0,
            "volume24hr": round(volume / 37, 6), "commentCount": 0,
            "createdAt": iso_us(e.created_ms), "updatedAt": iso_us(max(m.updated_ms for m in markets)),
            "enableOrderBook": True, "negRisk": e.neg_risk, "enableNegRisk": e.neg_risk,
            "negRiskAugmented": False,
        }
        if e.neg_risk:
            o["negRiskMarketID"] = e.neg_risk_market_id
        if closed:
            o["closedTime"] = pg_text(max(m.closed_ms for m in markets))
        o["tags"] = [{"id": t["id"], "label": t["label"], "slug": t["slug"]} for t in markets[0].tags]
        o["markets"] = [self.market(m, embedded=True) for m in markets]
        return o

    # -- queries ---------------------------------------------------------------------------
    def _filter(self, q) -> list[Market]:
        """Markets matching the list filters, in id order (closed defaults to false)."""
        closed = _parse_bool("closed", q.get("closed"))
        if closed is None:
            closed = False
        active = _parse_bool("active", q.get("active"))
        archived = _parse_bool("archived", q.get("archived"))
        ids = q.getall("id", [])
        for i in ids:
            if not i.isdigit():
                raise QueryError("invalid integer for id")
        ids = set(ids)
        slugs = set(q.getall("slug", []))
        tokens = set(t for v in q.getall("clob_token_ids", []) for t in v.split(",") if t)
        conds = set(c for v in q.getall("condition_ids", []) for c in v.split(",") if c)
        uma = q.get("uma_resolution_status")
        tag_id = q.get("tag_id")
        if tag_id is not None and not tag_id.isdigit():
            raise QueryError("invalid integer for tag_id")
        bounds = {}
        for key, attr in (("start_date_min", "start_ms"), ("start_date_max", "start_ms"),
                          ("end_date_min", "end_ms"), ("end_date_max", "end_ms")):
            if q.get(key):
                bounds[key] = (attr, _parse_time(key, q[key]))
        now = self.x.now_ms
        out = []
        for m in self.x.markets:
            if m.closed != closed or m.created_ms > now:
                continue
            if active is not None and not active:
                continue  # every simulated market stays active=true, as the real ones do
            if archived is not None and archived:
                continue
            if ids and m.gamma_id not in ids:
                continue
            if slugs and m.slug not in slugs:
                continue
            if tokens and not (tokens & set(m.tokens)):
                continue
            if conds and m.condition_id not in conds:
                continue
            if tag_id is not None and all(t["id"] != tag_id for t in m.tags):
                continue
            if uma is not None and (("resolved" if m.state == "resolved" else "proposed" if m.closed else "") != uma):
                continue
            ok = True
            for key, (attr, bound) in bounds.items():
                value = getattr(m, attr)
                if (key.endswith("_min") and value < bound) or (key.endswith("_max") and value > bound):
                    ok = False
                    break
            if ok:
                out.append(m)
        return out

    def _order(self, q, markets: list[Market]) -> list[Market]:
        order = q.get("order")
        if not order:
            return markets
        ascending = _parse_bool("ascending", q.get("ascending")) or False
        keys = [k.strip() for k in order.split(",") if k.strip()]
        for k in keys:
            if k not in ORDER_FIELDS:
                raise QueryError(f"invalid order field {k}")

        def key(m: Market):
            vals = []
            for k in keys:
                if k == "id":
                    vals.append(int(m.gamma_id))
                elif k.startswith("volume"):
                    vals.append(m.volume_cents)
                elif k.startswith("liquidity"):
                    vals.append(sum(m.book.bids.values()) + sum(m.book.asks.values()))
                elif k == "startDate":
                    vals.append(m.start_ms)
                elif k == "endDate":
                    vals.append(m.end_ms)
                elif k == "closedTime":
                    vals.append(m.closed_ms or 0)
                elif k == "createdAt":
                    vals.append(m.created_ms)
                else:
                    vals.append(m.updated_ms)
            vals.append(int(m.gamma_id))
            return vals

        return sorted(markets, key=key, reverse=not ascending)

    def _limit(self, q) -> int:
        return min(_parse_int("limit", q.get("limit"), self.x.opts.gamma_default_limit), LIMIT_CAP)

    def list_markets(self, q):
        try:
            limit = self._limit(q)
            offset = _parse_int("offset", q.get("offset"), 0)
            if offset > OFFSET_CAP:
                raise QueryError("offset too large, use /markets/keyset for deeper pagination")
            markets = self._order(q, self._filter(q))
        except QueryError as e:
            return 422, {"type": "validation error", "error": str(e)}
        include_tag = q.get("include_tag", "").lower() == "true"
        return 200, [self.market(m, include_tag) for m in markets[offset:offset + limit]]

    @staticmethod
    def _fingerprint(q) -> str:
        items = sorted((k, v) for k, v in q.items() if k not in ("after_cursor", "limit"))
        return hashlib.sha1(json.dumps(items).encode()).hexdigest()[:12]

    def keyset(self, q, what: str = "markets"):
        """`/markets/keyset` (or events): pages in id order; cursor = last id + query fingerprint."""
        try:
            if "offset" in q:
                raise QueryError("offset is not allowed on keyset endpoints")
            limit = self._limit(q)
            after = 0
            fp = self._fingerprint(q)
            cursor = q.get("after_cursor")
            if cursor:
                try:
                    raw = base64.urlsafe_b64decode(cursor.encode() + b"==").decode()
                    cfp, last = raw.split(":", 1)
                    after = int(last)
                except (ValueError, UnicodeDecodeError):
                    raise QueryError("invalid cursor") from None
                if cfp != fp:
                    raise QueryError("cursor does not match the query")
            if what == "markets":
                rows = [(int(m.gamma_id), m) for m in self._filter(q)]
            else:
                rows = [(int(eid), ms) for eid, ms in self._events(q)]
        except QueryError as e:
            return 422, {"type": "validation error", "error": str(e)}
        rows = [r for r in rows if r[0] > after]
        rows.sort(key=lambda r: r[0])
        page = rows[:limit]
        include_tag = q.get("include_tag", "").lower() == "true"
        if what == "markets":
            body: dict = {"markets": [self.market(m, include_tag) for _, m in page]}
        else:
            body = {"events": [self.event(str(i), ms) for i, ms in page]}
        if len(rows) > limit and page:
            body["next_cursor"] = base64.urlsafe_b64encode(f"{fp}:{page[-1][0]}".encode()).decode().rstrip("=")
        return 200, body

    def one_market(self, market_id: str, q):
        if not market_id.isdigit():
            return 422, {"type": "validation error", "error": "id is invalid"}
        m = self.x.by_gamma.get(market_id)
        if m is None or m.created_ms > self.x.now_ms:
            return 404, {"type": "not found error", "error": "market not found"}
        return 200, self.market(m, q.get("include_tag", "").lower() == "true", schema=True)

    def market_by_slug(self, slug: str, q):
        for m in self.x.markets:
            if m.slug == slug:
                return 200, self.market(m, q.get("include_tag", "").lower() == "true", schema=True)
        return 404, {"type": "not found error", "error": "market not found"}

    def _events(self, q) -> list[tuple[str, list[Market]]]:
        closed = _parse_bool("closed", q.get("closed"))
        if closed is None:
            closed = False
        ids = set(q.getall("id", []))
        slugs = set(q.getall("slug", []))
        groups = self.x.by_event
        out = []
        for eid, ms in groups.items():
            if all(m.closed for m in ms) != closed:
                continue
            if ids and eid not in ids:
                continue
            if slugs and ms[0].event.slug not in slugs:
                continue
            out.append((eid, ms))
        out.sort(key=lambda e: int(e[0]))
        return out

    def list_events(self, q):
        try:
            limit = self._limit(q)
            offset = _parse_int("offset", q.get("offset"), 0)
            if offset > OFFSET_CAP:
                raise QueryError("offset too large, use /events/keyset for deeper pagination")
            events = self._events(q)
        except QueryError as e:
            return 422, {"type": "validation error", "error": str(e)}
        return 200, [self.event(eid, ms) for eid, ms in events[offset:offset + limit]]

    def one_event(self, event_id: str):
        if not event_id.isdigit():
            return 422, {"type": "validation error", "error": "id is invalid"}
        ms = self._event_markets(event_id)
        if not ms:
            return 404, {"type": "not found error", "error": "event not found"}
        return 200, self.event(event_id, ms)
