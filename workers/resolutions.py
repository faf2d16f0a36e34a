"""Resolutions from Gamma: classify()/parse() and the resolutions collector.

classify(market) is pure and decides, for one Gamma market object, what the
exchange says about its outcome (polymarket-api.md §2.5). The rules, in order:

1. Not `closed`: "open". `closed` alone proves nothing either (rule 4).
2. `umaResolutionStatus == "resolved"` (current, UMA-settled markets):
   - `outcomePrices` one-hot (one "1", the rest "0") -> "resolved": the winner is
     the outcome at the 1, its token `clobTokenIds[i]`, payouts the vector;
   - every price equal (0.5/0.5, the 50-50 rule) -> "void": no winner, payouts
     the split;
   - anything else -> "pending" (not a shape a settled market has; asked again).
3. `umaResolutionStatus == "disputed"` -> "disputed"; any other value
   ("proposed", ...) -> "pending". Neither is final: the proposal's prices are not.
4. No `umaResolutionStatus`:
   - AMM-era markets (2020-21: a non-empty `marketMakerAddress`, settled before
     UMA statuses existed): one-hot -> "resolved"; all equal -> "void"; all
     "0" -> "unknown" (closed with no payout on record: Gamma does not say who
     won, so no winner is invented; the row records that it is settled and
     unknown, e.g. fixture gamma_market_legacy_closed_zero_zero_12); fractional
     prices summing to 1 -> "scalar" (a Long/Short market pays out proportionally:
     the vector IS the resolution, no single winner; fixture ..._scalar_43);
     otherwise "pending".
   - Current markets: "pending" (closed, awaiting a proposal).

Final states ("resolved", "void", "scalar", "unknown") produce a `resolutions`
row; the collector writes it once and updates it when a later answer differs
(the exchange corrected itself). "disputed" on a market with a final row,
seen on consecutive polls (Gamma caches up to 5 min), downgrades that row.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from workers import payload as p
from workers.errors import PayloadError
from workers.markets import market_objects, outcome_tokens
from workers.polling import PollingWorker, answered_batches, utcnow
from workers.storage.followed import resolution_rows, unsettled_markets

log = logging.getLogger(__name__)

TABLE = "resolutions"
FINAL = ("resolved", "void", "scalar", "unknown")


@dataclass(frozen=True)
class Verdict:
    """What one market object says: state, and the row when the state is final."""

    market_id: str
    condition_id: str
    state: str  # open | pending | disputed | resolved | void | scalar | unknown
    row: dict | None = None
    reason: str = ""


def _payouts(obj: dict) -> list[Decimal] | None:
    values = p.json_list(obj.get("outcomePrices"), "outcomePrices")
    if values is None:
        return None
    return [p.decimal(v, "outcomePrices[]", empty_ok=False) for v in values]


def _shape(payouts: list[Decimal] | None) -> str:
    """one-hot | split | zero | fractional | none."""
    if not payouts:
        return "none"
    if any(v < 0 or v > 1 for v in payouts):
        return "none"
    ones = sum(1 for v in payouts if v == 1)
    zeros = sum(1 for v in payouts if v == 0)
    if ones == 1 and zeros == len(payouts) - 1:
        return "one-hot"
    if zeros == len(payouts):
        return "zero"
    if len(payouts) > 1 and len(set(payouts)) == 1 and sum(payouts) == 1:
        return "split"
    if sum(payouts) == 1:
        return "fractional"
    return "none"


def classify(obj: Any, seen_at: datetime | None = None) -> Verdict:
    """One Gamma market object -> Verdict (see the module doc). Raises PayloadError."""
    if not isinstance(obj, dict):
        raise PayloadError(f"market: expected an object, got {type(obj).__name__}")
    market_id = p.ident(obj.get("id"), "id")
    condition_id = p.ident(obj.get("conditionId"), "conditionId")
    closed = p.opt_bool(obj.get("closed"), "closed")
    if not closed:
        return Verdict(market_id, condition_id, "open")
    uma = (p.opt_text(obj.get("umaResolutionStatus")) or "").strip().lower()
    payouts = _payouts(obj)
    shape = _shape(payouts)
    legacy = not uma and bool(p.opt_text(obj.get("marketMakerAddress")))
    if uma == "resolved":
        state = {"one-hot": "resolved", "split": "void"}.get(shape, "pending")
    elif uma == "disputed":
        state = "disputed"
    elif uma:
        state = "pending"
    elif legacy:
        state = {"one-hot": "resolved", "split": "void", "zero": "unknown", "fractional": "scalar"}.get(
            shape, "pending")
    else:
        state = "pending"
    if state not in FINAL:
        reason = f"umaResolutionStatus={uma or 'absent'}, outcomePrices {shape}"
        return Verdict(market_id, condition_id, state, None, reason)

    outcomes = p.json_list(obj.get("outcomes"), "outcomes") or []
    if len(outcomes) != len(payouts):
        raise PayloadError(f"outcomePrices has {len(payouts)} values for {len(outcomes)} outcomes")
    tokens = outcome_tokens(obj)
    winner = winning_token = None
    if state == "resolved":
        index = next(i for i, v in enumerate(payouts) if v == 1)
        winner = p.clean_text(str(outcomes[index]))
        winning_token = tokens[index][0] if tokens else None
    resolved_at = (p.timestamp(obj.get("umaEndDate"), "umaEndDate") or p.timestamp(obj.get("closedTime"), "closedTime")
                   or p.timestamp(obj.get("updatedAt"), "updatedAt"))
    row = {
        "market_id": market_id,
        "condition_id": condition_id,
        "winning_token_id": winning_token,
        "winning_outcome": winner,
        "payouts": [p.text(v) for v in payouts],
        "status": state,
        "resolved_at": resolved_at,
        "updated_at": seen_at,
    }
    return Verdict(market_id, condition_id, state, row)


def parse(payload: Any, seen_at: datetime | None = None) -> tuple[p.Parsed, list[Verdict]]:
    """A Gamma payload -> (Parsed with `resolutions` rows for final states, every Verdict)."""
    out = p.Parsed(rows={TABLE: []})
    verdicts: list[Verdict] = []
    try:
        items = list(market_objects(payload))
    except PayloadError as err:
        out.skip(f"payload: {err}")
        return out, verdicts
    for obj, _event in items:
        try:
            verdict = classify(obj, seen_at)
        except PayloadError as err:
            mid = obj.get("id") if isinstance(obj, dict) else None
            out.skip(f"market {mid!r}: {err}")
            continue
        verdicts.append(verdict)
        if verdict.row is not None:
            out.add(TABLE, verdict.row)
    return out, verdicts


def reconcile(verdict: Verdict, stored: dict | None, disputed_seen: int, downgrade_after: int,
              now: datetime) -> tuple[str, dict | None]:
    """What to write for one verdict, given the stored row -> (action, row or None).

    Actions: "new" (first final verdict: write it), "same" (nothing changed),
    "corrected" (the exchange now says something else: rewrite), "disputed" (a
    final row is disputed again: counted, not yet acted on), "withdrawn" (the
    dispute was seen downgrade_after polls in a row, counting this one: the row
    becomes status "disputed" with no winner and no payouts until it settles
    again), "pending" (not final and nothing stored to change).
    """
    if verdict.row is not None:
        if stored is None:
            return "new", verdict.row
        if same_outcome(stored, verdict.row):
            return "same", None
        return "corrected", verdict.row
    if verdict.state == "disputed" and stored is not None and stored.get("status") in FINAL:
        if disputed_seen + 1 >= downgrade_after:
            return "withdrawn", {"market_id": verdict.market_id, "condition_id": verdict.condition_id,
                                 "winning_token_id": None, "winning_outcome": None, "payouts": None,
                                 "status": "disputed", "resolved_at": None, "updated_at": now}
        return "disputed", None
    return "pending", None


def same_outcome(a: dict, b: dict) -> bool:
    """True when two resolution rows say the same thing (status, winner, payouts)."""
    def norm(row):
        payouts = row.get("payouts")
        if isinstance(payouts, list):
            payouts = [p.decimal(v) for v in payouts]
        return row.get("status"), row.get("winning_token_id"), row.get("winning_outcome"), payouts
    return norm(a) == norm(b)


class ResolutionsCollector(PollingWorker):
    """Asks Gamma about closed markets that are not settled yet, writes each resolution once.

    Each cycle, in order:
      1. from the database, up to max_markets closed markets with no final
         resolution row, or one first seen within recheck_hours (the exchange
         may still correct it): half the most recently closed (a new closure is
         seen within a cycle, however long the backlog), half walking the whole
         set by market_id across cycles;
      2. per `batch` ids: GET /markets?id=..&id=..&closed=true (a closed market
         is only returned with closed=true), classify() each; a chunk refused
         whole (e.g. 414, a URL too long) is split (PollingWorker.batches);
      3. a final verdict is written when the market has no row or its row says
         something else (a correction, logged); "disputed" on a market with a
         final row, seen downgrade_after polls in a row (Gamma caches up to
         5 min), rewrites the row as disputed with no winner until it settles.
    """

    OPTIONS = {
        **PollingWorker.OPTIONS,
        "interval": (float, 60.0),
        "batch": (int, 40),  # ids per request (long id lists hit URL and Cloudflare limits)
        "max_markets": (int, 2000),
        "recheck_hours": (float, 72.0),
        "downgrade_after": (int, 2),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._cursor = ""
        self._disputed: dict[str, int] = {}

    @property
    def gamma(self) -> str:
        return self.urls.get("gamma_url", "https://gamma-api.polymarket.com").rstrip("/")

    def ask(self, chunk: list[str]) -> Any:
        """GET /markets?id=...&closed=true for one chunk of market ids; raises HttpError."""
        params = [("id", m) for m in chunk] + [("closed", "true"), ("limit", str(len(chunk)))]
        return self.client.get_json(f"{self.gamma}/markets", params)

    def cycle(self, figures: dict) -> None:
        now = utcnow()
        limit = max(2, self.options["max_markets"])
        recent, rotation = unsettled_markets(self.db, self._cursor, limit,
                                             now - timedelta(hours=self.options["recheck_hours"]))
        # the rotation walks the whole backlog across cycles; wrap around after its last page
        self._cursor = rotation[-1] if len(rotation) == limit - limit // 2 else ""
        ids = list(dict.fromkeys(recent + rotation))
        states: Counter = Counter()
        written = corrected = malformed = unanswered = 0
        for chunk, data in self.batches(ids, self.options["batch"], self.ask, figures):
            parsed, verdicts = parse(data, seen_at=utcnow())
            asked = set(chunk)
            verdicts = [v for v in verdicts if v.market_id in asked]  # only what was asked about
            unanswered += len(asked - {v.market_id for v in verdicts})  # reopened, or a malformed answer
            if parsed.skipped:
                malformed += parsed.skipped
                self.skipped("gamma resolutions", parsed)
            stored = resolution_rows(self.db, [v.market_id for v in verdicts])
            rows = []
            for v in verdicts:
                states[v.state] += 1
                old = stored.get(v.market_id)
                action, row = reconcile(v, old, self._disputed.get(v.market_id, 0), self.options["downgrade_after"],
                                        utcnow())
                if action == "disputed":
                    self._disputed[v.market_id] = self._disputed.get(v.market_id, 0) + 1
                else:
                    self._disputed.pop(v.market_id, None)
                if action in ("corrected", "withdrawn"):
                    corrected += 1
                    log.warning("%s: market %s resolution %s: %s %s -> %s %s", self.name, v.market_id, action,
                                old.get("status"), old.get("winning_outcome"), row["status"], row["winning_outcome"])
                if row is not None:
                    rows.append(row)
            self.writer.add(TABLE, rows)
            written += len(rows)
        figures.update(checked=len(ids), written=written, corrected=corrected, malformed=malformed,
                       unanswered=unanswered, states=dict(states))
        if answered_batches(figures) or not ids:
            self.success()
