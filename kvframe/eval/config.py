"""The evaluation config: schema, loading (YAML + ``key=value`` overrides) and validation.

Everything is checked here, before any model is loaded: config keys and value types, tasks,
methods and budgets (each cell's compressor is built), the decoding length, device, dtype,
threads, Lightning strategy and the output directory. Every error is one
:class:`~kvframe.errors.ConfigError` naming the bad value and what is accepted.

:func:`plan_cells` turns the config into the grid of cells the runner evaluates, each with a
unique label: two compositions that share a ``name`` but differ (``methods=[snapkv, {base: snapkv,
scorer: {window: 8}}]``) get labels derived from what differs (``snapkv`` and
``snapkv[scorer.window=8]``), so each variant is run and reported with its own numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvframe.compressor import Compressor
from kvframe.config import META_KEYS, build, load_yaml
from kvframe.errors import ConfigError, close_matches
from kvframe.policies.budgets import check_budget

#: decoding modes a config may ask for (``mode``: one of them, or a list: a grid dimension)
MODES = ("query_agnostic", "query_aware")
#: the mode recorded for tasks that do not decode (streaming perplexity): they run once per method
#: and budget whatever ``mode`` lists
STREAM_MODE = "stream"
WANDB_MODES = ("offline", "online", "disabled")
#: Lightning accelerators the runner can place the model on (``cuda`` and ``gpu`` are the same)
DEVICES = ("cpu", "cuda", "gpu", "mps", "auto")
#: labels longer than this use a short hash of the composition instead of the list of differences
_MAX_LABEL = 72


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
    device: str = "cpu"  # accelerator: cpu, cuda/gpu, mps, auto
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 0
    tasks: list[Any] = field(default_factory=lambda: [{"name": "passkey", "n_samples": 4, "length": 1536}])
    methods: list[Any] = field(default_factory=lambda: ["full", "streaming_llm", "snapkv"])
    budgets: list[Any] = field(default_factory=lambda: [0.5, 0.25])
    max_new_tokens: int = 12
    # query_agnostic, query_aware, or a list of them: every generation cell runs once per mode
    mode: Any = "query_agnostic"
    output_dir: str = "runs"
    run_name: str | None = None
    threads: int | None = None
    # torch.compile for every method's compressor (auto / true / false / {backend, mode}); null keeps
    # each method's own setting (auto: compiled on CUDA, eager on CPU)
    compile: Any = None
    plots: bool = True
    progress_bar: bool = True  # Lightning's per-cell bars
    grid_progress: bool = True  # one line for the whole grid on stderr (cells, samples, elapsed, ETA)
    wandb: WandbConfig = field(default_factory=WandbConfig)


_KEYS = tuple(f.name for f in dataclasses.fields(EvalConfig))


def default_config_path() -> Path:
    """The built-in default config (what ``kvframe eval`` with no argument runs)."""
    return Path(__file__).resolve().parent / "configs" / "eval_default.yaml"


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``key=value`` strings (values in YAML syntax) as one DictConfig; names the first bad one."""
    parts = []
    for o in overrides:
        key, sep, _ = o.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {o!r} is not of the form key=value (e.g. budgets=[0.5] or model=smollm2-135m)")
        try:
            parts.append(OmegaConf.from_dotlist([o]))
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[-1]
            raise ConfigError(
                f"override {o!r}: the value is not valid YAML ({problem}); close brackets and braces, "
                "and quote values that contain YAML syntax (e.g. 'methods=[snapkv, knorm]')"
            ) from None
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {o!r}: {exc}") from None
    return OmegaConf.merge(*parts) if parts else OmegaConf.create({})


def _merge_error(exc: OmegaConfBaseException) -> ConfigError:
    key = str(getattr(exc, "full_key", "") or "")
    top = key.split(".")[0].split("[")[0]
    if top and top not in _KEYS:
        m = close_matches(top, _KEYS)
        hint = f"; did you mean {m[0]!r}?" if m else ""
        return ConfigError(f"unknown eval config key {top!r}{hint} Accepted keys: {', '.join(_KEYS)}")
    msg = str(getattr(exc, "msg", exc)).splitlines()[0]
    if top in ("tasks", "methods", "budgets") and "ListConfig" in msg:
        return ConfigError(f"{top} must be a list, e.g. {top}=[{ {'tasks': '{name: passkey}', 'methods': 'snapkv', 'budgets': '0.5'}[top] }]; got a single value")
    return ConfigError(f"invalid value for eval config key {key!r}: {msg}")


