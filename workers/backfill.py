"""Backfill: the trades of a feed gap, fetched from the Data API `/trades` (v1).

Pure part: `rows_from_data_api(payload, tokens)` turns a `/trades` response into
`trades` rows exactly comparable with the live ones, and `number_repeats(rows)`
gives them their ordinals (see workers/trades.py for why this meets the live
numbering). Stateful part: `BackfillQueue` groups closed gaps into jobs (one
window, up to `markets_per_request` condition ids) and runs a job one HTTP request
per `step()`, so the listener's loop never blocks on more than one request.

Every gap handed to the queue ends one of two ways, and `step()` returns its row:
recovered (recovered_at, recovered_trades), or unrecoverable with the reason
(no market known for its token; the Data API refusing its market with a 400, 404,
410 or 422 `refusals` times in a row). Transient failures (5xx, timeouts, 429, a
Cloudflare 403, bodies that do not parse) are raised to the caller, which backs off and retries: giving up on an
exchange outage would drop trades that are still there to fetch. A job over several
markets that is refused is first split into one job per market, so one market the
Data API refuses never takes the others' gaps down with it.

The window: the Data API stamps a fill with its transaction's block time (seconds),
which comes after the match time the WebSocket reports (the operator settles matched
orders on chain in batches). A fill matched inside [start, end] therefore carries a
Data API time in [start - margin, end + margin + settle]: `margin` absorbs clock skew
and whole-second rounding, `settle` the settlement delay. Fetching more than the gap
costs nothing but bytes: rows already stored are no-ops (ON CONFLICT DO NOTHING).

Matching the live twin (polymarket-api.md §4.3): the Data API gives floats
(`0.709999959`) and seconds. Prices are rounded to 0.0001, the finest tick the
exchange allows: every market's tick (0.1 .. 0.0001) divides it, so the rounding is
exact for any market whatever tick was in force when the trade happened, while the
market's *current* tick (it changes near 0 and 1, `tick_size_change`) could
misround an older trade. The Data API's float error (~1e-8) is far below half of
0.0001. Sizes are rounded to 6 decimals (the exchange's size precision). Both are
then written in canonical decimal text, the same text the live parser produces.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Callable

from workers.messages import EPOCH, decimal_text, is_hex_id, is_token_id

log = logging.getLogger(__name__)

PRICE_QUANTUM = Decimal("0.0001")
SIZE_QUANTUM = Decimal("0.000001")
MAX_OFFSET = 10_000  # the Data API answers 400 beyond this offset: split the window instead
REFUSALS = 3  # refusals (REFUSED) in a row for one market before its gaps end unrecoverable
NO_MARKET = "no market (condition id) known for the token: the Data API is queried by market"


# Answers about the request itself (its market), which a retry will not change. Other
# 4xx are not the market's fault: 403 is what Cloudflare answers while it blocks an IP
# for a while, 401 a proxy's, 408/429 ask to come back later. Those stay transient.
REFUSED = frozenset({400, 404, 410, 422})


def refused(err: BaseException) -> bool:
    """True for an answer that retrying will not change (REFUSED)."""
    return getattr(err, "status", None) in REFUSED


def _quantized(value: Any, quantum: Decimal) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
        if not dec.is_finite() or dec < 0:
            return None
        # quantize raises InvalidOperation when the result needs more digits than the
        # context's precision (a size of 1e80): that row is invalid, not the whole page.
        return decimal_text(dec.quantize(quantum, rounding=ROUND_HALF_EVEN))
    except (InvalidOperation, ValueError):
        return None


def rows_from_data_api(payload: Any, tokens: set[str] | None = None) -> tuple[list[dict], int]:
    """A `/trades` response -> (rows without ordinal, number of rows skipped as invalid).

    Rows of tokens outside `tokens` (when given) are dropped silently: another
    shard or nobody follows them.
    """
    rows: list[dict] = []
    skipped = 0
    if not isinstance(payload, list):
        return rows, 1
    for item in payload:
        if not isinstance(item, dict):
            skipped += 1
            continue
        token = item.get("asset")
        if tokens is not None and token not in tokens:
            continue
        price = _quantized(item.get("price"), PRICE_QUANTUM)
        size = _quantized(item.get("size"), SIZE_QUANTUM)
        side = item.get("side")
        ts = item.get("timestamp")
        tx = item.get("transactionHash")
        condition = item.get("conditionId")
        if tx in (None, ""):
            tx = None
        elif not is_hex_id(tx):  # it goes into the trade key as text: never a NUL or a surrogate
            skipped += 1
            continue
        if condition is not None and not is_hex_id(condition):
            skipped += 1
            continue
        if (not is_token_id(token) or price is None or size is None or size == "0"
                or Decimal(price) > 1 or side not in ("BUY", "SELL") or isinstance(ts, bool)
                or not isinstance(ts, int) or not 0 < ts < 10**11):
            skipped += 1
            continue
        when = EPOCH + timedelta(seconds=ts)
        rows.append({
            "token_id": token,
            "condition_id": condition,
            "ts": when,
            "price": price,
            "size": size,
            "side": side,
            "tx_hash": tx.lower() if tx else None,
            "fee_rate_bps": None,
            "source": "backfill",
            # The partition column: the UTC day of this second, which is the day of the
            # live millisecond it truncates (migrations/0023_partitions.sql).
            "trade_day": when.date(),
        })
    return rows, skipped


def number_repeats(rows: list[dict]) -> list[dict]:
    """Give each row its ordinal: 0, 1, ... over exact repeats of one transaction.

    Repeats are rows equal in (token_id, tx_hash, price, size, side) (or, without a
    transaction hash, in (token_id, ts, price, size, side)). Rows that are exact
    repeats cannot be told apart, so any numbering of k repeats that uses 0..k-1
    names the same set of rows: the caller must pass ALL rows of each transaction.
    """
    seen: Counter = Counter()
    for row in rows:
        tx = row["tx_hash"]
        key = (row["token_id"], tx if tx else row["ts"], row["price"], row["size"], row["side"])
        row["ordinal"] = seen[key]
        seen[key] += 1
    return rows


@dataclass
class Gap:
    """One token's interval that may lack trades (wall-clock datetimes)."""

    token_id: str
    condition_id: str | None
    started_at: datetime
    ended_at: datetime | None
    reason: str

    @property
    def key(self) -> tuple[str, datetime]:
        """feed_gaps' natural key."""
        return self.token_id, self.started_at

    def row(self, shard: str, recovered_at: datetime | None = None, found: int | None = None,
            unrecoverable: str | None = None) -> dict:
        return {"token_id": self.token_id, "started_at": self.started_at, "ended_at": self.ended_at,
                "reason": self.reason, "recovered_at": recovered_at, "recovered_trades": found, "shard": shard,
                "condition_id": self.condition_id, "unrecoverable": unrecoverable}


