"""Evaluation as Lightning modules: one :class:`EvalModule` per (method, budget, task) cell.

:class:`TaskDataModule` serves the cell's pending samples (those not in ``predictions.jsonl``
yet). Under DDP every rank gets the samples ``rank, rank + world, ...``: no sampler padding, so no
sample is evaluated twice and none is lost. :class:`EvalModule` holds the model and the
compressor; its ``test_step`` runs, per sample, prefill -> compression (whenever the compressor's
trigger says) -> question -> greedy decoding -> scoring (generation tasks), or the streaming
perplexity protocol (perplexity tasks) (:mod:`kvframe.eval.generation`), and appends the record to
``predictions.jsonl`` (under a file lock, flushed and fsynced) before the next sample starts. The
module never looks at a method's name: everything comes from the compressor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kvframe.compressor import Compressor
from kvframe.eval.generation import append_record, generate_answer, stream_perplexity
from kvframe.eval.tasks.base import Sample, Task


class _Samples(Dataset):
    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


class StridedSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets indices ``r, r + w, ...`` (uneven shares, never padded)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TaskDataModule(L.LightningDataModule):
    """A task's samples (built with the model's tokenizer in ``setup``), minus those already done.

    One sample per batch; under DDP rank ``r`` of ``w`` takes pending samples ``r, r + w, ...``.
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

    def setup(self, stage: str | None = None) -> None:
        samples = self.samples if self.samples is not None else self.task.samples(self.tokenizer)
        self.pending = [s for s in samples if s.id not in self.done_ids]

    def test_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(
            _Samples(self.pending), batch_size=1, sampler=StridedSampler(len(self.pending), rank, world), collate_fn=lambda b: b
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

    def test_step(self, batch: list[Sample], batch_idx: int) -> None:
        for sample in batch:
            if self.task.kind == "perplexity":
                res = stream_perplexity(self.lm, self.tokenizer, self.compressor, sample, self.task)
                score = res["mean_nll"]
            else:
                # a task may set its own generation budget per sample (RULER's per-task tokens_to_generate)
                n_new = int(sample.meta.get("max_new_tokens") or self.max_new_tokens)
                res = generate_answer(self.lm, self.tokenizer, self.compressor, sample, n_new, self.mode)
                score = float(self.task.score(res["prediction"], sample))
            rec = {**self.cell, "sample_id": sample.id, "answers": list(sample.answers), "meta": sample.meta, "score": score,
                   "rank": self.global_rank, **res}
            append_record(self.predictions, rec)
            self.log(f"{self.log_prefix}score", float(score), on_step=False, on_epoch=True, batch_size=1)
            for key in ("cache_content_slots", "cache_kv_bytes", "cache_bytes", "prefill_s", "compression_s", "decode_s",
                        "peak_memory_bytes", "prompt_tokens"):
                self.log(f"{self.log_prefix}{key}", float(res[key]), on_step=False, on_epoch=True, batch_size=1)
