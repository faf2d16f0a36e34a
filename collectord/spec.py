"""ChildSpec: what the supervisor needs to start one child, built from Config.

The supervisor side never names a collector class: a spec carries the
`package.module:Class` target string and the keyword arguments (BRIEF
"Collector construction"). construct() imports and instantiates it in the
parent before each fork; validate() does so once per spec for `check`/`start`.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

from collectord.config import Config
from collectord.errors import ConfigError


@dataclass(frozen=True)
class ChildSpec:
    """One child process: its name, the collector section it came from, target and kwargs."""

    name: str
    collector: str
    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:  # kwargs hold a dict (selection); hash the identity fields
        return hash((self.name, self.collector, self.target))


class StartFailure(Exception):
    """Constructing a target failed. `fatal` means a restart cannot fix it."""

    def __init__(self, message: str, *, fatal: bool, key: str | None = None, detail: str | None = None):
        # detail: the message without the key, for a ConfigError that names the key itself.
        self.fatal, self.key, self.detail = fatal, key, detail
        super().__init__(message)


def build_specs(config: Config, dsn: str) -> list[ChildSpec]:
    """One spec per enabled collector; a sharded one gives NAME.0 .. NAME.N-1.

    kwargs: name, dsn, data_dir, the four exchange URLs, selection (plain dict),
    shard/shards for a collector with shards > 1 (or any `trades`), then every
    other key of the collector's section as the string the file gave.
    """
    specs = []
    for col in config.enabled_collectors():
        names = col.child_names()
        for index, child_name in enumerate(names):
            kwargs: dict[str, Any] = {
                "name": child_name,
                "dsn": dsn,
                "data_dir": config.data_dir,
                "gamma_url": config.exchange.gamma_url,
                "clob_url": config.exchange.clob_url,
                "data_url": config.exchange.data_url,
                "ws_url": config.exchange.ws_url,
                "selection": config.selection.as_dict(),
            }
            if col.shards > 1 or col.name == "trades":
                kwargs["shard"] = index
                kwargs["shards"] = col.shards
            kwargs.update(dict(col.options))
            specs.append(ChildSpec(name=child_name, collector=col.name, target=col.target, kwargs=kwargs))
    if config.metrics_listen:  # the Prometheus endpoint: an internal child (collectord.metrics)
        specs.append(ChildSpec(name="metrics", collector="metrics", target="collectord.metrics:MetricsServer",
                               kwargs={"name": "metrics", "status_path": config.status_path,
                                       "listen": config.metrics_listen}))
    return specs


def load_target(target: str) -> type:
    """Import `package.module:Class` and return the class (StartFailure if it cannot)."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # SyntaxError, ImportError, anything at import time
        raise StartFailure(f"cannot import {module_name}: {type(err).__name__}: {err}", fatal=False, key="target") from err
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise StartFailure(f"{module_name} has no attribute {attr!r}", fatal=False, key="target") from None
    if not callable(cls):
        raise StartFailure(f"{target} is not a class", fatal=True, key="target")
    return cls


def accepted_kwargs(cls: Any, kwargs: Mapping[str, Any]) -> dict:
    """The kwargs the constructor takes: all of them with **kwargs, else only the named ones.

    Raises StartFailure(fatal) when a required parameter has no value: a restart
    cannot supply it.
    """
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return dict(kwargs)  # a builtin without a signature: hand everything over
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        chosen = dict(kwargs)
    else:
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        chosen = {k: v for k, v in kwargs.items() if k in names}
    try:
        sig.bind(**chosen)
    except TypeError as err:
        raise StartFailure(f"cannot construct {getattr(cls, '__qualname__', cls)}: {err}", fatal=True) from None
    return chosen


def _option_detail(cls: Any, key: str, message: str) -> str:
    """An unknown option's message names the options the class has (its OPTIONS), and
    the likeliest one meant: 'unknown option (did you mean interval? options: ...)'."""
    options = getattr(cls, "OPTIONS", None)
    if message != "unknown option" or not isinstance(options, Mapping) or key in options:
        return message
    import difflib

    names = sorted(str(name) for name in options)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown option ({hint}{cls.__name__} takes: {', '.join(names) or 'none'})"


def construct(spec: ChildSpec) -> Any:
    """Import the target and instantiate it with the kwargs it accepts (in the parent, before fork).

    StartFailure(fatal=True): a bad option (workers.base.OptionError, any ValueError
    with a `key`) or a missing required parameter: FATAL at once, like exit 78.
    StartFailure(fatal=False): import error or any other exception in __init__:
    a failed start, retried with backoff.
    """
    cls = load_target(spec.target)
    kwargs = accepted_kwargs(cls, spec.kwargs)
    try:
        obj = cls(**kwargs)
    except ValueError as err:
        key = getattr(err, "key", None)
        if key is not None:  # workers.base.OptionError (duck-typed: collectord never imports a collector)
            detail = _option_detail(cls, key, str(err))
            raise StartFailure(f"option {key}: {detail}", fatal=True, key=key, detail=detail) from err
        raise StartFailure(f"{spec.target}() raised {type(err).__name__}: {err}", fatal=False) from err
    except Exception as err:
        raise StartFailure(f"{spec.target}() raised {type(err).__name__}: {err}", fatal=False) from err
    missing = [m for m in ("run", "stop") if not callable(getattr(obj, m, None))]
    if missing:
        raise StartFailure(f"{spec.target} has no {' or '.join(missing)}() method", fatal=True, key="target")
    return obj


def validate(config: Config, dsn: str | None = None) -> list[ChildSpec]:
    """Construct every spec once; a failure becomes a ConfigError naming file, section and key.

    Returns the specs. Constructing a Worker only stores values (no sockets, no
    fds), so this is safe in the CLI process.
    """
    specs = build_specs(config, config.dsn if dsn is None else dsn)
    for spec in specs:
        try:
            construct(spec)
        except StartFailure as err:
            raise ConfigError(err.detail or str(err), path=config.path, section=f"collector:{spec.collector}",
                              key=err.key) from None
    return specs