@dataclass
class Job:
    """Fetch one window for some markets by time-disjoint pages (see BackfillQueue.step)."""

    start: int  # epoch seconds, margin included
    end: int
    conditions: list[str]
    gaps: list[Gap]
    # (start, end, markets) still to fetch; the last is current
    windows: list = field(default_factory=list)
    offset: int = 0  # only inside a single second holding more than a page
    rows: list = field(default_factory=list)
    mark: int = 0  # len(rows) when the current window started
    requests: int = 0
    refusals: int = 0  # refusals (REFUSED) in a row

    def __post_init__(self):
        if not self.windows:
            self.windows = [(self.start, self.end, tuple(self.conditions))]


@dataclass
class Done:
    """A finished job: trade rows to write and gap rows marking recovery (or the end of hope)."""

    trades: list[dict]
    gaps: list[dict]
    requests: int


class BackfillQueue:
    """Closed gaps waiting for the Data API, run as jobs of one request per step."""

    def __init__(self, get_json: Callable[[str, dict], Any], data_url: str, *, shard: str, delay: float = 30.0,
                 margin: float = 5.0, settle: float = 0.0, page: int = 1000, markets_per_request: int = 20,
                 refusals: int = REFUSALS, wall: Callable[[], float] = lambda: datetime.now(timezone.utc).timestamp()):
        self.get_json = get_json
        self.url = data_url.rstrip("/") + "/trades"
        self.shard = shard
        self.delay, self.margin, self.settle = delay, margin, settle
        self.page = max(1, min(page, MAX_OFFSET))
        self.markets_per_request = max(1, markets_per_request)
        self.refusals = max(1, refusals)
        self.wall = wall
        self.waiting: list[Gap] = []
        self._next_due = math.inf  # the earliest _due_at of waiting: pending() runs every loop turn
        self.jobs: list[Job] = []
        self.ended: list[dict] = []  # rows of gaps that ended unrecoverable, not yet returned
        self.requests = 0
        self.recovered = 0
        self.trades_found = 0
        self.invalid_rows = 0
        self.unrecoverable = 0

    def __len__(self) -> int:
        return len(self.waiting) + sum(len(j.gaps) for j in self.jobs)

    def gaps(self) -> list[Gap]:
        """Every gap queued or being fetched."""
        return self.waiting + [g for j in self.jobs for g in j.gaps]

    def add(self, gap: Gap) -> None:
        if gap.ended_at is None:
            raise ValueError("only closed gaps are backfilled")
        self.waiting.append(gap)
        self._next_due = min(self._next_due, self._due_at(gap))

    def _due_at(self, gap: Gap) -> float:
        """When a gap may be fetched: `delay` after its end, and never before its whole
        window lies in the past (rows still arriving inside a window being paged would
        shift the pages)."""
        end = gap.ended_at.timestamp()
        return max(end + self.delay, math.ceil(end + self.margin + self.settle) + 1.0)

    def _plan(self, now: float) -> None:
        """Group due gaps by window into jobs."""
        if now < self._next_due:
            return
        due = [g for g in self.waiting if self._due_at(g) <= now]
        self.waiting = [g for g in self.waiting if self._due_at(g) > now]
        self._next_due = min(map(self._due_at, self.waiting), default=math.inf)
        if not due:
            return
        windows: dict[tuple[int, int], list[Gap]] = {}
        for gap in due:
            if not gap.condition_id:
                self._give_up([gap], NO_MARKET)
                continue
            start = math.floor(gap.started_at.timestamp() - self.margin)
            end = math.ceil(gap.ended_at.timestamp() + self.margin + self.settle)
            windows.setdefault((start, end), []).append(gap)
        for (start, end), gaps in sorted(windows.items()):
            conditions = sorted({g.condition_id for g in gaps})
            for i in range(0, len(conditions), self.markets_per_request):
                chunk = conditions[i:i + self.markets_per_request]
                self.jobs.append(Job(start, end, chunk, [g for g in gaps if g.condition_id in chunk]))

    def pending(self, now: float) -> bool:
        """True when step() has a request to make now."""
        return bool(self.jobs or self.ended) or now >= self._next_due

    def step(self, tokens: set[str]) -> Done | None:
        """Make at most one request; return a Done when a job finished.

        Raises what get_json raises (the job stays queued and is retried), except
        that a job refused `refusals` times in a row (REFUSED) ends its gaps unrecoverable
        and returns their rows. `tokens` filters rows to the tokens this process
        follows (plus the job's own gap tokens, followed or not).

        Paging is by time, not by offset, because the rows have no id: a fill that
        two offset pages both return (rows inserted at the newest end shift every
        offset) would be indistinguishable from a genuine exact repeat and be stored
        twice. Pages come newest first; a full page of window [a, b] whose oldest
        second is m keeps its rows newer than m, and the next request asks for
        [a, m], so every second is taken whole from one answer, and pages never
        overlap. Only a single second holding more than a page is read by offset.
        """
        now = self.wall()
        if not self.jobs:
            self._plan(now)
        if self.ended:
            rows, self.ended = self.ended, []
            return Done([], rows, 0)
        if not self.jobs:
            return None
        job = self.jobs[0]
        start, end, markets = job.windows[-1]
        params = {"market": ",".join(markets), "start": start, "end": end,
                  "limit": self.page, "offset": job.offset, "takerOnly": "true"}
        self.requests += 1
        job.requests += 1
        try:
            payload = self.get_json(self.url, params)
        except Exception as err:
            if not refused(err):
                raise
            return self._refused(job, err)
        job.refusals = 0
        page = [r for r in payload if isinstance(r, dict)] if isinstance(payload, list) else []
        if isinstance(payload, list) and len(page) < len(payload):
            self.invalid_rows += len(payload) - len(page)
        full = isinstance(payload, list) and len(payload) >= self.page
        if not full:
            job.rows.extend(page)
            self._next_window(job)
        elif start == end:
            job.rows.extend(page)
            job.offset += self.page
            if job.offset + self.page > MAX_OFFSET:
                if len(markets) > 1:
                    # Too many fills in one second for offset paging: fewer markets at a time.
                    del job.rows[job.mark:]
                    half = len(markets) // 2
                    job.windows[-1:] = [(start, end, markets[half:]), (start, end, markets[:half])]
                    job.offset = 0
                else:
                    log.warning("more than %d fills in second %d for market %s: the rest is not reachable",
                                MAX_OFFSET, start, markets[0])
                    self._next_window(job)
        else:
            stamps = [r.get("timestamp") for r in page]
            oldest = min((t for t in stamps if isinstance(t, int) and not isinstance(t, bool)), default=None)
            if oldest is None or not start <= oldest <= end:
                # A page that ignores the window cannot be paged by time: take it as the
                # last page rather than retrying it forever (its bad rows are skipped).
                log.warning("Data API page outside window %d..%d; window ends here", start, end)
                job.rows.extend(page)
                self._next_window(job)
            elif oldest == end:  # the whole page is the newest second: read it alone by offset
                job.windows[-1:] = [(start, end - 1, markets), (end, end, markets)]
            else:
                job.rows.extend(r for r in page if r.get("timestamp") != oldest)
                job.windows[-1] = (start, oldest, markets)
                job.mark = len(job.rows)
        if job.windows:
            return None
        self.jobs.pop(0)
        # The job's own gap tokens count too: one unfollowed meanwhile still gets its gap filled.
        rows, bad = rows_from_data_api(job.rows, tokens | {g.token_id for g in job.gaps})
        self.invalid_rows += bad
        return self._finish(job, rows)

    def _refused(self, job: Job, err: Exception) -> Done:
        """A refusal for this job: split it by market, or give up on its one market after
        `refusals` in a row. Re-raises err while the job is still to be retried."""
        job.refusals += 1
        if len(job.conditions) > 1:
            self.jobs[0:1] = [Job(job.start, job.end, [c], [g for g in job.gaps if g.condition_id == c])
                              for c in job.conditions]
            raise err
        if job.refusals < self.refusals:
            raise err
        self.jobs.pop(0)
        self._give_up(job.gaps, f"Data API refused market {job.conditions[0]} {job.refusals} times: {err}")
        rows, self.ended = self.ended, []
        return Done([], rows, job.requests)

    def _give_up(self, gaps: list[Gap], reason: str) -> None:
        """End gaps unrecoverable: their rows (with the reason) wait in `ended` for step()."""
        reason = reason[:300]
        for gap in gaps:
            self.ended.append(gap.row(self.shard, unrecoverable=reason))
        self.unrecoverable += len(gaps)
        log.warning("%d gap(s) of %s unrecoverable: %s", len(gaps), sorted({g.token_id[:12] for g in gaps}), reason)

    @staticmethod
    def _next_window(job: Job) -> None:
        job.windows.pop()
        job.offset = 0
        job.mark = len(job.rows)

    def _finish(self, job: Job, rows: list[dict]) -> Done:
        number_repeats(rows)
        recovered_at = datetime.fromtimestamp(self.wall(), timezone.utc)
        seconds: dict[str, list[float]] = {}  # token -> its rows' times: one pass, not one per gap
        for r in rows:
            seconds.setdefault(r["token_id"], []).append(r["ts"].timestamp())
        gap_rows = []
        for gap in job.gaps:
            lo = math.floor(gap.started_at.timestamp())
            hi = math.ceil(gap.ended_at.timestamp())
            found = sum(1 for t in seconds.get(gap.token_id, ()) if lo <= t <= hi)
            gap_rows.append(gap.row(self.shard, recovered_at, found))
            self.recovered += 1
        self.trades_found += len(rows)
        return Done(rows, gap_rows, job.requests)

