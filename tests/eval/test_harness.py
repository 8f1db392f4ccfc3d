"""The lm-evaluation-harness backend (``--model kvframe``, ``kvframe lm-eval``), offline: local task
YAMLs over local JSONL data, a tiny random model with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from kvframe.errors import ConfigError  # noqa: E402
from kvframe.eval.harness import KVFrameLM  # noqa: E402

DOCS = [
    {
        "context": f"Report {i}. The storage room holds {3 + i} red boxes and {7 + i} blue crates. "
        f"The courier arrives on day {11 + i} and leaves with the crates.",
        "question": "How many red boxes are in the storage room?",
        "choices": [str(3 + i), str(20 + i), str(40 + i)],
        "label": 0,
        "answer": str(3 + i),
    }
    for i in range(3)
]
PROMPT = "{{context}}\\nQuestion: {{question}}\\nAnswer:"
# the tiny model: 2 layers, 2 KV heads of 16 dims, float32 -> bytes per kept token
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
BYTES_PER_TOKEN = LAYERS * KV_HEADS * HEAD_DIM * 2 * 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two local lm-eval tasks over one JSONL file: multiple choice (loglikelihood) and generation."""
    d = tmp_path_factory.mktemp("lm_tasks")
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\ndoc_to_text: \"{PROMPT}\"\n"
    (d / "mc.yaml").write_text(
        "task: kvf_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (d / "gen.yaml").write_text(
        "task: kvf_gen\n" + common + "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return d


@pytest.fixture(scope="module")
def task_manager(task_dir) -> TaskManager:
    return TaskManager(include_path=str(task_dir), include_defaults=False)


def _run(model, task_manager, tasks=("kvf_mc", "kvf_gen")) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=task_manager, log_samples=True, verbosity="ERROR")


def _metrics(results: dict) -> dict:
    return {task: {k: v for k, v in vals.items() if "," in k} for task, vals in results["results"].items()}


def _responses(results: dict) -> dict:
    return {task: [(s["doc_id"], s["resps"]) for s in samples] for task, samples in results["samples"].items()}


@pytest.fixture(scope="module")
def hf_results(tiny_lm_dir, task_manager) -> dict:
    return _run(HFLM(pretrained=str(tiny_lm_dir), device="cpu"), task_manager)


@pytest.fixture(scope="module")
def full_lm(tiny_lm_dir) -> KVFrameLM:
    return KVFrameLM(pretrained=str(tiny_lm_dir), method="full", question_delimiter="Question:", device="cpu")


@pytest.fixture(scope="module")
def full_results(full_lm, task_manager) -> dict:
    return _run(full_lm, task_manager)


def test_full_equals_hf_exactly(hf_results, full_results):
    assert _metrics(full_results) == _metrics(hf_results)
    # every log-likelihood (float) and every generated string, not only the aggregated metrics
    assert _responses(full_results) == _responses(hf_results)
    mc = _responses(full_results)["kvf_mc"]
    assert [doc_id for doc_id, _ in mc] == list(range(len(DOCS))) and all(len(resps) == 3 for _, resps in mc)


