"""Validated dataclass configs loaded from YAML, with `key.sub=value` command-line overrides.

Configs are data: no code is executed from YAML. Unknown keys are rejected with the list of valid
ones, values are type-checked, and the resolved config is saved next to every output.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

from deploy.errors import UserError
from deploy.fileio import atomic_write_text

T = TypeVar("T")
# Plain decimal or exponent notation only: "nan", "inf" or "1_000" stay errors.
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class ConfigError(UserError):
    """A config file or override that does not fit its dataclass."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to annotation `tp` (dataclasses, lists, tuples, dicts, unions, literals)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} fits none of {tp} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp in (dict, list) and isinstance(value, tp):  # bare `dict` / `list`: validated by their owner
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        # YAML 1.1 reads "1e-4" (no dot in the mantissa) as a string; it is the number the user meant.
        return float(value)
    if tp in (int, str, bool) and (type(value) is tp):
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}") from exc
    except ValueError as exc:  # __post_init__ validation
        raise ConfigError(f"{where}: {exc}") from exc
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain YAML-friendly data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested mapping, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


_KEY = re.compile(r"^[A-Za-z_][\w.]*=")


def split_overrides(text: str) -> list[str]:
    """`a.b=1 c={x: 1, y: 2} name='my run'` -> ['a.b=1', 'c={x: 1, y: 2}', 'name=my run'].

    Shell-style quotes are honoured, and a word that does not start with `key=` belongs to the value
    before it, so YAML flow values with spaces and commas need no quoting. (The Makefile passes its
    OVERRIDES through this, so neither make nor bash splits or brace-expands them.)"""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"overrides {text!r}: {exc} (close the quote)") from exc
    items: list[str] = []
    for word in words:
        if items and not _KEY.match(word):
            items[-1] += " " + word
        else:
            items.append(word)
    return items


def flatten_mapping(data: dict, prefix: str = "") -> list[str]:
    """A nested mapping (an overrides YAML file) -> `a.b.c=value` overrides, values as YAML flow text."""
    items = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items += flatten_mapping(value, path + ".")
        else:
            items.append(f"{path}={yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix(chr(10) + '...')}")
    return items


def read_overrides_file(path: str | Path) -> list[str]:
    """The overrides in a YAML file holding a (partial, nested) config mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: overrides file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an overrides file holds a mapping, e.g. `student: {{kd: {{alpha: 0.5}}}}`")
    return flatten_mapping(data)


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load YAML `path` (or defaults when None) into `cls`, applying overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (configs live in configs/)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data, where=str(path or cls.__name__))


def save_config(obj: Any, path: str | Path) -> Path:
    """Save the resolved config as YAML (atomic)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
