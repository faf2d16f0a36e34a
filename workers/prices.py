"""Price snapshots from the CLOB batch endpoints: parse() and the prices collector.

Three batch answers make one snapshot per token (polymarket-api.md §3.3):
- POST /prices [{token_id, side}] -> {"<token>": {"BUY": "0.45", "SELL": "0.46"}};
  BUY is the best bid and SELL the best ask (the docs; one live sample agrees).
- POST /midpoints [{token_id}] -> {"<token>": "0.455"} (a {"mid"|"mid_price": v}
  object per token is accepted too).
- POST /last-trades-prices [{token_id}] -> [{"token_id", "price", "side"}].
Values are strings on the live API and numbers in the 2026 OpenAPI: both become
Decimal. "0" means no quote (no CLOB price is 0) and a last trade with an empty
side is the exchange's "never traded" default (price "0.5"): both become NULL.
"""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal
from typing import Any, Iterable

from workers import payload as p
from workers.errors import PayloadError
from workers.polling import PollingWorker, answered_batches, utcnow

log = logging.getLogger(__name__)

TABLE = "price_snapshots"


def _quote(value: Any, name: str) -> Decimal | None:
    out = p.price(value, name)
    return None if out is not None and out == 0 else out


def _mid(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("mid", value.get("mid_price"))
    return value


def _last_trades(payload: Any) -> dict[str, Any]:
    """Normalise /last-trades-prices to {token: {price, side}} (a list or a map)."""
    if payload is None:
        return {}
    if isinstance(payload, dict):
        return {str(k): v for k, v in payload.items()}
    if isinstance(payload, list):
        out = {}
        for item in payload:
            if isinstance(item, dict) and item.get("token_id") is not None:
                out[str(item["token_id"])] = item
        return out
    raise PayloadError(f"last-trades-prices: expected an array, got {type(payload).__name__}")


def parse(prices: Any = None, midpoints: Any = None, last_trades: Any = None, *,
          tokens: Iterable[str] | None = None, ts: datetime, received_at: datetime | None = None) -> p.Parsed:
    """The three batch answers -> Parsed with one price_snapshots row per token.

    tokens limits the rows to the tokens asked for (an answer may add or drop
    ids); without it every token any answer names gets a row. ts is the cycle's
    time (these endpoints carry none): one ts per cycle, so (token_id, ts) is the
    snapshot's key. A token with a bad value is skipped whole; a token that no
    answer mentions gets no row.
    """
    out = p.Parsed(rows={TABLE: []})
    for name, value, kind in (("prices", prices, dict), ("midpoints", midpoints, dict)):
        if value is not None and not isinstance(value, kind):
            out.skip(f"{name}: expected an object, got {type(value).__name__}")
            return out
    try:
        trades = _last_trades(last_trades)
    except PayloadError as err:
        out.skip(str(err))
        return out
    prices = prices or {}
    midpoints = midpoints or {}
    wanted = list(dict.fromkeys(tokens)) if tokens is not None else list(
        dict.fromkeys([*prices.keys(), *midpoints.keys(), *trades.keys()]))
    for token in wanted:
        if token not in prices and token not in midpoints and token not in trades:
            continue
        try:
            tid = p.token_id(token)
            sides = prices.get(token) or {}
            if not isinstance(sides, dict):
                raise PayloadError(f"prices[{tid[:12]}]: expected an object")
            last = trades.get(token)
            last_price = None
            if last is not None:
                if not isinstance(last, dict):
                    raise PayloadError("last trade: expected an object")
                last_price = _quote(last.get("price"), "last_trade_price")
                if not last.get("side"):
                    last_price = None  # the "never traded" default, not a trade
            row = {
                "token_id": tid,
                "ts": ts,
                "best_bid": _quote(sides.get("BUY"), "BUY"),
                "best_ask": _quote(sides.get("SELL"), "SELL"),
                "mid": _quote(_mid(midpoints.get(token)), "mid"),
                "last_trade_price": last_price,
                "received_at": received_at,
            }
        except PayloadError as err:
            out.skip(f"token {str(token)[:20]}: {err}")
            continue
        out.add(TABLE, row)
    return out


class PricesCollector(PollingWorker):
    """Every interval, one price snapshot per followed token from the batch endpoints.

    Per chunk of `batch` tokens: POST /prices (BUY and SELL per token), POST
    /midpoints, POST /last-trades-prices -- three requests per chunk, so 10,000
    tokens take 120 requests at batch = 250. A chunk refused whole by any of the
    three is split (PollingWorker.batches(); a single token still refused is
    skipped for the cycle and counted in rejected). A chunk whose request fails
    otherwise yields no rows (a snapshot is never assembled from a partial set
    of answers) and is counted in failed_batches. All rows of one cycle share
    its start time as `ts`.
    """

    OPTIONS = {**PollingWorker.OPTIONS, "interval": (float, 10.0), "batch": (int, 250), "retention": (str, "")}
    PARTITIONED_TABLES = ("price_snapshots",)

    @property
    def clob(self) -> str:
        return self.urls.get("clob_url", "https://clob.polymarket.com").rstrip("/")

    def ask(self, chunk: list[str]) -> tuple[Any, Any, Any]:
        """POST /prices, /midpoints, /last-trades-prices for one chunk, a checkpoint between; raises HttpError."""
        quotes = self.client.post_json(f"{self.clob}/prices",
                                       [{"token_id": t, "side": s} for t in chunk for s in ("BUY", "SELL")])
        self.checkpoint()
        mids = self.client.post_json(f"{self.clob}/midpoints", [{"token_id": t} for t in chunk])
        self.checkpoint()
        last = self.client.post_json(f"{self.clob}/last-trades-prices", [{"token_id": t} for t in chunk])
        return quotes, mids, last

    def cycle(self, figures: dict) -> None:
        """The followed tokens' snapshots, chunk by chunk, all stamped with the cycle's start time."""
        followed = {t.token_id: t for t in self.followed()}
        ids = list(followed)
        ts = utcnow()
        counts = dict.fromkeys(("rows", "missing", "malformed", "crossed"), 0)
        for chunk, answers in self.batches(ids, self.options["batch"], self.ask, figures):
            rows = self._take(chunk, answers, ts, counts)
            for row in rows:
                row["condition_id"] = followed[row["token_id"]].condition_id
            self.writer.add(TABLE, rows)
        crossed = counts.pop("crossed")
        figures.update(tokens=len(ids), **counts)
        if crossed:
            figures["crossed"] = crossed
            log.warning("%s: %d snapshot(s) with best bid above best ask", self.name, crossed)
        if answered_batches(figures) or not ids:
            self.success()

    def _take(self, chunk: list[str], answers: tuple[Any, Any, Any], ts: datetime, counts: dict) -> list[dict]:
        """One chunk's three answers -> its rows; malformed, missing and crossed snapshots counted."""
        parsed = parse(*answers, tokens=chunk, ts=ts, received_at=utcnow())
        if parsed.skipped:
            counts["malformed"] += parsed.skipped
            self.skipped("prices", parsed)
        rows = parsed.table(TABLE)
        # crossed would mean BUY/SELL are the other way round on this deploy
        counts["crossed"] += sum(1 for r in rows if r["best_bid"] is not None and r["best_ask"] is not None
                                 and r["best_bid"] > r["best_ask"])
        counts["rows"] += len(rows)
        counts["missing"] += len(chunk) - len(rows) - parsed.skipped
        return rows
