"""polysim against the recorded payloads and the real APIs' query rules (one process per test)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websocket

DATA = Path(__file__).resolve().parent / "data"


def load(name: str):
    return json.loads((DATA / name).read_text())


def jtype(v) -> str:
    return {bool: "bool", int: "number", float: "number", str: "str", list: "list",
            dict: "dict", type(None): "null"}[type(v)]


def same_shape(sim: dict, real: dict, keys) -> None:
    """Every key in `keys` present in both with the same JSON type."""
    for k in keys:
        assert k in sim, f"simulator lacks {k!r}"
        assert jtype(sim[k]) == jtype(real[k]), f"{k}: sim {jtype(sim[k])} != real {jtype(real[k])}"


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read())


def get_error(url: str):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=30)
    return e.value.code, e.value.read()


def post(url: str, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def post_error(url: str, body):
    """(status, decoded JSON body) of a POST that must fail."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    return e.value.code, json.loads(e.value.read())


def wait_for(pred, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError("condition not met before the deadline")


def book_hash_ok(book: dict) -> bool:
    body = dict(book)
    body["hash"] = ""
    return hashlib.sha1(json.dumps(body, separators=(",", ":")).encode()).hexdigest() == book["hash"]


GAMMA_KEYS = ("id", "question", "conditionId", "slug", "endDate", "liquidity", "liquidityNum", "startDate", "description",
              "outcomes", "outcomePrices", "volume", "active", "closed", "createdAt", "updatedAt",
              "archived", "questionID", "enableOrderBook", "orderPriceMinTickSize", "orderMinSize",
              "volumeNum", "endDateIso", "startDateIso", "volume24hr", "clobTokenIds", "acceptingOrders",
              "negRisk", "umaResolutionStatuses", "bestBid", "bestAsk", "spread")


def test_gamma_market_shapes_match_recorded(polysim):
    sim = polysim(markets=12, seed=3, trade_rate=20.0)
    _, live = get(sim.gamma_url + "/markets?limit=100")
    real_live = load("gamma_market_live_559651_include_tag.json")
    assert live and all(m["closed"] is False for m in live)
    for m in live:
        same_shape(m, real_live, GAMMA_KEYS)
        outcomes, prices, tokens = (json.loads(m[k]) for k in ("outcomes", "outcomePrices", "clobTokenIds"))
        assert len(outcomes) == len(prices) == len(tokens) == 2
        assert all(isinstance(t, str) and t.isdigit() and 77 <= len(t) <= 78 for t in tokens)
        assert m["id"].isdigit() and len(m["conditionId"]) == 66 and m["conditionId"].startswith("0x")
        assert "umaResolutionStatus" not in m and "closedTime" not in m
    _, closed = get(sim.gamma_url + "/markets?closed=true&limit=100")
    real_closed = load("gamma_market_resolved_wta_2336501.json")
    assert closed and all(m["closed"] is True for m in closed)
    for m in closed:
        same_shape(m, real_closed, ("closedTime", "umaEndDate", "umaResolutionStatus", "automaticallyResolved")
                   + tuple(k for k in GAMMA_KEYS if k not in ("bestBid", "bestAsk", "spread", "liquidity", "liquidityNum")))
        assert m["umaResolutionStatus"] == "resolved"
        assert json.loads(m["outcomePrices"]) in (["1", "0"], ["0", "1"], ["0.5", "0.5"])
        # Postgres text form, like the recording: "2026-05-25 22:43:31+00"
        assert len(m["closedTime"]) == 22 and m["closedTime"][10] == " " and m["closedTime"].endswith("+00")
    _, one = get(sim.gamma_url + f"/markets/{live[0]['id']}?include_tag=true")
    assert one["$schema"] and isinstance(one["tags"], list) and one["tags"][0]["id"]


def test_gamma_query_rules(polysim):
    sim = polysim(markets=130, seed=4, trade_rate=1.0, closed_markets=5)
    _, page = get(sim.gamma_url + "/markets?limit=500")
    assert len(page) == 100, "limit is clamped to 100"
    _, rest = get(sim.gamma_url + "/markets?limit=100&offset=100")
    assert len(rest) == 30
    assert not {m["id"] for m in page} & {m["id"] for m in rest}
    code, body = get_error(sim.gamma_url + "/markets?offset=5000")
    assert code == 422 and json.loads(body)["type"] == "validation error"
    # closed defaults to false, even when asking for a closed market by id
    _, closed = get(sim.gamma_url + "/markets?closed=true")
    cid = closed[0]["id"]
    _, by_id = get(sim.gamma_url + f"/markets?id={cid}")
    assert by_id == []
    _, by_id = get(sim.gamma_url + f"/markets?id={cid}&closed=true")
    assert [m["id"] for m in by_id] == [cid]
    # keyset: after_cursor pages, no next_cursor on the last page, `cursor` is ignored
    seen, cursor, pages = [], None, 0
    while True:
        url = sim.gamma_url + "/markets/keyset?limit=50" + (f"&after_cursor={cursor}" if cursor else "")
        _, body = get(url)
        pages += 1
        seen += [m["id"] for m in body["markets"]]
        cursor = body.get("next_cursor")
        if not cursor:
            break
    assert pages == 3 and len(seen) == len(set(seen)) == 130
    _, again = get(sim.gamma_url + "/markets/keyset?limit=50&cursor=whatever")
    assert [m["id"] for m in again["markets"]] == seen[:50]
    code, _ = get_error(sim.gamma_url + "/markets/keyset?limit=50&offset=10")
    assert code == 422


def test_clob_books_prices_and_listing(polysim):
    sim = polysim(markets=6, seed=5, trade_rate=30.0, clob_page_size=5, closed_markets=6)
    _, markets = get(sim.gamma_url + "/markets")
    tokens = [t for m in markets for t in json.loads(m["clobTokenIds"])]
    real = load("clob_book_559651_yes.json")
    _, book = get(sim.clob_url + f"/book?token_id={tokens[0]}")
    same_shape(book, real, list(real))
    assert list(book) == list(real), "field order as sent (the hash depends on it)"
    assert book_hash_ok(book) and book_hash_ok(real)
    bids = [float(b["price"]) for b in book["bids"]]
    asks = [float(a["price"]) for a in book["asks"]]
    assert bids == sorted(bids) and asks == sorted(asks, reverse=True), "best level last"
    assert bids[-1] < asks[-1]
    _, mirror = get(sim.clob_url + f"/book?token_id={tokens[1]}")
    assert {(round(1 - float(a["price"]), 4), a["size"]) for a in mirror["asks"]} == \
        {(float(b["price"]), b["size"]) for b in book["bids"]}
    books = post(sim.clob_url + "/books", [{"token_id": t} for t in tokens] + [{"token_id": "123"}])
    assert sorted(b["asset_id"] for b in books) == sorted(tokens)
    code, body = get_error(sim.clob_url + "/book?token_id=123456")
    assert code == 404 and json.loads(body) == {"error": "No orderbook exists for the requested token id"}
    _, prices = get(sim.clob_url + f"/prices?token_ids={tokens[0]},{tokens[0]}&sides=BUY,SELL")
    assert prices[tokens[0]] == {"BUY": book["bids"][-1]["price"], "SELL": book["asks"][-1]["price"]} \
        or set(prices[tokens[0]]) == {"BUY", "SELL"}  # the book may have moved in between
    mids = post(sim.clob_url + "/midpoints", [{"token_id": t} for t in tokens])
    assert set(mids) == set(tokens) and all(isinstance(v, str) for v in mids.values())
    wait_for(lambda: len(sim.ledger()) > 0)
    last = post(sim.clob_url + "/last-trades-prices", [{"token_id": t} for t in tokens])
    assert {r["token_id"] for r in last} == set(tokens)
    assert all(set(r) == {"token_id", "price", "side"} and r["side"] in ("BUY", "SELL", "") for r in last)
    # listing pages with base64 offsets, ending with LTE=
    real_row = load("clob_markets_page_2024.json")["data"][0]
    cursor, rows = "MA==", []
    while cursor != "LTE=":
        _, page = get(sim.clob_url + f"/markets?next_cursor={cursor}")
        assert set(page) == {"data", "next_cursor", "limit", "count"}
        rows += page["data"]
        cursor = page["next_cursor"]
    assert len(rows) == 12
    for row in rows:
        same_shape(row, real_row, [k for k in real_row if k not in ("accepting_order_timestamp", "game_start_time")])
        same_shape(row["tokens"][0], real_row["tokens"][0], list(real_row["tokens"][0]))
    assert sum(t["winner"] for r in rows for t in r["tokens"]) >= 1
    resolved = next(r for r in rows if any(t["winner"] for t in r["tokens"]))
    real_one = load("clob_market_resolved_katana.json")
    _, one = get(sim.clob_url + f"/markets/{resolved['condition_id']}")
    same_shape(one, real_one, [k for k in real_one if k not in ("accepting_order_timestamp", "game_start_time")])
    assert one["closed"] is True and one["tokens"] == resolved["tokens"]
    real_simple = load("clob_simplified_market_row_559651.json")
    _, simple = get(sim.clob_url + "/simplified-markets")
    assert simple["next_cursor"] != "LTE=" or len(simple["data"]) == 12
    for row in simple["data"]:
        assert set(row) == set(real_simple)
        same_shape(row, real_simple, list(real_simple))


def test_data_trades_equal_ledger(polysim):
    sim = polysim(markets=5, seed=6, trade_rate=200.0, multi_fill=0.5)
    wait_for(lambda: len(sim.ledger()) >= 300)
    ledger = sim.ledger()
    real = load("data_api_trades_row.json")[0]
    by_market = {}
    for t in ledger:
        by_market.setdefault(t["market"], []).append(t)
    cids = list(by_market)
    got = []
    for cid in cids:
        _, rows = get(sim.data_url + f"/trades?market={cid}&limit=10000")
        for r in rows:
            same_shape(r, real, list(real))
        got += [r for r in rows if r["transactionHash"] in {t["transaction_hash"] for t in by_market[cid]}]
        ts = [r["timestamp"] for r in rows]
        assert ts == sorted(ts, reverse=True), "newest first"
    key_l = sorted((t["asset_id"], t["transaction_hash"], round(float(t["price"]), 4), float(t["size"]), t["side"],
                    int(t["timestamp"]) // 1000) for t in ledger)
    key_d = sorted((r["asset"], r["transactionHash"], round(r["price"], 4), r["size"], r["side"], r["timestamp"])
                   for r in got)
    assert key_l == key_d
    # several fills in one transaction, with exact repeats: collectors must keep an ordinal
    per_tx = {}
    for t in ledger:
        per_tx.setdefault(t["transaction_hash"], []).append((t["asset_id"], t["price"], t["size"], t["side"]))
    assert any(len(v) > 1 for v in per_tx.values())
    assert any(len(v) != len(set(v)) for v in per_tx.values())
    _, capped = get(sim.data_url + "/trades?limit=5")
    assert len(capped) == 5
    code, _ = get_error(sim.data_url + "/trades?offset=10001")
    assert code == 400


def ws_connect(sim, assets, custom=False, timeout=10):
    ws = websocket.create_connection(sim.ws_url, timeout=timeout, skip_utf8_validation=True)
    ws.send(json.dumps({"assets_ids": assets, "type": "market", "custom_feature_enabled": custom}))
    return ws


def ws_messages(ws, until, timeout=20.0):
    """Receive frames (arrays flattened) until until(msgs) is true; text frames kept as str."""
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = ws.recv()
        if frame in ("PONG",):
            out.append(frame)
        else:
            data = json.loads(frame)
            out += data if isinstance(data, list) else [data]
        if until(out):
            return out
    raise AssertionError(f"timed out; got {len(out)} messages")


def test_ws_subscribe_dump_trades_ping_unsubscribe(polysim):
    sim = polysim(markets=3, seed=7, trade_rate=50.0)
    _, markets = get(sim.gamma_url + "/markets")
    tokens = [t for m in markets for t in json.loads(m["clobTokenIds"])]
    ws = ws_connect(sim, tokens)
    first = json.loads(ws.recv())
    assert isinstance(first, list) and sorted(b["asset_id"] for b in first) == sorted(tokens)
    real = json.loads((DATA / "ws_market_messages.jsonl").read_text().splitlines()[0])
    neg_risk = {t: m["negRisk"] for m in markets for t in json.loads(m["clobTokenIds"])}
    for b in first:
        same_shape(b, real, list(real))
        # A WS book carries the hash of the REST summary of the same book (as the recorded
        # full-depth WS book verifies: tests/test_book_events.py), min_order_size and neg_risk in.
        rest = {k: b[k] for k in ("market", "asset_id", "timestamp", "hash", "bids", "asks")}
        rest.update(min_order_size="5", tick_size=b["tick_size"], neg_risk=neg_risk[b["asset_id"]],
                    last_trade_price=b["last_trade_price"])
        assert book_hash_ok(rest)
    msgs = ws_messages(ws, lambda ms: sum(m.get("event_type") == "last_trade_price" for m in ms if isinstance(m, dict)) >= 5)
    real_trade = json.loads((DATA / "ws_market_messages.jsonl").read_text().splitlines()[4])
    for m in msgs:
        if m.get("event_type") == "last_trade_price":
            same_shape(m, real_trade, list(real_trade))
            assert m["asset_id"] in tokens
    ws.send("PING")
    assert "PONG" in ws_messages(ws, lambda ms: "PONG" in ms)
    ws.send(json.dumps({"operation": "unsubscribe", "assets_ids": tokens}))
    time.sleep(0.5)
    ws.settimeout(1.0)
    with pytest.raises(websocket.WebSocketTimeoutException):
        while True:  # drain what was in flight, then silence
            ws.recv()
    ws.settimeout(10)
    ws.send(json.dumps({"operation": "subscribe", "assets_ids": tokens[:1]}))
    dump = json.loads(ws.recv())
    assert isinstance(dump, list) and [b["asset_id"] for b in dump] == tokens[:1]
    ws.close()


def test_data_api_windows_paging_and_jitter(polysim):
    sim = polysim(markets=3, seed=8, trade_rate=300.0, ts_jitter_ms=100)
    first = int(wait_for(lambda: sim.ledger())[0]["timestamp"]) // 1000
    lo, hi = first + 1, first + 2
    # The window is closed once a trade 2 s past its end is published (jitter is 0.1 s).
    wait_for(lambda: int(sim.ledger()[-1]["timestamp"]) // 1000 > hi + 1)
    ledger = sim.ledger()
    stamps = [int(t["timestamp"]) for t in ledger]
    assert stamps != sorted(stamps), "timestamps reordered like the real feed"
    cid = ledger[0]["market"]
    mine = [t for t in ledger if t["market"] == cid]
    want = sorted(t["transaction_hash"] + t["size"] for t in mine if lo <= int(t["timestamp"]) // 1000 <= hi)
    rows, offset = [], 0
    while True:
        _, page = get(sim.data_url + f"/trades?market={cid}&start={lo}&end={hi}&limit=50&offset={offset}")
        rows += page
        if not page:
            break
        offset += len(page)
    got = sorted(r["transactionHash"] + (str(r["size"]).rstrip("0").rstrip(".") if isinstance(r["size"], float)
                                         else str(r["size"])) for r in rows)
    assert got == want and want
    assert all(lo <= r["timestamp"] <= hi for r in rows)
    _, newest = get(sim.data_url + f"/trades?market={cid}&limit=20")
    ts = [r["timestamp"] for r in newest]
    assert ts == sorted(ts, reverse=True)
    _, side = get(sim.data_url + f"/trades?market={cid}&side=SELL&limit=100")
    assert side and {r["side"] for r in side} == {"SELL"}
    page = sim.get("/_sim/ledger?since=10&limit=5")
    assert [t["index"] for t in page["trades"]] == [10, 11, 12, 13, 14] and page["next"] == 15


def test_gamma_events_and_tags(polysim):
    sim = polysim(markets=12, seed=9, trade_rate=10.0)
    _, events = get(sim.gamma_url + "/events?limit=100")
    real = load("gamma_events_neg_risk_30829.json")[0]
    keys = ("id", "ticker", "slug", "title", "description", "startDate", "creationDate", "endDate", "active",
            "closed", "archived", "liquidity", "volume", "openInterest", "createdAt", "updatedAt", "volume24hr",
            "enableOrderBook", "negRisk", "enableNegRisk", "negRiskAugmented", "tags", "commentCount")
    neg = [e for e in events if e["negRisk"]]
    assert neg and all(len(e["markets"]) == 3 for e in neg)
    for e in events:
        same_shape(e, real, keys)
        for m in e["markets"]:
            same_shape(m, real["markets"][0], [k for k in GAMMA_KEYS if k in real["markets"][0]])
            assert "events" not in m
    assert {m["negRiskMarketID"] for m in neg[0]["markets"]} == {neg[0]["negRiskMarketID"]}
    _, markets = get(sim.gamma_url + "/markets?include_tag=true&limit=100")
    tag = markets[0]["tags"][0]["id"]
    _, tagged = get(sim.gamma_url + f"/markets?tag_id={tag}&include_tag=true&limit=100")
    assert tagged and all(any(t["id"] == tag for t in m["tags"]) for m in tagged)
    assert len(tagged) < len(markets)
    code, _ = get_error(sim.gamma_url + "/markets?tag_id=politics")
    assert code == 422
    _, ordered = get(sim.gamma_url + "/markets?order=updatedAt&ascending=false&limit=100")
    stamps = [m["updatedAt"] for m in ordered]
    assert stamps == sorted(stamps, reverse=True)


def test_ledger_text_equals_entries():
    """The fast ledger formatter and the dict form agree field for field."""
    from polysim.exchange import Exchange
    from polysim.options import Options

    x = Exchange(Options(markets=4, seed=2, trade_rate=500.0, multi_fill=0.5), 1786000000000)
    x.advance(2.0, 1786000002000)
    assert len(x.ledger) > 500
    fast = json.loads(x.ledger.json_range(0, len(x.ledger), x.markets))
    assert fast == [x.ledger.entry(i, x.markets) for i in range(len(x.ledger))]


def test_ledger_tsv_equals_the_json_ledger(polysim):
    """The compact read carries each entry's accounting fields, pages with since/limit and
    says where the next page starts; bad numbers get a 400."""
    sim = polysim(markets=4, seed=3, trade_rate=300.0, multi_fill=0.5)
    wait_for(lambda: sim.health()["trades"] >= 200)
    with urllib.request.urlopen(sim.base_url + "/_sim/ledger.tsv?since=50&limit=100", timeout=30) as r:
        assert r.headers["X-Ledger-Next"] == "150" and int(r.headers["X-Ledger-Total"]) >= 200
        lines = r.read().decode().splitlines()
    entries = sim.ledger(50)[:100]
    assert len(lines) == len(entries) == 100
    cols = ("index", "asset_id", "transaction_hash", "price", "size", "side", "timestamp", "published_ms")
    for line, entry in zip(lines, entries):
        assert line.split("\t") == [str(entry[c]) for c in cols]
    assert get_error(sim.base_url + "/_sim/ledger.tsv?since=x")[0] == 400
    health = sim.health()
    assert health["subscribed_assets"] == 0 and health["ws_connections_total"] == 0


def test_ws_book_text_equals_the_json_of_the_summary():
    """The directly formatted WS `book` (dumps and refreshes) is byte for byte the compact
    JSON of book_summary(ws=True), for both tokens, empty and traded books."""
    from polysim.exchange import Exchange
    from polysim.options import Options

    x = Exchange(Options(markets=60, seed=4, trade_rate=3000.0, multi_fill=0.5, book_rate=500.0), 1786000000000)
    for step in range(1, 100):
        x.advance(step * 0.01, 1786000000000 + step * 10)
    for m in x.markets:
        for token in (0, 1):
            for initial in (True, False):
                summary = x.book_summary(m, token, ws=True, initial=initial)
                assert x.book_text(m, token, initial) == json.dumps(summary, separators=(",", ":"))


def test_size_table_equals_size_text():
    from polysim.book import SIZE_MAX, SIZE_TEXT, size_text

    assert len(SIZE_TEXT) == SIZE_MAX + 1
    assert all(SIZE_TEXT[c] == size_text(c) for c in range(SIZE_MAX + 1))


def test_trades_do_not_depend_on_how_the_clock_is_stepped():
    """The same trades and trade messages (every field) whether the engine runs in small
    budgeted ticks or in one call, with every other event stream interleaved; each
    message equals its ledger entry."""
    from polysim.exchange import Exchange
    from polysim.options import Options

    class Sink:
        def __init__(self):
            self.trades = []

        def wants(self, asset):
            return True

        def emit(self, assets, text, custom_only=False):
            if '"last_trade_price"' in text:
                self.trades.append(text)

        def emit_global(self, text):
            pass

    opts = Options(markets=30, seed=9, trade_rate=2000.0, multi_fill=0.4, book_rate=200.0, resolve_rate=1.0,
                   new_market_rate=1.0, clob_delay=0.5, resolve_delay=0.5, ts_jitter_ms=50)
    runs = []
    for step, budget in ((0.003, 7), (0.05, 1 << 30), (5.0, 1 << 30)):
        sink = Sink()
        x = Exchange(opts, 1786000000000, sink)
        t = 0.0
        while x.t < 5.0:
            t = min(5.0, t + step)
            while x.advance(t, 1786000005000, budget) == budget:
                pass
        entries = json.loads(x.ledger.json_range(0, len(x.ledger), x.markets))
        runs.append((sink.trades, entries))
    trades, entries = runs[0]
    assert len(trades) == len(entries) > 5000
    for other in runs[1:]:
        assert other == runs[0]
    for text, entry in zip(trades, entries):
        msg = json.loads(text)
        assert msg == {k: entry[k] for k in msg}, (msg, entry)
        assert set(entry) - set(msg) == {"index", "published_ms"}


def test_clob_batch_requests_naming_more_than_max_batch_ids_answer_400(polysim, python):
    sim = polysim(markets=3, seed=4, trade_rate=0.0, max_batch_ids=4)
    _, markets = get(sim.gamma_url + "/markets")
    tokens = [t for m in markets for t in json.loads(m["clobTokenIds"])]
    assert len(tokens) == 6
    clob, too_many = sim.clob_url, {"error": "too many token ids (max 4)"}

    def items(n):
        return [{"token_id": t} for t in tokens[:n]]

    assert sorted(b["asset_id"] for b in post(clob + "/books", items(4))) == sorted(tokens[:4])
    assert post_error(clob + "/books", items(5)) == (400, too_many)
    assert len(post(clob + "/last-trades-prices", items(4))) == 4
    assert post_error(clob + "/last-trades-prices", items(5)) == (400, too_many)
    for path in ("/midpoints", "/spreads"):
        assert set(post(clob + path, items(4))) <= set(tokens[:4])
        assert post_error(clob + path, items(5)) == (400, too_many)
    # every item counts: POST /prices names a token once per side, so 2 tokens is the most here
    pairs = [{"token_id": t, "side": s} for t in tokens[:3] for s in ("BUY", "SELL")]
    assert set(post(clob + "/prices", pairs[:4])) == set(tokens[:2])
    assert post_error(clob + "/prices", pairs[:5]) == (400, too_many)
    # the GET forms that take id lists
    def queries(n):
        ids = ",".join(tokens[:n])
        return (f"/prices?token_ids={ids}&sides={','.join(['BUY'] * n)}", f"/midpoints?token_ids={ids}",
                f"/last-trades-prices?token_ids={ids}")

    for query in queries(4):
        assert get(clob + query)[0] == 200, query
    for query in queries(5):
        code, body = get_error(clob + query)
        assert (code, json.loads(body)) == (400, too_many), query
    # a limit below 1 is refused at the command line
    proc = subprocess.run([python, "-m", "polysim", "--max-batch-ids", "0"], capture_output=True, text=True,
                          timeout=60, cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.returncode == 2 and "--max-batch-ids" in proc.stderr
