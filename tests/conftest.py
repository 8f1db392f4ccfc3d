"""Shared fixtures: tiny random models of every supported architecture, and the real SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels run in Triton's CPU interpreter for the parity tests; it must be set before
# triton is first imported (the kernels then run only where a test asks for backend "triton")
os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ("llama", "qwen2", "mistral", "gemma3")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, fp32, loaded once per session."""
    from kvframe.eval.models import load_model

    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_tokenizer(request):
    """The SmolLM2 tokenizer alone when its converted cache exists, else from the session model."""
    from kvframe.eval.models import smollm2_cache_path

    path = smollm2_cache_path()
    if (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    return request.getfixturevalue("smollm2")[1]


def left_padded(batch: int, length: int, pads: list[int], vocab: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[batch, length]`` with ``pads[i]`` left-padding tokens in row ``i``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
