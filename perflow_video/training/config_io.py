"""Config data in and out: YAML is only data, plain dataclasses are the schema, pydantic checks one
against the other.

Why a ``TypeAdapter`` over stdlib dataclasses (and not pydantic dataclasses or models): the schema is
the code's own config objects, and one of them (``method.reflow_objective.ReflowConfig``) lives in the
pure-torch ``method/`` package, which users and tests also build directly; it must not depend on a
validation library. So the sections stay plain ``@dataclass`` and pydantic only validates data against
them. The root dataclass carries the rules with ``pydantic.with_config(CONFIG_RULES)``; pydantic applies
the enclosing config to every nested stdlib dataclass that has none of its own, so the sections need no
pydantic import.

The rules (``CONFIG_RULES``): unknown keys are errors (``extra="forbid"``), and values are strict:
``"3"`` and ``true`` are not ints, ``1`` is not a bool; an int is a float. Validation runs in pydantic's
JSON mode, the mode for plain data: there a mapping builds a dataclass section (in strict Python mode a
section would have to be an instance already) and a list fills a tuple. A partial section keeps the
defaults of its dataclass for the keys it leaves out.

YAML is read with PyYAML's safe loader and two YAML 1.2 rules: ``1e-4`` / ``1.5E6`` (an exponent without
a dot or without a sign) are floats, which plain PyYAML (YAML 1.1) reads as strings, and dates stay
strings. Quoted scalars (``"1e-4"``) stay strings; a duplicate key in a mapping is an error.

Layering (``train_config.load_train_config``): ``merge_dicts`` (file over family defaults), then
``apply_overrides`` (``optim.learning_rate=1e-4``), then ``from_dict``. There are no
``target: package.Class`` strings: code chooses classes, YAML only holds values.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import os
import re
import types
import typing
from collections.abc import Hashable, Mapping
from typing import Any

import pydantic
import yaml

from perflow_video.atomic_files import atomic_destination
from perflow_video.errors import ConfigError

__all__ = [
    "CONFIG_RULES",
    "ConfigError",
    "apply_overrides",
    "diff_from_defaults",
    "from_dict",
    "load_yaml_data",
    "merge_dicts",
    "parse_yaml",
    "save_yaml_config",
    "to_dict",
]

#: What every config root declares with ``pydantic.with_config``: no unknown keys, no coercion.
CONFIG_RULES = pydantic.ConfigDict(strict=True, extra="forbid")
# Longest value repr quoted in an error message; a pasted 10k-element list should not flood the terminal.
_MAX_REPR = 80

# ----------------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------------


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 exponent floats, no timestamps, and duplicate-key detection."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# Floats that YAML 1.1 misses: an exponent with no dot (1e-4) or with an unsigned exponent (1.5e6).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


def parse_yaml(text: str) -> Any:
    """YAML text -> plain data with the config loader (may raise ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_ConfigLoader)  # safe: _ConfigLoader is a SafeLoader


