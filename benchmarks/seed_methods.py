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
- ``peak_extra_mb``: peak resident memory during prefill + generation above the resident memory
  just before it (sampled every 2 ms from /proc/self/statm);
- ``slots``: content slots per layer and head after the prefill, and the cache bytes held;
- the generated answer and whether it contains the pass key.

Run: ``python benchmarks/seed_methods.py [--tokens 2048]``; writes
``benchmarks/results/seed_methods.{json,md}`` with the machine described. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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


class PeakRSS:
    """Samples the process's resident set size in a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def run_one(method: str, budget: float, tokens: int) -> dict[str, object]:
    import torch

    import kvframe
    from kvframe.attach import cache_argument
    from kvframe.models import load_model
    from kvframe.tasks.passkey import make_passkey_samples, score_passkey, split_prompt

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", dtype="float32")
    sample = make_passkey_samples(tok, n=1, length=tokens, depths=[0.5], seed=0)[0]
    prefix, suffix = split_prompt(tok, sample.context, sample.question)
    pre = tok(prefix, add_special_tokens=False, return_tensors="pt").input_ids
    suf = tok(suffix, add_special_tokens=False, return_tensors="pt").input_ids
    full = torch.cat([pre, suf], dim=1)
    comp = kvframe.build(method, budget=budget) if method != "full" else kvframe.build("full")
    arg = cache_argument(model)
    with torch.no_grad(), kvframe.attach(model, comp) as handle:
        cache = handle.new_cache()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            model(pre, use_cache=True, logits_to_keep=1, **{arg: cache})
            t1 = time.perf_counter()
            slots = cache.memory()
            out = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.eos_token_id, **{arg: cache})
            t2 = time.perf_counter()
    answer = tok.decode(out[0, full.shape[1]:], skip_special_tokens=True)
    return {
        "method": method,
        "budget": budget if method != "full" else None,
        "prompt_tokens": int(full.shape[1]),
        "prefill_tokens": int(pre.shape[1]),
        "prefill_s": round(t1 - t0, 3),
        "compress_s": round(cache.compression_seconds, 3),
        "decode_s": round(t2 - t1, 3),
        "peak_extra_mb": round((mem.peak - mem.start) / 2**20, 1),
        "slots_per_head_after_prefill": slots.content_slots // max(1, len(cache.layers) * cache.layers[0].state.num_heads),
        "cache_bytes_after_prefill": slots.bytes,
        "answer": " ".join(answer.split()),
        "passkey": sample.answer,
        "correct": bool(score_passkey(answer, sample.answer)),
    }


def machine() -> dict[str, object]:
    import platform

    import torch

    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "device": "cpu", "dtype": "float32", "model": "SmolLM2-135M-Instruct"}


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
    info = machine()
    (RESULTS / "seed_methods.json").write_text(json.dumps({"machine": info, "tokens": args.tokens, "runs": rows}, indent=2) + "\n")
    lines = [
        f"# Seed methods on SmolLM2-135M, one ~{args.tokens}-token passkey prompt (query-agnostic)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), fp32, CPU.",
        "Each row ran in a fresh subprocess of the same invocation. prefill includes every compression step and",
        "scoring pass; peak is resident memory above the level just before prefill, during prefill + generation.",
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
