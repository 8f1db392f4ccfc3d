"""The passkey task (cheap smoke test) as an evaluation :class:`~kvframe.eval.tasks.base.Task`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvframe.errors import ConfigError
from kvframe.eval.tasks.base import Sample, Task


@dataclass
class PasskeyTask(Task):
    """``n_samples`` passkey prompts of about ``length`` tokens (needle depths cycled or given)."""

    n_samples: int = 4
    length: int = 1536
    seed: int = 0
    depths: list[float] | None = None

    name: ClassVar[str] = "passkey"
    metric: ClassVar[str] = "accuracy"
    _cache: dict[int, list[Sample]] = field(default_factory=dict, repr=False, compare=False)

    def check(self) -> None:
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ConfigError(f"task passkey: n_samples={self.n_samples!r} must be an integer >= 1")
        if not isinstance(self.length, int) or self.length < 64:
            raise ConfigError(f"task passkey: length={self.length!r} must be an integer >= 64 tokens")
        for d in self.depths or []:
            if not 0.0 <= float(d) <= 1.0:
                raise ConfigError(f"task passkey: depth {d!r} must be in [0, 1]")

    def samples(self, tokenizer: Any) -> list[Sample]:
        from kvframe.eval.tasks.passkey import make_passkey_samples

        key = id(tokenizer)
        if key not in self._cache:
            raw = make_passkey_samples(tokenizer, n=self.n_samples, length=self.length, seed=self.seed, depths=self.depths)
            self._cache[key] = [
                Sample(id=s.id, context=s.context, question=s.question, answers=(s.answer,), meta={"depth": s.depth, "length": s.n_tokens})
                for s in raw
            ]
        return self._cache[key]

    def score(self, prediction: str, sample: Sample) -> float:
        from kvframe.eval.tasks.passkey import score_passkey

        return float(score_passkey(prediction, sample.answers[0]))
