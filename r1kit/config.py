"""Recipes: TOML files → small config dataclasses, with `--set key=value` overrides.

A stage declares its options as a dataclass (nested dataclasses become TOML tables). Loading
checks every key: an unknown one is an error that names the file and suggests the nearest
known key; a value of the wrong type names the key and the expected type.

Each field's meaning is the `# ...` comment on its line (or the comment lines just above it), so
the config class stays the one readable place; `r1kit VERB --help` lists every key from it.
A key that is a Python keyword (`async`) is the field with a trailing underscore (`async_`, PEP 8's spelling).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import keyword
import textwrap
import tokenize
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


def key_of(field_name: str) -> str:
    """The recipe key of a dataclass field: its name, less the trailing underscore of a Python keyword.

    >>> key_of("async_"), key_of("lr"), key_of("out_")
    ('async', 'lr', 'out_')
    """
    stem = field_name[:-1]
    return stem if field_name.endswith("_") and keyword.iskeyword(stem) else field_name


def from_dict(cls, d: dict, where: str = "config", prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = {key_of(f.name): f.name for f in dataclasses.fields(cls)}
    names.update({f: f for f in list(names.values())})  # dataclasses.asdict's spelling reads back too
    kwargs = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = [key_of(f.name) for f in dataclasses.fields(cls)]
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{where}: unknown key '{full}'{hint}")
        name = names[key]
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{full}' must be a table")
            kwargs[name] = from_dict(typ, value, where, f"{full}.")
        else:
            kwargs[name] = _coerce(value, typ, full, where)
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
    return {key_of(f.name) for f in dataclasses.fields(cls)}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------
# --help from the dataclasses
# ---------------------------------------------------------------------------------------------
@functools.cache
def field_meanings(cls) -> dict[str, str]:
    """Field name → one line of meaning, read from the class source: the `# ...` comment(s) on the
    field's own lines, else the block of comment lines directly above it ("" when it has none).
    Fields a config inherits (e.g. training.MemoryOptions) take their meaning from the base class."""
    out = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and base is not cls:
            out.update(_own_meanings(base))
    return {**out, **_own_meanings(cls)}


def _own_meanings(cls) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[str, bool]] = {}  # line → (text, whether the line is only a comment)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.lstrip().startswith("#"))
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [comments[i][0] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        above, i = [], node.lineno - 1
        while i in comments and comments[i][1]:
            above.insert(0, comments[i][0])
            i -= 1
        out[node.target.id] = " ".join(own or above)
    return out


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def toml_literal(value) -> str:
    """How a value is written in a recipe or after --set KEY= (None: the key is left unset).

    >>> toml_literal("a"), toml_literal(True), toml_literal(1e-4), toml_literal({"x": [1, 2]})
    ('"a"', 'true', '0.0001', '{ x = [1, 2] }')
    """
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_literal(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return repr(value)


def _type_label(t) -> str:
    """A field's type as --help shows it: int, str | None, list[str], table (a TOML table)."""
    if dataclasses.is_dataclass(t) or t is dict or typing.get_origin(t) is dict:
        return "table"
    if isinstance(t, type) and not typing.get_args(t):
        return t.__name__
    return str(t).replace("typing.", "").replace("NoneType", "None")


def config_keys(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every key of config `cls` (nested dataclasses flattened to `a.b`) → (key, type, default, meaning)."""
    hints, meanings, rows = typing.get_type_hints(cls), field_meanings(cls), []
    for f in dataclasses.fields(cls):
        typ, key = hints[f.name], prefix + key_of(f.name)
        if dataclasses.is_dataclass(typ):
            rows.append((key, "table", "", meanings[f.name]))
            rows += config_keys(typ, f"{key}.")
        else:
            rows.append((key, _type_label(typ), toml_literal(_default(f)), meanings[f.name]))
    return rows


def keys_help(cls, section: str, bare_keys: bool = True, width: int = 100) -> str:
    """The `--help` epilog: one entry per config key with its type, default and meaning."""
    how = "KEY" if bare_keys else f"{section}.KEY"
    lines = [f"config keys (set them in the recipe's [{section}] table or with --set {how}=VALUE):"]
    for key, typ, default, meaning in config_keys(cls):
        head = f"  {key} ({typ})" + (f" = {default}" if default else "")
        lines.append(head)
        lines += textwrap.wrap(meaning, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def add_field_flags(p, cls, names) -> None:
    """`--name` flags for scalar fields of `cls`, typed and explained from the field itself.

    A flag left out stays None, so the caller applies only what was given over the recipe.
    """
    hints, meanings = typing.get_type_hints(cls), field_meanings(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        typ = hints[name]
        scalar = next((a for a in typing.get_args(typ) if a is not type(None)), typ)  # `str | None` → str
        if scalar not in (str, int, float):
            raise TypeError(f"{cls.__name__}.{name}: only str, int and float fields become flags")
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=scalar, metavar=scalar.__name__.upper(),
                       help=f"{meanings[name]} (default {toml_literal(_default(fields[name]))})")


def add_config_args(p, cls, section: str, out_key: str = "out_dir", epilog: str | None = None,
                    bare_keys: bool = True) -> None:
    """The options every stage shares, and its config keys listed in --help (`epilog` replaces the list).

    `--out` sets the field `out_key`; its help is that field's meaning, so the two cannot disagree.
    `bare_keys`: whether --set may leave out the section (as `load_config` allows for one stage).
    """
    p.add_argument("--config", help=f"recipe TOML file; this stage reads its [{section}] table (see r1kit/recipes/)")
    example = next(f"{section}.{k}={d}" for k, t, d, _ in config_keys(cls) if t in ("int", "float"))
    if bare_keys:
        example = f"{example.split('.', 1)[1]} or --set {example}"
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one config key, e.g. --set {example} (repeatable); the value is read as TOML")
    default = _default(next(f for f in dataclasses.fields(cls) if f.name == out_key))
    p.add_argument("--out", help=f"{field_meanings(cls)[out_key]} (= --set {out_key}=...; default {default})")
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the key list's layout
    p.epilog = keys_help(cls, section, bare_keys) if epilog is None else epilog
