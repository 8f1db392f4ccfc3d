"""Every YAML in configs/ loads and builds (cards: tests/cards/test_cards.py); composition features work."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import kvframe
from kvframe import registry
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
