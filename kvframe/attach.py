"""Attach a compressor to a Hugging Face causal LM, inside a ``with`` block.

Integration goes only through transformers' public extension points:

- the attention-function and mask-function registries (``AttentionInterface`` /
  ``AttentionMaskInterface``): kvframe registers ``"kvframe"`` while at least one model is attached
  and removes it when the last one detaches, then sets the model's attention implementation with
  ``set_attn_implementation`` and restores the original on exit;
- the Cache API: a :class:`~kvframe.cache.SlotCache` is handed to the model as ``past_key_values``.
  So that ``model.generate(...)`` and ``model(...)`` need no extra argument, the *instance's*
  ``forward`` is wrapped for the duration of the block (nothing at class or module level) to supply
  a fresh ``SlotCache`` whenever the call carries no cache or the empty default cache
  ``generate`` creates. Leaving the block removes the wrapper, so the model is exactly as before.

Importing kvframe changes nothing in transformers. Unsupported models fail loudly at attach time
(or at the first forward if a model bypasses the attention registry), never silently.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from kvframe.attention import ATTENTION_NAME, kvframe_attention, kvframe_mask
from kvframe.cache import SlotCache, layer_types
from kvframe.chunked import chunked_forward, num_tokens
from kvframe.compressor import Compressor
from kvframe.errors import ConfigError, UnsupportedModelError

_lock = threading.Lock()
_registrations = 0
_ATTACHED = "_kvframe_attachment"


def _register() -> None:
    global _registrations
    with _lock:
        if _registrations == 0:
            AttentionInterface.register(ATTENTION_NAME, kvframe_attention)
            AttentionMaskInterface.register(ATTENTION_NAME, kvframe_mask)
        _registrations += 1


def _unregister() -> None:
    global _registrations
    with _lock:
        _registrations -= 1
        if _registrations == 0:
            # transformers has no public "unregister"; remove exactly what _register added
            AttentionInterface._global_mapping.pop(ATTENTION_NAME, None)
            AttentionMaskInterface._global_mapping.pop(ATTENTION_NAME, None)


@dataclass
class Attachment:
    """Handle yielded by :func:`attach`. ``cache`` is the most recent :class:`SlotCache` used."""

    model: Any
    compressor: Compressor
    caches: list[SlotCache] = field(default_factory=list)

    @property
    def cache(self) -> SlotCache | None:
        return self.caches[-1] if self.caches else None

    def new_cache(self) -> SlotCache:
        """A fresh cache for this model and compressor (for explicit ``past_key_values=``)."""
        cache = SlotCache.for_model(self.model, self.compressor)
        self.caches[:] = [cache]
        return cache


def cache_argument(model: Any, forward: Callable[..., Any] | None = None) -> str:
    """The name under which ``model``'s forward (or ``forward``, a wrapper of it) takes its cache:
    ``cache`` from transformers 5.24 (``past_key_values`` is then a deprecated alias), else
    ``past_key_values``."""
    params = inspect.signature(forward if forward is not None else type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def check_model(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` unless kvframe can drive ``model``'s attention and cache."""
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(
            f"kvframe.attach needs a transformers PreTrainedModel (a causal LM); got {type(model).__name__}"
        )
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model; kvframe supports decoder-only causal LMs")
    _check_causal(model)
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise UnsupportedModelError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            "so kvframe cannot attach to it"
        )
    layer_types(model)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError(f"{type(model).__name__} uses attention logit soft-capping, which kvframe does not support")


