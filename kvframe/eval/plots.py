"""PNG plots of a run: score vs budget per task, needle heatmaps, perplexity vs position."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _safe(label: str) -> str:
    """A file-name-safe form of a method or task label (``snapkv[scorer.window=8]``)."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")


def make_plots(records: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path, tasks: Mapping[str, Any]) -> list[Path]:
    """Score vs budget per method and task; needle heatmaps; perplexity vs position (PNG).

    ``records`` are the run's results (failed cells are skipped); ``rows`` the finished sample
    records that produced them; ``tasks`` maps task labels to tasks. A task with a ``plot(rows,
    path)`` method (the needle grid's heatmap) gets one picture per cell from its sample records.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    records = [r for r in records if r.get("status", "ok") == "ok"]
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
        p = out / f"{_safe(task)}_score_vs_budget.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    for r in records:
        plot = getattr(tasks.get(r["task"]), "plot", None)
        if callable(plot):
            cell = [d for d in rows if d.get("fingerprint") == r["fingerprint"]]
            paths.append(plot(cell, out / f"{_safe(r['task'])}_{_safe(r['method'])}_{r['budget']}.png"))
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
