"""One-token decode step time of SmolLM2-135M with a full vs a compressed SlotCache, beside its bandwidth limit.

For each context length (1k, 2k, 4k, 8k by default; SmolLM2 has 8192 positions) the prompt is
prefilled **once** at batch 1 through ``kvframe.attach`` with the ``full`` card. Compressed caches
are copies of that cache compressed to each budget (0.5, 0.25, 0.125) by ``streaming_llm``
(``--method``) through the same code path a real prefill trigger uses
(``kvframe.attention.apply_compression``): a decode step's cost depends on the number of slots, not on
which slots are kept. Batch 8 repeats the rows of these caches (``SlotLayer.batch_repeat_interleave``).

Configurations at each context and batch, timed interleaved (one step of each in turn, ``--steps``
rounds after ``--warmup`` rounds, median per configuration):

- ``full``: the uncompressed cache; its layers take kvframe's vanilla fast path (transformers' own SDPA);
- ``full_masked`` (reference, not a budget): the same full cache marked as compressed, so every step
  builds kvframe's per-head position mask like a compressed cache does — separates the cost of
  kvframe's slot attention from the effect of fewer slots (skipped where the full KV cache is over
  ``--masked-max-gb``, 2 GB: at 8k x batch 8 it would add 3 GB to the ~10 GB held);
- ``budget 0.5 / 0.25 / 0.125``: the compressed copies.

Every step feeds one token (``logits_to_keep=1``); the cache grows by one slot per step, written
into the slot store's free capacity in place (the results committed before the slot store were
measured when each step concatenated the layer). The speed-up is
full / compressed, measured side by side. Beside it is the **bandwidth limit**:
a step must at least read the weights and the KV cache once, so it can at most speed up by
``(weight_bytes + kv_full_bytes) / (weight_bytes + kv_budget_bytes)``, weight bytes from the model's
parameters (tied embedding counted once), KV bytes from ``SlotCache.memory().kv_bytes`` (batch
included). A speed-up above the limit means the full step does more than stream its bytes (e.g.
compute, copies); far below means per-step overhead dominates.

Limits: CPU only, fp32, no torch.compile; 2 cores possibly shared, so absolute ms carry the
machine's load (ratios are side by side). Compression time is not included (see ``overhead.py``);
decode-time cards that evict one slot per step add that work on top (``scaling.py --modes
evict_one``).

Run: ``python benchmarks/decode_step.py [--quick] [--contexts 1024 2048 4096 8192]
[--budgets 0.5 0.25 0.125] [--batches 1 8] [--steps 15]``. Writes
``benchmarks/results/decode_step.{json,md}``. Default run about 6-8 min on a 2-core Xeon (the
8k prefill ~1 min; ~10 GB held at 8k x batch 8).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import kvframe
from kvframe.attach import cache_argument
from kvframe.layer_pass import apply_compression, compression_context
from kvframe.eval.models import load_model
from kvframe.eval.tasks.passkey import make_passkey_samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import choose_threads, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def compressed_copy(cache, comp):
    """A copy of ``cache`` compressed by ``comp`` through the prefill trigger's code path."""
    c = copy.deepcopy(cache)
    c.compressor = comp
    for i, layer in enumerate(c.layers):
        apply_compression(c, layer, i, compression_context(c, layer, i, "prefill"))
    return c


def masked_copy(cache):
    """A copy of the full cache that takes kvframe's masked slot attention (as after a compression)."""
    c = copy.deepcopy(cache)
    for layer in c.layers:
        layer.plain = False
        layer.heads_uniform = False
    return c


