"""CLOB REST (/clob): books, prices, last trades, market listings (polymarket-api.md §3).

A token has a book only while its market is open and past its CLOB delay;
otherwise /book answers 404 "No orderbook exists for the requested token id"
(new markets during their first seconds, closed and resolved markets, unknown
ids), and the batch endpoints silently drop it. A batch request (/books, /prices,
/midpoints, /spreads, /last-trades-prices, POST or GET) naming more than
`max_batch_ids` ids is answered 400 {"error": "too many token ids (max N)"}; every
item counts, so POST /prices with BUY and SELL names each token twice (the real
limit is on request bytes, past about 500 ids). /last-trades-prices never takes
more than its documented 500. Listings page with base64 offset cursors from
"MA==" to the end marker "LTE=".
"""

from __future__ import annotations

import base64
from decimal import Decimal

from polysim.book import ONE, PRICE_TEXT
from polysim.exchange import SIDE_TEXT, TICK_TEXT, Exchange
from polysim.gamma import iso_s
from polysim.market import Market

NO_BOOK = {"error": "No orderbook exists for the requested token id"}
BAD_TOKEN = {"error": "Invalid token id"}
END_CURSOR = "LTE="
LAST_TRADES_CAP = 500


def cursor_text(offset: int) -> str:
    return base64.b64encode(str(offset).encode()).decode()


