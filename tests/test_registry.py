"""Plugins: a real sample package is installed and used from YAML; a broken one is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "plugins"


def _install(pkg: str, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(HERE / pkg)],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder holding the two plugin packages, installed by pip (entry points included)."""
    good = tmp_path_factory.mktemp("good")
    broken = tmp_path_factory.mktemp("broken")
    _install("kvframe_sample_plugin", good)
    _install("kvframe_broken_plugin", broken)
    return good, broken


def _run(code: str, *paths: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


USE = """
import torch, kvframe
comp = kvframe.build("vnorm_topk", budget=3)
v = torch.zeros(1, 1, 6, 4); v[0, 0, [1, 4, 5], 0] = torch.tensor([3.0, 2.0, 1.0])
res = kvframe.compress(comp, torch.randn(1, 1, 6, 4), v)
print(res.positions[0, 0].tolist())
comp2 = kvframe.build({"scorer": {"name": "vnorm", "power": 1.0}, "budget": 2})
print(comp2.scorer.power)
"""


def test_plugin_policy_used_from_yaml_card(site):
    good, _ = site
    out = _run(USE, good)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[1, 4, 5]", "1.0"]


def test_list_shows_plugin_origin(site):
    good, _ = site
    out = _run("from kvframe.cli import main; main(['list', '--json'])", good)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"name": "vnorm", "origin": "plugin:sample"} in data["policies"]["scorer"]
    assert any(m["name"] == "vnorm_topk" and m["origin"] == "plugin:sample" for m in data["methods"])
    assert {"name": "knorm", "origin": "built-in"} in data["policies"]["scorer"]


def test_broken_plugin_is_named_and_builtins_still_work(site):
    good, broken = site
    code = """
import kvframe, torch
c = kvframe.build("knorm", budget=2)
print(kvframe.compress(c, torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2)).positions.shape[-1])
print(kvframe.build("vnorm_topk").scorer.power)
try:
    kvframe.build("missing_method")
except kvframe.PluginError as e:
    print("PluginError:", e)
"""
    out = _run(code, good, broken)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "2" and lines[1] == "2.0"
    assert lines[2].startswith("PluginError:") and "broken" in lines[2] and "kvframe_dependency_that_does_not_exist" in lines[2]
    listing = _run("from kvframe.cli import main; main(['list'])", good, broken)
    assert "Broken plugin 'broken'" in listing.stdout


@pytest.fixture(scope="module")
def halfway(tmp_path_factory):
    """A plugin that registers a scorer and a card folder, then raises SystemExit(3)."""
    target = tmp_path_factory.mktemp("halfway")
    _install("kvframe_halfway_plugin", target)
    return target


HALFWAY = """
import kvframe, torch
from kvframe import registry
c = kvframe.build("knorm", budget=2)
print(kvframe.compress(c, torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2)).positions.shape[-1])
print(kvframe.build("vnorm_topk").scorer.power)
print(sorted(registry.plugin_errors()))
print([e.name for e in registry.list_policies() if e.name == "halfway_scorer"], [m for m, _, _ in registry.list_methods() if m == "halfway_method"])
for spec in ("halfway_method", {"scorer": "halfway_scorer"}):
    try:
        kvframe.build(spec)
    except kvframe.PluginError as e:
        print("PluginError:", e)
"""


def test_plugin_raising_system_exit_halfway_is_contained_and_unregistered(site, halfway):
    good, _ = site
    out = _run(HALFWAY, good, halfway)
    assert out.returncode == 0, (out.returncode, out.stderr)
    lines = out.stdout.splitlines()
    assert lines[:4] == ["2", "2.0", "['halfway']", "[] []"]  # built-ins and the good plugin work; nothing of halfway stays
    assert lines[4].startswith("PluginError: unknown method 'halfway_method'") and "halfway (SystemExit: 3)" in lines[4]
    assert lines[5].startswith("PluginError: unknown scorer 'halfway_scorer'") and "halfway (SystemExit: 3)" in lines[5]
    listing = _run("from kvframe.cli import main; main(['list'])", good, halfway)
    assert listing.returncode == 0, listing.stderr
    assert "Broken plugin 'halfway': SystemExit: 3" in listing.stdout
    assert "halfway_scorer" not in listing.stdout.replace("Broken plugin 'halfway'", "")
    data = json.loads(_run("from kvframe.cli import main; main(['list', '--json'])", good, halfway).stdout)
    assert data["broken_plugins"] == {"halfway": "SystemExit: 3"}
    assert not any(m["name"] == "halfway_method" for m in data["methods"])
    assert {"name": "vnorm", "origin": "plugin:sample"} in data["policies"]["scorer"]
