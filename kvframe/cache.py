"""The cache of slots, as a real ``transformers`` :class:`~transformers.Cache`.

:class:`SlotCache` holds one :class:`SlotLayer` per decoder layer, whose slots live in a
:class:`~kvframe.store.SlotStore` (preallocated buffers). ``update`` writes the new tokens' keys and
values into the store's free capacity in place (``DynamicCache`` concatenates the layer instead);
kvframe's attention function then fills in their positions and padding flags, attends with the
slots' log-weights, and, when the compressor's trigger fires, installs the compressed slots in the
store. The memory is really released (see :mod:`kvframe.store`).

``get_seq_length()`` returns the number of tokens the cache has *seen* (padding included), not the
number of slots it holds, so ``generate`` and the model place new tokens at their original
positions. :meth:`SlotCache.memory` reports what is actually held.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from kvframe.errors import KVFrameError, UnsupportedModelError
from kvframe.slots import SlotState
from kvframe.store import SlotStore

if TYPE_CHECKING:
    from kvframe.compressor import Compressor
    from kvframe.rope import Rotary

#: (cache, layer index) of the most recent ``update``; read by kvframe's attention function.
ACTIVE_UPDATE: contextvars.ContextVar[tuple[SlotCache, int] | None] = contextvars.ContextVar(
    "kvframe_active_update", default=None
)

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_types(model: Any) -> list[str]:
    """The attention type of every decoder layer of ``model`` (``full_attention`` where the config
    lists none). Raises :class:`UnsupportedModelError` for a type kvframe cannot cache, so attaching
    and building a cache refuse the same models with the same message."""
    config = model.config.get_text_config(decoder=True)
    n = getattr(config, "num_hidden_layers", None)
    if not n:
        raise UnsupportedModelError(f"{type(model).__name__}: config has no num_hidden_layers")
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
    bad = sorted({t for t in types if t not in SUPPORTED_LAYER_TYPES})
    if bad:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({config.model_type}) has layer types {bad}; kvframe supports {', '.join(SUPPORTED_LAYER_TYPES)}"
        )
    return types


@dataclass(frozen=True)
class LayerSnapshot:
    """A layer's bookkeeping before a scoring pass (:meth:`SlotLayer.begin_scratch`)."""

    slots: int
    seen: int
    decode_steps: int
    valid_seen: Tensor | None
    next_position: Tensor | None
    plain: bool


