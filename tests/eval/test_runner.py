"""`kvframe eval` through Lightning: results files and schema, resume, W&B offline + CSV, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvframe.cli import main
from kvframe.eval.config import load_config
from kvframe.eval.results import validate_results

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
        assert r["metric"] == "accuracy" and r["samples"] == 1 and r["compressor"]["budget"] == r["budget"] and r["status"] == "ok"
        assert r["versions"]["transformers"] and r["versions"]["lightning"] and "config" in r and r["seed"] == 0
        assert len(r["content_hash"]) == 64
    assert records[0]["content_hash"] == records[1]["content_hash"]
    # outputs: table, plots, CSV logs, an offline W&B run (no network, no account)
    assert (run / "results.md").read_text().startswith("| method")
    assert (run / "plots" / "passkey_query_agnostic_score_vs_budget.png").stat().st_size > 1000
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
        "max_new_tokens=6", "mode=query_agnostic", "progress_bar=false", "wandb.mode=disabled", f"output_dir={tmp_path}",
        "threads=1",
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


def _run(args: list[str]) -> int:
    return main(["eval", *args])


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.parametrize(
    "change, differs",
    [
        (["max_new_tokens=1"], "decoding.max_new_tokens: 4 -> 1"),
        (["dtype=bfloat16"], "dtype: 'float32' -> 'bfloat16'"),
        (["tasks=[{name: passkey, n_samples: 2, length: 256, seed: 7}]"], "task.config.seed: 0 -> 7"),
        (["methods=[full, {base: knorm, compile: false}]"], "compressor.compile: 'auto' -> False"),
    ],
)
def test_resume_refuses_samples_computed_under_another_config(eval_args, tmp_path, capsys, change, differs):
    assert _run(eval_args()) == 0
    preds = tmp_path / "runs" / "r" / "predictions.jsonl"
    before = _lines(preds)
    assert len(before) == 4 and all(len(json.loads(x)["fingerprint"]) == 64 for x in before)
    capsys.readouterr()
    assert _run(eval_args(*change)) == 2
    err = capsys.readouterr().err
    assert "already holds samples computed under another configuration" in err and differs in err, err
    assert "run_name=" in err  # says how to proceed
    assert _lines(preds) == before  # nothing run, nothing mixed


def test_resume_refuses_another_model(eval_args, tmp_path, capsys, smollm2_tokenizer):
    from kvframe.testing import tiny_model

    other = tmp_path / "other_lm"
    tiny_model("llama", seed=1, vocab_size=len(smollm2_tokenizer), max_position_embeddings=4096).save_pretrained(other)
    smollm2_tokenizer.save_pretrained(other)
    assert _run(eval_args()) == 0
    capsys.readouterr()
    assert _run(eval_args(f"model={other}")) == 2
    assert "model.name" in capsys.readouterr().err


def test_resume_reuses_identical_cells_and_runs_only_new_ones(eval_args, tmp_path):
    assert _run(eval_args()) == 0
    preds = tmp_path / "runs" / "r" / "predictions.jsonl"
    first = _lines(preds)
    assert _run(eval_args()) == 0
    assert _lines(preds) == first  # every cell finished: nothing re-scored
    # more methods and a changed max_new_tokens... no: a new method only adds its own cells
    assert _run(eval_args("methods=[full, knorm, streaming_llm]")) == 0
    lines = _lines(preds)
    assert lines[:4] == first and [json.loads(x)["method"] for x in lines[4:]] == ["streaming_llm"] * 2
    records = json.loads((tmp_path / "runs" / "r" / "results.json").read_text())
    validate_results(records)
    assert [(r["method"], r["samples"], r["status"]) for r in records] == [("full", 2, "ok"), ("knorm", 2, "ok"), ("streaming_llm", 2, "ok")]


def test_records_without_fingerprint_are_not_reused(eval_args, tmp_path, capsys):
    assert _run(eval_args()) == 0
    preds = tmp_path / "runs" / "r" / "predictions.jsonl"
    old = [json.loads(x) for x in _lines(preds)]
    for r in old:
        r.pop("fingerprint")
    preds.write_text("".join(json.dumps(r) + "\n" for r in old))
    capsys.readouterr()
    assert _run(eval_args()) == 2
    assert "carry no configuration fingerprint" in capsys.readouterr().err


def test_same_name_variants_each_run_and_report_their_own_numbers(eval_args, tmp_path):
    methods = "methods=[knorm, {base: knorm, seed: 3, selector: {name: topk, fold: right}, value_merge: sum}]"
    assert _run(eval_args(methods)) == 0
    records = json.loads((tmp_path / "runs" / "r" / "results.json").read_text())
    validate_results(records)
    labels = [r["method"] for r in records]
    assert labels[0] == "knorm" and labels[1].startswith("knorm[") and "seed=3" in labels[1] and "value_merge.name=sum" in labels[1]
    assert all(r["samples"] == 2 and r["status"] == "ok" for r in records)
    assert records[0]["compressor"]["value_merge"]["name"] == "drop" and records[1]["compressor"]["value_merge"]["name"] == "sum"
    assert records[0]["fingerprint"] != records[1]["fingerprint"]
    preds = [json.loads(x) for x in _lines(tmp_path / "runs" / "r" / "predictions.jsonl")]
    assert sorted((p["method"], p["sample_id"]) for p in preds) == sorted((m, s) for m in labels for s in {p["sample_id"] for p in preds})


def test_failing_cell_is_recorded_and_the_grid_goes_on(eval_args, tmp_path, capsys):
    # an absolute budget larger than the 256-token prompts fails in its cell only
    code = _run(eval_args("methods=[knorm, streaming_llm]", "budgets=[4096, 0.5]"))
    assert code == 1
    err = capsys.readouterr().err
    assert "2 of 4 cells failed" in err and "larger than the prompt" in err
    run = tmp_path / "runs" / "r"
    records = json.loads((run / "results.json").read_text())
    validate_results(records)
    status = {(r["method"], r["budget"]): r["status"] for r in records}
    assert status == {("knorm", 4096): "failed", ("knorm", 0.5): "ok", ("streaming_llm", 4096): "failed", ("streaming_llm", 0.5): "ok"}
    failed = [r for r in records if r["status"] == "failed"]
    assert all("ConfigError: budget=4096 tokens is larger than the prompt" in r["error"] and r["value"] is None for r in failed)
    assert "FAILED" in (run / "results.md").read_text()
    assert "Traceback" in (run / "errors.log").read_text()
    ok = [r for r in records if r["status"] == "ok"]
    assert all(r["samples"] == 2 for r in ok)


def test_evaluate_twice_in_one_process_leaks_nothing(eval_args, tmp_path, monkeypatch):
    import torch

    from kvframe.eval.runner import evaluate

    for var in ("KVFRAME_RUN_NAME", "WANDB_MODE", "WANDB_DIR", "WANDB_SILENT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "user_wandb_config"))
    threads = torch.get_num_threads()
    cfg1 = load_config(None, eval_args("wandb.mode=offline", "threads=1", run_name=None))
    dir1, rec1 = evaluate(cfg1)
    assert os.environ.get("KVFRAME_RUN_NAME") is None and os.environ.get("WANDB_MODE") is None
    assert os.environ.get("WANDB_DIR") is None and os.environ["WANDB_CONFIG_DIR"] == str(tmp_path / "user_wandb_config")
    assert torch.get_num_threads() == threads
    cfg2 = load_config(None, eval_args("methods=[streaming_llm]", "wandb.mode=offline", run_name=None))
    dir2, rec2 = evaluate(cfg2)
    assert dir1 != dir2
    assert [r["method"] for r in rec2] == ["streaming_llm"]
    assert {json.loads(x)["method"] for x in _lines(dir1 / "predictions.jsonl")} == {"full", "knorm"}
    assert {json.loads(x)["method"] for x in _lines(dir2 / "predictions.jsonl")} == {"streaming_llm"}
    assert list((dir1 / "wandb").rglob("*.wandb")) and list((dir2 / "wandb").rglob("*.wandb"))


def test_ctrl_c_keeps_finished_samples_and_says_how_to_resume(eval_args, tmp_path, capsys, monkeypatch):
    import signal

    import kvframe.eval.module as module

    real = module.generate_answer
    calls = {"n": 0}

    def interrupted_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, "generate_answer", interrupted_on_third)
    args = eval_args()
    assert _run(args) == 130
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "r"
    assert "interrupted" in err and str(run / "predictions.jsonl") in err and "run_name=r" in err and "kvframe eval model=" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Lightning had set it to ignore
    assert len(_lines(run / "predictions.jsonl")) == 2  # the two samples of the first cell
    partial = json.loads((run / "results.json").read_text())
    assert [(r["method"], r["samples"]) for r in partial] == [("full", 2)]
    monkeypatch.setattr(module, "generate_answer", real)
    assert _run(args) == 0
    assert len(_lines(run / "predictions.jsonl")) == 4


# ---------------------------------------------------------------------------------------------
# mode as a grid dimension


def _records(run: Path) -> list[dict]:
    records = json.loads((run / "results.json").read_text())
    validate_results(records)
    return records


def test_two_modes_give_a_cell_per_mode_and_perplexity_runs_once(eval_args, tmp_path, capsys):
    tasks = "tasks=[{name: passkey, n_samples: 2, length: 256}, {name: perplexity, n_samples: 1, length: 48, prefill: 32, buckets: 2}]"
    assert _run(eval_args(tasks, "mode=[query_agnostic, query_aware]")) == 0
    run = tmp_path / "runs" / "r"
    records = _records(run)
    assert [(r["method"], r["task"], r["mode"]) for r in records] == [
        ("full", "passkey", "query_agnostic"), ("knorm", "passkey", "query_agnostic"),
        ("full", "passkey", "query_aware"), ("knorm", "passkey", "query_aware"),
        ("full", "perplexity", "stream"), ("knorm", "perplexity", "stream"),
    ]
    assert all(r["status"] == "ok" and r["samples"] == (1 if r["task"] == "perplexity" else 2) for r in records)
    fps = [r["fingerprint"] for r in records]
    assert len(set(fps)) == 6  # each mode is its own configuration
    preds = [json.loads(x) for x in _lines(run / "predictions.jsonl")]
    assert len(preds) == 2 * 2 * 2 + 2  # passkey: 2 methods x 2 modes x 2 samples; perplexity: 2 methods x 1 stream
    by_mode = {m: [p for p in preds if p["mode"] == m] for m in ("query_agnostic", "query_aware", "stream")}
    assert [len(v) for v in by_mode.values()] == [4, 4, 2]
    # the mode reached the model: query_aware prefills the question too, query_agnostic only the context
    for a, w in zip(by_mode["query_agnostic"], by_mode["query_aware"]):
        assert (a["method"], a["sample_id"]) == (w["method"], w["sample_id"])
        assert w["prefill_tokens"] == w["prompt_tokens"] - 1 > a["prefill_tokens"]
    assert all(p["fingerprint"] == next(r["fingerprint"] for r in records if r["method"] == p["method"] and r["task"] == p["task"]
                                         and r["mode"] == p["mode"]) for p in preds)
    table = (run / "results.md").read_text()
    assert "| knorm | 0.5 | passkey | query_aware | accuracy |" in table and "| full | — | perplexity | stream | perplexity |" in table


def test_a_changed_mode_list_runs_only_the_new_cells(eval_args, tmp_path):
    run = tmp_path / "runs" / "r"
    args = eval_args("methods=[knorm]")
    assert _run(args) == 0  # query_agnostic, the default
    first = _lines(run / "predictions.jsonl")
    assert [json.loads(x)["mode"] for x in first] == ["query_agnostic"] * 2
    assert _run([*args, "mode=[query_agnostic, query_aware]"]) == 0
    lines = _lines(run / "predictions.jsonl")
    assert lines[:2] == first and [json.loads(x)["mode"] for x in lines[2:]] == ["query_aware"] * 2
    assert [(r["method"], r["mode"]) for r in _records(run)] == [("knorm", "query_agnostic"), ("knorm", "query_aware")]
    # each mode resumes on its own: drop one query_aware sample (as an interruption would), run again
    (run / "predictions.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert _run([*args, "mode=[query_aware, query_agnostic]"]) == 0
    again = _lines(run / "predictions.jsonl")
    assert again[:-1] == lines[:-1] and json.loads(again[-1])["sample_id"] == json.loads(lines[-1])["sample_id"]
    # one mode alone reports its own cells, nothing runs
    assert _run([*args, "mode=query_aware"]) == 0
    assert _lines(run / "predictions.jsonl") == again
    assert [r["mode"] for r in _records(run)] == ["query_aware"]


def test_a_run_directory_written_before_modes_were_a_dimension_resumes(eval_args, tmp_path, capsys):
    """Records without ``mode`` belong to the mode their fingerprint was computed under."""
    run = tmp_path / "runs" / "r"
    args = eval_args("methods=[knorm]")
    assert _run([*args, "mode=query_aware"]) == 0
    old = [json.loads(x) for x in _lines(run / "predictions.jsonl")]
    for r in old:
        r.pop("mode")
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert _run([*args, "mode=[query_agnostic, query_aware]"]) == 0
    lines = [json.loads(x) for x in _lines(run / "predictions.jsonl")]
    assert lines[:2] == old and [x["mode"] for x in lines[2:]] == ["query_agnostic"] * 2  # only the new mode ran
    assert [(r["method"], r["mode"], r["samples"]) for r in _records(run)] == [("knorm", "query_agnostic", 2), ("knorm", "query_aware", 2)]
    # without cells.json and with a changed setting, the mode of the old samples is unknown: refused, nothing mixed
    (run / "cells.json").unlink()
    capsys.readouterr()
    assert _run([*args, "mode=[query_agnostic, query_aware]", "max_new_tokens=2"]) == 2
    err = capsys.readouterr().err
    assert "already holds samples computed under another configuration" in err
    assert "knorm / budget 0.5 / passkey / query_aware: its samples carry fingerprint " in err
    assert "a configuration cells.json does not describe" in err


# ---------------------------------------------------------------------------------------------
# the grid's progress line


def _progress_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("kvframe eval: cells ")]


def _shape(line: str) -> str:
    """A progress line with its time values replaced by T (they depend on the machine); a zero ETA
    (nothing left) and an unknown one (-) stay."""
    import re

    return re.sub(r"ETA (?!0:00:00)\d+:\d\d:\d\d", "ETA T", re.sub(r"elapsed \d+:\d\d:\d\d", "elapsed T", line))


def test_progress_line_counts_cells_and_samples(eval_args, tmp_path, capsys, monkeypatch):
    import kvframe.eval.runner as runner

    monkeypatch.setattr(runner, "SAMPLE_LINE_INTERVAL_S", None)  # one line per cell, whatever the machine's speed
    args = eval_args("budgets=[4096, 0.5]")  # knorm at 4096 tokens fails (the prompts have 256)
    assert _run(args) == 1
    lines = _progress_lines(capsys.readouterr().err)
    assert [_shape(x) for x in lines] == [
        "kvframe eval: cells 0/3 | samples 0/6 | elapsed T | ETA -",
        "kvframe eval: cells 1/3 | samples 2/6 | elapsed T | ETA T",
        "kvframe eval: cells 2/3 (1 failed) | samples 2/6 | elapsed T | ETA T",
        "kvframe eval: cells 3/3 (1 failed) | samples 4/6 | elapsed T | ETA 0:00:00",
    ]
    # resumed: finished samples count as done but not toward the speed; only the failed cell runs again
    assert _run(args) == 1
    lines = _progress_lines(capsys.readouterr().err)
    assert [_shape(x) for x in lines] == [
        "kvframe eval: cells 2/3 | samples 4/6 (4 resumed) | elapsed T | ETA -",
        "kvframe eval: cells 3/3 (1 failed) | samples 4/6 (4 resumed) | elapsed T | ETA 0:00:00",
    ]
    # its own switch, independent of Lightning's bars
    assert _run(args + ["grid_progress=false"]) == 1
    assert _progress_lines(capsys.readouterr().err) == []
