"""Bad input gives a clear error naming the value and what is accepted."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kvframe
from kvframe.errors import ConfigError, UnknownNameError, UnsupportedModelError
from kvframe.testing import tiny_model


def test_unknown_method_with_close_match():
    with pytest.raises(UnknownNameError, match=r"unknown method 'snapvk'; did you mean 'snapkv'.*Accepted:.*knorm"):
        kvframe.build("snapvk")


def test_unknown_policy_with_close_match():
    with pytest.raises(UnknownNameError, match=r"unknown scorer 'knrom'; did you mean 'knorm'"):
        kvframe.build({"scorer": "knrom"})


def test_unknown_hyperparameter():
    with pytest.raises(ConfigError, match=r"scorer 'snapkv' has no hyperparameter 'windw'; did you mean 'window'"):
        kvframe.build("snapkv", scorer={"windw": 3})


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown compressor key 'budgte'; did you mean 'budget'"):
        kvframe.build("knorm", budgte=0.3)


@pytest.mark.parametrize("bad", [0, -3, 0.0, -0.5, float("nan")])
def test_budget_not_positive(bad):
    with pytest.raises(ConfigError, match=rf"budget={bad!r}"):
        kvframe.build("knorm", budget=bad)


def test_budget_ratio_above_one():
    with pytest.raises(ConfigError, match=r"budget=1.5 is > 1 as a ratio"):
        kvframe.build("knorm", budget=1.5)


def test_budget_not_a_number():
    with pytest.raises(ConfigError, match=r"budget='half' is not a number"):
        kvframe.build("knorm", budget="half")


def test_budget_larger_than_prompt():
    comp = kvframe.build("knorm", budget=100)
    with pytest.raises(ConfigError, match=r"budget=100 tokens is larger than the prompt \(40 tokens\); accepted: 1..40"):
        kvframe.compress(comp, torch.randn(1, 1, 40, 4), torch.randn(1, 1, 40, 4))
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="larger than the prompt"), torch.no_grad(), kvframe.attach(model, comp):
        model(torch.randint(3, 100, (1, 40)))


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("budget: 0.5\nscorer: {name: knorm\nselector: topk\n")
    with pytest.raises(ConfigError, match=rf"malformed YAML at {p}:3:"):
        kvframe.build(str(p))


def test_yaml_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        kvframe.build(str(tmp_path / "nope.yaml"))


def test_unsupported_model_types():
    with pytest.raises(UnsupportedModelError, match="PreTrainedModel"):
        with kvframe.attach(torch.nn.Linear(2, 2), kvframe.build("knorm")):
            pass


def test_unsupported_layer_type():
    model = tiny_model("llama")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match=r"layer types \['linear_attention'\]"):
        with kvframe.attach(model, kvframe.build("knorm")):
            pass


def test_reindex_on_model_without_rotate_half_rope():
    model = tiny_model("llama")
    model.config.model_type = "gpt2"
    with pytest.raises(UnsupportedModelError, match="re-rotation is not supported for model type 'gpt2'"):
        with kvframe.attach(model, kvframe.build("streaming_llm_reindex")):
            pass


def test_foreign_nonempty_cache_is_rejected():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 10))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        with pytest.raises(UnsupportedModelError, match="non-empty DynamicCache"), kvframe.attach(model, kvframe.build("knorm")):
            model(ids, past_key_values=cache)


def test_bad_schedule_entries():
    with pytest.raises(ConfigError, match=r"schedule.layers\[1\]\[0\]=0"):
        kvframe.build({"scorer": "knorm", "schedule": {"name": "explicit", "layers": [0.5, [0, 3]]}})


def test_cli_reports_errors_with_exit_code_2():
    out = subprocess.run([sys.executable, "-m", "kvframe.cli", "show", "nosuch"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown method 'nosuch'" in out.stderr
