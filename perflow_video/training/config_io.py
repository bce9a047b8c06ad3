"""Strict configuration I/O: dataclasses are the schema, YAML is only data.

* A config is a (nested) dataclass. ``from_dict`` builds one from plain data and checks every value
  against the field's type annotation; unknown keys and wrong types are errors that name the dotted key
  (``optim.lr``), the expected type and the value given.
* Missing keys keep the default. For a nested dataclass field the default is the parent's default for
  that field (its ``default`` / ``default_factory``), so a partial ``optim:`` section keeps the other
  values the parent chose, not the bare class defaults of ``Optim``.
* Config files hold only what differs from the defaults (``diff_from_defaults``); a run saves the full
  resolved config (``save_yaml_config``).
* Layering: ``merge_dicts`` (a small config over a family default), then ``apply_overrides``
  (``optim.lr=1e-4`` from the command line), then ``from_dict``.
* There are no ``target: package.Class`` strings: code chooses classes, YAML only holds values.

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``X | None`` (and other unions, tried in
order), ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]``, ``Literal[...]``, ``Any``, and
nested dataclasses. An ``int`` is accepted for a ``float`` field; a ``bool`` is never a number and a
string is never a number.

YAML is read with PyYAML's safe loader extended by one rule: ``1e-4`` / ``1.5E6`` (exponent without a
dot or without a sign) are floats, as in YAML 1.2. Plain PyYAML (YAML 1.1) reads them as strings, which
would make ``lr: 1e-4`` a type error. Quoted scalars (``"1e-4"``) stay strings. Duplicate keys in a
mapping are an error instead of silently keeping the last one.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import io
import json
import os
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from perflow_video.atomic_files import atomic_destination

__all__ = [
    "ConfigError",
    "apply_overrides",
    "diff_from_defaults",
    "from_dict",
    "load_yaml_config",
    "load_yaml_data",
    "merge_dicts",
    "save_yaml_config",
    "to_dict",
]

_UNION_ORIGINS = (typing.Union, types.UnionType)
# Longest value repr quoted in an error message; a pasted 10k-element list should not flood the terminal.
_MAX_REPR = 80


class ConfigError(ValueError):
    """A config value, key or file is invalid. The message names the dotted key (and the file)."""


# ----------------------------------------------------------------------------------------------------
# YAML loading
# ----------------------------------------------------------------------------------------------------


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 exponent floats and duplicate-key detection."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Floats that YAML 1.1 misses: an exponent with no dot (1e-4) or with an unsigned exponent (1.5e6).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


def _yaml_load(text: str) -> Any:
    """Parses YAML text with the config loader (may raise yaml.YAMLError)."""
    return yaml.load(text, Loader=_ConfigLoader)  # safe: _ConfigLoader is a SafeLoader


def _yaml_error_message(err: yaml.YAMLError) -> str:
    """'line L, column C: problem' for a marked YAML error, else the error's text."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_yaml_data(path: str | os.PathLike) -> dict:
    """Reads a YAML config file into a plain dict (no schema check).

    An empty file is an empty dict (every value at its default).

    Args:
        path: the YAML file.
    Returns:
        The top-level mapping.
    Raises:
        ConfigError: naming the file, for a missing/unreadable file, a YAML syntax error (with line and
            column) or a top level that is not a mapping.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror or err}") from err
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML at {_yaml_error_message(err)}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def load_yaml_config(cls: type, path: str | os.PathLike) -> Any:
    """Loads a YAML file into an instance of the dataclass ``cls``.

    Args:
        cls: the config dataclass (the schema).
        path: the YAML file; it holds only what differs from the defaults.
    Returns:
        An instance of ``cls``.
    Raises:
        ConfigError: for file, YAML or schema errors; the message starts with the file name.
    """
    data = load_yaml_data(path)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


# ----------------------------------------------------------------------------------------------------
# dict -> dataclass
# ----------------------------------------------------------------------------------------------------


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _at(path: str, message: str) -> str:
    """Prefixes a message with the dotted path, if any (the top level has none)."""
    return f"{path}: {message}" if path else message


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _given(value: Any) -> str:
    """'got 3 (int)' for error messages."""
    return f"got {_short_repr(value)} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    """Readable name of an annotation: 'int', 'list[str]', 'float | None', "'a' | 'b'"."""
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_ORIGINS:
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", repr(tp))


def _type_error(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(_at(path, f"expected {_type_name(tp)}, {_given(value)}"))


def _convert_scalar(value: Any, tp: type, path: str) -> Any:
    """Checks a bool/int/float/str value. bool is a subclass of int in Python but never a number here."""
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:  # str
        ok = isinstance(value, str)
    if not ok:
        raise _type_error(path, tp, value)
    return float(value) if tp is float else value


def _convert_literal(value: Any, choices: tuple, path: str) -> Any:
    # Compare types too: True == 1 and 1 == 1.0, but neither is the Literal value written in the schema.
    if any(type(value) is type(c) and value == c for c in choices):
        return value
    listed = ", ".join(repr(c) for c in choices)
    raise ConfigError(_at(path, f"expected one of {listed}, {_given(value)}"))


def _convert_union(value: Any, tp: Any, path: str, default: Any) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _type_error(path, tp, value)
    candidates = [a for a in args if a is not type(None)]
    if len(candidates) == 1 and _is_container(candidates[0]) and _is_container(type(value)):
        # Section | None given a section: the error inside it (e.g. 'sampling.steps') is the useful one.
        return _convert(value, candidates[0], path, default)
    for arm in candidates:
        try:
            return _convert(value, arm, path, default)
        except ConfigError:
            continue
    raise _type_error(path, tp, value)


def _is_container(tp: Any) -> bool:
    """Whether a type (annotation or a value's type) is a section, sequence or mapping."""
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or issubclass(tp, (list, tuple, Mapping))):
        return True
    return typing.get_origin(tp) in (list, tuple, dict)


