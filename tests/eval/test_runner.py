"""`kvframe eval` through Lightning: results files and schema, resume, W&B offline + CSV, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvframe.cli import main
from kvframe.errors import ConfigError
from kvframe.eval.runner import RESULT_FIELDS, format_table, load_config, validate_results

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_eval_quick_writes_results_and_resumes(tmp_path, capsys):
    args = ["eval", str(ROOT / "configs" / "eval_quick.yaml"), f"output_dir={tmp_path}", "run_name=r1", "progress_bar=false"]
    assert main(args) == 0
    run = tmp_path / "r1"
    records = json.loads((run / "results.json").read_text())
    validate_results(records)
    assert [(r["method"], r["budget"]) for r in records] == [("full", None), ("snapkv", 0.5)]
    full, snap = records
    assert full["value"] == 1.0  # SmolLM2 finds a 512-token passkey uncompressed
    assert snap["cache_kv_bytes"] * 2 == pytest.approx(full["cache_kv_bytes"], rel=0.01)
    for r in records:
        assert r["metric"] == "accuracy" and r["samples"] == 1 and r["compressor"]["budget"] in (0.5, 1.0)
        assert r["versions"]["transformers"] and r["versions"]["lightning"] and "config" in r and r["seed"] == 0
        assert len(r["content_hash"]) == 64
    assert records[0]["content_hash"] == records[1]["content_hash"]
    # outputs: table, plots, CSV logs, an offline W&B run (no network, no account)
    assert (run / "results.md").read_text().startswith("| method")
    assert (run / "plots" / "passkey_score_vs_budget.png").stat().st_size > 1000
    assert list((run / "csv").rglob("metrics.csv"))
    assert list((run / "wandb").rglob("*.wandb"))
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
    assert lines[0] == preds[0] and json.loads(lines[-1])["method"] == "snapkv" and len(lines) == 2


@pytest.mark.slow
def test_ddp_two_cpu_processes_evaluate_each_sample_once(tmp_path):
    """2 gloo processes: every sample exactly once, and the same results as one process."""
    common = [
        "tasks=[{name: passkey, n_samples: 3, length: 256}]", "methods=[full,knorm]", "budgets=[0.5]",
        "max_new_tokens=6", "progress_bar=false", "wandb.mode=disabled", f"output_dir={tmp_path}", "threads=1",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("KVFRAME_RUN_NAME", None)
    cmd = [sys.executable, "-m", "kvframe.cli", "eval"]
    ddp = subprocess.run(cmd + common + ["run_name=ddp", "devices=2", "strategy=ddp"], capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(cmd + common + ["run_name=one"], capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    preds = [json.loads(x) for x in (tmp_path / "ddp" / "predictions.jsonl").read_text().splitlines()]
    keys = [(p["method"], p["sample_id"]) for p in preds]
    assert len(keys) == len(set(keys)) == 6  # 2 methods x 3 samples, no duplicates, none lost
    assert {p["rank"] for p in preds} == {0, 1}
    one = {(p["method"], p["sample_id"]): p for p in map(json.loads, (tmp_path / "one" / "predictions.jsonl").read_text().splitlines())}
    for p in preds:
        q = one[(p["method"], p["sample_id"])]
        assert p["prediction"] == q["prediction"] and p["score"] == q["score"]
    r_ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    r_one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [(r["method"], r["value"], r["samples"]) for r in r_ddp] == [(r["method"], r["value"], r["samples"]) for r in r_one]


def test_default_config_parses_and_table_formats():
    cfg = load_config(ROOT / "kvframe" / "eval" / "configs" / "eval_default.yaml")
    assert "full" in list(cfg.methods) and len(cfg.budgets) == 2
    row = {k: 0 for k in RESULT_FIELDS}
    row.update(method="full", budget=None, task="passkey", metric="accuracy", value=1.0, samples=3, cache_kv_bytes=2**20)
    table = format_table([row])
    assert "| full |" in table and "1.000" in table


def test_compile_override_reaches_every_method():
    from kvframe.eval.runner import _make

    cfg = load_config(None, ["compile=false", "methods=[snapkv, {name: kvslimmer, budgets: [0.5]}]"])
    assert cfg.compile is False
    assert _make("snapkv", 0.5, cfg.compile).compile is False
    assert _make("snapkv", 0.5, None).compile == "auto"


@pytest.mark.parametrize(
    "override, needle",
    [
        (["tasks=[{name: pasky}]"], "passkey"),
        (["methods=[snapkvv]"], "snapkv"),
        (["budgets=[1.5]"], "ratio in (0, 1]"),
        (["mode=agnostic"], "query_agnostic"),
        (["tasks=[{name: passkey, lenght: 10}]"], "length"),
        (["wandb.mode=cloud"], "offline"),
        (["methods=[{name: weightedkv, budgets: []}]"], "empty budgets"),
        (["compile=always"], "accepted: auto"),
    ],
)
def test_bad_config_fails_before_loading_the_model(override, needle, monkeypatch):
    import kvframe.eval.models

    monkeypatch.setattr(kvframe.eval.models, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, override)


def test_results_schema_rejects_bad_records():
    good = {k: 0 for k in RESULT_FIELDS}
    good.update(method="m", budget=0.5, task="t", metric="accuracy", value=0.5, samples=1, content_hash="a" * 64)
    validate_results([good])
    for key, bad in [("samples", 0), ("content_hash", "x"), ("budget", "half"), ("prefill_s", -1.0)]:
        with pytest.raises(ValueError, match=key):
            validate_results([{**good, key: bad}])
    with pytest.raises(ValueError, match="missing"):
        validate_results([{k: v for k, v in good.items() if k != "compressor"}])
