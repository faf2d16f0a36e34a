"""Config parsing: every error is one line naming file, section and key (exit 78);
DSN passwords are redacted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from collectord import config
from collectord.errors import EX_CONFIG, ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_empty_file_gives_the_documented_defaults():
    c = config.parse("", "/etc/x.conf", euid=1000, home="/home/u")
    assert c.path == "/etc/x.conf"
    assert c.data_dir == "/home/u/.local/share/collectord"
    assert c.pidfile == "/home/u/.local/share/collectord/run/collectord.pid"
    assert c.status_path == "/home/u/.local/share/collectord/run/status.json"
    assert c.graceful_timeout == 20.0 and c.startsecs == 1.0 and c.watchdog_timeout == 120.0
    assert c.health_interval == 60.0 and c.loglevel == "INFO" and c.dsn == "" and c.user == ""
    assert not c.allow_root
    assert c.restart == config.RestartPolicy(5.0, 60.0, 5, 600.0)
    assert [x.name for x in c.enabled_collectors()] == ["markets", "prices", "orderbooks", "resolutions", "trades"]
    root = config.parse("", None, euid=0)
    assert root.data_dir == "/var/lib/collectord" and root.pidfile == "/run/collectord/collectord.pid"
    assert root.logfile == "/var/log/collectord/collectord.log"


def test_values_are_converted_and_frozen():
    c = config.parse(
        "[collectord]\ngraceful_timeout = 2.5\nloglevel = debug\nallow_root = yes\n"
        "metrics_listen = 127.0.0.1:9108\n"
        "[restart]\nbackoff_initial = 0.5\nbackoff_max = 2\nmax_restarts = 3\n"
        "[selection]\ntags = politics, sports ,\nmax_markets = 10\n"
        "[collector:trades]\nshards = 3\nassets_per_socket = 200\n"
        "[collector:mine]\ntarget = pkg.mod:Cls\nenabled = off\nfoo = bar\n",
        "/x.conf",
    )
    assert c.graceful_timeout == 2.5 and c.loglevel == "DEBUG" and c.allow_root
    assert c.restart.backoff_initial == 0.5 and c.restart.max_restarts == 3
    assert c.selection.tags == ("politics", "sports") and c.selection.max_markets == 10
    trades = c.collector("trades")
    assert trades.child_names() == ("trades.0", "trades.1", "trades.2")
    assert dict(trades.options) == {"assets_per_socket": "200"}
    mine = c.collector("mine")
    assert not mine.enabled and mine.target == "pkg.mod:Cls" and dict(mine.options) == {"foo": "bar"}
    with pytest.raises(Exception):
        c.dsn = "x"  # frozen
    with pytest.raises(TypeError):
        mine.options["foo"] = "baz"  # read-only mapping


BAD = [
    ("[collectord]\ngraceful_timeout = soon\n", "collectord", "graceful_timeout", "expected a number"),
    ("[collectord]\ngraceful_timeout = -1\n", "collectord", "graceful_timeout", "must be >= 0"),
    ("[collectord]\ngraceful_timeout = nan\n", "collectord", "graceful_timeout", "finite"),
    ("[collectord]\nloglevel = LOUD\n", "collectord", "loglevel", "expected one of"),
    ("[collectord]\nallow_root = maybe\n", "collectord", "allow_root", "expected yes/no"),
    ("[collectord]\nmetrics_listen = 9108\n", "collectord", "metrics_listen", "host:port"),
    ("[collectord]\npidfiel = /x\n", "collectord", "pidfiel", "unknown key"),
    ("[restart]\nmax_restarts = 2.5\n", "restart", "max_restarts", "whole number"),
    ("[restart]\nbackoff_initial = 10\nbackoff_max = 5\n", "restart", "backoff_max", ">= backoff_initial"),
    ("[polymarket]\ngamma_url = ftp://x\n", "polymarket", "gamma_url", "http"),
    ("[polymarket]\nws_url = http://x\n", "polymarket", "ws_url", "ws"),
    ("[selection]\nmax_markets = lots\n", "selection", "max_markets", "whole number"),
    ("[collector:mine]\nenabled = yes\n", "collector:mine", "target", "required"),
    ("[collector:mine]\ntarget = not a target\n", "collector:mine", "target", "package.module:Class"),
    ("[collector:trades]\nshards = 0\n", "collector:trades", "shards", ">= 1"),
    ("[collector:trades]\nenabled = sometimes\n", "collector:trades", "enabled", "yes/no"),
]


@pytest.mark.parametrize("text,section,key,phrase", BAD)
def test_every_error_names_file_section_and_key(text, section, key, phrase):
    with pytest.raises(ConfigError) as info:
        config.parse(text, "/etc/collectord/test.conf")
    err = info.value
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith(f"/etc/collectord/test.conf, [{section}], {key}: ")
    assert phrase in msg
    assert (err.path, err.section, err.key) == ("/etc/collectord/test.conf", section, key)
    assert err.exit_code == EX_CONFIG == 78


def test_unknown_section_and_broken_ini_name_the_file():
    with pytest.raises(ConfigError, match=r"^/c.conf, \[colectord\]: unknown section$"):
        config.parse("[colectord]\nx = 1\n", "/c.conf")
    with pytest.raises(ConfigError) as info:
        config.parse("no section header\n", "/c.conf")
    assert str(info.value).startswith("/c.conf: not a valid INI file") and "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        config.parse("[collectord]\npidfile = a\npidfile = b\n", "/c.conf")
    assert str(info.value).startswith("/c.conf: not a valid INI file") and "\n" not in str(info.value)


def test_load_finds_the_file_in_order(tmp_path):
    a = tmp_path / "a.conf"
    a.write_text("[collectord]\nloglevel = ERROR\n")
    b = tmp_path / "b.conf"
    b.write_text("[collectord]\nloglevel = DEBUG\n")
    assert config.load(str(a), environ={"COLLECTORD_CONFIG": str(b)}).loglevel == "ERROR"
    assert config.load(None, environ={"COLLECTORD_CONFIG": str(b)}).loglevel == "DEBUG"
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(tmp_path / "missing.conf"), environ={})
    bad = tmp_path / "bin.conf"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(str(bad), environ={})


@pytest.mark.parametrize(
    "dsn,shown",
    [
        ("postgresql://u:s3cret@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("postgres://u:p%40ss@db/x?sslmode=require", "postgres://u:***@db/x?sslmode=require"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("host=db user=u password=s3cret dbname=x", "host=db user=u password=*** dbname=x"),
        ("host=db password = 's3 cr\\'et' dbname=x", "host=db password = *** dbname=x"),
        ("host=db PASSWORD=s3cret", "host=db PASSWORD=***"),
        ("", ""),
    ],
)
def test_redact_dsn(dsn, shown):
    out = config.redact_dsn(dsn)
    assert out == shown
    assert "s3cret" not in out and "s3 cr" not in out and "p%40ss" not in out


def _cli(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("COLLECTORD_CONFIG", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "collectord", *args], capture_output=True, text=True, timeout=60, env=env, cwd=str(ROOT)
    )


@pytest.mark.parametrize("command", [["check"], ["start"], ["start", "--foreground"], ["restart"], ["reload"],
                                     ["db", "upgrade"]])
def test_cli_config_error_is_one_line_exit_78(tmp_path, command):
    conf = tmp_path / "bad.conf"
    conf.write_text(f"[collectord]\npidfile = {tmp_path}/x.pid\ngraceful_timeout = soon\n")
    r = _cli(["-c", str(conf), *command])
    assert r.returncode == 78, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0] == (
        f"collectord: {conf}, [collectord], graceful_timeout: expected a number, got 'soon'"
    )


@pytest.mark.parametrize("command,code,said", [(["status"], 3, "collectord is not running"),
                                                (["stop"], 0, "collectord is not running")])
def test_cli_stop_and_status_survive_a_broken_config(tmp_path, command, code, said):
    """An operator who broke the file can still stop / watch the daemon: its PID file
    is read leniently, the error is a warning."""
    conf = tmp_path / "bad.conf"
    conf.write_text(f"[collectord]\npidfile = {tmp_path}/run/x.pid\ngraceful_timeout = soon\n")
    r = _cli(["-c", str(conf), *command])
    assert r.returncode == code, r.stderr
    assert r.stdout.strip() == said
    assert r.stderr.strip() == (
        f"collectord: warning: {conf}, [collectord], graceful_timeout: expected a number, got 'soon'; "
        f"using PID file {tmp_path}/run/x.pid"
    )


def test_cli_relative_config_path_is_named_absolute(tmp_path):
    conf = tmp_path / "rel.conf"
    conf.write_text("[restart]\nreset_after = never\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "collectord", "-c", "rel.conf", "check"],
        capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path),
    )
    assert r.returncode == 78
    assert r.stderr.strip() == f"collectord: {conf}, [restart], reset_after: expected a number, got 'never'"


def test_cli_env_config_and_missing_file(tmp_path):
    r = _cli(["check"], {"COLLECTORD_CONFIG": str(tmp_path / "none.conf")})
    assert r.returncode == 78
    assert r.stderr.strip() == f"collectord: {tmp_path / 'none.conf'}: no such file"


def test_cli_password_never_printed(tmp_path):
    conf = tmp_path / "pw.conf"
    conf.write_text(
        f"[collectord]\npidfile = {tmp_path}/run/c.pid\ndata_dir = {tmp_path}/data\n"
        "dsn = host=127.0.0.1 port=1 dbname=x user=u password=hunter2 connect_timeout=2\n"
    )
    r = _cli(["-c", str(conf), "status", "--json"])
    assert r.returncode == 3
    assert "hunter2" not in r.stdout + r.stderr and "password=***" in r.stdout


def test_unparsable_dsn_is_a_config_error_that_never_quotes_it():
    """libpq's parse error echoes words of the DSN; ours names the key, not the value."""
    with pytest.raises(ConfigError) as err:
        config.parse("[collectord]\ndsn = host=db password=abc s3cretWord\n", "f.conf")
    assert err.value.exit_code == 78
    assert "[collectord]" in str(err.value) and "dsn" in str(err.value)
    assert "s3cretWord" not in str(err.value) and "abc" not in str(err.value)