def _check_causal(model: Any) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model``'s self-attention is causal-decoder attention.

    kvframe's attention function always masks causally (by slot position), so a bidirectional model
    (an encoder such as ``BertModel``, a masked LM such as ``BertForMaskedLM``) would silently get
    causal attention. The check reads what transformers itself reads when it picks the mask: the
    ``is_causal`` attribute of the self-attention modules (the modules that carry both ``is_causal``
    and the ``layer_idx`` of their cache layer; the SDPA and flash integrations read
    ``module.is_causal``). Every such module must have ``is_causal=True``, and there must be at
    least one. Two other signals are not used because they are wrong for supported models in
    transformers 5.x: ``config.is_decoder`` no longer exists on most decoder configs (Llama, Qwen2,
    Mistral, Gemma3) and is ``False`` on GPT-NeoX, a causal LM; the model class name says nothing
    about custom or remote-code models. Vision towers of multimodal models have no ``layer_idx``
    and are not counted.
    """
    name = type(model).__name__
    supported = "kvframe.attach supports decoder-only causal LMs (e.g. LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Gemma3ForCausalLM)"
    attn = [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "layer_idx")]
    if not attn:
        raise UnsupportedModelError(
            f"{name} has no self-attention modules that declare is_causal and layer_idx (as transformers' attention "
            f"modules do), so kvframe cannot tell whether its attention is causal; {supported}"
        )
    bidirectional = sorted({type(m).__name__ for m in attn if m.is_causal is not True})
    if bidirectional:
        raise UnsupportedModelError(
            f"{name} is not a causal decoder: its attention modules ({', '.join(bidirectional)}) have is_causal=False "
            f"(bidirectional attention, as in encoders and masked LMs), and kvframe's attention is always causal; {supported}"
        )


def _attention_modules(model: Any) -> list[Any]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and hasattr(m, "o_proj")]


@contextmanager
def attach(model: Any, compressor: Compressor) -> Iterator[Attachment]:
    """Compress ``model``'s KV cache with ``compressor`` inside the ``with`` block.

    >>> comp = kvframe.build("snapkv", budget=0.25)
    >>> with kvframe.attach(model, comp):
    ...     out = model.generate(**inputs, max_new_tokens=32)
    """
    if not isinstance(compressor, Compressor):
        raise ConfigError(f"attach needs a kvframe Compressor (see kvframe.build); got {type(compressor).__name__}")
    check_model(model)
    if getattr(model, _ATTACHED, None) is not None:
        raise ConfigError("this model is already attached to a kvframe compressor; leave that block first")
    if compressor.needs_rope:
        from kvframe.rope import Rotary

        Rotary.from_model(model)  # fail now, not mid-generation
    handle = Attachment(model, compressor)
    original_impl = model.config._attn_implementation
    had_instance_forward = "forward" in model.__dict__
    previous_forward = model.__dict__.get("forward")
    _register()
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        stale = [type(m).__name__ for m in _attention_modules(model) if m.config._attn_implementation != ATTENTION_NAME]
        if model.config._attn_implementation != ATTENTION_NAME or stale:
            raise UnsupportedModelError(
                f"{type(model).__name__} did not switch to kvframe's attention function (set_attn_implementation "
                f"left {model.config._attn_implementation!r}{'; modules ' + str(sorted(set(stale))) if stale else ''})"
            )
        model.forward = _wrap_forward(model, handle)
        object.__setattr__(model, _ATTACHED, handle)
        yield handle
    finally:
        if had_instance_forward:
            model.forward = previous_forward
        else:
            model.__dict__.pop("forward", None)
        model.__dict__.pop(_ATTACHED, None)
        try:
            if model.config._attn_implementation != original_impl:
                model.set_attn_implementation(original_impl)
        finally:
            _unregister()


def _wrap_forward(model: Any, handle: Attachment) -> Any:
    original = model.forward  # bound method (class forward, or a previous instance wrapper)
    sig = inspect.signature(original)
    cache_arg = cache_argument(model, original)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    accepts_keep = "logits_to_keep" in sig.parameters

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        for alias in ("past_key_values", "cache"):
            if alias != cache_arg and alias in kwargs and cache_arg not in kwargs:
                kwargs[cache_arg] = kwargs.pop(alias)
        bound = sig.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        extra = arguments.get(var_kw, {}) if var_kw else {}
        for alias in ("past_key_values", "cache"):
            if alias != cache_arg and alias in extra:
                arguments[cache_arg] = extra.pop(alias)
        pkv = arguments.get(cache_arg)
        use_cache = arguments.get("use_cache")
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", True)
        if isinstance(pkv, SlotCache):
            pass  # an explicit SlotCache is used as given, with its own compressor
        elif use_cache and (pkv is None or (isinstance(pkv, Cache) and pkv.get_seq_length() == 0)):
            arguments[cache_arg] = handle.new_cache()
        elif pkv is not None:
            raise UnsupportedModelError(
                f"inside kvframe.attach the model got a non-empty {type(pkv).__name__}; kvframe can only continue "
                "its own SlotCache (pass no past_key_values, or the cache from a previous call inside the block)"
            )
        cache = arguments.get(cache_arg)
        chunk = getattr(cache, "compressor", None) and cache.compressor.trigger.chunk_size
        kwargs = {k: v for k, v in arguments.items() if k != var_kw}
        kwargs.update(extra)
        n_new = num_tokens(kwargs)
        scoring = chunk and cache.compressor.trigger.scoring_pass != "none" and cache.get_seq_length() > 0 and n_new > 1
        if chunk and (n_new > chunk or scoring):
            out = chunked_forward(original, kwargs, cache, cache_arg, accepts_keep)
        else:
            out = original(*bound.args, **bound.kwargs)
        if isinstance(cache, SlotCache):
            pending = [i for i, layer in enumerate(cache.layers) if layer.pending]
            if pending:
                raise UnsupportedModelError(
                    f"layers {pending} of {type(model).__name__} updated the cache but never called kvframe's "
                    "attention function; this model does not support kvframe"
                )
        return out

    return forward
