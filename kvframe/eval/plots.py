"""PNG plots of a run: score vs budget per task and mode, needle heatmaps, perplexity vs position."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _safe(label: str) -> str:
    """A file-name-safe form of a method or task label (``snapkv[scorer.window=8]``)."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _budget_key(budget: Any) -> tuple[int, float]:
    """Ratios before token counts (``1.0`` is a ratio, ``1`` a token count)."""
    return (0 if isinstance(budget, float) else 1, float(budget))


def score_vs_budget(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per task and mode, ``TASK_MODE_score_vs_budget.png``: each method's score over its
    budgets, and every method that never compresses (``full``) as a dotted horizontal reference line
    in its colour.

    Failed cells are left out. Ratio budgets and token counts do not share an axis: a task whose
    cells use both gets the token counts on a second x axis at the top.
    """
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    records = [r for r in records if r.get("status", "ok") == "ok"]
    paths = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r.get("mode") or ""), []).append(r)
    for (task, mode), rows in groups.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        ratios = any(isinstance(r["budget"], float) for r in rows)
        tokens = any(isinstance(r["budget"], int) and not isinstance(r["budget"], bool) for r in rows)
        top = ax.twiny() if ratios and tokens else None
        methods = list(dict.fromkeys(r["method"] for r in rows))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, method in enumerate(methods):
            color = colors[i % len(colors)]
            mine = [r for r in rows if r["method"] == method]
            label: str | None = method
            for kind, axis, style in ((float, ax, "o-"), (int, top or ax, "s--" if top is not None else "o-")):
                pts = sorted(((r["budget"], r["value"]) for r in mine if type(r["budget"]) is kind), key=lambda p: _budget_key(p[0]))
                if pts:
                    axis.plot([float(b) for b, _ in pts], [v for _, v in pts], style, color=color, label=label)
                    label = None  # one legend entry per method
            for r in mine:
                if r["budget"] is None:
                    ax.axhline(r["value"], linestyle=":", color=color, label=f"{method} (no compression)")
        ax.set_xlabel("budget (ratio of the prompt)" if ratios else "budget (tokens)")
        if top is not None:
            top.set_xlabel("budget (tokens, square markers)")
        ax.set_ylabel(rows[0]["metric"])
        ax.set_title(f"{task} ({mode}): {rows[0]['metric']} vs budget" if mode else f"{task}: {rows[0]['metric']} vs budget")
        handles, labels = ax.get_legend_handles_labels()
        if top is not None:
            h2, l2 = top.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if handles:
            ax.legend(handles, labels, fontsize=7)
        p = out / f"{_safe(task)}_{_safe(mode) + '_' if mode else ''}score_vs_budget.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def make_plots(records: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path, tasks: Mapping[str, Any]) -> list[Path]:
    """Score vs budget per task and mode (:func:`score_vs_budget`); needle heatmaps; perplexity vs
    position (PNG).

    ``records`` are the run's results (failed cells are skipped); ``rows`` the finished sample
    records that produced them; ``tasks`` maps task labels to tasks. A task with a ``plot(rows,
    path)`` method (the needle grid's heatmap) gets one picture per cell from its sample records.
    """
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    records = [r for r in records if r.get("status", "ok") == "ok"]
    paths = score_vs_budget(records, out)
    for r in records:
        plot = getattr(tasks.get(r["task"]), "plot", None)
        if callable(plot):
            cell = [d for d in rows if d.get("fingerprint") == r["fingerprint"]]
            paths.append(plot(cell, out / f"{_safe(r['task'])}_{_safe(r['mode'])}_{_safe(r['method'])}_{r['budget']}.png"))
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
