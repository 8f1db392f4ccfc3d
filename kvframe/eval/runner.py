"""``kvframe eval``: a grid of methods x budgets x tasks x modes, run as Lightning test loops.

Configured by YAML (omegaconf) plus ``key=value`` overrides (:mod:`kvframe.eval.config`, validated
before the model loads). Everything a method needs comes from its composition; the runner never
looks at a method's name. ``mode`` lists the decoding modes (``query_agnostic``, ``query_aware``):
every generation task runs once per mode; a task that does not decode (streaming perplexity) runs
once per method and budget, recorded with mode ``stream``. Per cell (method, budget, task, mode) a
``Trainer.test`` runs :class:`kvframe.eval.module.EvalModule` over the samples not yet finished,
with one W&B logger (offline unless configured) and one CSV logger shared by the whole run. Under
DDP (``devices``, ``num_nodes``, ``strategy``) each rank takes every ``world``-th pending sample;
rank 0 writes ``results.json``, the table and the plots, and prints one progress line for the
whole grid (:mod:`kvframe.eval.progress`).

Trust in the numbers (:mod:`kvframe.eval.results`): every sample record carries its cell's
fingerprint, and resuming into a run directory whose samples were computed under another
configuration fails, saying what differs. A cell that raises is recorded as failed with its error
and the grid goes on; :func:`evaluate` still writes results for every finished cell. Ctrl-C stops
the run cleanly (:class:`EvalInterrupted`): finished samples are kept and the same command resumes.
Nothing leaks out of a call: environment variables, torch's thread count and the W&B run are
restored or closed when :func:`evaluate` returns.

The run directory holds ``config.yaml`` (resolved), ``predictions.jsonl`` (one line per finished
sample, appended and fsynced as it finishes), ``cells.json`` (cell fingerprints and what they
stand for), ``results.json`` (schema :data:`~kvframe.eval.results.RESULT_FIELDS`, documented in
``docs/evaluation.md``), ``results.md``, ``errors.log`` (tracebacks of failed cells), ``csv/`` logs,
``wandb/`` (offline runs) and ``plots/*.png``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kvframe.errors import ConfigError
from kvframe.eval.progress import SAMPLE_LINE_INTERVAL_S, GridProgress, PredictionsTail, cell_bar, lightning_callback
from kvframe.eval.config import CellPlan, TaskPlan, composition, modes, task_modes, validate
from kvframe.eval.results import (
    add_bucket_ratios,
    cell_identity,
    cell_key,
    describe_cell,
    drop_partial_line,
    fingerprint,
    format_table,
    git_commit,
    machine,
    read_identities,
    read_predictions,
    record,
    resume_state,
    summarize,
    versions,
    write_identities,
)

_WANDB_DIR_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")
#: environment variables a run sets for itself (and for DDP children) and restores on return
_RUN_ENV = ("KVFRAME_RUN_NAME", "WANDB_MODE", "WANDB_SILENT", *_WANDB_DIR_VARS)


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`evaluate`: finished samples are saved in ``run_dir``; re-running the
    same command with ``run_name`` set to its name resumes."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


@contextlib.contextmanager
def _isolated_run() -> Iterator[None]:
    """Restore the environment variables and torch thread count a run changes."""
    saved = {k: os.environ.get(k) for k in _RUN_ENV}
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _accelerator(device: str) -> tuple[str, str]:
    """``(Lightning accelerator, torch device of this rank's model)`` for the ``device`` setting."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device in ("cuda", "gpu"):
        return "gpu", f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device, device


def _loggers(cfg: DictConfig, run_dir: Path, user_wandb_dirs: dict[str, str]) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    # one CSV log per invocation: a resumed run keeps the earlier logs
    version = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="csv", version=version)]
    if cfg.wandb.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        wdir = run_dir / "wandb"
        wdir.mkdir(exist_ok=True)
        for var in _WANDB_DIR_VARS:  # directories the user set are respected; others go in the run dir
            os.environ[var] = user_wandb_dirs.get(var, str(wdir))
        if cfg.wandb.mode == "offline":
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        # the mode goes to wandb.init too: the environment alone is ignored where W&B was set up
        # earlier in the process (another run, kvframe report), which would then try to go online
        loggers.append(
            WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, save_dir=str(wdir), offline=cfg.wandb.mode == "offline",
                        name=run_dir.name, config=OmegaConf.to_container(cfg, resolve=True), mode=cfg.wandb.mode)
        )
    return loggers


def _close_loggers(loggers: list[Any]) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            lg._experiment.finish()
            lg._experiment = None


@dataclass
class _Cell:
    plan: CellPlan
    task: TaskPlan
    mode: str  # a decoding mode, or ``stream`` for a task that does not decode
    samples: list[Any]
    identity: dict[str, Any]
    fingerprint: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return cell_key(self.plan.label, self.plan.budget, self.task.label, self.mode)

    @property
    def name(self) -> str:
        return describe_cell(self.key)


