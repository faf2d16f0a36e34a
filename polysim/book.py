"""Order book of one binary market, held once for the first token and mirrored.

Prices are integers in units of 0.0001 (so every allowed tick size, 0.1 down to
0.0001, is a whole number of units) and sizes are integers in cents. The second
token's book is the mirror of the first one: a bid at p on token 0 is an ask at
1 - p on token 1 for the same size, exactly as the real complementary books look
(polymarket-api.md §1.1). Keeping one book makes the two REST books and the WS
events of both tokens agree by construction.

Wire encodings (polymarket-api.md §3.1): decimal strings, bids ascending and asks
descending (best level LAST), `hash` = SHA-1 of the compact JSON of the summary
in wire field order with `hash` set to "".
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

ONE = 10_000  # price units in 1.0


def _price_text(units: int) -> str:
    text = format(Decimal(units) / ONE, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


# Every possible price, formatted once: the hot path (trades, book events) only indexes.
PRICE_TEXT: tuple[str, ...] = tuple(_price_text(u) for u in range(ONE + 1))


# The text of a size's cents after its whole part: "" for none, ".8" for 80, ".41" for 41.
_FRACTIONS = [""] + [f".{f // 10}" if f % 10 == 0 else f".{f:02d}" for f in range(1, 100)]


def size_text(cents: int) -> str:
    """Cents -> the exchange's size string: "2200.8", "100", "7429.41"."""
    return str(cents // 100) + _FRACTIONS[cents % 100]


# Every size a fill can have (at most 1000.00: Exchange._trade), formatted once as
# size_text() would, in ~10 ms.
SIZE_MAX = 100_000
SIZE_TEXT: tuple[str, ...] = tuple(w + f for w in map(str, range(SIZE_MAX // 100 + 1)) for f in _FRACTIONS)[:SIZE_MAX + 1]


def book_hash(summary: dict) -> str:
    """SHA-1 hex of the compact JSON of `summary` (wire field order) with hash "" (§3.1)."""
    body = dict(summary)
    body["hash"] = ""
    return hashlib.sha1(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


class _SideText:
    """The wire text of one side of token 0's book (`zero`) and of its mirror on token 1
    (`one`), made from the levels in `seen` (a copy of the side's dict); `best` is that
    side's best price (the last level in wire order), None when it is empty, and `cut0`,
    `cut1` where its level's text starts in `zero` and `one`."""

    __slots__ = ("seen", "zero", "one", "best", "cut0", "cut1")

    def __init__(self):
        self.seen: dict[int, int] | None = None
        self.zero = self.one = ""
        self.best: int | None = None
        self.cut0 = self.cut1 = 0

    def update(self, side: dict[int, int], descending: bool) -> bool:
        """Bring the texts up to date with `side`, a dict of {price: size}; False when
        they already were.

        In order: compare `side` with the saved copy (one C-level dict comparison: the
        side a trade did not touch, or a book read again, stops here). When only the
        best level's size differs (a partial fill, most trades), replace that level's
        text at the end of both texts. Otherwise sort the levels in wire order, format
        each for both tokens and join. Last, save a copy of `side`.
        """
        seen = self.seen
        if side == seen:
            return False
        price, best = PRICE_TEXT, self.best
        if best is not None and best in side and len(side) == len(seen):
            seen[best] = size = side[best]  # what seen would be if only the best level changed
            if side == seen:
                text = size_text(size)
                self.zero = f'{self.zero[:self.cut0]}{{"price":"{price[best]}","size":"{text}"}}'
                self.one = f'{self.one[:self.cut1]}{{"price":"{price[ONE - best]}","size":"{text}"}}'
                return True
        levels = [(p, size_text(s)) for p, s in sorted(side.items(), reverse=descending)]
        zero = [f'{{"price":"{price[p]}","size":"{s}"}}' for p, s in levels]
        one = [f'{{"price":"{price[ONE - p]}","size":"{s}"}}' for p, s in levels]
        self.zero, self.one = ",".join(zero), ",".join(one)
        self.best = levels[-1][0] if levels else None
        self.cut0 = len(self.zero) - len(zero[-1]) if levels else 0
        self.cut1 = len(self.one) - len(one[-1]) if levels else 0
        self.seen = dict(side)
        return True


class Book:
    """Levels of token 0: bids and asks as {price_units: size_cents}; best bid < best ask.

    The engine changes `bids` and `asks` in place (or replaces them); levels_texts()
    notices by comparing them with the copies its cached texts were made from.
    """

    __slots__ = ("bids", "asks", "tick", "_bid_text", "_ask_text", "_texts")

    def __init__(self, tick: int):
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.tick = tick
        self._bid_text = _SideText()
        self._ask_text = _SideText()
        self._texts = ("", "")  # what levels_texts() returned last

    # -- top of book, per token -------------------------------------------------
    def best_bid(self, token: int) -> int | None:
        """Best bid of token 0 or 1 in units (None when that side is empty)."""
        if token == 0:
            return max(self.bids) if self.bids else None
        return ONE - min(self.asks) if self.asks else None

    def best_ask(self, token: int) -> int | None:
        if token == 0:
            return min(self.asks) if self.asks else None
        return ONE - max(self.bids) if self.bids else None

    def top(self, token: int = 0) -> tuple[int | None, int | None]:
        """(best bid, best ask) of token 0 or 1, as (best_bid(token), best_ask(token)), from
        the best levels kept with the levels texts (brought up to date first: cheap when
        they are). Token 1's best bid is 1 - token 0's best ask, its best ask 1 - the best bid."""
        self.levels_texts()
        bid, ask = self._bid_text.best, self._ask_text.best
        if token == 0:
            return bid, ask
        return (ONE - ask if ask is not None else None), (ONE - bid if bid is not None else None)

    def mid(self, token: int) -> int | None:
        bid, ask = self.best_bid(token), self.best_ask(token)
        if bid is None or ask is None:
            return None
        return (bid + ask) // 2

    # -- wire -------------------------------------------------------------------
    def levels(self, token: int) -> tuple[list[dict], list[dict]]:
        """(bids ascending, asks descending) as [{price, size}] strings for token 0 or 1."""
        if token == 0:
            bids = sorted(self.bids.items())
            asks = sorted(self.asks.items(), reverse=True)
        else:
            bids = sorted(((ONE - p, s) for p, s in self.asks.items()))
            asks = sorted(((ONE - p, s) for p, s in self.bids.items()), reverse=True)
        return (
            [{"price": PRICE_TEXT[p], "size": size_text(s)} for p, s in bids],
            [{"price": PRICE_TEXT[p], "size": size_text(s)} for p, s in asks],
        )

    def levels_texts(self) -> tuple[str, str]:
        """The `"bids":[...],"asks":[...]` compact JSON of levels(0) and of levels(1).

        Token 0's bids (ascending) read in the same order are token 1's asks (descending
        at 1 - p), and its asks (descending) token 1's bids (ascending): each side is
        sorted and formatted once for both tokens, and only when it changed
        (_SideText.update; a trade changes one side); the pair is joined again only then
        (the same two strings otherwise).
        """
        bids, asks = self._bid_text, self._ask_text
        if bids.update(self.bids, descending=False) | asks.update(self.asks, descending=True):
            self._texts = (f'"bids":[{bids.zero}],"asks":[{asks.zero}]',
                           f'"bids":[{asks.one}],"asks":[{bids.one}]')
        return self._texts

    def level_size(self, token: int, side: str, price: int) -> int:
        """Current size in cents at `price` on `side` ('BUY' bids / 'SELL' asks) of a token."""
        if token == 1:
            price = ONE - price
            side = "SELL" if side == "BUY" else "BUY"
        levels = self.bids if side == "BUY" else self.asks
        return levels.get(price, 0)
