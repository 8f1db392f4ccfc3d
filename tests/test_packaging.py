"""Importing kvframe changes nothing in transformers."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import transformers
from transformers.modeling_utils import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama import modeling_llama
from transformers import cache_utils
def snapshot():
    return (
        dict(AttentionInterface._global_mapping),
        dict(AttentionMaskInterface._global_mapping),
        {k: v for k, v in vars(modeling_llama.LlamaAttention).items()},
        {k: v for k, v in vars(modeling_llama.LlamaForCausalLM).items()},
        {k: v for k, v in vars(cache_utils.DynamicCache).items()},
        {k: getattr(cache_utils, k) for k in dir(cache_utils)},
    )
before = snapshot()
import kvframe, kvframe.cli, kvframe.eval.runner
kvframe.build("snapkv")
after = snapshot()
assert before == after, "importing kvframe changed transformers"
print("clean")
"""


def test_import_changes_nothing():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