def _yaml_error_message(err: yaml.YAMLError) -> str:
    """'line L, column C: problem' for a marked YAML error, else the error's text."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_yaml_data(path: str | os.PathLike) -> dict:
    """Reads a YAML config file into a plain dict (no schema check); an empty file is ``{}``.

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
        raise ConfigError(f"{path}: cannot read config file: {err.strerror or err}") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML at {_yaml_error_message(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------
# plain data -> dataclass
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _validator(cls: type) -> pydantic.TypeAdapter:
    if getattr(cls, "__pydantic_config__", None) != CONFIG_RULES:
        raise TypeError(
            f"{cls.__name__} is not a config root: decorate it with pydantic.with_config(CONFIG_RULES)"
        )
    return pydantic.TypeAdapter(cls)


def from_dict(cls: type, data: Any) -> Any:
    """Builds the config dataclass ``cls`` (a root carrying ``CONFIG_RULES``) from plain data.

    Every section's ``__post_init__`` runs, so cross-field rules are checked here too.

    Raises:
        ConfigError: one line per problem, each naming its dotted key: an unknown key (with a close
            match), a wrong type (with the value given), a ``__post_init__`` ValueError.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    validator = _validator(cls)
    try:
        text = json.dumps(data, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config values must be plain YAML data: {err}") from None
    try:
        return validator.validate_json(text)
    except pydantic.ValidationError as err:
        raise ConfigError("\n".join(_problem(cls, e) for e in err.errors())) from None


def _dotted(loc: tuple) -> str:
    """('run', 'validation_prompts', 1) -> 'run.validation_prompts[1]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _keys_at(cls: type, loc: tuple) -> list[str]:
    """The keys of the section at ``loc`` below the dataclass ``cls`` (empty if it is not a section)."""
    tp: Any = cls
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            tp = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        elif dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part, Any)
        else:
            return []
    tp = _unwrap(tp)
    return [f.name for f in dataclasses.fields(tp) if f.init] if dataclasses.is_dataclass(tp) else []


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> X (the one section type a field can hold); anything else as is."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def _problem(cls: type, error: dict) -> str:
    """One pydantic error as 'dotted.key: what is wrong'."""
    loc, kind = tuple(error["loc"]), error["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        message = _unknown_key(str(loc[-1]), _keys_at(cls, loc[:-1]), _dotted(loc[:-1]))
    elif kind in ("missing", "missing_argument"):
        message = "missing required key"
    elif kind == "value_error":  # a __post_init__ check: its message names the field
        message = str(error["ctx"]["error"])
    elif kind in ("dataclass_type", "dataclass_exact_type"):
        message = f"expected a section (a mapping of keys to values), got {_given(error['input'])}"
    else:
        message = f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {_given(error['input'])}"
    return f"{_dotted(loc)}: {message}" if loc else message


def _given(value: Any) -> str:
    return f"{_short_repr(value)} ({type(value).__name__})"


def _unknown_key(key: str, valid: list[str], section: str) -> str:
    where = f"in '{section}'" if section else "at the top level"
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"unknown key '{key}' {where}. Did you mean '{close[0]}'?"
    return f"unknown key '{key}' {where}; valid keys: {', '.join(valid)}"


# ----------------------------------------------------------------------------------------------------
# dataclass -> plain data
# ----------------------------------------------------------------------------------------------------


def to_dict(instance: Any) -> dict:
    """Plain, YAML-safe data of a config instance (a root or a section): nested dicts, tuples as lists.

    Every field is included (config dataclasses have no ``init=False`` fields), so ``from_dict``
    round-trips it.
    """
    if not dataclasses.is_dataclass(instance) or isinstance(instance, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {instance!r}")
    return _dumper(type(instance)).dump_python(instance, mode="json")


@functools.cache
def _dumper(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def _dict_diff(values: dict, defaults: dict) -> dict:
    out = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            if section := _dict_diff(value, default):
                out[key] = section
        elif value != default or key not in defaults:
            out[key] = value
    return out


def diff_from_defaults(instance: Any) -> dict:
    """Only what differs from the class defaults, nested; ``from_dict(type(x), diff_from_defaults(x)) == x``."""
    return _dict_diff(to_dict(instance), to_dict(type(instance)()))


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
    """'a.b=value' -> (['a', 'b'], the value parsed as a YAML scalar / list / mapping)."""
    key, sep, text = override.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(
            f"malformed override {override!r}: expected section.key=value, e.g. optim.learning_rate=1e-4"
        )
    try:
        return parts, parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {override!r}: value is not valid YAML: {_yaml_error_message(err)}"
        ) from None


def apply_overrides(data: Mapping, overrides: list[str]) -> dict:
    """Applies ``key=value`` overrides (dotted keys, in order: a later one wins) to plain config data.

    The value is parsed as YAML: ``1e-4`` is a float, ``true`` a bool, ``null`` None, ``[a, b]`` a list,
    ``"1e-4"`` (quoted) a string; an empty value is None. Unknown keys are left to ``from_dict``, which
    reports them with their path. ``data`` is not modified.

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
