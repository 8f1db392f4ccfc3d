"""Compressor specifications: YAML cards, dicts and overrides, resolved with omegaconf.

A specification is a mapping::

    name: snapkv                         # optional metadata: name, paper, url, description
    paper: "SnapKV ... (arXiv 2404.14469)"
    base: snapkv                         # optional: start from another card and override it
    budget: 0.5                          # ratio in (0, 1] or tokens (int >= 1)
    positions: original                  # or reindex
    compile: auto                        # torch.compile: auto (CUDA only), true, false, {backend, mode}
    scorer: {name: snapkv, window: 64, kernel: 5, pool: avg}
    selector: topk                       # a policy as a bare name, or a mapping with `name`
    key_merge: drop
    value_merge: drop
    schedule: uniform
    trigger: after_prefill

omegaconf interpolation works inside a spec (``window: ${scorer.window}``), and overrides are
dotted keys (``scorer.window=32``) or keyword arguments to :func:`build`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvframe import registry
from kvframe.compressor import Compressor
from kvframe.errors import ConfigError, PluginError, UnknownNameError, close_matches

POLICY_KEYS = ("scorer", "selector", "key_merge", "value_merge", "schedule", "trigger")
META_KEYS = ("name", "paper", "url", "description", "base")
OPTION_KEYS = ("budget", "positions", "compress_sliding_layers", "seed", "compile")
ALLOWED_KEYS = META_KEYS + OPTION_KEYS + POLICY_KEYS
DEFAULTS: dict[str, Any] = {
    "budget": 0.5,
    "positions": "original",
    "compress_sliding_layers": False,
    "seed": 0,
    "compile": "auto",
    "scorer": None,
    "selector": {"name": "topk"},
    "key_merge": {"name": "drop"},
    "value_merge": {"name": "drop"},
    "schedule": {"name": "uniform"},
    "trigger": {"name": "after_prefill"},
}


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (``safe_load`` keeps the last).

    Keys brought in by a merge key (``<<: *anchor``) may still be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> DictConfig:
    """Load a YAML file; malformed YAML raises :class:`ConfigError` with file, line and column.

    A key repeated in one mapping is an error naming both lines (plain ``yaml.safe_load`` would
    silently keep the last value).
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        hint = f" (YAML files in it: {', '.join(found[:8])}{', ...' if len(found) > 8 else ''})" if found else ""
        raise ConfigError(f"{str(path)!r} is a directory; expected a YAML file{hint}")
    if not path.is_file():
        raise ConfigError(f"YAML file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{path}: duplicate key {dup.key!r} at line {dup.second} (first defined at line {dup.first}); "
            "each key may appear once per mapping"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"malformed YAML at {where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _is_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or Path(spec).is_file()


def _card_or_directory(name: str) -> Path:
    """The card of method ``name``; a directory of that name (not a method) is named as such."""
    try:
        return registry.card_path(name)
    except (UnknownNameError, PluginError):
        if Path(name).is_dir():
            load_yaml(name)  # raises: a directory, not a YAML file
        raise


def _normalize_policy(value: Any, key: str) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, (Mapping, DictConfig)):
        return value
    raise ConfigError(f"{key}={value!r}: a policy is given as a name or a mapping with a 'name' key")


