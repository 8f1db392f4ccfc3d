"""Wall time and peak memory of compression for every seed method, and its passkey answer.

One passkey prompt of ~T tokens (needle at depth 0.5) on SmolLM2-135M, fp32, query-agnostic: the
context is prefilled (and compressed) through ``kvframe.attach``, then the question is appended and
the answer generated. Every (method, budget) runs in its own fresh subprocess, one after the other
in the same invocation, so peak memory is measured without interference and the figures sit side by
side (KVSlimmer next to AsymKV, every method next to ``full``).

Reported per run:
- ``prefill_s``: wall time of the context prefill including every compression step (and, for
  chunked methods, the scoring passes: AsymKV's backward, KVSlimmer's forward-only pass);
- ``compress_s``: time inside the compressor itself (``SlotCache.compression_seconds``);
- ``peak_extra_mb``: peak memory in use during prefill + generation above the level just before it
  (glibc heap in use, sampled every 5 ms: :class:`kvframe.eval.generation.PeakMemory`, the figure
  ``kvframe eval`` reports);
- ``slots``: content slots per layer and head after the prefill, and the cache bytes held;
- the generated answer and whether it contains the pass key.

Run: ``python benchmarks/seed_methods.py [--tokens 2048]``; writes
``benchmarks/results/seed_methods.{json,md}`` with the machine described. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _machine import machine  # benchmarks/ is on sys.path when run as a script

METHODS = [
    "full",
    "streaming_llm",
    "snapkv",
    "h2o_decode",
    "tova_decode",
    "streaming_llm_decode",
    "weightedkv",
    "cam",
    "asymkv",
    "kvslimmer",
    "balancekv",
    "balancekv_uniform",
]
BUDGETS = [0.5, 0.25]
RESULTS = Path(__file__).resolve().parent / "results"


def run_one(method: str, budget: float, tokens: int) -> dict[str, object]:
    import torch

    import kvframe
    from kvframe.eval.generation import generate_answer
    from kvframe.eval.models import load_model
    from kvframe.eval.tasks.passkey_task import PasskeyTask

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype="float32")
    task = PasskeyTask(n_samples=1, length=tokens, depths=[0.5], seed=0)
    sample = task.samples(tok)[0]
    comp = kvframe.build(method, budget=budget) if method != "full" else kvframe.build("full")
    # the same per-sample path as `kvframe eval` (query-agnostic): prefill + compression, question, 12 tokens
    res = generate_answer(model, tok, comp, sample, max_new_tokens=12, mode="query_agnostic")
    heads = len(model.model.layers) * model.config.num_key_value_heads
    return {
        "method": method,
        "budget": budget if method != "full" else None,
        "prompt_tokens": res["prompt_tokens"],
        "prefill_tokens": res["prefill_tokens"],
        "prefill_s": round(res["prefill_s"], 3),
        "compress_s": round(res["compression_s"], 3),
        "decode_s": round(res["decode_s"], 3),
        "peak_extra_mb": round(res["peak_memory_bytes"] / 2**20, 1),
        "slots_per_head_after_prefill": res["cache_content_slots"] // heads,
        "cache_bytes_after_prefill": res["cache_bytes"],
        "answer": " ".join(res["prediction"].split()),
        "passkey": sample.answers[0],
        "correct": bool(task.score(res["prediction"], sample)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--budgets", nargs="*", type=float, default=BUDGETS)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], float(args.one[1]), args.tokens)))
        return
    rows = []
    for method in args.methods:
        for budget in ([None] if method == "full" else args.budgets):
            cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--one", method, str(budget or 1.0)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{method} at budget {budget} failed")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    info = {**machine(), "dtype": "float32", "model": "SmolLM2-135M-Instruct"}
    (RESULTS / "seed_methods.json").write_text(json.dumps({"machine": info, "tokens": args.tokens, "runs": rows}, indent=2) + "\n")
    lines = [
        f"# Seed methods on SmolLM2-135M, one ~{args.tokens}-token passkey prompt (query-agnostic)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), fp32, CPU.",
        "Each row ran in a fresh subprocess of the same invocation. prefill includes every compression step and",
        "scoring pass; peak is memory in use (glibc heap) above the level just before prefill, during prefill + generation.",
        "",
        "| method | budget | slots/head after prefill | prefill s | of which compressor s | peak extra MB | answer | correct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget'] if r['budget'] is not None else '—'} | {r['slots_per_head_after_prefill']} | "
            f"{r['prefill_s']:.2f} | {r['compress_s']:.2f} | {r['peak_extra_mb']:.0f} | {r['answer'].replace('|', '/')!s:.28} | {'yes' if r['correct'] else 'no'} |"
        )
    (RESULTS / "seed_methods.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
