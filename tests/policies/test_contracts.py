"""Hyperparameter contracts: every policy validates its fields from their types.

Properties over every built-in policy class: each field's default passes its own contract, and a
value of the wrong type (a string for a number, a bool for an int, a string outside a Literal,
a non-finite float, a value outside a numeric bound) raises a ConfigError that names the policy,
the field and the value.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvframe
from kvframe import registry
from kvframe.errors import ConfigError
from kvframe.policies import Policy, Scorer
from kvframe.policies.contracts import Ge, Gt, Interval, NonEmpty, Note, Odd, accepts, describe, field_contracts

#: Values a policy needs besides its defaults to be constructed at all (required fields).
REQUIRED = {("schedule", "explicit"): {"layers": [0.5]}}

BUILTIN = [e for e in registry.list_policies() if e.origin == registry.BUILTIN]
FIELDS = [(e.obj, name, tp) for e in BUILTIN for name, tp in field_contracts(e.obj)]
FIELD_IDS = [f"{cls.kind}.{cls.name}.{name}" for cls, name, _ in FIELDS]


def _make(cls: type, **params: Any) -> Policy:
    return cls(**{**REQUIRED.get((cls.kind, cls.name), {}), **params})


def _parts(tp: Any) -> tuple[list[Any], list[Any]]:
    """``(alternatives, constraints)`` of a field type: the union arms (Annotated stripped)."""
    constraints: list[Any] = []
    if typing.get_origin(tp) is Annotated:
        tp, *meta = typing.get_args(tp)
        constraints = list(meta)
    arms = list(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    out = []
    for arm in arms:
        if typing.get_origin(arm) is Annotated:
            arm, *meta = typing.get_args(arm)
            constraints += meta
        out.append(arm)
    return out, constraints


def _wrong_values(tp: Any) -> st.SearchStrategy[Any]:
    """Values whose *type* the field does not take, derived from the declared alternatives."""
    arms, _ = _parts(tp)
    literals = [v for a in arms if typing.get_origin(a) is Literal for v in typing.get_args(a)]
    takes = {typing.get_origin(a) or a for a in arms if typing.get_origin(a) is not Literal}
    wrong: list[st.SearchStrategy[Any]] = [st.booleans()] if bool not in takes else []
    if str not in takes:
        wrong.append(st.text(max_size=6).filter(lambda s: s not in literals))
    if int not in takes and float not in takes:
        wrong.append(st.integers().filter(lambda i: not any(i == v and type(v) is int for v in literals)))
    # every float is wrong where no float is taken (2.0 is not an int); else only non-finite ones
    wrong.append(st.floats() if float not in takes else st.sampled_from([math.nan, math.inf, -math.inf]))
    if type(None) not in takes:
        wrong.append(st.none())
    if list not in takes:
        wrong.append(st.lists(st.integers(), max_size=2))
    return st.one_of(wrong)


def _below(bound: float, kind: type, inclusive: bool) -> st.SearchStrategy[Any]:
    """Numbers of type ``kind`` below ``bound`` (or equal to it, with ``inclusive``)."""
    if kind is int:
        return st.integers(max_value=math.floor(bound) if inclusive else math.ceil(bound) - 1)
    return st.floats(max_value=bound, exclude_max=not inclusive, allow_nan=False, allow_infinity=False)


def _out_of_bounds(tp: Any) -> st.SearchStrategy[Any] | None:
    """Numbers of the field's own type that break one of its numeric constraints."""
    arms, constraints = _parts(tp)
    kinds = [a for a in arms if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (int, float):
        return None  # ``recent`` (an int or a float) has its own test below
    kind = kinds[0]
    values: list[st.SearchStrategy[Any]] = []
    for c in constraints:
        if isinstance(c, Ge):
            values.append(_below(c.bound, kind, inclusive=False))
        elif isinstance(c, Gt):
            values.append(_below(c.bound, kind, inclusive=True))
        elif isinstance(c, Interval):
            above = st.floats(min_value=c.hi, exclude_min=c.closed[1] == "]", allow_nan=False, allow_infinity=False)
            values.append(st.one_of(_below(c.lo, float, inclusive=c.closed[0] == "("), above))
        elif isinstance(c, Odd):
            values.append(st.integers(min_value=1, max_value=1000).map(lambda i: 2 * i))
    return st.one_of(values) if values else None


def _raises_naming(cls: type, name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        _make(cls, **{name: value})
    message = str(info.value)
    assert message.startswith(f"{cls.kind} {cls.name!r}: invalid {name}="), message
    assert f"={value!r}; accepted: " in message


# ----------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("entry", BUILTIN, ids=lambda e: f"{e.kind}.{e.name}")
def test_defaults_pass_their_contracts(entry):
    policy = _make(entry.obj)
    for f in dataclasses.fields(policy):
        tp = dict(field_contracts(entry.obj))[f.name]
        if f.default is not dataclasses.MISSING:
            assert accepts(tp, f.default), (f.name, f.default, describe(tp))
        if f.default_factory is not dataclasses.MISSING:
            assert accepts(tp, f.default_factory()), f.name


@pytest.mark.parametrize(("cls", "name", "tp"), FIELDS, ids=FIELD_IDS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_wrong_types_raise_naming_the_field(cls, name, tp, data):
    _raises_naming(cls, name, data.draw(_wrong_values(tp)))


BOUNDED = [(cls, name, tp) for cls, name, tp in FIELDS if _out_of_bounds(tp) is not None]


@pytest.mark.parametrize(("cls", "name", "tp"), BOUNDED, ids=[f"{c.kind}.{c.name}.{n}" for c, n, _ in BOUNDED])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_values_outside_numeric_constraints_raise(cls, name, tp, data):
    strategy = _out_of_bounds(tp)
    assert strategy is not None
    _raises_naming(cls, name, data.draw(strategy))


def test_every_builtin_field_is_covered():
    """The properties above saw every field of every built-in policy, and a bound on the numeric ones."""
    assert len(FIELDS) >= 40
    covered = {f"{c.kind}.{c.name}" for c, _, _ in FIELDS}
    assert covered >= {"scorer.snapkv", "selector.balanced_walk", "key_merge.kvslimmer", "trigger.per_chunk"}


# ----------------------------------------------------------------------------------- messages
def test_message_names_kind_policy_field_value_and_accepted():
    with pytest.raises(ConfigError, match=re.escape("scorer 'snapkv': invalid kernel=4; accepted: an odd integer >= 1")):
        kvframe.build("snapkv", scorer={"kernel": 4})
    with pytest.raises(ConfigError, match=re.escape("scorer 'snapkv': invalid pool='mean'; accepted: avg, max")):
        kvframe.build("snapkv", scorer={"pool": "mean"})
    message = "selector 'adaptive_heads': invalid alpha=1.5; accepted: a finite number in [0, 1]"
    with pytest.raises(ConfigError, match=re.escape(message)):
        kvframe.build("adakv", selector={"alpha": 1.5})


@pytest.mark.parametrize(
    ("tp", "text"),
    [
        (Annotated[int, Ge(1)], "an integer >= 1"),
        (Annotated[int, Ge(1), Odd()], "an odd integer >= 1"),
        (Annotated[float, Interval(0, 1e-3, closed="[)")], "a finite number in [0, 0.001)"),
        (Annotated[float | None, Gt(0), Note("temperature")], "a finite number > 0, or null (temperature)"),
        (Literal["none", "right"], "none, right"),
        (bool, "true or false"),
        (Annotated[list[Any], NonEmpty()], "a non-empty list"),
        (list[Annotated[int, Ge(0)]], "a list whose items are each an integer >= 0"),
        (
            Annotated[int, Ge(0), Note("tokens")] | Annotated[float, Interval(0, 1)],
            "an integer >= 0 (tokens) or a finite number in [0, 1]",
        ),
    ],
)
def test_contracts_describe_themselves(tp, text):
    assert describe(tp) == text


@pytest.mark.parametrize(
    ("tp", "good", "bad"),
    [
        (int, [0, -3, 10**20], [True, 1.0, "1", None]),
        (float, [0, 1.5, -2], [True, math.nan, math.inf, "0.5"]),
        (bool, [True, False], [0, 1, "true", None]),
        (Literal[1, 2], [1, 2], [True, 1.0, 3, "1"]),
        (Annotated[int | None, Ge(0)], [None, 0, 4], [-1, 0.5]),
        (list[int], [[], [1, 2], (3,)], [[1, "2"], "12", [True]]),
        (tuple[int, str], [(1, "a")], [(1, 2), (1,)]),
        (Any, [None, object()], []),
    ],
)
def test_accepts(tp, good, bad):
    assert all(accepts(tp, v) for v in good)
    assert not any(accepts(tp, v) for v in bad)


def test_recent_takes_tokens_or_a_fraction():
    """``recent``: an int is a token count (>= 0), a float a fraction of the budget in [0, 1]."""
    cls = registry.get_policy("scorer", "accumulated_attention")
    for ok in (0, 7, 0.0, 0.5, 1.0):
        assert cls(recent=ok).recent == ok
    for bad in (-1, 1.5, -0.1, True, "half", None):
        _raises_naming(cls, "recent", bad)


def test_cross_field_checks_run_after_the_types():
    """``validate`` sees well-typed fields; its own errors keep their messages (budget entries)."""
    cls = registry.get_policy("schedule", "explicit")
    _raises_naming(cls, "layers", [])
    _raises_naming(cls, "layers", "0.5")
    with pytest.raises(ConfigError, match=re.escape("schedule.layers[1][0]=0")):
        cls(layers=[0.5, [0, 3]])


# ----------------------------------------------------------------------------------- plugins
def test_a_plugin_policy_with_plain_fields_is_type_checked(monkeypatch):
    """A third-party policy needs no validation code: ``power: float`` already rejects a string."""
    monkeypatch.setattr(registry, "_POLICIES", dict(registry._POLICIES))  # forget it afterwards

    @registry.register("scorer", "test_power_norm")
    @dataclass
    class PowerNorm(Scorer):
        power: float = 2.0
        scale: int = 1

        def score(self, state, ctx):  # pragma: no cover - not run
            return state.keys.norm(dim=-1) ** self.power

    assert kvframe.build({"scorer": {"name": "test_power_norm", "power": 3}}).scorer.power == 3
    message = "scorer 'test_power_norm': invalid power='two'; accepted: a finite number"
    with pytest.raises(ConfigError, match=re.escape(message)):
        kvframe.build({"scorer": {"name": "test_power_norm", "power": "two"}})
    with pytest.raises(ConfigError, match=re.escape("invalid scale=True; accepted: an integer")):
        PowerNorm(scale=True)


def test_unresolvable_annotations_are_left_unchecked():
    """An annotation naming a type that only exists for type checkers must not break a policy."""

    @dataclass
    class Unresolved(Scorer):
        power: float = 2.0
        helper: NotImportedAnywhere | None = None  # noqa: F821

    assert dict(field_contracts(Unresolved))["helper"] is Any
    assert Unresolved(helper=object()).power == 2.0
    with pytest.raises(ConfigError, match="invalid power='x'"):
        Unresolved(power="x")
