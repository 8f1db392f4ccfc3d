"""kvframe: composable KV-cache compression for Hugging Face causal LMs.

>>> import kvframe
>>> comp = kvframe.build("snapkv", budget=0.25)
>>> with kvframe.attach(model, comp):
...     out = model.generate(**inputs, max_new_tokens=32)
>>> res = kvframe.compress(kvframe.build("knorm", budget=0.5), keys, values)
>>> ctx = kvframe.compress_context(model, comp, context_ids)      # compress once ...
>>> answers = ctx.generate([q1_ids, q2_ids], max_new_tokens=32)    # ... answer many
"""

from kvframe.api import CompressResult, compress
from kvframe.attach import Attachment, attach
from kvframe.cache import SlotCache
from kvframe.compressor import Compressor
from kvframe.config import build, resolve_spec
from kvframe.context import CompressedContext, compress_context
from kvframe.errors import ConfigError, KVFrameError, PluginError, UnknownNameError, UnsupportedModelError
from kvframe.registry import register
from kvframe.slots import SlotState

__version__ = "0.1.0"

__all__ = [
    "Attachment",
    "CompressResult",
    "CompressedContext",
    "Compressor",
    "ConfigError",
    "KVFrameError",
    "PluginError",
    "SlotCache",
    "SlotState",
    "UnknownNameError",
    "UnsupportedModelError",
    "__version__",
    "attach",
    "build",
    "compress",
    "compress_context",
    "register",
    "resolve_spec",
]
