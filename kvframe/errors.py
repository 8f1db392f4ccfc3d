"""Errors raised by kvframe.

Every error names the bad value and what is accepted, so a user can fix the input without
reading the source.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KVFrameError(Exception):
    """Base class of every error kvframe raises on purpose."""


class ConfigError(KVFrameError, ValueError):
    """A configuration value (name, budget, YAML, hyperparameter) is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A method, policy, task or model name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(KVFrameError, TypeError):
    """The model, its architecture or the installed transformers version is not supported."""


class PluginError(KVFrameError, ImportError):
    """A plugin registered under the ``kvframe.plugins`` entry-point group failed to load."""


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` names from ``choices`` that look like ``name``."""
    return difflib.get_close_matches(name, sorted(set(choices)), n=n, cutoff=0.5)


def unknown_name(what: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """Build an :class:`UnknownNameError` listing close matches and all accepted names."""
    choices = sorted(set(choices))
    hint = close_matches(name, choices)
    msg = f"unknown {what} {name!r}"
    if hint:
        msg += f"; did you mean {', '.join(repr(h) for h in hint)}?"
    msg += f" Accepted: {', '.join(choices) if choices else '(none registered)'}."
    return UnknownNameError(msg)
