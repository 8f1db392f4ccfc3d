"""The registry: policies by ``(kind, name)`` and named methods (YAML cards).

Policies register with the :func:`register` decorator. Named methods are YAML cards: the
built-in ones ship inside the package (``kvframe/cards``, copied from the repository's
``registry/`` folder), third-party ones come from plugins.

Plugins are Python packages that declare an entry point in the group ``kvframe.plugins``. The entry
point names a module or a callable; loading it registers its policies (by importing the module, or
by calling the callable with no argument), and the callable may return a path (or list of paths) to
a folder of YAML cards. A plugin that fails to load (any exception, ``SystemExit`` included; only
``KeyboardInterrupt`` propagates) is unregistered as a whole: none of the policies or cards it
registered before failing stay registered. It raises :class:`~kvframe.errors.PluginError` naming it
when one of its names is needed (or at ``kvframe list``), and never hides the built-ins.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from kvframe.errors import ConfigError, PluginError, unknown_name

ENTRY_POINT_GROUP = "kvframe.plugins"
KINDS = ("scorer", "selector", "key_merge", "value_merge", "schedule", "trigger")
BUILTIN = "built-in"

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    obj: Any
    origin: str  # "built-in" or "plugin:<entry point name>"


_POLICIES: dict[tuple[str, str], Entry] = {}
_CARDS: dict[str, tuple[Path, str]] = {}  # name -> (path, origin)
_PLUGIN_ERRORS: dict[str, BaseException] = {}
_loading_origin: str = BUILTIN
_state = {"builtins": False, "plugins": False}


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator registering a policy class under ``(kind, name)``."""
    if kind not in KINDS:
        raise ConfigError(f"unknown policy kind {kind!r}; accepted: {', '.join(KINDS)}")

    def deco(cls: T) -> T:
        if not is_dataclass(cls):
            raise TypeError(f"policy {name!r} must be a dataclass (its fields are its hyperparameters)")
        key = (kind, name)
        old = _POLICIES.get(key)
        if old is not None and old.obj is not cls and old.origin != _loading_origin:
            raise ConfigError(
                f"{kind} {name!r} is already registered by {old.origin}; {_loading_origin} cannot register it again"
            )
        cls.kind = kind
        cls.name = name
        _POLICIES[key] = Entry(kind, name, cls, _loading_origin)
        return cls

    return deco


def register_cards(folder: str | Path, origin: str | None = None) -> list[str]:
    """Register every ``*.yaml`` card in ``folder``; returns their names (file stems)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"card folder {str(folder)!r} does not exist")
    names = []
    for p in sorted(folder.glob("*.yaml")):
        origin_ = origin or _loading_origin
        old = _CARDS.get(p.stem)
        if old is not None and old[0] != p and old[1] != origin_:
            raise ConfigError(f"method {p.stem!r} is already defined by {old[1]} ({old[0]}); {origin_} redefines it")
        _CARDS[p.stem] = (p, origin_)
        names.append(p.stem)
    return names


def builtin_cards_dir() -> Path:
    """Folder of the built-in method cards.

    In an installed wheel the repository's ``registry/`` folder is shipped as the package data
    folder ``kvframe/cards``; in a source checkout (editable install) it is read in place.
    """
    packaged = Path(str(importlib.resources.files("kvframe"))) / "cards"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "registry"


def _ensure_builtins() -> None:
    if _state["builtins"]:
        return
    _state["builtins"] = True
    importlib.import_module("kvframe.policies")  # registers the built-in policies
    register_cards(builtin_cards_dir(), BUILTIN)


def load_plugins(reload: bool = False) -> dict[str, BaseException]:
    """Load every ``kvframe.plugins`` entry point once; returns the plugins that failed."""
    global _loading_origin
    _ensure_builtins()
    if _state["plugins"] and not reload:
        return dict(_PLUGIN_ERRORS)
    _state["plugins"] = True
    _PLUGIN_ERRORS.clear()
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        origin = f"plugin:{ep.name}"
        _loading_origin = origin
        policies, cards = dict(_POLICIES), dict(_CARDS)
        try:
            obj = ep.load()
            result = obj() if callable(obj) and not isinstance(obj, type) else None
            if result is not None:
                paths = result if isinstance(result, (list, tuple)) else [result]
                for p in paths:
                    register_cards(p, origin)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a plugin must not end the program
            # a broken plugin must not break the built-ins, nor leave half of itself registered
            _POLICIES.clear()
            _POLICIES.update(policies)
            _CARDS.clear()
            _CARDS.update(cards)
            _PLUGIN_ERRORS[ep.name] = exc
        finally:
            _loading_origin = BUILTIN
    return dict(_PLUGIN_ERRORS)


def plugin_errors() -> dict[str, BaseException]:
    load_plugins()
    return dict(_PLUGIN_ERRORS)


def _broken_plugins_note() -> str:
    if not _PLUGIN_ERRORS:
        return ""
    parts = [f"{n} ({type(e).__name__}: {e})" for n, e in _PLUGIN_ERRORS.items()]
    return " Note: these kvframe plugins failed to load and may have provided it: " + "; ".join(parts)


def get_policy(kind: str, name: str) -> type:
    """The policy class registered under ``(kind, name)``."""
    load_plugins()
    if kind not in KINDS:
        raise ConfigError(f"unknown policy kind {kind!r}; accepted: {', '.join(KINDS)}")
    entry = _POLICIES.get((kind, name))
    if entry is None:
        err = unknown_name(kind.replace("_", " "), name, [n for (k, n) in _POLICIES if k == kind])
        if _PLUGIN_ERRORS:
            raise PluginError(str(err) + _broken_plugins_note())
        raise err
    return entry.obj


def card_path(name: str) -> Path:
    """Path of the YAML card of the named method."""
    load_plugins()
    if name not in _CARDS:
        err = unknown_name("method", name, _CARDS)
        if _PLUGIN_ERRORS:
            raise PluginError(str(err) + _broken_plugins_note())
        raise err
    return _CARDS[name][0]


def list_policies() -> list[Entry]:
    load_plugins()
    return sorted(_POLICIES.values(), key=lambda e: (KINDS.index(e.kind), e.name))


def list_methods() -> list[tuple[str, Path, str]]:
    load_plugins()
    return sorted((n, p, o) for n, (p, o) in _CARDS.items())
