"""Recipes: TOML files → small config dataclasses, with `--set key=value` overrides.

A stage declares its options as a dataclass (nested dataclasses become TOML tables). Loading
checks every key: an unknown one is an error that names the file and suggests the nearest
known key; a value of the wrong type names the key and the expected type.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the file/key."""


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def _coerce(value, typ, key: str, where: str):
    """Check (and gently convert: int → float, str → Path) a TOML value for a field of type `typ`."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        (inner, *_) = typing.get_args(typ) or (typing.Any,)
        vals = [_coerce(v, inner, key, where) for v in value]
        return tuple(vals) if origin is tuple else vals
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table, got {value!r}")
        return value
    if typ is typing.Any:
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is Path and isinstance(value, str):
        return Path(value)
    if isinstance(typ, type) and isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: '{key}' must be {_type_name(typ)}, got {value!r}")


def from_dict(cls, d: dict, where: str = "config", prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key '{full}'{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{full}' must be a table")
            kwargs[key] = from_dict(typ, value, where, f"{full}.")
        else:
            kwargs[key] = _coerce(value, typ, full, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str):
    """'a.b=3' → (['a', 'b'], 3); the value is read as TOML, falling back to a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def read_toml(path) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(cls, path=None, overrides=(), base: dict | None = None, section: str | None = None,
                bare_keys: bool = True):
    """Recipe file (optionally one [section] of it) + `key=value` overrides → `cls` instance.

    With a section, overrides may name it ("grpo.lr=1e-4") or, for the stage the command runs
    (`bare_keys`), not ("lr=1e-4"); overrides for the recipe's other sections are left to them.
    """
    d = dict(base or {})
    where = str(path) if path else "defaults"
    raw = read_toml(path) if path is not None else {}
    if section is not None:
        d = _merge(d, raw.get(section, {}))
    else:
        d = _merge(d, raw)
    for text in overrides:
        keys, value = parse_override(text)
        if section is not None:
            if keys[0] == section:
                keys = keys[1:]
            elif not bare_keys or (keys[0] in raw and isinstance(raw[keys[0]], dict)
                                   and keys[0] not in _field_names(cls)):
                continue  # another stage's override
        if not keys:
            raise ConfigError(f"--set {text!r}: expected {section}.KEY=VALUE")
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{k}' is not a table")
        node[keys[-1]] = value
        where = f"{where} + --set"
    return from_dict(cls, d, where + (f" [{section}]" if section else ""))


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def add_config_args(p) -> None:
    """The options every stage shares."""
    p.add_argument("--config", help="recipe TOML file (see r1kit/recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe key, e.g. --set grpo.lr=1e-4 (repeatable)")
    p.add_argument("--out", help="output directory (default: the recipe's out_dir)")
