"""Typed configuration: frozen dataclasses, loaded from YAML, with dotted overrides.

Every part of jaxcpt declares its own frozen dataclass next to the code that reads
it (``ModelConfig`` in ``jaxcpt.model``, ``MeshConfig`` in ``jaxcpt.sharding`` ...).
This module only knows how to turn plain dicts (parsed YAML, command-line
overrides) into those dataclasses, and how to fail with a message a user can act
on: an unknown key names the closest valid one, a wrong type names the field and
what it expected.

    cfg = from_dict(TrainConfig, yaml_dict)              # strict, typed
    d = apply_overrides(yaml_dict, ["optim.schedule.peak_lr=3e-4"])  # dotted overrides
    to_dict(cfg)                                          # back to YAML-able dicts
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from jaxcpt.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration a user wrote is wrong; the message says where and how to fix it."""


def _suggest(word: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{_join(prefix, close[0])}'?"
    return f"; valid keys here: {', '.join(_join(prefix, c) for c in sorted(choices))}"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    text = str(tp).replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)  # jaxcpt.data.config.X -> X


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` (from YAML) to type ``tp``, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # X | None: X's own error says what is wrong inside the value
            raise ConfigError(errors[0])
        # a mapping can only have meant the one dataclass member: its error names the key inside that is wrong
        mapped = [e for arg, e in zip([a for a in args if a is not type(None)], errors) if dataclasses.is_dataclass(arg)]
        if isinstance(value, dict) and len(mapped) == 1:
            raise ConfigError(mapped[0])
        raise ConfigError(f"config key '{where}': {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{where}': {value!r} is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"config key '{where}' must have {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, _join(where, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{where}': cannot read {value!r} as {_type_name(tp)}")


def from_dict(cls: type, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a dict, recursively and strictly.

    Unknown keys raise ``ConfigError`` naming the closest valid key; missing keys
    take the dataclass default. After construction, a ``validate()`` method on the
    dataclass (if any) runs, so cross-field checks live beside their fields.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{_join(prefix, str(key))}'" + _suggest(str(key), list(fields), prefix))
        default = fields[key].default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # a partial section overrides the parent's default for it, not the class defaults
            value = {**to_dict(default), **value}
        kwargs[key] = _convert(hints[key], value, _join(prefix, key))
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"config section '{prefix or cls.__name__}' needs: {', '.join(_join(prefix, m) for m in missing)}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config section '{prefix or cls.__name__}': {e}") from e
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass (tree) as plain YAML-serialisable Python values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.schedule.peak_lr=3e-4'`` -> (['optim', 'schedule', 'peak_lr'], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like 'section.key=value'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied (last wins)."""
    import copy

    out = copy.deepcopy(data) if data else {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load ``cls`` from an optional YAML file plus dotted overrides."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides or []))


def dump_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows for every field, recursively: the config reference.

    Help text comes from a ``help`` entry in each field's ``metadata``.
    """
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
        item_classes = [a for arg in typing.get_args(tp) for a in (typing.get_args(arg) or (arg,))]
        if typing.get_origin(tp) is list:  # describe the fields of list items too: 'data.sources[].name'
            rows.extend(row for cls_ in item_classes if dataclasses.is_dataclass(cls_) for row in describe(cls_, key + "[]"))
        elif typing.get_origin(tp) in (Union, types.UnionType):  # X | None: X's fields when set ('model.lora.rank')
            rows.extend(row for cls_ in typing.get_args(tp) if dataclasses.is_dataclass(cls_) for row in describe(cls_, key))
    return rows


def field(default: Any = dataclasses.MISSING, help: str = "", **kw):  # noqa: A002
    """``dataclasses.field`` with a ``help`` string for the generated config reference."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: __import__("copy").deepcopy(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)
