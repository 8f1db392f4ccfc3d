"""``kvframe eval``: a grid of methods x budgets x tasks, run as Lightning test loops.

Configured by YAML (omegaconf) plus ``key=value`` overrides. Everything a method needs comes from
its composition; the runner never looks at a method's name. Per cell (method, budget, task) a
``Trainer.test`` runs :class:`kvframe.eval.module.EvalModule` over the samples not yet in
``predictions.jsonl`` (resume), with one W&B logger (offline unless configured) and one CSV
logger shared by the whole run. Under DDP (``devices``, ``num_nodes``, ``strategy``) each rank takes
every ``world``-th pending sample; rank 0 writes ``results.json``, the table and the plots.

The run directory holds ``config.yaml`` (resolved), ``predictions.jsonl`` (one line per finished
sample, appended and fsynced as it finishes), ``results.json`` (schema
:data:`RESULT_FIELDS`, documented in ``docs/evaluation.md``), ``results.md``, ``csv/`` logs,
``wandb/`` (offline runs) and ``plots/*.png``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvframe.compressor import Compressor
from kvframe.config import build, load_yaml
from kvframe.errors import ConfigError, close_matches
from kvframe.policies.budgets import check_budget

MODES = ("query_agnostic", "query_aware")
_WANDB_DIR_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")
#: W&B directories the user set before kvframe was imported are respected; others go in the run dir
_USER_WANDB_DIRS = {v: os.environ[v] for v in _WANDB_DIR_VARS if v in os.environ}
WANDB_MODES = ("offline", "online", "disabled")

#: every record in results.json has these keys (see docs/evaluation.md for their meaning)
RESULT_FIELDS = (
    "method", "budget", "task", "metric", "value", "samples", "prompt_tokens", "prefill_s", "compression_s",
    "decode_s", "peak_memory_bytes", "cache_bytes", "cache_kv_bytes", "cache_content_slots", "compressor",
    "task_config", "content_hash", "extra", "config", "versions", "git_commit", "seed", "machine",
)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (default: no network, no account), online, disabled
    project: str = "kvframe"
    entity: str | None = None


@dataclass
class EvalConfig:
    """Evaluation settings (all overridable as ``key=value`` on the command line).

    ``tasks``: list of ``{name: TASK, **params}`` (see :mod:`kvframe.eval.tasks`). ``methods``: names,
    YAML paths or inline compositions; a mapping may carry its own ``budgets`` list.
    """

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"  # accelerator: cpu, cuda/gpu, auto
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 0
    tasks: list[Any] = field(default_factory=lambda: [{"name": "passkey", "n_samples": 4, "length": 1536}])
    methods: list[Any] = field(default_factory=lambda: ["full", "streaming_llm", "snapkv"])
    budgets: list[Any] = field(default_factory=lambda: [0.5, 0.25])
    max_new_tokens: int = 12
    mode: str = "query_agnostic"
    output_dir: str = "runs"
    run_name: str | None = None
    threads: int | None = None
    # torch.compile for every method's compressor (auto / true / false / {backend, mode}); null keeps
    # each method's own setting (auto: compiled on CUDA, eager on CPU)
    compile: Any = None
    plots: bool = True
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


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


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def method_entries(cfg: DictConfig) -> list[tuple[Any, list[Any]]]:
    """``(spec, budgets)`` per configured method (a mapping's own ``budgets`` override the global ones)."""
    out = []
    for m in cfg.methods:
        spec = _plain(m)
        budgets = list(cfg.budgets)
        if isinstance(spec, Mapping) and "budgets" in spec:
            spec = dict(spec)
            budgets = list(spec.pop("budgets"))
            if set(spec) == {"name"}:
                spec = spec["name"]
        out.append((spec, budgets))
    return out


def validate(cfg: DictConfig) -> list[Any]:
    """Fail before any model is loaded: unknown task/method, bad budget, mode, missing data package."""
    from kvframe.eval.tasks import make_task

    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r}; accepted: {', '.join(MODES)}")
    if cfg.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}; accepted: {', '.join(WANDB_MODES)}")
    if not cfg.tasks:
        raise ConfigError("tasks is empty; give at least one, e.g. tasks=[{name: passkey, n_samples: 2, length: 1024}]")
    if not cfg.methods:
        raise ConfigError("methods is empty; give at least one method name, YAML path or inline composition")
    if not cfg.budgets:
        raise ConfigError("budgets is empty; give at least one ratio in (0, 1] or token count")
    if cfg.devices < 1 or cfg.num_nodes < 1:
        raise ConfigError(f"devices={cfg.devices} and num_nodes={cfg.num_nodes} must be >= 1")
    tasks = [make_task(_plain(t)) for t in cfg.tasks]
    for spec, budgets in method_entries(cfg):
        if not budgets:
            raise ConfigError(f"method {spec!r} has an empty budgets list")
        for b in budgets:
            check_budget(b, "budgets entry")
            _make(spec, b, cfg.compile)
    return tasks


