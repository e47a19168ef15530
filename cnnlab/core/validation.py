"""Type and range checks for config values, driven by annotations.

A builder's signature (or a settings dataclass) is the single source of truth
for which options exist, their types and their ranges:

    def sgd(params, *, lr: PositiveFloat = 0.1, momentum: UnitInterval = 0.0): ...

``check_value`` converts a config value to the annotated type or raises a
CnnlabError that names the key, e.g. ``optimizer.lr must be a number > 0, got -1``.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from cnnlab.core.errors import CnnlabError, suggestion


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Range:
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def contains(self, x: float) -> bool:
        return not (
            (self.gt is not None and not x > self.gt)
            or (self.ge is not None and not x >= self.ge)
            or (self.lt is not None and not x < self.lt)
            or (self.le is not None and not x <= self.le)
        )

    def describe(self) -> str:
        parts = []
        if self.gt is not None:
            parts.append(f"> {_bound(self.gt)}")
        if self.ge is not None:
            parts.append(f">= {_bound(self.ge)}")
        if self.lt is not None:
            parts.append(f"< {_bound(self.lt)}")
        if self.le is not None:
            parts.append(f"<= {_bound(self.le)}")
        return " and ".join(parts)


PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
UnitInterval = Annotated[float, Range(ge=0, le=1)]
Probability = Annotated[float, Range(ge=0, lt=1)]  # dropout: 1.0 would drop everything
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
Seed = Annotated[int, Range(ge=0, le=2**32 - 1)]  # numpy's range, and far inside torch's (seed + rank offsets too)


def range_of(annotation: Any) -> Range | None:
    """The Range an annotation carries (through Optional and Annotated), or None."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        found = [r for a in typing.get_args(annotation) if (r := range_of(a)) is not None]
        return found[0] if found else None
    if typing.get_origin(annotation) is Annotated:
        return next((m for m in annotation.__metadata__ if isinstance(m, Range)), None)
    return None


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _literal(choice: Any) -> str:
    """A Literal choice as the user writes it in YAML: true/false, not True/False."""
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


def describe_type(annotation: Any) -> str:
    """A short human description of an annotation, for error messages and listings."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *meta = typing.get_args(annotation)
        ranges = [m.describe() for m in meta if isinstance(m, Range)]
        return describe_type(base) + (f" {' '.join(ranges)}" if ranges else "")
    if origin is Literal:
        return "one of " + ", ".join(map(_literal, typing.get_args(annotation)))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        return " or ".join(describe_type(a) for a in args) + (" or null" if nullable else "")
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"a list of {describe_type(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def check_value(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation``, or raise CnnlabError naming ``key``."""
    if annotation is Any or annotation is typing.Any:
        return value
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *meta = typing.get_args(annotation)
        converted = check_value(key, value, base)
        if any(isinstance(m, Range) and not m.contains(converted) for m in meta):
            raise CnnlabError(f"{key} must be {describe_type(annotation)}, got {_show(value)}")
        return converted
    if origin in (Union, types.UnionType):
        return _check_union(key, value, annotation)
    if origin is Literal:
        return _check_literal(key, value, typing.get_args(annotation))
    if origin in (list, tuple) or annotation in (list, tuple):
        return _check_sequence(key, value, annotation)
    if annotation in SCALARS:
        return _check_scalar(key, value, annotation)
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise TypeError(f"cnnlab cannot check values of type {annotation!r} (key {key})")


def _check_union(key: str, value: Any, annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return check_value(key, value, arg)
        except CnnlabError:
            pass
    raise CnnlabError(f"{key} must be {describe_type(annotation)}, got {_show(value)}")


def _check_literal(key: str, value: Any, choices: tuple) -> Any:
    # type() too, so that true is not accepted where 1 is meant.
    if not any(value == c and type(value) is type(c) for c in choices):
        hint = suggestion(str(value), map(str, choices)) if isinstance(value, str) else ""
        raise CnnlabError(f"{key} must be one of {', '.join(map(_literal, choices))}, got {_show(value)}{hint}")
    return value


def _check_sequence(key: str, value: Any, annotation: Any) -> list | tuple:
    origin = typing.get_origin(annotation) or annotation
    if not isinstance(value, (list, tuple)):
        raise CnnlabError(f"{key} must be {describe_type(annotation)}, got {_show(value)}")
    args = typing.get_args(annotation)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise CnnlabError(f"{key} must have {len(args)} items, got {_show(list(value))}")
        items = [check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
    else:
        item_type = args[0] if args else Any
        items = [check_value(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


SCALARS = (bool, int, float, str)


def _check_scalar(key: str, value: Any, annotation: type) -> Any:
    """bool, int, float or str, strictly: true is no integer, 1 no boolean, and a float must be finite."""
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise CnnlabError(f"{key} must be a finite number, got {_show(value)}")
        return float(value)
    if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    raise CnnlabError(f"{key} must be {describe_type(annotation)}, got {_show(value)}")


def check_component(key: str, value) -> str:
    """``value`` (config key ``key``) as one folder name: no separator, no .. and no control character."""
    text = str(value)
    if (not text or text in (".", "..") or "/" in text or "\\" in text or any(ord(c) < 32 or ord(c) == 127 for c in text)
            or len(text.encode()) > 200):
        raise CnnlabError(f"{key}={text!r}: becomes a folder name, so it must be one path component (no '/', "
                          "'..' or control characters, at most 200 bytes)")
    return text