def _apply_override(cfg: DictConfig, override: str) -> DictConfig:
    """Merge one ``key=value`` override into ``cfg``. A mapping merges into a mapping (``wandb={mode:
    disabled}`` keeps ``wandb.project``); a value of another shape replaces the old one (``mode={a: 1}``
    over the default's list), so validation can name it instead of omegaconf refusing the merge."""
    part = parse_overrides([override])
    try:
        return OmegaConf.merge(cfg, part)
    except (OmegaConfBaseException, TypeError) as exc:  # omegaconf raises a bare TypeError for list <- dict
        if "incompatible container types" not in str(exc):
            raise _merge_error(exc) from None
    key = override.partition("=")[0].strip()
    try:
        OmegaConf.update(cfg, key, OmegaConf.select(part, key), merge=False)
    except OmegaConfBaseException as exc:
        raise _merge_error(exc) from None
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; resolved and validated."""
    parts: list[Any] = [OmegaConf.structured(EvalConfig)]
    if path is not None:
        parts.append(load_yaml(path))
    try:
        cfg = OmegaConf.merge(*parts)
    except OmegaConfBaseException as exc:
        raise _merge_error(exc) from None
    for o in overrides or []:
        cfg = _apply_override(cfg, o)
    try:  # interpolations (${...}) are resolved once, here, so a bad one fails before any work
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"cannot resolve eval config key {key!r}: {str(exc).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def plain(x: Any) -> Any:
    """A plain Python value (containers resolved) from an omegaconf node."""
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def modes(cfg: DictConfig) -> list[str]:
    """The decoding modes of the grid: ``mode`` as a list (one value or several, each once)."""
    value = plain(cfg.mode)
    accepted = f"{', '.join(MODES)}, or a list of them (e.g. mode=[{', '.join(MODES)}])"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"mode={value!r}; accepted: {accepted}")
    for i, m in enumerate(value):
        if m not in MODES:
            hint = ""
            if isinstance(m, str):
                close = close_matches(m, MODES)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                if m == STREAM_MODE:
                    hint = " (the mode recorded for perplexity tasks, which run once whatever mode lists; it cannot be asked for)"
            what = f"mode={m!r}" if len(value) == 1 else f"mode entry {m!r}"
            raise ConfigError(f"{what}{hint}; accepted: {accepted}")
        if m in value[:i]:
            raise ConfigError(f"mode lists {m!r} twice ({value}); list each mode once")
    return value


def task_modes(task: Any, grid_modes: list[str]) -> list[str]:
    """The modes a task runs under: the grid's for a generation task, :data:`STREAM_MODE` alone for
    a task that does not decode (streaming perplexity)."""
    return [STREAM_MODE] if getattr(task, "kind", "generation") == "perplexity" else list(grid_modes)


def method_entries(cfg: DictConfig) -> list[tuple[Any, list[Any]]]:
    """``(spec, budgets)`` per configured method (a mapping's own ``budgets`` override the global ones)."""
    out = []
    for m in cfg.methods:
        spec = plain(m)
        budgets = list(cfg.budgets)
        if isinstance(spec, Mapping) and "budgets" in spec:
            spec = dict(spec)
            budgets = plain(spec.pop("budgets"))
            if not isinstance(budgets, list):
                raise ConfigError(f"method {spec!r}: budgets={budgets!r} must be a list, e.g. budgets: [0.5, 256]")
            if set(spec) == {"name"}:
                spec = spec["name"]
        out.append((spec, budgets))
    return out


def make_compressor(method: Any, budget: Any, compile: Any = None) -> Compressor:
    """The compressor of one cell: ``method`` at ``budget``, with the run's ``compile`` override."""
    extra = {} if compile is None else {"compile": plain(compile)}
    return build(plain(method), budget=budget, **extra)


@dataclass(frozen=True)
class CellPlan:
    """One method at one budget (``None``: a method that never compresses runs once)."""

    label: str
    budget: float | int | None
    compressor: Compressor
    spec: Any


def composition(comp: Compressor) -> dict[str, Any]:
    """What determines a compressor's results: its resolved composition without the budget and the
    descriptive metadata (name, paper, url, description)."""
    return {k: v for k, v in comp.to_dict().items() if k not in META_KEYS and k != "budget"}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"dotted.key": value}`` (an empty mapping is a value of its own)."""
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``key=value`` (values of ``a``) for every dotted key where ``a`` and ``b`` differ."""
    fa, fb = flatten(a), flatten(b)
    diff = []
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k, "<unset>") != fb.get(k, "<unset>"):
            # a replaced policy shows as its new name only, not every hyperparameter of it
            section = k.split(".")[0]
            if f"{section}.name" in fa and fa.get(f"{section}.name") != fb.get(f"{section}.name"):
                k = f"{section}.name"
            item = f"{k}={json.dumps(fa.get(k), separators=(',', ':')) if not isinstance(fa.get(k), str) else fa.get(k)}"
            if item not in diff:
                diff.append(item)
    return diff