def _make(method: Any, budget: Any, compile: Any = None) -> Compressor:
    extra = {} if compile is None else {"compile": _plain(compile)}
    return build(_plain(method), budget=budget, **extra)


def _label(method: Any, comp: Compressor) -> str:
    if isinstance(method, str):
        return method
    return comp.name or json.dumps(_plain(method), sort_keys=True)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import lightning
    import transformers

    import kvframe

    return {"kvframe": kvframe.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "python": platform.python_version()}


def read_predictions(path: Path) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """Finished samples keyed by (method, budget, task, sample id); a line cut by an interruption is ignored."""
    done: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # that sample runs again
        done.setdefault((rec["method"], str(rec["budget"]), rec["task"], rec["sample_id"]), rec)
    return done


def drop_partial_line(path: Path) -> None:
    """Remove a last line cut short by an interruption, so appended records stay one per line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    # one CSV log per invocation: a resumed run keeps the earlier logs
    version = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="csv", version=version)]
    if cfg.wandb.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        wdir = run_dir / "wandb"
        wdir.mkdir(exist_ok=True)
        for var in _WANDB_DIR_VARS:
            os.environ[var] = _USER_WANDB_DIRS.get(var, str(wdir))
        if cfg.wandb.mode == "offline":
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, save_dir=str(wdir), offline=cfg.wandb.mode == "offline",
                        name=run_dir.name, config=OmegaConf.to_container(cfg, resolve=True))
        )
    return loggers


def evaluate(cfg: DictConfig) -> tuple[Path, list[dict[str, Any]]]:
    """Run the grid ``methods x budgets x tasks``; returns the run directory and the records."""
    import lightning as L

    from kvframe.eval.module import EvalModule, TaskDataModule
    from kvframe.eval.models import load_model
    from kvframe.eval.tasks.base import content_hash

    tasks = validate(cfg)
    _quiet_lightning()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    run_name = cfg.run_name or os.environ.get("KVFRAME_RUN_NAME") or _dt.datetime.now().strftime("eval-%Y%m%d-%H%M%S")
    os.environ["KVFRAME_RUN_NAME"] = run_name  # DDP children re-run the command: same run directory
    run_dir = Path(cfg.output_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    rank0 = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    if rank0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        print(f"kvframe eval: run directory {run_dir}", flush=True)
    L.seed_everything(cfg.seed, verbose=False)

    accelerator = {"cuda": "gpu"}.get(cfg.device, cfg.device)
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device="cuda" if accelerator == "gpu" else ("cpu" if accelerator == "auto" else cfg.device))
    pred_path = run_dir / "predictions.jsonl"
    if rank0:
        drop_partial_line(pred_path)
    loggers = _loggers(cfg, run_dir)
    task_samples = []
    for task in tasks:
        samples = task.samples(tok)
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"task {task.name!r} generated duplicate sample ids; change its parameters")
        task_samples.append((task, samples, content_hash(samples)))

    cells = []
    for spec, budgets in method_entries(cfg):
        comp0 = _make(spec, budgets[0], cfg.compile)
        for budget in (budgets if comp0.compresses else [None]):
            comp = _make(spec, budget if budget is not None else budgets[0], cfg.compile)
            cells.append((_label(spec, comp), budget, comp))

    for task, samples, digest in task_samples:
        for label, budget, comp in cells:
            cell = {"method": label, "budget": budget, "task": task.name}
            done = read_predictions(pred_path)
            done_ids = {s.id for s in samples if (label, str(budget), task.name, s.id) in done}
            if len(done_ids) == len(samples):
                continue
            trainer = L.Trainer(
                accelerator=accelerator,
                devices=cfg.devices,
                num_nodes=cfg.num_nodes,
                strategy=cfg.strategy,
                logger=loggers,
                enable_progress_bar=bool(cfg.progress_bar),
                enable_model_summary=False,
                enable_checkpointing=False,
                use_distributed_sampler=False,
                inference_mode=False,  # no_grad instead: AsymKV's scoring pass takes key gradients
            )
            module = EvalModule(model, tok, comp, task, cell, pred_path, cfg.max_new_tokens, cfg.mode,
                                log_prefix=f"{label}/{budget if budget is not None else 'full'}/{task.name}/")
            trainer.test(module, datamodule=TaskDataModule(task, tok, done_ids, samples), verbose=False)
            if trainer.world_size > 1:
                trainer.strategy.barrier()

    if not rank0:
        return run_dir, []
    records = aggregate(cfg, pred_path, task_samples, cells)
    (run_dir / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    table = format_table(records)
    (run_dir / "results.md").write_text(table + "\n")
    plots = make_plots(records, pred_path, run_dir / "plots") if cfg.plots else []
    _log_summary(loggers, records, plots)
    print(table, flush=True)
    print(f"results: {run_dir / 'results.json'}", flush=True)
    return run_dir, records


def _quiet_lightning() -> None:
    """Keep the console to our table: Lightning's per-Trainer banners and known-harmless warnings."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*transfer_batch_to_device.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*anonymous setting.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else 0.0


