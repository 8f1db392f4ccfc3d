"""Shared fixtures: tiny random models of every supported architecture, and the real SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ARCHS = ("llama", "qwen2", "mistral", "gemma3")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, fp32, loaded once per session."""
    from kvframe.models import load_model

    return load_model("smollm2-135m", dtype="float32")


def left_padded(batch: int, length: int, pads: list[int], vocab: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[batch, length]`` with ``pads[i]`` left-padding tokens in row ``i``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
