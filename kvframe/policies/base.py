"""The five policy kinds a compressor is composed of, and what they exchange.

- :class:`Scorer`: slot importance ``[B, H, T]`` (higher is kept first).
- :class:`Selector`: from scores (if it uses them) and per-head budgets, which slots to keep, and
  for each dropped slot where it goes (dropped, or folded into a kept slot).
- :class:`KeyMerge`: the key of every kept slot, given what was folded into it
  (:class:`MergedKeys`).
- :class:`ValueMerge`: the value and log-weight of every kept slot.
- :class:`BudgetSchedule`: how many slots each layer and head keeps, and (through its trigger)
  when compression runs.

Every policy is a small dataclass whose fields are its hyperparameters. Their types are the
contract (:mod:`kvframe.policies.contracts`): :class:`Policy` checks every field against its
annotation after ``__init__`` and raises :class:`~kvframe.errors.ConfigError` naming the bad value
and what is accepted; :meth:`Policy.validate` holds what a type cannot say.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvframe.errors import ConfigError
from kvframe.policies.contracts import check_fields
from kvframe.slots import SlotState


class Policy:
    """Base of all policies. ``kind`` and ``name`` are set by :func:`kvframe.registry.register`."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    #: True if the policy reads the queries of the pass that triggered compression.
    needs_queries: ClassVar[bool] = False
    #: True if the policy needs the model's rotary embedding (key re-rotation).
    needs_rope: ClassVar[bool] = False
    #: Per-slot statistics the policy reads (see :data:`kvframe.stats.STAT_SOURCES` for who keeps each).
    stats: ClassVar[tuple[str, ...]] = ()
    #: Per-slot statistics the policy keeps itself, in :meth:`observe`.
    provides: ClassVar[tuple[str, ...]] = ()
    #: True if the policy sees slots only through their contents and positions, never through where
    #: they are stored: it gives the same result on any permutation of the slots. A compressor whose
    #: policies all are may evict in place during decoding, which stores slots out of position
    #: order (``docs/architecture.md``, "In-place eviction").
    order_free: ClassVar[bool] = False

    def in_place_reach(self) -> int | None:
        """For a key or value merge: the kept slots its result for a kept slot depends on, besides
        that slot and the slots folded into it: the ``r`` kept slots that follow each dropped slot
        by position (``0``: none). ``None`` (the default): the merge must see the whole layer, so
        its compressor never evicts in place."""
        return None

    def observe(self, state: SlotState, ctx: CompressionContext) -> SlotState:
        """Update statistics this policy keeps; called every time the trigger fires, before the
        budget check (so statistics stay current also when nothing is dropped)."""
        return state

    def to_dict(self) -> dict[str, Any]:
        """Hyperparameters as a plain dict, with the registered ``name`` first."""
        out: dict[str, Any] = {"name": self.name}
        for f in fields(self):  # type: ignore[arg-type]
            out[f.name] = getattr(self, f.name)
        return out

    def __post_init__(self) -> None:
        """Check every hyperparameter against its field type, then :meth:`validate`. Runs for every
        dataclass policy (subclasses put their own checks in :meth:`validate`, not here), so a bad
        value fails when the compressor is built, never mid-generation."""
        check_fields(self, f"{self.kind} {self.name!r}")
        self.validate()

    def validate(self) -> None:
        """Checks the field types cannot express (several fields together, values interpreted
        by other code). Raise :class:`~kvframe.errors.ConfigError`, e.g. through
        :func:`~kvframe.policies.contracts.field_error`."""


