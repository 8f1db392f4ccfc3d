"""Hyperparameter contracts: a policy's field types say which values it accepts.

Every policy is a dataclass whose fields are its hyperparameters. Their annotations are the
contract, checked once for every policy by :meth:`kvframe.policies.base.Policy.__post_init__`, so a
policy states what it accepts instead of re-implementing the checks:

- ``int`` (never a bool), ``float`` (an int or a float, never a bool, finite), ``bool``, ``str``;
- ``Literal["avg", "max"]``: one of the literals (of the same type: ``1`` is not ``True``);
- ``X | None``, ``X | Y``: any of the alternatives;
- ``list[X]`` / ``tuple[X, ...]``: a list or tuple whose items are ``X`` (``Any``: unchecked);
- ``Annotated[T, marker, ...]``: ``T`` plus the markers below, e.g.
  ``kernel: Annotated[int, Ge(1), Odd()] = 5``. Markers apply to a value that is not null, so
  ``Annotated[float | None, Gt(0)]`` is an optional positive number.

Markers describe themselves, so an error says what is accepted in words (``an odd integer >= 1``)
without a hand-written message per field. Annotations this module does not know (a plugin's own
classes, other libraries' ``Annotated`` metadata) are checked with ``isinstance`` where they are a
class and otherwise accepted, so any dataclass can be registered as a policy.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
import types
import typing
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Annotated, Any, Literal, Union

from kvframe.errors import ConfigError


class Constraint:
    """A condition on a value of the right type. ``adjective`` goes before the noun of the
    accepted-values phrase (``odd`` integer), :meth:`qualifier` after it (integer ``>= 1``)."""

    adjective: str = ""

    def holds(self, value: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def qualifier(self) -> str:
        return ""


def _num(x: float) -> str:
    """A bound as a user would write it in YAML (``1``, ``0.5``, ``0.001``)."""
    return f"{x:g}"


@dataclass(frozen=True)
class Ge(Constraint):
    """``value >= bound``."""

    bound: float

    def holds(self, value: Any) -> bool:
        return value >= self.bound

    def qualifier(self) -> str:
        return f">= {_num(self.bound)}"


@dataclass(frozen=True)
class Gt(Constraint):
    """``value > bound``."""

    bound: float

    def holds(self, value: Any) -> bool:
        return value > self.bound

    def qualifier(self) -> str:
        return f"> {_num(self.bound)}"


@dataclass(frozen=True)
class Interval(Constraint):
    """``lo <= value <= hi``; ``closed`` says which ends are included (``"[]"``, ``"[)"``, ...)."""

    lo: float
    hi: float
    closed: str = "[]"

    def holds(self, value: Any) -> bool:
        above = value >= self.lo if self.closed[0] == "[" else value > self.lo
        below = value <= self.hi if self.closed[1] == "]" else value < self.hi
        return above and below

    def qualifier(self) -> str:
        return f"in {self.closed[0]}{_num(self.lo)}, {_num(self.hi)}{self.closed[1]}"


@dataclass(frozen=True)
class Odd(Constraint):
    """An odd integer (a centred pooling kernel)."""

    adjective = "odd"

    def holds(self, value: Any) -> bool:
        return value % 2 == 1


@dataclass(frozen=True)
class NonEmpty(Constraint):
    """A list (or string) with at least one item."""

    adjective = "non-empty"

    def holds(self, value: Any) -> bool:
        return len(value) > 0


@dataclass(frozen=True)
class Note:
    """What the value means, added to the accepted-values phrase in parentheses; checks nothing."""

    text: str


# ------------------------------------------------------------------------------------ checking
NONE_TYPE = type(None)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _split_annotated(tp: Any) -> tuple[Any, list[Constraint], list[Note]]:
    """``(base type, constraints, notes)`` of a possibly ``Annotated`` type."""
    if typing.get_origin(tp) is not Annotated:
        return tp, [], []
    base, *meta = typing.get_args(tp)
    return base, [m for m in meta if isinstance(m, Constraint)], [m for m in meta if isinstance(m, Note)]


def accepts(tp: Any, value: Any) -> bool:
    """Whether ``value`` satisfies the type contract ``tp``."""
    base, constraints, _ = _split_annotated(tp)
    if not _type_accepts(base, value):
        return False
    return value is None or all(c.holds(value) for c in constraints)


def _type_accepts(tp: Any, value: Any) -> bool:
    if tp is Any or isinstance(tp, (typing.TypeVar, typing.ForwardRef, str)):
        return True
    if tp is None or tp is NONE_TYPE:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    origin = typing.get_origin(tp)
    if _is_union(tp):
        return any(accepts(arm, value) for arm in typing.get_args(tp))
    if origin is Literal:
        return any(value == lit and type(value) is type(lit) for lit in typing.get_args(tp))
    if tp in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple)) and _items_accepted(typing.get_args(tp), value)
    cls = origin if origin is not None else tp
    return isinstance(value, cls) if isinstance(cls, type) else True


def _items_accepted(args: tuple[Any, ...], value: list[Any] | tuple[Any, ...]) -> bool:
    """Items of a list or tuple against ``list[X]``, ``tuple[X, ...]`` or ``tuple[X, Y]``."""
    if not args:
        return True
    if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
        return all(accepts(args[0], item) for item in value)
    return len(value) == len(args) and all(accepts(a, item) for a, item in zip(args, value))


# ------------------------------------------------------------------------------------ describing
NOUNS: dict[Any, str] = {int: "integer", float: "finite number", str: "string", list: "list", tuple: "list"}


def _yaml(value: Any) -> str:
    """A literal as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def describe(tp: Any) -> str:
    """The values ``tp`` accepts, in words (``an odd integer >= 1``; ``avg, max``)."""
    base, constraints, notes = _split_annotated(tp)
    if _is_union(base) and NONE_TYPE in typing.get_args(base) and constraints:
        rest = [a for a in typing.get_args(base) if a is not NONE_TYPE]
        inner = rest[0] if len(rest) == 1 else Union[tuple(rest)]
        text = describe(Annotated[(inner, *constraints)]) + ", or null"
    else:
        text = _noun_phrase(base, constraints)
    return text + "".join(f" ({n.text})" for n in notes)


