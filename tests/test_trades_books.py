"""Tick-level books: the trade listener with `books = true` against polysim, with drops,
stalls, truncated frames and unknown fields injected; every book rebuilt from
book_events at a sampled instant equals the book polysim's REST served then, outside
the recorded gaps; `collectord book` prints it and refuses bad input in one line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2

from tests.test_trades import db, follow, query, start, stop, wait_for  # noqa: F401  (db is a fixture)
from workers.storage.replay import book_at

ROOT = Path(__file__).resolve().parent.parent
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def add_markets(sim, dsn: str) -> None:
    """The markets rows the hash check reads (neg_risk, orderMinSize), as the markets collector stores them."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        for m in sim.get("/gamma/markets?closed=false&limit=100"):
            cur.execute("INSERT INTO markets (market_id, condition_id, neg_risk, raw) VALUES (%s, %s, %s, %s)",
                        (m["id"], m["conditionId"], m["negRisk"], json.dumps(m)))
    conn.close()


def best_first(book: dict) -> tuple[list, list]:
    """A REST book's sides as (price, size) text pairs, best level first."""
    return ([(lv["price"], lv["size"]) for lv in reversed(book["bids"])],
            [(lv["price"], lv["size"]) for lv in reversed(book["asks"])])


def sample(sim, tokens: list[str], until: float, out: list) -> None:
    """POST /clob/books for every token, again and again until `until` (monotonic)."""
    body = [{"token_id": t} for t in tokens]
    while time.monotonic() < until:
        try:
            out += sim.post("/clob/books", body, timeout=10)
        except Exception:  # a fault window may refuse a request: the next one counts
            pass
        time.sleep(0.05)


def test_rebuilt_books_equal_polysim_books_outside_gaps(polysim, db, tmp_path):
    sim = polysim(markets=5, seed=11, trade_rate=40.0, multi_fill=0.4, book_rate=60.0)
    tokens = follow(sim, db)
    add_markets(sim, db)
    pid = start(sim, db, tmp_path, books="true", assets_per_socket=4, stall_timeout="1.0")
    samples: list[dict] = []
    try:
        wait_for(lambda: query(db, "SELECT count(*) FROM book_events WHERE kind = 'p'")[0][0] > 50, 20,
                 what="book events")
        sampler = threading.Thread(target=sample, args=(sim, list(tokens), time.monotonic() + 11, samples))
        sampler.start()
        time.sleep(2.0)
        sim.faults(surface="ws", kind="drop")
        time.sleep(2.5)
        sim.faults(surface="ws", kind="stall", seconds=2)
        time.sleep(3.0)
        # hostile frames: truncated books (malformed) and unknown fields on every message
        sim.faults(surface="ws", kind="malformed", duration=2)
        sim.faults(surface="ws", kind="unknown_events", duration=2)
        sampler.join(30)
        sim.faults(clear=True)
        last = max(int(s["timestamp"]) for s in samples)
        # the listener vouches for the last sampled instant (its coverage mark passed it)
        wait_for(lambda: query(db, "SELECT count(*) FROM feed_coverage WHERE covered_until >"
                                   " to_timestamp(%s / 1000.0)", (last,))[0][0] == len(tokens), 20,
                 what="coverage past the samples")
        assert stop(pid) == 0
        pid = None
    finally:
        if pid is not None:
            stop(pid)
    reasons = {g[0] for g in query(db, "SELECT reason FROM feed_gaps")}
    # a stalled socket is noticed by its silence or by its missing PONG, whichever comes first
    assert "disconnect" in reasons and reasons & {"stall", "pong"}, reasons
    distinct = {(s["asset_id"], s["timestamp"]): s for s in samples}
    picked = random.Random(1).sample(sorted(distinct), min(400, len(distinct)))
    compared = in_gap = 0
    conn = psycopg2.connect(db)
    try:
        for token, ts in picked:
            rest = distinct[(token, ts)]
            at = EPOCH + timedelta(milliseconds=int(ts))
            book = book_at(conn, token, at)
            if book.gap is not None:
                in_gap += 1
                continue
            assert book.hash_mismatches == 0 and book.hash_unverified == 0, (token, ts, book)
            assert (book.bids, book.asks) == best_first(rest), (token, ts)
            assert (book.hash, round(book.ts.timestamp() * 1000)) == (rest["hash"], int(ts))
            compared += 1
    finally:
        conn.close()
    assert compared >= 150 and in_gap >= 1, (compared, in_gap)
    # every stored row is whole: a book has both sides, a change at least one, sizes >= 0
    bad = query(db, "SELECT count(*) FROM book_events WHERE (kind = 'b' AND (bids IS NULL OR asks IS NULL))"
                    " OR (kind = 'p' AND bids IS NULL AND asks IS NULL)"
                    " OR EXISTS (SELECT 1 FROM unnest(coalesce(bids, '{}') || coalesce(asks, '{}')) v WHERE v < 0)")
    assert bad == [(0,)]


def test_book_command(polysim, db, tmp_path):
    """`collectord book` prints the rebuilt book (and as JSON); a bad time, a bad token id and
    an unknown token each get one line and their exit code, never a traceback."""
    sim = polysim(markets=2, seed=12, trade_rate=10.0, book_rate=20.0)
    tokens = follow(sim, db)
    add_markets(sim, db)
    pid = start(sim, db, tmp_path, books="true")
    try:
        wait_for(lambda: query(db, "SELECT count(*) FROM book_events WHERE kind = 'p'")[0][0] > 10, 20,
                 what="book events")
    finally:
        assert stop(pid) == 0
    token = sorted(tokens)[0]
    at = query(db, "SELECT max(ts) FROM book_events WHERE token_id = %s", (token,))[0][0]
    conf = tmp_path / "c.conf"
    conf.write_text(f"[collectord]\ndsn = {db}\ndata_dir = {tmp_path}\npidfile = {tmp_path}/c.pid\n")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "collectord", "-c", str(conf), "book", *args],
                              capture_output=True, text=True, timeout=60, cwd=str(ROOT))

    ok = run(token, "--at", at.isoformat())
    assert ok.returncode == 0, ok.stderr
    assert f"book of {token}" in ok.stdout and "0 mismatch(es)" in ok.stdout and "bid size" in ok.stdout
    js = run(token, "--at", str(round(at.timestamp() * 1000)), "--json")
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    want = book_at(psycopg2.connect(db), token, at)
    assert doc["bids"] == [list(x) for x in want.bids] and doc["asks"] == [list(x) for x in want.asks]
    for args, code, words in (((token, "--at", "yesterday-ish"), 2, "is not a time"),
                              (("12ab", "--at", "now"), 2, "is not a token id"),
                              (("123456", "--at", "now"), 1, "no book events recorded"),
                              ((token, "--at", "2001-01-01"), 1, "no book checkpoint")):
        bad = run(*args)
        assert bad.returncode == code, (args, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in bad.stderr, bad.stderr
