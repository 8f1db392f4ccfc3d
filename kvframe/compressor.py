"""A compressor: one policy of each kind, plus a budget and a position mode.

Its :meth:`Compressor.compress` is a pure function of tensors (a :class:`SlotState` and a
:class:`CompressionContext` in, a smaller :class:`SlotState` out), so it can be checked on plain
tensors and compiled. Build one by name or from YAML with :func:`kvframe.build`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kvframe.errors import ConfigError
from kvframe.policies.base import (
    BudgetSchedule,
    CompressionContext,
    KeyMerge,
    MergedKeys,
    Scorer,
    Selection,
    Selector,
    Trigger,
    ValueMerge,
)
from kvframe.policies.budgets import check_budget
from kvframe.slots import Eviction, SlotState, true_slots_first

POSITION_MODES = ("original", "reindex")
#: Most slots per row and head an in-place eviction drops; a firing that drops more (the first one
#: after the prompt) compresses densely.
IN_PLACE_MAX = 8
COMPILE_OPTIONS = ("backend", "mode", "dynamic")


def check_compile(value: Any) -> bool | str | dict[str, Any]:
    """Validate a ``compile`` setting: ``auto``, ``true``, ``false`` or a mapping of torch.compile options."""
    if isinstance(value, Mapping):
        opts = dict(value)
        unknown = [k for k in opts if k not in COMPILE_OPTIONS]
        if unknown:
            raise ConfigError(f"compile option {unknown[0]!r}; accepted: {', '.join(COMPILE_OPTIONS)}")
        import torch._dynamo  # noqa: F401  (list_backends lives there)

        backend = opts.get("backend", "inductor")
        if not (isinstance(backend, str) or callable(backend)):
            raise ConfigError(
                f"compile.backend={backend!r}; accepted: a torch.compile backend name such as 'inductor', or a backend callable"
            )
        if isinstance(backend, str) and backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ConfigError(
                f"compile.backend={backend!r}; accepted: {', '.join(torch._dynamo.list_backends(exclude_tags=()))}"
            )
        if opts.get("mode") is not None and not isinstance(opts["mode"], str):
            raise ConfigError(f"compile.mode={opts['mode']!r}; accepted: null or a torch.compile mode name")
        if not isinstance(opts.get("dynamic", True), bool):
            raise ConfigError(f"compile.dynamic={opts['dynamic']!r}; accepted: true or false")
        return opts
    if isinstance(value, bool) or value == "auto":
        return value
    raise ConfigError(
        f"compile={value!r}; accepted: auto (compiled on CUDA, eager on CPU), true, false (eager), "
        f"or a mapping with {', '.join(COMPILE_OPTIONS)}"
    )


@dataclass
class Compressor:
    """One scorer, selector, key merge, value merge, budget schedule and trigger.

    Attributes
    ----------
    budget:
        Ratio in ``(0, 1]`` or absolute number of tokens (see :mod:`kvframe.policies.budgets`).
    positions:
        ``"original"`` (default): new tokens continue at their original positions.
        ``"reindex"``: after each compression the kept slots are re-numbered ``0..n-1`` inside the
        cache (keys re-rotated) and new tokens continue from there, as StreamingLLM does to run past
        the model's context window.
    compress_sliding_layers:
        Whether sliding-window layers (Gemma3's local layers) are compressed too. They hold at most
        a window of tokens anyway, so by default only full-attention layers are compressed.
    seed:
        Seed of the generator stochastic policies draw from (one generator per cache).
    compile:
        Whether the tensor work of a trigger firing (observe, budgets, score, select, merge, compact)
        runs through ``torch.compile``. ``auto`` (default): compiled where the cache lives on a CUDA
        device, eager on CPU (inductor's first compile costs tens of seconds there, more than the
        compression it speeds up on short runs); ``true``: always compiled; ``false``: always eager
        (the eager switch); a mapping ``{backend, mode, dynamic}`` compiles with those options
        (defaults ``inductor``, ``None``, ``true``). Shapes are dynamic, so growing prompts and chunks
        reuse one compiled graph per graph segment; data-dependent sizes (how many slots a head keeps)
        split the work into a few compiled segments. Kernels are ``torch.library`` custom ops and
        never break a graph. Results equal eager within float tolerance (tests/test_compile.py).
    """

    scorer: Scorer | None
    selector: Selector
    key_merge: KeyMerge
    value_merge: ValueMerge
    schedule: BudgetSchedule
    trigger: Trigger
    budget: float | int = 0.5
    positions: str = "original"
    compress_sliding_layers: bool = False
    seed: int = 0
    compile: bool | str | dict[str, Any] = "auto"
    name: str | None = None
    spec: dict[str, Any] = field(default_factory=dict, repr=False)
    _compiled: dict[str, Callable[..., Any]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"positions={self.positions!r}; accepted: {', '.join(POSITION_MODES)}")
        if self.scorer is None and self.selector.uses_scores and self.trigger.ever_fires:
            raise ConfigError(
                f"compressor {self.name or '(unnamed)'} has no scorer, and selector {self.selector.name!r} keeps "
                "slots by score; give one (e.g. scorer: knorm), use a selector that needs no scores, "
                "or use trigger: never for no compression"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r}; accepted: an integer")
        self.compile = check_compile(self.compile)
        self._check_stats()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = {}  # compiled code is per process
        return state

    def compiles_on(self, device: torch.device) -> bool:
        """Whether trigger firings on ``device`` run compiled (see ``compile``)."""
        if self.compile == "auto":
            return device.type == "cuda"
        return self.compile is not False

    def _compiled_step(self, which: str = "_step_eager") -> Callable[..., Any]:
        if which not in self._compiled:
            opts = dict(self.compile) if isinstance(self.compile, dict) else {}
            # torch.compile caches compiled frames on the function's code object, with a limit on
            # how many variants one code object may hold. Give each compressor its own code object so
            # that many compressors in one process (an eval grid) never evict or exhaust each other's.
            base = getattr(Compressor, which)
            code = base.__code__.replace(co_name=f"compress{which.removesuffix('_eager')}_{self.name or 'compressor'}_{id(self):x}")
            fn = types.FunctionType(code, base.__globals__, code.co_name, base.__defaults__, base.__closure__)
            self._compiled[which] = torch.compile(
                types.MethodType(fn, self),
                backend=opts.get("backend", "inductor"),
                mode=opts.get("mode"),
                dynamic=opts.get("dynamic", True),
            )
        return self._compiled[which]

    def _check_stats(self) -> None:
        """Every statistic a policy reads must be kept by someone (fail at build time, not mid-run)."""
        from kvframe.stats import STAT_SOURCES

        owned = {s for p in self.policies for s in p.provides}
        for pol in self.policies:
            for stat in pol.stats:
                if stat in owned:
                    continue
                source = STAT_SOURCES.get(stat)
                if source is None:
                    raise ConfigError(
                        f"{pol.kind} {pol.name!r} reads statistic {stat!r}, which no policy of this compressor keeps; "
                        f"kept by the framework: {', '.join(sorted(STAT_SOURCES))}"
                    )
                if source == "backward" and self.trigger.scoring_pass != "backward":
                    raise ConfigError(
                        f"{pol.kind} {pol.name!r} reads statistic {stat!r} (key gradients), which only a chunked trigger "
                        f"with scoring_pass: backward provides; this compressor's trigger is {self.trigger.name!r} "
                        f"with scoring_pass {self.trigger.scoring_pass!r}"
                    )

    @property
    def stats(self) -> tuple[str, ...]:
        """Statistics the framework must keep for this compressor's policies."""
        from kvframe.stats import STAT_SOURCES

        need = {s for p in self.policies for s in p.stats if s in STAT_SOURCES}
        return tuple(sorted(need))

    # ------------------------------------------------------------------------------------
    @property
    def policies(self) -> list[Any]:
        return [p for p in (self.scorer, self.selector, self.key_merge, self.value_merge, self.schedule, self.trigger) if p is not None]

    @property
    def compresses(self) -> bool:
        """False when the trigger never fires (the budget is then irrelevant)."""
        return self.trigger.ever_fires

    @property
    def needs_queries(self) -> bool:
        return any(p.needs_queries for p in self.policies)

    @property
    def needs_rope(self) -> bool:
        # a backward scoring pass reports gradients w.r.t. pre-RoPE keys: it un-rotates them
        return (
            self.positions == "reindex"
            or self.trigger.scoring_pass == "backward"
            or any(p.needs_rope for p in self.policies)
        )

    def budgets(self, state: SlotState, ctx: CompressionContext) -> torch.Tensor:
        """``[B, H]`` content slots each row and head keeps after compression.

        Ratio budgets refer to ``ctx.reference`` (tokens seen so far; the prompt length during
        decoding), absolute budgets are a capacity; neither keeps more than the content.
        """
        content = state.content_slots()
        reference = content if ctx.reference is None else torch.maximum(ctx.reference.to(content.device).long(), content)
        return torch.minimum(self.schedule.budgets(self.budget, reference, ctx).long(), content)

    def compress(self, state: SlotState, ctx: CompressionContext) -> SlotState:
        """Compress one layer's slots. Returns ``state`` itself when nothing would change."""
        return self.compress_step(state, ctx)[0]

    @property
    def evicts_in_place(self) -> bool:
        """Whether decode-time firings may evict in place (:class:`~kvframe.slots.Eviction`): every
        policy is order-free and both merges declare their reach (``docs/architecture.md``,
        "In-place eviction")."""
        return (
            all(p.order_free for p in self.policies)
            and self.key_merge.in_place_reach() is not None
            and self.value_merge.in_place_reach() is not None
        )

    def compress_step(
        self, state: SlotState, ctx: CompressionContext, in_place: bool = False
    ) -> tuple[SlotState | Eviction, bool]:
        """One trigger firing: let policies update their statistics, then compress if the budget
        requires it. Returns ``(state, compressed)``. Runs compiled or eager per ``compile``.

        With ``in_place`` (a slot store that can apply it), a decode-time firing of a compressor
        that :attr:`evicts_in_place` and drops at most :data:`IN_PLACE_MAX` slots per head returns
        an :class:`~kvframe.slots.Eviction` (what changes) instead of the compressed state; the
        kept slots, their contents and positions are exactly those of the dense compression."""
        which = "_evict_step_eager" if in_place and ctx.phase == "decode" and self.evicts_in_place else "_step_eager"
        if self.compiles_on(state.keys.device):
            return self._compiled_step(which)(state, ctx)
        return getattr(self, which)(state, ctx)

    def _step_eager(self, state: SlotState, ctx: CompressionContext) -> tuple[SlotState, bool]:
        for pol in self.policies:
            state = pol.observe(state, ctx)
        budgets = self.budgets(state, ctx)
        ctx.budgets = budgets
        if not self.selector.needs_compression(budgets, state, ctx):
            return state, False
        return self._compress(state, ctx, budgets), True

    def _evict_step_eager(self, state: SlotState, ctx: CompressionContext) -> tuple[SlotState | Eviction, bool]:
        for pol in self.policies:
            state = pol.observe(state, ctx)
        budgets = self.budgets(state, ctx)
        ctx.budgets = budgets
        drop = int((state.content_slots() - budgets).max()) if budgets.numel() else 0
        if drop <= 0:  # full up to the capacity: nothing to evict (holes of other heads stay holes)
            return state, False
        if drop > IN_PLACE_MAX:
            return self._compress(state, ctx, budgets), True
        selection = self.selector.select(self._scores(state, ctx), budgets, state, ctx)
        return self._eviction(state, ctx, selection), True

    def _eviction(self, state: SlotState, ctx: CompressionContext, selection: Selection) -> Eviction:
        """``selection`` as an in-place change: the dropped slots, and the merges run on a small
        sub-state (the dropped slots and the kept slots the merges reach), whose kept part is
        written back over the same slots."""
        b, h, t = state.valid.shape
        dev = state.valid.device
        big = torch.iinfo(torch.long).max
        keep_idx = torch.where(selection.keep_valid, selection.keep, t)
        kept_mask = torch.zeros(b, h, t + 1, dtype=torch.bool, device=dev).scatter_(-1, keep_idx, True)[..., :t] & state.valid
        evicted = state.valid & ~kept_mask
        e = max(int(evicted.sum(-1).max()), 1)
        ev = true_slots_first(evicted)[..., :e]
        ev_ok = ev < t
        ev = torch.where(ev_ok, ev, 0)
        # the kept slots the merges see: fold targets, and the next `reach` kept slots by position
        cands: list[torch.Tensor] = []
        oks: list[torch.Tensor] = []
        folded = fold_slot = None
        if selection.assign is not None:
            folded = selection.assign.gather(-1, ev)
            fold_slot = selection.keep.gather(-1, folded.clamp(min=0))  # the slot each dropped one folds into
            cands.append(fold_slot)
            oks.append(ev_ok & (folded >= 0))
        reach = max(self.key_merge.in_place_reach() or 0, self.value_merge.in_place_reach() or 0)
        if reach > 0:
            pos = state.positions
            ev_pos = pos.gather(-1, ev)
            after = kept_mask[:, :, None, :] & (pos[:, :, None, :] > ev_pos[..., None])  # [B, H, E, T]
            val, idx = torch.where(after, pos[:, :, None, :], big).topk(min(reach, t), dim=-1, largest=False)
            cands.append(idx.flatten(2))
            oks.append(((val != big) & ev_ok[..., None]).flatten(2))
        u = 0
        if cands:
            srt = torch.where(torch.cat(oks, -1), torch.cat(cands, -1), big).sort(dim=-1).values
            uniq = srt != big
            uniq[..., 1:] &= srt[..., 1:] != srt[..., :-1]
            u = int(uniq.sum(-1).max())
        if u == 0:  # no kept slot is read or rewritten: plain eviction
            no_targets = torch.zeros(b, h, 0, dtype=torch.long, device=dev)
            return Eviction(ev, ev_ok, no_targets, no_targets.bool(), state.slice(0), state.stats)
        order = true_slots_first(uniq)[..., :u]
        tg_ok = order < srt.shape[-1]
        tg = torch.where(tg_ok, srt.gather(-1, order.clamp(max=srt.shape[-1] - 1)), 0)
        # the sub-state: targets first (its kept part), then the dropped slots
        sub = state.gather(torch.cat([tg, ev], -1), torch.cat([tg_ok, ev_ok], -1))
        ar = torch.arange(u, device=dev).expand(b, h, u)
        assign = None
        if folded is not None:
            match = (tg[..., None, :] == fold_slot[..., None]) & tg_ok[..., None, :]  # [B, H, E, U]
            ev_assign = torch.where(ev_ok & (folded >= 0) & match.any(-1), match.int().argmax(-1), -1)
            assign = torch.cat([torch.where(tg_ok, ar, -1), ev_assign], -1)
        weight = None
        if selection.weight is not None:
            weight = selection.weight.gather(-1, torch.cat([tg, ev], -1))
        sub_sel = Selection(keep=ar.contiguous(), keep_valid=tg_ok, assign=assign, weight=weight)
        updated, changed = self._merge_changes(sub, ctx, sub_sel)
        return Eviction(ev, ev_ok, tg, tg_ok, updated, state.stats, changed)

    def _scores(self, state: SlotState, ctx: CompressionContext) -> torch.Tensor | None:
        """The scorer's ``[B, H, T]`` float32 scores, or ``None`` without a scorer (allowed only for
        a selector that uses no scores; a never-firing compressor can still be called directly)."""
        if self.scorer is None:
            if self.selector.uses_scores:
                raise ConfigError(f"compressor {self.name or '(unnamed)'} has no scorer and cannot compress")
            return None
        scores = self.scorer.score(state, ctx).float()
        if scores.shape != state.valid.shape:
            raise ConfigError(
                f"scorer {self.scorer.name!r} returned scores of shape {tuple(scores.shape)}; expected {tuple(state.valid.shape)}"
            )
        return scores

    def _compress(self, state: SlotState, ctx: CompressionContext, budgets: torch.Tensor) -> SlotState:
        return self._merge(state, ctx, self.selector.select(self._scores(state, ctx), budgets, state, ctx))

    def _merge(self, state: SlotState, ctx: CompressionContext, selection: Selection) -> SlotState:
        """The kept slots of ``selection``, with merged keys, values, positions and statistics."""
        return self._merge_changes(state, ctx, selection)[0]

    def _merge_changes(self, state: SlotState, ctx: CompressionContext, selection: Selection) -> tuple[SlotState, tuple[str, ...]]:
        """:meth:`_merge`, and which fields of the kept slots it changed (``keys``, ``values``,
        ``log_weights``, ``positions``, ``stats.<name>``): a merge that returns the kept slots' own
        tensor changed nothing there."""
        kept = state.gather(selection.keep, selection.keep_valid)
        if selection.assign is not None:
            # a merged slot sits at the position of the last token folded into it
            from kvframe.policies.groups import group_amax

            pos = group_amax(torch.where(state.valid, state.positions, -1), selection.assign, kept.num_slots, -1)
            kept = kept.replace(positions=torch.where(kept.valid, torch.maximum(pos, kept.positions), kept.positions))
        merged = self.key_merge.merge(state, selection, kept, ctx)
        if not isinstance(merged, MergedKeys):  # resolved while tracing: no branch in a compiled graph
            raise ConfigError(
                f"key_merge {self.key_merge.name!r} returned {type(merged).__name__}; a key merge returns "
                "kvframe.policies.MergedKeys(keys, stats)"
            )
        values, log_weights = self.value_merge.merge(state, selection, kept, ctx)
        out = kept.replace(keys=merged.keys, values=values, log_weights=log_weights)
        changed = tuple(f for f, new in (("keys", merged.keys), ("values", values), ("log_weights", log_weights)) if new is not getattr(kept, f))
        if selection.assign is not None:
            changed += ("positions",)
        changed += tuple(f"stats.{k}" for k in merged.stats)
        return (out.with_stats(**merged.stats) if merged.stats else out), changed

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved composition (what ``kvframe show`` prints)."""
        out: dict[str, Any] = {}
        for key in ("name", "paper", "url", "description"):
            if self.spec.get(key) is not None:
                out[key] = self.spec[key]
        out["budget"] = self.budget
        out["positions"] = self.positions
        out["compress_sliding_layers"] = self.compress_sliding_layers
        out["seed"] = self.seed
        out["compile"] = self.compile
        for kind, pol in (
            ("scorer", self.scorer),
            ("selector", self.selector),
            ("key_merge", self.key_merge),
            ("value_merge", self.value_merge),
            ("schedule", self.schedule),
            ("trigger", self.trigger),
        ):
            out[kind] = pol.to_dict() if pol is not None else None
        return out
