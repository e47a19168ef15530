"""The shape of a record read back from disk (summary.json, trial.json, a stage record, a lock, a stored config):
every file in a run, sweep or tune directory may come from someone else, so each is checked field by field
before any value is used. A mismatch is one line naming the field.

A spec is a type or a tuple of types (``int`` never matches a bool; ``float`` takes an int), ``None`` for null,
``Fields(...)`` for an object with known keys, ``ListOf(spec)`` or ``MapOf(spec)``, or ``Any``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

NUMBER = (int, float)
MAX_INT_DIGITS = 30  # a count, a seed, a pid or a job number; a 5,000-digit integer is no such thing


class SchemaMismatch(ValueError):
    def __init__(self, where: str, expected: str, got: Any = None, missing: bool = False):
        shown = "missing" if missing else f"should be {expected}, got {describe(got)}"
        super().__init__(f"{where or 'the top level'} {shown}")


@dataclass(frozen=True)
class Fields:
    """An object: ``required`` keys must be there, ``optional`` ones may be; any other key is passed over."""

    required: dict[str, Any] = field(default_factory=dict)
    optional: dict[str, Any] = field(default_factory=dict)


class Finite:
    """A spec: a finite number (a validation loss; never NaN or infinity, which JSON's reader lets through)."""


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class MapOf:
    value: Any


def _container_of(spec: Any) -> type | tuple | None:
    if isinstance(spec, Fields | MapOf):
        return dict
    if isinstance(spec, ListOf):
        return (list, tuple)
    return None


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, int):
        return "an integer" if len(str(abs(value))) > 20 else str(value)
    if isinstance(value, float):
        return json.dumps(value)  # NaN, Infinity: as the file spells them
    if isinstance(value, str):
        return json.dumps(value[:40]) if len(value) <= 40 else "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _name(spec: Any) -> str:
    if spec is None:
        return "null"
    if spec is Any:
        return "anything"
    if isinstance(spec, tuple):
        return " or ".join(_name(s) for s in spec)
    if isinstance(spec, Fields):
        return "an object"
    if isinstance(spec, ListOf):
        return f"a list of {_name(spec.item)}"
    if isinstance(spec, MapOf):
        return f"an object of {_name(spec.value)}"
    return {int: "an integer", float: "a number", Finite: "a finite number", str: "a string", bool: "true or false",
            list: "a list", dict: "an object"}.get(spec, spec.__name__)


_PLAIN = {int: (int,), float: (int, float), str: (str,), None: (type(None),), bool: (bool,)}
_INT_LIMIT = 10 ** MAX_INT_DIGITS


_PLAIN_OF: dict[int, tuple[Any, frozenset | None]] = {}  # id(spec) -> (spec, its plain types): specs live long


def _plain_types(spec: Any) -> frozenset | None:
    """The exact types a spec of plain values takes (a fast path for long lists: a history, a confusion matrix)."""
    known = _PLAIN_OF.get(id(spec))
    if known is not None and known[0] is spec:
        return known[1]
    options = spec if isinstance(spec, tuple) else (spec,)
    plain = None
    if all(any(option is kind for kind in _PLAIN) for option in options):  # identity: a Fields is unhashable
        plain = frozenset(t for option in options for t in _PLAIN[option])
    _PLAIN_OF[id(spec)] = (spec, plain)
    return plain


def _plain_ok(value: Any, types: frozenset) -> bool:
    kind = type(value)
    if kind not in types:
        return False
    return kind is not int or -_INT_LIMIT < value < _INT_LIMIT


def _matches_type(value: Any, kind: Any) -> bool:
    if kind is None:
        return value is None
    if kind is Any:
        return True
    if kind is float:
        return isinstance(value, NUMBER) and not isinstance(value, bool)
    if kind is Finite:
        return _matches_type(value, float) and (isinstance(value, int) or math.isfinite(value))
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and len(str(abs(value))) <= MAX_INT_DIGITS
    if isinstance(kind, type):
        return isinstance(value, kind)
    return False


def check(value: Any, spec: Any, where: str = "") -> Any:
    """``value`` when it fits ``spec``; else SchemaMismatch naming the field (``a.b[2].c``)."""
    plain = _plain_types(spec)
    if plain is not None and _plain_ok(value, plain):
        return value
    if isinstance(spec, tuple):
        errors = []
        for option in spec:
            try:
                return check(value, option, where)
            except SchemaMismatch as e:
                errors.append((option, e))
        same_kind = [e for option, e in errors if _container_of(option) is not None
                     and isinstance(value, _container_of(option))]
        if len(errors) == 1 or len(same_kind) == 1:  # the inner field that is wrong, not "an object or null"
            raise (same_kind or [errors[0][1]])[0]
        raise SchemaMismatch(where, _name(spec), value)
    if isinstance(spec, Fields):
        if not isinstance(value, dict):
            raise SchemaMismatch(where, "an object", value)
        for key, inner in spec.required.items():
            if key not in value:
                raise SchemaMismatch(f"{where}.{key}" if where else key, _name(inner), missing=True)
            check(value[key], inner, f"{where}.{key}" if where else key)
        for key, inner in spec.optional.items():
            if key in value:
                check(value[key], inner, f"{where}.{key}" if where else key)
        return value
    if isinstance(spec, ListOf):
        if not isinstance(value, list | tuple):
            raise SchemaMismatch(where, _name(spec), value)
        plain = _plain_types(spec.item)
        for k, item in enumerate(value):
            if plain is None or not _plain_ok(item, plain):  # the slow path names the field
                check(item, spec.item, f"{where}[{k}]")
        return value
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise SchemaMismatch(where, _name(spec), value)
        plain = _plain_types(spec.value)
        for key, item in value.items():
            if plain is None or not _plain_ok(item, plain):
                check(item, spec.value, f"{where}.{key}" if where else str(key))
        return value
    if not _matches_type(value, spec):
        raise SchemaMismatch(where, _name(spec), value)
    return value


def depth(value: Any, limit: int) -> bool:
    """Whether ``value`` nests no deeper than ``limit`` levels (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, level = stack.pop()
        if level > limit:
            return False
        children = item.values() if isinstance(item, dict) else item
        stack.extend((v, level + 1) for v in children if isinstance(v, dict | list))
    return True


# ---- cnnlab's own records, as their readers use them ----

_NUMBER_OR_NULL = (float, None)
SUMMARY_RECORD = Fields(optional={  # summary.json: what `runs`, `compare`, `report`, the API and sweeps read back
    "status": str, "name": (str, None), "task": (str, None), "model": (str, None), "dataset": (str, None),
    "monitor": (str, None), "error": (str, None), "tensorboard": (str, None), "run_dir": (str, None),
    "best_value": _NUMBER_OR_NULL, "best_epoch": (int, None), "wall_time_s": _NUMBER_OR_NULL,
    "train_time_s": _NUMBER_OR_NULL, "initial_loss": _NUMBER_OR_NULL, "expected_initial_loss": _NUMBER_OR_NULL,
    "history": ListOf(MapOf((float, str, None))), "selected": MapOf((MapOf((float, str, None)), None)),
    "environment": (MapOf(Any), None), "confusion_matrix": (ListOf(ListOf(int)), None), "sizes": (MapOf((int, None)), None),
})
