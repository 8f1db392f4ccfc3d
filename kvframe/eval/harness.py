"""A backend for EleutherAI's lm-evaluation-harness: ``--model kvframe`` (needs the ``[lm-eval]`` extra).

:class:`KVFrameLM` is lm-eval's Hugging Face model (``HFLM``) whose requests go through kvframe's
compressed cache: every request gets a fresh :class:`~kvframe.cache.SlotCache` inside
:func:`kvframe.attach`. Importing this module registers it in lm-eval's model registry under the
name ``kvframe``; ``kvframe lm-eval ...`` (:func:`run_cli`) imports it and runs lm-eval's own
command line, so every lm-eval flag works::

    kvframe lm-eval --model kvframe --model_args pretrained=smollm2-135m,method=snapkv,budget=0.5 \\
        --tasks my_task --include_path my_tasks/ --output_path out/

Per request the context is split in two: the **compressed part** is prefilled first (the method's
trigger compresses as it would after a prompt), the rest is appended through the compressed cache.

- ``mode=query_aware`` (the default): the compressed part is the whole context but its last token,
  which is held back so that every scored or generated token is computed through the compressed
  cache (as ``kvframe eval``'s ``query_aware`` mode does).
- ``mode=query_agnostic``: the context is split at the **last** occurrence of ``question_delimiter``:
  the tokens before it are compressed, the delimiter and what follows (the question) are appended
  after compression. The split is made on the request's own tokens (the leading tokens that the
  text before the delimiter encodes to on its own), so the model always sees exactly the tokens
  lm-eval's ``hf`` model sees. A context without the delimiter is an error.

``loglikelihood``: after the compressed part, the rest of the context goes in one pass whose last
logits score the first continuation token; the other continuation tokens are then fed one per
step, as generated tokens would be (methods that compress while decoding evict or merge between
them). Log-probabilities and the greedy flag are lm-eval's (``log_softmax`` over the vocabulary,
the sum over continuation tokens; greedy if every continuation token is the arg-max).
``generate_until``: after the compressed part, lm-eval's own generation call runs on the whole
context with the compressed cache (the rest of the context in one pass, then greedy or sampled
decoding, stop sequences and ``max_gen_toks`` exactly as lm-eval's ``hf`` model).

A method that never compresses (``full``, trigger ``never``) runs each request in one pass as
lm-eval's ``hf`` model does, so its numbers equal ``hf``'s exactly; ``loglikelihood_rolling``
(perplexity tasks) is supported for such methods only (kvframe's streaming-perplexity task is the
protocol for compressing methods).

Per request, :attr:`KVFrameLM.cache_records` gets what the cache holds right after the compressed
part was prefilled (``kv_bytes``, ``content_slots``, ...; for a method that never compresses, the
slots its single pass holds for the same tokens). ``cache_log=PATH`` writes them as JSONL while the
run goes; ``kvframe lm-eval`` otherwise writes them next to lm-eval's results file. The summary
(mean KV bytes and content slots) goes into lm-eval's results under ``config.kvframe``.

Requests run one at a time (batch size 1, a fresh cache each); another ``batch_size`` is reported
in a warning and in the summary, and not used.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from kvframe.attach import attach, cache_argument, check_model
from kvframe.cache import SlotCache
from kvframe.compressor import Compressor
from kvframe.config import OPTION_KEYS, POLICY_KEYS, build
from kvframe.errors import ConfigError, close_matches
from kvframe.eval.generation import append_record
from kvframe.eval.models import SMOLLM2, load_model, model_fingerprint, resolve_dtype, resolve_model_name

logger = logging.getLogger(__name__)

__all__ = ["MODEL_NAME", "MODES", "KVFrameLM", "run_cli", "summarize"]

#: The name under which :class:`KVFrameLM` is registered in lm-eval's model registry.
MODEL_NAME = "kvframe"
#: Accepted values of the ``mode`` model argument.
MODES = ("query_aware", "query_agnostic")
#: Top-level model-argument keys that are compressor overrides (``scorer.window=32`` uses the first part).
COMPRESSOR_KEYS = tuple(k for k in OPTION_KEYS if k != "budget") + POLICY_KEYS


# While run_cli runs: the kvframe models lm-eval makes, so their summaries can be printed afterwards.
_made: list[KVFrameLM] | None = None
_OWN_ARGS = ("pretrained", "method", "budget", "mode", "question_delimiter", "cache_log")


def _check_extra_args(kwargs: dict[str, Any], builtin: bool) -> None:
    """Model arguments that are neither kvframe's nor lm-eval's ``hf`` ones: a near miss of a kvframe
    argument is an error; the rest go to ``from_pretrained`` (an error for the built-in model)."""
    hf_args = [p for p in inspect.signature(HFLM.__init__).parameters if p not in ("self", "kwargs")]
    for key in kwargs:
        if key in hf_args:
            continue
        hint = close_matches(str(key), _OWN_ARGS)
        if hint or builtin:
            others = [a for a in hf_args if a != "pretrained"]
            accepted = ", ".join([*_OWN_ARGS, *(f"{k}.*" for k in COMPRESSOR_KEYS), *others])
            raise ConfigError(
                f"unknown model argument {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" Accepted: {accepted}" + ("" if builtin else " (others go to from_pretrained)")
            )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _held(cache: SlotCache, below: int | None = None) -> dict[str, int]:
    """What ``cache`` holds: all of it, or (``below``) only the slots of tokens at positions ``< below``.

    The second form is for a method that never compresses, whose single pass holds every token: the
    slots of the tokens a compressing method would have compressed, with their share of the bytes.
    """
    if below is None:
        mem = cache.memory()
        return {"kv_bytes": mem.kv_bytes, "content_slots": mem.content_slots, "cache_bytes": mem.bytes, "slots": mem.slots}
    kv = content = total = slots = 0
    for layer in cache.layers:
        st = layer.state
        if st is None or st.valid.numel() == 0:
            continue
        n = int((st.valid & (st.positions < below)).sum())
        per_slot = st.keys.shape[-1] * st.keys.element_size() + st.values.shape[-1] * st.values.element_size()
        kv += n * per_slot
        content += n
        slots += n
        total += st.nbytes() * n // st.valid.numel()
    return {"kv_bytes": kv, "content_slots": content, "cache_bytes": total, "slots": slots}


def _pick_device(device: str | None) -> str:
    """lm-eval's rule for a device it cannot use: CUDA if there is one, else the CPU."""
    if device and not (device.startswith("cuda") and not torch.cuda.is_available()):
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@register_model(MODEL_NAME)
class KVFrameLM(HFLM):
    """lm-eval's ``hf`` model with every request run through a kvframe compressor.

    Model arguments (``--model_args key=value,...`` or a JSON object), besides every argument of
    lm-eval's ``hf`` model:

    - ``pretrained``: kvframe's built-in ``smollm2-135m`` (loaded offline by
      :func:`kvframe.eval.models.load_model`) or anything ``hf`` accepts (Hub id, local folder);
    - ``method``: a kvframe method name or a YAML card path (default ``full``);
    - ``budget``: overrides the card's budget (a ratio in (0, 1] or a number of tokens);
    - ``scorer.window=32``, ``trigger.size=256``, ``positions=reindex``, ``compile=false``, ...: other
      overrides of the composition (any key whose first part is a policy kind or a compressor option);
    - ``mode``: ``query_aware`` or ``query_agnostic`` (default: ``query_agnostic`` when
      ``question_delimiter`` is given, else ``query_aware``);
    - ``question_delimiter``: the text whose last occurrence starts the appended part (``query_agnostic``);
    - ``cache_log``: a JSONL file for the per-request cache records (overwritten when the model is made).
    """

    def __init__(
        self,
        pretrained: Any,
        method: str = "full",
        budget: float | int | str | None = None,
        mode: str | None = None,
        question_delimiter: str | None = None,
        cache_log: str | None = None,
        batch_size: int | str | None = 1,
        dtype: str | torch.dtype | None = "auto",
        device: str | None = "cuda",
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if str(k).split(".")[0] in COMPRESSOR_KEYS}
        if budget is not None:
            overrides["budget"] = budget
        if not isinstance(method, str) or not method:
            raise ConfigError(f"model argument method={method!r} must be a kvframe method name or a YAML card path")
        self.compressor: Compressor = build(method, **overrides)
        self._plain: Compressor = build("full")  # for requests with nothing to compress
        self.method = method
        self.overrides = {k: v for k, v in overrides.items() if k != "budget"}
        if question_delimiter is not None and (not isinstance(question_delimiter, str) or question_delimiter == ""):
            raise ConfigError(f"model argument question_delimiter={question_delimiter!r} must be a non-empty string")
        if mode is None:
            mode = "query_agnostic" if question_delimiter is not None else "query_aware"
        if mode not in MODES:
            raise ConfigError(f"model argument mode={mode!r} is not accepted; accepted: {', '.join(MODES)}")
        if mode == "query_agnostic" and question_delimiter is None:
            raise ConfigError(
                "model argument mode='query_agnostic' needs question_delimiter=TEXT (the context is split at its "
                "last occurrence: the part before it is compressed, the rest appended); or use mode=query_aware"
            )
        if mode == "query_aware" and question_delimiter is not None:
            raise ConfigError(
                f"model argument question_delimiter={question_delimiter!r} is used only with mode=query_agnostic, "
                "but mode='query_aware' compresses the whole context; drop one of the two"
            )
        self.mode = mode
        self.question_delimiter = question_delimiter
        self.requested_batch_size = batch_size
        if str(batch_size).strip() not in ("1", "None"):
            logger.warning(
                "kvframe model: batch_size=%s is not used; every request runs alone with a fresh SlotCache "
                "(batch size 1)", batch_size,
            )
        self.pretrained_name = pretrained if isinstance(pretrained, str) else None
        builtin = isinstance(pretrained, str) and resolve_model_name(pretrained) == SMOLLM2
        _check_extra_args(kwargs, builtin)
        if builtin:
            torch_dtype = torch.float32 if dtype in (None, "auto") else resolve_dtype(dtype)
            model, tok = load_model(SMOLLM2, dtype=torch_dtype, device=_pick_device(device))
            super().__init__(pretrained=model, tokenizer=tokenizer if tokenizer is not None else tok, batch_size=1, **kwargs)
        else:
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=1, dtype=dtype, device=device, **kwargs)
        check_model(self.model)
        self._cache_arg = cache_argument(self.model)
        self.cache_records: list[dict[str, Any]] = []
        self._meta: list[dict[str, Any]] | None = None
        self._current: dict[str, Any] | None = None
        self.cache_log = Path(cache_log) if cache_log else None
        if self.cache_log is not None:
            if self.world_size > 1:
                self.cache_log = self.cache_log.with_name(f"{self.cache_log.stem}.rank{self.rank}{self.cache_log.suffix}")
            self.cache_log.parent.mkdir(parents=True, exist_ok=True)
            self.cache_log.write_text("")
        if _made is not None:
            _made.append(self)

    # -- what a request's record says -------------------------------------------------------
    @property
    def label(self) -> str:
        parts = [f"budget {self.compressor.budget}"] if self.compressor.compresses else []
        parts += [f"{k}={v}" for k, v in self.overrides.items()]
        return f"{self.method}" + (f" ({', '.join(parts)})" if parts else "")

    def _meta_of(self, request: Any, kind: str) -> dict[str, Any]:
        return {"request_type": kind, "task": request.task_name, "doc_id": request.doc_id, "idx": request.idx}

    def _record(self, meta: dict[str, Any], context_tokens: int, compressed: int, held: dict[str, int]) -> None:
        rec = {
            "method": self.method,
            "budget": self.compressor.budget if self.compressor.compresses else None,
            "mode": self.mode,
            **meta,
            "context_tokens": int(context_tokens),
            "compressed_tokens": int(compressed),
            **held,
        }
        self.cache_records.append(rec)
        if self.cache_log is not None:
            append_record(self.cache_log, rec)

    def summary(self) -> dict[str, Any]:
        """Mean cache figures over the requests so far, overall and per request type."""
        return summarize(self.cache_records) | {
            "method": self.method,
            "budget": self.compressor.budget if self.compressor.compresses else None,
            "mode": self.mode,
            "question_delimiter": self.question_delimiter,
            "compressor": self.compressor.to_dict(),
            "batch_size": 1,
            "requested_batch_size": self.requested_batch_size,
            "cache_log": str(self.cache_log) if self.cache_log is not None else None,
        }

    # -- splitting a context ----------------------------------------------------------------
    def _compressed_length(self, context: str | None, ids: Sequence[int], encode: Callable[[str], list[int]]) -> int:
        """How many leading tokens of the context ``ids`` go through the compressor."""
        n = len(ids)
        if self.mode == "query_aware" or context is None:
            return max(n - 1, 0)
        assert self.question_delimiter is not None
        cut = context.rfind(self.question_delimiter)
        if cut < 0:
            where = self._current or {}
            raise ConfigError(
                f"question_delimiter {self.question_delimiter!r} does not occur in the context of task "
                f"{where.get('task')!r} doc {where.get('doc_id')!r} (context ends with {context[-60:]!r}); "
                "mode=query_agnostic needs it in every context (pick a text every prompt has before its question, "
                "or use mode=query_aware)"
            )
        k = _common_prefix(ids, encode(context[:cut])) if cut > 0 else 0
        return min(k, max(n - 1, 0))

    # -- model calls --------------------------------------------------------------------------
    def _forward(self, ids: list[int], cache: SlotCache, keep: int) -> torch.Tensor:
        inp = torch.tensor([ids], dtype=torch.long, device=self.device)
        amp = self.mixed_precision_dtype
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=amp, enabled=amp is not None):
            out = self.model(inp, use_cache=True, logits_to_keep=keep, **{self._cache_arg: cache})
        return out.logits

    def _score(
        self, context: str | None, ctx: list[int], cont: list[int], meta: dict[str, Any], rolling: bool
    ) -> tuple[float, bool]:
        """One loglikelihood request: ``(sum of continuation log-probs, greedy)``."""
        whole = (ctx + cont)[-(self.max_length + 1):]
        drop = len(ctx) + len(cont) - len(whole)  # tokens cut from the left, as lm-eval's hf does
        inp = whole[:-1]
        ctx_len = len(ctx) - drop
        contlen = len(cont)
        if rolling:
            k = len(inp)
        else:
            k = max(self._compressed_length(context, ctx, self.tok_encode) - drop, 0)
        compress = self.compressor.compresses and k > 0
        with attach(self.model, self.compressor if compress else self._plain) as handle:
            if not compress:
                logits = self._model_call(torch.tensor([inp], dtype=torch.long, device=self.device))
                held = _held(handle.cache, below=k)
            else:
                cache = handle.new_cache()
                self._forward(inp[:k], cache, keep=1)
                held = _held(cache)
                first = len(inp) - contlen + 1  # the rest of the context, whose last logits score cont[0]
                rows = [self._forward(inp[k:first], cache, keep=1)[:, -1:]]
                for t in inp[first:]:
                    rows.append(self._forward([t], cache, keep=1)[:, -1:])
                logits = torch.cat(rows, dim=1)
        self._record(meta, ctx_len, k, held)
        logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)[0]
        logp = logp[logp.shape[0] - contlen:].unsqueeze(0)  # [1, contlen, vocab]
        target = torch.tensor(cont, dtype=torch.long, device=logp.device).unsqueeze(0)
        greedy = bool((logp.argmax(dim=-1) == target).all())
        return float(torch.gather(logp, 2, target.unsqueeze(-1)).squeeze(-1).sum()), greedy

    # -- lm-eval's request types ----------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._meta = [self._meta_of(r, "loglikelihood") for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._meta = None

    def _loglikelihood_tokens(
        self, requests: list[Any], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        metas = self._meta if self._meta is not None and len(self._meta) == len(requests) else None
        outer = self._current  # set by loglikelihood_rolling for its windows
        rolling = outer is not None and outer["request_type"] == "loglikelihood_rolling"
        out = []
        try:
            for i, (request_str, ctx, cont) in enumerate(
                tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="kvframe loglikelihood requests")
            ):
                assert len(ctx) > 0 and 0 < len(cont) <= self.max_length
                if metas is not None:
                    meta = metas[i]
                else:
                    meta = dict(outer or {"request_type": "loglikelihood", "task": None, "doc_id": None, "idx": None})
                self._current = meta
                context = request_str[0] if request_str is not None else None
                answer = self._score(context, list(ctx), list(cont), meta, rolling)
                out.append(answer)
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
        finally:
            self._current = outer
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        if self.compressor.compresses:
            tasks = sorted({str(r.task_name) for r in requests})
            raise ConfigError(
                f"loglikelihood_rolling (task {', '.join(tasks)}: perplexity over whole documents) is supported only for "
                f"methods that never compress; method={self.method!r} compresses. Use method=full here, or kvframe "
                "eval's streaming perplexity task for compressing methods"
            )
        out = []
        for r in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="kvframe loglikelihood_rolling requests"):
            self._current = self._meta_of(r, "loglikelihood_rolling")
            try:
                out += super().loglikelihood_rolling([r], disable_tqdm=True)
            finally:
                self._current = None
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="kvframe generate_until requests"):
            self._current = self._meta_of(r, "generate_until") | {"context": r.args[0]}
            try:
                out += super().generate_until([r], disable_tqdm=True)
            finally:
                self._current = None
        return out

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        """lm-eval's generation call on ``context`` ``[1, T]``, with the compressed part prefilled first."""
        current = self._current
        if current is None or context.shape[0] != 1:
            raise ConfigError("the kvframe model generates one request at a time (call generate_until)")
        text = current["context"]
        ids = context[0].tolist()

        def encode(string: str) -> list[int]:  # as lm-eval's generate_until encodes a context
            return self.tok_batch_encode([string], truncation=self.truncation)[0][0].tolist()

        full = encode(text)
        drop = max(len(full) - len(ids), 0)  # lm-eval's left truncation to max_length - max_gen_toks
        k = self._compressed_length(text, full, encode)
        k = min(max(k - drop, 0), max(len(ids) - 1, 0))
        meta = {key: current[key] for key in ("request_type", "task", "doc_id", "idx")}
        compress = self.compressor.compresses and k > 0
        with attach(self.model, self.compressor if compress else self._plain) as handle:
            cache = handle.new_cache()
            if compress:
                self._forward(ids[:k], cache, keep=1)
                held = _held(cache)
            out = super()._model_generate(context, max_length, stop, **generation_kwargs, **{self._cache_arg: cache})
            if not compress:
                held = _held(cache, below=k)
        self._record(meta, len(ids), k, held)
        return out

    # -- reporting ------------------------------------------------------------------------------
    def get_model_info(self) -> dict[str, Any]:
        """lm-eval's model info without Hub calls, plus ``kvframe``: the compressor and the cache summary."""
        fingerprint: dict[str, Any] | None = None
        if self.pretrained_name is not None:
            try:
                fingerprint = model_fingerprint(self.pretrained_name)
            except ConfigError:
                fingerprint = None
        sha = ""
        if fingerprint is not None:
            sha = str(fingerprint.get("sha256") or fingerprint.get("revision") or "")
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_revision": self.revision,
            "model_sha": sha,
            "kvframe": self.summary() | {"model": fingerprint},
        }


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``requests``, ``mean_kv_bytes``, ``mean_content_slots``, ``mean_compressed_tokens``, overall and
    per request type (``by_request_type``)."""

    def means(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n = len(rows)
        return {
            "requests": n,
            "mean_kv_bytes": sum(r["kv_bytes"] for r in rows) / n if n else None,
            "mean_content_slots": sum(r["content_slots"] for r in rows) / n if n else None,
            "mean_compressed_tokens": sum(r["compressed_tokens"] for r in rows) / n if n else None,
            "mean_context_tokens": sum(r["context_tokens"] for r in rows) / n if n else None,
        }

    kinds = sorted({r["request_type"] for r in records})
    return means(records) | {"by_request_type": {k: means([r for r in records if r["request_type"] == k]) for k in kinds}}


def _summary_table(lm: KVFrameLM) -> str:
    s = lm.summary()
    lines = [
        f"kvframe: KV cache right after the compressed part of each request ({lm.label}, mode {lm.mode}):",
        "| request type | requests | mean KV bytes | mean content slots | mean compressed tokens | mean context tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = list(s["by_request_type"].items())
    if len(rows) > 1:
        keys = ("requests", "mean_kv_bytes", "mean_content_slots", "mean_compressed_tokens", "mean_context_tokens")
        rows.append(("all", {k: s[k] for k in keys}))
    for kind, m in rows:
        lines.append(
            f"| {kind} | {m['requests']} | {m['mean_kv_bytes']:.0f} | {m['mean_content_slots']:.1f} | "
            f"{m['mean_compressed_tokens']:.1f} | {m['mean_context_tokens']:.1f} |"
        )
    if not rows:
        lines.append("| (no requests) | 0 | | | | |")
    return "\n".join(lines)


def _output_path(argv: Sequence[str]) -> str | None:
    """The value of lm-eval's ``--output_path`` / ``-o`` in ``argv`` (the last one given)."""
    value = None
    for i, a in enumerate(argv):
        if a in ("--output_path", "-o") and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--output_path="):
            value = a.split("=", 1)[1]
    return value