def _raw_spec(spec: Any, seen: tuple[str, ...] = ()) -> DictConfig:
    """The unresolved spec as a DictConfig, with ``base`` chains expanded."""
    if isinstance(spec, str):
        cfg = load_yaml(spec) if _is_path(spec) else load_yaml(_card_or_directory(spec))
        if not _is_path(spec) and "name" not in cfg:
            cfg.name = spec
    elif isinstance(spec, DictConfig):
        cfg = spec.copy()
    elif isinstance(spec, Mapping):
        cfg = OmegaConf.create(dict(spec))
    else:
        raise ConfigError(
            f"cannot build a compressor from {type(spec).__name__}; accepted: a method name, a YAML path, a dict or DictConfig"
        )
    for key in POLICY_KEYS:
        if key in cfg:
            v = cfg._get_node(key)._value() if OmegaConf.is_interpolation(cfg, key) else cfg[key]
            if isinstance(v, str) and not OmegaConf.is_interpolation(cfg, key):
                cfg[key] = {"name": v}
    base = cfg.get("base")
    if base:
        if base in seen:
            raise ConfigError(f"cyclic 'base' chain: {' -> '.join(seen + (base,))}")
        parent = _raw_spec(base, seen + (str(base),))
        for meta in ("name", "paper", "url", "description"):
            if meta in cfg:
                parent[meta] = cfg[meta]
        # a policy whose name changes replaces the parent's section instead of merging into it
        for key in POLICY_KEYS:
            if key in cfg and key in parent and cfg[key] is not None and "name" in cfg[key] and parent[key] is not None and cfg[key].name != parent[key].get("name"):
                parent[key] = None
        child = cfg.copy()
        child.pop("base")
        cfg = OmegaConf.merge(parent, child)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: Mapping[str, Any] | None = None, dotlist: list[str] | None = None) -> DictConfig:
    """Apply keyword overrides (``scorer={'window': 32}``, ``**{'scorer.window': 32}``) and a dotlist."""
    cfg = cfg.copy()
    items: list[tuple[str, Any]] = list((overrides or {}).items())
    if dotlist:
        if isinstance(dotlist, str):
            raise ConfigError(f"dotlist must be a list of key=value strings; got the string {dotlist!r}")
        for item in dotlist:
            if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
                raise ConfigError(
                    f"override {item!r} is not of the form key=value (e.g. budget=0.25 or scorer.window=32)"
                )
        try:
            dl = OmegaConf.from_dotlist(list(dotlist))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override in {dotlist}: {exc}") from None
        items += [(k, dl[k]) for k in dl]
    for key, value in items:
        top = key.split(".")[0]
        if top not in ALLOWED_KEYS:
            hint = close_matches(top, ALLOWED_KEYS)
            raise ConfigError(
                f"unknown compressor key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "") + f" Accepted: {', '.join(ALLOWED_KEYS)}"
            )
        if top in POLICY_KEYS and key == top and isinstance(value, str):
            cfg[top] = {"name": value}  # a new policy by name replaces the section
            continue
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def resolve_spec(spec: Any, overrides: Mapping[str, Any] | None = None, dotlist: list[str] | None = None) -> dict[str, Any]:
    """The fully resolved specification as a plain dict (defaults filled in, interpolations done)."""
    if isinstance(spec, Compressor):
        spec = spec.to_dict()
    cfg = apply_overrides(_raw_spec(spec), overrides, dotlist)
    unknown = [k for k in cfg if k not in ALLOWED_KEYS]
    if unknown:
        k = str(unknown[0])
        hint = close_matches(k, ALLOWED_KEYS)
        raise ConfigError(
            f"unknown compressor key {k!r}" + (f"; did you mean {hint[0]!r}?" if hint else "") + f" Accepted: {', '.join(ALLOWED_KEYS)}"
        )
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve compressor spec: {exc}") from None
    assert isinstance(data, dict)
    out = {**DEFAULTS, **data}
    for key in POLICY_KEYS:
        out[key] = _normalize_policy(out[key], key)
    out.pop("base", None)
    return out


def _make_policy(kind: str, section: Mapping[str, Any] | None) -> Any:
    if section is None:
        return None
    params = dict(section)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{kind} section {dict(section)!r} has no 'name'")
    cls = registry.get_policy(kind, name)
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in params if k not in accepted]
    if unknown:
        hint = close_matches(unknown[0], accepted)
        raise ConfigError(
            f"{kind} {name!r} has no hyperparameter {unknown[0]!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" Accepted: {', '.join(accepted) if accepted else '(none)'}"
        )
    try:
        return cls(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{kind} {name!r}: {exc}") from None


def build(spec: Any, dotlist: list[str] | None = None, **overrides: Any) -> Compressor:
    """Build a :class:`Compressor` from a method name, a YAML path, or a dict/DictConfig.

    Keyword overrides replace values of the spec (``budget=0.25``, ``scorer={'window': 32}``,
    ``**{'scorer.window': 32}``); ``dotlist`` takes omegaconf ``key=value`` strings.
    """
    data = resolve_spec(spec, overrides, dotlist)
    policies = {k: _make_policy(k, data[k]) for k in POLICY_KEYS}
    comp = Compressor(
        budget=data["budget"],
        positions=data["positions"],
        compress_sliding_layers=bool(data["compress_sliding_layers"]),
        seed=data["seed"],
        compile=data["compile"],
        name=data.get("name"),
        spec=data,
        **policies,
    )
    return comp
