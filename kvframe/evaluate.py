"""A first evaluation runner: prefill -> compress -> question -> greedy decode -> score.

Configured by YAML (omegaconf); everything a method needs comes from its composition, the runner
never looks at a method's name. Predictions are appended to ``predictions.jsonl`` as each sample
finishes, so an interrupted run loses no finished result, and re-running into the same run
directory skips the samples already there.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvframe.attach import attach, cache_argument
from kvframe.compressor import Compressor
from kvframe.config import build, load_yaml
from kvframe.errors import ConfigError, close_matches, unknown_name
from kvframe.policies.budgets import check_budget

TASKS = ("passkey",)
MODES = ("query_agnostic", "query_aware")


@dataclass
class TaskConfig:
    name: str = "passkey"
    n_samples: int = 4
    length: int = 1536


@dataclass
class EvalConfig:
    """Evaluation settings (all overridable as ``key=value`` on the command line)."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    tasks: list[TaskConfig] = field(default_factory=lambda: [TaskConfig()])
    methods: list[Any] = field(default_factory=lambda: ["full", "streaming_llm", "snapkv"])
    budgets: list[Any] = field(default_factory=lambda: [0.5, 0.25])
    max_new_tokens: int = 12
    mode: str = "query_agnostic"
    output_dir: str = "runs"
    run_name: str | None = None
    threads: int | None = None


