"""The built-in default evaluation (what ``kvframe eval`` with no arguments runs) tells methods apart.

Checked on its committed results (``benchmarks/results/eval_default.json``, written by
``benchmarks/eval_default.py`` from a real run): they must come from the current default config, and
at least two tasks must show different scores for different methods at the same budget and mode.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from kvframe.eval.config import default_config_path, load_config
from kvframe.eval.results import validate_results

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "eval_default.json"
RUN_KEYS = ("output_dir", "run_name", "progress_bar", "grid_progress", "wandb", "threads", "plots")


def _records() -> list[dict]:
    records = json.loads(RESULTS.read_text())
    validate_results(records)
    return records


def _scientific(config: dict) -> dict:
    """The config minus settings that only say where and how visibly a run goes."""
    return {k: v for k, v in config.items() if k not in RUN_KEYS}


def test_committed_results_are_those_of_the_current_default():
    current = OmegaConf.to_container(load_config(default_config_path()), resolve=True)
    records = _records()
    assert records and all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["status"] != "ok"]
    for r in records:
        assert _scientific(r["config"]) == _scientific(current), (
            "benchmarks/results/eval_default.json was computed under another default; re-run "
            "python benchmarks/eval_default.py"
        )


def test_default_grid_has_both_modes_three_budgets_and_graded_tasks():
    records = _records()
    assert {r["mode"] for r in records} >= {"query_aware", "query_agnostic"}
    budgets = {r["budget"] for r in records if r["budget"] is not None}
    assert len(budgets) >= 3
    kinds = {r["metric"] for r in records}
    assert "perplexity" in kinds  # a graded score every method gets


def test_methods_differ_at_the_same_budget_on_at_least_two_tasks():
    by_cell: dict[tuple, set[float]] = defaultdict(set)
    for r in _records():
        if r["budget"] is not None:
            by_cell[(r["task"], r["mode"], r["budget"])].add(round(float(r["value"]), 6))
    discriminating = {task for (task, _, _), values in by_cell.items() if len(values) > 1}
    assert len(discriminating) >= 2, dict(by_cell)
