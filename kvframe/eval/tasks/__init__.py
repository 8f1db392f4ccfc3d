"""Evaluation tasks, built by name from a config mapping (``{name: ruler, length: 1024, ...}``).

Every task is a small dataclass whose fields are its parameters (validated when it is built, so a
bad config fails before any model is loaded). Offline tasks are generated deterministically from
their seed; hub tasks load through the ``datasets`` library (``pip install "kvframe[hub]"``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from kvframe.errors import ConfigError, unknown_name
from kvframe.eval.tasks.base import Sample, Task, content_hash

#: task name -> "module:Class" (imported lazily: hub tasks need `datasets` only when used)
TASKS: dict[str, str] = {
    "passkey": "kvframe.eval.tasks.passkey_task:PasskeyTask",
    "ruler": "kvframe.eval.tasks.ruler:RulerTask",
    "needle": "kvframe.eval.tasks.needle:NeedleGridTask",
    "perplexity": "kvframe.eval.tasks.perplexity:PerplexityTask",
    "sotu_perplexity": "kvframe.eval.tasks.perplexity:PerplexityTask",
    "longbench": "kvframe.eval.tasks.hub:LongBenchTask",
    "ruler_hub": "kvframe.eval.tasks.hub:RulerHubTask",
    "pg19": "kvframe.eval.tasks.hub:PG19Task",
    "infinitebench": "kvframe.eval.tasks.hub:InfiniteBenchTask",
}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise unknown_name("task", name, sorted(TASKS))
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_task(spec: Mapping[str, Any] | str) -> Task:
    """Build a task from ``{name: ..., **params}`` (or a bare name); unknown params name the accepted ones."""
    if isinstance(spec, str):
        spec = {"name": spec}
    params = dict(spec)
    name = params.pop("name", None)
    colon = [k for k in params if isinstance(k, str) and ":" in k]
    if colon:
        raise ConfigError(
            f"task entry {dict(spec)!r}: key {colon[0]!r} looks like 'key:value' without a space; YAML needs a space "
            "after the colon, e.g. {name: passkey, length: 1024}"
        )
    if name is None:
        raise ConfigError(f"task entry {dict(spec)!r} has no 'name'; accepted names: {', '.join(sorted(TASKS))}")
    cls = task_class(str(name))
    if dataclasses.is_dataclass(cls):
        accepted = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(params) - set(accepted))
        if bad:
            raise ConfigError(f"task {name!r}: unknown parameter(s) {bad}; accepted: {', '.join(accepted)}")
    try:
        task = cls(**params)
    except TypeError as exc:
        raise ConfigError(f"task {name!r}: {exc}") from None
    check = getattr(task, "check", None)
    if callable(check):
        check()  # data packages present, parameter ranges: fail before the model loads
    return task


__all__ = ["TASKS", "Sample", "Task", "content_hash", "make_task", "task_class"]
