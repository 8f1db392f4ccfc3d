"""Compiled vs eager compressors, and Triton kernels vs their torch references.

Part 1 (every device): for every registry card, one trigger firing (``Compressor.compress_step``:
observe, budgets, score, select, merge, compact) on synthetic inputs shaped like one SmolLM2-135M
layer (``benchmarks/_synthetic.py``: 3 KV heads, 9 query heads, head dim 64) at ``T`` tokens, run
eager (``compile: false``) and compiled (``compile: true``: inductor, dynamic shapes), interleaved,
median of ``--repeats`` calls after a warm-up. Reported: the first compiled call's time (inductor
compilation, with a fresh ``TORCHINDUCTOR_CACHE_DIR`` so it is the cold cost), the steady-state
eager/compiled speed-up, and parity: kept slots identical, largest absolute difference of keys,
values and log-weights.

Part 2 (CUDA only): each ``kvframe::`` custom op with backend ``triton`` vs ``torch`` at model
shapes. On a machine without CUDA, Triton runs only in its interpreter (a correctness tool, ~1 ms
per program), so the part is skipped and says so.

Run: ``python benchmarks/compiled.py [--tokens 2048] [--repeats 10] [--device cpu|cuda] [--quick]``.
Writes ``benchmarks/results/compiled.json`` and ``.md``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kvframe
from kvframe.api import compression_inputs

from _common import builtin_cards  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _machine import machine  # noqa: E402
from _synthetic import synthetic_inputs  # noqa: E402

# pair-merging cards protect sinks and merge adjacent pairs: a one-shot 50% is out of their reach
BUDGET = {"asymkv": 0.75, "asymkv_disjoint": 0.8, "kvslimmer": 0.75}
QUICK = ["snapkv", "knorm", "weightedkv", "kvslimmer"]


def _call(comp, kw, device):
    """Time one trigger firing (``compress_step``) on ``kw``, the inputs ``kvframe.compress`` takes;
    step 1, as a firing after the first (KVSlimmer smooths its statistics across steps)."""
    state, ctx = compression_inputs(comp, step=1, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, _ = comp.compress_step(state, ctx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def compare(name: str, tokens: int, repeats: int, device: torch.device) -> dict:
    budget = BUDGET.get(name, 0.5)
    eager = kvframe.build(name, budget=budget, compile=False)
    compiled = kvframe.build(name, budget=budget, compile=True)
    kw = synthetic_inputs(eager, tokens, n_queries=None if name.startswith("h2o") else 64)
    kw = {k: ({n: t.to(device) for n, t in v.items()} if k == "stats" else v.to(device)) for k, v in kw.items()}
    ref, _ = _call(eager, kw, device)  # warm-up eager
    out, first = _call(compiled, kw, device)  # compiles
    same_kept = bool(torch.equal(ref.positions, out.positions) and torch.equal(ref.valid, out.valid))
    diff = max(
        float((ref.keys.float() - out.keys.float()).abs().max()),
        float((ref.values.float() - out.values.float()).abs().max()),
        float((ref.log_weights - out.log_weights).abs().max()),
    ) if same_kept else float("nan")
    te, tc = [], []
    for _ in range(repeats):
        te.append(_call(eager, kw, device)[1])
        tc.append(_call(compiled, kw, device)[1])
    me, mc = statistics.median(te), statistics.median(tc)
    return {"method": name, "budget": budget, "tokens": tokens, "first_compiled_call_s": first,
            "eager_s": me, "compiled_s": mc, "speedup": me / mc, "same_kept": same_kept, "max_abs_diff": diff,
            "eager_all": te, "compiled_all": tc}


def kernel_rows(device: torch.device, repeats: int) -> list[dict]:
    """Triton vs torch reference per custom op (CUDA only)."""
    from kvframe.kernels import kernel_backend
    from _kernel_cases import kernel_cases  # noqa: E402

    rows = []
    for label, fn in kernel_cases(device):
        times = {}
        for be in ("torch", "triton"):
            with kernel_backend(be):
                fn()
                torch.cuda.synchronize()
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
            times[be] = statistics.median(ts)
        rows.append({"op": label, "torch_s": times["torch"], "triton_s": times["triton"],
                     "speedup": times["torch"] / times["triton"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK)} at 512 tokens, 3 repeats")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compiled"))
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats = 512, 3
    methods = args.methods or (QUICK if args.quick else builtin_cards())
    device = torch.device(args.device)
    cache_dir = tempfile.mkdtemp(prefix="kvframe-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # cold compile: honest first-call cost
    t_start = time.perf_counter()
    rows = []
    for name in methods:
        rows.append(compare(name, args.tokens, args.repeats, device))
        r = rows[-1]
        print(f"{name}: eager {r['eager_s']*1e3:.1f} ms, compiled {r['compiled_s']*1e3:.1f} ms, x{r['speedup']:.2f}, "
              f"first call {r['first_compiled_call_s']:.1f} s, same kept {r['same_kept']}, max diff {r['max_abs_diff']:.2e}",
              flush=True)
    if device.type == "cuda":
        kernels = kernel_rows(device, args.repeats)
        kernel_note = "measured"
    else:
        kernels = []
        kernel_note = ("not measured: no CUDA device on this machine; Triton runs on CPU only in its interpreter "
                       "(TRITON_INTERPRET=1), which the parity tests use and which is not a speed path")
    m = machine()
    m["device"] = str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)
    result = {"machine": m, "tokens": args.tokens, "repeats": args.repeats, "backend": "inductor", "dynamic": True,
              "shape": "B=1, H_kv=3, H_q=9, D=64 (one SmolLM2-135M layer), synthetic inputs",
              "wall_s": time.perf_counter() - t_start, "rows": rows, "kernels": kernels, "kernels_note": kernel_note}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Compiled vs eager compressors — one trigger firing, {args.tokens} tokens, one SmolLM2-135M layer's shape",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), device {m['device']}. "
        f"torch.compile backend inductor, dynamic shapes; eager and compiled calls interleaved, median of {args.repeats} "
        "after a warm-up. First call: cold inductor compilation (fresh cache directory). Parity: kept slots identical and "
        "largest |compiled − eager| over keys, values and log-weights.",
        "",
        "| method | budget | eager ms | compiled ms | eager / compiled | first compiled call s | same kept slots | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['eager_s']*1e3:.2f} | {r['compiled_s']*1e3:.2f} | "
                     f"{r['speedup']:.2f} | {r['first_compiled_call_s']:.1f} | {'yes' if r['same_kept'] else 'NO'} | "
                     f"{r['max_abs_diff']:.1e} |")
    sp = [r["speedup"] for r in rows]
    lines += ["", f"Median speed-up over methods: {statistics.median(sp):.2f}× (min {min(sp):.2f}×, max {max(sp):.2f}×).", ""]
    lines += ["## Triton kernels vs torch reference", ""]
    if kernels:
        lines += ["| op | torch ms | triton ms | torch / triton |", "|---|---|---|---|"]
        lines += [f"| {k['op']} | {k['torch_s']*1e3:.3f} | {k['triton_s']*1e3:.3f} | {k['speedup']:.2f} |" for k in kernels]
    else:
        lines.append(kernel_note.capitalize() + ".")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
