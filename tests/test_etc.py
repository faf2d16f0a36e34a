"""The files under etc/: sample config, systemd unit, logrotate config.

The sample config is checked against the code, not against a list written here:
the keys come from what collectord.config.parse actually reads, and the
collector options from each built-in class's OPTIONS, so neither can drift.
"""

from __future__ import annotations

import configparser
import dataclasses
import importlib
import logging
import logging.handlers
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collectord import config as cfgmod
from workers.base import convert_options

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"
SAMPLE = ETC / "collectord.conf"
UNIT = ETC / "systemd" / "collectord.service"
LOGROTATE = ETC / "logrotate.d" / "collectord"
DEFAULT_LINE = re.compile(r"^#([a-z_][a-z0-9_]*) = ?(.*)$")


def code_keys(monkeypatch) -> dict[str, set[str]]:
    """{section: keys} that config.parse reads, recorded from its own reader.

    Parses an empty file plus one custom collector section, wrapping
    _Reader.raw (every typed getter goes through it) to record each key asked.
    """
    seen: dict[str, set[str]] = {}
    original = cfgmod._Reader.raw

    def recording(self, key, default):
        seen.setdefault(self.section, set()).add(key)
        return original(self, key, default)

    monkeypatch.setattr(cfgmod._Reader, "raw", recording)
    cfgmod.parse("[collector:custom]\ntarget = pkg.mod:Class\n", euid=0)
    monkeypatch.undo()
    collector_keys = seen.pop("collector:custom")
    for name in cfgmod.BUILTIN_TARGETS:
        assert seen.pop(f"collector:{name}") == collector_keys
    seen["collector:*"] = collector_keys
    return seen


def documented(text: str) -> dict[str, dict[str, str]]:
    """{section: {key: value}} of the `#key = default` lines of the sample."""
    out: dict[str, dict[str, str]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("[") and line.rstrip().endswith("]"):
            section = line.strip()[1:-1]
            out.setdefault(section, {})
            continue
        m = DEFAULT_LINE.match(line)
        if m:
            assert section is not None, f"default line before any section: {line!r}"
            assert m.group(1) not in out[section], f"[{section}] {m.group(1)} documented twice"
            out[section][m.group(1)] = m.group(2).strip()
    return out


def uncommented(text: str) -> str:
    """The sample with every `#key = default` line made active."""
    return "\n".join(line[1:] if DEFAULT_LINE.match(line) else line for line in text.splitlines())


def builtin_classes():
    for name, target in cfgmod.BUILTIN_TARGETS.items():
        module, _, cls = target.partition(":")
        yield name, getattr(importlib.import_module(module), cls)


def test_sample_config_parses_to_the_builtin_defaults():
    text = SAMPLE.read_text()
    shipped = cfgmod.parse(text, str(SAMPLE), euid=0)
    assert shipped == cfgmod.parse("", str(SAMPLE), euid=0)


def test_sample_config_documents_every_key_config_py_reads(monkeypatch):
    keys = code_keys(monkeypatch)
    docs = documented(SAMPLE.read_text())
    for section, names in keys.items():
        if section == "collector:*":
            continue
        missing = names - set(docs.get(section, {}))
        assert not missing, f"[{section}] undocumented in etc/collectord.conf: {sorted(missing)}"
    # enabled/target in every built-in section; every collector key (shards too) somewhere.
    per_collector = keys["collector:*"]
    for name in cfgmod.BUILTIN_TARGETS:
        section = docs.get(f"collector:{name}")
        assert section is not None, f"[collector:{name}] missing from etc/collectord.conf"
        assert {"enabled", "target"} <= set(section), f"[collector:{name}] lacks enabled/target"
    anywhere = set().union(*(docs.get(f"collector:{n}", {}) for n in cfgmod.BUILTIN_TARGETS))
    assert per_collector <= anywhere, f"collector keys undocumented: {sorted(per_collector - anywhere)}"
    extra = set(docs) - set(keys) - {f"collector:{n}" for n in cfgmod.BUILTIN_TARGETS}
    assert not extra, f"sections the code does not know: {extra}"


def test_sample_config_defaults_are_the_code_defaults():
    """Uncommenting every `#key = default` line changes nothing (euid 0 paths)."""
    text = uncommented(SAMPLE.read_text())
    active = cfgmod.parse(text, str(SAMPLE), euid=0)
    defaults = cfgmod.parse("", str(SAMPLE), euid=0)
    for field in dataclasses.fields(defaults):
        if field.name != "collectors":
            assert getattr(active, field.name) == getattr(defaults, field.name), field.name
    for want in defaults.collectors:
        got = active.collector(want.name)
        assert (got.target, got.enabled, got.shards) == (want.target, want.enabled, want.shards)


def test_sample_config_documents_every_builtin_collector_option():
    """Each built-in class's OPTIONS: documented in its section, with its default."""
    docs = documented(SAMPLE.read_text())
    active = cfgmod.parse(uncommented(SAMPLE.read_text()), str(SAMPLE), euid=0)
    for name, cls in builtin_classes():
        section = docs[f"collector:{name}"]
        missing = set(cls.OPTIONS) - set(section)
        assert not missing, f"[collector:{name}] options undocumented: {sorted(missing)}"
        options = dict(active.collector(name).options)
        unknown = set(options) - set(cls.OPTIONS)
        assert not unknown, f"[collector:{name}] documents options {cls.__name__} does not have: {unknown}"
        converted = convert_options(cls.OPTIONS, options)
        defaults = {key: default for key, (_, default) in cls.OPTIONS.items()}
        assert converted == defaults, f"[collector:{name}] documented defaults differ from OPTIONS"


def test_every_key_line_of_the_sample_is_a_default_line():
    """No active setting slips in: installing the sample never changes behaviour."""
    for n, line in enumerate(SAMPLE.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        assert stripped.startswith("[") and stripped.endswith("]"), f"line {n} is active: {line!r}"


# -- systemd -----------------------------------------------------------------

def unit_parser() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_required_keys_configparser():
    unit = unit_parser()
    svc = unit["Service"]
    assert svc["Type"] == "forking"
    assert svc["PIDFile"] == cfgmod.default_dirs(euid=0)["pidfile"]
    assert svc["Restart"] == "on-failure"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert re.fullmatch(r"/\S+/collectord -c /etc/collectord/collectord.conf start", svc["ExecStart"])
    assert svc["KillMode"] == "mixed"  # SIGTERM to the supervisor only; it forwards
    # The stop timeout outlasts the supervisor's default graceful_timeout.
    assert float(svc["TimeoutStopSec"]) > cfgmod.parse("", euid=0).graceful_timeout
    # systemd-made directories would be root's: collectord creates them for `user`.
    assert "RuntimeDirectory" not in svc and "StateDirectory" not in svc and "LogsDirectory" not in svc
    for path in ("/var/lib/collectord", "/var/log/collectord", "/run/collectord"):
        assert path in svc["ReadWritePaths"]
    assert svc["NoNewPrivileges"] == "yes"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (keys checked by the configparser test)")
    # verify insists ExecStart exists: point it at this checkout's console script.
    exe = Path(sys.executable).with_name("collectord")
    assert exe.exists(), exe
    unit = tmp_path / "collectord.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/collectord", str(exe)))
    proc = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "collectord.service" in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a bad Type= is reported."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    exe = Path(sys.executable).with_name("collectord")
    unit = tmp_path / "collectord.service"
    text = UNIT.read_text().replace("/usr/local/bin/collectord", str(exe))
    unit.write_text(text.replace("Type=forking", "Type=forky"))
    proc = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert "collectord.service" in proc.stdout + proc.stderr