def _plan(cfg: DictConfig, tasks: list[TaskPlan], cells: list[CellPlan], tok: Any, device_type: str) -> list[_Cell]:
    from kvframe.eval.config import task_config
    from kvframe.eval.models import model_fingerprint
    from kvframe.eval.tasks.base import content_hash

    model_id = model_fingerprint(cfg.model)
    out = []
    for tp in tasks:
        samples = tp.task.samples(tok)
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"task {tp.label!r} generated duplicate sample ids; change its parameters")
        digest = content_hash(samples)
        for mode in task_modes(tp.task, modes(cfg)):
            for cp in cells:
                ident = cell_identity(
                    model=model_id, dtype=cfg.dtype, device=device_type, task_name=tp.task.name, task_config=task_config(tp.task),
                    content_hash=digest, task_kind=tp.task.kind, mode=mode, max_new_tokens=cfg.max_new_tokens,
                    compressor={**composition(cp.compressor), "budget": cp.compressor.budget if cp.budget is not None else None},
                    seed=cfg.seed,
                )
                out.append(_Cell(cp, tp, mode, samples, ident, fingerprint(ident)))
    return out


def evaluate(cfg: DictConfig) -> tuple[Path, list[dict[str, Any]]]:
    """Run the grid ``methods x budgets x tasks``; returns the run directory and the records
    (one per cell; ``status`` ``failed`` for a cell that raised). Raises :class:`EvalInterrupted`
    on Ctrl-C, after writing results for the finished cells."""
    tasks, cells = validate(cfg)
    user_wandb_dirs = {v: os.environ[v] for v in _WANDB_DIR_VARS if v in os.environ}
    with _isolated_run():
        return _run(cfg, tasks, cells, user_wandb_dirs)


def _run(cfg: DictConfig, tasks: list[TaskPlan], plans: list[CellPlan], user_wandb_dirs: dict[str, str]) -> tuple[Path, list[dict[str, Any]]]:
    import lightning as L

    from kvframe.eval.models import load_model

    _quiet_lightning()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    run_name = cfg.run_name or os.environ.get("KVFRAME_RUN_NAME") or _dt.datetime.now().strftime("eval-%Y%m%d-%H%M%S-%f")
    os.environ["KVFRAME_RUN_NAME"] = run_name  # DDP children re-run the command: same run directory
    run_dir = Path(cfg.output_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    rank0 = _rank() == 0
    if rank0:
        print(f"kvframe eval: run directory {run_dir}", flush=True)
    L.seed_everything(cfg.seed, verbose=False)

    accelerator, device = _accelerator(cfg.device)
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=device)
    cells = _plan(cfg, tasks, plans, tok, torch.device(device).type)
    pred_path = run_dir / "predictions.jsonl"
    cells_path = run_dir / "cells.json"
    if rank0:
        drop_partial_line(pred_path)
    known = {**read_identities(cells_path), **{c.fingerprint: c.identity for c in cells}}
    state = resume_state(read_predictions(pred_path), {c.key: c.fingerprint for c in cells}, known, run_dir)
    if rank0:
        write_identities(cells_path, {c.fingerprint: c.identity for c in cells})
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

    loggers = _loggers(cfg, run_dir, user_wandb_dirs)
    errors: dict[tuple[str, str, str, str], str] = {}
    progress = _grid_progress(cfg, cells, state) if rank0 and cfg.grid_progress else None
    tail = PredictionsTail(pred_path) if progress is not None else None
    try:
        if progress is not None:
            progress.start()
        for i, cell in enumerate(cells):
            done = state.done_ids(cell.key)
            if len(done) == len(cell.samples):
                continue
            extra = []
            if progress is not None and tail is not None:
                tail.new_records()  # records appended before this cell are not its samples
                progress.cell_started(i)
                extra.append(lightning_callback(progress, tail))
            try:
                _run_cell(L, cfg, accelerator, model, tok, cell, done, pred_path, loggers, extra)
            except (KeyboardInterrupt, EvalInterrupted):
                raise
            except Exception as exc:  # one failing cell must not lose the grid: record it, go on
                errors[cell.key] = f"{type(exc).__name__}: {exc}"
                if progress is not None:
                    progress.close()
                print(f"kvframe eval: cell {cell.name} failed: {errors[cell.key]}", file=sys.stderr, flush=True)
                with (run_dir / "errors.log").open("a") as f:
                    f.write(f"--- {_dt.datetime.now().isoformat()} {cell.name}\n{traceback.format_exc()}\n")
            if progress is not None and tail is not None:
                progress.samples_finished(tail.new_records())
                progress.cell_finished(failed=cell.key in errors)
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        if rank0:
            _finish(cfg, run_dir, cells, pred_path, errors, loggers, tasks, interrupted=True)
        _close_loggers(loggers)
        raise EvalInterrupted(run_dir) from None
    if progress is not None:
        progress.close()
    if not rank0:
        _close_loggers(loggers)
        return run_dir, []
    try:
        records = _finish(cfg, run_dir, cells, pred_path, errors, loggers, tasks)
    finally:
        _close_loggers(loggers)
    return run_dir, records


