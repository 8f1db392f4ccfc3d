"""Cache bytes actually held after compression, and the prefill overhead of compressing.

For each method and budget, one ~T-token SmolLM2 prefill through ``kvframe.attach``: the bytes the
SlotCache holds (keys, values, positions, log-weights, validity), the KV bytes against
``budget x full``, content versus padding slots (ragged head budgets), and the time of the prefill
(compression included) as a ratio to the uncompressed prefill measured in the same run.

Run: ``python benchmarks/cache_memory.py [--tokens 2048] [--repeats 3]``. Writes
``benchmarks/results/cache_memory.json`` and ``.md`` with the machine described. Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import kvframe
from kvframe.eval.models import load_model
from kvframe.eval.tasks.passkey import make_passkey_samples

from _common import timed_prefill  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _machine import machine  # noqa: E402

METHODS = ["full", "streaming_llm", "knorm", "snapkv", "h2o", "tova", "pyramidkv", "adakv"]
BUDGETS = [0.5, 0.25]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_memory"))
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    text = make_passkey_samples(tok, n=1, length=args.tokens + 64, seed=0)[0].context
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    rows = []
    full_times = []
    for method in METHODS:
        for budget in ([None] if method == "full" else BUDGETS):
            comp = kvframe.build(method, budget=budget if budget is not None else 1.0)
            times = []
            for _ in range(args.repeats):
                # interleave a full prefill with each measurement so the ratio is side by side
                full_t, full_cache = timed_prefill(model, kvframe.build("full"), ids)
                full_times.append(full_t)
                t, cache = timed_prefill(model, comp, ids)
                times.append(t / full_t)
            mem, fmem = cache.memory(), full_cache.memory()
            rows.append({
                "method": method, "budget": budget, "tokens": int(ids.shape[1]),
                "bytes": mem.bytes, "kv_bytes": mem.kv_bytes, "full_kv_bytes": fmem.kv_bytes,
                "kv_over_budget_x_full": mem.kv_bytes / (fmem.kv_bytes * (budget or 1.0)),
                "content_slots": mem.content_slots, "padding_slots": mem.padding_slots,
                "prefill_ratio_median": statistics.median(times),
                "compression_s": cache.compression_seconds,
            })
            print(rows[-1], flush=True)
    result = {"machine": machine(), "model": "SmolLM2-135M-Instruct fp32", "full_prefill_s_median": statistics.median(full_times), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = [
        f"# Cache memory and prefill overhead — SmolLM2-135M fp32, {args.tokens}-token prompt",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), CPU. "
        f"Uncompressed prefill median {result['full_prefill_s_median']:.2f} s. Ratios are measured side by side "
        f"(each compressed prefill right after an uncompressed one), median of {args.repeats}.",
        "",
        "| method | budget | cache bytes | KV bytes | KV / (budget × full KV) | content slots | padding slots | prefill+compress / prefill | compression s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget'] if r['budget'] is not None else '-'} | {r['bytes']:,} | {r['kv_bytes']:,} | "
            f"{r['kv_over_budget_x_full']:.3f} | {r['content_slots']:,} | {r['padding_slots']:,} | {r['prefill_ratio_median']:.3f} | {r['compression_s']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
