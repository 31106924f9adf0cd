"""Typed options: dataclass fields with help text, parsed from ``KEY=VALUE`` strings by their declared type.

Every training part (``finetune_ext.parts.contracts``) and ``TrainConfig`` declare their options as dataclass
fields made with ``option(default, help)``; the CLI, ``finetune-ext methods`` and the error messages are
generated from them. A value given as a string (from the command line) is converted by the field's type:
``bool`` takes true/false/1/0/yes/no, ``X | None`` takes ``null``, ``list[X]`` a JSON list or a
comma-separated one, ``str | list[str]`` a list when the value is a JSON list or has a comma and the string
otherwise, ``Literal[...]`` one of its values. Values given from Python keep their type. Range
checks live in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

from finetune_ext.errors import UserError

T = TypeVar("T")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def option(default: Any = dataclasses.MISSING, help: str = "", choices: Any = None) -> Any:
    """A dataclass field with help text (and, for the CLI, a callable giving its valid choices); mutable
    defaults (lists, dicts) are copied per instance."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, "choices": choices}}
    if isinstance(default, (list, dict)):
        kwargs["default_factory"] = lambda: type(default)(default)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of dataclass ``cls`` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(tp: Any) -> str:
    """A short readable name of a field type: ``int``, ``str | None``, ``one of 'a', 'b'``."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if _is_union(tp):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def parse_value(text: str, tp: Any, name: str) -> Any:
    """Convert the command-line string ``text`` to the type ``tp`` of option ``name``."""
    if tp is str or tp is Any:
        return text
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and text.lower() in ("null", "none"):
            return None
        rest = [a for a in args if a is not type(None)]
        lists = [a for a in rest if typing.get_origin(a) is list]
        if lists and (text.lstrip().startswith("[") or ("," in text and str in rest)):  # `str | list[str]`
            return parse_value(text, lists[0], name)
        for arm in sorted(rest, key=lambda a: (typing.get_origin(a) is list, a is str)):  # str, lists: last
            try:
                return parse_value(text, arm, name)
            except UserError:
                continue
        raise UserError(f"{name}: expected {type_name(tp)}, got {text!r}")
    if typing.get_origin(tp) is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
        raise UserError(f"{name}: expected {type_name(tp)}, got {text!r}")
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise UserError(f"{name}: expected a JSON list or comma-separated values, got {text!r}") from None
            return [parse_value(v, item, name) if isinstance(v, str) else v for v in items]
        return [parse_value(v.strip(), item, name) for v in text.split(",") if v.strip()]
    if tp is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise UserError(f"{name}: expected true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise UserError(f"{name}: expected {tp.__name__}, got {text!r}") from None
    raise TypeError(f"{name}: options of type {type_name(tp)} cannot be given on the command line")


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    """``["k=v", ...]`` from the command line as a dict; a clear error for an item without ``=``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def build(cls: type[T], values: Mapping[str, Any], what: str) -> T:
    """An instance of options dataclass ``cls`` from ``values`` (strings are parsed by the field types).

    Unknown keys fail naming the valid ones; parse errors and the dataclass's own checks become a
    ``UserError`` prefixed with ``what``.
    """
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        valid = ", ".join(types_) or "none"
        raise UserError(f"{what}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
    try:
        kwargs = {k: parse_value(v, types_[k], k) if isinstance(v, str) else v for k, v in values.items()}
        check_finite(kwargs)
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # UserError is a ValueError
        raise UserError(f"{what}: {err}") from None


def check_finite(values: Mapping[str, Any]) -> None:
    """Every number among ``values`` is finite: NaN and infinity are never a meaningful option value."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name}: expected a finite number, got {value}")


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` for every field of options dataclass ``cls``."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f.name, type_name(field_types(cls)[f.name]), default, f.metadata.get("help", "")))
    return rows


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)
