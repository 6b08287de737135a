"""The one config loader: every config section is a dataclass, read by :func:`load_section`.

A section's fields declare their checks with :func:`setting` (``dataclasses.field`` metadata): ``choices``
(a tuple, or a function returning one, for registries), ``min`` (value >= min) and ``above`` (value > above).
:func:`load_section` turns a mapping (YAML, JSON, ``-s`` overrides) into the dataclass: it refuses unknown
keys (listing the valid ones), coerces values to the field types (``int``, ``float``, ``bool``, ``str``,
``X | None``, ``list[X]``, ``tuple[...]``, ``dict``, nested sections), checks choices and minimums, and names
``section.field`` in every error (:class:`~cliplab.errors.ConfigError`). A section's ``__post_init__`` calls
:func:`check_section`, so that a section built in Python is coerced and checked by the same rules.

Layer: imports only :mod:`cliplab.errors` (every layer may use it).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Callable

from cliplab.errors import ConfigError

_HINTS: dict[type, dict[str, Any]] = {}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            choices: tuple | Callable[[], tuple] | None = None, min: float | None = None,  # noqa: A002
            above: float | None = None) -> Any:
    """A dataclass field with the checks :func:`load_section` and :func:`check_section` apply."""
    metadata = {k: v for k, v in (("choices", choices), ("min", min), ("above", above)) if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def _where(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type of a dataclass (``Any`` where an annotation cannot be resolved)."""
    if cls not in _HINTS:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation naming something not importable here: no coercion for it
            hints = {}
        _HINTS[cls] = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _number(value: Any, kind: type, where: str) -> int | float:
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    try:  # YAML 1.1 reads 1e-5 (no dot) as a string
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ConfigError(f"{where}: expected {what}, got {value!r}") from None
    if kind is float:
        return float(number)
    if isinstance(number, float) and not number.is_integer():
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    return int(number)


def _scalar(value: Any, kind: type, where: str) -> Any:
    if kind in (int, float):
        return _number(value, kind, where)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return str(value)  # a split named 2014 reads as the string "2014"


def _sequence(value: Any, kind: Any, where: str) -> list | tuple:
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def coerce(value: Any, kind: Any, where: str) -> Any:
    """``value`` as type ``kind`` (the field's resolved annotation); ``where`` names it in errors."""
    origin = typing.get_origin(kind)
    if kind is Any or isinstance(kind, (str, typing.TypeVar)):
        return value
    if origin in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(kind) if m is not type(None)]
        if value is None and len(members) < len(typing.get_args(kind)):
            return None
        errors = []
        for member in members:
            try:
                return coerce(value, member, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(kind):
        return value if isinstance(value, kind) else load_section(kind, value, where)
    if kind in (int, float, bool, str):
        return _scalar(value, kind, where)
    if (origin or kind) in (list, tuple):
        return _sequence(value, kind, where)
    if (origin or kind) is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _check(value: Any, meta: Mapping, where: str) -> None:
    if value is None or not meta:
        return
    choices = meta.get("choices")
    if choices is not None:
        choices = tuple(choices() if callable(choices) else choices)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, not {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where} must be >= {meta['min']}, not {value!r}")
    if "above" in meta and not value > meta["above"]:
        raise ConfigError(f"{where} must be > {meta['above']}, not {value!r}")


def check_section(obj: Any, section: str) -> None:
    """Coerce every field of a built section to its type (in place) and apply its declared checks."""
    types_ = field_types(type(obj))
    for f in dataclasses.fields(obj):
        where = _where(section, f.name)
        value = coerce(getattr(obj, f.name), types_[f.name], where)
        _check(value, f.metadata, where)
        object.__setattr__(obj, f.name, value)


def load_section(cls: type, mapping: Mapping | None, section: str) -> Any:
    """The dataclass ``cls`` from ``mapping`` (None: all defaults); ``section`` (``train``, ``model.head``, or
    ``""`` for a whole config file) prefixes every field name in errors."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{section or 'a config'} must be a mapping of settings, not {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [str(k) for k in mapping if k not in fields]
    if unknown:
        what = f"keys in {section}" if section else "config sections"
        raise ConfigError(f"unknown {what}: {', '.join(_where(section, k) for k in sorted(unknown))} "
                          f"(valid: {', '.join(fields)})")
    missing = [n for n, f in fields.items() if n not in mapping and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{', '.join(_where(section, n) for n in missing)}: required, not given")
    types_, values = field_types(cls), {}
    for name, value in mapping.items():
        where = _where(section, name)
        values[name] = coerce(value, types_[name], where)
        _check(values[name], fields[name].metadata, where)
    return cls(**values)
