"""What a run directory holds, and how results are trusted: cell fingerprints, resume, aggregation,
the ``results.json`` schema and the Markdown table.

Every finished sample is one line of ``predictions.jsonl`` carrying the **fingerprint** of its
cell: a sha256 over everything that determines the sample's result (:func:`cell_identity`: the
model's weights, dtype and device type, the task's parameters and the hash of its generated
samples, the decoding settings, the resolved compressor including its budget, and the seed). The
identities themselves are kept in ``cells.json`` beside it. Re-running into a run directory reuses a
finished sample only when its cell's fingerprint is identical; a cell whose earlier samples were
computed under another configuration is a :class:`~kvframe.errors.ConfigError` that says what
differs (:func:`resume_state`), so numbers computed under one config are never reported under
another.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvframe.errors import ConfigError
from kvframe.eval.config import MODES, STREAM_MODE, flatten

#: every record in results.json has these keys (see docs/evaluation.md for their meaning)
RESULT_FIELDS = (
    "method", "budget", "task", "mode", "status", "error", "metric", "value", "samples", "prompt_tokens", "prefill_s",
    "compression_s", "decode_s", "peak_memory_bytes", "cache_bytes", "cache_kv_bytes", "cache_content_slots",
    "compressor", "task_config", "content_hash", "fingerprint", "model", "extra", "config", "versions", "git_commit",
    "seed", "machine",
)
STATUSES = ("ok", "failed")
#: the ``mode`` of a record: a decoding mode, or ``stream`` for tasks that do not decode
RECORD_MODES = (*MODES, STREAM_MODE)

CellKey = tuple[str, str, str, str]  # (method label, str(budget), task label, mode)


def cell_key(method: str, budget: Any, task: str, mode: str) -> CellKey:
    return (method, str(budget), task, mode)


def describe_cell(key: CellKey) -> str:
    """``method / budget 0.5 / task / mode`` (``full`` for a method that never compresses)."""
    method, budget, task, mode = key
    return f"{method} / {'full' if budget == 'None' else f'budget {budget}'} / {task} / {mode}"


def identity_mode(identity: Mapping[str, Any] | None) -> str | None:
    """The mode a cell identity was computed under (``stream`` for streaming perplexity), if known."""
    decoding = identity.get("decoding") if isinstance(identity, Mapping) else None
    if not isinstance(decoding, Mapping):
        return None
    if "mode" in decoding:
        return str(decoding["mode"])
    return STREAM_MODE if decoding.get("protocol") == "streaming perplexity" else None


def cell_identity(
    *,
    model: Mapping[str, Any],
    dtype: str,
    device: str,
    task_name: str,
    task_config: Mapping[str, Any],
    content_hash: str,
    task_kind: str,
    mode: str,
    max_new_tokens: int,
    compressor: Mapping[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Everything that determines the result of one cell's samples (see module docstring).

    Generation tasks depend on the decoding settings (mode, greedy decoding of ``max_new_tokens``
    tokens, or a task's own per-sample length, which is in its samples); streaming perplexity does
    not, so changing ``max_new_tokens`` never invalidates perplexity cells. ``device`` is the device
    type (``cpu``, ``cuda``): results may differ between devices within float tolerance.
    """
    decoding: dict[str, Any]
    if task_kind == "perplexity":
        decoding = {"protocol": "streaming perplexity"}
    else:
        decoding = {"mode": mode, "max_new_tokens": int(max_new_tokens), "greedy": True}
    return {
        "model": dict(model),
        "dtype": str(dtype),
        "device": str(device),
        "task": {"name": task_name, "config": dict(task_config), "content_hash": content_hash},
        "decoding": decoding,
        "compressor": dict(compressor),
        "seed": int(seed),
    }


