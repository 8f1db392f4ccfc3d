"""The eval config: every bad value fails before the model loads, with one line naming it; the grid
of cells gets unique labels."""

from __future__ import annotations

import pytest

from kvframe.cli import main
from kvframe.errors import ConfigError, UnknownNameError
from kvframe.eval.config import default_config_path, load_config, plan_cells, plan_tasks


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    import kvframe.eval.models

    monkeypatch.setattr(kvframe.eval.models, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_new_tokens=0", "max_new_tokens=0; accepted: an integer >= 1"),
        ("max_new_tokens=-3", "max_new_tokens=-3; accepted: an integer >= 1"),
        ("device=tpu0", "device='tpu0'"),
        ("device=gpus", "did you mean 'gpu'"),
        ("threads=0", "threads=0; accepted: null"),
        ("strategy=dpp", "strategy='dpp'; did you mean 'ddp'?"),
        ("dtype=float64", "unsupported dtype 'float64'; accepted: 'float32', 'bfloat16', 'float16'"),
        ("run_name=a/b", "run_name='a/b'"),
        ("methods=[snapkv", "override 'methods=[snapkv': the value is not valid YAML"),
        ("budgets=[1", "override 'budgets=[1': the value is not valid YAML"),
        ("budgets=0.5", "budgets must be a list, e.g. budgets=[0.5]"),
        ("budget=[0.5]", "unknown eval config key 'budget'; did you mean 'budgets'?"),
        ("model=${nope}", "cannot resolve eval config key 'model'"),
        ("budgets=[1.5]", "budgets entry=1.5"),
        ("tasks=[{name:passkey}]", "without a space"),
        ("methods=[snapkv, snapkv]", "methods[0] and methods[1] are the same composition ('snapkv') at budget"),
        ("tasks=[{name: passkey}, {name: passkey}]", "tasks[0] and tasks[1] are the same task ('passkey')"),
    ],
)
def test_bad_values_fail_before_the_model_loads_with_one_line(override, message, capsys):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert main(["eval", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvframe eval: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cuda_device_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        load_config(None, ["device=cuda"])


def test_output_dir_must_be_writable(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_config(None, [f"output_dir={f}"])
    with pytest.raises(ConfigError, match="cannot be written"):
        load_config(None, [f"output_dir={f / 'sub'}"])
    load_config(None, [f"output_dir={tmp_path / 'new' / 'deeper'}"])  # created later, parents writable


def test_a_directory_is_not_a_config_file(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_same_name_compositions_get_labels_from_what_differs():
    cfg = load_config(None, ["methods=[snapkv, {base: snapkv, scorer: {window: 8}}, {base: snapkv, selector: adaptive_heads}, knorm]"])
    cells = plan_cells(cfg)
    labels = [c.label for c in cells]
    assert labels == [
        "snapkv", "snapkv", "snapkv[scorer.window=8]", "snapkv[scorer.window=8]",
        "snapkv[selector.name=adaptive_heads]", "snapkv[selector.name=adaptive_heads]", "knorm", "knorm",
    ]
    assert [c.budget for c in cells[:2]] == [0.5, 0.25]
    assert cells[2].compressor.scorer.window == 8 and cells[0].compressor.scorer.window == 64


def test_labels_stay_bare_when_names_are_unique_and_full_runs_once():
    cfg = load_config(None, ["methods=[full, {base: snapkv, scorer: {window: 8}}]"])
    assert [(c.label, c.budget) for c in plan_cells(cfg)] == [("full", None), ("snapkv", 0.5), ("snapkv", 0.25)]


def test_same_task_with_other_parameters_gets_its_own_label():
    cfg = load_config(None, ["tasks=[{name: passkey, length: 1024}, {name: passkey, length: 2048, seed: 1}]"])
    assert [t.label for t in plan_tasks(cfg)] == ["passkey[length=1024]", "passkey[length=2048, seed=1]"]


def test_an_override_without_value_after_the_config_file(capsys):
    from kvframe.eval.config import default_config_path

    with pytest.raises(ConfigError, match="override 'budget' is not of the form key=value"):
        load_config(default_config_path(), ["budget"])
    assert main(["eval", str(default_config_path()), "budget"]) == 2
    assert "override 'budget' is not of the form key=value" in capsys.readouterr().err
    assert main(["eval", "budget"]) == 2  # a first argument without '=' is a config file unless it cannot be
    assert "'budget' is neither a config file (no such file) nor a key=value override" in capsys.readouterr().err


def test_compile_override_reaches_every_method():
    from kvframe.eval.config import make_compressor as _make

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


def test_default_config_parses():
    cfg = load_config(default_config_path())
    assert "full" in list(cfg.methods) and list(cfg.budgets) == [0.75, 0.5, 0.25]
    assert list(cfg.mode) == ["query_aware", "query_agnostic"]
    assert [c.label for c in plan_cells(cfg)][:4] == ["full", "streaming_llm", "streaming_llm", "streaming_llm"]


def test_unknown_names_suggest_close_matches():
    with pytest.raises(UnknownNameError, match="unknown task 'pasky'; did you mean 'passkey'"):
        load_config(None, ["tasks=[{name: pasky}]"])
    with pytest.raises(UnknownNameError, match="unknown method 'snapk'"):
        load_config(None, ["methods=[snapk]"])
    with pytest.raises(ConfigError, match=r"budgets entry=0"):
        load_config(None, ["budgets=[0]"])
    with pytest.raises(ConfigError, match="did you mean 'budgets'"):
        load_config(None, ["budget=[0.5]"])


def test_mode_is_one_value_or_a_list():
    from kvframe.eval.config import modes, task_modes
    from kvframe.eval.tasks import make_task

    assert modes(load_config(None, [])) == ["query_agnostic"]
    assert modes(load_config(None, ["mode=query_aware"])) == ["query_aware"]
    cfg = load_config(None, ["mode=[query_aware, query_agnostic]"])
    assert modes(cfg) == ["query_aware", "query_agnostic"]  # in the order given
    # streaming perplexity does not decode: it runs once per method x budget, recorded as mode 'stream'
    assert task_modes(make_task({"name": "passkey"}), modes(cfg)) == ["query_aware", "query_agnostic"]
    assert task_modes(make_task({"name": "perplexity"}), modes(cfg)) == ["stream"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("mode=agnostic", "mode='agnostic'; did you mean 'query_agnostic'?; accepted: query_agnostic, query_aware, or a list of them"),
        ("mode=[query_aware, query_awre]", "mode entry 'query_awre'; did you mean 'query_aware'?; accepted: query_agnostic, query_aware"),
        ("mode=[]", "mode=[]; accepted: query_agnostic, query_aware, or a list of them (e.g. mode=[query_agnostic, query_aware])"),
        ("mode=[query_aware, query_aware]", "mode lists 'query_aware' twice"),
        ("mode=stream", "mode='stream' (the mode recorded for perplexity tasks"),
        ("mode=3", "mode=3; accepted: query_agnostic, query_aware"),
        ("mode={a: 1}", "mode={'a': 1}; accepted"),
    ],
)
def test_bad_modes_name_what_is_accepted(override, message, capsys):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert main(["eval", override]) == 2
    assert message in capsys.readouterr().err


def test_grid_progress_is_a_switch():
    assert load_config(None, []).grid_progress is True
    assert load_config(None, ["grid_progress=false"]).grid_progress is False
    with pytest.raises(ConfigError, match="grid_progress"):
        load_config(None, ["grid_progress=sometimes"])