def _grid_progress(cfg: DictConfig, cells: list[_Cell], state: Any) -> GridProgress:
    """The grid's progress line on stderr: redrawn in place on a terminal that Lightning's bars
    (stdout) do not share; otherwise plain lines (after each cell, and after a sample every
    :data:`~kvframe.eval.progress.SAMPLE_LINE_INTERVAL_S` seconds unless Lightning draws bars on
    the terminal)."""
    tty = sys.stderr.isatty()
    bars = bool(cfg.progress_bar)
    return GridProgress(
        [(len(c.samples), len(state.done_ids(c.key))) for c in cells],
        stream=sys.stderr,
        live=tty and not bars,
        sample_interval=None if tty and bars else SAMPLE_LINE_INTERVAL_S,
    )


def _run_cell(
    L: Any, cfg: DictConfig, accelerator: str, model: Any, tok: Any, cell: _Cell, done: set[str], pred_path: Path,
    loggers: list[Any], callbacks: list[Any] | None = None,
) -> None:
    from kvframe.eval.module import EvalModule, TaskDataModule

    callbacks = list(callbacks or [])
    if cfg.progress_bar:
        callbacks.append(cell_bar(cell.name))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=bool(cfg.progress_bar),
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        inference_mode=False,  # no_grad instead: AsymKV's scoring pass takes key gradients
    )
    meta = {"method": cell.plan.label, "budget": cell.plan.budget, "task": cell.task.label, "mode": cell.mode,
            "fingerprint": cell.fingerprint}
    b = cell.plan.budget if cell.plan.budget is not None else "full"
    module = EvalModule(model, tok, cell.plan.compressor, cell.task.task, meta, pred_path, cfg.max_new_tokens, cell.mode,
                        log_prefix=f"{cell.plan.label}/{b}/{cell.task.label}/{cell.mode}/")
    try:
        trainer.test(module, datamodule=TaskDataModule(cell.task.task, tok, done, cell.samples), verbose=False)
    except SystemExit:
        # Lightning turns Ctrl-C into SystemExit(1) after a graceful shutdown and leaves SIGINT ignored
        if trainer.interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
        raise
    if trainer.world_size > 1:
        trainer.strategy.barrier()


def _finish(
    cfg: DictConfig, run_dir: Path, cells: list[_Cell], pred_path: Path, errors: dict[Any, str], loggers: list[Any],
    tasks: list[TaskPlan], interrupted: bool = False,
) -> list[dict[str, Any]]:
    """Aggregate finished samples into ``results.json``/``results.md`` (and plots, W&B summary)."""
    rows = read_predictions(pred_path)
    known = {c.key: c.fingerprint for c in cells}
    state = resume_state(rows, known, {c.fingerprint: c.identity for c in cells}, run_dir)
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "versions": versions(), "git_commit": git_commit(),
            "seed": cfg.seed, "machine": machine()}
    records = []
    for c in cells:
        got = state.rows(c.key, [s.id for s in c.samples])
        err = errors.get(c.key)
        if err is None and len(got) < len(c.samples):
            if not interrupted:
                err = f"only {len(got)} of {len(c.samples)} samples finished"
            elif not got:
                continue  # not reached before the interruption
        value, extra = summarize(c.task.task, got) if got and err is None else (None, {})
        if err is None and interrupted and len(got) < len(c.samples):
            extra["partial"] = f"{len(got)} of {len(c.samples)} samples (interrupted)"
        records.append(record(method=c.plan.label, budget=c.plan.budget, task=c.task.label, mode=c.mode, metric=c.task.task.metric,
                              rows=got, value=value, extra=extra, identity=c.identity, fp=c.fingerprint, meta=meta, error=err))
    add_bucket_ratios([r for r in records if r["status"] == "ok"])
    (run_dir / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    table = format_table(records)
    (run_dir / "results.md").write_text(table + "\n")
    if interrupted:
        return records
    plots = []
    if cfg.plots:
        from kvframe.eval.plots import make_plots

        plots = make_plots(records, rows, run_dir / "plots", {t.label: t.task for t in tasks})
    _log_summary(loggers, records, plots, run_dir.name)
    print(table, flush=True)
    print(f"results: {run_dir / 'results.json'}", flush=True)
    return records


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


def _log_summary(loggers: list[Any], records: list[dict[str, Any]], plots: list[Path], run_name: str) -> None:
    """The leaderboard table (:func:`kvframe.eval.report.leaderboard_table`, the table ``kvframe report``
    writes and logs) and the plots to W&B; CSV already has the per-cell metrics."""
    from kvframe.eval.report import leaderboard_table

    for lg in loggers:
        if type(lg).__name__ != "WandbLogger":
            continue
        import wandb

        columns, rows = leaderboard_table([{**r, "run": run_name} for r in records])
        lg.experiment.log({"leaderboard": wandb.Table(columns=columns, data=rows),
                           **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