def _digest(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _reference(name: str, compile: Any = None) -> dict[str, Any] | None:
    """The composition of the registered card ``name`` (what a bare ``name`` would run), if any."""
    try:
        return composition(build(name, **({} if compile is None else {"compile": plain(compile)})))
    except ConfigError:
        return None


def unique_labels(items: list[tuple[str, dict[str, Any], dict[str, Any] | None]]) -> list[str]:
    """A unique label per ``(base name, identity, reference)``.

    Items whose base name no other item with a different identity shares keep it. Where distinct
    identities share a base name, each label lists what differs from the reference (the registered
    card of that name, else the first item of the name): ``snapkv[scorer.window=8]``; an item equal
    to the reference keeps the bare name; a label longer than 72 characters becomes
    ``name#<hash of the identity>``. Identical items get the same label.
    """
    groups: dict[str, set[str]] = {}
    first: dict[str, dict[str, Any]] = {}
    for base, ident, _ in items:
        groups.setdefault(base, set()).add(json.dumps(ident, sort_keys=True, default=str))
        first.setdefault(base, ident)
    labels = []
    for base, ident, ref in items:
        if len(groups[base]) == 1:
            labels.append(base)
            continue
        diff = _differences(ident, ref if ref is not None else first[base])
        label = base if not diff else f"{base}[{', '.join(diff)}]"
        labels.append(label if len(label) <= _MAX_LABEL else f"{base}#{_digest(ident)}")
    return labels


def plan_cells(cfg: DictConfig) -> list[CellPlan]:
    """The grid's methods x budgets with unique labels (see module docstring); fails on a cell
    listed twice."""
    entries = []
    for spec, budgets in method_entries(cfg):
        if not budgets:
            raise ConfigError(f"method {spec!r} has an empty budgets list")
        for b in budgets:
            check_budget(b, "budgets entry")
        entries.append((spec, budgets, make_compressor(spec, budgets[0], cfg.compile)))
    items = []
    for spec, _, comp in entries:
        base = spec if isinstance(spec, str) else comp.name or "composition"
        ref = _reference(base, cfg.compile) if comp.name == base else None
        items.append((base, composition(comp), ref))
    labels = unique_labels(items)

    cells: list[CellPlan] = []
    seen: dict[tuple[str, str | None], int] = {}
    for i, (spec, budgets, comp0) in enumerate(entries):
        for budget in budgets if comp0.compresses else [None]:
            key = (labels[i], None if budget is None else str(budget))
            if key in seen:
                raise ConfigError(
                    f"methods[{seen[key]}] and methods[{i}] are the same composition ({labels[i]!r}) at budget {budget}; "
                    "list each method and budget once"
                )
            seen[key] = i
            comp = comp0 if budget in (None, budgets[0]) else make_compressor(spec, budget, cfg.compile)
            cells.append(CellPlan(labels[i], budget, comp, spec))
    return cells


@dataclass(frozen=True)
class TaskPlan:
    """A task with its unique label: its name, or, where the same task is listed with different
    parameters, ``name[param=value, ...]`` listing what differs from the task's defaults."""

    label: str
    task: Any


def task_config(task: Any) -> dict[str, Any]:
    """A task's parameters (its dataclass fields, private ones excluded)."""
    if not dataclasses.is_dataclass(task):
        return {}
    return {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if not f.name.startswith("_")}


def _task_defaults(name: str) -> dict[str, Any] | None:
    """The parameters of task ``name`` built with its defaults (None if it has required ones)."""
    from kvframe.eval.tasks import make_task

    try:
        return task_config(make_task({"name": name}))
    except ConfigError:
        return None


def plan_tasks(cfg: DictConfig) -> list[TaskPlan]:
    """Every configured task, built and labelled; the same task listed twice is an error."""
    from kvframe.eval.tasks import make_task

    tasks = [make_task(plain(t)) for t in cfg.tasks]
    labels = unique_labels([(t.name, task_config(t), _task_defaults(t.name)) for t in tasks])
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise ConfigError(f"tasks[{labels.index(label)}] and tasks[{i}] are the same task ({label!r}); list each task once")
    return [TaskPlan(label, t) for label, t in zip(labels, tasks)]


def _check_output_dir(output_dir: str, run_name: str | None) -> None:
    if run_name is not None and (not run_name or os.sep in run_name or run_name in (".", "..")):
        raise ConfigError(f"run_name={run_name!r}; accepted: a folder name without {os.sep!r} (or null for a timestamp)")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir={output_dir!r} is a file; accepted: a directory (created if missing) that can be written")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={output_dir!r} cannot be written ({existing} is not a writable directory)")


