"""Compress a context once, answer many questions from it.

:func:`compress_context` prefills a context under a compressor (inside :func:`kvframe.attach`;
the compressor's trigger decides when it compresses: after the prefill, per chunk, ...) and
returns a :class:`CompressedContext`. Every question is then answered on a copy-on-write fork of
its cache (:meth:`kvframe.SlotCache.fork`), so answers never see each other and the context is
never changed:

>>> ctx = kvframe.compress_context(model, kvframe.build("snapkv", budget=0.25), context_ids)
>>> answers = ctx.generate([q1_ids, q2_ids, q3_ids], max_new_tokens=32)   # new token ids per question
>>> ctx.memory()                                                          # what the context holds

An answer equals what compressing the same context separately for that question gives (the
``query_agnostic`` protocol: prefill and compress the context, append the question, decode),
including for compressors that compress again while the question is appended or while decoding
(``decode`` and ``per_chunk`` triggers), since those compressions run on the fork.

This module needs only torch and transformers.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from kvframe.attach import _ATTACHED, attach, cache_argument
from kvframe.cache import SlotCache
from kvframe.compressor import Compressor
from kvframe.errors import ConfigError, KVFrameError

__all__ = ["CompressedContext", "compress_context"]

#: generate() arguments that CompressedContext.generate sets itself
_RESERVED = ("input_ids", "inputs", "inputs_embeds", "attention_mask", "position_ids", "past_key_values", "cache",
             "cache_position", "return_dict_in_generate")


@contextmanager
def _attached(model: Any, compressor: Compressor) -> Iterator[None]:
    """Inside :func:`kvframe.attach` (reusing the caller's block when the model is attached already:
    an explicit SlotCache always runs with its own compressor)."""
    if getattr(model, _ATTACHED, None) is not None:
        yield
    else:
        with attach(model, compressor):
            yield


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


def _as_ids(x: Any, what: str) -> Tensor:
    """A LongTensor of token ids from a tensor or a sequence of ints."""
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in x
    ):
        t = torch.tensor(list(x), dtype=torch.long)
    else:
        raise ConfigError(f"{what} must be a tensor of token ids (or a list of ints); got {type(x).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ConfigError(f"{what} must hold integer token ids; got dtype {t.dtype}")
    return t.long()


def _check_mask(mask: Any, shape: torch.Size, what: str) -> Tensor:
    if not isinstance(mask, Tensor):
        raise ConfigError(f"{what} must be a tensor of 0/1 of shape {tuple(shape)}; got {type(mask).__name__}")
    if mask.shape != shape:
        raise ConfigError(f"{what} has shape {tuple(mask.shape)}; accepted: the ids' shape {tuple(shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ConfigError(f"{what} must be integer or bool 0/1 values; got dtype {mask.dtype}")
    m = mask.long()
    if bool(((m != 0) & (m != 1)).any()):
        raise ConfigError(f"{what} holds values {sorted(set(m.unique().tolist()) - {0, 1})}; accepted: 0 (padding) and 1")
    return m


def _bookkeeping(layer: Any) -> tuple[Any, ...]:
    # the store's version moves with every change of its slots (a packed store's view is made anew
    # for each pass, so the view's identity says nothing)
    return (layer.store, layer.store.version, layer.seen, layer.decode_steps, layer.compressions, layer.pending)


class CompressedContext:
    """A context prefilled and compressed once (see :func:`compress_context`).

    Attributes
    ----------
    cache:
        The context's :class:`~kvframe.SlotCache`. Never pass it to the model: use :meth:`fork`
        (a use that changes it is detected and refused by the next call).
    input_ids, attention_mask:
        ``[B, T]`` the context's token ids and 0/1 mask (left padding), on the model's device.
    prefill_seconds:
        Wall time of the prefill, compression and scoring passes included.
    compression_seconds:
        Time spent inside the compressor during the prefill.
    answer_compression_seconds:
        Time spent inside the compressor while answering (decode-time and per-chunk triggers),
        summed over every :meth:`generate` call so far.
    """

    def __init__(self, model: Any, compressor: Compressor, cache: SlotCache, input_ids: Tensor, attention_mask: Tensor,
                 prefill_seconds: float):
        self.model = model
        self.compressor = compressor
        self.cache = cache
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.prefill_seconds = prefill_seconds
        self.compression_seconds = cache.compression_seconds
        self.answer_compression_seconds = 0.0
        self._draws_while_answering = False
        self._snapshot = self._take_snapshot()

    # -- the fork contract guard ------------------------------------------------------------
    def _tensors(self) -> Iterator[tuple[str, Tensor]]:
        for i, layer in enumerate(self.cache.layers):
            # the store's own buffers (a packed store's view is a gather made per pass)
            for name, t in layer.store.parts.items():
                yield f"layer {i} {name.removesuffix('.data')}", t  # the fp codec's one part is the tensor
            for name, t in layer.store.stats.items():
                yield f"layer {i} statistic {name!r}", t
            for name in ("shift", "valid_seen", "prompt_valid", "next_position"):
                t = getattr(layer, name)
                if isinstance(t, Tensor):
                    yield f"layer {i} {name}", t

    def _take_snapshot(self) -> tuple[list[tuple[Any, ...]], list[tuple[str, Tensor, int | None]]]:
        layers = [_bookkeeping(layer) for layer in self.cache.layers]
        # version counters move with every in-place write into a tensor or any view of its storage;
        # tensors made under torch.inference_mode have none (the contract still holds; tests check it)
        versions = [(name, t, None if t.is_inference() else t._version) for name, t in self._tensors()]
        return layers, versions

    def check_intact(self) -> None:
        """Raise :class:`~kvframe.KVFrameError` if the context changed since it was compressed.

        Checks that the cache still holds the same slot states and bookkeeping (the context's own
        cache was not run through the model) and that no tensor it holds was written in place (by
        their version counters, which count in-place writes through any view of their storage).
        Every :meth:`fork` and :meth:`generate` call runs it, before and after answering.
        """
        layers, versions = self._snapshot
        for i, (layer, then) in enumerate(zip(self.cache.layers, layers)):
            now = _bookkeeping(layer)
            if now[0] is not then[0] or now[1:] != then[1:]:
                raise KVFrameError(
                    f"the compressed context's cache changed (layer {i} now holds {layer.seen} tokens seen, "
                    f"was {then[2]}): its own cache was run through the model; answer on ctx.fork() or ctx.generate()"
                )
        for name, t, version in versions:
            if version is not None and t._version != version:
                raise KVFrameError(
                    f"the compressed context's {name} tensor was written in place after compression (version "
                    f"{version} -> {t._version}); forks share that storage, so the context can no longer be used. "
                    "Code running on a fork must never write into cache tensors in place (see the fork contract "
                    "in docs/architecture.md)"
                )

    # -- shape ------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Context tokens per row, padding included (what the cache has seen)."""
        return int(self.input_ids.shape[1])

    def memory(self) -> Any:
        """What the context's cache holds (:class:`kvframe.cache.CacheMemory`)."""
        return self.cache.memory()

    def _rows(self, rows: Any, n: int | None) -> list[int]:
        b = self.batch_size
        if rows is None:
            if b == 1:
                return [0] * (1 if n is None else n)
            if n is None or n == b:
                return list(range(b))
            raise ConfigError(
                f"the context has a batch of {b} rows and {n} questions were given: pass rows=[...] (the context "
                f"row each question is asked against, each in 0..{b - 1}) or one question per row"
            )
        if isinstance(rows, Tensor):
            rows = rows.tolist()
        if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
            raise ConfigError(f"rows must be a list of context row indices in 0..{b - 1}; got {type(rows).__name__}")
        rows = list(rows)
        bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < b]
        if bad:
            raise ConfigError(f"rows holds {bad[0]!r}; accepted: context row indices in 0..{b - 1}")
        if not rows:
            raise ConfigError("rows is empty; accepted: at least one context row index")
        if n is not None and len(rows) != n:
            raise ConfigError(f"rows has {len(rows)} entries for {n} questions; accepted: one row per question")
        return rows

    # -- forks ------------------------------------------------------------------------------
    def fork(self, rows: Sequence[int] | None = None) -> SlotCache:
        """A copy-on-write :class:`~kvframe.SlotCache` of the context, for your own forward/generate.

        ``rows`` picks (and may repeat) context rows: ``ctx.fork(rows=[0, 0, 0])`` is a batch of
        three copies of row 0. Run it inside :func:`kvframe.attach` with the context's ids in
        front of yours, e.g. ``model.generate(torch.cat([ctx.input_ids, q], 1),
        attention_mask=..., past_key_values=ctx.fork())``. The context is not changed by anything
        done to the fork.
        """
        self.check_intact()
        cache = self.cache.fork()
        if rows is not None:
            idx = self._rows(rows, None)
            if idx != list(range(self.batch_size)):
                index = torch.tensor(idx, dtype=torch.long)
                for layer in cache.layers:
                    layer.reorder_cache(index)
        return cache

    # -- answering --------------------------------------------------------------------------
    def _questions(self, questions: Any, attention_mask: Tensor | None) -> list[Tensor]:
        if isinstance(questions, Tensor):
            q = _as_ids(questions, "questions")
            if q.dim() == 1:
                if attention_mask is not None:
                    raise ConfigError("attention_mask is accepted only with a 2-D tensor of questions [N, L]")
                out = [q]
            elif q.dim() == 2:
                mask = torch.ones_like(q) if attention_mask is None else _check_mask(attention_mask, q.shape,
                                                                                     "attention_mask")
                out = [row[m.bool()] for row, m in zip(q, mask.to(q.device))]
            else:
                raise ConfigError(
                    f"questions has shape {tuple(q.shape)}; accepted: a list of 1-D tensors, or a 2-D tensor [N, L] "
                    "with its mask"
                )
        else:
            if attention_mask is not None:
                raise ConfigError("attention_mask is accepted only with a 2-D tensor of questions [N, L]")
            if not isinstance(questions, Sequence) or isinstance(questions, (str, bytes)):
                raise ConfigError(
                    f"questions must be a list of 1-D token id tensors or a 2-D tensor; got {type(questions).__name__}"
                )
            out = []
            for i, x in enumerate(questions):
                t = _as_ids(x, f"questions[{i}]")
                if t.dim() == 2 and t.shape[0] == 1:
                    t = t[0]
                if t.dim() != 1:
                    raise ConfigError(f"questions[{i}] has shape {tuple(t.shape)}; accepted: 1-D token ids (or [1, L])")
                out.append(t)
        if not out:
            raise ConfigError("questions is empty; accepted: at least one question")
        empty = [i for i, t in enumerate(out) if t.numel() == 0]
        if empty:
            raise ConfigError(f"question {empty[0]} has no tokens; every question needs at least one token to feed")
        return out

    def _padding_is_inert(self, lengths: list[int], max_new_tokens: int) -> bool:
        """Whether questions of these lengths may share one batch.

        A shorter question of a batch is left-padded, so its padding sits between the context and
        the question. Attention never sees padding slots, but three things would change what a
        question alone gets: a compression that runs while the padded question is in the cache
        works on a slot layout with padding in it; chunked prefill cuts a padded question at other
        chunk boundaries; and a one-token question alone is a decoding step, padded it is a
        multi-token pass (which a chunked trigger's scoring pass or a ``decode`` trigger's
        ``prefill`` treats differently). So mixed lengths share a batch only when the trigger
        cannot fire on the question pass or on any decoding step (asked of the trigger itself, with
        the events those passes will produce) and, for a chunked trigger, every question is longer
        than one token and fits in one chunk."""
        trigger = self.compressor.trigger
        if trigger.chunk_size and (max(lengths) > int(trigger.chunk_size) or min(lengths) == 1):
            return False
        if not trigger.ever_fires:
            return True
        from kvframe.policies.base import TriggerEvent

        for layer in self.cache.layers:
            if not layer.has_slots():
                continue
            slots = layer.num_slots
            for n in sorted(set(lengths)):
                steps = layer.decode_steps + (1 if n == 1 else 0)
                if trigger.fires(TriggerEvent(slots, n, slots + n, steps, layer.compressions)):
                    return False
            base = layer.decode_steps + 1
            for k in range(max_new_tokens):
                if trigger.fires(TriggerEvent(slots + 1, 1, slots + 2, base + k, layer.compressions)):
                    return False
        return True

    def _batches(self, lengths: list[int], batch_size: int | None, max_new_tokens: int) -> list[list[int]]:
        """Question indices per ``generate`` call (see :meth:`_padding_is_inert`)."""
        limit = 1 if self._draws_while_answering else len(lengths) if batch_size is None else batch_size
        mixed = len(set(lengths)) > 1 and self._padding_is_inert(lengths, max_new_tokens)
        buckets: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            buckets.setdefault(0 if mixed else length, []).append(i)
        out: list[list[int]] = []
        for idx in buckets.values():
            out.extend(idx[s : s + limit] for s in range(0, len(idx), limit))
        return out

    def _drew(self, fork: SlotCache) -> bool:
        """Whether a stochastic policy drew random numbers on ``fork`` (its generators moved on)."""
        for key, gen in fork._generators.items():
            before = self.cache._generators.get(key)
            if before is None:
                before = torch.Generator(device=gen.device).manual_seed(self.compressor.seed)
            if not torch.equal(gen.get_state(), before.get_state()):
                return True
        return False

    def _answer_batch(
        self, qs: list[Tensor], rows: list[int], pad: int, eos_ids: set[int], kwargs: dict[str, Any]
    ) -> tuple[list[Tensor], bool]:
        """One ``generate`` call over the questions ``qs`` (left-padded), each on context row ``rows[i]``.
        Returns the answers and whether a policy drew random numbers while answering."""
        model, dev = self.model, self.input_ids.device
        n_q = max(int(q.numel()) for q in qs)
        q_ids = torch.full((len(qs), n_q), pad, dtype=torch.long, device=dev)
        q_mask = torch.zeros((len(qs), n_q), dtype=torch.long, device=dev)
        for r, q in enumerate(qs):
            n = int(q.numel())
            q_ids[r, n_q - n :] = q.to(dev)
            q_mask[r, n_q - n :] = 1
        index = torch.tensor(rows, dtype=torch.long, device=dev)
        ids = torch.cat([self.input_ids[index], q_ids], dim=1)
        mask = torch.cat([self.attention_mask[index], q_mask], dim=1)
        cache = self.fork(rows=rows)
        with _attached(model, self.compressor), torch.no_grad():
            out = model.generate(ids, attention_mask=mask, **{cache_argument(model): cache}, **kwargs)
        self.answer_compression_seconds += cache.compression_seconds - self.cache.compression_seconds
        answers = []
        stop = torch.tensor(sorted(eos_ids), dtype=out.dtype, device=out.device) if eos_ids else None
        for seq in out[:, ids.shape[1] :]:
            if stop is not None:
                hit = torch.isin(seq, stop).nonzero()
                if hit.numel():
                    seq = seq[: int(hit[0, 0]) + 1]
            answers.append(seq)
        self.check_intact()
        return answers, self._drew(cache)

    def generate(
        self,
        questions: Sequence[Tensor] | Tensor,
        max_new_tokens: int | None = None,
        *,
        attention_mask: Tensor | None = None,
        rows: Sequence[int] | None = None,
        batch_size: int | None = None,
        **generate_kwargs: Any,
    ) -> list[Tensor]:
        """Answer each question on its own fork of the context; returns the new token ids per question.

        Parameters
        ----------
        questions:
            A list of 1-D token id tensors (different lengths allowed), or a 2-D tensor ``[N, L]``
            with its 0/1 ``attention_mask`` (the mask's zeros are dropped from each row).
        max_new_tokens:
            Tokens to generate per question (``None``: the model's generation config).
        rows:
            The context row each question is asked against (context batch > 1). Default: row 0
            for a one-row context; one question per row otherwise.
        batch_size:
            At most this many questions per ``generate`` call (default: all). Questions of one
            batch share nothing but the context: each row is its own fork, and a batched answer
            is the answer of the question alone. To keep it so, questions of different lengths
            share a batch only where the padding cannot change what the compressor does (its
            trigger cannot fire while a question is in the cache; see ``_padding_is_inert``),
            otherwise batches hold questions of one length; and once a policy is seen drawing
            random numbers while answering (one draw for a batch is not each row's own draw),
            questions run one at a time. Sampling (``do_sample=True``) draws from torch's global
            generator, so batched samples differ from one-at-a-time samples as in any batch.
        **generate_kwargs:
            Passed to ``model.generate`` (``do_sample``, ``eos_token_id``, ...; not the inputs,
            mask or cache, which this method sets).

        Returns
        -------
        list[Tensor]
            Per question, in order, the generated ids (1-D, on the model's device), up to and
            including the first end-of-sequence token, exactly as a one-question ``generate``
            returns them after the prompt.
        """
        for key in _RESERVED:
            if key in generate_kwargs:
                raise ConfigError(
                    f"generate argument {key!r} is set by CompressedContext.generate; for your own inputs, cache or "
                    "outputs run model.generate on ctx.fork() inside kvframe.attach"
                )
        if generate_kwargs.get("num_return_sequences", 1) != 1:
            raise ConfigError(
                f"num_return_sequences={generate_kwargs['num_return_sequences']!r}; CompressedContext.generate returns one "
                "answer per question (accepted: 1); ask a question several times instead"
            )
        for name, value, none in (("max_new_tokens", max_new_tokens, "the model's generation config"),
                                  ("batch_size", batch_size, "one batch")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r}; accepted: an integer >= 1 (or None for {none})")
        qs = self._questions(questions, attention_mask)
        row_of = self._rows(rows, len(qs))
        self.check_intact()
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = generate_kwargs.get("eos_token_id", getattr(gen_cfg, "eos_token_id", None))
        eos_ids = set([eos] if isinstance(eos, int) else list(eos or []))
        pad = generate_kwargs.get("pad_token_id", getattr(gen_cfg, "pad_token_id", None))
        if pad is None:
            pad = min(eos_ids) if eos_ids else 0
            generate_kwargs["pad_token_id"] = pad
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = max_new_tokens
        answers: list[Tensor | None] = [None] * len(qs)
        budget = generate_kwargs.get("max_new_tokens") or getattr(gen_cfg, "max_new_tokens", None) or 256
        for batch in self._batches([int(q.numel()) for q in qs], batch_size, int(budget)):
            got, drew = self._answer_batch([qs[i] for i in batch], [row_of[i] for i in batch], pad, eos_ids, generate_kwargs)
            if drew and len(batch) > 1:
                # a policy drew random numbers while answering: one draw for a batch is not the draw
                # of each question alone, so these questions (and all later ones) run one at a time
                self._draws_while_answering = True
                got = [self._answer_batch([qs[i]], [row_of[i]], pad, eos_ids, generate_kwargs)[0][0] for i in batch]
            for i, seq in zip(batch, got):
                answers[i] = seq
        return [a for a in answers if a is not None]

    def __repr__(self) -> str:
        mem = self.memory()
        return (
            f"CompressedContext(compressor={self.compressor.name!r}, batch={self.batch_size}, tokens={self.num_tokens}, "
            f"content_slots={mem.content_slots}, kv_bytes={mem.kv_bytes})"
        )


