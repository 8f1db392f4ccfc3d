"""Packaging: importing kvframe changes nothing in transformers, and the library works with only
torch + transformers + omegaconf installed (the evaluation system is the ``[eval]`` extra)."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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


#: distributions of the [eval], [lm-eval] and [triton] extras, absent from a library-only install
EXTRAS = {"lightning", "pytorch-lightning", "lightning-fabric", "torchmetrics", "lightning-utilities", "wandb",
          "matplotlib", "datasets", "gguf", "accelerate", "triton", "rapidfuzz", "rouge-score", "rouge", "lm-eval"}

LIBRARY = """
import sys, torch, kvframe
from kvframe import registry
from kvframe.testing import tiny_model
for name in ("lightning", "wandb", "matplotlib", "datasets", "gguf", "accelerate", "triton", "rapidfuzz", "rouge_score",
             "rouge", "lm_eval"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable: the guard failed")
model = tiny_model("llama")
ids = torch.randint(3, 100, (2, 40))
for name, _, _ in registry.list_methods():
    kvframe.build(name)
with torch.no_grad(), kvframe.attach(model, kvframe.build("snapkv", budget=0.5, **{"scorer.window": 8})) as h:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
assert out.shape == (2, 43) and h.cache.memory().content_slots == 2 * 2 * 2 * (20 + 2)
res = kvframe.compress(kvframe.build("knorm", budget=0.5), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
assert res.kept_per_head.tolist() == [[4, 4]]
from kvframe.cli import main
assert main(["list"]) == 0 and main(["show", "balancekv"]) == 0
assert main(["eval"]) == 2
assert main(["lm-eval", "--model", "kvframe", "--tasks", "x"]) == 2
print("library ok")
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _library_only_path(tmp: Path) -> Path:
    """A folder of links to every installed package except the extras' (code and metadata), so a
    ``python -S`` sees an environment where they were never installed."""
    blocked: set[str] = set()
    for dist in md.distributions():
        if _norm(dist.metadata["Name"]) in EXTRAS:
            blocked |= {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__")}
    site = Path(md.distribution("torch").locate_file(""))
    shadow = tmp / "site"
    shadow.mkdir()
    for entry in site.iterdir():
        if entry.name not in blocked and not entry.name.endswith(".pth"):
            (shadow / entry.name).symlink_to(entry)
    return shadow


def test_library_works_without_the_eval_extra(tmp_path):
    shadow = _library_only_path(tmp_path)
    env = {"PYTHONPATH": f"{ROOT}:{shadow}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-S", "-c", LIBRARY], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.strip().endswith("library ok")
    assert "pip install 'kvframe[eval]'" in out.stderr  # kvframe eval says what to install
    assert 'pip install "kvframe[lm-eval]"' in out.stderr  # and kvframe lm-eval


def test_library_imports_no_eval_module():
    # (transformers itself imports accelerate when it is installed; the test above runs without it)
    code = (
        "import sys, torch, kvframe; kvframe.build('snapkv'); "
        "from kvframe.testing import tiny_model; m = tiny_model('llama'); "
        "kvframe.compress(kvframe.build('knorm'), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)); "
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'wandb', 'matplotlib', 'datasets', 'gguf', 'rapidfuzz', 'rouge_score', "
        "'rouge') or n.startswith('kvframe.eval')); "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
