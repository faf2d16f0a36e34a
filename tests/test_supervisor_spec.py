"""ChildSpecs from Config, constructing targets, validate(), and the supervisor's database start."""

from __future__ import annotations

import psycopg2
import pytest

from collectord.config import parse
from collectord.errors import ConfigError, StartError
from collectord.spec import StartFailure, build_specs, construct, validate
from collectord.supervisor import Supervisor
from tests.sup_targets import SupervisorRun, wait_for

OFF = "".join(f"[collector:{n}]\nenabled = no\n" for n in ("markets", "prices", "orderbooks", "resolutions"))


def config(text, path="/etc/collectord/test.conf"):
    return parse(text, path)


def test_trades_shards_and_kwargs():
    cfg = config(
        OFF
        + "[polymarket]\ngamma_url = http://127.0.0.1:9/gamma\n"
        + "[selection]\nmax_markets = 7\n"
        + "[collector:trades]\nshards = 3\nassets_per_socket = 200\n"
    )
    specs = build_specs(cfg, "host=x")
    assert [s.name for s in specs] == ["trades.0", "trades.1", "trades.2"]
    for i, s in enumerate(specs):
        assert s.collector == "trades" and s.target == "workers.trades:TradesCollector"
        assert s.kwargs["shard"] == i and s.kwargs["shards"] == 3
        assert s.kwargs["assets_per_socket"] == "200"  # options stay strings
        assert s.kwargs["gamma_url"] == "http://127.0.0.1:9/gamma"
        assert s.kwargs["selection"]["max_markets"] == 7
        assert s.kwargs["dsn"] == "host=x" and s.kwargs["name"] == f"trades.{i}"


def test_one_spec_per_enabled_collector_and_equality():
    text = OFF + "[collector:trades]\nenabled = no\n[collector:mine]\ntarget = tests.sup_targets:Sleeper\nx = 1\n"
    a, = build_specs(config(text), "d")
    b, = build_specs(config(text), "d")
    c, = build_specs(config(text.replace("x = 1", "x = 2")), "d")
    assert a.name == "mine" and "shard" not in a.kwargs
    assert a == b and a != c  # reload restarts only children whose spec changed


def _spec(target, **opts):
    text = OFF + "[collector:trades]\nenabled = no\n[collector:c]\ntarget = " + target + "\n"
    text += "".join(f"{k} = {v}\n" for k, v in opts.items())
    return build_specs(config(text), "d")[0]


def test_construct_plain_classes():
    obj = construct(_spec("tests.sup_targets:Named", interval="9", record="", extra="ignored"))
    assert obj.interval == "9" and obj.name == "c"
    obj = construct(_spec("tests.sup_targets:Sleeper", extra="kept"))
    assert obj.kwargs["extra"] == "kept" and "selection" in obj.kwargs


@pytest.mark.parametrize(
    "target, opts, fatal, text",
    [
        ("tests.no_such_module:X", {}, False, "cannot import tests.no_such_module"),
        ("tests.sup_targets:NoSuchClass", {}, False, "has no attribute 'NoSuchClass'"),
        ("tests.sup_targets:InitRaiser", {}, False, "RuntimeError: init_raiser"),
        ("tests.sup_targets:Beater", {"interval": "abc"}, True, "option interval"),
        ("tests.sup_targets:Beater", {"bogus": "1"}, True, "option bogus: unknown option"),
        ("tests.sup_targets:record", {}, True, "cannot construct"),  # a function needing args
    ],
)
def test_construct_failures(target, opts, fatal, text):
    with pytest.raises(StartFailure) as info:
        construct(_spec(target, **opts))
    assert info.value.fatal is fatal
    assert text in str(info.value)


def test_validate_names_file_section_key():
    cfg = config(OFF + "[collector:trades]\nenabled = no\n[collector:c]\ntarget = tests.sup_targets:Beater\ninterval = abc\n")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    err = info.value
    assert err.exit_code == 78
    assert (err.path, err.section, err.key) == ("/etc/collectord/test.conf", "collector:c", "interval")
    assert str(err).startswith("/etc/collectord/test.conf, [collector:c], interval:")


def test_validate_builtin_collectors():
    """The built-in collectors construct from the default config (no sockets, no DB at construction)."""
    specs = validate(config(""), dsn="host=127.0.0.1 dbname=test")
    assert {s.collector for s in specs} == {"markets", "prices", "orderbooks", "resolutions", "trades"}


def test_migration_failure_is_one_line_without_password(tmp_path):
    cfg = config(f"[collectord]\npidfile = {tmp_path}/run/c.pid\nlogfile = -\n")
    dsn = "host=127.0.0.1 port=1 dbname=test user=postgres password=hunter2 connect_timeout=2"
    with pytest.raises(StartError) as info:
        Supervisor(cfg, dsn=dsn, migrate=True, setup_logging=False).run()
    msg = str(info.value)
    assert "schema migration failed" in msg and "hunter2" not in msg and "\n" not in msg


def test_supervisor_migrates_then_runs_children(tmp_path, pg_dsn):
    run = SupervisorRun(tmp_path, {"b": {"target": "Beater", "rows": "5"}})
    try:
        run.start(wait_started=("b",), extra_args=("--dsn", pg_dsn, "--migrate"))
        conn = psycopg2.connect(pg_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM schema_migrations")
                assert cur.fetchone()[0] >= 1
                cur.execute("SELECT to_regclass('trades') IS NOT NULL")
                assert cur.fetchone()[0]
        finally:
            conn.close()
        # counters reported over the heartbeat pipe reach status.json
        st = wait_for(lambda: (lambda c: c if c and c["counters"]["rows_written"] > 0 else None)(run.child_status("b")), 6,
                      what="counters in status.json")
        assert st["heartbeat_age"] is not None and st["counters"]["last_success"] is not None
    finally:
        run.cleanup()
