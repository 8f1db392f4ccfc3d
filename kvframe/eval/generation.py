"""Running samples: prefill (compressing as the trigger says), question, greedy decoding, or the
streaming-perplexity protocol; with the time and peak memory each part took. Samples that share a
context are answered from one compressed prefill (:func:`answer_group`).

These functions need only the library (torch, transformers); the Lightning module
(:mod:`kvframe.eval.module`) and the benchmarks call them.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import torch

from kvframe.attach import attach
from kvframe.compressor import Compressor
from kvframe.context import compress_context
from kvframe.errors import KVFrameError
from kvframe.eval.tasks.base import Sample, Task


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> Callable[[], int] | None:
    """glibc's bytes in use (heap + mmapped chunks), which, unlike RSS, drops when tensors are freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def used() -> int:
        m = fn()
        return int(m.uordblks + m.hblkhd)

    return used


class PeakMemory:
    """Peak memory during a block, above the level at its start.

    CUDA: the caching allocator's peak. CPU: glibc's bytes in use (``mallinfo2``), sampled every
    ``interval`` seconds (resident memory as a fallback off glibc, which overstates reuse).
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        if _HEAP is not None:
            return _HEAP()
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: no sampling
            return 0

    def __enter__(self) -> PeakMemory:
        gc.collect()  # garbage of an earlier sample (reference cycles) would otherwise inflate the start
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self._rss()
            self._peak = self.start
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, self._rss()) - self.start


_HEAP = _heap_in_use()


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line under an exclusive lock (several ranks may write), flushed and fsynced."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def prompt_parts(tok: Any, sample: Sample) -> tuple[str, str]:
    """``(prefix, suffix)``: the prompt split right after the context.

    By default the context and question form one user message (blank line between) in the model's
    chat template. A task may say otherwise per sample: ``meta["join"]`` (the exact text between
    context and question, e.g. LongBench's templates) and ``meta["chat"] = False`` (raw prompt,
    as LongBench does for few-shot and code tasks).
    """
    from kvframe.eval.tasks.passkey import _has_chat_template, split_prompt

    join = sample.meta.get("join")
    chat = bool(sample.meta.get("chat", True))
    if join is None and chat:
        return split_prompt(tok, sample.context, sample.question)
    join = "\n\n" if join is None else str(join)
    if not chat or not _has_chat_template(tok):
        return sample.context, join + sample.question
    content = sample.context + join + sample.question
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    start = prompt.rfind(content)
    if start < 0:
        return split_prompt(tok, sample.context, sample.question)
    cut = start + len(sample.context)
    return prompt[:cut], prompt[cut:]


def context_key(tok: Any, sample: Sample) -> str:
    """The id of a sample's context: sha256 (16 hex digits) of the prompt text before the question
    (:func:`prompt_parts`). Samples with the same key share the prefill in ``query_agnostic`` mode."""
    prefix, _ = prompt_parts(tok, sample)
    return hashlib.sha256(prefix.encode("utf-8")).hexdigest()[:16]


def answer_group(
    model: Any,
    tok: Any,
    comp: Compressor,
    samples: list[Sample],
    max_new_tokens: int | list[int],
    mode: str = "query_agnostic",
) -> Iterator[tuple[Sample, dict[str, Any]]]:
    """Answer ``samples`` that share one context, prefilling and compressing it once.

    ``query_agnostic``: the context (the prompt up to the question, :func:`prompt_parts`) is
    compressed once with :func:`kvframe.compress_context`, then each question is appended on its
    own fork of the compressed cache and decoded greedily, so each answer is what compressing the
    context for that question alone gives. ``query_aware`` (one sample only): the whole prompt but
    its last token is compressed, then the last token is fed and decoding starts.

    Yields ``(sample, result)`` as each answer finishes (a caller that records them loses nothing
    if it is interrupted mid-group). ``prefill_s`` (and the cache figures) are the shared
    prefill's, the same in every result of the group; ``compression_s`` adds the prefill's
    compression to the compression done while answering this question; ``peak_memory_bytes``
    is the peak above the level before the prefill while this question was answered (or during the
    prefill, whichever is higher), i.e. what one sample alone would report.
    """
    if not samples:
        return
    budgets = [max_new_tokens] * len(samples) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(samples):
        raise KVFrameError(f"{len(samples)} samples but {len(budgets)} max_new_tokens; accepted: one per sample")
    if mode == "query_aware" and len(samples) != 1:
        raise KVFrameError(
            f"query_aware mode compresses each question with its context; got {len(samples)} samples (accepted: one)"
        )
    parts = [prompt_parts(tok, s) for s in samples]
    if len({p for p, _ in parts}) != 1:
        raise KVFrameError(f"samples {[s.id for s in samples]} do not share one context; accepted: samples of one context")
    dev = model.device
    pre = tok(parts[0][0], add_special_tokens=False, return_tensors="pt").input_ids.to(dev)
    sufs = [tok(suf, add_special_tokens=False, return_tensors="pt").input_ids.to(dev) for _, suf in parts]
    if mode == "query_agnostic":
        context, questions = pre, [suf[0] for suf in sufs]
    else:
        full = torch.cat([pre, sufs[0]], dim=1)
        context, questions = full[:, :-1], [full[0, -1:]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad(), attach(model, comp):
        with PeakMemory(dev) as prefill_peak:
            ctx = compress_context(model, comp, context)
        mem = ctx.memory()
        for sample, question, n_new in zip(samples, questions, budgets):
            spent = ctx.answer_compression_seconds
            with PeakMemory(dev) as peak:
                t0 = time.perf_counter()
                new = ctx.generate([question], max_new_tokens=n_new, do_sample=False, pad_token_id=pad)[0]
                t1 = time.perf_counter()
            yield sample, {
                "prediction": tok.decode(new, skip_special_tokens=True),
                "prompt_tokens": int(context.shape[1] + question.shape[0]),
                "prefill_tokens": int(context.shape[1]),
                "prefill_s": ctx.prefill_seconds,
                "compression_s": ctx.compression_seconds + ctx.answer_compression_seconds - spent,
                "decode_s": t1 - t0,
                "peak_memory_bytes": int(max(prefill_peak.peak_bytes, peak.start - prefill_peak.start + peak.peak_bytes)),
                "cache_bytes": mem.bytes,
                "cache_kv_bytes": mem.kv_bytes,
                "cache_content_slots": mem.content_slots,
                "cache_slots": mem.slots,
            }


def generate_answer(model: Any, tok: Any, comp: Compressor, sample: Sample, max_new_tokens: int, mode: str) -> dict[str, Any]:
    """Prefill the context (compressing as the trigger says), append the question, decode greedily
    (:func:`answer_group` for one sample)."""
    with closing(answer_group(model, tok, comp, [sample], max_new_tokens, mode)) as results:
        return next(results)[1]


def stream_perplexity(model: Any, tok: Any, comp: Compressor, sample: Sample, task: Task) -> dict[str, Any]:
    """The streaming-perplexity protocol on one sample (see :mod:`kvframe.eval.tasks.perplexity`)."""
    from kvframe.eval.tasks.perplexity import stream_nll

    ids = task.token_ids(tok, sample).to(model.device)
    if ids.dim() == 1:
        ids = ids[None]
    with PeakMemory(model.device) as peak:
        t0 = time.perf_counter()
        # one token per step (WeightedKV's protocol); methods that compress per prefill chunk and
        # never while decoding (AsymKV, KVSlimmer) stream in chunks of their own size instead
        step = int(comp.trigger.chunk_size or 1)
        nll, cache = stream_nll(model, comp, ids, task.prefill, step=step, return_cache=True)
        t1 = time.perf_counter()
    mem = cache.memory()
    return {
        "nll": [round(float(x), 6) for x in nll.tolist()],
        "mean_nll": float(nll.mean()),
        "prompt_tokens": int(ids.shape[1]),
        "prefill_tokens": int(task.prefill),
        "prefill_s": 0.0,
        "decode_s": t1 - t0,
        "compression_s": cache.compression_seconds,
        "peak_memory_bytes": int(peak.peak_bytes),
        "cache_bytes": mem.bytes,
        "cache_kv_bytes": mem.kv_bytes,
        "cache_content_slots": mem.content_slots,
        "cache_slots": mem.slots,
    }
