"""Typed stage configs: dataclass defaults < YAML config file < ``key=value`` overrides.

Every stage declares one dataclass. Each field has a default and help text
(``field(metadata={"help": ...})``); ``__post_init__`` validates ranges and raises
:class:`~stages.core.errors.ConfigError` naming the field and the value. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, TypeVar

import yaml

from stages.core import store, uris
from stages.core.errors import ConfigError, shown

C = TypeVar("C")
# No setting is prose: URIs (S3 keys stop at 1024 bytes), ids, names and lists of them.
MAX_STRING_CHARS = 4096


def help_field(default: Any, help: str, *, bounds: tuple[float, float] | None = None) -> Any:  # noqa: A002
    """A dataclass field with a default and help text (lists get a fresh copy per instance). A number
    outside ``bounds`` (inclusive) is refused by :func:`check_bounds`, naming the field and the range."""
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# What numpy, torch and Python's random all accept as a seed.
SEED_BOUNDS = (0, 2**32 - 1)


def load_config(cls: type[C], config_uri: str | None, overrides: list[str]) -> C:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides, then validate it."""
    values: dict[str, Any] = {}
    if config_uri:
        values.update(_read_yaml(config_uri))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        values[key.strip()] = raw
    return build_config(cls, values)


def build_config(cls: type[C], values: dict[str, Any]) -> C:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} for {cls.__name__}{hint}")
        kwargs[key] = coerce(hints[key], value, key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a default is missing
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def describe(cls: type) -> str:
    """The ``--help`` text: every field with its type, default and help."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {f.name}={default!r}  ({_type_name(hints[f.name])})")
        bounds = f.metadata.get("bounds")
        lines.append(f"      {f.metadata.get('help', '')}" + (f" [{bounds[0]}, {bounds[1]}]" if bounds else ""))
    return "\n".join(lines)


def coerce(tp: Any, value: Any, name: str) -> Any:
    """Convert a YAML value or a command-line string to the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}={shown(value)} is not one of {list(args)}")
        return value
    if origin is list:
        (item_type,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, list):
            raise ConfigError(f"{name}={shown(value)} must be a list")
        return [coerce(item_type, v, name) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}={shown(value)} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={shown(value)} must be an integer")
        if isinstance(value, int):
            return value
        text = str(value).replace("_", "")
        # int() also reads other scripts' digits ("٣" is 3) and thousands of them: both are refused.
        if not (text.isascii() and len(text) <= 32):
            raise ConfigError(f"{name}={shown(value)} must be an integer written with the digits 0-9")
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}={shown(value)} must be an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={shown(value)} must be a number")
        if isinstance(value, str) and not value.isascii():
            raise ConfigError(f"{name}={shown(value)} must be a number written with the digits 0-9")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={shown(value)} must be a number") from None
        if result != result or result in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}={shown(value)} must be a finite number")
        return result
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}={shown(value)} must be a string")
        value = str(value)
        if len(value) > MAX_STRING_CHARS:  # URIs, ids, names: refused before any parsing or logging
            raise ConfigError(
                f"{name} is {len(value)} characters long, over the {MAX_STRING_CHARS} allowed: {shown(value)}"
            )
        return value
    raise TypeError(f"unsupported config type {tp!r} for field {name}")


def _read_yaml(uri: str) -> dict[str, Any]:
    uri = uris.normalize_uri(uri, "--config")  # allowed schemes only, no credentials in the URI
    try:
        data = yaml.safe_load(store.read_text(uri))
    except FileNotFoundError:
        raise ConfigError(f"config file {uris.redact(uri)!r} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {uris.redact(uri)!r} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {uris.redact(uri)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"config file {uris.redact(uri)!r} must hold a mapping of key: value, not {kind}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_bounds(config: Any) -> None:
    """Every number within the bounds its field declares (``help_field(..., bounds=(low, high))``)."""
    for f in dataclasses.fields(config):
        bounds, value = f.metadata.get("bounds"), getattr(config, f.name)
        if bounds and value is not None and not bounds[0] <= value <= bounds[1]:
            raise ConfigError(f"{f.name}={shown(value)} must be in [{bounds[0]}, {bounds[1]}]")


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (used by ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)


def check_run_id(name: str, value: str) -> None:
    """Run ids and model names become path segments: keep them to a safe alphabet."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value) or ".." in value:
        raise ConfigError(
            f"{name}={shown(value)} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
