"""Every YAML in configs/ loads and builds (cards: tests/cards/test_cards.py); composition features work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import kvframe
from kvframe.eval.config import load_config

ROOT = Path(__file__).resolve().parent.parent
COMPRESSOR_CONFIGS = sorted((ROOT / "configs" / "compressors").glob("*.yaml")) + sorted((ROOT / "configs" / "examples").glob("*.yaml"))
EVAL_CONFIGS = sorted((ROOT / "configs").glob("eval*.yaml")) + [ROOT / "kvframe" / "eval" / "configs" / "eval_default.yaml"]


@pytest.mark.parametrize("path", COMPRESSOR_CONFIGS, ids=lambda p: p.stem)
def test_compressor_configs_build(path):
    kvframe.build(str(path))


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_eval_configs_parse(path):
    load_config(path)


def test_overrides_dotted_nested_and_dotlist():
    a = kvframe.build("snapkv", budget=0.25, **{"scorer.window": 16})
    b = kvframe.build("snapkv", budget=0.25, scorer={"window": 16})
    c = kvframe.build("snapkv", dotlist=["budget=0.25", "scorer.window=16"])
    assert a.to_dict() == b.to_dict() == c.to_dict()
    assert a.scorer.window == 16 and a.budget == 0.25 and a.scorer.kernel == 5


def test_replacing_a_policy_by_name_drops_old_hyperparameters():
    comp = kvframe.build("snapkv", scorer="knorm")
    assert comp.scorer.name == "knorm"


def test_interpolation_and_base(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: snapkv\nname: mine\nbudget: 128\nscorer: {window: 16}\nschedule: {name: pyramid, window: '${scorer.window}'}\n")
    comp = kvframe.build(str(p))
    assert comp.name == "mine" and comp.budget == 128
    assert comp.schedule.window == 16 and comp.scorer.kernel == 5


def test_dict_and_dictconfig_specs():
    spec = {"scorer": {"name": "sink_recent", "n_sink": 2}, "budget": 10}
    assert kvframe.build(spec).to_dict() == kvframe.build(OmegaConf.create(spec)).to_dict()


def test_show_roundtrip_builds_same_compressor():
    from kvframe.cli import show

    text = show("adakv", ["budget=0.3"])
    again = kvframe.build(dict(OmegaConf.to_container(OmegaConf.create(text))))
    assert again.to_dict() == kvframe.build("adakv", budget=0.3).to_dict()


# ----------------------------------------------------------------------------- robustness
def test_duplicate_yaml_keys_name_the_file_the_key_and_both_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("base: snapkv\nbudget: 0.25\nscorer:\n  window: 16\n  kernel: 3\n  window: 32\n")
    with pytest.raises(kvframe.ConfigError, match=rf"{re.escape(str(p))}: duplicate key 'window' at line 6 \(first defined at line 4\)"):
        kvframe.build(str(p))
    p.write_text("budget: 0.25\nscorer: knorm\nbudget: 0.5\n")
    with pytest.raises(kvframe.ConfigError, match=r"duplicate key 'budget' at line 3 \(first defined at line 1\)"):
        kvframe.build(str(p))
    p.write_text("scorer: {name: knorm, name: snapkv}\n")
    with pytest.raises(kvframe.ConfigError, match=r"duplicate key 'name' at line 1 \(first defined at line 1\)"):
        kvframe.build(str(p))
    e = tmp_path / "eval.yaml"
    e.write_text("budgets: [0.5]\nmethods: [knorm]\nbudgets: [0.25]\n")
    with pytest.raises(kvframe.ConfigError, match=rf"{re.escape(str(e))}: duplicate key 'budgets' at line 3 \(first defined at line 1\)"):
        load_config(e)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("base: snapkv\nscorer:\n  <<: {window: 16, kernel: 3}\n  window: 32\n")
    comp = kvframe.build(str(p))
    assert (comp.scorer.window, comp.scorer.kernel) == (32, 3)


def test_a_directory_is_not_a_yaml_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.yaml").write_text("scorer: knorm\n")
    (tmp_path / "sub").mkdir()
    with pytest.raises(kvframe.ConfigError, match=rf"'{re.escape(str(tmp_path))}' is a directory; expected a YAML file \(YAML files in it: a.yaml\)"):
        kvframe.build(str(tmp_path))
    with pytest.raises(kvframe.ConfigError, match=r"is a directory; expected a YAML file"):
        load_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(kvframe.ConfigError, match=r"'sub' is a directory; expected a YAML file"):
        kvframe.build("sub")  # a bare name that is no method but a directory
    assert kvframe.build("knorm").name == "knorm"
    (tmp_path / "knorm").mkdir()  # a method's name wins over a directory of that name
    assert kvframe.build("knorm").name == "knorm"
    from kvframe.cli import main

    assert main(["eval", str(tmp_path)]) == 2
    assert "is a directory; expected a YAML file" in capsys.readouterr().err


def test_override_without_equals_sign_is_named(capsys):
    with pytest.raises(kvframe.ConfigError, match=r"override 'budget' is not of the form key=value \(e.g. budget=0.25 or scorer.window=32\)"):
        kvframe.build("snapkv", dotlist=["budget"])
    with pytest.raises(kvframe.ConfigError, match=r"override '=3' is not of the form key=value"):
        kvframe.build("snapkv", dotlist=["=3"])
    from kvframe.cli import main

    assert main(["show", "snapkv", "budget"]) == 2
    assert "override 'budget' is not of the form key=value" in capsys.readouterr().err
    assert main(["show", "snapkv", "budget=0.25"]) == 0
    assert "budget: 0.25" in capsys.readouterr().out
