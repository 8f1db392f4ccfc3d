"""Evaluation as Lightning modules: one :class:`EvalModule` per (method, budget, task) cell.

:class:`TaskDataModule` serves the cell's pending samples (those not in ``predictions.jsonl``
yet), grouped by context: pending samples whose prompts share the text before the question (several
questions about one document) form one :class:`ContextGroup`. Under DDP every rank gets the groups
``rank, rank + world, ...``: no sampler padding, so no sample is evaluated twice, none is lost and
no group is split across ranks. :class:`EvalModule` holds the model and the compressor; its
``test_step`` runs, per group, prefill -> compression (whenever the compressor's trigger says) ->
per question: append it to a fork of the compressed cache -> greedy decoding -> scoring (generation
tasks; in ``query_agnostic`` mode the context is prefilled once per group, in ``query_aware`` mode
each question is compressed with its context), or the streaming perplexity protocol (perplexity
tasks) (:mod:`kvframe.eval.generation`), and appends each sample's record to ``predictions.jsonl``
(under a file lock, flushed and fsynced) as soon as it is scored. The module never looks at a
method's name: everything comes from the compressor.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kvframe.compressor import Compressor
from kvframe.eval.generation import answer_group, append_record, context_key, generate_answer, stream_perplexity
from kvframe.eval.tasks.base import Sample, Task


@dataclass(frozen=True)
class ContextGroup:
    """Pending samples of one task that share a context (``key``: :func:`~kvframe.eval.generation.context_key`;
    ``None`` for samples that are never grouped, such as perplexity streams)."""

    key: str | None
    samples: tuple[Sample, ...]


def context_groups(task: Task, tokenizer: Any, samples: list[Sample]) -> list[ContextGroup]:
    """``samples`` grouped by context, groups in order of their first sample, samples in their order."""
    if task.kind != "generation":
        return [ContextGroup(None, (s,)) for s in samples]
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(context_key(tokenizer, s), []).append(s)
    return [ContextGroup(k, tuple(v)) for k, v in groups.items()]


class _Groups(Dataset):
    def __init__(self, groups: list[ContextGroup]):
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> ContextGroup:
        return self.groups[i]


class StridedSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets indices ``r, r + w, ...`` (uneven shares, never padded)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TaskDataModule(L.LightningDataModule):
    """A task's samples (built with the model's tokenizer in ``setup``), minus those already done,
    grouped by context (:func:`context_groups`).

    One group per batch; under DDP rank ``r`` of ``w`` takes groups ``r, r + w, ...``, so the
    questions of one context always run on one rank.
    """

    def __init__(
        self, task: Task, tokenizer: Any, done_ids: set[str] | frozenset[str] = frozenset(), samples: list[Sample] | None = None
    ):
        super().__init__()
        self.task = task
        self.tokenizer = tokenizer
        self.done_ids = set(done_ids)
        self.samples = samples  # already generated (the runner builds each task's samples once)
        self.pending: list[Sample] = []
        self.groups: list[ContextGroup] = []

    def setup(self, stage: str | None = None) -> None:
        samples = self.samples if self.samples is not None else self.task.samples(self.tokenizer)
        self.pending = [s for s in samples if s.id not in self.done_ids]
        self.groups = context_groups(self.task, self.tokenizer, self.pending)

    def test_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(
            _Groups(self.groups), batch_size=1, sampler=StridedSampler(len(self.groups), rank, world), collate_fn=lambda b: b
        )


class EvalModule(L.LightningModule):
    """Evaluates one compressor on one task; ``Trainer.test`` drives it."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        compressor: Compressor,
        task: Task,
        cell: dict[str, Any],
        predictions: Path,
        max_new_tokens: int = 12,
        mode: str = "query_agnostic",
        log_prefix: str = "",
    ):
        super().__init__()
        # the HF model is an attribute, not a registered submodule: Lightning never wraps or moves it
        object.__setattr__(self, "lm", model)
        self.tokenizer = tokenizer
        self.compressor = compressor
        self.task = task
        self.cell = cell
        self.predictions = predictions
        self.max_new_tokens = max_new_tokens
        self.mode = mode
        self.log_prefix = log_prefix

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # samples are text; tensors are made (on the model's device) per sample

    def test_step(self, batch: list[ContextGroup], batch_idx: int) -> None:
        for group in batch:
            if self.task.kind == "perplexity":
                for sample in group.samples:
                    res = stream_perplexity(self.lm, self.tokenizer, self.compressor, sample, self.task)
                    self._record(sample, res, res["mean_nll"])
            elif self.mode != "query_agnostic":  # query-aware: every question is compressed with its context
                for sample in group.samples:
                    res = generate_answer(self.lm, self.tokenizer, self.compressor, sample, self._max_new(sample), self.mode)
                    self._record(sample, res, float(self.task.score(res["prediction"], sample)))
            else:
                shared = {"context_group": group.key, "context_group_size": len(group.samples)}
                if len(group.samples) == 1:
                    sample = group.samples[0]
                    res = generate_answer(self.lm, self.tokenizer, self.compressor, sample, self._max_new(sample), self.mode)
                    self._record(sample, {**res, **shared}, float(self.task.score(res["prediction"], sample)))
                    continue
                samples = list(group.samples)
                budgets = [self._max_new(s) for s in samples]
                with closing(answer_group(self.lm, self.tokenizer, self.compressor, samples, budgets, self.mode)) as answers:
                    for sample, res in answers:
                        self._record(sample, {**res, **shared}, float(self.task.score(res["prediction"], sample)))

    def _max_new(self, sample: Sample) -> int:
        # a task may set its own generation budget per sample (RULER's per-task tokens_to_generate)
        return int(sample.meta.get("max_new_tokens") or self.max_new_tokens)

    def _record(self, sample: Sample, res: dict[str, Any], score: float) -> None:
        rec = {**self.cell, "sample_id": sample.id, "answers": list(sample.answers), "meta": sample.meta, "score": score,
               "rank": self.global_rank, **res}
        append_record(self.predictions, rec)
        self.log(f"{self.log_prefix}score", float(score), on_step=False, on_epoch=True, batch_size=1)
        for key in ("cache_content_slots", "cache_kv_bytes", "cache_bytes", "prefill_s", "compression_s", "decode_s",
                    "peak_memory_bytes", "prompt_tokens"):
            self.log(f"{self.log_prefix}{key}", float(res[key]), on_step=False, on_epoch=True, batch_size=1)