def test_full_records_the_uncompressed_bytes_of_the_compressed_part(full_lm, full_results, tiny_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    records = full_lm.cache_records
    assert [r["request_type"] for r in records].count("loglikelihood") == 3 * len(DOCS)
    assert [r["request_type"] for r in records].count("generate_until") == len(DOCS)
    for r in records:
        doc = DOCS[r["doc_id"]]
        # query_agnostic: the text before "Question:" is the compressed part, token for token
        assert r["compressed_tokens"] == len(tok(doc["context"] + "\n", add_special_tokens=False).input_ids)
        assert r["kv_bytes"] == r["compressed_tokens"] * BYTES_PER_TOKEN
        assert r["content_slots"] == r["compressed_tokens"] * LAYERS * KV_HEADS
        task = "kvf_mc" if r["request_type"] == "loglikelihood" else "kvf_gen"
        assert (r["method"], r["budget"], r["mode"], r["task"]) == ("full", None, "query_agnostic", task)
    summary = full_results["config"]["kvframe"]
    assert summary["requests"] == 4 * len(DOCS)
    assert summary["mean_kv_bytes"] == sum(r["kv_bytes"] for r in records) / len(records)
    assert summary["compressor"]["trigger"]["name"] == "never"


def test_compressor_runs_and_holds_fewer_bytes(tiny_lm_dir, task_manager, full_lm, full_results, tmp_path):
    log = tmp_path / "cache.jsonl"
    lm = KVFrameLM(
        pretrained=str(tiny_lm_dir), method="knorm", budget=0.5, question_delimiter="Question:", cache_log=str(log), device="cpu"
    )
    res = _run(lm, task_manager)
    assert set(res["results"]) == {"kvf_mc", "kvf_gen"}
    written = [json.loads(line) for line in log.read_text().splitlines()]
    assert written == lm.cache_records and len(written) == 4 * len(DOCS)
    full = {(r["task"], r["doc_id"], r["idx"]): r for r in full_lm.cache_records}
    for r in written:
        ref = full[(r["task"], r["doc_id"], r["idx"])]
        assert r["compressed_tokens"] == ref["compressed_tokens"]
        kept = int(r["compressed_tokens"] * 0.5 + 0.5)  # kvframe rounds a ratio budget half up
        assert r["content_slots"] == kept * LAYERS * KV_HEADS
        assert r["kv_bytes"] == kept * BYTES_PER_TOKEN < ref["kv_bytes"]
    summary = res["config"]["kvframe"]
    assert (summary["method"], summary["budget"], summary["mode"]) == ("knorm", 0.5, "query_agnostic")
    assert summary["mean_kv_bytes"] < full_results["config"]["kvframe"]["mean_kv_bytes"]
    assert summary["by_request_type"]["loglikelihood"]["requests"] == 3 * len(DOCS)
    # the compressed cache really served the scores: some log-likelihood moved
    assert _responses(res)["kvf_mc"] != _responses(full_results)["kvf_mc"]


def test_query_aware_compresses_all_but_the_last_context_token(tiny_lm_dir, task_manager):
    lm = KVFrameLM(pretrained=str(tiny_lm_dir), method="snapkv", budget=0.5, **{"scorer.window": 4}, device="cpu")
    assert lm.mode == "query_aware" and lm.compressor.scorer.window == 4
    _run(lm, task_manager, tasks=("kvf_gen",))
    for r in lm.cache_records:
        assert r["compressed_tokens"] == r["context_tokens"] - 1
        assert r["content_slots"] == int(r["compressed_tokens"] * 0.5 + 0.5) * LAYERS * KV_HEADS


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"method": "snapkvv"}, r"unknown method 'snapkvv'.*Accepted:.*snapkv"),
        ({"method": "snapkv", "budget": 1.5}, r"budget=1\.5 .*accepted: a ratio in \(0, 1\]"),
        ({"method": "snapkv", "mode": "query_agnostic"}, r"mode='query_agnostic' needs question_delimiter"),
        ({"method": "snapkv", "mode": "aware"}, r"mode='aware' is not accepted; accepted: query_aware, query_agnostic"),
        ({"method": "snapkv", "question_delimiter": ""}, r"question_delimiter='' must be a non-empty string"),
        ({"method": "snapkv", "mode": "query_aware", "question_delimiter": "Q:"}, r"question_delimiter='Q:' is used only with mode=query_agnostic"),
        ({"metod": "snapkv"}, r"unknown model argument 'metod'; did you mean 'method'\?"),
        ({"method": "snapkv", "scorer.windw": 8}, r"snapkv.*has no hyperparameter 'windw'; did you mean 'window'\?"),
    ],
)
def test_bad_model_args_name_the_value(tiny_lm_dir, args, match):
    with pytest.raises(ConfigError, match=match):
        KVFrameLM(pretrained=str(tiny_lm_dir), device="cpu", **args)


def test_missing_delimiter_names_it_and_the_request(tiny_lm_dir, task_manager):
    lm = KVFrameLM(pretrained=str(tiny_lm_dir), method="knorm", question_delimiter="Context:", device="cpu")
    with pytest.raises(ConfigError, match=r"question_delimiter 'Context:' does not occur in the context of task 'kvf_gen' doc 0"):
        _run(lm, task_manager, tasks=("kvf_gen",))


def test_loglikelihood_rolling_full_equals_hf_and_compressing_methods_refuse(tiny_lm_dir, full_lm):
    text = " ".join(doc["context"] for doc in DOCS)
    req = [Instance("loglikelihood_rolling", {}, (text,), 0, ("kvf_ppl", 0, 1))]
    hf = HFLM(pretrained=str(tiny_lm_dir), device="cpu")
    assert full_lm.loglikelihood_rolling(req, disable_tqdm=True) == hf.loglikelihood_rolling(req, disable_tqdm=True)
    lm = KVFrameLM(pretrained=str(tiny_lm_dir), method="knorm", device="cpu")
    with pytest.raises(ConfigError, match=r"loglikelihood_rolling \(task kvf_ppl.*method='knorm' compresses"):
        lm.loglikelihood_rolling(req, disable_tqdm=True)


def test_cli_runs_lm_eval_and_writes_the_cache_records(tiny_lm_dir, task_dir, tmp_path, capsys):
    from kvframe.cli import main

    out = tmp_path / "out"
    rc = main([
        "lm-eval", "--model", "kvframe",
        "--model_args", f"pretrained={tiny_lm_dir},method=knorm,budget=0.5,question_delimiter=Question:",
        "--tasks", "kvf_mc", "--include_path", str(task_dir), "--device", "cpu", "--limit", "2",
        "--output_path", str(out), "--batch_size", "4",
    ])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "knorm (budget 0.5), mode query_agnostic" in printed
    assert "| loglikelihood | 6 |" in printed
    results = list(out.glob("*/results_*.json"))
    logs = list(out.glob("*/kvframe_cache_*.jsonl"))
    assert len(results) == 1 and len(logs) == 1
    assert logs[0].name == "kvframe_cache_" + results[0].name.removeprefix("results_").removesuffix(".json") + ".jsonl"
    assert f"per-request cache records: {logs[0]}" in printed
    records = [json.loads(line) for line in logs[0].read_text().splitlines()]
    summary = json.loads(results[0].read_text())["config"]["kvframe"]
    assert len(records) == summary["requests"] == 6
    assert summary["mean_kv_bytes"] == sum(r["kv_bytes"] for r in records) / 6
    assert (summary["batch_size"], summary["requested_batch_size"]) == (1, "4")


def test_cli_without_the_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from kvframe.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["lm-eval", "--model", "kvframe", "--tasks", "x"]) == 2
    assert 'pip install "kvframe[lm-eval]"' in capsys.readouterr().err
