"""Helpers for testing kvframe and its plugins without any download.

:func:`tiny_model` builds tiny randomly initialised causal LMs of every architecture kvframe is
tested on (Llama, Qwen2, Mistral, Gemma3 with sliding-window layers). They need only torch and
transformers, so a plugin's tests can attach a compressor to a real ``transformers`` model offline.
"""

from __future__ import annotations

from typing import Any

import torch

from kvframe.errors import unknown_name

__all__ = ["TINY_ARCHS", "tiny_model"]

# ---------------------------------------------------------------------------

_TINY_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def _llama_config(overrides: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**{**_TINY_COMMON, "head_dim": 16, **overrides})


def _qwen2_config(overrides: dict[str, Any]) -> Any:
    from transformers import Qwen2Config

    # Qwen2 has no head_dim field: hidden_size / num_attention_heads = 16.
    return Qwen2Config(**{**_TINY_COMMON, **overrides})


def _mistral_config(overrides: dict[str, Any]) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**{**_TINY_COMMON, "head_dim": 16, "sliding_window": None, **overrides})


def _gemma3_config(overrides: dict[str, Any]) -> Any:
    from transformers import Gemma3TextConfig

    params = {
        **_TINY_COMMON,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 16,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        **overrides,
    }
    if "layer_types" not in params:
        # Alternate local (sliding-window) and global layers, ending on global
        # when the depth is even: [sliding, full, sliding, full, ...].
        params["layer_types"] = [
            "full_attention" if i % 2 else "sliding_attention" for i in range(params["num_hidden_layers"])
        ]
    return Gemma3TextConfig(**params)


_TINY_BUILDERS = {
    "llama": _llama_config,
    "qwen2": _qwen2_config,
    "mistral": _mistral_config,
    "gemma3": _gemma3_config,
}

#: Architectures accepted by :func:`tiny_model`.
TINY_ARCHS: tuple[str, ...] = tuple(_TINY_BUILDERS)


def tiny_model(arch: str, seed: int = 0, **config_overrides: Any) -> Any:
    """Build a tiny randomly initialised causal LM (no download) for tests.

    Defaults: ``vocab_size=128, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=512``.  ``"gemma3"`` builds a
    text-only :class:`~transformers.Gemma3ForCausalLM` with
    ``sliding_window=16`` and ``layer_types`` alternating
    ``"sliding_attention"`` / ``"full_attention"``.  ``"mistral"`` has
    ``sliding_window=None`` unless overridden.

    Parameters
    ----------
    arch
        One of :data:`TINY_ARCHS` (``"llama"``, ``"qwen2"``, ``"mistral"``,
        ``"gemma3"``).
    seed
        Seed for the weight initialisation; the global torch RNG state is
        left untouched.
    **config_overrides
        Extra config fields overriding the defaults.

    Returns
    -------
    transformers.PreTrainedModel
        An fp32 model on CPU in eval mode using the ``"sdpa"`` attention.

    Raises
    ------
    kvframe.errors.UnknownNameError
        (a ``ValueError``) if ``arch`` is not supported.
    """
    from transformers import AutoModelForCausalLM

    key = arch.lower() if isinstance(arch, str) else arch
    if key not in _TINY_BUILDERS:
        raise unknown_name("tiny model arch", str(arch), TINY_ARCHS)
    config = _TINY_BUILDERS[key](config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()
