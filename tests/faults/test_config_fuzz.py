"""Config fuzz: random and mutated INI text through collectord.config.parse and the
checks `start`/`check` run before forking (collectord.control._validate), and a
handful of bad files through the real CLI (`python -m collectord -c FILE check`).

Pass: a config is either accepted or refused with a CollectordError whose message
is ONE line (a ConfigError exits 78 and names the file); never another exception,
never a traceback. The CLI cases: exit 78, exactly one line on stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectord import config as config_mod
from collectord import control
from collectord.errors import EX_CONFIG, CollectordError, ConfigError

ROOT = Path(__file__).resolve().parent.parent.parent
PATH = "/etc/collectord/fuzz.conf"

BASE = """\
[collectord]
pidfile = /tmp/collectord-fuzz/run/collectord.pid
logfile = /tmp/collectord-fuzz/log/collectord.log
data_dir = /tmp/collectord-fuzz/data
loglevel = INFO
allow_root = yes
dsn = host=127.0.0.1 port=5432 dbname=test user=postgres
graceful_timeout = 20
startsecs = 1
watchdog_timeout = 120
health_interval = 60
metrics_listen = 127.0.0.1:9108
[restart]
backoff_initial = 5
backoff_max = 60
max_restarts = 5
reset_after = 600
[polymarket]
gamma_url = https://gamma-api.polymarket.com
clob_url = https://clob.polymarket.com
data_url = https://data-api.polymarket.com
ws_url = wss://ws-subscriptions-clob.polymarket.com/ws/market
[selection]
min_volume_24h = 1000
max_markets = 50
tags = politics, sports
slugs =
recent_closed_hours = 0
[collector:markets]
interval = 60
rate = 0.4
flush_rows = 5000
[collector:prices]
interval = 10
batch = 250
[collector:orderbooks]
interval = 30
skip_unchanged = yes
[collector:resolutions]
enabled = yes
max_markets = 2000
[collector:trades]
shards = 2
ping_interval = 10
stall_timeout = 30
assets_per_socket = 400
"""

HOSTILE_VALUES = [
    "", " ", "-1", "0", "1e309", "nan", "inf", "-inf", "NaN", "1_000", "0x10", "10" * 400, "yes", "maybe", "\t",
    "%(x)s", "%", "$HOME", "~", "../../etc/passwd", "/dev/null", "\u00e9\u00e8", "\u0661", "\ud83d\ude00",
    "1.5.5", "5 # comment", "5 ; comment", "[x]", "a=b", "nonexistent.module:Cls", "os:getpid", "workers:Nope",
    "127.0.0.1:0", "127.0.0.1:99999", ":80", "http://", "ws://x", "ftp://x", "postgresql://u:pw@h/db",
    "a" * 5000,
]
KEYS = ["pidfile", "logfile", "loglevel", "data_dir", "user", "group", "dsn", "graceful_timeout", "startsecs",
        "watchdog_timeout", "health_interval", "metrics_listen", "allow_root", "backoff_initial", "backoff_max",
        "max_restarts", "reset_after", "gamma_url", "ws_url", "min_volume_24h", "max_markets", "tags", "enabled",
        "target", "shards", "interval", "rate", "batch", "ping_interval", "assets_per_socket", "unknown_key",
        "Interval", "interval ", "skip_unchanged", "flush_rows", "stall_timeout"]
SECTIONS = ["collectord", "restart", "polymarket", "selection", "collector:markets", "collector:trades",
            "collector:x", "collector:", "collector:Bad Name", "collector:../etc", "unknown", "", "DEFAULT",
            "collector:a" + "b" * 40]


@st.composite
def config_texts(draw):
    lines = BASE.splitlines()
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(("value", "value", "drop", "insert_key", "insert_section", "garbage", "dup")))
        i = draw(st.integers(0, len(lines) - 1))
        if op == "value" and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {draw(st.sampled_from(HOSTILE_VALUES) | st.text(max_size=30))}"
        elif op == "drop":
            del lines[i]
        elif op == "insert_key":
            lines.insert(i, f"{draw(st.sampled_from(KEYS))} = {draw(st.sampled_from(HOSTILE_VALUES))}")
        elif op == "insert_section":
            lines.insert(i, f"[{draw(st.sampled_from(SECTIONS))}]")
        elif op == "garbage":
            lines.insert(i, draw(st.text(max_size=40)))
        elif op == "dup" and lines:
            lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])
        if not lines:
            lines = [""]
    return "\n".join(lines) + "\n"


def accepted_or_one_line(text: str) -> None:
    try:
        cfg = config_mod.parse(text, PATH)
        control._validate(cfg)
    except ConfigError as err:
        msg = str(err)
        assert err.exit_code == EX_CONFIG
        assert "\n" not in msg and "\r" not in msg, f"multi-line config error: {msg!r}"
        assert msg.startswith(PATH), f"error does not name the file: {msg!r}"
    except CollectordError as err:
        assert "\n" not in str(err), f"multi-line error: {err!r}"


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=config_texts())
def test_mutated_config_is_accepted_or_one_line_error(text):
    accepted_or_one_line(text)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=300))
def test_arbitrary_text_is_accepted_or_one_line_error(text):
    accepted_or_one_line(text)


# -- through the real CLI ------------------------------------------------------------------------------
CLI_CASES = {
    "bad_number": BASE.replace("graceful_timeout = 20", "graceful_timeout = twenty").encode(),
    "unknown_key": BASE.replace("[restart]", "[restart]\nbackof_initial = 5").encode(),
    "not_ini": b"this is not = an ini file\n[[[\n",
    "nul_byte": BASE.replace("startsecs = 1", "startsecs = 1\x00").encode(),
    "not_utf8": BASE.encode() + b"\n# \xff\xfe latin-1 \xe9\n",
    "bad_collector_option": BASE.replace("ping_interval = 10", "ping_interval = -3").encode(),
    "bad_target": BASE.replace("[collector:prices]", "[collector:prices]\ntarget = no_such_module:Cls").encode(),
    "duplicate_section": (BASE + "[restart]\nmax_restarts = 3\n").encode(),
    "interpolation": BASE.replace("tags = politics, sports", "tags = %(politics)s").encode() + b"[x\n",
}


@pytest.mark.parametrize("case", sorted(CLI_CASES) + ["directory", "missing"])
def test_cli_check_bad_config_is_one_line_exit_78(case, tmp_path):
    if case == "directory":
        path = tmp_path / "conf.d"
        path.mkdir()
    elif case == "missing":
        path = tmp_path / "nope.conf"
    else:
        path = tmp_path / f"{case}.conf"
        path.write_bytes(CLI_CASES[case])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("COLLECTORD_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "collectord", "-c", str(path), "check"], capture_output=True,
                          text=True, timeout=60, env=env, cwd=str(tmp_path))
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == EX_CONFIG, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0], lines[0]