class SlotLayer(CacheLayerMixin):
    """One decoder layer's slots (see :class:`kvframe.slots.SlotState`)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, sliding_window: int | None = None, headroom: int = 0):
        super().__init__()
        self.store = SlotStore(headroom=headroom)
        self.scratch: SlotState | None = None  # a scoring pass's dense state (kvframe.chunked), the store untouched
        self.in_scratch = False
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.seen = 0  # tokens appended so far (padding included)
        self.pending = 0  # tokens appended by the last update and not yet attended
        self.slots_before = 0
        self.decode_steps = 0
        self.compressions = 0
        self.plain = True  # no padding, no compression, positions 0..seen-1: vanilla fast path
        self.heads_uniform = True  # every KV head holds the same positions and log-weights
        self.shift: Tensor | None = None  # [B, H] re-index offset (positions="reindex")
        self.valid_seen: Tensor | None = None  # [B] non-padding tokens seen so far
        self.prompt_valid: Tensor | None = None  # [B] non-padding prompt tokens (frozen at the first decode step)
        self.next_position: Tensor | None = None  # [B] original position of the next token
        self.scoring_queries: tuple[Tensor, Tensor, Tensor, float | None] | None = None
        self.returned_keys: Tensor | None = None  # what the last update returned (the attention function's check)
        self._placeholders: tuple[Any, Tensor, Tensor, Tensor] | None = None

    @property
    def state(self) -> SlotState | None:
        """The layer's slots: a view of its :class:`~kvframe.store.SlotStore` (or, during a scoring
        pass, the pass's own dense state). Assigning a state installs it into the store."""
        return self.scratch if self.in_scratch else self.store.view()

    @state.setter
    def state(self, value: SlotState | None) -> None:
        if self.in_scratch:
            self.scratch = value
        else:
            self.store.install(value)

    @property
    def num_slots(self) -> int:
        """Slots per head of the layer's (dense) state, without materialising a packed store's view."""
        if self.in_scratch:
            return 0 if self.scratch is None else self.scratch.num_slots
        return self.store.n

    @property
    def batch_heads(self) -> tuple[int, int]:
        if self.in_scratch:
            assert self.scratch is not None
            return self.scratch.batch_size, self.scratch.num_heads
        return self.store.batch_heads

    def has_slots(self) -> bool:
        return (self.scratch is not None) if self.in_scratch else bool(self.store.parts)

    def write_tail(self, q: int, positions: Tensor | None = None, valid: Tensor | None = None, keys: Tensor | None = None) -> None:
        """Overwrite fields of the last ``q`` slots of every head (see :meth:`SlotStore.write_tail
        <kvframe.store.SlotStore.write_tail>`); during a scoring pass, of its dense stand-in."""
        if not self.in_scratch:
            self.store.write_tail(q, positions=positions, valid=valid, keys=keys)
            return
        st = self.scratch
        assert st is not None
        for name, t in (("keys", keys), ("positions", positions), ("valid", valid)):
            if t is not None:
                getattr(st, name)[:, :, -q:] = t

    def tail_keys(self, q: int) -> Tensor:
        """Keys ``[B, H, q, D]`` of the last ``q`` slots of every head."""
        if not self.in_scratch:
            return self.store.tail_keys(q)
        assert self.scratch is not None
        return self.scratch.keys[:, :, -q:]

    def release_view(self) -> None:
        """The end of a layer pass: a packed store drops its materialised dense view."""
        if not self.in_scratch:
            self.store.release_view()

    def begin_scratch(self, state: SlotState | None = None) -> LayerSnapshot:
        """Run the next passes on a dense stand-in for the store (a chunked trigger's scoring pass):
        appends concatenate onto ``state`` (default: the store's view, no copy) and the store is
        left as it is. Returns the snapshot :meth:`end_scratch` restores the layer to."""
        snap = LayerSnapshot(self.store.n, self.seen, self.decode_steps, self.valid_seen, self.next_position, self.plain)
        self.scratch = state if state is not None else self.store.view()
        self.in_scratch = True
        return snap

    def end_scratch(self, snap: LayerSnapshot) -> None:
        """Drop the stand-in and restore the bookkeeping of ``snap``; the statistics the pass
        recorded about the slots the layer held before it (its first ``snap.slots``) are kept."""
        scratch, self.scratch, self.in_scratch = self.scratch, None, False
        if scratch is not None and self.store.n:
            self.store.truncate(self.store.n, {k: v[:, :, : snap.slots] for k, v in scratch.stats.items()})
        self.seen, self.decode_steps, self.plain = snap.seen, snap.decode_steps, snap.plain
        self.valid_seen, self.next_position = snap.valid_seen, snap.next_position
        self.pending = 0

    # -- transformers Cache layer API ------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    @property
    def keys(self) -> Tensor | None:  # type: ignore[override]
        return None if self.state is None else self.state.keys

    @keys.setter
    def keys(self, value: Any) -> None:  # set to None by the base __init__
        if value is not None:
            raise AttributeError("SlotLayer keys are set through its slot state")

    @property
    def values(self) -> Tensor | None:  # type: ignore[override]
        return None if self.state is None else self.state.values

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("SlotLayer values are set through its slot state")

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.pending:
            raise UnsupportedModelError(
                "the previous tokens given to this cache layer never reached kvframe's attention function: the "
                "model does not route attention through transformers' AttentionInterface, so kvframe cannot "
                "compress it"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        # positions and validity are placeholders: the attention function writes the real ones
        # (finalize_new_slots) before anything reads them; constant per shape, made once
        key = (b, h, q, key_states.device)
        if self._placeholders is None or self._placeholders[0] != key:
            dev = key_states.device
            self._placeholders = (
                key,
                torch.zeros(b, h, q, dtype=torch.long, device=dev),
                torch.zeros(b, h, q, dtype=torch.float32, device=dev),
                torch.ones(b, h, q, dtype=torch.bool, device=dev),
            )
        _, pos0, lw0, valid0 = self._placeholders
        new = SlotState(keys=key_states, values=value_states, positions=pos0, log_weights=lw0, valid=valid0, stats={})
        self.slots_before = self.num_slots if self.has_slots() else 0
        if self.in_scratch:  # a scoring pass: concatenate, leave the store untouched
            current = self.scratch
            if current is not None:
                # new slots start with zero statistics (same trailing shape as the layer's)
                new.stats = {k: v.new_zeros(b, h, q, *v.shape[3:]) for k, v in current.stats.items()}
                new = current.cat(new)
            else:  # the stand-in is written in place: never the shared placeholders
                new = new.replace(positions=pos0.clone(), log_weights=lw0.clone(), valid=valid0.clone())
            self.scratch = new
            out = (new.keys, new.values)
        else:
            # written in place into free capacity; positions and validity come in finalize_new_slots
            self.store.append(new, want_view=False, meta_later=True)
            # the view is made only if the pass needs it (a packed store's is a gather); the
            # attention function reads the layer's slots itself, whatever the model is handed here
            kv = self.store.kv()
            out = (key_states, value_states) if kv is None else kv
        self.returned_keys = out[0]
        self.seen += q
        self.pending = q
        if q == 1:
            self.decode_steps += 1
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.sliding_window, self.store.headroom)  # type: ignore[misc]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_batch(beam_idx.to(self.state.keys.device))
            idx = beam_idx.to(self.state.keys.device)
            for name in ("shift", "valid_seen", "prompt_valid", "next_position"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t[idx.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            idx = torch.arange(self.state.batch_size, device=self.state.keys.device).repeat_interleave(repeats)
            self.reorder_cache(idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.state is not None:
            self.reorder_cache(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "kvframe's SlotCache cannot be cropped (assisted/speculative decoding): dropped tokens cannot be restored"
        )

    # -- kvframe ----------------------------------------------------------------------------
    def fork(self) -> SlotLayer:
        """A copy-on-write copy: the same slot tensors, its own bookkeeping.

        Nothing is copied: the fork's store shares the buffers (:meth:`SlotStore.fork
        <kvframe.store.SlotStore.fork>`: both are marked shared, and whichever writes first, an
        append in place or an installation, copies the buffers first), its :class:`SlotState` is a
        new object holding the same tensors (and a new ``stats`` dict of the same tensors), and the
        per-row tensors (``shift``, ``valid_seen``, ...) are shared too. Statistics are replaced,
        never accumulated in place (see "Forks" in docs/architecture.md). A layer in the middle of
        a pass (tokens appended but not yet attended) cannot be forked.
        """
        if self.pending:
            raise KVFrameError(
                f"cannot fork a cache layer in the middle of a forward pass ({self.pending} appended tokens not yet "
                "attended); fork between calls"
            )
        new = SlotLayer.__new__(SlotLayer)
        new.__dict__.update(self.__dict__)
        new.store = self.store.fork()  # the buffers are shared copy-on-write
        return new

    def content_slots(self) -> Tensor | None:
        """``[B, H]`` content slots per row and head (``None`` before the first tokens)."""
        if not self.in_scratch and self.store.layout is not None:
            idx, held = self.store.layout.held()
            return (self.store.parts["valid"][idx.clamp(max=self.store.layout.size)] & held).sum(-1)
        return None if self.state is None else self.state.content_slots()

    def nbytes(self) -> int:
        return self.store.nbytes()


@dataclass
class CacheMemory:
    """What a :class:`SlotCache` holds, summed over layers."""

    bytes: int  # everything allocated: the slot buffers at their capacity, and the statistics
    kv_bytes: int  # key and value bytes of the slots held (content + padding)
    slots: int  # slots held (content + padding), summed over layers, rows and heads (packed: no padding after a head's last slot)
    content_slots: int
    seen_tokens: int
    per_layer_slots: list[int]  # slots held per head in each layer
    reserved_bytes: int = 0  # allocated capacity not holding a slot yet (appends fill it in place)

    @property
    def padding_slots(self) -> int:
        return self.slots - self.content_slots


class SlotCache(Cache):
    """A ``transformers`` cache of slots driven by a :class:`~kvframe.compressor.Compressor`.

    Created for you by :func:`kvframe.attach` when ``generate`` or the model's forward gets no cache;
    pass one explicitly with ``past_key_values=kvframe.SlotCache.for_model(model, compressor)``.
    """

    def __init__(
        self,
        compressor: Compressor,
        num_layers: int,
        sliding_windows: list[int | None] | None = None,
        rope: Rotary | None = None,
    ):
        windows = sliding_windows or [None] * num_layers
        headroom = compressor.trigger.headroom if compressor.compresses else 0
        # a sliding-window layer is trimmed back to its window after every pass: one free slot
        # lets each decoding step append and trim in place
        super().__init__(
            layers=[
                SlotLayer(w, headroom if (w is None or compressor.compress_sliding_layers) else (1 if w else 0))
                for w in windows
            ]
        )
        self.compressor = compressor
        self.rope = rope
        self.num_layers = num_layers
        self.compression_seconds = 0.0  # wall time spent inside compressor.compress
        # what every layer pass asks of the compressor, computed once (its policies are fixed)
        self.stats_needed: tuple[str, ...] = compressor.stats
        self.needs_queries: bool = compressor.needs_queries
        self.pass_memo: tuple[Any, ...] | None = None  # the current forward pass's new-token metadata (kvframe.attention)
        self.scoring = False  # true during a chunked trigger's scoring pass (see kvframe.chunked)
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The cache's generator on ``device``, seeded from the compressor's ``seed``."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.compressor.seed)
        return self._generators[key]

    @classmethod
    def for_model(cls, model: Any, compressor: Compressor) -> SlotCache:
        from kvframe.rope import Rotary

        types = layer_types(model)
        config = model.config.get_text_config(decoder=True)
        windows = [config.sliding_window if t == "sliding_attention" else None for t in types]
        rope = Rotary.from_model(model) if compressor.needs_rope else None
        return cls(compressor, config.num_hidden_layers, windows, rope)

    def fork(self) -> SlotCache:
        """A copy-on-write fork: a new cache that continues from this one's exact state.

        Every layer is forked with :meth:`SlotLayer.fork` (the slot tensors are shared, not
        copied), the compressor and rotary service are the same objects, the generators of
        stochastic policies continue from this cache's state (each fork draws the same numbers
        this cache would draw next) and ``compression_seconds`` carries over. Whatever runs on the
        fork (more tokens, decoding, compression, batch reordering) leaves this cache bit-identical,
        so one cache can be forked any number of times (:func:`kvframe.compress_context`).
        """
        new = SlotCache.__new__(SlotCache)
        new.__dict__.update(self.__dict__)
        new.layers = [layer.fork() for layer in self.layers]
        gens = {}
        for key, gen in self._generators.items():
            clone = torch.Generator(device=gen.device)
            clone.set_state(gen.get_state())
            gens[key] = clone
        new._generators = gens
        return new

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        out = self.layers[layer_idx].update(key_states, value_states)
        ACTIVE_UPDATE.set((self, layer_idx))
        return out

    # -- reporting --------------------------------------------------------------------------
    def memory(self) -> CacheMemory:
        """Bytes and slots actually held (keys, values, positions, log-weights, validity, stats)."""
        total = kv = slots = content = reserved = 0
        per_layer = []
        for layer in self.layers:
            store = layer.store
            if not store.parts:
                per_layer.append(0)
                continue
            total += store.nbytes()
            kv += store.kv_bytes()
            reserved += store.reserved_bytes()
            slots += store.slot_count()
            content += store.content_count()
            per_layer.append(store.n)
        seen = self.layers[0].seen if self.layers else 0
        return CacheMemory(total, kv, slots, content, seen, per_layer, reserved)

    def slot_states(self) -> list[SlotState | None]:
        return [layer.state for layer in self.layers]