def _records_path(output_path: str, since: float) -> Path:
    """Where the JSONL goes: beside the results file lm-eval wrote for this run, with its date suffix."""
    out = Path(output_path)
    if out.suffix == ".json":
        folder, prefix, found = out.parent, f"{out.stem}_", list(out.parent.glob(f"{out.stem}_*.json"))
    else:
        folder, prefix, found = out, "results_", list(out.glob("*/results_*.json"))
    found = [p for p in found if p.stat().st_mtime >= since - 1]
    if found:
        newest = max(found, key=lambda p: p.stat().st_mtime)
        return newest.parent / f"kvframe_cache_{newest.stem[len(prefix):]}.jsonl"
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    return folder / f"kvframe_cache_{stamp}.jsonl"


def run_cli(argv: Sequence[str]) -> list[dict[str, Any]]:
    """Run lm-eval's command line on ``argv`` with the ``kvframe`` model registered; then, for each
    kvframe model the run made, write its per-request cache records (next to lm-eval's results when
    ``--output_path`` is given and no ``cache_log``) and print their summary. Returns the summaries.

    lm-eval's own exits (``--help``, bad flags) propagate as :class:`SystemExit`.
    """
    from lm_eval.__main__ import cli_evaluate

    global _made
    since = time.time()
    made: list[KVFrameLM] = []
    saved, outer = sys.argv, _made
    sys.argv, _made = ["lm-eval", *argv], made
    try:
        cli_evaluate()
    finally:
        sys.argv, _made = saved, outer
    output_path = _output_path(argv)
    summaries = []
    for lm in made:
        if lm.cache_log is None and output_path is not None and lm.rank == 0:
            path = _records_path(output_path, since)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w") as f:
                for rec in lm.cache_records:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
            lm.cache_log = path
        print(_summary_table(lm))
        where = lm.cache_log or "not written (give --output_path or the model argument cache_log=PATH)"
        print(f"kvframe: per-request cache records: {where}")
        summaries.append(lm.summary())
    return summaries
