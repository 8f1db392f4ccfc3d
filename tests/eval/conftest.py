"""Fixtures for the evaluation system: a tiny random model that speaks SmolLM2's tokenizer, so a
whole ``kvframe eval`` run takes seconds."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A local checkpoint folder: a 2-layer random Llama with SmolLM2's vocabulary and tokenizer."""
    from kvframe.testing import tiny_model

    path = tmp_path_factory.mktemp("tiny_lm")
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), max_position_embeddings=4096)
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def eval_args(tiny_lm_dir, tmp_path):
    """``kvframe eval`` arguments for a fast run of the tiny model into ``tmp_path/runs``."""

    def make(*extra: str, run_name: str | None = "r") -> list[str]:
        args = [
            f"model={tiny_lm_dir}", "tasks=[{name: passkey, n_samples: 2, length: 256}]", "methods=[full, knorm]",
            "budgets=[0.5]", "max_new_tokens=4", "mode=query_agnostic", "wandb.mode=disabled", "plots=false", "progress_bar=false",
            f"output_dir={tmp_path / 'runs'}",
        ]
        if run_name is not None:
            args.append(f"run_name={run_name}")
        overridden = {a.split("=", 1)[0] for a in extra}
        return [a for a in args if a.split("=", 1)[0] not in overridden] + list(extra)

    return make
