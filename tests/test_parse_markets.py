"""workers.markets.parse and workers.selection against the recorded Gamma payloads."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from workers import markets, selection
from workers.selection import Candidate

DATA = Path(__file__).resolve().parent / "data"
GAMMA = sorted(DATA.glob("gamma_*.json"))
UTC = timezone.utc


def load(name):
    return json.loads((DATA / name).read_text())


def by_id(parsed):
    return {row["market_id"]: row for row in parsed.table("markets")}


@pytest.mark.parametrize("path", GAMMA, ids=lambda p: p.name)
def test_every_gamma_fixture_parses_whole(path):
    payload = json.loads(path.read_text())
    out = markets.parse(payload)
    assert out.skipped == 0, out.problems
    rows = out.table("markets")
    assert rows
    for row in rows:
        assert row["raw"]["id"] == row["market_id"]
        tokens = [t for t in out.table("tokens") if t["market_id"] == row["market_id"]]
        assert [t["outcome_index"] for t in tokens] == list(range(len(row["outcomes"])))
        assert [t["outcome"] for t in tokens] == row["outcomes"]
        for t in tokens:
            assert isinstance(t["token_id"], str) and t["token_id"].isdigit() and len(t["token_id"]) <= 78


def test_live_market_fields_decoded_exactly():
    out = markets.parse(load("gamma_market_live_559651_include_tag.json"))
    row = by_id(out)["559651"]
    assert row["condition_id"] == "0xa467b14d51f01b957109d9cbb1d6c124fab2a089d52ed8f471d23c2812e743b7"
    assert row["question_id"] == "0x1d925c6933062c2e38031293612d8680ffa097c5d3ba2f87a8ecc565bd47183e"
    assert row["outcomes"] == ["Yes", "No"]
    assert row["volume_24h"] == Decimal("14542.225487") and isinstance(row["volume_24h"], Decimal)
    assert row["liquidity"] == Decimal("237253.02375")
    assert row["active"] is True and row["closed"] is False and row["archived"] is False
    assert row["neg_risk"] is False
    assert row["end_date"] == datetime(2026, 12, 31, tzinfo=UTC)
    assert row["created_at"] == datetime(2025, 7, 3, 20, 25, 56, 889606, tzinfo=UTC)
    assert row["closed_time"] is None
    assert {"id": "100265", "label": "Geopolitics", "slug": "geopolitics"} in row["tags"]
    tokens = out.table("tokens")
    assert tokens[0] == {
        "token_id": "32338220190071351435772801779725302244575775216413325951443816017994629993401",
        "market_id": "559651",
        "condition_id": row["condition_id"],
        "outcome": "Yes",
        "outcome_index": 0,
    }
    assert tokens[1]["token_id"] == "25659310674993675562345759665114759892400026242514633218387667107987341231962"
    assert tokens[1]["outcome"] == "No"


def test_postgres_text_closed_time_and_named_outcomes():
    row = by_id(markets.parse(load("gamma_market_resolved_wta_2336501.json")))["2336501"]
    assert row["closed_time"] == datetime(2026, 5, 25, 22, 43, 31, tzinfo=UTC)
    assert row["uma_resolution_status"] == "resolved"
    assert row["outcomes"] == ["Hanyu Guo", "McCartney Kessler"]
    assert row["closed"] is True


def test_legacy_market_without_neg_risk_key_stays_unknown():
    row = by_id(markets.parse(load("gamma_market_legacy_closed_zero_zero_12.json")))["12"]
    assert row["neg_risk"] is None  # absent is not false
    assert row["closed_time"] == datetime(2020, 11, 2, 16, 31, 1, tzinfo=UTC)
    assert row["uma_resolution_status"] is None
    scalar = markets.parse(load("gamma_market_legacy_closed_scalar_43.json"))
    assert [t["outcome"] for t in scalar.table("tokens")] == ["Long", "Short"]


def test_neg_risk_event_markets_inherit_event_id_and_tags():
    out = markets.parse(load("gamma_events_neg_risk_30829.json"))
    rows = by_id(out)
    assert set(rows) == {"559657", "559659"}
    for row in rows.values():
        assert row["event_id"] == "30829"
        assert row["neg_risk"] is True
        assert {"id": "2", "label": "Politics", "slug": "politics"} in row["tags"]
    assert len(out.table("tokens")) == 4


def test_market_event_id_from_embedded_events():
    row = by_id(markets.parse(load("gamma_market_live_btc_5m_1557558.json")))["1557558"]
    assert row["event_id"] == "260654"
    assert row["outcomes"] == ["Up", "Down"]


def test_keyset_page_and_native_arrays():
    obj = load("gamma_market_live_559651_include_tag.json")
    native = copy.deepcopy(obj)
    native["id"] = "1"
    native["conditionId"] = "0x01"
    native["outcomes"] = ["Yes", "No"]
    native["clobTokenIds"] = ["11", "22"]
    out = markets.parse({"markets": [obj, native], "next_cursor": "abc", "$schema": "x"})
    assert out.skipped == 0
    assert [t["token_id"] for t in out.table("tokens") if t["market_id"] == "1"] == ["11", "22"]


def test_malformed_markets_are_skipped_whole_and_counted():
    good = load("gamma_market_resolved_katana_1460332.json")
    no_condition = dict(good, id="900", conditionId="")
    mismatch = dict(good, id="901", clobTokenIds='["1", "2", "3"]')
    bad_json = dict(good, id="902", outcomes="[Yes, No")
    bad_time = dict(good, id="903", createdAt="yesterday")
    bad_token = dict(good, id="904", clobTokenIds='["0x12", "13"]')
    out = markets.parse([good, no_condition, "garbage", None, mismatch, bad_json, bad_time, bad_token])
    assert [r["market_id"] for r in out.table("markets")] == ["1460332"]
    assert {t["market_id"] for t in out.table("tokens")} == {"1460332"}  # no half-written market
    assert out.skipped == 7
    assert out.problems and all(isinstance(x, str) for x in out.problems)


def test_whole_bad_payload_is_one_skip_not_an_exception():
    for payload in ("<html>403</html>", 42, None):
        out = markets.parse(payload)
        assert out.table("markets") == [] and out.skipped == 1


def test_repeated_market_gives_one_row_and_empty_strings_are_null():
    obj = dict(load("gamma_market_live_559651_include_tag.json"), closedTime="", volume24hr=None, volume24hrClob=None)
    out = markets.parse([obj, obj])
    assert len(out.table("markets")) == 1 and len(out.table("tokens")) == 2
    row = out.table("markets")[0]
    assert row["closed_time"] is None and row["volume_24h"] is None


def test_seen_at_fills_first_and_last_seen():
    t = datetime(2026, 11, 28, 12, tzinfo=UTC)
    row = markets.parse(load("gamma_market_live_559651_include_tag.json"), seen_at=t).table("markets")[0]
    assert row["first_seen_at"] == t and row["last_seen_at"] == t


# -- selection -------------------------------------------------------------------------
NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)


def cand(mid, vol, slug=None, tags=(), closed=False, closed_time=None, tokens=None, **kw):
    return Candidate(market_id=mid, condition_id=f"0x{mid}", slug=slug or f"s{mid}",
                     volume_24h=None if vol is None else Decimal(str(vol)),
                     tags=tuple(tags), closed=closed, closed_time=closed_time,
                     tokens=tokens if tokens is not None else ((f"{mid}1", "Yes"), (f"{mid}2", "No")), **kw)


def ids(chosen):
    return [m.market_id for m in chosen]


def test_selection_defaults_follow_every_open_market_with_tokens():
    ms = [cand("1", 5), cand("2", None), cand("3", 9, closed=True, closed_time=NOW),
          cand("4", 1, tokens=()), cand("5", 3, archived=True), cand("6", 2, enable_order_book=False)]
    assert ids(selection.choose({}, ms, NOW)) == ["1", "2"]


def test_selection_floor_cap_and_volume_order():
    ms = [cand(str(i), i * 10) for i in range(1, 8)]
    sel = {"min_volume_24h": 25, "max_markets": 3}
    assert ids(selection.choose(sel, ms, NOW)) == ["7", "6", "5"]


def test_selection_tags_slugs_exclusions_and_recent_closed():
    ms = [
        cand("1", 100, tags=("politics", "2")),
        cand("2", 50, tags=("sports",)),
        cand("3", 1, slug="pin-me", tags=("crypto",)),
        cand("4", 70, tags=("politics", "earn-4")),
        cand("5", 90, tags=("politics",), closed=True, closed_time=NOW - timedelta(hours=2)),
        cand("6", 95, tags=("politics",), closed=True, closed_time=NOW - timedelta(hours=30)),
    ]
    sel = {"tags": ["Politics"], "slugs": ["pin-me"], "exclude_tags": ["earn-4"], "min_volume_24h": 10,
           "recent_closed_hours": 24, "max_markets": 3}
    assert ids(selection.choose(sel, ms, NOW)) == ["3", "1", "5"]


def test_selection_from_parsed_fixture_rows_and_followed_rows():
    out = markets.parse(load("gamma_events_neg_risk_30829.json"))
    tokens = {}
    for t in out.table("tokens"):
        tokens.setdefault(t["market_id"], []).append((t["token_id"], t["outcome"]))
    cands = [Candidate(market_id=r["market_id"], condition_id=r["condition_id"], slug=r["slug"],
                       volume_24h=r["volume_24h"], tags=selection.tag_words(r["tags"]), closed=r["closed"],
                       tokens=tuple(tokens[r["market_id"]])) for r in out.table("markets")]
    chosen = selection.choose({"max_markets": 1, "tags": ["world elections"]}, cands, NOW)
    assert ids(chosen) == ["559657"]  # the higher 24h volume of the two legs
    rows = selection.followed_rows(chosen)
    assert [r["outcome"] for r in rows] == ["Yes", "No"]
    assert rows[0]["token_id"] == "60590045489347122735554346200880179420435533609307820342798544098823516727807"


# -- the shared decoders (workers.payload) ----------------------------------------------
def test_every_gamma_time_format_decodes_to_utc():
    from workers import payload as p

    cases = {
        "2026-05-25 22:43:31+00": datetime(2026, 5, 25, 22, 43, 31, tzinfo=UTC),  # Postgres text (closedTime)
        "2023-11-02 22:05:44.425+00": datetime(2023, 11, 2, 22, 5, 44, 425000, tzinfo=UTC),
        "2026-05-23T04:00:04.992135Z": datetime(2026, 5, 23, 4, 0, 4, 992135, tzinfo=UTC),
        "2022-07-27T14:40:02.074Z": datetime(2022, 7, 27, 14, 40, 2, 74000, tzinfo=UTC),
        "2026-06-01": datetime(2026, 6, 1, tzinfo=UTC),  # date only
        "2026-06-01T11:00:00+02:00": datetime(2026, 6, 1, 9, tzinfo=UTC),
    }
    for text, expected in cases.items():
        got = p.timestamp(text)
        assert got == expected and got.utcoffset() == timedelta(0), text
    assert p.timestamp("") is None and p.timestamp(None) is None
    assert p.epoch_ms("1786875382652") == datetime(2026, 8, 16, 10, 16, 22, 652000, tzinfo=UTC)
    assert p.epoch_s(1786875382) == datetime(2026, 8, 16, 10, 16, 22, tzinfo=UTC)
    for bad in ("yesterday", "2026-13-01", 17):
        with pytest.raises(markets.PayloadError):
            p.timestamp(bad)
    for bad in ("1786875382.652", "-5", 10 ** 20, True):
        with pytest.raises(markets.PayloadError):
            p.epoch_ms(bad)


def test_decimals_are_exact_whatever_the_encoding():
    from workers import payload as p

    assert p.decimal("0.48") == Decimal("0.48") and p.decimal(".48") == Decimal("0.48")
    assert str(p.decimal(0.982)) == "0.982" and str(p.decimal(12071015.216477996)) == "12071015.216477996"
    assert p.decimal(5) == 5 and p.decimal("") is None and p.decimal(None) is None
    assert p.text(Decimal(".48")) == "0.48" and p.text(Decimal("1E+1")) == "10"
    for bad in ("NaN", "inf", "abc", float("nan"), True, [1]):
        with pytest.raises(markets.PayloadError):
            p.decimal(bad)
    with pytest.raises(markets.PayloadError):
        p.price("1.01")
    assert p.token_id(" 123 ") == "123" and p.token_id(10 ** 77) == str(10 ** 77)
    for bad in ("0x12", "1" * 79, "", -1, 1.5):
        with pytest.raises(markets.PayloadError):
            p.token_id(bad)


def test_problem_log_counts_everything_and_logs_at_a_bounded_rate(caplog):
    import logging

    from workers.payload import Parsed, ProblemLog

    now = [0.0]
    plog = ProblemLog(logging.getLogger("test.problems"), every=30.0, clock=lambda: now[0])
    bad = Parsed()
    bad.skip("market '1': clobTokenIds has 3 ids for 2 outcomes")
    bad.skip("market '2': id: missing")
    with caplog.at_level(logging.WARNING, logger="test.problems"):
        for _ in range(50):
            plog.report("markets", bad)
            now[0] += 1.0
        plog.report("markets", Parsed())  # nothing skipped: nothing logged, nothing counted
    assert plog.total == 100
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # t=0 and t=30
    assert "clobTokenIds has 3 ids" in lines[0] and "(+58 more since the last report)" in lines[1]


def test_values_postgresql_refuses_are_cleaned_or_the_market_skipped():
    good = load("gamma_market_live_559651_include_tag.json")
    dirty = dict(good, question="Will it\x00 rain?", slug="a\ud800b", description=float("nan"),
                 outcomes='["Yes\\u0000", "No"]')
    out = markets.parse([dirty])
    assert out.skipped == 0
    row = out.table("markets")[0]
    assert row["question"] == "Will it\ufffd rain?" and row["slug"] == "a\ufffdb"
    assert row["outcomes"] == ["Yes\ufffd", "No"] and out.table("tokens")[0]["outcome"] == "Yes\ufffd"
    assert row["raw"]["description"] is None and row["raw"]["question"] == "Will it\ufffd rain?"
    bad = [dict(good, id="9\x00"), dict(good, id="8", conditionId="0x\ud800"), dict(good, id="7", liquidity="-5"),
           dict(good, id="6", volume24hr="1e999999"), dict(good, id="5", volume="NaN")]
    out = markets.parse(bad)
    assert out.skipped == len(bad) and out.table("markets") == [] and out.table("tokens") == []
