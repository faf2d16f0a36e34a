"""INI file -> one immutable Config value.

load(path) reads the file once with configparser, checks every section and key
against the contract names (DESIGN §5), converts each value to its type and
returns frozen dataclasses. Every error is a ConfigError naming file, section
and key (exit 78). Nothing here touches the network, the database or the
filesystem beyond reading the one file.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from collectord.errors import ConfigError

SYSTEM_CONFIG = "/etc/collectord/collectord.conf"
ENV_CONFIG = "COLLECTORD_CONFIG"

# Built-in collectors: name -> default target. Enabled unless the config says not.
BUILTIN_TARGETS = MappingProxyType(
    {
        "markets": "workers.markets:MarketsCollector",
        "prices": "workers.prices:PricesCollector",
        "orderbooks": "workers.orderbooks:OrderbooksCollector",
        "resolutions": "workers.resolutions:ResolutionsCollector",
        "trades": "workers.trades:TradesCollector",
    }
)

# Built-in collectors whose tables are not partitioned (a `retention` there is a mistake).
_NO_RETENTION = frozenset({BUILTIN_TARGETS["markets"], BUILTIN_TARGETS["resolutions"]})

LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class RestartPolicy:
    """[restart]: backoff_initial doubling to backoff_max; FATAL after max_restarts."""

    backoff_initial: float = 5.0
    backoff_max: float = 60.0
    max_restarts: int = 5
    reset_after: float = 600.0


@dataclass(frozen=True)
class Exchange:
    """[polymarket]: base URLs. polysim serves all four under one port."""

    gamma_url: str = "https://gamma-api.polymarket.com"
    clob_url: str = "https://clob.polymarket.com"
    data_url: str = "https://data-api.polymarket.com"
    ws_url: str = "wss://ws-subscriptions-clob.polymarket.com/ws/market"


@dataclass(frozen=True)
class Selection:
    """[selection]: which markets the price/book/trade collectors follow.

    min_volume_24h = 0 and max_markets = 0 follow every active market.
    """

    min_volume_24h: float = 0.0
    max_markets: int = 0
    tags: tuple[str, ...] = ()
    slugs: tuple[str, ...] = ()
    exclude_tags: tuple[str, ...] = ()
    recent_closed_hours: float = 0.0

    def as_dict(self) -> dict:
        """Plain-dict form handed to collectors (workers never import collectord)."""
        return {
            "min_volume_24h": self.min_volume_24h,
            "max_markets": self.max_markets,
            "tags": list(self.tags),
            "slugs": list(self.slugs),
            "exclude_tags": list(self.exclude_tags),
            "recent_closed_hours": self.recent_closed_hours,
        }


@dataclass(frozen=True)
class CollectorConfig:
    """[collector:NAME]: enabled, target, shards, retention, and the collector's own options.

    retention ('90d', '13w'; empty: for ever) is checked here and handed to the
    collector as its `retention` option, in days ('90d'); the collectors that own a
    partitioned table (trades, prices, orderbooks) drop its partitions older than that.

    options holds every other key as the string the file gave; the collector class
    converts and validates them when it is constructed (before the fork).
    """

    name: str
    target: str
    enabled: bool = True
    shards: int = 1
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # How long the collector's partitioned table keeps its rows (whole days); None: for ever.
    retention: timedelta | None = None

    def child_names(self) -> tuple[str, ...]:
        """Process names: 'trades' for one shard, 'trades.0'..'trades.N-1' for N."""
        if self.shards == 1:
            return (self.name,)
        return tuple(f"{self.name}.{i}" for i in range(self.shards))


@dataclass(frozen=True)
class Config:
    """The whole configuration, one immutable value passed down from the CLI."""

    path: str | None
    pidfile: str
    logfile: str
    loglevel: str
    data_dir: str
    user: str
    group: str
    dsn: str
    graceful_timeout: float
    startsecs: float
    watchdog_timeout: float
    health_interval: float
    metrics_listen: str
    allow_root: bool
    restart: RestartPolicy
    exchange: Exchange
    selection: Selection
    collectors: tuple[CollectorConfig, ...]
    # Set only on the stand-in status/stop build when the file is broken: its error.
    # Then only pidfile (and what derives from it) is the file's; the rest is defaults.
    broken: str = ""

    @property
    def status_path(self) -> str:
        """status.json lives next to the PID file."""
        return str(Path(self.pidfile).with_name("status.json"))

    @property
    def spool_dir(self) -> str:
        return str(Path(self.data_dir) / "spool")

    @property
    def pgdata(self) -> str:
        return str(Path(self.data_dir) / "pgdata")

    def enabled_collectors(self) -> tuple[CollectorConfig, ...]:
        return tuple(c for c in self.collectors if c.enabled)

    def collector(self, name: str) -> CollectorConfig:
        for c in self.collectors:
            if c.name == name:
                return c
        raise KeyError(name)

    def with_changes(self, **changes) -> "Config":
        return replace(self, **changes)


def default_dirs(euid: int | None = None, home: str | None = None) -> dict[str, str]:
    """Built-in locations: system paths as root, ~/.local/share/collectord otherwise."""
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return {
            "data_dir": "/var/lib/collectord",
            "pidfile": "/run/collectord/collectord.pid",
            "logfile": "/var/log/collectord/collectord.log",
        }
    base = Path(home or os.path.expanduser("~")) / ".local" / "share" / "collectord"
    return {
        "data_dir": str(base),
        "pidfile": str(base / "run" / "collectord.pid"),
        "logfile": str(base / "log" / "collectord.log"),
    }


def resolve_path(cli_path: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """-c, else $COLLECTORD_CONFIG, else /etc/collectord/collectord.conf if it exists, else None."""
    environ = os.environ if environ is None else environ
    if cli_path:
        return cli_path
    if environ.get(ENV_CONFIG):
        return environ[ENV_CONFIG]
    if os.path.exists(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    return None


class _Reader:
    """Typed access to one section that remembers which keys were consumed."""

    def __init__(self, path, parser, section):
        self.path, self.section = path, section
        self.items = dict(parser.items(section)) if parser.has_section(section) else {}
        self.used: set[str] = set()

    def _err(self, key, msg):
        return ConfigError(msg, path=self.path, section=self.section, key=key)

    def raw(self, key, default):
        self.used.add(key)
        return self.items.get(key, default)

    def str(self, key, default=""):
        return str(self.raw(key, default)).strip()

    def number(self, key, default, *, minimum=0.0, integer=False):
        value = self.raw(key, None)
        if value is None:
            return default
        try:
            num = int(value) if integer else float(value)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise self._err(key, f"expected {kind}, got {value!r}") from None
        if num != num or num in (float("inf"), float("-inf")):
            raise self._err(key, f"expected a finite number, got {value!r}")
        if num < minimum:
            raise self._err(key, f"must be >= {minimum:g}, got {value!r}")
        return num

    def boolean(self, key, default):
        value = self.raw(key, None)
        if value is None:
            return default
        low = value.strip().lower()
        if low in ("1", "yes", "true", "on"):
            return True
        if low in ("0", "no", "false", "off"):
            return False
        raise self._err(key, f"expected yes/no, got {value!r}")

    def words(self, key):
        value = self.str(key, "")
        return tuple(w.strip() for w in value.split(",") if w.strip())

    def reject_unknown(self):
        for key in self.items:
            if key not in self.used:
                raise self._err(key, "unknown key")


def _parse_listen(reader: _Reader, key: str) -> str:
    value = reader.str(key, "")
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise reader._err(key, f"expected host:port, got {value!r}")
    return value


def _check_dsn(reader: _Reader, key: str, dsn: str) -> None:
    """A DSN libpq cannot parse is a config error. Its text is never quoted:
    libpq's own message echoes words of it, a password's among them."""
    import psycopg2.extensions

    try:
        psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        raise reader._err(key, "not a valid libpq DSN or URI (value not shown: it may hold a password)") from None


def _parse_collector(path, parser, section, name) -> CollectorConfig:
    reader = _Reader(path, parser, section)
    if not _NAME_RE.match(name):
        raise ConfigError(
            "collector name must be lower-case letters, digits, '_' or '-'", path=path, section=section
        )
    target = reader.str("target", BUILTIN_TARGETS.get(name, ""))
    if not target:
        raise reader._err("target", "required for a collector that is not built in (package.module:Class)")
    if not _TARGET_RE.match(target):
        raise reader._err("target", f"expected package.module:Class, got {target!r}")
    enabled = reader.boolean("enabled", True)
    shards = reader.number("shards", 1, minimum=1, integer=True)
    retention = _parse_retention(reader, "retention")
    if retention is not None and target in _NO_RETENTION:
        raise reader._err("retention", "this collector's tables are not partitioned; retention applies to "
                                       "trades, prices and orderbooks")
    options = {k: v for k, v in reader.items.items() if k not in reader.used}
    if retention is not None:
        options["retention"] = f"{retention.days}d"
    return CollectorConfig(
        name=name, target=target, enabled=enabled, shards=shards, options=MappingProxyType(options),
        retention=retention,
    )


def _parse_retention(reader: _Reader, key: str) -> timedelta | None:
    """'90d' / '13w' -> timedelta, '' -> None (keep for ever); anything else is a ConfigError."""
    value = reader.str(key, "")
    if not value:
        return None
    from workers.storage.partitions import RetentionError, parse_retention

    try:
        return parse_retention(value)
    except RetentionError as err:
        raise reader._err(key, str(err)) from None


def parse(text: str, path: str | None = None, *, euid: int | None = None, home: str | None = None) -> Config:
    """INI text -> Config. Errors name path, section and key."""
    parser = configparser.ConfigParser(interpolation=None, default_section="__no_defaults__")
    try:
        parser.read_string(text, source=str(path or "<config>"))
    except configparser.Error as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"not a valid INI file: {first}", path=path) from None

    known = {"collectord", "restart", "polymarket", "selection"}
    for section in parser.sections():
        if section not in known and not section.startswith("collector:"):
            raise ConfigError("unknown section", path=path, section=section)

    dirs = default_dirs(euid, home)
    main = _Reader(path, parser, "collectord")
    loglevel = main.str("loglevel", "INFO").upper()
    if loglevel not in LOGLEVELS:
        raise main._err("loglevel", f"expected one of {', '.join(LOGLEVELS)}, got {loglevel!r}")
    values = dict(
        path=str(path) if path else None,
        pidfile=os.path.abspath(os.path.expanduser(main.str("pidfile", dirs["pidfile"]))),
        logfile=main.str("logfile", dirs["logfile"]),
        loglevel=loglevel,
        data_dir=os.path.abspath(os.path.expanduser(main.str("data_dir", dirs["data_dir"]))),
        user=main.str("user", ""),
        group=main.str("group", ""),
        dsn=main.str("dsn", ""),
        graceful_timeout=main.number("graceful_timeout", 20.0),
        startsecs=main.number("startsecs", 1.0),
        watchdog_timeout=main.number("watchdog_timeout", 120.0),
        health_interval=main.number("health_interval", 60.0),
        metrics_listen=_parse_listen(main, "metrics_listen"),
        allow_root=main.boolean("allow_root", False),
    )
    if values["dsn"]:
        _check_dsn(main, "dsn", values["dsn"])
    if values["logfile"] and values["logfile"] != "-":
        values["logfile"] = os.path.abspath(os.path.expanduser(values["logfile"]))
    main.reject_unknown()

    rs = _Reader(path, parser, "restart")
    restart = RestartPolicy(
        backoff_initial=rs.number("backoff_initial", 5.0),
        backoff_max=rs.number("backoff_max", 60.0),
        max_restarts=rs.number("max_restarts", 5, integer=True),
        reset_after=rs.number("reset_after", 600.0),
    )
    if restart.backoff_max < restart.backoff_initial:
        raise rs._err("backoff_max", "must be >= backoff_initial")
    rs.reject_unknown()

    px = _Reader(path, parser, "polymarket")
    defaults = Exchange()
    urls = {}
    for key in ("gamma_url", "clob_url", "data_url", "ws_url"):
        url = px.str(key, getattr(defaults, key)).rstrip("/")
        schemes = ("ws://", "wss://") if key == "ws_url" else ("http://", "https://")
        if not url.startswith(schemes):
            raise px._err(key, f"expected a {schemes[0].rstrip(':/')}(s) URL, got {url!r}")
        urls[key] = url
    exchange = Exchange(**urls)
    px.reject_unknown()

    sel = _Reader(path, parser, "selection")
    selection = Selection(
        min_volume_24h=sel.number("min_volume_24h", 0.0),
        max_markets=sel.number("max_markets", 0, integer=True),
        tags=sel.words("tags"),
        slugs=sel.words("slugs"),
        exclude_tags=sel.words("exclude_tags"),
        recent_closed_hours=sel.number("recent_closed_hours", 0.0),
    )
    sel.reject_unknown()

    collectors: dict[str, CollectorConfig] = {}
    for name in BUILTIN_TARGETS:
        section = f"collector:{name}"
        collectors[name] = _parse_collector(path, parser, section, name)
    for section in parser.sections():
        if section.startswith("collector:"):
            name = section.split(":", 1)[1].strip()
            if name not in collectors:
                collectors[name] = _parse_collector(path, parser, section, name)

    return Config(
        **values,
        restart=restart,
        exchange=exchange,
        selection=selection,
        collectors=tuple(collectors.values()),
    )


def load(cli_path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Find the config file (-c, $COLLECTORD_CONFIG, /etc), read it once, parse it."""
    path = resolve_path(cli_path, environ)
    if path is None:
        return parse("", None)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError("no such file", path=path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read: {getattr(err, 'strerror', None) or err}", path=path) from None
    return parse(text, path)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by '***' (URI and key=value forms)."""
    if not dsn:
        return dsn
    redacted = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", dsn)
    redacted = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", redacted, flags=re.I)
    return redacted