@dataclass
class CompressionContext:
    """What a policy may know about the pass that triggered compression.

    Attributes
    ----------
    layer_idx, num_layers:
        Which layer is being compressed, out of how many.
    queries:
        ``[B, H_q, Q, D]`` queries of the current pass (rotated like the keys), or ``None`` when
        compressing plain tensors without queries.
    query_positions:
        ``[B, Q]`` positions of those queries.
    query_valid:
        ``[B, Q]`` false for padding queries.
    scaling:
        The attention logit scale (``1/sqrt(D)`` unless the model says otherwise).
    phase:
        ``"prefill"``, ``"chunk"`` or ``"decode"``.
    rope:
        The re-rotation service (:class:`kvframe.rope.Rotary`) when the model has RoPE.
    generator:
        Seeded generator for stochastic policies (one per cache, seeded from the compressor's
        ``seed``, so a run is reproducible).
    sliding_window:
        The layer's sliding window, if any.
    reference:
        ``[B, H]`` number of tokens a ratio budget refers to: the tokens seen so far during prefill
        and chunked prefill, the prompt length during decoding (so a decode-time cache holds a fixed
        capacity). ``None`` means the slots' content.
    strict:
        Whether an absolute budget larger than the content is an error (after a one-shot prefill) or
        simply means "not full yet" (chunked prefill, decoding).
    step:
        How many times this layer's trigger fired before (0 at the first compression).
    budgets:
        ``[B, H]`` slots to keep, set by the compressor before scoring (scorers that protect a
        fraction of the budget read it).
    """

    layer_idx: int = 0
    num_layers: int = 1
    queries: Tensor | None = None
    query_positions: Tensor | None = None
    query_valid: Tensor | None = None
    scaling: float | None = None
    phase: str = "prefill"
    rope: Any = None
    generator: torch.Generator | None = None
    sliding_window: int | None = None
    reference: Tensor | None = None
    strict: bool = True
    step: int = 0
    budgets: Tensor | None = None
    _window_scores: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def require_queries(self, who: str) -> Tensor:
        if self.queries is None:
            raise ConfigError(
                f"{who} scores slots from attention and needs queries; pass queries=... to kvframe.compress "
                "or use it inside kvframe.attach"
            )
        return self.queries

    def window_scores(self, state: SlotState, window: int, who: str = "scorer") -> Tensor:
        """Attention of the last ``window`` queries per slot, ``[B, H_kv, T]`` float32.

        The softmax rows of the window queries over the slots (with the slots' log-weights, invalid
        and future slots masked), summed over the window queries and averaged over the ``G`` query
        heads of each KV head, divided by the number of valid window queries: the op
        ``kvframe::window_scores`` (:func:`kvframe.kernels.window.window_scores`), which never holds
        all ``G x w x T`` probabilities at once."""
        from kvframe.kernels.window import window_scores

        q = self.require_queries(who)
        w = min(window, q.shape[2])
        if w in self._window_scores:
            return self._window_scores[w]
        if q.shape[1] % state.num_heads:
            raise ConfigError(f"query heads ({q.shape[1]}) is not a multiple of KV heads ({state.num_heads})")
        qpos = self.query_positions[:, -w:] if self.query_positions is not None else None
        qvalid = self.query_valid[:, -w:] if self.query_valid is not None else None
        out = window_scores(
            q[:, :, -w:, :],
            state.keys,
            state.log_weights,
            state.positions,
            state.valid,
            query_positions=qpos,
            query_valid=qvalid,
            scaling=self.scaling,
            sliding_window=self.sliding_window if qpos is not None else None,
        )
        self._window_scores[w] = out
        return out


@dataclass
class Selection:
    """Which slots survive a compression.

    Attributes
    ----------
    keep:
        ``[B, H, S]`` indices (into the ``T`` input slots) of the kept slots, ascending.
    keep_valid:
        ``[B, H, S]`` false for padding entries (heads that keep fewer than ``S`` slots).
    assign:
        ``[B, H, T]`` for each input slot, the index in ``[0, S)`` of the kept slot it is folded
        into, or ``-1`` if it is dropped; kept slots map to themselves. ``None`` means pure
        eviction (nothing is folded). A kept slot and the slots folded into it form a *group*; the
        merged slot takes the position of the group's last token.
    weight:
        ``[B, H, T]`` optional per-slot weights chosen by the selector (BalanceKV's sample
        weights ``w``; merges may read them).
    """

    keep: Tensor
    keep_valid: Tensor
    assign: Tensor | None = None
    weight: Tensor | None = None