def _convert_sequence(value: Any, tp: Any, path: str) -> list | tuple:
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise _type_error(path, tp, value)
    if origin is list:
        item_types = [args[0] if args else Any] * len(value)
    elif not args or (len(args) == 2 and args[1] is Ellipsis):
        item_types = [args[0] if args else Any] * len(value)
    else:  # fixed-length tuple[X, Y, ...]
        if len(value) != len(args):
            raise ConfigError(_at(path, f"expected {_type_name(tp)} ({len(args)} items), {_given(value)}"))
        item_types = list(args)
    items = [_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types, strict=True))]
    return items if origin is list else tuple(items)


def _convert_dict(value: Any, tp: Any, path: str) -> dict:
    args = typing.get_args(tp)
    key_type, value_type = args if args else (Any, Any)
    if not isinstance(value, Mapping):
        raise _type_error(path, tp, value)
    out = {}
    for k, v in value.items():
        _convert(k, key_type, f"{_join(path, k)} (key)")
        out[k] = _convert(v, value_type, _join(path, k))
    return out


def _convert(value: Any, tp: Any, path: str, default: Any = dataclasses.MISSING) -> Any:
    """Checks (and where needed converts) one value against an annotation.

    Args:
        value: plain data (from YAML or code).
        tp: the resolved annotation.
        path: dotted path for error messages.
        default: the field's default value; a nested dataclass section is built on top of it.
    """
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _type_error(path, tp, value)
        return _build(tp, value, path, default if isinstance(default, tp) else None)
    origin = typing.get_origin(tp)
    if origin in _UNION_ORIGINS:
        return _convert_union(value, tp, path, default)
    if origin is Literal:
        return _convert_literal(value, typing.get_args(tp), path)
    if origin in (list, tuple) or tp in (list, tuple):
        return _convert_sequence(value, tp, path)
    if origin is dict or tp is dict:
        return _convert_dict(value, tp, path)
    if tp in (bool, int, float, str):
        return _convert_scalar(value, tp, path)
    # A schema bug, not a user error: say so plainly rather than pretending the value is wrong.
    raise TypeError(_at(path, f"unsupported config field type {tp!r}"))


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """Fields a config sets: init=False fields are derived in __post_init__, not data."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _field_default(f: dataclasses.Field, base: Any) -> Any:
    """The default of a field: the value in the parent's default instance, else the field's own default."""
    if base is not None:
        # Deep copy: base may be a shared (frozen) default whose lists must not leak into new configs.
        return copy.deepcopy(getattr(base, f.name))
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _unknown_key_error(key: object, valid: list[str], path: str) -> ConfigError:
    where = f"in '{path}'" if path else "at the top level"
    message = f"unknown key '{key}' {where}; valid keys: {', '.join(valid)}"
    close = difflib.get_close_matches(str(key), valid, n=1)
    if close:
        message += f". Did you mean '{close[0]}'?"
    return ConfigError(_at(_join(path, key), message))


def _build(cls: type, data: Mapping, path: str, base: Any) -> Any:
    """Builds a dataclass from a mapping; ``base`` (an instance of cls or None) supplies the defaults."""
    fields = _init_fields(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key_error(key, list(fields), path)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    missing = []
    for name, f in fields.items():
        if name in data:
            # The default matters only as the base of a nested section; don't run factories needlessly.
            default = _field_default(f, base) if isinstance(data[name], Mapping) else dataclasses.MISSING
            kwargs[name] = _convert(data[name], hints[name], _join(path, name), default)
        else:
            default = _field_default(f, base)
            if default is dataclasses.MISSING:
                missing.append(name)
            else:
                kwargs[name] = default
    if missing:
        raise ConfigError(_at(path, f"missing required key(s): {', '.join(missing)}"))
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ validation
        raise ConfigError(_at(path, str(err))) from err


def from_dict(cls: type, data: Mapping, path: str = "") -> Any:
    """Builds an instance of the dataclass ``cls`` from plain data, checking every key and type.

    Args:
        cls: the config dataclass (the schema). ``from __future__ import annotations`` is fine.
        data: plain mapping (e.g. from YAML); missing keys keep their defaults.
        path: dotted prefix for error messages, when ``data`` is a section of a larger config.
    Returns:
        An instance of ``cls`` (its ``__post_init__`` has run).
    Raises:
        ConfigError: for an unknown key (with the valid keys and a close match), a wrong type, a
            missing required key, or a ValueError from a ``__post_init__``; the message names the
            dotted key.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(_at(path, f"expected a mapping of keys to values, {_given(data)}"))
    return _build(cls, data, path, None)


