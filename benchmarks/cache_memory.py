"""Cache bytes actually held after compression, for every registered card, and the prefill overhead of compressing.

For each card of the registry (read at run time: ``kvframe.registry.list_methods()``, what
``kvframe list`` prints, plugins included; ``--methods`` to choose) and each budget (0.5 and 0.25,
``--budgets``), one ``--tokens``-token SmolLM2 prefill (a passkey context, 2048 by default) through
``kvframe.attach``, then from ``SlotCache.memory()``:

- ``bytes``: everything the cache allocated (keys, values, positions, log-weights, validity, the
  statistics a method keeps, free capacity reserved for appends);
- ``kv_bytes``: key and value bytes of the slots held (content and padding), against
  ``budget x full KV bytes`` (the uncompressed prefill's, same run): 1.00 means the tensors shrank
  exactly as budgeted (target <= 1.02);
- ``kv_bytes / (content slots x bytes per slot)``: the KV bytes against what the content alone
  needs, bytes per slot = 2 x head_dim x dtype size (one key and one value of one head), from the
  model's config and checked against the full cache; above 1 only by padding slots (ragged
  per-head budgets, e.g. ``adakv``, store each layer padded to its longest head);
- content and padding slots (summed over layers, rows and heads);
- the prefill time with compression as a ratio to the uncompressed prefill, each compressed prefill
  right after an uncompressed one (median of ``--repeats``), and ``cache.compression_seconds``.

What a "prefill" holds per kind of card: after-prefill cards compress once per layer; chunked cards
(``asymkv``, ``kvslimmer``) compress chunk by chunk (with their scoring passes in the time); decode
trigger cards (``weightedkv``, ``cam``, ``*_decode``) compress once after the prefill, to their
capacity (and reserve ``every`` free slots). ``full`` gets one row (budget 1.0). A card that cannot
run at a budget (e.g. ``asymkv_disjoint`` at 0.5) gets a row with its error; the others go on.

Run: ``python benchmarks/cache_memory.py [--tokens 2048] [--repeats 3] [--budgets 0.5 0.25]
[--methods ...] [--threads N] [--out PATH]``. Writes ``benchmarks/results/cache_memory.{json,md}``
with the machine described. Not part of the test suite. Every card at 2k with 3 repeats: about
12-15 min on a free 2-core CPU, ~30-40 min on a loaded one (``--repeats 1``: about a third; the bytes
do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import kvframe
from kvframe import registry
from kvframe.eval.models import load_model
from kvframe.eval.tasks.passkey import make_passkey_samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import timed_prefill  # noqa: E402
from _machine import choose_threads, machine  # noqa: E402

BUDGETS = [0.5, 0.25]


def registered_cards() -> list[tuple[str, str]]:
    """Every card of the registry as ``(name, origin)``, ``full`` first."""
    cards = [(name, origin) for name, _, origin in registry.list_methods()]
    return sorted(cards, key=lambda c: (c[0] != "full", c[0]))


def slot_bytes(model) -> int:
    """Bytes of one cached slot of one KV head: a key and a value of ``head_dim`` in the model's dtype."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * head_dim * next(model.parameters()).element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length (default 2048)")
    ap.add_argument("--repeats", type=int, default=3, help="timed prefills per card and budget (the bytes do not depend on it)")
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--methods", nargs="+", default=None, help="cards (default: every card of the registry, read at run time)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own choice, or 1 if the machine is already busy)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cache_memory"),
                    help="output path without suffix (.json and .md)")
    args = ap.parse_args()
    threads = choose_threads(args.threads)
    origins = dict(registered_cards())
    methods = args.methods or list(origins)
    unknown = [m for m in methods if m not in origins]
    if unknown:
        ap.error(f"unknown cards {unknown}; registered: {sorted(origins)}")

    t_start = time.perf_counter()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    model.eval()
    text = make_passkey_samples(tok, n=1, length=args.tokens + 64, seed=0)[0].context
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    bps = slot_bytes(model)
    full_comp = kvframe.build("full")
    _, full_cache = timed_prefill(model, full_comp, ids)  # warm-up, and the full cache's bytes
    fmem = full_cache.memory()
    if fmem.kv_bytes != fmem.slots * bps:
        print(f"warning: full cache holds {fmem.kv_bytes} KV bytes for {fmem.slots} slots, not {bps} B per slot", flush=True)
    del full_cache

    rows, full_times = [], []
    for method in methods:
        for budget in ([None] if method == "full" else args.budgets):
            row: dict[str, object] = {"method": method, "origin": origins[method], "budget": budget, "tokens": int(ids.shape[1])}
            try:
                comp = kvframe.build(method, budget=budget if budget is not None else 1.0)
                times, comp_s = [], []
                for _ in range(args.repeats):
                    # an uncompressed prefill right before each measurement, so the ratio is side by side
                    full_t, _ = timed_prefill(model, full_comp, ids)
                    full_times.append(full_t)
                    t, cache = timed_prefill(model, comp, ids)
                    times.append(t / full_t)
                    comp_s.append(cache.compression_seconds)
                mem = cache.memory()
                row.update({
                    "bytes": mem.bytes, "kv_bytes": mem.kv_bytes, "full_kv_bytes": fmem.kv_bytes,
                    "reserved_bytes": mem.reserved_bytes,
                    "kv_over_budget_x_full": mem.kv_bytes / (fmem.kv_bytes * (budget or 1.0)),
                    "bytes_per_slot": bps,
                    "kv_over_content": mem.kv_bytes / (mem.content_slots * bps) if mem.content_slots else None,
                    "bytes_over_content": mem.bytes / (mem.content_slots * bps) if mem.content_slots else None,
                    "content_slots": mem.content_slots, "padding_slots": mem.padding_slots,
                    "slots_per_head_per_layer": mem.per_layer_slots,
                    "prefill_ratio_median": statistics.median(times), "prefill_ratios": times,
                    "compression_s": statistics.median(comp_s),
                })
                del cache
            except Exception as e:  # noqa: BLE001 - a card that cannot run here is a row with its error
                row["error"] = f"{type(e).__name__}: {e}"[:400]
                row["traceback_tail"] = traceback.format_exc()[-1500:]
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k not in ("slots_per_head_per_layer", "prefill_ratios", "traceback_tail")}), flush=True)

    wall = time.perf_counter() - t_start
    result = {
        "benchmark": "cache_memory", "machine": machine(), "model": "SmolLM2-135M-Instruct fp32", "wall_s": wall,
        "settings": {"tokens": int(ids.shape[1]), "repeats": args.repeats, "budgets": args.budgets, "methods": methods,
                     "threads": threads},
        "versions": {"torch": torch.__version__, "kvframe": kvframe.__version__, "python": sys.version.split()[0],
                     "transformers": __import__("transformers").__version__},
        "bytes_per_slot": bps, "full_kv_bytes": fmem.kv_bytes,
        "full_prefill_s_median": statistics.median(full_times) if full_times else None, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    fp = result["full_prefill_s_median"]
    lines = [
        f"# Cache memory and prefill overhead — SmolLM2-135M fp32, {args.tokens}-token prompt, every registered card",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), CPU; threads {threads}. "
        f"Uncompressed prefill median {'—' if fp is None else f'{fp:.2f} s'} (absolute, this machine). Full KV "
        f"{fmem.kv_bytes:,} bytes; bytes per slot {bps} (one key and one value of one head). "
        "KV / (budget × full) = KV bytes held / (budget × full KV bytes); KV / content = KV bytes / (content slots × "
        "bytes per slot), above 1 only by padding slots; bytes / content = everything allocated (positions, "
        "log-weights, statistics, reserved capacity included) / (content slots × bytes per slot). Prefill ratios are "
        f"measured side by side (each compressed prefill right after an uncompressed one), median of {args.repeats}. "
        f"Wall time {wall:.0f} s.",
        "",
        "| method | budget | cache bytes | KV bytes | KV / (budget × full KV) | KV / content | bytes / content "
        "| content slots | padding slots | prefill+compress / prefill | compression s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["budget"] if r["budget"] is not None else "-"
        if "error" in r:
            lines.append(f"| {r['method']} | {b} | error: {r['error'].splitlines()[0][:160]} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {b} | {r['bytes']:,} | {r['kv_bytes']:,} | {r['kv_over_budget_x_full']:.3f} | "
            f"{r['kv_over_content']:.3f} | {r['bytes_over_content']:.3f} | {r['content_slots']:,} | {r['padding_slots']:,} | "
            f"{r['prefill_ratio_median']:.3f} | {r['compression_s']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
