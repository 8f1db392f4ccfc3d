"""The README's performance section is generated from the committed benchmark results and in sync."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_performance_section_matches_results():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_benchmark_script_has_a_help():
    scripts = ("overhead", "decode_step", "scaling", "compiled", "kvpress_compare", "cache_memory", "seed_methods",
               "lm_eval_local", "eval_default", "footprint", "stream")

    def run(script: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"], capture_output=True,
                              text=True, cwd=ROOT / "benchmarks")

    # each run is mostly interpreter start-up and imports: run them side by side on the machine's cores
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        for script, proc in zip(scripts, pool.map(run, scripts)):
            assert proc.returncode == 0 and "usage" in proc.stdout, (script, proc.stderr[-500:])
