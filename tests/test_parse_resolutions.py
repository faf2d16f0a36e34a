"""workers.resolutions.classify/parse against the recorded Gamma markets (every shape)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from workers import resolutions

DATA = Path(__file__).resolve().parent / "data"
UTC = timezone.utc
T = "resolutions"


def load(name):
    return json.loads((DATA / name).read_text())


def verdict(obj):
    return resolutions.classify(obj, seen_at=datetime(2026, 11, 28, tzinfo=UTC))


@pytest.mark.parametrize("name,winner,index,payouts", [
    ("gamma_market_resolved_wta_2336501.json", "McCartney Kessler", 1, ["0", "1"]),
    ("gamma_market_resolved_overunder_2348945.json", "Over", 0, ["1", "0"]),
    ("gamma_market_resolved_katana_1460332.json", "No", 1, ["0", "1"]),
])
def test_resolved_one_hot(name, winner, index, payouts):
    obj = load(name)
    v = verdict(obj)
    assert v.state == "resolved"
    row = v.row
    assert row["status"] == "resolved" and row["winning_outcome"] == winner
    assert row["winning_token_id"] == json.loads(obj["clobTokenIds"])[index]
    assert row["payouts"] == payouts
    assert row["market_id"] == obj["id"] and row["condition_id"] == obj["conditionId"]
    assert row["resolved_at"] == datetime.fromisoformat(obj["umaEndDate"])


def test_gamma_verdict_agrees_with_clob_winner_flag():
    clob = load("clob_market_resolved_katana.json")
    row = verdict(load("gamma_market_resolved_katana_1460332.json")).row
    (winner,) = [t for t in clob["tokens"] if t["winner"]]
    assert (row["winning_token_id"], row["winning_outcome"]) == (winner["token_id"], winner["outcome"])
    assert row["condition_id"] == clob["condition_id"]


def test_legacy_zero_zero_is_settled_unknown_without_a_winner():
    v = verdict(load("gamma_market_legacy_closed_zero_zero_12.json"))
    assert v.state == "unknown"
    assert v.row["winning_outcome"] is None and v.row["winning_token_id"] is None
    assert v.row["payouts"] == ["0", "0"]
    assert v.row["resolved_at"] == datetime(2020, 11, 2, 16, 31, 1, tzinfo=UTC)  # closedTime, PG text form


def test_legacy_scalar_keeps_its_fractional_payout_vector():
    v = verdict(load("gamma_market_legacy_closed_scalar_43.json"))
    assert v.state == "scalar" and v.row["winning_outcome"] is None
    assert v.row["payouts"] == ["0.5843311669077693146635445446077281", "0.4156688330922306853364554553922719"]


def test_void_split():
    obj = dict(load("gamma_market_resolved_wta_2336501.json"), outcomePrices='["0.5", "0.5"]')
    v = verdict(obj)
    assert v.state == "void" and v.row["status"] == "void"
    assert v.row["winning_token_id"] is None and v.row["payouts"] == ["0.5", "0.5"]


@pytest.mark.parametrize("changes,state", [
    ({"umaResolutionStatus": "proposed"}, "pending"),
    ({"umaResolutionStatus": "disputed", "outcomePrices": '["0.6", "0.4"]'}, "disputed"),
    ({"closed": False}, "open"),
    ({"outcomePrices": '["0.999", "0.001"]'}, "pending"),
    ({"umaResolutionStatus": None}, "pending"),  # current market, closed, no proposal yet
])
def test_not_final(changes, state):
    obj = dict(load("gamma_market_resolved_overunder_2348945.json"), **changes)
    v = verdict(obj)
    assert v.state == state and v.row is None


def test_open_fixtures_are_open():
    for name in ("gamma_market_live_559651_include_tag.json", "gamma_market_live_btc_5m_1557558.json"):
        assert verdict(load(name)).state == "open"
    out, verdicts = resolutions.parse(load("gamma_events_neg_risk_30829.json"))
    assert [v.state for v in verdicts] == ["open", "open"] and out.table(T) == []


def test_list_payload_and_malformed_items():
    listing = load("gamma_markets_list_assembled.json")
    bad = dict(load("gamma_market_resolved_katana_1460332.json"), id="77", outcomePrices='["1"]')
    worse = dict(load("gamma_market_resolved_katana_1460332.json"), id="78", outcomePrices="[1, oops")
    out, verdicts = resolutions.parse([*listing, bad, worse, 5])
    assert out.skipped == 3
    assert {r["market_id"]: r["status"] for r in out.table(T)} == {
        "2336501": "resolved", "2348945": "resolved", "12": "unknown"}
    assert [v.market_id for v in verdicts] == ["559651", "2336501", "2348945", "12"]


def test_same_outcome_compares_meaning_not_spelling():
    row = verdict(load("gamma_market_resolved_wta_2336501.json")).row
    assert resolutions.same_outcome(row, dict(row, payouts=["0.0", "1.00"], updated_at=None))
    assert not resolutions.same_outcome(row, dict(row, payouts=["1", "0"]))
    assert not resolutions.same_outcome(row, dict(row, status="void"))


NOW = datetime(2026, 11, 28, 16, tzinfo=UTC)


def test_reconcile_write_once_correct_and_withdraw_after_repeated_disputes():
    obj = load("gamma_market_resolved_wta_2336501.json")
    final = verdict(obj)
    assert resolutions.reconcile(final, None, 0, 2, NOW) == ("new", final.row)
    stored = dict(final.row, payouts=["0", "1"])
    assert resolutions.reconcile(final, stored, 0, 2, NOW) == ("same", None)
    flipped = verdict(dict(obj, outcomePrices='["1", "0"]'))
    action, row = resolutions.reconcile(flipped, stored, 0, 2, NOW)
    assert action == "corrected" and row["winning_outcome"] == "Hanyu Guo"
    disputed = verdict(dict(obj, umaResolutionStatus="disputed"))
    assert resolutions.reconcile(disputed, stored, 0, 2, NOW) == ("disputed", None)  # one poll: maybe a stale cache
    action, row = resolutions.reconcile(disputed, stored, 1, 2, NOW)
    assert action == "withdrawn"
    assert row["status"] == "disputed" and row["winning_token_id"] is None and row["payouts"] is None
    assert row["updated_at"] == NOW
    assert resolutions.reconcile(disputed, None, 5, 2, NOW) == ("pending", None)  # nothing stored to withdraw
    pending = verdict(dict(obj, umaResolutionStatus="proposed"))
    assert resolutions.reconcile(pending, stored, 0, 2, NOW) == ("pending", None)  # a proposal never erases
