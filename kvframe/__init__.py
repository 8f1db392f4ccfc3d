"""kvframe: composable KV-cache compression for Hugging Face causal LMs.

>>> import kvframe
>>> comp = kvframe.build("snapkv", budget=0.25)
>>> with kvframe.attach(model, comp):
...     out = model.generate(**inputs, max_new_tokens=32)
>>> res = kvframe.compress(kvframe.build("knorm", budget=0.5), keys, values)
"""

from kvframe.api import CompressResult, compress
from kvframe.attach import Attachment, attach
from kvframe.cache import SlotCache
from kvframe.compressor import Compressor
from kvframe.config import build, resolve_spec
from kvframe.errors import ConfigError, KVFrameError, PluginError, UnknownNameError, UnsupportedModelError
from kvframe.registry import register
from kvframe.slots import SlotState

__version__ = "0.1.0"

__all__ = [
    "Attachment",
    "CompressResult",
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
    "register",
    "resolve_spec",
]