def compress_context(
    model: Any, compressor: Compressor, input_ids: Tensor, attention_mask: Tensor | None = None
) -> CompressedContext:
    """Prefill ``input_ids`` once under ``compressor`` and return the reusable compressed context.

    Parameters
    ----------
    model:
        A Hugging Face causal LM kvframe supports (see :func:`kvframe.attach`; attached for the
        call unless it is attached already).
    compressor:
        A :class:`~kvframe.Compressor` (:func:`kvframe.build`); its trigger decides when the
        context is compressed (after the prefill, per chunk with scoring passes, or, for a
        ``decode`` trigger with ``prefill: true``, after the prefill and again while answering).
    input_ids:
        ``[T]`` or ``[B, T]`` token ids of the context (a batch of contexts is left-padded).
    attention_mask:
        ``[B, T]`` 0/1, padding on the left only (``None``: no padding).

    Returns
    -------
    CompressedContext
        Answer with :meth:`CompressedContext.generate`, or fork it with
        :meth:`CompressedContext.fork`.
    """
    if not isinstance(compressor, Compressor):
        raise ConfigError(
            f"compress_context needs a kvframe Compressor (see kvframe.build); got {type(compressor).__name__}"
        )
    ids = _as_ids(input_ids, "input_ids")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ConfigError(
            f"input_ids has shape {tuple(input_ids.shape)}; accepted: [T] or [B, T] with at least one token per row"
        )
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        m = attention_mask[None] if isinstance(attention_mask, Tensor) and attention_mask.dim() == 1 else attention_mask
        mask = _check_mask(m, ids.shape, "attention_mask")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ConfigError(f"context row {empty[0]} is all padding; accepted: at least one token per row")
    # left padding only: once a row's tokens start, no padding follows (a padded tail would sit between the
    # context and the question and change what observation-window scorers see)
    gaps = ((mask.cummax(-1).values == 1) & (mask == 0)).any(-1).nonzero().flatten().tolist()
    if gaps:
        raise ConfigError(
            f"attention_mask row {gaps[0]} has padding after its first token; accepted: left padding only (zeros "
            "before each row's tokens)"
        )
    dev = _model_device(model)
    ids, mask = ids.to(dev), mask.to(dev)
    with _attached(model, compressor):
        cache = SlotCache.for_model(model, compressor)
        arg = cache_argument(model)
        kwargs: dict[str, Any] = {arg: cache, "use_cache": True}
        if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
            kwargs["logits_to_keep"] = 1
        if not bool(mask.all()):
            kwargs["attention_mask"] = mask
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate places left-padded rows
        with torch.no_grad():  # a backward scoring pass enables gradients itself (kvframe.chunked)
            t0 = time.perf_counter()
            model(ids, **kwargs)
            seconds = time.perf_counter() - t0
    return CompressedContext(model, compressor, cache, ids, mask, seconds)