def _noun_phrase(tp: Any, constraints: list[Constraint]) -> str:
    adjectives = [c.adjective for c in constraints if c.adjective]
    qualifiers = [c.qualifier() for c in constraints if c.qualifier()]
    noun = NOUNS.get(typing.get_origin(tp) or tp)
    if noun is not None:
        words = " ".join([*adjectives, noun, *qualifiers])
        return ("an " if words[0] in "aeiou" else "a ") + words + _items_phrase(typing.get_args(tp))
    return " ".join([*adjectives, _bare_phrase(tp), *qualifiers])


def _items_phrase(args: tuple[Any, ...]) -> str:
    """What the items of a ``list[X]`` / ``tuple[X, ...]`` must be (nothing for ``Any``)."""
    if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
        return "" if args[0] is Any else f" whose items are each {describe(args[0])}"
    return f" of {len(args)} items: " + "; ".join(describe(a) for a in args) if args else ""


def _bare_phrase(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is None or tp is NONE_TYPE:
        return "null"
    if tp is Any:
        return "any value"
    if typing.get_origin(tp) is Literal:
        return ", ".join(_yaml(v) for v in typing.get_args(tp))
    if _is_union(tp):
        arms = sorted(typing.get_args(tp), key=lambda a: a is NONE_TYPE)  # null last
        return " or ".join(describe(a) for a in arms)
    name = getattr(tp, "__name__", None) or str(tp)
    return f"a {name}"


# ------------------------------------------------------------------------------------ policies
@functools.cache
def field_contracts(cls: type) -> tuple[tuple[str, Any], ...]:
    """``(field name, type)`` of every init field of the dataclass ``cls``, annotations resolved."""
    hints = _type_hints(cls)
    return tuple((f.name, hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init)


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of ``cls`` (with ``Annotated`` extras). An annotation that cannot be
    resolved (a plugin naming a type imported only for type checkers) is left unchecked."""
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except Exception:
        hints: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            module = vars(sys.modules[klass.__module__]) if klass.__module__ in sys.modules else {}
            for name, ann in inspect.get_annotations(klass).items():
                hints[name] = _resolve(ann, module, dict(vars(klass)))
        return hints


def _resolve(annotation: Any, globalns: dict[str, Any], localns: dict[str, Any]) -> Any:
    """One annotation evaluated as ``typing.get_type_hints`` would (a quoted annotation under
    ``from __future__ import annotations`` is a string twice), or ``Any`` if it names nothing."""
    while isinstance(annotation, str):
        try:
            annotation = eval(annotation, globalns, localns)
        except Exception:
            return Any
    return annotation


def field_error(owner: str, field: str, value: Any, accepted: str) -> ConfigError:
    """The error for a bad hyperparameter: ``scorer 'snapkv': invalid kernel=4; accepted: ...``."""
    return ConfigError(f"{owner}: invalid {field}={value!r}; accepted: {accepted}")


def check_fields(obj: Any, owner: str) -> None:
    """Raise :class:`ConfigError` for the first field of the dataclass ``obj`` whose value breaks
    its contract; ``owner`` names the object in the message (``scorer 'snapkv'``)."""
    for name, tp in field_contracts(type(obj)):
        value = getattr(obj, name)
        if not accepts(tp, value):
            raise field_error(owner, name, value, describe(tp))