def fingerprint(identity: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a cell identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Every complete record of ``predictions.jsonl`` (a line cut by an interruption is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # that sample runs again
    return out


def drop_partial_line(path: Path) -> None:
    """Remove a last line cut short by an interruption, so appended records stay one per line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def read_identities(path: Path) -> dict[str, Any]:
    """``cells.json``: fingerprint -> identity of every cell ever planned in the run directory."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_identities(path: Path, identities: Mapping[str, Any]) -> None:
    """Add ``identities`` to ``cells.json`` (written to a temporary file, then renamed)."""
    merged = {**read_identities(path), **identities}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def describe_difference(old: Mapping[str, Any] | None, new: Mapping[str, Any], limit: int = 6) -> str:
    """``key: old -> new`` for the settings that differ between two cell identities."""
    if old is None:
        return "its samples carry no configuration fingerprint (written by an older kvframe, or edited by hand)"
    fo, fn = flatten(old), flatten(new)
    diffs = []
    for k in sorted(set(fo) | set(fn)):
        a, b = fo.get(k, "<unset>"), fn.get(k, "<unset>")
        if a != b:
            short = lambda v: v[:12] + "..." if isinstance(v, str) and len(v) == 64 else v  # noqa: E731  (hashes)
            diffs.append(f"{k}: {short(a)!r} -> {short(b)!r}")
    if not diffs:
        return "its fingerprint differs (unknown settings)"
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


@dataclass
class ResumeState:
    """Finished samples per planned cell whose fingerprint matches the current configuration."""

    done: dict[CellKey, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def done_ids(self, key: CellKey) -> set[str]:
        return set(self.done.get(key, {}))

    def rows(self, key: CellKey, sample_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The finished records of a cell, in sample order (each sample once)."""
        got = self.done.get(key, {})
        return [got[s] for s in sample_ids if s in got]


def resume_state(
    records: list[dict[str, Any]],
    planned: Mapping[CellKey, str],
    identities: Mapping[str, Any],
    run_dir: Path,
) -> ResumeState:
    """Sort the run directory's records into reusable ones, or fail on a changed configuration.

    ``planned`` maps each cell of this run to its fingerprint; ``identities`` are the ones stored in
    ``cells.json`` (old and new). A record of a planned cell with another fingerprint means the cell
    was run before under a different configuration: :class:`~kvframe.errors.ConfigError`, saying
    what differs. Records of cells not planned now are left alone (not reported).

    A record without ``mode`` was written before ``mode`` became a grid dimension, by a run of one
    mode: it belongs to the planned cell of its method, budget and task whose fingerprint it
    carries (the fingerprint covers the mode), else to the mode its fingerprint's identity in
    ``cells.json`` names; when neither says, it conflicts with every planned mode of its cell.
    """
    state = ResumeState()
    conflicts: dict[CellKey, str | None] = {}
    modes_of: dict[tuple[str, str, str], list[CellKey]] = {}
    for key in planned:
        modes_of.setdefault(key[:3], []).append(key)
    for rec in records:
        base = (rec.get("method"), str(rec.get("budget")), rec.get("task"))
        fp = rec.get("fingerprint")
        mode = rec.get("mode")
        if mode is None and fp:
            mode = next((k[3] for k in modes_of.get(base, []) if planned[k] == fp), None) or identity_mode(identities.get(fp))
        for key in [(*base, mode)] if mode is not None else modes_of.get(base, []):
            if key not in planned:
                continue
            if fp != planned[key]:
                conflicts.setdefault(key, fp)
                continue
            state.done.setdefault(key, {}).setdefault(rec["sample_id"], rec)
    if conflicts:
        lines = []
        for key, old in list(conflicts.items())[:3]:
            if old and old not in identities:
                what = f"its samples carry fingerprint {old[:12]}..., a configuration cells.json does not describe"
            else:
                what = describe_difference(identities.get(old) if old else None, identities[planned[key]])
            lines.append(f"  {describe_cell(key)}: {what}")
        more = f"\n  ... and {len(conflicts) - 3} more cells" if len(conflicts) > 3 else ""
        raise ConfigError(
            f"run directory {run_dir} already holds samples computed under another configuration; reusing them "
            f"would report numbers this configuration never produced. What differs:\n" + "\n".join(lines) + more
            + f"\nStart a new run directory (run_name=...) or delete {run_dir} to run these cells again."
        )
    return state


# ------------------------------------------------------------------------------------------
def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import lightning
    import transformers

    import kvframe

    return {"kvframe": kvframe.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "python": platform.python_version()}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else 0.0


def summarize(task: Any, rows: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    """A cell's value and extras from its finished sample records."""
    extra: dict[str, Any] = {}
    if task.kind == "perplexity":
        from kvframe.eval.tasks.perplexity import bucket_perplexity

        nll = [x for r in rows for x in r["nll"]]
        extra["tokens"] = len(nll)
        # positions counted from the first scored token; streams of a task are equally long
        buckets, _ = bucket_perplexity([r["nll"] for r in rows], int(getattr(task, "buckets", 8)))
        extra["bucket_perplexity"] = [{"start": a, "end": b, "perplexity": p} for a, b, p in buckets]
        return math.exp(sum(nll) / max(len(nll), 1)), extra
    subtasks = sorted({r["meta"].get("task") for r in rows if isinstance(r.get("meta"), dict) and r["meta"].get("task")})
    if subtasks:
        extra["per_subtask"] = {t: _mean([r for r in rows if r["meta"].get("task") == t], "score") for t in subtasks}
    return _mean(rows, "score"), extra


def record(
    *,
    method: str,
    budget: Any,
    task: str,
    mode: str,
    metric: str,
    rows: list[dict[str, Any]],
    value: float | None,
    extra: dict[str, Any],
    identity: Mapping[str, Any],
    fp: str,
    meta: Mapping[str, Any],
    error: str | None = None,
) -> dict[str, Any]:
    """One ``results.json`` record (``status`` ``failed`` with the error when the cell did not finish)."""
    return {
        "method": method, "budget": budget, "task": task, "mode": mode, "status": "failed" if error else "ok", "error": error,
        "metric": metric, "value": value, "samples": len(rows), "prompt_tokens": _mean(rows, "prompt_tokens"),
        "prefill_s": _mean(rows, "prefill_s"), "compression_s": _mean(rows, "compression_s"),
        "decode_s": _mean(rows, "decode_s"), "peak_memory_bytes": _mean(rows, "peak_memory_bytes"),
        "cache_bytes": _mean(rows, "cache_bytes"), "cache_kv_bytes": _mean(rows, "cache_kv_bytes"),
        "cache_content_slots": _mean(rows, "cache_content_slots"), "compressor": identity["compressor"],
        "task_config": identity["task"]["config"], "content_hash": identity["task"]["content_hash"], "fingerprint": fp,
        "model": identity["model"], "extra": extra, **meta,
    }


def add_bucket_ratios(records: list[dict[str, Any]]) -> None:
    """Per-position-bucket perplexity relative to the uncompressed cell of the same task."""
    for r in records:
        b = r["extra"].get("bucket_perplexity")
        ref = next((x for x in records if x["task"] == r["task"] and x.get("mode") == r.get("mode") and x["budget"] is None
                    and x["extra"].get("bucket_perplexity")), None)
        if b and ref is not None:
            r["extra"]["bucket_ratio_to_full"] = [
                x["perplexity"] / y["perplexity"] if y["perplexity"] else float("nan") for x, y in zip(b, ref["extra"]["bucket_perplexity"])
            ]


def validate_results(records: list[Mapping[str, Any]]) -> None:
    """Check records against the documented schema (keys and types); raises ValueError."""
    for i, r in enumerate(records):
        missing = [k for k in RESULT_FIELDS if k not in r]
        if missing:
            raise ValueError(f"record {i}: missing keys {missing}")
        if not isinstance(r["method"], str) or not isinstance(r["task"], str) or not isinstance(r["metric"], str):
            raise ValueError(f"record {i}: method, task and metric must be strings")
        if r["mode"] not in RECORD_MODES:
            raise ValueError(f"record {i}: mode={r['mode']!r}; accepted: {', '.join(RECORD_MODES)}")
        if r["status"] not in STATUSES:
            raise ValueError(f"record {i}: status must be one of {STATUSES}")
        if r["budget"] is not None and not isinstance(r["budget"], (int, float)):
            raise ValueError(f"record {i}: budget must be a number or null")
        if r["status"] == "ok":
            if not isinstance(r["value"], (int, float)) or not isinstance(r["samples"], int) or r["samples"] < 1:
                raise ValueError(f"record {i}: value must be a number and samples an integer >= 1")
        elif not (isinstance(r["error"], str) and r["error"]) or not isinstance(r["samples"], int) or r["samples"] < 0:
            raise ValueError(f"record {i}: a failed record needs its error and samples an integer >= 0")
        if not (isinstance(r["content_hash"], str) and len(r["content_hash"]) == 64):
            raise ValueError(f"record {i}: content_hash must be a sha256 hex digest")
        if not (isinstance(r["fingerprint"], str) and len(r["fingerprint"]) == 64):
            raise ValueError(f"record {i}: fingerprint must be a sha256 hex digest")
        for k in ("prefill_s", "compression_s", "decode_s", "cache_kv_bytes", "cache_bytes"):
            if not isinstance(r[k], (int, float)) or r[k] < 0:
                raise ValueError(f"record {i}: {k} must be a number >= 0")


def format_table(records: list[Mapping[str, Any]]) -> str:
    """A Markdown results table (failed cells show their error)."""
    lines = [
        "| method | budget | task | mode | metric | value | n | KV MiB | prefill s | compress s | decode s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        b = r["budget"] if r["budget"] is not None else "—"
        cell = f"| {r['method']} | {b} | {r['task']} | {r['mode']} | {r['metric']} |"
        if r.get("status", "ok") != "ok":
            err = (str(r.get("error") or "").splitlines() or [""])[0][:100]
            lines.append(f"{cell} FAILED: {err} | {r['samples']} | | | | | |")
            continue
        lines.append(
            f"{cell} {r['value']:.3f} | {r['samples']} | "
            f"{r['cache_kv_bytes'] / 2**20:.2f} | {r['prefill_s']:.2f} | {r['compression_s']:.3f} | {r['decode_s']:.2f} | "
            f"{r.get('peak_memory_bytes', 0) / 2**20:.0f} |"
        )
    return "\n".join(lines)