def repeat_rows(cache, n: int):
    c = copy.deepcopy(cache)
    if n > 1:
        for layer in c.layers:
            layer.batch_repeat_interleave(n)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", nargs="*", type=int, default=[1024, 2048, 4096, 8192])
    ap.add_argument("--budgets", nargs="*", type=float, default=[0.5, 0.25, 0.125])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--steps", type=int, default=15, help="timed rounds (one step of every configuration each)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--method", default="streaming_llm", help="card that compresses the copies (cost depends on slot count only)")
    ap.add_argument("--no-masked", action="store_true", help="skip the full_masked reference configuration")
    ap.add_argument("--masked-max-gb", type=float, default=2.0,
                    help="skip full_masked where the full KV cache exceeds this (default: only 8k x batch 8, 3 GB)")
    ap.add_argument("--quick", action="store_true", help="contexts 512 and 1024, 5 steps (development check)")
    ap.add_argument("--out", default=str(RESULTS / "decode_step"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own choice, or 1 if the machine is already busy)")
    args = ap.parse_args()
    threads_note = choose_threads(args.threads)
    if args.quick:
        args.contexts = [512, 1024]
        args.steps = 5
        args.warmup = 1

    t_start = time.perf_counter()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    text = make_passkey_samples(tok, n=1, length=max(args.contexts) + 64, seed=0)[0].context
    all_ids = tok(text, return_tensors="pt").input_ids
    if all_ids.shape[1] < max(args.contexts):
        raise SystemExit(f"prompt has only {all_ids.shape[1]} tokens")
    full_comp = kvframe.build("full")
    arg = cache_argument(model)

    rows, raw = [], {}
    with torch.no_grad(), kvframe.attach(model, full_comp) as h:
        for ctx_len in args.contexts:
            ids = all_ids[:, :ctx_len]
            base = h.new_cache()
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1, **{arg: base})
            prefill_s = time.perf_counter() - t0
            next_tok = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            del out
            configs1 = {"full": base}
            if not args.no_masked:
                configs1["full_masked"] = masked_copy(base)
            for b in args.budgets:
                configs1[f"budget {b}"] = compressed_copy(base, kvframe.build(args.method, budget=b))
            for batch in args.batches:
                full_kv = configs1["full"].memory().kv_bytes * batch
                skip = {"full_masked"} if full_kv > args.masked_max_gb * 1e9 else set()  # bound the memory held
                caches = {name: repeat_rows(c, batch) for name, c in configs1.items() if name not in skip}
                kv = {name: c.memory().kv_bytes for name, c in caches.items()}
                slots = {name: c.memory().per_layer_slots[0] for name, c in caches.items()}
                token = next_tok.expand(batch, 1).contiguous()
                times: dict[str, list[float]] = {name: [] for name in caches}
                gc.collect()
                for rnd in range(args.warmup + args.steps):
                    for name, c in caches.items():  # interleaved: one step of each configuration per round
                        t0 = time.perf_counter()
                        model(token, use_cache=True, logits_to_keep=1, **{arg: c})
                        dt = time.perf_counter() - t0
                        if rnd >= args.warmup:
                            times[name].append(dt)
                med = {name: statistics.median(ts) for name, ts in times.items()}
                raw[f"{ctx_len}/{batch}"] = times
                for name in caches:
                    budget = None if name.startswith("full") else float(name.split()[1])
                    limit = (weight_bytes + kv["full"]) / (weight_bytes + kv[name])
                    rows.append({
                        "context": ctx_len, "batch": batch, "config": name, "budget": budget,
                        "slots_per_head_layer0": slots[name], "kv_bytes": kv[name],
                        "step_ms": med[name] * 1e3, "speedup": med["full"] / med[name],
                        "speedup_vs_masked": (med["full_masked"] / med[name]) if "full_masked" in med else None,
                        "bandwidth_limit": limit, "prefill_s_batch1": prefill_s,
                    })
                    r = rows[-1]
                    print(f"ctx {ctx_len} batch {batch} {name:12s} {r['step_ms']:8.1f} ms  speed-up {r['speedup']:.2f} "
                          f"(limit {limit:.2f})", flush=True)
                del caches
            del configs1, base
            gc.collect()
            print(f"context {ctx_len} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    wall = time.perf_counter() - t_start
    info = machine()
    result = {
        "benchmark": "decode_step", "machine": info, "wall_s": wall, "model": "SmolLM2-135M-Instruct fp32",
        "weight_bytes": weight_bytes,
        "settings": {"contexts": args.contexts, "budgets": args.budgets, "batches": args.batches, "steps": args.steps,
                     "warmup": args.warmup, "method": args.method, "masked_reference": not args.no_masked, "quick": args.quick, "threads": threads_note},
        "versions": {"torch": torch.__version__, "kvframe": kvframe.__version__, "python": sys.version.split()[0],
                     "transformers": __import__("transformers").__version__},
        "rows": rows, "raw_step_s": raw,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Decode step time — SmolLM2-135M fp32, full vs compressed SlotCache",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), CPU. "
        f"One-token step (`logits_to_keep=1`), median of {args.steps} steps per configuration, configurations interleaved "
        f"step by step. Compressed caches: `{args.method}` copies of one batch-1 prefill, rows repeated for batch > 1. "
        f"speed-up = full step / compressed step (side by side); limit = (weights + full KV) / (weights + kept KV) bytes, "
        f"weights {weight_bytes / 1e6:.0f} MB. `full_masked` = the full cache through kvframe's masked slot attention "
        f"(what a compressed cache uses); 'vs masked' = full_masked / compressed. Step ms are absolute on this machine. "
        f"Wall time {wall:.0f} s{' (--quick)' if args.quick else ''}; threads {threads_note}.",
        "",
        "| context | batch | cache | slots/head | KV MB | step ms | speed-up | bandwidth limit | vs masked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vm = "—" if r["speedup_vs_masked"] is None or r["config"].startswith("full") else f"{r['speedup_vs_masked']:.2f}"
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['config']} | {r['slots_per_head_layer0']} | {r['kv_bytes'] / 1e6:.1f} | "
            f"{r['step_ms']:.1f} | {r['speedup']:.2f} | {r['bandwidth_limit']:.2f} | {vm} |"
        )
    out_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
