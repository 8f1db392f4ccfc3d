"""``kvframe report``: one leaderboard from the ``results.json`` of one or more ``kvframe eval`` runs.

Rows are method x budget; each task x mode is a column of the score overview and a table of its
own with the score, the KV cache held after prefill and the time per sample (prefill, compression,
decoding), written as Markdown (``leaderboard.md``), CSV (``leaderboard.csv``, one row per cell)
and one score-vs-budget PNG per task and mode (``plots/``), with methods that never compress
(``full``) as horizontal reference lines. The eval's own W&B run logs the same table
(:func:`leaderboard_table`).

Merging never mixes configurations silently. A cell (method label, budget, task label, mode) held by
two runs under the **same** fingerprint is one cell (the first run's numbers, or the one that
finished where the other failed). Held under **different** fingerprints (another model,
``max_new_tokens``, task parameter, compressor setting, ...) it is a :class:`ReportError` that names
both runs and what differs, unless ``keep_both``: then every method label involved is shown once per
run, as ``method@run``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvframe.errors import KVFrameError
from kvframe.eval.config import STREAM_MODE
from kvframe.eval.results import (
    cell_key,
    describe_cell,
    describe_difference,
    identity_mode,
    read_identities,
    validate_results,
)

#: the columns of ``leaderboard.csv`` and of the W&B ``leaderboard`` table (one row per cell)
LEADERBOARD_COLUMNS = (
    "method", "budget", "task", "mode", "metric", "status", "value", "samples", "cache_kv_bytes", "cache_content_slots",
    "prefill_s", "compression_s", "decode_s", "peak_memory_bytes", "prompt_tokens", "run", "error", "fingerprint",
)
WANDB_MODES = ("offline", "online")


class ReportError(KVFrameError):
    """A run cannot be read, or two runs hold the same cell under different configurations."""


@dataclass
class Run:
    """One run's results: ``name`` labels it (its directory's name, or its path where names repeat)."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    identities: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    records: list[dict[str, Any]]
    markdown: str
    files: list[Path]
    notes: list[str]


# -- reading runs -------------------------------------------------------------------------------
def _with_mode(rec: Any, identities: Mapping[str, Any]) -> Any:
    """A record written before ``mode`` was a grid dimension gets the mode it ran under: from its
    fingerprint's identity in ``cells.json``, else ``stream`` for perplexity, else ``config.mode``."""
    if not isinstance(rec, dict) or "mode" in rec:
        return rec
    mode = identity_mode(identities.get(str(rec.get("fingerprint"))))
    if mode is None:
        extra = rec.get("extra") if isinstance(rec.get("extra"), dict) else {}
        config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
        mode = STREAM_MODE if rec.get("metric") == "perplexity" or "bucket_perplexity" in extra else config.get("mode")
    return {**rec, "mode": mode}


