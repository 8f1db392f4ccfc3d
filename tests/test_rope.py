"""Positions after compression: original (default) and re-indexed inside the cache."""

from __future__ import annotations

import torch

import kvframe
from kvframe.testing import tiny_model
from kvframe.rope import Rotary


def _one_layer(arch="llama"):
    return tiny_model(arch, num_hidden_layers=1)


def _evict_then_continue(model, method, ids):
    """Prefill 40 tokens (StreamingLLM, budget 20: sinks 0-3 + 24-39 kept), then feed 3 more."""
    with kvframe.attach(model, kvframe.build(method, budget=20)) as h:
        cache = h.new_cache()
        model(ids[:, :40], past_key_values=cache)
        got = model(ids[:, 40:], past_key_values=cache).logits
    return got, cache, torch.cat([ids[:, :4], ids[:, 24:43]], 1)


def test_new_tokens_get_original_positions_oracle():
    """One layer: the kept tokens' K/V depend only on their embeddings, so vanilla on the kept
    tokens with their original position ids is an exact oracle."""
    model = _one_layer()
    ids = torch.randint(3, 128, (2, 43), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _, kept = _evict_then_continue(model, "streaming_llm", ids)
        pos = torch.cat([torch.arange(4), torch.arange(24, 43)])[None].expand(2, -1)
        ref = model(kept, position_ids=pos).logits[:, -3:]
    assert (got - ref).abs().max().item() <= 1e-5


def test_generate_after_compression_positions_continue():
    model = _one_layer()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), kvframe.attach(model, kvframe.build("knorm", budget=10)) as h:
        model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        st = h.cache.layers[0].state
    # the 5th generated token is never fed back, so 4 decode steps were cached
    assert st.positions[0, 0, -4:].tolist() == [40, 41, 42, 43]
    assert st.num_slots == 14
    assert h.cache.get_seq_length() == 44


def test_reindex_mode_oracle():
    """Re-index mode equals running vanilla on the kept tokens at positions 0..n-1."""
    model = _one_layer()
    ids = torch.randint(3, 128, (2, 43), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, cache, kept = _evict_then_continue(model, "streaming_llm_reindex", ids)
        assert cache.layers[0].state.positions[0, 0].tolist() == list(range(23))
        ref = model(kept).logits[:, -3:]
    assert (got - ref).abs().max().item() <= 1e-5


def test_reindex_runs_past_the_context_window():
    model = tiny_model("llama", num_hidden_layers=2, max_position_embeddings=64)
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), kvframe.attach(model, kvframe.build("streaming_llm_reindex", budget=16)) as h:
        out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        assert int(h.cache.layers[0].state.positions.max()) < 64
    assert out.shape[1] == 80


def test_rerotation_roundtrip_and_composition():
    model = tiny_model("llama")
    rope = Rotary.from_model(model)
    x = torch.randn(2, 2, 9, 16, dtype=torch.float64)
    p = torch.randint(0, 100, (2, 2, 9))
    q = torch.randint(0, 100, (2, 2, 9))
    back = rope.rotate(rope.unrotate(x, p), p)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(rope.rerotate(rope.rotate(x, p), p, q), rope.rotate(x, q))
    torch.testing.assert_close(rope.rotate(x, p).norm(dim=-1), x.norm(dim=-1))


def test_rerotation_matches_model_rope():
    """Rotating a pre-RoPE key to position p equals the model's own RoPE at p."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model("llama")
    rope = Rotary.from_model(model)
    k = torch.randn(1, 2, 5, 16)
    pos = torch.tensor([[0, 3, 7, 100, 511]])
    cos, sin = model.model.rotary_emb(k, pos)
    _, k_model = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(rope.rotate(k, pos[:, None, :].expand(1, 2, 5)), k_model, atol=1e-5, rtol=1e-5)
