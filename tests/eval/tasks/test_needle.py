"""kvframe.eval.tasks.needle: the length x depth needle grid and its heatmap."""

from __future__ import annotations

import importlib.util
import re

import pytest

from kvframe.errors import ConfigError
from kvframe.eval.tasks.base import content_hash
from kvframe.eval.tasks.needle import DEFAULT_GRID_DEPTHS, NeedleGridTask, make_needle_grid, needle_heatmap
from kvframe.eval.tasks.ruler import LENGTH_TOLERANCE, PIP_INSTALL_HINT, count_prompt_tokens

HAS_DATA = importlib.util.find_spec("long_context_eval") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"RULER inputs not installed ({PIP_INSTALL_HINT})")

LENGTHS = [256, 512]
DEPTHS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def grid(tok):
    if not HAS_DATA:
        pytest.skip(f"RULER inputs not installed ({PIP_INSTALL_HINT})")
    return NeedleGridTask(lengths=LENGTHS, depths=DEPTHS, seed=0, n_per_cell=2).samples(tok)


def test_grid_cells_lengths_and_needles(grid, tok):
    assert len(grid) == len(LENGTHS) * len(DEPTHS) * 2 and len({s.id for s in grid}) == len(grid)
    assert [(s.meta["target_length"], s.meta["depth"]) for s in grid[::2]] == [(n, d) for n in LENGTHS for d in DEPTHS]
    for s in grid:
        assert s.meta["task"] == "needle" and s.meta["metric"] == "string_match_all"
        n = count_prompt_tokens(tok, s.context, s.question)
        assert s.meta["length"] == n and abs(n - s.meta["target_length"]) <= LENGTH_TOLERANCE * s.meta["target_length"]
        (value,) = s.answers
        assert re.fullmatch(r"\d{7}", value) and s.context.count(value) == 1
        assert "One of the special magic numbers for " in s.context
        task = NeedleGridTask(lengths=LENGTHS, depths=DEPTHS)
        assert task.score(f"The number is {value}.", s) == 1.0 and task.score("", s) == 0.0


def test_needle_position_follows_depth(grid):
    for length in LENGTHS:
        for j in range(2):
            cells = [s for s in grid if s.meta["target_length"] == length and s.id.endswith(f"-{j}")]
            rel = [s.context.index(s.answers[0]) / len(s.context) for s in cells]
            assert rel == sorted(rel) and rel[0] < 0.35 and rel[-1] > 0.9, rel


@needs_data
def test_grid_deterministic_and_seeded(grid, tok):
    assert content_hash(make_needle_grid(tok, LENGTHS, DEPTHS, seed=0, n_per_cell=2)) == content_hash(grid)
    other = make_needle_grid(tok, LENGTHS, DEPTHS, seed=1, n_per_cell=2)
    assert all(a.answers != b.answers and a.context != b.context for a, b in zip(grid, other))


def test_grid_validation():
    with pytest.raises(ConfigError, match="lengths"):
        NeedleGridTask(lengths=[])
    with pytest.raises(ConfigError, match="lengths"):
        NeedleGridTask(lengths=[512, -1])
    with pytest.raises(ConfigError, match="out-of-range"):
        NeedleGridTask(lengths=[512], depths=[0.5, 1.5])
    with pytest.raises(ConfigError, match="n_per_cell"):
        NeedleGridTask(lengths=[512], n_per_cell=0)
    assert NeedleGridTask(lengths=[512]).depths == list(DEFAULT_GRID_DEPTHS)


def test_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = [
        {"target_length": n, "length": n + 3, "depth": d, "score": float(d >= 0.5)}
        for n in (1024, 2048)
        for d in DEPTHS
    ]
    records.append({"meta": {"target_length": 1024, "depth": 0.0}, "score": 1.0})  # nested meta, averaged in
    out = needle_heatmap(records, tmp_path / "sub" / "heat.png", title="full")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ConfigError, match="depth"):
        needle_heatmap([{"length": 1024, "score": 1.0}], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="no records"):
        needle_heatmap([], tmp_path / "y.png")
