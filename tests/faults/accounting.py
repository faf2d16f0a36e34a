"""Accounting: what the exchange published against what PostgreSQL holds.

Ground truth is polysim's ledger (every trade it published, `GET /_sim/ledger`).
A trade is *expected* when its token is in `followed_tokens` at the end of the
run, its exchange time is at or after that token's `since`, and it was published
before the run's cut-off (the moment faults stopped and every feed was live
again, minus a margin; trades published after it may still be in flight).

Trades are compared as multisets of the natural key without the ordinal
(token_id, tx_hash, price, size, side), prices and sizes as canonical decimal
text, so two identical fills of one transaction count twice on both sides:
  present    = expected trades found in `trades`
  missing    = expected trades not found
  duplicated = rows beyond what the ledger published for their key (any key,
               expected or not: a row the exchange never published counts too)
plus gaps opened / recovered / ended unrecoverable / still owed and the age of the
oldest owed one at the end (feed_gaps), restarts (spawns beyond
each supervisor start's first), spool bytes replayed (segments seen on disk
that were replayed and deleted) and rows rejected (rejected.jsonl lines).

`collect(...)` computes the figures, `table(figures)` formats them as the text
table every run prints, `write(figures, path)` saves table + JSON.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import psycopg2

from workers.messages import canon_decimal
from tests.conftest import query as _query

UTC = timezone.utc


def trade_key(token, tx, price, size, side) -> tuple:
    return (str(token), (tx or "").lower() or None, canon_decimal(str(price)), canon_decimal(str(size)), side)




class SpoolWatcher:
    """Samples <data_dir>/spool/*/ every `every` s: the largest size seen of each segment
    file; a segment seen and later gone was replayed (or, if its rows are missing, lost)."""

    def __init__(self, spool_dir: str | os.PathLike, every: float = 0.25):
        self.root = Path(spool_dir)
        self.every = every
        self.sizes: dict[str, int] = {}
        self.max_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-watcher", daemon=True)

    def start(self) -> "SpoolWatcher":
        self._thread.start()
        return self

    def sample(self) -> None:
        total = 0
        try:
            for seg in self.root.glob("*/*.seg"):
                try:
                    size = seg.stat().st_size
                except FileNotFoundError:
                    continue
                total += size
                key = str(seg)
                if size > self.sizes.get(key, -1):
                    self.sizes[key] = size
        except OSError:
            return
        self.max_total = max(self.max_total, total)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def replayed_bytes(self) -> int:
        return sum(size for path, size in self.sizes.items() if not os.path.exists(path))

    def pending_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*/*.seg") if p.exists())


def rejected_rows(spool_dir: str | os.PathLike) -> int:
    return sum(len(p.read_text().splitlines()) for p in Path(spool_dir).glob("*/rejected.jsonl"))


