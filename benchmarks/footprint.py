"""What the library costs to install and import, next to the evaluation extra.

In one fresh virtualenv: install torch (the spec given, the CPU build by default) and kvframe with
no extra, measure the installed size (site-packages) and the cold import time of ``import kvframe``
(median of fresh processes), and run ``build``/``attach``/``compress`` on a tiny model there (the
library works without the extra). Then install ``kvframe[eval]`` into the same virtualenv and
measure again: the size it adds and the import time of what ``kvframe eval`` loads before it starts
(``kvframe.eval.runner`` with Lightning, W&B and matplotlib).

Run: ``python benchmarks/footprint.py [--torch torch==2.13.0] [--repeats 5]`` (a few minutes: it
installs packages). Writes ``benchmarks/results/footprint.json`` and ``.md`` with the machine
described. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = (
    "import torch, kvframe; from kvframe.testing import tiny_model; m = tiny_model('llama'); "
    "ids = torch.randint(3, 100, (1, 40));\n"
    "with torch.no_grad(), kvframe.attach(m, kvframe.build('snapkv', budget=0.5, **{'scorer.window': 8})):\n"
    "    m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)\n"
    "kvframe.compress(kvframe.build('knorm'), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)); print('ok')"
)
EVAL_IMPORT = "import kvframe.eval.runner, lightning, wandb, matplotlib.pyplot"


def _pip(py: Path, *args: str) -> None:
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _size(py: Path) -> int:
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    total = 0
    for dirpath, _, files in os.walk(site):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def _import_seconds(py: Path, code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([str(py), "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch", default="torch==2.13.0", help="torch requirement installed first (default: the CPU build)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "footprint"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = venv / "bin" / "python"
        _pip(py, args.torch)
        base = _size(py)
        _pip(py, str(ROOT))
        lib = _size(py)
        smoke = subprocess.run([str(py), "-c", SMOKE], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lib_import = _import_seconds(py, "import kvframe", args.repeats)
        torch_import = _import_seconds(py, "import torch", args.repeats)
        _pip(py, f"{ROOT}[eval]")
        full = _size(py)
        eval_import = _import_seconds(py, EVAL_IMPORT, args.repeats)
    res = {
        "machine": machine(),
        "torch_spec": args.torch,
        "bytes": {"torch_only": base, "kvframe": lib, "kvframe_eval": full},
        "import_s": {"torch": torch_import, "kvframe": lib_import, "kvframe_eval": eval_import},
        "library_smoke_without_eval": smoke.returncode == 0 and smoke.stdout.strip().endswith("ok"),
        "repeats": args.repeats,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    mib = lambda b: b / 2**20  # noqa: E731
    m = res["machine"]
    md = [
        "# Install and import footprint: kvframe vs kvframe[eval]", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {sys.version.split()[0]}; torch from `{args.torch}`. "
        f"Sizes are site-packages of one fresh virtualenv; import times are the median of {args.repeats} fresh processes.", "",
        "| install | site-packages MiB | added MiB | cold import s |", "|---|---|---|---|",
        f"| torch only | {mib(base):.0f} | — | {torch_import:.2f} (`import torch`) |",
        f"| kvframe | {mib(lib):.0f} | {mib(lib - base):.0f} | {lib_import:.2f} (`import kvframe`) |",
        f"| kvframe[eval] | {mib(full):.0f} | {mib(full - lib):.0f} more | {eval_import:.2f} (`{EVAL_IMPORT}`) |", "",
        f"build/attach/generate/compress on a tiny model without the eval extra: {'ok' if res['library_smoke_without_eval'] else 'FAILED'}.",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
