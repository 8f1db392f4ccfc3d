"""Run ``kvframe eval`` on its built-in default and commit what it reports.

The default (``kvframe/eval/configs/eval_default.yaml``) is what a new user sees first, so its
results are kept in the repository: ``benchmarks/results/eval_default.json`` (the run's
``results.json``, one record per cell) and ``eval_default.md`` (the machine, the wall time, the
leaderboard overview and the full table). ``tests/eval/test_default_eval.py`` checks that the
committed results were produced by the current default and that methods differ in them.

    python benchmarks/eval_default.py [--threads N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice, as kvframe eval)")
    p.add_argument("--keep", default=None, help="run directory parent to keep (default: a temporary directory)")
    p.add_argument("--out", default=str(RESULTS), help="where eval_default.{json,md} go")
    args = p.parse_args(argv)

    from kvframe.cli import evaluate
    from kvframe.eval.report import leaderboard_markdown
    from kvframe.eval.results import format_table

    parent = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kvframe-default-"))
    overrides = [f"output_dir={parent}", "run_name=default", "progress_bar=false", "wandb.mode=disabled"]
    if args.threads:
        overrides.append(f"threads={args.threads}")
    t0 = time.perf_counter()
    run_dir, records = evaluate(None, overrides)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_default.json").write_text(json.dumps(records, indent=2) + "\n")
    m = machine()
    failed = [r for r in records if r["status"] != "ok"]
    lines = [
        "# `kvframe eval` with no arguments (the built-in default) on SmolLM2-135M",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), CPU. "
        f"Commit {records[0]['git_commit'] if records else '?'}; **{wall / 60:.1f} min wall time** for "
        f"{len(records)} cells ({len(failed)} failed), model load and sample generation included. "
        "Overrides: output directory only (W&B disabled to keep the machine quiet).",
        "",
        "Scores: RULER string match in [0, 1] (higher is better), streaming perplexity (lower is better). "
        "`stream`: perplexity does not depend on the mode. KV bytes are what the cache holds after the prompt.",
        "",
        leaderboard_markdown(records).replace("# kvframe leaderboard\n", "", 1).replace("\n## ", "\n### "),
        "",
        "### Every cell",
        "",
        format_table(records),
        "",
    ]
    (out / "eval_default.md").write_text("\n".join(lines))
    print(f"{len(records)} cells, {wall:.0f} s; written {out / 'eval_default.json'} and {out / 'eval_default.md'}")
    if not args.keep:
        shutil.rmtree(parent, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
