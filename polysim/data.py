"""Data API (/data): v1 `/trades`, exactly the ledger's trades (polymarket-api.md §4.1).

Rows come newest first, `price`/`size` as JSON numbers and `timestamp` in epoch
seconds. `market` is a comma list of condition ids; `start`/`end` are inclusive
epoch seconds; `side` filters the taker side; `limit` defaults to 100 and is
clamped to 10 000; `offset` above 10 000 is a 400. Every trade is a taker fill,
so `takerOnly` changes nothing. Unknown parameters (an `asset` filter, for one)
are ignored as the real API ignores them.

Price floats: about one row in four carries the float-noise the real API shows
(0.71 -> 0.709999959-like values); round to the tick before matching.
"""

from __future__ import annotations

import hashlib

from polysim.exchange import Exchange
from polysim.ledger import SIDES, tx_hash

LIMIT_DEFAULT = 100
LIMIT_CAP = 10_000
OFFSET_CAP = 10_000


def price_float(units: int, i: int) -> float:
    """The Data API's float for a price; deterministic noise on a quarter of the rows."""
    p = units / 10_000
    if i % 4 == 3:
        return round(p - 4.1e-8, 9)
    return p


def size_float(cents: int):
    return cents // 100 if cents % 100 == 0 else cents / 100


class Data:
    def __init__(self, exchange: Exchange):
        self.x = exchange

    def row(self, i: int) -> dict:
        led = self.x.ledger
        m = self.x.markets[led.market[i]]
        k = led.token[i]
        wallet = hashlib.sha1(b"polysim:wallet:%d" % (i % 977)).hexdigest()
        return {
            "proxyWallet": "0x" + wallet, "side": SIDES[led.side[i]], "asset": m.tokens[k],
            "conditionId": m.condition_id, "size": size_float(led.size[i]),
            "price": price_float(led.price[i], i), "timestamp": led.ts[i] // 1000,
            "title": m.question, "slug": m.slug, "icon": f"https://polysim.invalid/{m.slug}.png",
            "eventSlug": m.event.slug, "outcome": m.outcomes[k], "outcomeIndex": k,
            "name": "trader" + wallet[:6], "pseudonym": "Sim-" + wallet[6:12], "bio": "",
            "profileImage": "", "profileImageOptimized": "",
            "transactionHash": tx_hash(self.x.seed, led.tx[i]),
        }

    def trades(self, q):
        """Matching ledger indices newest first, then offset/limit, rendered."""
        def num(name: str, default: int | None) -> int | None:
            value = q.get(name)
            if value is None or value == "":
                return default
            n = int(value)
            if n < 0:
                raise ValueError(name)
            return n

        try:
            limit = min(num("limit", LIMIT_DEFAULT), LIMIT_CAP)
            offset = num("offset", 0)
            start = num("start", None)
            end = num("end", None)
        except ValueError:
            return 400, {"error": "invalid query parameters"}
        if offset > OFFSET_CAP:
            return 400, {"error": f"offset must be <= {OFFSET_CAP}"}
        if "market" in q and "eventId" in q:
            return 400, {"error": "market and eventId cannot be combined"}
        side = q.get("side")
        side_code = None
        if side:
            if side.upper() not in SIDES:
                return 400, {"error": "invalid side"}
            side_code = SIDES.index(side.upper())
        led = self.x.ledger
        if q.get("market"):
            wanted = []
            for cid in q["market"].split(","):
                m = self.x.by_condition.get(cid.strip())
                if m is not None and m.index in led.by_market:
                    wanted.append(led.by_market[m.index])
            sources = wanted
        elif q.get("eventId"):
            ids = set(q["eventId"].split(","))
            sources = [led.by_market[m.index] for m in self.x.markets
                       if m.event.id in ids and m.index in led.by_market]
        else:
            sources = [range(len(led))]
        lo = None if start is None else start * 1000
        hi = None if end is None else end * 1000 + 999
        need = offset + limit
        picked: list[int] = []
        # Newest first: ledger indices are in publish order, which is time order up to the
        # timestamp jitter; sort the candidates by (timestamp, index) to be exact.
        ts = led.ts
        merged = sorted((i for src in sources for i in _tail_filter(src, led, lo, hi, side_code, need,
                                                                          self.x.opts.ts_jitter_ms)),
                        key=lambda i: (ts[i], i), reverse=True)
        picked = merged[offset:offset + limit]
        return 200, [self.row(i) for i in picked]


def _tail_filter(src, led, lo, hi, side_code, need: int, jitter: int):
    """The `need` newest indices (by timestamp) of one source inside [lo, hi] with the wanted side.

    Sources are in publish order, which is timestamp order up to `jitter` ms, so after
    `need` hits the scan goes on while a later-published trade could still be newer.
    """
    out = []
    ts, side = led.ts, led.side
    stop_below = None
    for j in range(len(src) - 1, -1, -1):
        i = src[j]
        t = ts[i]
        if stop_below is not None and t < stop_below:
            break
        if hi is not None and t > hi:
            continue
        if lo is not None and t < lo:
            if t < lo - jitter:
                break  # publish order is time order up to the jitter: nothing older can match
            continue
        if side_code is not None and side[i] != side_code:
            continue
        out.append(i)
        if len(out) == need:
            stop_below = min(ts[k] for k in out) - jitter
    return out