def aggregate(cfg: DictConfig, pred_path: Path, task_samples: list[Any], cells: list[Any]) -> list[dict[str, Any]]:
    """One record per (method, budget, task) from the finished predictions (each sample counted once)."""
    done = read_predictions(pred_path)
    meta = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": _versions(),
        "git_commit": _git_commit(),
        "seed": cfg.seed,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    records = []
    for task, samples, digest in task_samples:
        task_cfg = {k: v for k, v in dataclasses.asdict(task).items() if not k.startswith("_")} if dataclasses.is_dataclass(task) else {}
        for label, budget, comp in cells:
            rows = [done[k] for s in samples if (k := (label, str(budget), task.name, s.id)) in done]
            if not rows:
                continue
            extra: dict[str, Any] = {}
            if task.kind == "perplexity":
                nll = [x for r in rows for x in r["nll"]]
                value = math.exp(sum(nll) / max(len(nll), 1))
                extra["tokens"] = len(nll)
                from kvframe.eval.tasks.perplexity import bucket_perplexity

                # positions counted from the first scored token; streams of a task are equally long
                buckets, _ = bucket_perplexity([r["nll"] for r in rows], int(getattr(task, "buckets", 8)))
                extra["bucket_perplexity"] = [{"start": a, "end": b, "perplexity": p} for a, b, p in buckets]
            else:
                value = _mean(rows, "score")
                subtasks = sorted({r["meta"].get("task") for r in rows if isinstance(r.get("meta"), dict) and r["meta"].get("task")})
                if subtasks:
                    extra["per_subtask"] = {t: _mean([r for r in rows if r["meta"].get("task") == t], "score") for t in subtasks}
            records.append({
                "method": label, "budget": budget, "task": task.name, "metric": task.metric, "value": value,
                "samples": len(rows), "prompt_tokens": _mean(rows, "prompt_tokens"), "prefill_s": _mean(rows, "prefill_s"),
                "compression_s": _mean(rows, "compression_s"), "decode_s": _mean(rows, "decode_s"),
                "peak_memory_bytes": _mean(rows, "peak_memory_bytes"), "cache_bytes": _mean(rows, "cache_bytes"),
                "cache_kv_bytes": _mean(rows, "cache_kv_bytes"), "cache_content_slots": _mean(rows, "cache_content_slots"),
                "compressor": comp.to_dict(), "task_config": task_cfg, "content_hash": digest, "extra": extra, **meta,
            })
    # per-position-bucket perplexity relative to the uncompressed run of the same task
    for r in records:
        b = r["extra"].get("bucket_perplexity")
        ref = next((x for x in records if x["task"] == r["task"] and x["budget"] is None and x["extra"].get("bucket_perplexity")), None)
        if b and ref is not None:
            r["extra"]["bucket_ratio_to_full"] = [
                x["perplexity"] / y["perplexity"] if y["perplexity"] else float("nan") for x, y in zip(b, ref["extra"]["bucket_perplexity"])
            ]
    return records


