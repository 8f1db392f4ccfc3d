"""Inside attach, a compressor that drops nothing must reproduce vanilla transformers exactly."""

from __future__ import annotations

import pytest
import torch

import kvframe
from kvframe.testing import tiny_model
from tests.conftest import ARCHS, left_padded

ATOL = 1e-5


def _generate(model, ids, mask, n=8):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["full", "snapkv", "knorm", "streaming_llm"])
def test_identity_tiny_batch3_left_padding(arch, method):
    model = tiny_model(arch)
    ids, mask = left_padded(3, 40, [0, 5, 17])
    overrides = {"budget": 1.0}
    if method == "snapkv":
        overrides["scorer.window"] = 8
    with torch.no_grad():
        ref_logits = model(ids, attention_mask=mask).logits
        ref_gen = _generate(model, ids, mask)
        comp = kvframe.build(method, **overrides)
        with kvframe.attach(model, comp):
            logits = model(ids, attention_mask=mask).logits
            gen = _generate(model, ids, mask)
    real = mask.bool()
    assert (logits - ref_logits)[real].abs().max().item() <= ATOL
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_forward_with_past_key_values(arch):
    """Plain forward with past_key_values, chunk by chunk, equals vanilla (full cache)."""
    model = tiny_model(arch)
    ids, _ = left_padded(2, 48, [0, 0], seed=1)
    with torch.no_grad():
        ref = model(ids).logits
        with kvframe.attach(model, kvframe.build("full")) as h:
            cache = h.new_cache()
            parts = [model(ids[:, s:e], past_key_values=cache).logits for s, e in ((0, 20), (20, 21), (21, 48))]
    got = torch.cat(parts, dim=1)
    assert (got - ref).abs().max().item() <= ATOL


def test_full_budget_snapkv_after_compression_trigger_is_identity_on_tiny_llama():
    """Budget = every token: the compression pass runs and keeps all, decoding is unchanged."""
    model = tiny_model("llama")
    ids, mask = left_padded(1, 64, [0], seed=2)
    with torch.no_grad():
        ref = _generate(model, ids, mask, n=12)
        with kvframe.attach(model, kvframe.build("snapkv", budget=64, **{"scorer.window": 8})) as h:
            got = _generate(model, ids, mask, n=12)
            assert h.cache.layers[0].compressions == 1
    assert torch.equal(got, ref)


@pytest.mark.slow
def test_identity_smollm2(smollm2):
    model, tok = smollm2
    texts = ["The capital of France is", "Count: one, two, three, four,", "Hi"]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref_logits = model(**enc).logits
        ref_gen = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        with kvframe.attach(model, kvframe.build("snapkv", budget=1.0, **{"scorer.window": 4})):
            logits = model(**enc).logits
            gen = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    real = enc.attention_mask.bool()
    assert (logits - ref_logits)[real].abs().max().item() <= ATOL
    assert torch.equal(gen, ref_gen)


def test_attach_restores_model_exactly():
    model = tiny_model("llama")
    before_impl = model.config._attn_implementation
    before_dict = set(model.__dict__)
    with kvframe.attach(model, kvframe.build("knorm")):
        assert model.config._attn_implementation == "kvframe"
    assert model.config._attn_implementation == before_impl
    assert set(model.__dict__) == before_dict
    from transformers.modeling_utils import AttentionInterface

    assert "kvframe" not in AttentionInterface._global_mapping


def test_attach_restores_on_exception():
    model = tiny_model("qwen2")
    with pytest.raises(RuntimeError, match="boom"):
        with kvframe.attach(model, kvframe.build("knorm")):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in model.__dict__


def test_attach_and_slot_cache_refuse_the_same_layer_types():
    """One layer-type check serves attaching and building a cache: same refusal, same message."""
    from kvframe.errors import UnsupportedModelError

    model = tiny_model("llama")
    model.config.layer_types = ["full_attention", "linear_attention"]
    comp = kvframe.build("knorm")
    with pytest.raises(UnsupportedModelError) as attached, kvframe.attach(model, comp):
        pass
    with pytest.raises(UnsupportedModelError) as cached:
        kvframe.SlotCache.for_model(model, comp)
    assert str(attached.value) == str(cached.value)
    assert "layer types ['linear_attention']" in str(cached.value)


def test_cache_argument_reads_the_model_or_a_wrapper_of_its_forward():
    import functools

    from kvframe.attach import cache_argument

    model = tiny_model("llama")
    name = cache_argument(model)
    assert name in ("cache", "past_key_values")

    @functools.wraps(model.forward)
    def wrapped(*args, **kwargs):  # pragma: no cover - never called
        return model.forward(*args, **kwargs)

    assert cache_argument(model, wrapped) == name

    def legacy(input_ids=None, past_key_values=None):  # pragma: no cover - never called
        return None

    assert cache_argument(model, legacy) == "past_key_values"


def _tiny_bert(cls_name: str, **overrides):
    import transformers

    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **overrides
    )
    return getattr(transformers, cls_name)(config).eval()


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForMaskedLM"])
def test_attach_refuses_bidirectional_models(cls_name):
    """An encoder / masked LM used to attach and silently get causal attention."""
    model = _tiny_bert(cls_name)
    with pytest.raises(
        kvframe.UnsupportedModelError,
        match=rf"{cls_name} is not a causal decoder: its attention modules \(BertSelfAttention\) have is_causal=False"
        r".*supports decoder-only causal LMs",
    ):
        with kvframe.attach(model, kvframe.build("knorm")):
            pass
    assert model.config._attn_implementation != "kvframe" and "forward" not in model.__dict__


def test_attach_refuses_a_model_that_does_not_declare_causal_attention():
    model = tiny_model("llama")
    for module in model.modules():
        if hasattr(module, "is_causal"):
            del module.is_causal
    with pytest.raises(kvframe.UnsupportedModelError, match="LlamaForCausalLM has no self-attention modules that declare is_causal"):
        with kvframe.attach(model, kvframe.build("knorm")):
            pass


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_check_accepts_every_tiny_arch(arch):
    from kvframe.attach import check_model

    check_model(tiny_model(arch))


def test_causal_check_ignores_config_is_decoder():
    """GPT-NeoX is a causal LM whose config says ``is_decoder=False``: the check reads the attention
    modules' ``is_causal``, not the config flag, so it attaches (and a full budget is the identity)."""
    import transformers

    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    assert config.is_decoder is False
    model = transformers.GPTNeoXForCausalLM(config).eval()
    ids = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _generate(model, ids, torch.ones_like(ids), n=4)
        with kvframe.attach(model, kvframe.build("full")):
            got = _generate(model, ids, torch.ones_like(ids), n=4)
    assert torch.equal(got, ref)
