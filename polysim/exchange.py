"""Exchange: the simulated exchange's state and its evolution over simulated time.

What "deterministic for a seed" means here:
  * The initial state (markets, ids, questions, books, resolved history) is a pure
    function of the options (seed included).
  * Evolution is a sequence of events on a simulated clock t (seconds since
    start). Each kind of event has its own stream and RNG (trades, book changes,
    closes, new markets); per-market details (token, side, size, price moves) come
    from the market's own RNG. The n-th event, its simulated time and its content
    therefore depend only on the options, never on wall-clock jitter, requests,
    subscriptions or faults.
  * The server releases events when wall-clock time reaches their simulated time
    (catching up in bounded bursts when it falls behind), and stamps them
    `epoch_ms + t`. With `--epoch-ms` fixed, timestamps are reproducible too;
    otherwise epoch is the wall clock at start, so timestamps track real time.
  * REST answers are a function of (options, number of events applied, active
    faults). Only the ledger's `published_ms` and which events a given WebSocket
    client happened to be subscribed for are wall-clock dependent.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
from typing import Protocol

from polysim.book import ONE, PRICE_TEXT, SIZE_TEXT, book_hash, size_text
from polysim.ledger import Ledger, TxHash
from polysim.market import DAY_MS, Event, Market, make_market
from polysim.options import Options

BUY, SELL = 0, 1
SIDE_TEXT = ("BUY", "SELL")
TICK_TEXT = {10_000: "1", 1000: "0.1", 100: "0.01", 10: "0.001", 1: "0.0001"}


class Sink(Protocol):
    """Where published WS messages go (the feed); `wants` lets us skip unsubscribed work."""

    def wants(self, asset: str) -> bool: ...

    def emit(self, assets: tuple[str, ...], text: str, custom_only: bool = False) -> None: ...

    def emit_global(self, text: str) -> None: ...


class NullSink:
    def wants(self, asset: str) -> bool:
        return False

    def emit(self, assets, text, custom_only=False) -> None:
        pass

    def emit_global(self, text) -> None:
        pass


def gamma_id_for(index: int) -> int:
    return 500_000 + index * 3 + 1


class Exchange:
    """Markets, books, ledger, and the event streams that change them."""

    def __init__(self, opts: Options, epoch_ms: int, sink: Sink | None = None):
        self.opts = opts
        self.seed = opts.seed
        self.epoch_ms = epoch_ms
        self.sink: Sink = sink or NullSink()
        self.t = 0.0
        self.now_ms = epoch_ms
        self.markets: list[Market] = []
        self.by_token: dict[str, tuple[Market, int]] = {}
        self.by_condition: dict[str, Market] = {}
        self.by_gamma: dict[str, Market] = {}
        self.by_event: dict[str, list[Market]] = {}
        self.tradable: list[Market] = []
        self.ledger = Ledger(opts.seed)
        self.tx_hash = TxHash(opts.seed)
        self.txno = 0
        self.events = 0  # events applied so far (the state's "version")
        self.pending: list[tuple[float, int, str, int]] = []  # (t, seq, kind, market index)
        self._seq = 0
        self._traded: set[int] = set()
        self._touched: set[int] = set()
        self.trade_books = opts.trade_book_updates
        self._build()
        self.trade_rng = random.Random(f"polysim:{self.seed}:trades")
        self.book_rng = random.Random(f"polysim:{self.seed}:books")
        self.close_rng = random.Random(f"polysim:{self.seed}:closes")
        self.new_rng = random.Random(f"polysim:{self.seed}:new")
        mean_fills = 1 + opts.multi_fill * 2  # 2-4 fills, mean 3, on a share multi_fill
        self.tx_rate = opts.trade_rate / mean_fills
        self.next_trade = self._draw(self.trade_rng, self.tx_rate)
        self.next_book = self._draw(self.book_rng, opts.book_rate)
        self.next_close = self._draw(self.close_rng, opts.resolve_rate)
        self.next_new = self._draw(self.new_rng, opts.new_market_rate)

    # -- construction -----------------------------------------------------------
    def _build(self) -> None:
        """Resolved history first (oldest ids), then the open markets (neg-risk triples among them)."""
        opts = self.opts
        layout = random.Random(f"polysim:{self.seed}:layout")
        for i in range(opts.history):
            created = self.epoch_ms - layout.randint(100, 400) * DAY_MS
            m = make_market(self.seed, i, gamma_id_for(i), None, created, 0)
            closed = self.epoch_ms - layout.randint(1, 90) * DAY_MS - layout.randint(0, DAY_MS)
            m.closed_ms = closed
            m.resolved_ms = closed + 2 * 3600_000
            m.end_ms = min(m.end_ms, closed)
            m.updated_ms = m.resolved_ms
            m.book.bids.clear()
            m.book.asks.clear()
            self._settle(m, layout)
            self._add(m)
        base = opts.history
        event = None
        leg_mids: list[float] = []
        for j in range(opts.markets):
            i = base + j
            created = self.epoch_ms - layout.randint(1, 60) * DAY_MS - layout.randint(0, DAY_MS)
            if j % 10 == 0 and j + 2 < opts.markets:
                gid = gamma_id_for(i)
                event = Event(id=str(90_000 + i), slug=f"neg-risk-event-{gid}",
                              title=f"Which outcome wins event {gid}?", ticker=f"neg-risk-event-{gid}",
                              neg_risk=True, neg_risk_market_id="0x" + hashlib.sha256(
                                  b"polysim:%d:nrm:%d" % (self.seed, i)).hexdigest(),
                              created_ms=created)
                # Exactly one leg resolves Yes: the legs' Yes prices start summing to about 1.
                weights = [layout.random() + 0.2 for _ in range(3)]
                leg_mids = [w / sum(weights) for w in weights]
            elif j % 10 == 3:
                event = None
            in_event = j % 10 < 3 and event is not None
            m = make_market(self.seed, i, gamma_id_for(i), event if in_event else None, created, 0,
                            leg_mids[j % 10] if in_event else None)
            if m.event.neg_risk:
                m.created_ms = m.event.created_ms
            m.book_ms = self.epoch_ms
            self._add(m)
            self.tradable.append(m)

    def _add(self, m: Market) -> None:
        self.markets.append(m)
        self.by_condition[m.condition_id] = m
        self.by_gamma[m.gamma_id] = m
        self.by_event.setdefault(m.event.id, []).append(m)
        for k, tok in enumerate(m.tokens):
            self.by_token[tok] = (m, k)

    def _settle(self, m: Market, rng: random.Random) -> None:
        """Decide the outcome: a 50-50 void with probability void_rate, else one-hot."""
        mid = m.book.mid(0)
        p_yes = (mid if mid is not None else ONE // 2) / ONE
        if rng.random() < self.opts.void_rate:
            m.winner, m.final_prices = -1, ("0.5", "0.5")
        else:
            m.winner = 0 if rng.random() < p_yes else 1
            m.final_prices = ("1", "0") if m.winner == 0 else ("0", "1")
        m.state = "resolved"

    @staticmethod
    def _draw(rng: random.Random, rate: float) -> float:
        return rng.expovariate(rate) if rate > 0 else float("inf")

    def _schedule(self, t: float, kind: str, index: int) -> None:
        self._seq += 1
        heapq.heappush(self.pending, (t, self._seq, kind, index))

    # -- the clock ----------------------------------------------------------------
    def advance(self, t_target: float, pub_ms: int, budget: int = 1 << 30) -> int:
        """Apply every event due by simulated time t_target (at most `budget`); returns how many.

        Events run in simulated-time order across the streams. Book refreshes and
        best_bid_ask messages for markets touched in this call are sent at the end
        (coalesced, as a busy exchange does).
        """
        done = 0
        while done < budget:
            t_pend = self.pending[0][0] if self.pending else float("inf")
            t_other = min(self.next_book, self.next_close, self.next_new, t_pend)
            if self.next_trade <= t_other:
                if self.next_trade > t_target:
                    break
                done += self._trades(min(t_other, t_target), pub_ms, budget - done)
                continue
            t_next = t_other
            if t_next > t_target:
                break
            self.t = t_next
            self.now_ms = self.epoch_ms + int(t_next * 1000)
            if t_next == self.next_book:
                self.next_book += self._draw(self.book_rng, self.opts.book_rate)
                if self.tradable:
                    self._book_change(self.tradable[self.book_rng.randrange(len(self.tradable))])
            elif t_next == t_pend:
                _, _, kind, index = heapq.heappop(self.pending)
                if kind == "resolve":
                    self._resolve(self.markets[index])
                elif kind == "ready":
                    self._ready(self.markets[index])
            elif t_next == self.next_close:
                self.next_close += self._draw(self.close_rng, self.opts.resolve_rate)
                if self.tradable:
                    self._close(self.tradable[self.close_rng.randrange(len(self.tradable))])
            else:
                self.next_new += self._draw(self.new_rng, self.opts.new_market_rate)
                self._new_market()
            self.events += 1
            done += 1
        if self._touched:
            self._flush_touched()
        if done < budget:
            self.t = max(self.t, t_target)
            self.now_ms = self.epoch_ms + int(self.t * 1000)
        return done

    # -- trades ---------------------------------------------------------------------
    def _trades(self, t_until: float, pub_ms: int, budget: int) -> int:
        """The run of transactions due by t_until (no other event comes before them; a
        trade wins a tie), at most `budget`; returns how many were applied."""
        rng, rate, tradable, epoch_ms, trade = self.trade_rng, self.tx_rate, self.tradable, self.epoch_ms, self._trade
        t = self.next_trade
        done = 0
        while t <= t_until and done < budget:
            self.t = t
            self.now_ms = epoch_ms + int(t * 1000)
            t += rng.expovariate(rate)  # rate > 0, else next_trade would be inf
            if tradable:
                # int(random() * n) rather than randrange(n): a third of the cost on the hot path.
                trade(tradable[int(rng.random() * len(tradable))], pub_ms)
            done += 1
        self.next_trade = t
        self.events += done
        return done

    def _trade(self, m: Market, pub_ms: int) -> None:
        """One transaction of 1-4 taker fills on one token; fills consume the best level(s).

        The hot path of the engine (one call per transaction): the message text is the
        market's per-token prefix (ids and fee, formatted once per market) plus the
        fill's price and size plus the transaction's tail (side, time, hash).
        """
        rng = m.rng
        book = m.book
        token = rng.getrandbits(1)
        side = rng.getrandbits(1)
        # Token 0 BUY and token 1 SELL take token 0's asks; the other two take its bids.
        takes_asks = (token == 0) == (side == BUY)
        levels = book.asks if takes_asks else book.bids
        # Book events go to the subscribers of either token: the levels a trade changes are
        # noted only when someone will be told (the engine's hot path otherwise), and only
        # with trade_book_updates (off: a trades-only feed, as `bench polysim_rate` runs it).
        tok = m.tokens[token]
        emit = self.sink.emit if self.sink.wants(tok) else None
        touched = [] if self.trade_books and (
            emit is not None or self.sink.wants(m.tokens[1 - token])) else None
        if not levels:
            added = self._replenish(m, asks=takes_asks)
            if not levels:
                return
            if touched is not None:
                touched += added
        nfills = rng.randint(2, 4) if rng.random() < self.opts.multi_fill else 1
        self.txno += 1
        txno = self.txno
        ts = self.now_ms
        if self.opts.ts_jitter_ms:
            ts -= rng.randint(0, self.opts.ts_jitter_ms)
        if emit is not None:
            head = m.trade_head[token] if m.trade_head else self._trade_heads(m)[token]
            tail = (f'","fee_rate_bps":"{m.fee_rate_bps}","side":"{SIDE_TEXT[side]}","timestamp":"{ts}"'
                    f',"event_type":"last_trade_price","transaction_hash":"{self.tx_hash(txno)}"}}')
            assets = (tok,)
        append = self.ledger.append
        index = m.index
        size = 0
        for k in range(nfills):
            if not levels:
                break
            p0 = min(levels) if takes_asks else max(levels)
            avail = levels[p0]
            if k == 0 or rng.random() < 0.5 or size > avail:
                # min(100 + int(random() * max(1, min(avail, 100_000) - 99)), avail), without the calls
                span = (avail if avail < 100_000 else 100_000) - 99
                size = 100 + int(rng.random() * (span if span > 1 else 1))
                if size > avail:
                    size = avail
            # else: an exact repeat of the previous fill's price, size and side
            left = avail - size
            if touched is not None:
                touched.append(p0)
            if left > 0:
                levels[p0] = left
            else:
                del levels[p0]
            price = p0 if token == 0 else ONE - p0
            append(index, token, price, size, side, ts, txno, pub_ms)
            m.volume_cents += size * price // ONE
            if emit is not None:
                emit(assets, f'{head}{PRICE_TEXT[price]}","size":"{SIZE_TEXT[size]}{tail}')
        m.last_trade[token] = (price, side)
        m.updated_ms = ts
        if len(levels) < 3:
            added = self._replenish(m, asks=takes_asks)
            if touched is not None:
                touched += added
        m.book_version += 1  # self._changed(m), inline on the hot path
        ms = self.now_ms
        m.book_ms = ms if ms > m.book_ms else m.book_ms + 1
        self._traded.add(m.index)
        self._touched.add(m.index)
        if touched is not None:
            self._price_change(m, takes_asks, touched)

    @staticmethod
    def _trade_heads(m: Market) -> tuple[str, str]:
        """The fixed start of a market's `last_trade_price` texts, per token (up to the price)."""
        m.trade_head = tuple('{"market":"%s","asset_id":"%s","price":"' % (m.condition_id, tok) for tok in m.tokens)
        return m.trade_head

    def _changed(self, m: Market) -> None:
        """m's book changed now: a new version, stamped strictly after the one before (so a
        book's `timestamp` names one state: the REST book sampled at T is the book rebuilt
        from the events stamped up to T; under more than 1,000 changes a second on one
        market the stamps run ahead of the clock by as many milliseconds)."""
        m.book_version += 1
        ms = self.now_ms
        m.book_ms = ms if ms > m.book_ms else m.book_ms + 1

    def _replenish(self, m: Market, asks: bool) -> list[int]:
        """Add up to 3 levels behind the worst level of one side (never crossing the other side);
        returns their prices."""
        book, rng, tick = m.book, m.rng, m.book.tick
        added = []
        for _ in range(3):
            if asks:
                if book.asks:
                    p = max(book.asks) + rng.randint(1, 3) * tick
                else:
                    p = (max(book.bids) + tick) if book.bids else ONE // 2
                if p > ONE - tick:
                    return added
                book.asks[p] = rng.randint(500, 2_000_000)
            else:
                if book.bids:
                    p = min(book.bids) - rng.randint(1, 3) * tick
                else:
                    p = (min(book.asks) - tick) if book.asks else ONE // 2 - tick
                if p < tick:
                    return added
                book.bids[p] = rng.randint(500, 2_000_000)
            added.append(p)
        return added

    # -- book changes -----------------------------------------------------------------
    def _book_change(self, m: Market) -> None:
        """Place, resize or cancel one level; announce it as a `price_change` for both tokens."""
        book, rng, tick = m.book, m.rng, m.book.tick
        bid_side = rng.getrandbits(1) == 0
        levels = book.bids if bid_side else book.asks
        action = rng.random()
        if action < 0.35 or not levels:
            best_bid = max(book.bids) if book.bids else None
            best_ask = min(book.asks) if book.asks else None
            if bid_side:
                top = best_bid if best_bid is not None else (best_ask or ONE // 2) - tick
                p = top + tick if rng.random() < 0.4 else top - rng.randint(0, 8) * tick
                if best_ask is not None and p >= best_ask:
                    p = best_ask - tick
            else:
                top = best_ask if best_ask is not None else (best_bid or ONE // 2) + tick
                p = top - tick if rng.random() < 0.4 else top + rng.randint(0, 8) * tick
                if best_bid is not None and p <= best_bid:
                    p = best_bid + tick
            if p < tick or p > ONE - tick:
                return
            size = rng.randint(500, 2_000_000)
            levels[p] = size
        elif action < 0.75 or len(levels) <= 3:
            p = rng.choice(list(levels))
            size = rng.randint(500, 2_000_000)
            levels[p] = size
        else:
            p = rng.choice(list(levels))
            del levels[p]
        self._changed(m)
        self._touched.add(m.index)
        if book.tick == 100:
            bb, ba = book.best_bid(0), book.best_ask(0)
            if (bb is not None and bb < 400) or (ba is not None and ba > 9600):
                self._tick_change(m, 10)
        t0, t1 = m.tokens
        if self.sink.wants(t0) or self.sink.wants(t1):
            self._price_change(m, not bid_side, (p,))

    def _price_change(self, m: Market, asks: bool, prices) -> None:
        """Announce levels of one side of token 0's book (their sizes now; "0": gone) and their
        mirrors on token 1 as one `price_change`, stamped with the book's time; each token's
        entries carry the hash of its REST book now (what /clob/book answers until the next
        change), best bid and best ask."""
        book = m.book
        levels = book.asks if asks else book.bids
        cid, (t0, t1) = m.condition_id, m.tokens
        entries = []
        texts = book.levels_texts()
        for token, tok in ((0, t0), (1, t1)):
            h = self.rest_hash(m, token, texts[token])
            bb, ba = book.top(token)
            tail = (f'","hash":"{h}","best_bid":"{PRICE_TEXT[bb] if bb is not None else "0"}",'
                    f'"best_ask":"{PRICE_TEXT[ba] if ba is not None else "0"}"}}')
            # Token 0's asks are token 1's bids at 1 - p.
            side = "SELL" if asks == (token == 0) else "BUY"
            for p in dict.fromkeys(prices):
                entries.append(f'{{"asset_id":"{tok}","price":"{PRICE_TEXT[p if token == 0 else ONE - p]}",'
                               f'"size":"{size_text(levels.get(p, 0))}","side":"{side}{tail}')
        self.sink.emit(m.tokens, f'{{"market":"{cid}","price_changes":[{",".join(entries)}],'
                                 f'"timestamp":"{m.book_ms}","event_type":"price_change"}}')

    def _tick_change(self, m: Market, new_tick: int) -> None:
        old = m.book.tick
        m.book.tick = new_tick
        for tok in m.tokens:
            if self.sink.wants(tok):
                self.sink.emit((tok,), json.dumps({
                    "event_type": "tick_size_change", "asset_id": tok, "market": m.condition_id,
                    "old_tick_size": TICK_TEXT[old], "new_tick_size": TICK_TEXT[new_tick],
                    "timestamp": str(m.book_ms)}, separators=(",", ":")))

    def _flush_touched(self) -> None:
        """Coalesced per advance(): `book` after trades, `best_bid_ask` when the top moved."""
        for index in sorted(self._touched):
            m = self.markets[index]
            if m.state != "open":
                continue
            book = m.book
            top = book.top()
            if index in self._traded and self.opts.trade_book_updates:
                for k, tok in enumerate(m.tokens):
                    if self.sink.wants(tok):
                        self.sink.emit((tok,), self.book_text(m, k, initial=False))
            if top != m.top_sent:
                m.top_sent = top
                for k, tok in enumerate(m.tokens):
                    if self.sink.wants(tok):
                        bb, ba = book.top(k)
                        # Compact JSON of plain strings, formatted directly (one per touched token).
                        self.sink.emit((tok,), (
                            f'{{"market":"{m.condition_id}","asset_id":"{tok}",'
                            f'"best_bid":"{PRICE_TEXT[bb] if bb is not None else "0"}",'
                            f'"best_ask":"{PRICE_TEXT[ba] if ba is not None else "0"}",'
                            f'"spread":"{PRICE_TEXT[ba - bb] if bb is not None and ba is not None else "0"}",'
                            f'"timestamp":"{self.now_ms}","event_type":"best_bid_ask"}}'), custom_only=True)
        self._touched.clear()
        self._traded.clear()

    # -- lifecycle ------------------------------------------------------------------------
    def _close(self, m: Market) -> None:
        """Trading stops: books removed, Gamma closed + proposed; resolution scheduled."""
        m.state = "proposed"
        m.closed_ms = self.now_ms
        m.updated_ms = self.now_ms
        mid = m.book.mid(0)
        m.final_prices = None
        m.proposal_mid = mid if mid is not None else ONE // 2
        self.tradable.remove(m)
        self._schedule(self.t + self.opts.resolve_delay, "resolve", m.index)

    def _resolve(self, m: Market) -> None:
        self._settle(m, m.rng)
        m.resolved_ms = self.now_ms
        m.updated_ms = self.now_ms
        m.book.bids.clear()
        m.book.asks.clear()
        m.book_version += 1
        winner = "" if m.winner == -1 else m.tokens[m.winner]
        outcome = "" if m.winner == -1 else m.outcomes[m.winner]
        self.sink.emit_global(json.dumps({
            "event_type": "market_resolved", "id": m.gamma_id, "market": m.condition_id,
            "assets_ids": list(m.tokens), "winning_asset_id": winner, "winning_outcome": outcome,
            "timestamp": str(self.now_ms), "tags": [t["label"].lower() for t in m.tags],
        }, separators=(",", ":")))

    def _new_market(self) -> None:
        """A market appears: on Gamma and `new_market` now, on the CLOB after clob_delay."""
        i = len(self.markets)
        m = make_market(self.seed, i, gamma_id_for(i), None, self.now_ms,
                        int(self.opts.clob_delay * 1000))
        m.start_ms = self.now_ms
        m.state = "pending"
        self._add(m)
        self._schedule(self.t + self.opts.clob_delay, "ready", i)
        self.sink.emit_global(json.dumps({
            "event_type": "new_market", "id": m.gamma_id, "question": m.question,
            "market": m.condition_id, "slug": m.slug, "description": m.description,
            "assets_ids": list(m.tokens), "outcomes": list(m.outcomes),
            "event_message": {"id": m.event.id, "ticker": m.event.ticker, "slug": m.event.slug,
                              "title": m.event.title, "description": m.description},
            "timestamp": str(self.now_ms), "tags": [t["label"].lower() for t in m.tags],
            "condition_id": m.condition_id, "active": True, "clob_token_ids": list(m.tokens),
            "sports_market_type": "", "line": "", "game_start_time": "",
            "order_price_min_tick_size": TICK_TEXT[m.book.tick], "group_item_title": "",
        }, separators=(",", ":")))

    def _ready(self, m: Market) -> None:
        if m.state == "pending":
            m.state = "open"
            m.updated_ms = self.now_ms
            self.tradable.append(m)

    def rest_hash(self, m: Market, token: int, levels: str) -> str:
        """The hash of the REST book (book_summary) now, from its levels text: SHA-1 of the
        compact summary with hash "" (polymarket-api.md §3.1). A WS `book` and each
        `price_change` entry carry this same hash: the recorded WS book's hash verifies
        only as the REST summary's, min_order_size and neg_risk included.

        The hash is kept per token with what it was made from (levels text, book time,
        tick, last trade): a trade's `price_change` and the `book` refresh after it hash
        the same summary once.
        """
        last = m.last_trade[token]
        key = (levels, m.book_ms, m.book.tick, last)
        saved = m.rest_hashes[token]
        if saved is not None and saved[0] == key:
            return saved[1]
        text = (f'{{"market":"{m.condition_id}","asset_id":"{m.tokens[token]}","timestamp":"{m.book_ms}",'
                f'"hash":"",{levels},"min_order_size":"5","tick_size":"{TICK_TEXT[m.book.tick]}",'
                f'"neg_risk":{"true" if m.event.neg_risk else "false"},'
                f'"last_trade_price":"{PRICE_TEXT[last[0]] if last else ""}"}}')
        h = hashlib.sha1(text.encode()).hexdigest()
        m.rest_hashes[token] = (key, h)
        return h

    def book_text(self, m: Market, token: int, initial: bool) -> str:
        """json.dumps(book_summary(m, token, ws=True, initial), compact), formatted directly."""
        last = m.last_trade[token]
        extra = (f',"tick_size":"{TICK_TEXT[m.book.tick]}","last_trade_price":"{PRICE_TEXT[last[0]] if last else ""}"'
                 if initial else "")
        levels = m.book.levels_texts()[token]
        return (f'{{"market":"{m.condition_id}","asset_id":"{m.tokens[token]}","timestamp":"{m.book_ms}",'
                f'"hash":"{self.rest_hash(m, token, levels)}",{levels}{extra},"event_type":"book"}}')

    # -- views used by the REST surfaces ----------------------------------------------------
    def book_summary(self, m: Market, token: int, ws: bool = False, initial: bool = True) -> dict:
        """OrderBookSummary (REST field order) or a WS `book` message, which carries the
        REST summary's hash (§3.1; the recorded WS books verify only that way)."""
        bids, asks = m.book.levels(token)
        tok = m.tokens[token]
        last = m.last_trade[token]
        if not ws:
            out = {"market": m.condition_id, "asset_id": tok, "timestamp": str(m.book_ms),
                   "hash": "", "bids": bids, "asks": asks, "min_order_size": "5",
                   "tick_size": TICK_TEXT[m.book.tick], "neg_risk": m.event.neg_risk,
                   "last_trade_price": PRICE_TEXT[last[0]] if last else ""}
            out["hash"] = book_hash(out)
            return out
        out = {"market": m.condition_id, "asset_id": tok, "timestamp": str(m.book_ms),
               "hash": self.book_summary(m, token)["hash"], "bids": bids, "asks": asks}
        if initial:
            out["tick_size"] = TICK_TEXT[m.book.tick]
            out["last_trade_price"] = PRICE_TEXT[last[0]] if last else ""
        out["event_type"] = "book"
        return out