def default_config_path() -> Path:
    return Path(__file__).resolve().parent / "configs" / "eval_default.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    schema = OmegaConf.structured(EvalConfig)
    parts: list[Any] = [schema]
    if path is not None:
        parts.append(load_yaml(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. budgets=[0.5] or model=smollm2-135m)")
        try:
            parts.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override: {exc}") from None
    try:
        cfg = OmegaConf.merge(*parts)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        accepted = ", ".join(f.name for f in dataclasses.fields(EvalConfig))
        hint = ""
        if key and "." not in str(key):
            m = close_matches(str(key), [f.name for f in dataclasses.fields(EvalConfig)])
            hint = f"; did you mean {m[0]!r}?" if m else ""
        raise ConfigError(f"invalid eval config key or value {key!r}{hint} ({exc.msg}). Accepted keys: {accepted}") from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Fail before any model is loaded: unknown task/method, bad budget or mode."""
    for t in cfg.tasks:
        if t.name not in TASKS:
            raise unknown_name("task", t.name, TASKS)
        if t.n_samples < 1 or t.length < 16:
            raise ConfigError(f"task {t.name}: n_samples={t.n_samples} must be >= 1 and length={t.length} >= 16")
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r}; accepted: {', '.join(MODES)}")
    if not cfg.budgets:
        raise ConfigError("budgets is empty; give at least one ratio in (0, 1] or token count")
    for b in cfg.budgets:
        check_budget(b, "budgets entry")
    for m in cfg.methods:
        for b in cfg.budgets:
            _make(m, b)


def _make(method: Any, budget: Any) -> Compressor:
    spec = OmegaConf.to_container(method, resolve=True) if isinstance(method, DictConfig) else method
    return build(spec, budget=budget)


def _label(method: Any, comp: Compressor) -> str:
    if isinstance(method, str):
        return method
    return comp.name or json.dumps(OmegaConf.to_container(method) if isinstance(method, DictConfig) else method, sort_keys=True)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import transformers

    import kvframe

    return {"kvframe": kvframe.__version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def _read_done(path: Path) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    done: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption: that sample runs again
        done[(rec["method"], str(rec["budget"]), rec["task"], rec["sample_id"])] = rec
    return done


def _drop_partial_line(path: Path) -> None:
    """Remove a last line cut short by an interruption, so appended records stay one per line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def run_sample(model: Any, tok: Any, comp: Compressor, context: str, question: str, max_new_tokens: int, mode: str) -> dict[str, Any]:
    """One sample: returns the prediction and efficiency figures."""
    from kvframe.tasks.passkey import split_prompt

    prefix, suffix = split_prompt(tok, context, question)
    pre = tok(prefix, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    suf = tok(suffix, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    full = torch.cat([pre, suf], dim=1)
    first = pre if mode == "query_agnostic" else full[:, :-1]
    with torch.no_grad(), attach(model, comp) as handle:
        cache = handle.new_cache()
        t0 = time.perf_counter()
        model(first, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        t1 = time.perf_counter()
        mem = cache.memory()
        out = model.generate(
            full,
            attention_mask=torch.ones_like(full),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **{cache_argument(model): cache},
        )
        t2 = time.perf_counter()
    pred = tok.decode(out[0, full.shape[1] :], skip_special_tokens=True)
    return {
        "prediction": pred,
        "prompt_tokens": int(full.shape[1]),
        "prefill_tokens": int(first.shape[1]),
        "prefill_s": t1 - t0,
        "compression_s": cache.compression_seconds,
        "decode_s": t2 - t1,
        "cache_bytes": mem.bytes,
        "cache_kv_bytes": mem.kv_bytes,
        "cache_content_slots": mem.content_slots,
        "cache_slots": mem.slots,
    }


def evaluate(cfg: DictConfig) -> tuple[Path, list[dict[str, Any]]]:
    """Run the grid ``methods x budgets x tasks``; returns the run directory and the records."""
    from kvframe.models import load_model
    from kvframe.tasks.passkey import make_passkey_samples, score_passkey

    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    run_name = cfg.run_name or _dt.datetime.now().strftime("eval-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    print(f"kvframe eval: run directory {run_dir}", flush=True)

    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    pred_path = run_dir / "predictions.jsonl"
    _drop_partial_line(pred_path)
    done = _read_done(pred_path)
    records: list[dict[str, Any]] = []
    with pred_path.open("a") as pred_file:
        for task in cfg.tasks:
            samples = make_passkey_samples(tok, n=task.n_samples, length=task.length, seed=cfg.seed)
            for method in cfg.methods:
                comp0 = _make(method, cfg.budgets[0])
                budgets = list(cfg.budgets) if comp0.compresses else [None]
                for budget in budgets:
                    comp = _make(method, budget if budget is not None else cfg.budgets[0])
                    label = _label(method, comp)
                    rows = []
                    for s in samples:
                        key = (label, str(budget), task.name, s.id)
                        if key in done:
                            rows.append(done[key])
                            continue
                        res = run_sample(model, tok, comp, s.context, s.question, cfg.max_new_tokens, cfg.mode)
                        rec = {"method": label, "budget": budget, "task": task.name, "sample_id": s.id, "answer": s.answer,
                               "depth": s.depth, "score": score_passkey(res["prediction"], s.answer), **res}
                        pred_file.write(json.dumps(rec) + "\n")
                        pred_file.flush()
                        os.fsync(pred_file.fileno())
                        rows.append(rec)
                        print(f"  {label:<24} budget={budget!s:<6} {s.id}: score={rec['score']:.0f} {res['prediction']!r}", flush=True)
                    records.append(_aggregate(label, budget, task.name, rows, comp))
    meta = {"versions": _versions(), "git_commit": _git_commit(), "seed": cfg.seed, "config": OmegaConf.to_container(cfg),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}}
    for r in records:
        r.update(meta)
    (run_dir / "results.json").write_text(json.dumps(records, indent=2))
    print(format_table(records), flush=True)
    print(f"results: {run_dir / 'results.json'}", flush=True)
    return run_dir, records


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(float(r[key]) for r in rows) / max(len(rows), 1)


def _aggregate(label: str, budget: Any, task: str, rows: list[dict[str, Any]], comp: Compressor) -> dict[str, Any]:
    return {
        "method": label,
        "budget": budget,
        "task": task,
        "metric": "accuracy",
        "value": _mean(rows, "score"),
        "samples": len(rows),
        "prefill_s": _mean(rows, "prefill_s"),
        "compression_s": _mean(rows, "compression_s"),
        "decode_s": _mean(rows, "decode_s"),
        "cache_bytes": _mean(rows, "cache_bytes"),
        "cache_kv_bytes": _mean(rows, "cache_kv_bytes"),
        "cache_content_slots": _mean(rows, "cache_content_slots"),
        "prompt_tokens": _mean(rows, "prompt_tokens"),
        "compressor": comp.to_dict(),
    }


def format_table(records: list[Mapping[str, Any]]) -> str:
    """A plain-text results table."""
    head = f"{'method':<24} {'budget':>7} {'task':<9} {'accuracy':>8} {'n':>3} {'KV MiB':>8} {'prefill s':>9} {'compress s':>10} {'decode s':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['method']:<24} {str(r['budget'] if r['budget'] is not None else '-'):>7} {r['task']:<9} {r['value']:>8.2f} {r['samples']:>3} "
            f"{r['cache_kv_bytes'] / 2**20:>8.2f} {r['prefill_s']:>9.2f} {r['compression_s']:>10.3f} {r['decode_s']:>8.2f}"
        )
    return "\n".join(lines)