def collect(ledger, dsn: str, *, cutoff_ms: int | None = None, restarts: int = 0,
            spool: SpoolWatcher | None = None, spool_dir: str | os.PathLike | None = None,
            extra: dict | None = None) -> dict:
    """The figures of one run (see the module docstring). `ledger` is any iterable of ledger
    entries (a list, or a generator paging /_sim/ledger), read once."""
    followed = {t: since for t, since in _query(dsn, "SELECT token_id, since FROM followed_tokens")}
    expected: Counter = Counter()
    published_all: Counter = Counter()
    ledger_count = 0
    for t in ledger:
        ledger_count += 1
        key = trade_key(t["asset_id"], t["transaction_hash"], t["price"], t["size"], t["side"])
        published_all[key] += 1
        token = t["asset_id"]
        if token not in followed:
            continue
        if cutoff_ms is not None and t["published_ms"] > cutoff_ms:
            continue
        since = followed[token]
        ts = datetime.fromtimestamp(int(t["timestamp"]) / 1000, UTC)
        if since is not None and ts < since:
            continue
        expected[key] += 1
    stored: Counter = Counter()
    by_source: Counter = Counter()
    for token, tx, price, size, side, source in _query(
            dsn, "SELECT token_id, tx_hash, price::text, size::text, side, source FROM trades"):
        stored[trade_key(token, tx, price, size, side)] += 1
        by_source[source] += 1
    missing = sum(max(0, n - stored[k]) for k, n in expected.items())
    present = sum(min(n, stored[k]) for k, n in expected.items())
    duplicated = sum(max(0, n - published_all[k]) for k, n in stored.items())
    missing_examples = [k for k, n in expected.items() if stored[k] < n][:5]
    dup_examples = [k for k, n in stored.items() if n > published_all[k]][:5]
    dup_rows = []
    for k in dup_examples[:3]:
        dup_rows.append([list(k), published_all[k], [
            [str(x) for x in r] for r in _query(
                dsn, "SELECT ordinal, source, ts, received_at FROM trades WHERE token_id = %s AND tx_hash"
                     " IS NOT DISTINCT FROM %s AND price = %s::numeric AND size = %s::numeric AND side = %s"
                     " ORDER BY ordinal", k)]])
    gaps = _query(dsn, "SELECT count(*), count(recovered_at), count(*) FILTER (WHERE ended_at IS NULL),"
                       " coalesce(sum(recovered_trades), 0),"
                       " count(*) FILTER (WHERE unrecoverable IS NOT NULL AND recovered_at IS NULL),"
                       " count(*) FILTER (WHERE recovered_at IS NULL AND unrecoverable IS NULL),"
                       " extract(epoch FROM now() - min(started_at) FILTER (WHERE recovered_at IS NULL"
                       " AND unrecoverable IS NULL)) FROM feed_gaps")[0]
    figures = {
        "ledger_trades": ledger_count,
        "followed_tokens": len(followed),
        "published_followed": sum(expected.values()),
        "present": present,
        "missing": missing,
        "duplicated": duplicated,
        "rows_in_trades": sum(stored.values()),
        "rows_ws": by_source.get("ws", 0),
        "rows_backfill": by_source.get("backfill", 0),
        "gaps_opened": gaps[0],
        "gaps_recovered": gaps[1],
        "gaps_still_open": gaps[2],
        "gaps_unrecovered": gaps[0] - gaps[1],
        "gaps_unrecoverable": gaps[4],
        "gaps_owed": gaps[5],
        "gaps_oldest_owed_s": round(float(gaps[6]), 1) if gaps[6] is not None else 0.0,
        "trades_recovered_by_backfill": int(gaps[3]),
        "restarts": restarts,
        "spool_bytes_replayed": spool.replayed_bytes() if spool else 0,
        "spool_bytes_peak": spool.max_total if spool else 0,
        "spool_bytes_left": spool.pending_bytes() if spool else 0,
        "rows_rejected": rejected_rows(spool_dir) if spool_dir else 0,
        "missing_examples": [list(k) for k in missing_examples],
        "missing_keys": [list(k) for k, n in expected.items() if stored[k] < n][:1000],
        "duplicated_examples": [list(k) for k in dup_examples],
        "duplicated_rows": dup_rows,  # [key, times published, [[ordinal, source, ts, received_at], ...]]
    }
    figures.update(extra or {})
    return figures


ORDER = ["ledger_trades", "followed_tokens", "published_followed", "present", "missing", "duplicated",
         "rows_in_trades", "rows_ws", "rows_backfill", "gaps_opened", "gaps_recovered", "gaps_unrecoverable",
         "gaps_owed", "gaps_oldest_owed_s", "gaps_still_open",
         "trades_recovered_by_backfill", "restarts", "spool_bytes_replayed", "spool_bytes_peak",
         "spool_bytes_left", "rows_rejected"]


def table(figures: dict, title: str = "accounting") -> str:
    """The figures as an aligned two-column text table (known keys first, then the rest)."""
    keys = [k for k in ORDER if k in figures] + sorted(
        k for k in figures if k not in ORDER and not k.endswith(("_examples", "_rows", "_keys")))
    width = max(len(k) for k in keys)
    rule = "-" * (width + 16)
    lines = [rule, f"{title}", rule]
    for k in keys:
        v = figures[k]
        lines.append(f"{k:<{width}}  {v:>12}" if isinstance(v, (int, float)) else f"{k:<{width}}  {v}")
    for k in ("missing_examples", "duplicated_examples", "duplicated_rows"):
        if figures.get(k):
            lines.append(f"{k}: {figures[k]}")
    lines.append(rule)
    return "\n".join(lines)


def write(figures: dict, path: str | os.PathLike, title: str = "accounting") -> Path:
    """Write the table and a JSON line to path; returns the path."""
    path = Path(path)
    path.write_text(table(figures, title) + "\n" + json.dumps(figures, default=str) + "\n")
    return path


def now_ms() -> int:
    return int(time.time() * 1000)
