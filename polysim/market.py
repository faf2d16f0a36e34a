"""One simulated binary market: identity, lifecycle state, book, and its own RNG.

Every market draws from its own `random.Random` seeded with (seed, index), so
what happens to one market (its ids, question, initial book, the prices and sizes
of its trades) does not depend on what other markets did or on request timing.

Lifecycle (states are strings so the Gamma renderer can switch on them):
    pending  -> created, visible on Gamma and announced by `new_market`, but the
                CLOB answers 404 until `clob_ready_ms` (the real "new market"
                trap) and nothing trades.
    open     -> trades, book events.
    proposed -> closed: trading stopped, books gone (CLOB 404), Gamma shows
                closed=true, umaResolutionStatus "proposed", prices not final.
    resolved -> umaResolutionStatus "resolved", outcomePrices one-hot (or
                ["0.5","0.5"] for a void), WS `market_resolved` sent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from polysim.book import ONE, Book

DAY_MS = 86_400_000

SUBJECTS = (
    "Bitcoin", "Ethereum", "Solana", "the Fed", "NVIDIA", "Apple", "the ECB", "Tesla",
    "the S&P 500", "gold", "Real Madrid", "the Lakers", "Arsenal", "OpenAI", "SpaceX",
)
PREDICATES = (
    "close above its current level", "announce a rate cut", "hit a new all-time high",
    "win the next match", "release a new product", "beat analyst expectations",
    "trade below its 50-day average", "be up this week",
)
OUTCOME_SETS = (("Yes", "No"),) * 6 + (("Up", "Down"), ("Over", "Under"))
TAG_SETS = (
    [("2", "Politics", "politics")], [("21", "Crypto", "crypto")], [("1", "Sports", "sports")],
    [("120", "Finance", "finance")], [("596", "Culture", "pop-culture")],
)


@dataclass
class Event:
    """A Gamma event grouping one or more markets (neg-risk events group several)."""

    id: str
    slug: str
    title: str
    ticker: str
    neg_risk: bool
    neg_risk_market_id: str
    created_ms: int


@dataclass
class Market:
    """A binary market; tokens[i] is the outcome outcomes[i]; the book is token 0's."""

    index: int
    gamma_id: str
    condition_id: str
    question_id: str
    slug: str
    question: str
    description: str
    event: Event
    outcomes: tuple[str, str]
    tokens: tuple[str, str]
    tags: list
    fee_rate_bps: str
    created_ms: int
    start_ms: int
    end_ms: int
    clob_ready_ms: int
    book: Book
    rng: random.Random
    state: str = "open"
    updated_ms: int = 0
    closed_ms: int | None = None
    resolved_ms: int | None = None
    final_prices: tuple[str, str] | None = None
    winner: int | None = None  # index of the winning outcome, -1 for a void (50-50)
    volume_cents: int = 0
    last_trade: list = field(default_factory=lambda: [None, None])  # per token: (units, side)
    book_version: int = 0
    book_ms: int = 0  # time of the last book change (the book's `timestamp`; strictly increasing)
    rest_hashes: list = field(default_factory=lambda: [None, None])  # per token: (what it hashed, hash) (Exchange.rest_hash)
    top_sent: tuple | None = None  # last best bid/ask announced by best_bid_ask
    proposal_mid: int | None = None  # token 0 mid when trading stopped (Gamma's price while proposed)
    trade_head: tuple | None = None  # per token, the fixed start of its trade messages (Exchange._trade_heads)

    @property
    def closed(self) -> bool:
        return self.state in ("proposed", "resolved")

    def tradable(self, now_ms: int) -> bool:
        return self.state == "open" and now_ms >= self.clob_ready_ms


def hex256(rng: random.Random) -> str:
    return "0x" + format(rng.getrandbits(256), "064x")


def token_id(rng: random.Random) -> str:
    """A 77-78 digit decimal token id (unsigned 256-bit integer, as the CLOB sends it)."""
    return str(rng.randrange(10**76, 2**256))


def seed_book(rng: random.Random, tick: int, mid_hint: float | None = None) -> Book:
    """A plausible book: a mid away from the edges (or near mid_hint), 1-3 tick spread,
    6-15 levels a side."""
    book = Book(tick)
    lo, hi = 500 // tick + 1, (ONE - 500) // tick - 1
    if mid_hint is None:
        mid = rng.randint(lo, hi) * tick
    else:
        mid = min(max(round(mid_hint * ONE / tick), 2), ONE // tick - 2) * tick
    spread = rng.randint(1, 3) * tick
    bid = mid - spread // 2 // tick * tick
    ask = bid + spread
    price = bid
    for _ in range(rng.randint(6, 15)):
        if price < tick:
            break
        book.bids[price] = rng.randint(500, 5_000_000)
        price -= rng.randint(1, 3) * tick
    price = ask
    for _ in range(rng.randint(6, 15)):
        if price > ONE - tick:
            break
        book.asks[price] = rng.randint(500, 5_000_000)
        price += rng.randint(1, 3) * tick
    return book


def make_market(seed: int, index: int, gamma_id: int, event: Event | None,
                created_ms: int, clob_delay_ms: int, mid_hint: float | None = None) -> Market:
    """Build market `index` from its own RNG; `event` None means a fresh single-market event;
    mid_hint sets the initial Yes mid (neg-risk legs share one probability mass)."""
    rng = random.Random(f"polysim:{seed}:market:{index}")
    subject = rng.choice(SUBJECTS)
    predicate = rng.choice(PREDICATES)
    question = f"Will {subject} {predicate} (#{gamma_id})?"
    slug = f"{subject.lower().replace(' ', '-').replace('&', 'and')}-{predicate.split()[0]}-{gamma_id}"
    outcomes = rng.choice(OUTCOME_SETS)
    condition_id = hex256(rng)
    question_id = hex256(rng)
    tokens = (token_id(rng), token_id(rng))
    tags = [{"id": t[0], "label": t[1], "slug": t[2]} for t in rng.choice(TAG_SETS)]
    tick = 100 if rng.random() < 0.4 else 10
    if event is None:
        event = Event(id=str(gamma_id // 3 + 10_000), slug=slug, title=question, ticker=slug,
                      neg_risk=False, neg_risk_market_id="", created_ms=created_ms)
    start_ms = created_ms + rng.randint(60_000, 900_000)
    end_ms = created_ms + rng.randint(2, 200) * DAY_MS
    return Market(
        index=index, gamma_id=str(gamma_id), condition_id=condition_id, question_id=question_id,
        slug=slug, question=question,
        description=f'This market will resolve to "{outcomes[0]}" if {subject} will {predicate}. '
                    f'Otherwise, this market will resolve to "{outcomes[1]}".',
        event=event, outcomes=outcomes, tokens=tokens, tags=tags,
        fee_rate_bps="0" if rng.random() < 0.8 else "1000",
        created_ms=created_ms, start_ms=start_ms, end_ms=end_ms,
        clob_ready_ms=created_ms + clob_delay_ms, book=seed_book(rng, tick, mid_hint), rng=rng,
        updated_ms=created_ms, book_ms=created_ms,
    )
