"""The ``kvframe`` command line: ``list``, ``show`` and ``eval``.

Each subcommand is a plain typed function; ``main`` only parses arguments and maps errors to a
one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from kvframe import registry
from kvframe.errors import KVFrameError


def list_registry(as_json: bool = False) -> str:
    """Policies by kind and named methods, with where each comes from (built-in or plugin)."""
    policies = registry.list_policies()
    methods = registry.list_methods()
    broken = registry.plugin_errors()
    if as_json:
        data = {
            "policies": {k: [{"name": e.name, "origin": e.origin} for e in policies if e.kind == k] for k in registry.KINDS},
            "methods": [{"name": n, "origin": o, "path": str(p)} for n, p, o in methods],
            "broken_plugins": {n: f"{type(e).__name__}: {e}" for n, e in broken.items()},
        }
        return json.dumps(data, indent=2)
    lines = ["Policies:"]
    for kind in registry.KINDS:
        entries = [e for e in policies if e.kind == kind]
        lines.append(f"  {kind}:")
        lines += [f"    {e.name:<22} {e.origin}" for e in entries]
    lines.append("Methods:")
    lines += [f"  {n:<24} {o}" for n, _, o in methods]
    for n, e in broken.items():
        lines.append(f"Broken plugin {n!r}: {type(e).__name__}: {e}")
    return "\n".join(lines)


def show(name: str, overrides: list[str] | None = None) -> str:
    """The fully resolved YAML of a method (name or YAML path), after ``key=value`` overrides."""
    from kvframe.config import build

    comp = build(name, dotlist=overrides or None)
    return OmegaConf.to_yaml(OmegaConf.create(comp.to_dict()))


def evaluate(config: str | None = None, overrides: list[str] | None = None) -> Path:
    """Run an evaluation; with no config the built-in default. Returns the run directory."""
    from kvframe.eval.runner import default_config_path, evaluate as run, load_config

    path = config if config is not None else default_config_path()
    cfg = load_config(path, overrides)
    run_dir, _ = run(cfg)
    return run_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvframe", description="Composable KV-cache compression for Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("list", help="list policies and methods, with their origin")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    ps = sub.add_parser("show", help="print a method's fully resolved YAML")
    ps.add_argument("name", help="method name or path to a YAML card")
    ps.add_argument("overrides", nargs="*", help="key=value overrides, e.g. budget=0.25 scorer.window=32")
    pe = sub.add_parser("eval", help="run an evaluation (default: SmolLM2, passkey, a few methods and budgets)")
    pe.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            print(list_registry(args.json))
        elif args.command == "show":
            print(show(args.name, args.overrides), end="")
        elif args.command == "eval":
            config = None
            rest = list(args.args)
            if rest and "=" not in rest[0]:
                config = rest.pop(0)
            evaluate(config, rest)
    except KVFrameError as exc:
        print(f"kvframe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