def load_run(path: str | Path) -> Run:
    """A run directory written by ``kvframe eval`` (or its ``results.json``), checked against the
    results schema; errors name the path."""
    p = Path(path)
    if not p.exists():
        raise ReportError(f"{p}: no such run directory; give a directory kvframe eval wrote (output_dir/run_name)")
    run_dir, results = (p, p / "results.json") if p.is_dir() else (p.parent, p)
    if not results.is_file():
        raise ReportError(
            f"{p}: no results.json in this directory; give a directory kvframe eval wrote (it writes results.json "
            "when its cells finish)"
        )
    try:
        data = json.loads(results.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{results}: not a kvframe results file (not readable JSON: {exc})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ReportError(f"{results}: not a kvframe results file (expected a JSON list of cell records)")
    identities = read_identities(run_dir / "cells.json")
    records = [_with_mode(r, identities) for r in data]
    try:
        validate_results(records)
    except ValueError as exc:
        raise ReportError(f"{results}: not a kvframe results file of this schema ({exc}; see docs/evaluation.md)") from None
    return Run(run_dir.name or str(run_dir), run_dir, records, identities)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every run, each named by its directory, or by its path where two directories share a name."""
    if not paths:
        raise ReportError("no run directory given; pass one or more directories kvframe eval wrote")
    runs = [load_run(p) for p in paths]
    seen: dict[Path, int] = {}
    for i, run in enumerate(runs):
        resolved = run.path.resolve()
        if resolved in seen:
            raise ReportError(f"{paths[i]}: the same run as {paths[seen[resolved]]}; give each run once")
        seen[resolved] = i
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.path)
    return runs


# -- merging ------------------------------------------------------------------------------------
def _key(r: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return cell_key(r["method"], r["budget"], r["task"], r["mode"])


def _identity(run: Run, rec: Mapping[str, Any], full: bool) -> dict[str, Any]:
    """What determines a record's numbers: its cell identity from ``cells.json`` (``full``), else what
    the record itself carries."""
    if full:
        return run.identities[rec["fingerprint"]]
    config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    decoding = {} if rec["mode"] == STREAM_MODE else {"mode": rec["mode"], "max_new_tokens": config.get("max_new_tokens")}
    return {"model": rec["model"], "dtype": config.get("dtype"), "device": config.get("device"),
            "task": {"config": rec["task_config"], "content_hash": rec["content_hash"]}, "decoding": decoding,
            "compressor": rec["compressor"], "seed": rec["seed"]}


def _difference(a: Run, ra: Mapping[str, Any], b: Run, rb: Mapping[str, Any]) -> str:
    full = ra["fingerprint"] in a.identities and rb["fingerprint"] in b.identities
    return describe_difference(_identity(a, ra, full), _identity(b, rb, full))


def merge(runs: Sequence[Run], keep_both: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """The runs' records as one list (each with ``run``: its run's name), and notes on cells held
    by several runs under the same configuration. See the module docstring for conflicts."""
    first: dict[tuple[str, str, str, str], tuple[Run, dict[str, Any]]] = {}
    conflicts: list[tuple[Run, dict[str, Any], Run, dict[str, Any]]] = []
    for run in runs:
        for r in run.records:
            held = first.setdefault(_key(r), (run, r))
            if held[0] is not run and held[1]["fingerprint"] != r["fingerprint"]:
                conflicts.append((*held, run, r))
    if conflicts and not keep_both:
        pairs = list(dict.fromkeys((a.name, b.name) for a, _, b, _ in conflicts))
        lines = [f"  {describe_cell(_key(ra))} in {a.name} and {b.name}: {_difference(a, ra, b, rb)}"
                 for a, ra, b, rb in conflicts[:5]]
        more = f"\n  ... and {len(conflicts) - 5} more cells" if len(conflicts) > 5 else ""
        raise ReportError(
            f"runs {' / '.join(f'{x} and {y}' for x, y in pairs)} hold the same cells computed under different "
            "configurations; one table would mix their numbers. What differs:\n" + "\n".join(lines) + more
            + "\nReport them separately, or pass --keep-both to show both, each method labelled method@run."
        )
    relabel = {ra["method"] for _, ra, _, _ in conflicts}
    merged: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    notes = []
    for run in runs:
        for r in run.records:
            r = {**r, "run": run.name}
            if r["method"] in relabel:
                r["method"] = f"{r['method']}@{run.name}"
            key = _key(r)
            old = merged.get(key)
            if old is None:
                merged[key] = r
            elif old["run"] != run.name:
                keep = r if old["status"] != "ok" and r["status"] == "ok" else old
                merged[key] = keep
                notes.append(f"{describe_cell(key)}: the same configuration in {old['run']} and {run.name}; "
                             f"showing {keep['run']}'s numbers")
    return _ordered(list(merged.values())), notes


def _budget_order(budget: Any) -> tuple[int, float]:
    """No budget (never compresses) first, then ratios, then token counts, each largest first."""
    if budget is None:
        return (0, 0.0)
    return (1 if isinstance(budget, float) else 2, -float(budget))


def _ordered(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Methods that never compress (the references, ``full``) first, then the others, each in order
    of first appearance; budgets by :func:`_budget_order`; task x mode columns in order of first
    appearance."""
    names = list(dict.fromkeys(r["method"] for r in records))
    compresses = {r["method"] for r in records if r["budget"] is not None}
    methods = {m: i for i, m in enumerate(sorted(names, key=lambda m: m in compresses))}
    columns = {c: i for i, c in enumerate(dict.fromkeys((r["task"], r["mode"]) for r in records))}
    return sorted(records, key=lambda r: (methods[r["method"]], _budget_order(r["budget"]), columns[(r["task"], r["mode"])]))