def _check_int(cfg: DictConfig, key: str, low: int, what: str, optional: bool = False) -> None:
    v = cfg[key]
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{key}={v!r}; accepted: {what}")


def _check_device(device: str) -> None:
    if device not in DEVICES:
        m = close_matches(str(device), DEVICES)
        hint = f"; did you mean {m[0]!r}?" if m else ""
        raise ConfigError(f"device={device!r}{hint} Accepted: {', '.join(DEVICES)}")
    if device in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA device is available to torch {torch.__version__}; use device=cpu or device=auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but the MPS backend is not available here; use device=cpu or device=auto")


def _check_strategy(strategy: str) -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    accepted = ["auto", *StrategyRegistry.available_strategies()]
    if strategy not in accepted:
        m = close_matches(str(strategy), accepted)
        hint = f"; did you mean {m[0]!r}?" if m else ""
        raise ConfigError(f"strategy={strategy!r}{hint} Accepted: {', '.join(accepted)}")


def validate(cfg: DictConfig) -> tuple[list[TaskPlan], list[CellPlan]]:
    """Fail before any model is loaded; returns the labelled tasks and method x budget cells."""
    from kvframe.eval.models import resolve_dtype

    modes(cfg)
    if cfg.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}; accepted: {', '.join(WANDB_MODES)}")
    if not cfg.tasks:
        raise ConfigError("tasks is empty; give at least one, e.g. tasks=[{name: passkey, n_samples: 2, length: 1024}]")
    if not cfg.methods:
        raise ConfigError("methods is empty; give at least one method name, YAML path or inline composition")
    if not cfg.budgets:
        raise ConfigError("budgets is empty; give at least one ratio in (0, 1] or token count")
    _check_int(cfg, "max_new_tokens", 1, "an integer >= 1 (tokens generated per answer)")
    _check_int(cfg, "devices", 1, "an integer >= 1")
    _check_int(cfg, "num_nodes", 1, "an integer >= 1")
    _check_int(cfg, "threads", 1, "null (torch's default) or an integer >= 1 (CPU threads)", optional=True)
    resolve_dtype(cfg.dtype)
    _check_device(cfg.device)
    _check_strategy(cfg.strategy)
    _check_output_dir(cfg.output_dir, cfg.run_name)
    return plan_tasks(cfg), plan_cells(cfg)