def validate_results(records: list[Mapping[str, Any]]) -> None:
    """Check records against the documented schema (keys and types); raises ValueError."""
    for i, r in enumerate(records):
        missing = [k for k in RESULT_FIELDS if k not in r]
        if missing:
            raise ValueError(f"record {i}: missing keys {missing}")
        if not isinstance(r["method"], str) or not isinstance(r["task"], str) or not isinstance(r["metric"], str):
            raise ValueError(f"record {i}: method, task and metric must be strings")
        if r["budget"] is not None and not isinstance(r["budget"], (int, float)):
            raise ValueError(f"record {i}: budget must be a number or null")
        if not isinstance(r["value"], (int, float)) or not isinstance(r["samples"], int) or r["samples"] < 1:
            raise ValueError(f"record {i}: value must be a number and samples an integer >= 1")
        if not (isinstance(r["content_hash"], str) and len(r["content_hash"]) == 64):
            raise ValueError(f"record {i}: content_hash must be a sha256 hex digest")
        for k in ("prefill_s", "compression_s", "decode_s", "cache_kv_bytes", "cache_bytes"):
            if not isinstance(r[k], (int, float)) or r[k] < 0:
                raise ValueError(f"record {i}: {k} must be a number >= 0")


def format_table(records: list[Mapping[str, Any]]) -> str:
    """A Markdown results table."""
    lines = [
        "| method | budget | task | metric | value | n | KV MiB | prefill s | compress s | decode s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        b = r["budget"] if r["budget"] is not None else "—"
        lines.append(
            f"| {r['method']} | {b} | {r['task']} | {r['metric']} | {r['value']:.3f} | {r['samples']} | "
            f"{r['cache_kv_bytes'] / 2**20:.2f} | {r['prefill_s']:.2f} | {r['compression_s']:.3f} | {r['decode_s']:.2f} | "
            f"{r.get('peak_memory_bytes', 0) / 2**20:.0f} |"
        )
    return "\n".join(lines)


def make_plots(records: list[dict[str, Any]], pred_path: Path, out: Path) -> list[Path]:
    """Score vs budget per method and task; needle heatmaps; perplexity vs position (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in sorted({r["task"] for r in records}):
        rows = [r for r in records if r["task"] == task]
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((float(r["budget"]), r["value"]) for r in rows if r["method"] == method and r["budget"] is not None)
            full = [r["value"] for r in rows if r["method"] == method and r["budget"] is None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            for v in full:
                ax.axhline(v, linestyle="--", color="gray", label=f"{method} (no compression)")
        ax.set_xlabel("budget")
        ax.set_ylabel(rows[0]["metric"])
        ax.set_title(f"{task}: {rows[0]['metric']} vs budget")
        ax.legend(fontsize=7)
        p = out / f"{task}_score_vs_budget.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    done = list(read_predictions(pred_path).values())
    if any(r["task"] == "needle" for r in records):
        from kvframe.eval.tasks.needle import needle_heatmap

        for r in records:
            if r["task"] != "needle":
                continue
            rows = [d for d in done if d["task"] == "needle" and d["method"] == r["method"] and str(d["budget"]) == str(r["budget"])]
            p = out / f"needle_{r['method']}_{r['budget']}.png"
            needle_heatmap(rows, p)
            paths.append(p)
    ppl = [r for r in records if r["extra"].get("bucket_perplexity")]
    if ppl:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in ppl:
            b = r["extra"]["bucket_perplexity"]
            ax.plot([x["end"] for x in b], [x["perplexity"] for x in b], marker=".",
                    label=f"{r['method']} {r['budget'] if r['budget'] is not None else ''}")
        ax.set_xlabel("tokens streamed")
        ax.set_ylabel("perplexity (bucket)")
        ax.set_title("streaming perplexity vs position")
        ax.legend(fontsize=7)
        p = out / "perplexity_vs_position.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def _log_summary(loggers: list[Any], records: list[dict[str, Any]], plots: list[Path]) -> None:
    """Results table and plots to W&B (as a table and images); CSV already has the per-cell metrics."""
    for lg in loggers:
        if type(lg).__name__ != "WandbLogger":
            continue
        import wandb

        cols = ["method", "budget", "task", "metric", "value", "samples", "cache_kv_bytes", "prefill_s", "compression_s", "decode_s"]
        data = [[r[c] if c != "budget" else str(r[c]) for c in cols] for r in records]
        lg.experiment.log({"results": wandb.Table(columns=cols, data=data), **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
        lg.experiment.finish()
