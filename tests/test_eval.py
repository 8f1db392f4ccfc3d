"""The first evaluation runner: real SmolLM2 run, results files, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvframe.cli import main
from kvframe.evaluate import format_table, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_eval_quick_writes_results_and_resumes(tmp_path, capsys):
    args = ["eval", str(ROOT / "configs" / "eval_quick.yaml"), f"output_dir={tmp_path}", "run_name=r1"]
    assert main(args) == 0
    run = tmp_path / "r1"
    records = json.loads((run / "results.json").read_text())
    assert [(r["method"], r["budget"]) for r in records] == [("full", None), ("snapkv", 0.5)]
    full, snap = records
    assert full["value"] == 1.0  # SmolLM2 finds a 512-token passkey uncompressed
    assert snap["cache_kv_bytes"] * 2 == pytest.approx(full["cache_kv_bytes"], rel=0.01)
    for r in records:
        assert r["metric"] == "accuracy" and r["samples"] == 1 and r["compressor"]["budget"] in (0.5, 1.0)
        assert r["versions"]["transformers"] and "config" in r
    preds = (run / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 2
    out = capsys.readouterr().out
    assert "accuracy" in out and "snapkv" in out
    # resume: a finished run is never scored twice
    assert main(args) == 0
    assert (run / "predictions.jsonl").read_text().splitlines() == preds
    # an interrupted line (cut mid-write) is run again, finished ones are kept
    (run / "predictions.jsonl").write_text(preds[0] + "\n" + preds[1][:20])
    assert main(args) == 0
    lines = (run / "predictions.jsonl").read_text().splitlines()
    assert lines[0] == preds[0] and json.loads(lines[-1])["method"] == "snapkv"


def test_default_config_parses_and_table_formats():
    cfg = load_config(ROOT / "kvframe" / "configs" / "eval_default.yaml")
    assert list(cfg.methods) == ["full", "streaming_llm", "snapkv"] and list(cfg.budgets) == [0.5, 0.25]
    table = format_table([{"method": "full", "budget": None, "task": "passkey", "value": 1.0, "samples": 3,
                           "cache_kv_bytes": 2**20, "prefill_s": 1.0, "compression_s": 0.0, "decode_s": 0.5}])
    assert "full" in table and "1.00" in table