class Clob:
    def __init__(self, exchange: Exchange):
        self.x = exchange

    def _open(self, token: str) -> tuple[Market, int] | None:
        hit = self.x.by_token.get(token)
        if hit is None or not hit[0].tradable(self.x.now_ms):
            return None
        return hit

    def _listed(self, m: Market) -> bool:
        return m.state != "pending" and m.created_ms <= self.x.now_ms

    def _too_many(self, n: int, cap: int | None = None) -> tuple[int, dict] | None:
        """The 400 answer for a batch request naming n ids when more than allowed are named, else None."""
        limit = self.x.opts.max_batch_ids if cap is None else min(cap, self.x.opts.max_batch_ids)
        return (400, {"error": f"too many token ids (max {limit})"}) if n > limit else None

    # -- books ---------------------------------------------------------------------------
    def book(self, q):
        token = q.get("token_id", "")
        if not token.isdigit():
            return 400, BAD_TOKEN
        hit = self._open(token)
        if hit is None:
            return 404, NO_BOOK
        return 200, self.x.book_summary(*hit)

    def books(self, body):
        if not isinstance(body, list):
            return 400, {"error": "Invalid payload"}
        too_many = self._too_many(len(body))
        if too_many:
            return too_many
        out = []
        for item in body:
            token = item.get("token_id") if isinstance(item, dict) else None
            hit = self._open(token) if isinstance(token, str) else None
            if hit is not None:
                out.append(self.x.book_summary(*hit))
        return 200, out

    # -- prices --------------------------------------------------------------------------
    def _side_price(self, token: str, side: str) -> str | None:
        hit = self._open(token)
        if hit is None:
            return None
        m, k = hit
        units = m.book.best_bid(k) if side == "BUY" else m.book.best_ask(k)
        return PRICE_TEXT[units] if units is not None else None

    def price(self, q):
        token, side = q.get("token_id", ""), q.get("side", "").upper()
        if not token.isdigit():
            return 400, BAD_TOKEN
        if side not in ("BUY", "SELL"):
            return 400, {"error": "Invalid side"}
        p = self._side_price(token, side)
        if p is None:
            return 404, NO_BOOK
        return 200, {"price": p}

    def prices(self, pairs: list[tuple[str, str]]):
        too_many = self._too_many(len(pairs))
        if too_many:
            return too_many
        out: dict = {}
        for token, side in pairs:
            p = self._side_price(token, side.upper())
            if p is not None:
                out.setdefault(token, {})[side.upper()] = p
        return 200, out

    def prices_get(self, q):
        tokens = [t for t in q.get("token_ids", "").split(",") if t]
        sides = [s for s in q.get("sides", "").split(",") if s]
        if not tokens or len(tokens) != len(sides):
            return 400, {"error": "token_ids and sides must be aligned comma lists"}
        return self.prices(list(zip(tokens, sides)))

    def prices_post(self, body):
        if not isinstance(body, list) or not all(
                isinstance(i, dict) and isinstance(i.get("token_id"), str) and i.get("side") in ("BUY", "SELL")
                for i in body):
            return 400, {"error": "Invalid payload"}
        return self.prices([(i["token_id"], i["side"]) for i in body])

    def _mid(self, token: str) -> str | None:
        hit = self._open(token)
        if hit is None:
            return None
        m, k = hit
        bb, ba = m.book.best_bid(k), m.book.best_ask(k)
        if bb is None or ba is None:
            return None
        return _half(bb + ba)

    def midpoint(self, q):
        token = q.get("token_id", "")
        if not token.isdigit():
            return 400, BAD_TOKEN
        mid = self._mid(token)
        if mid is None:
            return 404, NO_BOOK
        return 200, {"mid": mid}

    def midpoints(self, tokens: list[str]):
        too_many = self._too_many(len(tokens))
        if too_many:
            return too_many
        out = {}
        for t in tokens:
            mid = self._mid(t)
            if mid is not None:
                out[t] = mid
        return 200, out

    def _spread(self, token: str) -> str | None:
        hit = self._open(token)
        if hit is None:
            return None
        m, k = hit
        bb, ba = m.book.best_bid(k), m.book.best_ask(k)
        return PRICE_TEXT[ba - bb] if bb is not None and ba is not None else None

    def spread(self, q):
        token = q.get("token_id", "")
        if not token.isdigit():
            return 400, BAD_TOKEN
        s = self._spread(token)
        return (200, {"spread": s}) if s is not None else (404, NO_BOOK)

    def spreads(self, tokens: list[str]):
        too_many = self._too_many(len(tokens))
        if too_many:
            return too_many
        out = {}
        for t in tokens:
            s = self._spread(t)
            if s is not None:
                out[t] = s
        return 200, out

    def _last(self, token: str) -> tuple[str, str] | None:
        hit = self.x.by_token.get(token)
        if hit is None or not self._listed(hit[0]):
            return None
        last = hit[0].last_trade[hit[1]]
        return (PRICE_TEXT[last[0]], SIDE_TEXT[last[1]]) if last else ("0.5", "")

    def last_trade_price(self, q):
        token = q.get("token_id", "")
        if not token.isdigit():
            return 400, BAD_TOKEN
        last = self._last(token)
        if last is None:
            return 404, NO_BOOK
        return 200, {"price": last[0], "side": last[1]}

    def last_trades_prices(self, tokens: list[str]):
        too_many = self._too_many(len(tokens), LAST_TRADES_CAP)
        if too_many:
            return too_many
        out = []
        for t in tokens:
            last = self._last(t)
            if last is not None:
                out.append({"token_id": t, "price": last[0], "side": last[1]})
        return 200, out

    def tick_size(self, q):
        hit = self.x.by_token.get(q.get("token_id", ""))
        if hit is None or not self._listed(hit[0]):
            return 404, NO_BOOK
        return 200, {"minimum_tick_size": float(TICK_TEXT[hit[0].book.tick])}

    # -- listings --------------------------------------------------------------------------
    def market_row(self, m: Market) -> dict:
        """Full CLOB market row (numbers as JSON numbers, tokens with price and winner)."""
        mid = m.book.mid(0)
        if m.final_prices is not None:
            prices = [float(p) for p in m.final_prices]
        else:
            mid = m.proposal_mid if m.state == "proposed" else mid
            prices = [round((mid or ONE // 2) / ONE, 4), round(1 - (mid or ONE // 2) / ONE, 4)]
        return {
            "enable_order_book": m.state == "open", "active": True, "closed": m.closed,
            "archived": False, "accepting_orders": m.state == "open",
            "accepting_order_timestamp": iso_s(m.start_ms),
            "minimum_order_size": 5, "minimum_tick_size": float(TICK_TEXT[m.book.tick]),
            "condition_id": m.condition_id, "question_id": m.question_id, "question": m.question,
            "description": m.description, "market_slug": m.slug, "end_date_iso": iso_s(m.end_ms),
            "game_start_time": None, "seconds_delay": 0, "fpmm": "",
            "maker_base_fee": 0, "taker_base_fee": int(m.fee_rate_bps),
            "notifications_enabled": True, "neg_risk": m.event.neg_risk,
            "neg_risk_market_id": m.event.neg_risk_market_id, "neg_risk_request_id": "",
            "icon": f"https://polysim.invalid/{m.slug}.png", "image": f"https://polysim.invalid/{m.slug}.png",
            "rewards": {"rates": None, "min_size": 0, "max_spread": 0},
            "is_50_50_outcome": m.winner == -1,
            "tokens": [{"token_id": m.tokens[k], "outcome": m.outcomes[k], "price": prices[k],
                        "winner": m.winner == k} for k in (0, 1)],
            "tags": [t["label"] for t in m.tags],
        }

    def simplified_row(self, m: Market) -> dict:
        row = self.market_row(m)
        return {k: row[k] for k in ("condition_id", "rewards", "tokens", "active", "closed",
                                    "archived", "accepting_orders")}

    def list_markets(self, q, simplified: bool = False):
        cursor = q.get("next_cursor") or "MA=="
        if cursor == END_CURSOR:
            return 200, {"data": [], "next_cursor": END_CURSOR, "limit": self.x.opts.clob_page_size, "count": 0}
        try:
            offset = int(base64.b64decode(cursor.encode(), validate=True).decode())
            if offset < 0:
                raise ValueError(cursor)
        except ValueError:
            return 400, {"error": "invalid next_cursor"}
        listed = [m for m in self.x.markets if self._listed(m)]
        size = self.x.opts.clob_page_size
        page = listed[offset:offset + size]
        render = self.simplified_row if simplified else self.market_row
        end = offset + size >= len(listed)
        return 200, {"data": [render(m) for m in page],
                     "next_cursor": END_CURSOR if end else cursor_text(offset + size),
                     "limit": size, "count": len(page)}

    def one_market(self, condition_id: str):
        m = self.x.by_condition.get(condition_id)
        if m is None or not self._listed(m):
            return 404, {"error": "market not found"}
        return 200, self.market_row(m)

    def market_by_token(self, token: str):
        hit = self.x.by_token.get(token)
        if hit is None or not self._listed(hit[0]):
            return 404, {"error": "market not found"}
        m = hit[0]
        return 200, {"condition_id": m.condition_id, "primary_token_id": m.tokens[0],
                     "secondary_token_id": m.tokens[1]}


def _half(units2: int) -> str:
    """(bid + ask) / 2 as a decimal string; units2 is bid + ask in units of 0.0001."""
    if units2 % 2 == 0:
        return PRICE_TEXT[units2 // 2]
    return format(Decimal(units2) / 20_000, "f")
