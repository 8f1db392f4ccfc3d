"""What an evaluation task is: deterministic samples and a scoring rule.

Two kinds of tasks exist:

- ``generation`` tasks (passkey, RULER-style, needle grid, hub benchmarks): each
  :class:`Sample` has a ``context`` (compressed first in query-agnostic mode), a ``question``
  appended after it, reference ``answers``, and the task scores a generated ``prediction`` with
  :meth:`Task.score` (a float in ``[0, 1]``, or ``[0, 100]`` for LongBench-style metrics as the
  task documents).
- ``perplexity`` tasks (streaming perplexity): each sample's ``context`` is a text stream that is
  fed token by token after a prefill; the score is a negative log-likelihood per token.

Every generated task is a pure function of its arguments (seed, lengths, tokenizer), so the same
config gives bit-identical samples; :func:`content_hash` fingerprints a sample set for results.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Sample:
    """One evaluation sample.

    ``id`` is unique within its task (it keys resume and de-duplication); ``meta`` holds anything a
    task reports per sample (length in tokens, needle depth, sub-task name, ...), JSON-serialisable.
    """

    id: str
    context: str
    question: str = ""
    answers: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["answers"] = list(self.answers)
        return d


class Task:
    """Base class: a named set of samples and a metric."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "generation"  # or "perplexity"
    metric: ClassVar[str] = "accuracy"

    def samples(self, tokenizer: Any) -> list[Sample]:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, prediction: str, sample: Sample) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


def content_hash(samples: Sequence[Sample]) -> str:
    """sha256 over the samples' ids, contexts, questions, answers and meta (canonical JSON)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
