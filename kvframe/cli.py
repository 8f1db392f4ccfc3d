"""The ``kvframe`` command line: ``list``, ``show``, ``eval``, ``report`` and ``lm-eval``.

Each subcommand is a plain typed function; ``main`` only parses arguments and maps outcomes to exit
statuses: 0 success, 1 an evaluation finished with failed cells (their errors are in the results),
2 a bad input (one line naming the bad value and what is accepted), 130 interrupted (Ctrl-C; the
message says how to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kvframe import registry
from kvframe.errors import ConfigError, KVFrameError


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


EVAL_EXTRA_MODULES = ("lightning", "wandb", "matplotlib", "rapidfuzz", "rouge_score", "rouge")
EVAL_INSTALL = "pip install 'kvframe[eval]'"
LM_EVAL_INSTALL = 'pip install "kvframe[lm-eval]"'


def _require_extra(command: str, extra: str, modules: tuple[str, ...], install: str) -> None:
    """A subcommand that needs an optional extra says so in one line instead of an ImportError."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise KVFrameError(f"kvframe {command} needs the {extra} extra (missing: {', '.join(missing)}); install it with {install}")


def evaluate(config: str | None = None, overrides: list[str] | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Run an evaluation; with no config the built-in default. Returns the run directory and the
    results records (``status`` ``failed`` for cells that raised)."""
    _require_extra("eval", "evaluation", EVAL_EXTRA_MODULES, EVAL_INSTALL)
    from kvframe.eval.config import default_config_path, load_config
    from kvframe.eval.runner import evaluate as run

    path = config if config is not None else default_config_path()
    cfg = load_config(path, overrides)
    return run(cfg)


def report(
    run_dirs: list[str], out: str = "report", keep_both: bool = False, wandb: str | None = None, project: str = "kvframe"
) -> str:
    """Merge the ``results.json`` of one or more eval runs into one leaderboard under ``out``
    (Markdown, CSV, score-vs-budget plots; a W&B run if ``wandb`` is ``offline`` or ``online``);
    returns the Markdown and where the files went."""
    _require_extra("report", "evaluation", ("matplotlib", *(("wandb",) if wandb else ())), EVAL_INSTALL)
    from kvframe.eval.report import report as make_report

    rep = make_report(run_dirs, out=out, keep_both=keep_both, wandb=wandb, project=project)
    return rep.markdown + "\nwritten: " + ", ".join(str(f) for f in rep.files)


def lm_eval(args: list[str]) -> list[dict[str, Any]]:
    """Run lm-evaluation-harness's own command line on ``args`` with kvframe's model registered as
    ``kvframe`` (every lm-eval flag works); print and return, per kvframe model of the run, the summary
    of the cache bytes held after compression (see :mod:`kvframe.eval.harness`)."""
    _require_extra("lm-eval", "lm-evaluation-harness", ("lm_eval",), LM_EVAL_INSTALL)
    try:
        from kvframe.eval.harness import run_cli
    except ImportError as exc:  # lm_eval is there but something it needs is not
        raise KVFrameError(f"kvframe lm-eval could not import lm-evaluation-harness ({exc}); install it with {LM_EVAL_INSTALL}") from exc
    return run_cli(args)


def _resume_hint(argv: list[str], run_dir: Path) -> str:
    args = [a for a in argv if not a.startswith("run_name=")]
    return " ".join(["kvframe", "eval", *args, f"run_name={run_dir.name}"])


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
    pr = sub.add_parser("report", help="merge the results of eval runs into one leaderboard (Markdown, CSV, plots)")
    pr.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by kvframe eval (or their results.json)")
    pr.add_argument("--out", default="report", help="output directory (default: ./report)")
    pr.add_argument("--keep-both", action="store_true",
                    help="where two runs hold the same cell under different configurations, show both as method@run "
                         "instead of refusing")
    pr.add_argument("--wandb", choices=("offline", "online"), default=None, help="also log the leaderboard to a W&B run")
    pr.add_argument("--wandb-project", default="kvframe", help="W&B project of that run (default: kvframe)")
    pm = sub.add_parser(
        "lm-eval", add_help=False,
        help="run lm-evaluation-harness with kvframe's model: kvframe lm-eval --model kvframe --model_args "
        "pretrained=...,method=snapkv,budget=0.5 --tasks ... (every lm-eval flag; --help shows them)",
    )
    pm.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's, flags included
        return _main_lm_eval(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            print(list_registry(args.json))
        elif args.command == "show":
            print(show(args.name, args.overrides), end="")
        elif args.command == "report":
            print(report(args.run_dirs, out=args.out, keep_both=args.keep_both, wandb=args.wandb, project=args.wandb_project))
        elif args.command == "eval":
            config = None
            rest = list(args.args)
            if rest and "=" not in rest[0]:
                if not Path(rest[0]).exists() and not rest[0].endswith((".yaml", ".yml")):
                    raise ConfigError(
                        f"{rest[0]!r} is neither a config file (no such file) nor a key=value override "
                        "(e.g. budgets=[0.5] or configs/eval_quick.yaml)"
                    )
                config = rest.pop(0)
            run_dir, records = evaluate(config, rest)
            failed = [r for r in records if r["status"] == "failed"]
            if failed:
                print(f"kvframe eval: {len(failed)} of {len(records)} cells failed (errors in {run_dir / 'results.json'}):",
                      file=sys.stderr)
                for r in failed:
                    budget = r["budget"] if r["budget"] is not None else "full"
                    print(f"  {r['method']} / {budget} / {r['task']} / {r['mode']}: {r['error']}", file=sys.stderr)
                return 1
    except KVFrameError as exc:
        print(f"kvframe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from kvframe.eval.runner import EvalInterrupted

        if not isinstance(exc, EvalInterrupted):
            print(f"kvframe {args.command}: interrupted", file=sys.stderr)
            return 130
        eval_args = argv[argv.index("eval") + 1:] if "eval" in argv else []
        print(
            f"kvframe eval: interrupted. Finished samples are saved in {exc.run_dir / 'predictions.jsonl'} "
            f"(results so far: {exc.run_dir / 'results.json'}). Resume with:\n  {_resume_hint(eval_args, exc.run_dir)}",
            file=sys.stderr,
        )
        return 130
    return 0


def _main_lm_eval(args: list[str]) -> int:
    try:
        lm_eval(args)
    except KVFrameError as exc:
        print(f"kvframe lm-eval: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # lm-eval's own exits: --help (0), bad flags (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print("kvframe lm-eval: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