# -- logrotate ---------------------------------------------------------------

def logrotate_conf(tmp_path: Path) -> Path:
    """The shipped config, pointed at a temporary log directory."""
    logdir = tmp_path / "log"
    logdir.mkdir()
    conf = tmp_path / "logrotate.conf"
    text = LOGROTATE.read_text()
    assert "/var/log/collectord/*.log" in text
    conf.write_text(text.replace("/var/log/collectord", str(logdir)))
    conf.chmod(0o644)
    return conf


def logrotate() -> str:
    tool = shutil.which("logrotate")
    assert tool, "logrotate is not installed (apt-get install -y logrotate)"
    return tool


def test_logrotate_config_debug_run(tmp_path):
    conf = logrotate_conf(tmp_path)
    (tmp_path / "log" / "collectord.log").write_text("line\n")
    proc = subprocess.run([logrotate(), "-d", "-s", str(tmp_path / "state"), str(conf)],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "error" not in out.lower(), out
    assert f"rotating pattern: {tmp_path / 'log'}/*.log" in out
    assert "considering log" in out and "collectord.log" in out


def test_logrotate_with_watched_file_handler_loses_no_line(tmp_path):
    """A forced rotation: lines before it in .1, lines after it in the new file.

    This is why the config needs neither copytruncate nor a postrotate signal.
    """
    conf = logrotate_conf(tmp_path)
    path = tmp_path / "log" / "collectord.log"
    handler = logging.handlers.WatchedFileHandler(path)
    logger = logging.getLogger("test_etc.rotation")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("before rotation")
        proc = subprocess.run([logrotate(), "-f", "-s", str(tmp_path / "state"), str(conf)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        logger.info("after rotation")
    finally:
        logger.removeHandler(handler)
        handler.close()
    rotated = tmp_path / "log" / "collectord.log.1"
    assert rotated.read_text() == "before rotation\n"
    assert path.read_text() == "after rotation\n"


def test_init_defaults_unit_and_logrotate_agree_with_the_config_defaults():
    """PID file, program and log paths in etc/ match config.py's root defaults and each other."""
    dirs = cfgmod.default_dirs(euid=0)
    settings = {}
    for line in (ETC / "default" / "collectord").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings["PIDFILE"] == dirs["pidfile"]
    assert settings["CONFIG"] == cfgmod.SYSTEM_CONFIG
    assert float(settings["STOP_TIMEOUT"]) > cfgmod.parse("", euid=0).graceful_timeout
    exec_start = unit_parser()["Service"]["ExecStart"].split()
    assert exec_start[0] == settings["DAEMON"]
    assert exec_start[1:4] == ["-c", cfgmod.SYSTEM_CONFIG, "start"]
    pattern = str(Path(dirs["logfile"]).parent / "*.log")
    assert pattern in LOGROTATE.read_text()
    assert Path(dirs["logfile"]).match("*.log")
