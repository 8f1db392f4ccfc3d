"""``kvframe report``: merging the results of eval runs into one leaderboard (Markdown, CSV, plots,
W&B), conflicts between runs, and bad paths. Runs are written by hand (results.json + cells.json as
kvframe eval writes them), plus one tiny-model eval end to end."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import pytest

from kvframe.cli import main
from kvframe.eval.report import LEADERBOARD_COLUMNS, ReportError, leaderboard_table, report
from kvframe.eval.results import cell_identity, fingerprint, record


def _cell(method, budget, task="passkey", mode="query_agnostic", value=0.5, kv=2048, model="m", error=None, max_new_tokens=12):
    """One results.json record and its cell identity, as kvframe eval writes them."""
    kind = "perplexity" if mode == "stream" else "generation"
    ident = cell_identity(
        model={"kind": "local", "name": model}, dtype="float32", device="cpu", task_name=task, task_config={"n_samples": 2},
        content_hash="c" * 64, task_kind=kind, mode=mode, max_new_tokens=max_new_tokens,
        compressor={"scorer": {"name": method}, "budget": budget}, seed=0,
    )
    sample = {"prompt_tokens": 100, "prefill_s": 0.25, "compression_s": 0.0125, "decode_s": 0.5, "peak_memory_bytes": 3 * 2**20,
              "cache_bytes": kv, "cache_kv_bytes": kv, "cache_content_slots": kv // 64}
    rows = [] if error else [sample, sample]
    meta = {"config": {"mode": mode, "dtype": "float32", "device": "cpu", "max_new_tokens": max_new_tokens},
            "versions": {}, "git_commit": None, "seed": 0, "machine": {}}
    rec = record(method=method, budget=budget, task=task, mode=mode, metric="perplexity" if kind == "perplexity" else "accuracy",
                 rows=rows, value=None if error else value, extra={}, identity=ident, fp=fingerprint(ident), meta=meta, error=error)
    return rec, ident


def _write_run(path: Path, cells: list[tuple[dict, dict]]) -> Path:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps([rec for rec, _ in cells], indent=2))
    (path / "cells.json").write_text(json.dumps({rec["fingerprint"]: ident for rec, ident in cells}))
    return path


@pytest.fixture
def two_runs(tmp_path):
    a = _write_run(tmp_path / "a", [
        _cell("full", None, value=1.0, kv=4096),
        _cell("snapkv", 0.5, value=0.75),
        _cell("snapkv", 0.25, value=0.25, kv=1024),
        _cell("full", None, task="perplexity", mode="stream", value=12.5, kv=4096),
    ])
    b = _write_run(tmp_path / "b", [
        _cell("snapkv", 0.5, mode="query_aware", value=0.5),
        _cell("full", None, mode="query_aware", value=1.0, kv=4096),
        _cell("knorm", 0.5, error="ConfigError: budget=4096 tokens is larger than the prompt"),
    ])
    return a, b


def test_two_runs_merge_into_one_leaderboard(two_runs, tmp_path):
    rep = report(two_runs, out=tmp_path / "out")
    md = rep.markdown.splitlines()
    overview = md[md.index("## Scores") + 4:md.index("## Scores") + 10]
    assert overview == [
        "| method | budget | passkey · query_agnostic · accuracy | perplexity · stream · perplexity | passkey · query_aware · accuracy |",
        "|---|---|---|---|---|",
        "| full | — | 1.000 | 12.500 | 1.000 |",
        "| snapkv | 0.5 | 0.750 |  | 0.500 |",
        "| snapkv | 0.25 | 0.250 |  |  |",
        "| knorm | 0.5 | FAILED |  |  |",
    ]
    section = md[md.index("## passkey · query_agnostic · accuracy"):]
    assert section[2] == ("| method | budget | score | n | KV held | KV slots | prefill s | compress s | decode s | peak memory "
                          "| run |")
    assert section[4:8] == [
        "| full | — | 1.000 | 2 | 4.00 KiB | 64 | 0.250 | 0.0125 | 0.500 | 3.00 MiB | a |",
        "| snapkv | 0.5 | 0.750 | 2 | 2.00 KiB | 32 | 0.250 | 0.0125 | 0.500 | 3.00 MiB | a |",
        "| snapkv | 0.25 | 0.250 | 2 | 1.00 KiB | 16 | 0.250 | 0.0125 | 0.500 | 3.00 MiB | a |",
        "| knorm | 0.5 | FAILED: ConfigError: budget=4096 tokens is larger than the prompt | 0 | | | | | | | b |",
    ]
    out = tmp_path / "out"
    assert (out / "leaderboard.md").read_text() == rep.markdown
    with (out / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(LEADERBOARD_COLUMNS)
    assert [(r["method"], r["budget"], r["task"], r["mode"], r["status"], r["value"], r["cache_kv_bytes"], r["run"]) for r in rows] == [
        ("full", "", "passkey", "query_agnostic", "ok", "1.0", "4096.0", "a"),
        ("full", "", "perplexity", "stream", "ok", "12.5", "4096.0", "a"),
        ("full", "", "passkey", "query_aware", "ok", "1.0", "4096.0", "b"),
        ("snapkv", "0.5", "passkey", "query_agnostic", "ok", "0.75", "2048.0", "a"),
        ("snapkv", "0.5", "passkey", "query_aware", "ok", "0.5", "2048.0", "b"),
        ("snapkv", "0.25", "passkey", "query_agnostic", "ok", "0.25", "1024.0", "a"),
        ("knorm", "0.5", "passkey", "query_agnostic", "failed", "", "0.0", "b"),
    ]
    assert rows[-1]["error"] == "ConfigError: budget=4096 tokens is larger than the prompt"
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["passkey_query_agnostic_score_vs_budget.png", "passkey_query_aware_score_vs_budget.png",
                     "perplexity_stream_score_vs_budget.png"]
    assert all((out / "plots" / p).stat().st_size > 1000 for p in plots)


def test_a_cell_in_two_runs_under_the_same_configuration_is_shown_once(tmp_path):
    a = _write_run(tmp_path / "a", [_cell("snapkv", 0.5, value=0.75), _cell("knorm", 0.5, error="RuntimeError: out of memory")])
    b = _write_run(tmp_path / "b", [_cell("snapkv", 0.5, value=0.5), _cell("knorm", 0.5, value=0.25)])
    rep = report([a, b], out=tmp_path / "out")
    assert [(r["method"], r["value"], r["run"]) for r in rep.records] == [("snapkv", 0.75, "a"), ("knorm", 0.25, "b")]
    assert rep.notes == [
        "snapkv / budget 0.5 / passkey / query_agnostic: the same configuration in a and b; showing a's numbers",
        "knorm / budget 0.5 / passkey / query_agnostic: the same configuration in a and b; showing b's numbers",
    ]
    assert rep.markdown.endswith("- " + rep.notes[1] + "\n")


def test_a_cell_in_two_runs_under_different_configurations_is_refused_or_kept_apart(tmp_path, capsys):
    a = _write_run(tmp_path / "a", [_cell("full", None, value=1.0), _cell("snapkv", 0.5, value=0.75)])
    b = _write_run(tmp_path / "b", [_cell("full", None, value=0.5, model="other"), _cell("snapkv", 0.5, value=0.25, max_new_tokens=4),
                                    _cell("knorm", 0.5, value=0.5)])
    with pytest.raises(ReportError) as info:
        report([a, b], out=tmp_path / "out")
    text = str(info.value)
    assert "runs a and b hold the same cells computed under different configurations" in text
    assert "full / full / passkey / query_agnostic in a and b: model.name: 'm' -> 'other'" in text
    assert "snapkv / budget 0.5 / passkey / query_agnostic in a and b: decoding.max_new_tokens: 12 -> 4" in text
    assert "--keep-both" in text
    assert not (tmp_path / "out").exists()  # nothing written
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    assert "kvframe report: error: runs a and b hold the same cells" in capsys.readouterr().err
    # without cells.json the records themselves say what differs
    (b / "cells.json").unlink()
    with pytest.raises(ReportError, match=r"decoding.max_new_tokens: 12 -> 4"):
        report([a, b], out=tmp_path / "out")
    # --keep-both: every method involved is labelled with its run; the others are merged as usual
    rep = report([a, b], out=tmp_path / "out", keep_both=True)
    assert [(r["method"], r["value"]) for r in rep.records] == [
        ("full@a", 1.0), ("full@b", 0.5), ("snapkv@a", 0.75), ("snapkv@b", 0.25), ("knorm", 0.5)]
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "out2"), "--keep-both"]) == 0
    assert "| snapkv@b | 0.5 | 0.250 |" in capsys.readouterr().out


def test_runs_with_the_same_directory_name_are_named_by_path(tmp_path):
    a = _write_run(tmp_path / "x" / "r", [_cell("snapkv", 0.5, value=0.75)])
    b = _write_run(tmp_path / "y" / "r", [_cell("snapkv", 0.5, value=0.25, model="other")])
    rep = report([a, b], out=tmp_path / "out", keep_both=True)
    assert [r["method"] for r in rep.records] == [f"snapkv@{a}", f"snapkv@{b}"]


def test_results_written_before_mode_was_a_dimension_get_their_mode(tmp_path):
    rec, ident = _cell("snapkv", 0.5, mode="query_aware")
    ppl, ppl_ident = _cell("full", None, task="perplexity", mode="stream")
    old = [{k: v for k, v in r.items() if k != "mode"} for r in (rec, ppl)]
    run = tmp_path / "old"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(old))
    rep = report([run], out=tmp_path / "out")  # no cells.json: config.mode, and perplexity streams
    assert [(r["method"], r["mode"]) for r in rep.records] == [("full", "stream"), ("snapkv", "query_aware")]
    (run / "cells.json").write_text(json.dumps({rec["fingerprint"]: ident, ppl["fingerprint"]: ppl_ident}))
    old[0]["config"]["mode"] = "garbage"  # the fingerprint's identity wins
    (run / "results.json").write_text(json.dumps(old))
    assert [r["mode"] for r in report([run], out=tmp_path / "out").records] == ["stream", "query_aware"]


def test_bad_paths_and_files_name_the_path(tmp_path, capsys):
    good = _write_run(tmp_path / "good", [_cell("snapkv", 0.5)])
    empty = tmp_path / "empty"
    empty.mkdir()
    not_json = tmp_path / "not_json"
    not_json.mkdir()
    (not_json / "results.json").write_text("{cut")
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"method": "x"}))
    schema = tmp_path / "schema"
    schema.mkdir()
    bad = {k: v for k, v in _cell("snapkv", 0.5)[0].items() if k != "fingerprint"}
    (schema / "results.json").write_text(json.dumps([bad]))
    cases = [
        (tmp_path / "missing", f"{tmp_path / 'missing'}: no such run directory"),
        (empty, f"{empty}: no results.json in this directory"),
        (not_json, f"{not_json / 'results.json'}: not a kvframe results file (not readable JSON"),
        (other, f"{other / 'results.json'}: not a kvframe results file (expected a JSON list of cell records)"),
        (schema, f"{schema / 'results.json'}: not a kvframe results file of this schema (record 0: missing keys ['fingerprint']"),
    ]
    for path, message in cases:
        with pytest.raises(ReportError) as info:
            report([good, path], out=tmp_path / "out")
        assert message in str(info.value)
        assert main(["report", str(good), str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvframe report: error: ") and message in err and "Traceback" not in err
    with pytest.raises(ReportError, match="the same run as"):
        report([good, good / "results.json"], out=tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match="is a file; accepted: a directory"):
        report([good], out=tmp_path / "file")
    with pytest.raises(ReportError, match="wandb='cloud'; accepted: offline, online"):
        report([good], out=tmp_path / "out", wandb="cloud")


class _FakeWandb(types.ModuleType):
    """Records what would go to W&B."""

    def __init__(self):
        super().__init__("wandb")
        self.logged: list[dict] = []
        self.inits: list[dict] = []

    def Table(self, columns, data):  # noqa: N802 (wandb's name)
        return ("table", columns, data)

    def Image(self, path):  # noqa: N802
        return ("image", path)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            dir = str(Path(kwargs["dir"]) / "wandb" / "offline-run-x" / "files")

            def log(self, data):
                fake.logged.append(data)

            def finish(self):
                pass

        return Run()


def test_the_eval_and_the_report_log_the_same_leaderboard_table_to_wandb(two_runs, tmp_path, monkeypatch):
    from kvframe.eval.runner import _log_summary

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    rep = report(two_runs, out=tmp_path / "out", wandb="offline", project="p")
    assert fake.inits[0]["mode"] == "offline" and fake.inits[0]["project"] == "p"
    kind, columns, data = fake.logged[0]["leaderboard"]
    assert columns == list(LEADERBOARD_COLUMNS) and (columns, data) == leaderboard_table(rep.records)
    assert data[0][:8] == ["full", "", "passkey", "query_agnostic", "accuracy", "ok", 1.0, 2]
    assert sorted(k for k in fake.logged[0] if k.startswith("plots/")) == [
        "plots/passkey_query_agnostic_score_vs_budget", "plots/passkey_query_aware_score_vs_budget",
        "plots/perplexity_stream_score_vs_budget"]

    class WandbLogger:  # what the eval's W&B logger offers the summary
        experiment = types.SimpleNamespace(log=lambda d: fake.logged.append(d))

    records = json.loads((two_runs[0] / "results.json").read_text())
    _log_summary([WandbLogger()], records, [], "a")
    assert fake.logged[-1]["leaderboard"] == ("table", *leaderboard_table([{**r, "run": "a"} for r in records]))


def test_report_of_a_tiny_model_eval_run(eval_args, tmp_path, capsys):
    assert main(["eval", *eval_args("methods=[knorm]", "mode=[query_agnostic, query_aware]")]) == 0
    run = tmp_path / "runs" / "r"
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out), "--wandb", "offline"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# kvframe leaderboard") and f"written: {out / 'leaderboard.md'}" in printed
    with (out / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    results = json.loads((run / "results.json").read_text())
    assert [(r["method"], r["budget"], r["mode"], r["value"]) for r in rows] == [
        ("knorm", "0.5", r["mode"], str(r["value"])) for r in results]
    assert [r["mode"] for r in results] == ["query_agnostic", "query_aware"]
    assert {p.name for p in (out / "plots").iterdir()} == {"passkey_query_agnostic_score_vs_budget.png",
                                                          "passkey_query_aware_score_vs_budget.png"}
    assert list((out / "wandb").rglob("*.wandb"))  # an offline W&B run, no network
