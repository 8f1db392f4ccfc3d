"""kvframe.testing: tiny random models of every supported architecture, built offline."""

from __future__ import annotations

import pytest
import torch

from kvframe.errors import UnknownNameError
from kvframe.testing import TINY_ARCHS, tiny_model



@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_forward(arch):
    model = tiny_model(arch)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    input_ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
    assert out.logits.shape == (2, 24, 128)
    assert torch.isfinite(out.logits).all()
    assert out.past_key_values is not None


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_dims(arch):
    config = tiny_model(arch).config
    assert config.num_hidden_layers == 2
    assert config.num_attention_heads == 4
    assert config.num_key_value_heads == 2
    assert config.hidden_size // config.num_attention_heads == 16
    assert getattr(config, "head_dim", 16) == 16


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_seeded(arch):
    state_before = torch.random.get_rng_state()
    a, b, c = tiny_model(arch, seed=3), tiny_model(arch, seed=3), tiny_model(arch, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state_before)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


def test_tiny_model_overrides():
    model = tiny_model("llama", num_hidden_layers=3, vocab_size=64)
    assert model.config.num_hidden_layers == 3
    assert model.get_output_embeddings().weight.shape[0] == 64


def test_tiny_gemma3_mixes_sliding_and_full_layers():
    config = tiny_model("gemma3").config
    assert config.sliding_window == 16
    assert config.layer_types == ["sliding_attention", "full_attention"]
    config4 = tiny_model("gemma3", num_hidden_layers=4).config
    assert config4.layer_types == ["sliding_attention", "full_attention"] * 2


def test_tiny_gemma3_beyond_window():
    model = tiny_model("gemma3")
    input_ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert torch.isfinite(logits).all()


def test_tiny_model_unknown_arch():
    with pytest.raises(UnknownNameError) as info:
        tiny_model("gpt-neox")
    message = str(info.value)
    assert "gpt-neox" in message
    for arch in ("llama", "qwen2", "mistral", "gemma3"):
        assert arch in message