# ----------------------------------------------------------------------------------------------------
# dataclass -> dict
# ----------------------------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    """Dataclasses to dicts, tuples to lists, recursively; everything else as is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _to_plain(getattr(value, name)) for name in _init_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def to_dict(instance: Any) -> dict:
    """Plain, YAML-safe data of a config instance (nested dicts, tuples as lists).

    Only init fields are included (init=False fields are derived), so ``from_dict`` round-trips it.
    """
    if not dataclasses.is_dataclass(instance) or isinstance(instance, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {instance!r}")
    return _to_plain(instance)


def _diff(instance: Any, base: Any) -> dict:
    """Fields of ``instance`` that differ from ``base`` (same class) or, without a base, the class defaults."""
    out = {}
    for name, f in _init_fields(type(instance)).items():
        value = getattr(instance, name)
        default = _field_default(f, base)
        is_section = dataclasses.is_dataclass(value) and not isinstance(value, type)
        if default is dataclasses.MISSING:
            out[name] = _to_plain(value)
        elif is_section and type(default) is type(value):
            section = _diff(value, default)
            if section:
                out[name] = section
        elif is_section:
            # The default is None (or another type): the section must appear, even as {}, and from_dict
            # builds it from the class defaults, so diff against those.
            out[name] = _diff(value, None)
        elif _to_plain(value) != _to_plain(default):
            out[name] = _to_plain(value)
    return out


def diff_from_defaults(instance: Any) -> dict:
    """Only what differs from the defaults, nested; ``from_dict(type(x), diff_from_defaults(x)) == x``.

    Required fields (no default) are always included.
    """
    if not dataclasses.is_dataclass(instance) or isinstance(instance, type):
        raise TypeError(f"diff_from_defaults needs a dataclass instance, got {instance!r}")
    return _diff(instance, None)


def save_yaml_config(instance: Any, path: str | os.PathLike) -> None:
    """Writes the full resolved config as YAML, atomically (temp file in the same dir, then os.replace).

    A crash mid-write leaves the old file (or none), never a truncated config. Parent dirs are created.
    """
    text = yaml.safe_dump(to_dict(instance), sort_keys=False, default_flow_style=False, allow_unicode=True)
    with atomic_destination(path) as tmp_path, open(tmp_path, "w", encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------------
# Layering: merge and overrides
# ----------------------------------------------------------------------------------------------------


def merge_dicts(base: Mapping, update: Mapping) -> dict:
    """Deep merge: mappings merge key by key, anything else (lists included) in ``update`` replaces.

    Neither input is modified; the result shares no mutable values with them.
    """
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_override(override: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], parsed value)."""
    key, sep, text = override.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(f"malformed override {override!r}: expected key=value, e.g. optim.lr=1e-4")
    try:
        value = _yaml_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {override!r}: value is not valid YAML: {_yaml_error_message(err)}"
        ) from err
    return parts, value


def apply_overrides(data: Mapping, overrides: list[str]) -> dict:
    """Applies ``key=value`` overrides (dotted keys) to plain config data.

    The value is parsed as YAML: ``1e-4`` is a float, ``true`` a bool, ``null`` None, ``[a, b]`` a
    list, ``"1e-4"`` (quoted) a string; an empty value is None. A dict value replaces the section (use a
    dotted key to change one entry). Unknown keys are not checked here; ``from_dict`` reports them with
    their path.

    Args:
        data: the config data (not modified).
        overrides: e.g. ``["optim.lr=1e-4", "model.family=sdxl", 'data.sample_prompts=["a", "b"]']``.
    Returns:
        A new dict with the overrides applied, in order (a later override wins).
    Raises:
        ConfigError: quoting the override, if it has no ``=``, an empty key part, a value that is not
            valid YAML, or goes through a key that holds a non-mapping value.
    """
    out = copy.deepcopy(dict(data))
    for override in overrides:
        parts, value = _parse_override(override)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(f"override {override!r}: '{prefix}' is {_short_repr(child)}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in a dataclass's source (its one-line meaning).

    A field written over several lines (the formatter wraps long defaults) takes the first comment within
    its lines, else a whole-line comment right above it; a field without one maps to "".
    """
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    whole_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if tok.line.strip().startswith("#"):
                whole_line.add(tok.start[0])
    result = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            above = node.lineno - 1 if node.lineno - 1 in whole_line else None
            found = [comments[n] for n in lines if n in comments] or ([comments[above]] if above else [])
            result[node.target.id] = found[0] if found else ""
    return result


def config_reference(cls: type) -> str:
    """Every field of a config dataclass of sections, one line each: ``section.key = default  # meaning``."""
    instance = cls()
    lines = []
    for section in _init_fields(cls):
        sub = getattr(instance, section)
        meanings = field_comments(type(sub))
        lines.append(f"{section}:")
        for name in _init_fields(type(sub)):
            default = json.dumps(_to_plain(getattr(sub, name)))
            meaning = meanings.get(name, "")
            lines.append(f"  {section}.{name} = {default}" + (f"  # {meaning}" if meaning else ""))
    return "\n".join(lines)
