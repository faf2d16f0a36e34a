"""The trade listener: every trade of the followed tokens, exactly once.

TradesCollector holds market-channel WebSockets (workers/feed.py) for the followed
tokens of its shard, writes each `last_trade_price` as a `trades` row through the
batching Writer, and records every interval in which a token may have missed trades
in `feed_gaps`, then backfills it from the Data API (workers/backfill.py).

The exchange replays nothing, sends no sequence numbers and no trade ids, so
"exactly once" rests on two things:

1. The trade key (token_id, tx_hash, price, size, side, ordinal), where `ordinal`
   numbers exact repeats inside one transaction: two fills of one transaction can be
   identical in every field, and both are real.

   Why a backfilled trade meets its live twin, even when a transaction's fills
   straddle a disconnect or a restart: exact repeats are indistinguishable, so what
   matters about their ordinals is only *how many* distinct ordinals each source
   uses, not which fill gets which. Both sources number a group of k identical
   fills 0..j-1 for the j fills they saw:
     - live: per process, in arrival order (`Ordinals`, kept 2-4 minutes). It sees
       j <= k of them (some may fall in a gap), so its ordinals are a prefix of 0..k-1.
       After a restart its counter starts again at 0 and may re-use an ordinal
       already stored: that row is then dropped by ON CONFLICT although it is a
       real fill (an under-count), which only the backfill can repair;
     - backfill: numbers over ALL fills of every transaction it fetched
       (`number_repeats`), i.e. exactly 0..k-1, provided it fetched the whole
       transaction. It does: all fills of one transaction carry the same block
       timestamp in the Data API, a gap window is widened by `backfill_margin` on
       both sides (plus `backfill_settle` after it: block time trails match time)
       and fetched in whole seconds for the entire market (not just the gap's
       token), so a transaction whose fills straddle a gap boundary has its
       timestamp inside the window and all of its fills come back. Pages are cut
       by time, never by offset, and fetched only once the window is in the past:
       an offset page that repeats a row (rows arriving shift newest-first offsets)
       would look exactly like one more repeat and be stored twice.
   The union stored is then exactly 0..k-1: k rows, none twice. A restart is always
   a gap (see 2), so every place where live numbering restarts is backfilled over
   whole transactions. What this cannot repair is a Data API that has not indexed a
   fill yet when the backfill runs: hence `backfill_delay` after the gap's end.
   Prices/sizes are compared as canonical decimal text on both sides (the parser and
   the backfill produce the same text for the same value), ts stays out of the key
   (ms live, s backfilled; the first writer's ts wins).

2. Coverage. A token is covered while it is subscribed on a healthy socket. Every
   moment outside that is a gap: before its first subscribe (from its coverage mark
   in `feed_coverage`, else its newest stored trade, else `followed_tokens.since`),
   a dropped socket, a stall or a withheld PONG, a process restart or kill -9, and
   a token newly followed while running. A gap opened by a socket or a restart
   starts where the socket's vouching ends: at the newest *exchange* timestamp read
   from it, capped by its last data (workers.ws.Rx.vouched), never at the time we
   read it; a loop lagging behind the exchange has messages published before its
   last read still unread, and a drop or kill -9 loses them. The coverage mark is
   the same time; it is a row queued in the Writer behind the rows received before
   it, so it is durable only with or after them (workers/storage/tables.py,
   FEED_COVERAGE). Messages read just before a socket broke are handled, not dropped.
   A gap row is written when it opens (ended_at NULL) and again when it closes and
   when it is recovered (feed_gaps merges on (token_id, started_at)).

3. Ownership. Every open gap (feed_gaps rows neither recovered nor unrecoverable)
   belongs to the process whose shard its market hashes to (`shard_of`), whether or
   not anyone still follows its token, whoever opened it: an earlier process, an
   earlier run, a run with another shard count. At start and on every refresh each
   process adopts the open gaps it owns and does not hold yet (`_adopt`): one of a
   followed token that has not gone live here yet waits for its first subscription
   (it is closed there, with the token's first gap); any other is closed now (at its
   recorded end, else now) and queued for backfill. A gap ends recovered or, when
   the Data API refuses its market for good or no market is known, unrecoverable
   with a reason (workers/backfill.py); adopting again what another process is
   still closing is harmless: keys are idempotent, and the feed_gaps merge only lets
   a recovery count for the end it was fetched for (workers/storage/tables.py).
   A token that leaves the followed set still owes what lies after its coverage
   mark (published before it was dropped, delivered by no socket: the last moments
   before a stop or a kill -9). The owner of its market records that as a gap
   [mark, now] ("unfollowed", `_settle`) and, once the gap row is durable, releases
   the mark (feed_coverage.released_at), so the debt is recorded once.

Sharding: process `shard` of `shards` owns the tokens whose condition id hashes
(crc32, stable across processes and Python runs, unlike hash()) to it, so both
tokens of a market, and so one Data API query per market, belong to one process.
(workers/storage/followed.py's shard_of splits by token, which would put the two
tokens of a market in two processes that then both query the market's trades.)

Trade-offs, on purpose: coverage marks move every `coverage_interval`, or less often
when a process follows so many tokens that one row each would load the database
(`coverage_rate`); a later mark only lengthens the backfill after a restart. The
followed-set and gap reads of `_refresh` are synchronous; a database slow enough to
delay PONG handling past `pong_timeout` causes a reconnect, i.e. one more gap, never
a loss. Backfill requests run in the
same loop, one per turn, with a client that neither retries nor waits long itself
(the queue backs off), for the same reason. A listener that falls far behind the
exchange sees its PONG queued behind the backlog and reconnects: the backlog is
then fetched from the Data API instead.

Tick-level books (`books = yes`, off by default): the same frames' `book`,
`price_change` and `tick_size_change` events of this shard's tokens become
`book_events` rows (workers/bookevents.py: each event whole or not at all), through
the same Writer (spooled when PostgreSQL is down, exactly once by their key). Their
gaps are the trades' gaps: a socket's drop, stall or restart is a feed_gaps row, and
the first `book` received after it ends it for a rebuild (workers/storage/replay.py).

`new_market` / `market_resolved` arrive on every socket of every shard; they are
de-duplicated in memory and stored once in `market_events` (ON CONFLICT DO NOTHING
makes the copies of other shards no-ops), where the markets and resolutions
collectors can read them as early hints.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

from workers.backfill import BackfillQueue, Gap
from workers.bookevents import Stamps
from workers.bookevents import rows as book_rows
from workers.base import OptionError, Worker
from workers.feed import Feed
from workers.messages import ORDINAL, RECEIVED_AT, parse
from workers.storage.partitions import Maintenance, RetentionError, parse_retention
from workers.ws import WsOptions

log = logging.getLogger(__name__)

UTC = timezone.utc
# Seconds a transaction's live repeat counts are kept (between this and twice this). All
# fills of one transaction come from one match and are published together, so they
# arrive in one frame or adjacent ones; a fill arriving later than this would re-use an
# ordinal and be dropped (an under-count), never stored twice. The clock is this
# process's and the memory rotates at most once per loop turn, so fills delivered in
# adjacent reads always meet, however long the process was stopped between them. Kept
# short because the memory grows with the rate (~100 bytes a trade: 30-60 s at 20,000
# trades/s is 60-120 MB; the 2-4 minutes used before were 240-480 MB, and every lookup
# into a table that size misses the CPU's caches).
ORDINAL_MEMORY = 30.0


def shard_of(condition_id: str | None, token_id: str, shards: int) -> int:
    """The shard owning a token: crc32 of its condition id (else of the token id)."""
    key = (condition_id or token_id).encode()
    return zlib.crc32(key) % shards if shards > 1 else 0


ORDINAL_TEXT = tuple(str(i) for i in range(64))  # an ordinal as the text the trades row carries
_LOW64 = (1 << 64) - 1


class Ordinals:
    """Live numbering of exact repeats, in arrival order, for recent transactions.

    Two generations of counters rotated every `memory` seconds: a transaction is
    remembered between `memory` and twice that, plenty for its fills to arrive.

    A repeat is keyed by a 128-bit int made of two 64-bit hashes of the fill
    (token, tx hash or ts, price, size, side), one over the fields in each order:
    Python's string hashes are keyed SipHash, computed once per string and cached
    on it, so the second hash costs only the combining. ~100 bytes an entry (the
    strings themselves are not kept), which at 1,000 trades/s is ~25 MB held rather
    than ~130 MB for the strings. Two fills can share a key only when a field's two
    distinct strings share a 64-bit SipHash and every other field is equal (the
    tuple combining is a bijection of each field's hash): ~2^-64 per such pair. A
    false repeat would number a fill 1 instead of 0, which a gap's backfill would
    then store again; at 10,000 trades/s that is far below once in the life of a
    database.
    """

    def __init__(self, memory: float = ORDINAL_MEMORY, clock=time.monotonic):
        self.memory = memory
        self.clock = clock
        self.current: dict[int, int] = {}
        self.old: dict[int, int] = {}
        self.rotate_at = clock() + memory

    def number(self, rows: list[list], received_at: str) -> None:
        """Fill in the ordinal and received_at of trades rows (workers.messages.TRADE_COLUMNS)."""
        current, old, texts = self.current, self.old, ORDINAL_TEXT
        for row in rows:
            tx = row[6] or row[2]  # no hash (2024 recordings): the ms timestamp keys instead
            key = (hash((row[0], tx, row[3], row[4], row[5])) << 64) | (
                hash((row[5], row[4], row[3], tx, row[0])) & _LOW64)
            seen = current.get(key)
            if seen is None:
                seen = old.pop(key, 0)
            current[key] = seen + 1
            row[ORDINAL] = texts[seen] if seen < 64 else str(seen)
            row[RECEIVED_AT] = received_at

    def assign(self, row: dict) -> None:
        """number() for one row as a dict (backfill-shaped rows; tests)."""
        one = [row["token_id"], None, str(row["ts"]), row["price"], row["size"], row["side"], row["tx_hash"],
               None, None, None, None]
        self.number([one], None)
        row["ordinal"] = int(one[ORDINAL])

    def maybe_rotate(self) -> None:
        now = self.clock()
        if now >= self.rotate_at:
            self.old, self.current = self.current, {}
            self.rotate_at = now + self.memory


def _now() -> datetime:
    return datetime.now(UTC)


def _dt(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, UTC)


class TradesCollector(Worker):
    """The live trade listener (one process per shard). See the module docstring."""

    OPTIONS = {
        "interval": (float, 0.0),  # unused: the loop waits on its sockets, not on a timer
        "assets_per_socket": (int, 400),
        "ids_per_frame": (int, 100),
        "connect_stagger": (float, 0.25),
        "ping_interval": (float, 10.0),
        "pong_timeout": (float, 10.0),
        "stall_timeout": (float, 30.0),
        "connect_timeout": (float, 10.0),
        "read_timeout": (float, 10.0),
        "backoff_initial": (float, 0.5),
        "backoff_max": (float, 30.0),
        "stable_after": (float, 30.0),
        "refresh_interval": (float, 10.0),
        "adopt_interval": (float, 60.0),  # re-read open gaps this often even if the followed set is unchanged
        "coverage_interval": (float, 2.0),
        "coverage_rate": (float, 2000.0),  # coverage marks a second at most (see _cover_every)
        "backfill_delay": (float, 60.0),
        "backfill_margin": (float, 5.0),
        "backfill_settle": (float, 30.0),
        "backfill_rate": (float, 0.4),  # share of the Data API's /trades limit (200 per 10 s per IP)
        "backfill_page": (int, 1000),
        "backfill_markets": (int, 20),
        "initial_lookback": (float, 0.0),
        "flush_rows": (int, 5000),
        "flush_age": (float, 0.1),
        "min_turn": (float, 0.005),  # while busy, seconds between polls (frames gather meanwhile)
        # Record every book event (`book`, `price_change`, `tick_size_change`) of the followed
        # tokens in `book_events` (workers/bookevents.py); off: they are only counted.
        "books": (bool, False),
        "retention": (str, ""),  # trades and book_events partitions older than this are dropped ('90d'; '': never)
    }

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        o = self.options
        if not 0 <= self.shard < max(1, self.shards):
            raise OptionError("shard", f"shard {self.shard} outside 0..{self.shards - 1}")
        for key in ("assets_per_socket", "ids_per_frame", "backfill_page", "backfill_markets"):
            if o[key] < 1:
                raise OptionError(key, f"must be >= 1, got {o[key]}")
        for key in ("ping_interval", "pong_timeout", "stall_timeout", "connect_timeout", "read_timeout",
                    "coverage_rate"):
            if o[key] <= 0:
                raise OptionError(key, f"must be > 0, got {o[key]}")
        if "ws_url" not in self.urls or "data_url" not in self.urls:
            raise OptionError("ws_url", "the trade listener needs ws_url and data_url")
        try:
            self.retention = parse_retention(o["retention"])
        except RetentionError as err:
            raise OptionError("retention", str(err)) from None
        self.maintenance: Maintenance | None = None
        self.interval = 0.0
        self.shard_label = f"{self.shard}/{self.shards}"
        self.ws_options = WsOptions(
            ping_interval=o["ping_interval"], pong_timeout=o["pong_timeout"], stall_timeout=o["stall_timeout"],
            connect_timeout=o["connect_timeout"], read_timeout=o["read_timeout"],
            backoff_initial=o["backoff_initial"], backoff_max=o["backoff_max"], stable_after=o["stable_after"],
        )
        # Opened in init_process (after the fork).
        self.db = self.writer = self.feed = self.backfill = self.http = None
        # Token state, all in this process's memory.
        self.tokens: dict[str, str | None] = {}  # followed tokens of this shard -> condition id
        self.since: dict[str, datetime | None] = {}
        self.covered: dict[str, datetime] = {}  # coverage marks (DB at start, then ours)
        self.last_trade: dict[str, datetime] = {}
        self.prior_gaps: dict[str, list[Gap]] = {}  # adopted gaps of followed tokens not live here yet
        self.held: dict[tuple, datetime | None] = {}  # gap key -> the end we hold it with (None: open)
        self.releasing: dict[str, datetime] = {}  # unfollowed token -> end of its recorded debt (see _settle)
        self.live_at: dict[str, datetime] = {}  # token -> when its current subscription went live
        self.seen_live: set[str] = set()  # tokens that went live at least once in this process
        self.open_gaps: dict[str, Gap] = {}
        self.ordinals = Ordinals()
        self.books = o["books"]
        self.stamps = Stamps()
        self.market_seen: set[tuple[str, str]] = set()
        self.market_pending: list[dict] = []
        self.stats = Counter()
        self.skipped = Counter()
        self._last_log = 0.0
        self._next_refresh = 0.0
        self._followed_version: tuple[int, int] | None = None  # store.followed_version at the last refresh
        self._next_cover = 0.0
        self._next_adopt = 0.0
        self._polled_at = 0.0
        self._read_more = False  # the last poll read something
        self._backfill_after = 0.0
        self._backfill_failures = 0

    # -- process lifecycle ----------------------------------------------------
    def init_process(self) -> None:
        """After the fork: database handle, Writer, HTTP client, sockets (connected lazily)."""
        from workers.http import Client
        from workers.storage import Writer
        from workers.storage.db import Database

        o = self.options
        self.db = Database(self.dsn, application_name=f"collectord:{self.name}")
        spool = os.path.join(self.data_dir or ".", "spool")
        self.writer = Writer(self.dsn, spool, name=self.name, max_rows=o["flush_rows"], max_age=o["flush_age"])
        self.writer.open()
        # Partitions ahead and retention, in a thread of its own (every shard: they serialize
        # in the database, and the work is done once).
        self.maintenance = Maintenance(self.dsn, {"trades": self.retention, "book_events": self.retention},
                                       name=self.name)
        # No retries and a short Retry-After cap inside the client: a request must not
        # hold the socket loop for long; a failed request is retried by our own backoff.
        self.http = Client(timeout=(3.05, 10), rate=o["backfill_rate"], retries=0, deadline=15.0,
                           max_retry_after=1.0, apis={self.urls["data_url"]: "data"})
        self.backfill = BackfillQueue(
            self.http.get_json, self.urls["data_url"], shard=self.shard_label, delay=o["backfill_delay"],
            margin=o["backfill_margin"], settle=o["backfill_settle"], page=o["backfill_page"],
            markets_per_request=o["backfill_markets"],
        )
        self.feed = Feed(self.urls["ws_url"], self.ws_options, assets_per_socket=o["assets_per_socket"],
                         ids_per_frame=o["ids_per_frame"], connect_stagger=o["connect_stagger"])
        os.set_blocking(self._wake_r, False)  # drained after every poll, readable or not
        self.feed.set_wake_fd(self._wake_r)

    def shutdown(self) -> None:
        """Close sockets, flush rows, advance coverage for what was live, close the DB."""
        if self.feed is not None:
            self.feed.close()
        if self.writer is not None:
            try:
                self._cover()
            except Exception as err:  # the DB may be down: rows are spooled by close()
                log.warning("%s: final coverage not recorded: %s", self.name, err)
            self.writer.close()
        if self.db is not None:
            self.db.close()

    # -- the loop -------------------------------------------------------------
    def step(self) -> None:
        """Run the event loop for up to half a second (the base loop calls it again).

        Each turn, in order: heartbeat -> followed-set refresh when due -> socket
        deadlines and connects -> (while busy, let frames gather for `min_turn` since the
        last poll) -> wait on the sockets until the nearest deadline ->
        parse and queue what arrived -> coverage/gap bookkeeping -> Writer flush when
        due -> at most one backfill request.
        """
        end = time.monotonic() + 0.5
        while not self.stopping:
            self.beat()
            self.maintenance.maybe_start()
            now = time.monotonic()
            if now >= self._next_refresh:
                self._next_refresh = now + self.options["refresh_interval"]
                self._refresh()
            self.feed.tick()
            self._apply_feed_events()
            busy = self.backfill.pending(time.time()) and now >= self._backfill_after
            timeout = 0.0 if busy else min(self.feed.next_deadline(), end, self._next_cover) - time.monotonic()
            timeout = min(timeout, self.options["flush_age"])
            if self._read_more and timeout > 0:
                # Busy: let frames gather for up to `min_turn` since the last poll, so one
                # turn's fixed cost (deadlines, bookkeeping, the wait itself) serves many.
                time.sleep(max(0.0, min(timeout, self._polled_at + self.options["min_turn"] - time.monotonic())))
            self._polled_at = time.monotonic()
            self._read_more = False
            for conn, texts in self.feed.poll(timeout):
                self._read_more = True
                self._handle(conn, texts)
            self._drain_wake()
            self._apply_feed_events()
            self.ordinals.maybe_rotate()
            self.writer.maybe_flush()
            if time.monotonic() >= self._next_cover:
                self._next_cover = time.monotonic() + self._cover_every()
                self._cover()
            if busy:
                self._backfill_step()
            if time.monotonic() >= end:
                return

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 64)
        except (BlockingIOError, OSError):
            pass

    def _handle(self, conn, texts: list[str]) -> None:
        """Parse frames; queue trades (numbered, stamped received_at) and, with `books`, book
        events; note pongs and events."""
        now = _now()
        received_at = now.isoformat()
        rows: list[list] = []
        books = self.books
        for text in texts:
            out = parse(text, books)
            if out.pong:
                conn.got_pong()
                continue
            if out.newest_ms:
                conn.rx.note(out.newest_ms)
            if out.trades:
                self.ordinals.number(out.trades, received_at)
                rows += out.trades
            if books and (out.book_events or out.ticks):
                self._book_events(out, now)
            if out.markets:
                for event in out.markets:
                    key = (event["kind"], event["market_id"])
                    if key not in self.market_seen:
                        self.market_seen.add(key)
                        self.market_pending.append(event)
                self.stats["market_events"] += len(out.markets)
            if out.skipped or out.unknown_fields:
                self.skipped.update(out.skipped)
                self.skipped.update({"field:" + k: v for k, v in out.unknown_fields.items()})
                if out.errors and time.monotonic() - self._last_log > 10:
                    self._last_log = time.monotonic()
                    log.warning("%s: skipped market-channel data: %s", self.name, "; ".join(out.errors))
            self.stats["messages"] += 1
        if rows:
            self.writer.add_rows("trades", rows)
            self.stats["trades_received"] += len(rows)

    def _book_events(self, out, now: datetime) -> None:
        """One frame's book events of this shard's tokens -> book_events rows (each event
        whole or not at all; the invalid ones are counted and skipped)."""
        rows, bad = book_rows(out.book_events, out.ticks, self.stamps, now, self.tokens)
        if rows:
            self.writer.add_rows("book_events", rows)
            self.stats["book_events"] += len(rows)
        if bad:
            self.skipped["invalid:book_event"] += bad
            self.stats["book_events_invalid"] += bad

    # -- followed set ---------------------------------------------------------
    def _refresh(self) -> None:
        """Read the followed set (only when its fingerprint changed: at 100,000 tokens the
        read is most of a shard's CPU), keep this shard's part, apply it to the sockets; close
        the gaps of tokens dropped from it; adopt the open gaps this shard owns (`_adopt`) and
        record the debt of dropped tokens past their coverage marks (`_settle`)."""
        from workers.storage import gaps as store

        try:
            version = store.followed_version(self.db)
            # Unchanged since the last refresh (the common case): no need to read it all.
            followed = None if self.tokens and version == self._followed_version else store.followed(self.db)
        except Exception as err:
            self.failure(f"followed set: {type(err).__name__}: {err}")
            log.warning("%s: cannot read the followed set: %s", self.name, err)
            return
        if not self.tokens and self.writer.stats().get("spool_bytes"):
            # Rows spooled by an earlier process (DB outage, then a crash) may hold gap
            # rows: read the unrecovered gaps only once they are replayed.
            log.warning("%s: waiting for the spool to replay before subscribing", self.name)
            return
        if followed is None:
            mine, added = self.tokens, []
        else:
            mine = {t: c for t, (c, _) in followed.items() if shard_of(c, t, self.shards) == self.shard}
            added = [t for t in mine if t not in self.tokens]
        # The open gaps and unsettled marks (full reads: at 100,000 tokens their start gaps
        # are 100,000 rows) change under us only when the followed set does, or when other
        # processes die or change shape; so they are read then, and every `adopt_interval`.
        adopt = followed is not None or time.monotonic() >= self._next_adopt
        owed = marks = None
        try:
            if added:
                self._load(added, {t: followed[t][1] for t in added})
            if adopt:
                owed = store.open_gaps(self.db)
                marks = store.unreleased(self.db)
        except Exception as err:
            self.failure(f"token state: {type(err).__name__}: {err}")
            log.warning("%s: cannot read coverage or open gaps: %s", self.name, err)
            return
        self.tokens = mine
        _, removed = self.feed.set_tokens(mine)
        now = _now()
        for token in removed:
            self.live_at.pop(token, None)
            self.seen_live.discard(token)  # followed again later: a fresh first gap from its coverage
            gap = self.open_gaps.pop(token, None)
            if gap is not None:
                gap.ended_at = now
                self._close_gap(gap)
            for gap in self.prior_gaps.pop(token, []):  # never went live here: they end now
                gap.ended_at = gap.ended_at or now
                self._close_gap(gap)
        if adopt:
            self._adopt(owed, now)
            self._settle(marks, now)
            self._next_adopt = time.monotonic() + self.options["adopt_interval"]
        self._followed_version = version
        self._apply_feed_events()

    def _load(self, tokens: list[str], since: dict) -> None:
        """What the database knows about tokens new to this process."""
        from workers.storage import gaps as store

        self.since.update(since)
        fresh = [t for t in tokens if t not in self.covered]
        cover = store.coverage(self.db, fresh)
        self.covered.update(cover)
        without = [t for t in fresh if t not in cover]
        if without:
            self.last_trade.update(store.last_trades(self.db, without))

    def _adopt(self, owed: list[tuple], now: datetime) -> None:
        """Take on the open gaps this shard owns and does not hold yet (see 3. Ownership).

        In order: keep those whose market hashes here; skip those held with the same
        end (a held open gap whatever its stored end: we close it ourselves); hand one
        of a followed token not yet live here to its first subscription; close any
        other at its recorded end (else now) and queue it. Then forget held keys that
        are neither open in the database nor in memory (recovered and stored).
        """
        seen = set()
        for token, condition, started, ended, reason in owed:
            if shard_of(condition, token, self.shards) != self.shard:
                continue
            key = (token, started)
            seen.add(key)
            if key in self.held and (self.held[key] is None or ended is None or ended <= self.held[key]):
                continue
            gap = Gap(token, condition or self.tokens.get(token), started, ended, reason or "restart")
            self.stats["gaps_adopted"] += 1
            if token in self.tokens and token not in self.seen_live:  # closed at its first subscription
                self.held[key] = ended
                self.prior_gaps[token] = [g for g in self.prior_gaps.get(token, []) if g.key != key] + [gap]
            else:
                gap.ended_at = ended or now
                self._close_gap(gap)
        mem = {g.key for g in self.open_gaps.values()} | {g.key for g in self.backfill.gaps()}
        mem |= {g.key for gaps in self.prior_gaps.values() for g in gaps}
        self.held = {k: v for k, v in self.held.items() if k in seen or k in mem}

    def _settle(self, marks: list[tuple], now: datetime) -> None:
        """The debt of unfollowed tokens of this shard past their coverage mark (trades
        published before they were dropped that no socket delivered) becomes a gap
        [mark, now]; the mark is released in _cover once that gap row is durable."""
        for token, condition, covered in marks:
            if token in self.tokens or token in self.releasing or shard_of(condition, token, self.shards) != self.shard:
                continue
            if covered < now:
                self._close_gap(Gap(token, condition, covered, now, "unfollowed"))
            self.releasing[token] = now

    # -- coverage and gaps ------------------------------------------------------
    def _apply_feed_events(self) -> None:
        events, self.feed.events = self.feed.events, []
        for event in events:
            if event[0] == "live":
                _, conn, tokens, at = event
                self._went_live(tokens, _dt(at))
            elif event[0] == "down":
                _, conn, tokens, rx, reason = event
                self._went_down(tokens, _dt(rx.vouched()), reason)

    def _went_live(self, tokens: list[str], at: datetime) -> None:
        for token in tokens:
            if token not in self.tokens:
                continue
            gap = self.open_gaps.pop(token, None)
            if gap is not None:
                gap.ended_at = at
                self._close_gap(gap)
            elif token not in self.seen_live:
                self._first_gap(token, at)
            self.live_at[token] = at
            self.seen_live.add(token)

    def _first_gap(self, token: str, at: datetime) -> None:
        """The gap before this process's first subscription of a token."""
        condition = self.tokens.get(token)
        for gap in self.prior_gaps.pop(token, []):
            gap.ended_at = gap.ended_at or at
            self._close_gap(gap)
        if token in self.covered:
            start, reason = self.covered[token], "restart"
        elif token in self.last_trade:
            start, reason = self.last_trade[token], "start"
        elif self.since.get(token) is not None:
            start, reason = self.since[token], "start"
        else:
            start, reason = at - timedelta(seconds=self.options["initial_lookback"]), "start"
        if start < at:
            self._close_gap(Gap(token, condition, start, at, reason))

    def _went_down(self, tokens: list[str], since: datetime, reason: str) -> None:
        why = "stall" if reason.startswith("stalled") else "pong" if "PONG" in reason else "disconnect"
        rows = []
        for token in tokens:
            live = self.live_at.pop(token, None)
            if live is None or token in self.open_gaps:
                continue
            gap = Gap(token, self.tokens.get(token), max(since, live), None, why)
            self.open_gaps[token] = gap
            self.held[gap.key] = None
            rows.append(gap.row(self.shard_label))
        if rows:
            self.writer.add("feed_gaps", rows)
            self.stats["gaps_opened"] += len(rows)

    def _close_gap(self, gap: Gap) -> None:
        self.held[gap.key] = gap.ended_at
        self.writer.add("feed_gaps", [gap.row(self.shard_label)])
        self.backfill.add(gap)
        self.stats["gaps_closed"] += 1

    def _cover(self) -> None:
        """Move the coverage mark of every live token forward, through the Writer.

        In order: for each socket, the time it vouches for (workers.ws.Rx.vouched: the
        newest exchange time read from it, capped by its last data, and by now); one
        `feed_coverage` row per live token on it, queued behind the rows received before
        it (the Writer makes a mark durable only with or after them: tables.py); then,
        only when there is some, the rare synchronous work: releasing the marks of
        unfollowed tokens once their debt's gap rows are durable (a flush first), and
        storing market announcements. The socket loop never waits for a commit here.
        """
        from workers.storage import gaps as store

        mark = _now()
        # A socket vouches for its tokens only up to the newest exchange time read from
        # it, capped by its last data: a stall not yet detected, or a backlog not yet
        # read (a lagging loop), must not be covered, because a kill -9 now would lose them.
        by_conn: dict[int, list[str]] = {}
        for token, at in self.live_at.items():
            if at <= mark and token in self.tokens and token in self.feed.where:
                by_conn.setdefault(self.feed.where[token], []).append(token)
        rows = []
        covered, conditions, shard = self.covered, self.tokens, self.shard_label
        for index, tokens in by_conn.items():
            vouched = self.feed.conns[index].rx.vouched()
            if not vouched:
                continue  # nothing timestamped read from this socket yet: it vouches for nothing
            until = min(mark, _dt(vouched))
            text = until.isoformat()
            for token in tokens:  # forward only, as in feed_coverage
                if token not in covered or until > covered[token]:
                    covered[token] = until
                    # FEED_COVERAGE's columns, as text: updated_at NULL becomes now() in the database.
                    rows.append([token, text, shard, None, conditions.get(token)])
        self.writer.add_rows("feed_coverage", rows)
        self.stats["coverage_marks"] += len(rows)
        try:
            if self.releasing:
                self.writer.flush()  # the gap rows recording their debt are durable first
                store.release(self.db, self.releasing)
                self.releasing = {}
            if self.market_pending:
                pending, self.market_pending = self.market_pending, []
                try:
                    self.stats["market_events_stored"] += store.record_market_events(self.db, pending, mark)
                except Exception:
                    self.market_pending = (pending + self.market_pending)[-10000:]
                    raise
        except Exception as err:
            self.failure(f"coverage: {type(err).__name__}: {err}")
            log.warning("%s: coverage not recorded: %s", self.name, err)
        else:
            if self.writer.stats().get("db_ok") is not False:
                self.success()  # the database takes what was received, and the marks move
        if len(self.market_seen) > 200_000:
            self.market_seen.clear()

    def _cover_every(self) -> float:
        """Seconds to the next coverage pass: `coverage_interval`, or longer when this
        process follows so many tokens that a mark each every interval would cost the
        database more than `coverage_rate` row updates a second (at 25,000 tokens and the
        default 2,000/s: 12.5 s; a later mark only lengthens a restart's backfill)."""
        o = self.options
        return max(o["coverage_interval"], len(self.live_at) / o["coverage_rate"])

    def _backfill_step(self) -> None:
        began = time.monotonic()
        if began < self._backfill_after:
            return
        try:
            done = self.backfill.step(set(self.tokens))
        except Exception as err:
            self._backfill_failures += 1
            delay = min(30.0, 0.5 * 2 ** min(self._backfill_failures, 8))
            self._backfill_after = time.monotonic() + delay
            self.failure(f"backfill: {type(err).__name__}: {err}")
            log.warning("%s: backfill request failed (retry in %.1fs): %s", self.name, delay, err)
            return
        self._backfill_failures = 0
        # Live data first: backfill gets at most a third of the loop's time (a request
        # that took d seconds is followed by 2d seconds of sockets only).
        self._backfill_after = time.monotonic() + 2 * (time.monotonic() - began)
        if done is None:
            return
        if done.trades:
            self.writer.add("trades", done.trades)
        self.writer.add("feed_gaps", done.gaps)
        self.stats["trades_backfilled"] += len(done.trades)
        self.stats["gaps_recovered"] += sum(1 for g in done.gaps if g["recovered_at"] is not None)

    # -- status -----------------------------------------------------------------
    def _owed(self) -> list[Gap]:
        """Every gap this process holds and has not recovered: open, adopted, queued."""
        owed = list(self.open_gaps.values()) + [g for gaps in self.prior_gaps.values() for g in gaps]
        return owed + (self.backfill.gaps() if self.backfill is not None else [])

    def status(self) -> dict:
        counters = dict(self.counters)
        if self.writer is not None:
            wstats = self.writer.stats()
            counters["rows_written"] = wstats.get("rows_written", 0)
            counters["spool_bytes"] = wstats.get("spool_bytes", 0)
            counters["db_ok"] = wstats.get("db_ok")
        counters.update(self.stats)
        if self.maintenance is not None:
            counters.update(self.maintenance.counters)
        counters["tokens"] = len(self.tokens)
        owed = self._owed()
        counters["gaps_open"] = len(owed)
        # Unix time the oldest gap this process owes started (None: it owes none): the
        # metrics child turns it into collectord_feed_gap_oldest_open_seconds at scrape time.
        counters["gaps_oldest_open_at"] = round(min(g.started_at for g in owed).timestamp(), 3) if owed else None
        counters["skipped"] = sum(self.skipped.values())
        if self.backfill is not None:
            counters["backfill_requests"] = self.backfill.requests
            counters["gaps_unrecoverable"] = self.backfill.unrecoverable
        if self.feed is not None:
            counters.update(self.feed.status())
        return counters