class Scorer(Policy):
    kind: ClassVar[str] = "scorer"

    def score(self, state: SlotState, ctx: CompressionContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Selector(Policy):
    kind: ClassVar[str] = "selector"
    #: False for selectors that choose slots without scores (BalanceKV's halving): a compressor
    #: with such a selector needs no scorer, and without one ``select`` gets ``scores=None``.
    uses_scores: ClassVar[bool] = True

    def needs_compression(self, budgets: Tensor, state: SlotState, ctx: CompressionContext) -> bool:
        """False when selection would keep every slot (the compressor then returns the state as is)."""
        return not (bool(state.valid.all()) and bool((budgets >= state.content_slots()).all()))

    def select(self, scores: Tensor | None, budgets: Tensor, state: SlotState, ctx: CompressionContext) -> Selection:  # pragma: no cover
        """The kept slots, from ``scores`` ``[B, H, T]`` (higher is kept first) and ``budgets`` ``[B, H]``.

        ``scores`` is ``None`` only for a selector whose ``uses_scores`` is false, in a compressor
        without a scorer; a selector that uses scores always gets them."""
        raise NotImplementedError


@dataclass
class MergedKeys:
    """What a key merge returns, one type for every key merge (so the compressor, compiled or not,
    never inspects the result's shape).

    Attributes
    ----------
    keys:
        ``[B, H, S, D]`` keys of the kept slots, rotated at ``kept.positions``.
    stats:
        Per-slot statistics of the kept slots the merge updates (``[B, H, S, ...]`` each, e.g. a
        propagated Hessian proxy); empty when it updates none.
    """

    keys: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class KeyMerge(Policy):
    """The keys of the kept slots, and the statistics the merge updates (:class:`MergedKeys`)."""

    kind: ClassVar[str] = "key_merge"

    def merge(self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext) -> MergedKeys:  # pragma: no cover
        raise NotImplementedError


class ValueMerge(Policy):
    """The values ``[B, H, S, D]`` and log-weights ``[B, H, S]`` of the kept slots.

    Stored values are *mean* values: a slot standing for ``l`` tokens has log-weight ``ln l`` and
    value ``V_sum / l`` (logit bias ``ln l`` with mean values is exactly AsymKV's cardinality-aware
    softmax over summed values; see ``docs/methods.md#merged-slots-and-counts``)."""

    kind: ClassVar[str] = "value_merge"

    def merge(
        self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext
    ) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError


class BudgetSchedule(Policy):
    kind: ClassVar[str] = "schedule"
    order_free: ClassVar[bool] = True  # budgets come from counts, never from slots

    def budgets(self, budget: float | int, content: Tensor, ctx: CompressionContext) -> Tensor:  # pragma: no cover
        """``[B, H]`` slots to keep per row and head, given ``content`` ``[B, H]`` content slots."""
        raise NotImplementedError


class Trigger(Policy):
    """When a compressor runs. Decides from the event of one layer's attention pass.

    A trigger with ``chunk_size`` set makes :func:`kvframe.attach` feed every multi-token input in
    chunks of that many tokens; with ``scoring_pass`` ``"forward"`` or ``"backward"`` each chunk after
    the first is run twice (a scoring pass whose statistics drive compression of the past, then the
    real pass), as AsymKV and KVSlimmer do.
    """

    kind: ClassVar[str] = "trigger"
    order_free: ClassVar[bool] = True  # triggers see event counts, never slots
    #: False for triggers that can never fire (no compression): budgets are then irrelevant.
    ever_fires: ClassVar[bool] = True
    #: Prefill chunk length (tokens) or None for one-shot prefill.
    chunk_size: int | None = None
    #: "none", "forward" (attention statistics only) or "backward" (also gradients w.r.t. keys).
    scoring_pass: str = "none"
    #: True if the budget is a capacity the cache fills up to over time (chunked prefill,
    #: decoding): an absolute budget above the prompt length then just means "not full yet".
    capacity: ClassVar[bool] = False

    @property
    def headroom(self) -> int:
        """Free slots the slot store keeps after each compression: the slots appended before this
        trigger fires again (decode-time: ``every``; chunked: one chunk), so they are written in place."""
        return 0

    def fires(self, event: TriggerEvent) -> bool:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class TriggerEvent:
    """One layer's attention pass, as seen by a trigger.

    ``slots_before``: content slots the layer held before this pass (max over rows);
    ``new_tokens``: tokens appended by this pass; ``decode_steps``: single-token passes so far
    (this one included); ``compressions``: times this layer was compressed before.
    """

    slots_before: int
    new_tokens: int
    slots_after: int
    decode_steps: int
    compressions: int

    @property
    def phase(self) -> str:
        if self.new_tokens > 1:
            return "prefill" if self.slots_before == 0 else "chunk"
        return "decode"
