"""Order-book snapshots from the CLOB: parse() and the orderbooks collector.

parse(payload) is pure: a `POST /books` array (or one `GET /book` object) ->
`orderbook_snapshots` rows. The exchange sends bids ascending and asks descending
(best level LAST, contrary to its docs) and neither order is promised, so levels
are sorted here: best first on both sides. Prices and sizes stay decimal text;
an empty side has NULL best price and zero depth; `timestamp` is epoch ms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from workers import payload as p
from workers.errors import PayloadError
from workers.polling import PollingWorker, answered_batches, utcnow

log = logging.getLogger(__name__)

TABLE = "orderbook_snapshots"
_ZERO, _ONE = Decimal(0), Decimal(1)
# Field order of OrderBookSummary: the exchange's hash covers the object in this order.
HASH_FIELDS = ("market", "asset_id", "timestamp", "hash", "bids", "asks", "min_order_size", "tick_size",
               "neg_risk", "last_trade_price")


def book_hash(obj: dict) -> str:
    """The exchange's book hash: SHA-1 of compact JSON of the summary with hash = ""."""
    body = {k: ("" if k == "hash" else obj[k]) for k in HASH_FIELDS if k in obj}
    return hashlib.sha1(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


def _level_values(raw_price: Any, raw_size: Any, side: str) -> tuple[Decimal, Decimal]:
    """(price, size) of one level, exact. Strings (what the CLOB sends) take a fast path."""
    if (type(raw_price) is str and type(raw_size) is str and len(raw_price) <= 40 and len(raw_size) <= 40
            and "e" not in raw_price and "E" not in raw_price and "e" not in raw_size and "E" not in raw_size):
        # short plain decimal text cannot exceed numeric's range: no range check needed
        try:
            price, size = Decimal(raw_price), Decimal(raw_size)
        except InvalidOperation:
            raise PayloadError(f"{side}: not a decimal: {raw_price[:20]!r} / {raw_size[:20]!r}") from None
        if not (price.is_finite() and size.is_finite()):
            raise PayloadError(f"{side}: not finite: {raw_price[:20]!r} / {raw_size[:20]!r}")
    else:
        price = p.decimal(raw_price, f"{side}.price", empty_ok=False)
        size = p.decimal(raw_size, f"{side}.size", empty_ok=False)
    if not (_ZERO <= price <= _ONE):
        raise PayloadError(f"{side}.price: outside [0, 1]: {price}")
    if size < 0:
        raise PayloadError(f"{side}: negative size {size}")
    return price, size


def _levels(value: Any, side: str) -> list[tuple[Decimal, Decimal, str, str]]:
    """[{price, size}, ...] -> [(price, size, price text, size text)] best first.

    Bids best = highest price, asks best = lowest. A zero-size level means no
    level (as on the WebSocket) and is dropped; a repeated price is malformed.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise PayloadError(f"{side}: expected an array")
    out = []
    seen = set()
    for level in value:
        if type(level) is dict:
            raw_price, raw_size = level.get("price"), level.get("size")
        elif isinstance(level, (list, tuple)) and len(level) == 2:
            raw_price, raw_size = level
        else:
            raise PayloadError(f"{side}: bad level {str(level)[:60]}")
        price, size = _level_values(raw_price, raw_size, side)
        if price in seen:
            raise PayloadError(f"{side}: price {price} listed twice")
        seen.add(price)
        if size == 0:
            continue
        out.append((price, size, format(price, "f"), format(size, "f")))
    out.sort(key=lambda lv: lv[0], reverse=(side == "bids"))
    return out


def parse_book(obj: Any, received_at: datetime | None = None) -> dict:
    """One OrderBookSummary -> one orderbook_snapshots row. Raises PayloadError."""
    if not isinstance(obj, dict):
        raise PayloadError(f"book: expected an object, got {type(obj).__name__}")
    token = p.token_id(obj.get("asset_id"), "asset_id")
    condition_id = p.ident(obj.get("market"), "market")
    ts = p.epoch_ms(obj.get("timestamp"))
    bids = _levels(obj.get("bids"), "bids")
    asks = _levels(obj.get("asks"), "asks")
    digest = obj.get("hash")
    if digest is None or digest == "":
        digest = book_hash(obj)  # keep the snapshot key (token, ts, hash) non-null and stable
    elif not isinstance(digest, str):
        raise PayloadError(f"hash: expected a string, got {type(digest).__name__}")
    else:
        digest = p.ident(digest, "hash")
    best_bid = bids[0][0] if bids else None
    best_ask = asks[0][0] if asks else None
    return {
        "token_id": token,
        "condition_id": condition_id,
        "ts": ts,
        "hash": digest,
        "best_bid": best_bid,
        "best_ask": best_ask,
        "spread": (best_ask - best_bid) if bids and asks else None,
        "bid_depth": sum((lv[1] for lv in bids), Decimal(0)),
        "ask_depth": sum((lv[1] for lv in asks), Decimal(0)),
        "bid_levels": len(bids),
        "ask_levels": len(asks),
        "bids": [[lv[2], lv[3]] for lv in bids],
        "asks": [[lv[2], lv[3]] for lv in asks],
        "received_at": received_at,
    }


def parse(payload: Any, received_at: datetime | None = None) -> p.Parsed:
    """A /books array or one /book object -> Parsed with orderbook_snapshots rows.

    A malformed book is skipped whole and counted; the others are kept. Two copies
    of one (token, ts, hash) in one payload become one row.
    """
    out = p.Parsed(rows={TABLE: []})
    if isinstance(payload, dict):
        payload = [payload]
    if not isinstance(payload, list):
        out.skip(f"payload: expected a JSON array, got {type(payload).__name__}")
        return out
    keys = set()
    for obj in payload:
        try:
            row = parse_book(obj, received_at)
        except PayloadError as err:
            asset = obj.get("asset_id") if isinstance(obj, dict) else None
            out.skip(f"book {str(asset)[:20]!r}: {err}")
            continue
        key = (row["token_id"], row["ts"], row["hash"])
        if key not in keys:
            keys.add(key)
            out.add(TABLE, row)
    return out


def levels_digest(row: dict) -> str:
    """A digest of a snapshot's levels. The exchange's hash covers its timestamp too,
    so it changes on every poll; two snapshots with equal levels are the same book."""
    return hashlib.sha1(json.dumps([row["bids"], row["asks"]], separators=(",", ":")).encode()).hexdigest()


class OrderbooksCollector(PollingWorker):
    """Every interval, a full book snapshot per followed token via POST /books.

    Per chunk of `batch` tokens one request (PollingWorker.batches(): a chunk the
    exchange refuses whole is split, a single token it refuses is skipped for the
    cycle); the answer is matched by asset_id (the exchange drops unknown ids and
    new markets 404 for a few minutes), so tokens absent from it are counted as
    missing, not failed. With skip_unchanged, a book whose levels equal the last
    one written for that token is not written again until unchanged_every
    seconds passed; each cycle's coverage (asked, received, written, unchanged,
    missing, malformed, batches, failed batches, split, rejected) is in the
    status counters.
    """

    OPTIONS = {
        **PollingWorker.OPTIONS,
        "interval": (float, 30.0),
        "batch": (int, 250),
        "skip_unchanged": (bool, True),
        "unchanged_every": (float, 300.0),
        "retention": (str, ""),
    }
    PARTITIONED_TABLES = ("orderbook_snapshots",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._last: dict[str, tuple[str, float]] = {}  # token -> (levels digest, monotonic time written)

    @property
    def clob(self) -> str:
        return self.urls.get("clob_url", "https://clob.polymarket.com").rstrip("/")

    def ask(self, chunk: list[str]) -> Any:
        """POST /books for one chunk of token ids; raises HttpError."""
        return self.client.post_json(f"{self.clob}/books", [{"token_id": t} for t in chunk])

    def cycle(self, figures: dict) -> None:
        """The followed tokens' books, chunk by chunk: parsed, matched to the chunk, changed ones written."""
        ids = [t.token_id for t in self.followed()]
        counts = dict.fromkeys(("received", "written", "unchanged", "missing", "malformed"), 0)
        for chunk, data in self.batches(ids, self.options["batch"], self.ask, figures):
            self._take(chunk, data, counts)
        if len(self._last) > 2 * len(ids) + 1000:  # forget tokens no longer followed
            followed = set(ids)
            self._last = {k: v for k, v in self._last.items() if k in followed}
        figures.update(tokens=len(ids), **counts, coverage=round(counts["received"] / len(ids), 4) if ids else None)
        if answered_batches(figures) or not ids:
            self.success()

    def _take(self, chunk: list[str], data: Any, counts: dict) -> None:
        """One chunk's answer: parsed (malformed books counted), matched by asset_id, changed books written."""
        parsed = parse(data, received_at=utcnow())
        if parsed.skipped:
            counts["malformed"] += parsed.skipped
            self.skipped("books", parsed)
        wanted = set(chunk)
        rows = [r for r in parsed.table(TABLE) if r["token_id"] in wanted]
        got = {r["token_id"] for r in rows}
        counts["received"] += len(got)
        counts["missing"] += len(wanted - got)
        keep = self._changed(rows)
        counts["unchanged"] += len(rows) - len(keep)
        counts["written"] += len(keep)
        self.writer.add(TABLE, keep)

    def _changed(self, rows: list[dict]) -> list[dict]:
        """The rows to write: all, or with skip_unchanged not those equal to the last book written for
        their token less than unchanged_every seconds ago."""
        now = time.monotonic()
        keep = []
        for row in rows:
            digest = levels_digest(row)
            last = self._last.get(row["token_id"])
            if (self.options["skip_unchanged"] and last is not None and last[0] == digest
                    and now - last[1] < self.options["unchanged_every"]):
                continue
            self._last[row["token_id"]] = (digest, now)
            keep.append(row)
        return keep