# -- tables -------------------------------------------------------------------------------------
def leaderboard_table(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)``: one row per cell with :data:`LEADERBOARD_COLUMNS` (budget as text, empty
    for a method that never compresses; value null for a failed cell). ``leaderboard.csv`` and the
    W&B ``leaderboard`` tables (``kvframe eval``'s and ``kvframe report --wandb``'s) are this table."""
    rows = []
    for r in records:
        row = []
        for c in LEADERBOARD_COLUMNS:
            v = r.get(c)
            if c in ("budget", "run", "error"):
                v = "" if v is None else str(v)
            row.append(v)
        rows.append(row)
    return list(LEADERBOARD_COLUMNS), rows


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _budget_text(budget: Any) -> str:
    return "—" if budget is None else str(budget)


def _error_text(r: Mapping[str, Any], width: int = 80) -> str:
    first = (str(r.get("error") or "").splitlines() or [""])[0]
    return "FAILED: " + (first[:width] + "..." if len(first) > width else first).replace("|", "/")


def column_title(task: str, mode: str, metric: str) -> str:
    return f"{task} · {mode} · {metric}"


def leaderboard_markdown(records: Sequence[Mapping[str, Any]], runs: Sequence[Run] = (), notes: Sequence[str] = ()) -> str:
    """The leaderboard as Markdown: a score overview (rows method x budget, one column per task x
    mode) and a table per task x mode with the score, samples, KV cache held after prefill (bytes
    and content slots), mean seconds per sample (prefill, compression, decoding) and peak memory."""
    records = _ordered([dict(r) for r in records])
    several = len({r.get("run") for r in records}) > 1
    columns = list(dict.fromkeys((r["task"], r["mode"]) for r in records))
    metric = {(r["task"], r["mode"]): r["metric"] for r in records}
    rows = list(dict.fromkeys((r["method"], str(r["budget"])) for r in records))
    cell = {(r["method"], str(r["budget"]), r["task"], r["mode"]): r for r in records}
    budget = {(r["method"], str(r["budget"])): r["budget"] for r in records}
    out = ["# kvframe leaderboard", ""]
    if runs:
        out += ["Runs: " + ", ".join(f"`{run.name}` ({run.path}, {len(run.records)} cells)" for run in runs), ""]
    out += ["## Scores", "", "Rows: method x budget (— : no compression). Columns: task · mode · metric. Empty: not run.", ""]
    out.append("| method | budget | " + " | ".join(column_title(t, m, metric[(t, m)]) for t, m in columns) + " |")
    out.append("|---|---|" + "---|" * len(columns))
    for method, b in rows:
        vals = []
        for t, m in columns:
            r = cell.get((method, b, t, m))
            vals.append("" if r is None else "FAILED" if r["status"] != "ok" else f"{r['value']:.3f}")
        out.append(f"| {method} | {_budget_text(budget[(method, b)])} | " + " | ".join(vals) + " |")
    for t, m in columns:
        out += ["", f"## {column_title(t, m, metric[(t, m)])}", ""]
        head = "| method | budget | score | n | KV held | KV slots | prefill s | compress s | decode s | peak memory |"
        out += [head + (" run |" if several else ""), "|---" * (10 + several) + "|"]
        for r in (x for x in records if x["task"] == t and x["mode"] == m):
            run = f" {r.get('run', '')} |" if several else ""
            lead = f"| {r['method']} | {_budget_text(r['budget'])} |"
            if r["status"] != "ok":
                out.append(f"{lead} {_error_text(r)} | {r['samples']} | | | | | | |{run}")
                continue
            out.append(
                f"{lead} {r['value']:.3f} | {r['samples']} | {_bytes(r['cache_kv_bytes'])} | {r['cache_content_slots']:.0f} | "
                f"{r['prefill_s']:.3f} | {r['compression_s']:.4f} | {r['decode_s']:.3f} | {_bytes(r['peak_memory_bytes'])} |{run}"
            )
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# -- outputs ------------------------------------------------------------------------------------
def write_csv(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    columns, rows = leaderboard_table(records)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(["" if v is None else v for v in row] for row in rows)
    return path


def log_wandb(records: Sequence[Mapping[str, Any]], plots: Sequence[Path], mode: str, out: Path, project: str = "kvframe",
              name: str | None = None) -> Path:
    """Log the leaderboard table and plots to a new W&B run (``offline``: files under ``out/wandb``
    unless ``WANDB_DIR`` says otherwise, synced later with ``wandb sync``); returns the run's directory."""
    if mode not in WANDB_MODES:
        raise ReportError(f"wandb={mode!r}; accepted: {', '.join(WANDB_MODES)}")
    import wandb

    wdir = Path(os.environ.get("WANDB_DIR") or out / "wandb")
    wdir.mkdir(parents=True, exist_ok=True)
    columns, rows = leaderboard_table(records)
    run = wandb.init(project=project, name=name or "kvframe-report", job_type="report", mode=mode, dir=str(wdir),
                     config={"runs": sorted({str(r.get("run")) for r in records})})
    try:
        run.log({"leaderboard": wandb.Table(columns=columns, data=rows), **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
        return Path(run.dir).parent
    finally:
        run.finish()


def report(paths: Sequence[str | Path], out: str | Path = "report", keep_both: bool = False, wandb: str | None = None,
           project: str = "kvframe") -> Report:
    """Merge the runs at ``paths`` into one leaderboard written under ``out`` (``leaderboard.md``,
    ``leaderboard.csv``, ``plots/TASK_MODE_score_vs_budget.png``); optionally logged to W&B."""
    if wandb is not None and wandb not in WANDB_MODES:
        raise ReportError(f"wandb={wandb!r}; accepted: {', '.join(WANDB_MODES)} (or none: no W&B run)")
    runs = load_runs(paths)
    records, notes = merge(runs, keep_both=keep_both)
    if not records:
        raise ReportError(f"no cells to report: the results.json of {', '.join(str(r.path) for r in runs)} hold no records")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: is a file; accepted: a directory (created if missing)")
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    for stale in plots_dir.glob("*_score_vs_budget.png"):  # a report written here before, of other cells
        stale.unlink()
    from kvframe.eval.plots import score_vs_budget

    plots = score_vs_budget(records, plots_dir)
    markdown = leaderboard_markdown(records, runs, notes)
    md = out / "leaderboard.md"
    md.write_text(markdown)
    files = [md, write_csv(records, out / "leaderboard.csv"), *plots]
    if wandb is not None:
        files.append(log_wandb(records, plots, wandb, out, project=project))
    return Report(records, markdown, files, notes)
