"""Compression overhead on SmolLM2-135M: (prefill + compression) / prefill at 1k, 2k and 4k tokens.

For every registry card except ``full`` (and ``streaming_llm_reindex``, which differs from
``streaming_llm`` only by a re-rotation of the kept keys; add it with ``--methods``), at budget 0.5
(``--budgets``), one prompt of T tokens (a passkey context) is prefilled through ``kvframe.attach``
with ``logits_to_keep=1``, and the same prompt is prefilled without compression (card ``full``) in
the same run, interleaved: plain, method, plain, method, ..., each method ratio taken against the
mean of the plain prefills just before and after it (at 2k and 4k a plain prefill is measured only
every 2nd / 3rd method, ``--plain-every``, to fit the time budget). Figures are medians over ``--repeats`` rounds.

Reported per method and length:

- ``prefill_s``: wall time of the prefill with compression (median), and the plain prefill beside it;
- ``ratio``: (prefill + compression) / plain prefill, measured side by side (per-round ratio, median);
- ``compress_share``: ``cache.compression_seconds`` (time inside ``Compressor.compress``) over the
  compressed prefill's wall time;
- ``peak_extra_mb``: peak memory in use above the level before the prefill
  (:class:`kvframe.eval.generation.PeakMemory`: glibc heap in use sampled every 5 ms on CPU), for the
  method and for the plain prefill, and their ratio;
- a "KVSlimmer vs AsymKV" block: time and peak-memory ratios of the two at each length (the KVSlimmer
  paper claims -28 % latency and -29 % memory against AsymKV, i.e. ratios 0.72 and 0.71).

What the prefill includes, per kind of card:

- ``after_prefill`` cards: the one-shot prefill, then one compression per layer.
- chunked cards (``asymkv``, ``asymkv_disjoint``, ``kvslimmer``: ``per_chunk`` with a scoring pass):
  the prompt is fed in chunks of 512; every chunk after the first runs a scoring pass (AsymKV: forward
  + backward of the chunk's LM loss for the key gradients; KVSlimmer: forward only), then the past is
  compressed, then the real pass. All of it is in their prefill time, so their ratio is mostly the
  scoring passes, not the compressor (see ``compress_share``). With a ratio budget the cache is kept
  at 0.5 of the tokens seen so far, chunk by chunk.
- decode-trigger cards (``weightedkv``, ``cam``, ``h2o_decode``, ``tova_decode``,
  ``streaming_llm_decode``; ``decode`` trigger with ``prefill: true``) compress **once** after the
  prefill here, to the capacity (0.5 of the prompt); their per-token work while generating is not in
  this figure (see ``scaling.py --modes evict_one``). Cards that read accumulated attention
  (``attn``/``age``: h2o_decode, weightedkv, cam) also pay, during the prefill, for the attention
  statistics computed from every prompt query — part of their ratio.

Limits: CPU only, fp32, batch 1, one prompt, 2 cores possibly shared with other work (interleaving
keeps ratios side by side, but absolute times carry the machine's load); peak memory is heap in use
(not resident memory) and includes the transient scoring passes.

Run: ``python benchmarks/overhead.py [--quick] [--tokens 1024 2048 4096] [--budgets 0.5]
[--methods ...] [--repeats 3 2 1] [--plain-every 1 2 3] [--threads N]``. Writes
``benchmarks/results/overhead.{json,md}``. Default run about 13-15 min on a free 2-core Xeon
(estimated from 2.7 s / 15 s plain prefills at 2k / 4k; the 4k part is ~60 % of it; several times
longer on a machine busy with other work).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import kvframe
from kvframe.attach import cache_argument
from kvframe.eval.generation import PeakMemory
from kvframe.eval.models import load_model
from kvframe.eval.tasks.passkey import make_passkey_samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import builtin_cards  # noqa: E402
from _machine import choose_threads, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SKIP_DEFAULT = {"full", "streaming_llm_reindex"}
CPU = torch.device("cpu")


def default_methods() -> list[str]:
    names = builtin_cards(exclude=tuple(SKIP_DEFAULT))
    # asymkv and kvslimmer next to each other, so their comparison is side by side
    if "asymkv" in names and "kvslimmer" in names:
        names.remove("kvslimmer")
        names.insert(names.index("asymkv") + 1, "kvslimmer")
    return names


def prefill(model, comp, ids) -> dict[str, float]:
    gc.collect()
    with torch.no_grad(), kvframe.attach(model, comp) as h:
        cache = h.new_cache()
        with PeakMemory(CPU) as peak:
            t0 = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
            dt = time.perf_counter() - t0
    mem = cache.memory()
    out = {"s": dt, "compress_s": cache.compression_seconds, "peak_extra_bytes": peak.peak_bytes,
           "cache_bytes": mem.bytes, "content_slots": mem.content_slots}
    del cache
    return out


def per_length(values: list[int] | None, lengths: list[int], default: dict[int, int], what: str) -> dict[int, int]:
    if values is None:
        return {t: default.get(t, 1) for t in lengths}
    if len(values) == 1:
        return {t: values[0] for t in lengths}
    if len(values) != len(lengths):
        raise SystemExit(f"--{what}: give one value or one per length ({len(lengths)})")
    return dict(zip(lengths, values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", nargs="*", type=int, default=[1024, 2048, 4096])
    ap.add_argument("--budgets", nargs="*", type=float, default=[0.5])
    ap.add_argument("--methods", nargs="*", default=None, help="registry cards (default: all but full, streaming_llm_reindex)")
    ap.add_argument("--repeats", nargs="*", type=int, default=None, help="rounds per length (default 3 at 1k, 2 at 2k, 1 at 4k+)")
    ap.add_argument("--plain-every", nargs="*", type=int, default=None,
                    help="plain prefill every N methods, per length (default 1 at 1k, 2 at 2k, 3 at 4k+)")
    ap.add_argument("--quick", action="store_true", help="768 and 1024 tokens, one round (development check; 768 = two chunks for the chunked cards)")
    ap.add_argument("--out", default=str(RESULTS / "overhead"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own choice, or 1 if the machine is already busy)")
    args = ap.parse_args()
    threads_note = choose_threads(args.threads)
    if args.quick:
        args.tokens = [768, 1024]
        args.repeats = [1]
    lengths = args.tokens
    repeats = per_length(args.repeats, lengths, {t: (3 if t <= 1024 else 2 if t <= 2048 else 1) for t in lengths}, "repeats")
    every = per_length(args.plain_every, lengths, {t: (1 if t <= 1024 else 2 if t <= 2048 else 3) for t in lengths}, "plain-every")
    methods = args.methods or default_methods()

    t_start = time.perf_counter()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    model.eval()
    text = make_passkey_samples(tok, n=1, length=max(lengths) + 64, seed=0)[0].context
    all_ids = tok(text, return_tensors="pt").input_ids
    if all_ids.shape[1] < max(lengths):
        raise SystemExit(f"prompt has only {all_ids.shape[1]} tokens")
    full = kvframe.build("full")

    # warm-up of every card once on a short prompt (one-time costs: imports, first-call allocations;
    # 640 tokens so chunked cards run one scoring pass too); not recorded
    warm_ids = all_ids[:, :640]
    prefill(model, full, warm_ids)
    for m in methods:
        for b in args.budgets:
            try:
                prefill(model, kvframe.build(m, budget=b), warm_ids)
            except Exception:  # noqa: BLE001 - the timed run records the error
                pass
    print(f"warm-up done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    runs: list[dict[str, object]] = []  # every prefill, in order
    for t in lengths:
        ids = all_ids[:, :t]
        prefill(model, full, ids)  # warm-up at this length (not recorded)
        for rnd in range(repeats[t]):
            order = [(m, b) for m in methods for b in args.budgets]
            if rnd % 2:
                order.reverse()  # alternate the order between rounds
            plain_idx = [len(runs)]
            runs.append({"kind": "plain", "tokens": t, "round": rnd, **prefill(model, full, ids)})
            for i, (m, b) in enumerate(order):
                comp = kvframe.build(m, budget=b)
                try:
                    r = prefill(model, comp, ids)
                except Exception as e:  # noqa: BLE001 - record and go on
                    r = {"error": f"{type(e).__name__}: {e}"[:300]}
                runs.append({"kind": "method", "method": m, "budget": b, "tokens": t, "round": rnd,
                             "plain_before": plain_idx[-1], **r})
                print(json.dumps({k: runs[-1][k] for k in ("method", "budget", "tokens", "round")} |
                                 {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}), flush=True)
                if (i + 1) % every[t] == 0 or i + 1 == len(order):
                    plain_idx.append(len(runs))
                    runs.append({"kind": "plain", "tokens": t, "round": rnd, **prefill(model, full, ids)})
                    for j in range(len(runs) - 2, -1, -1):  # methods since the previous plain get it as "after"
                        if runs[j]["kind"] == "plain":
                            break
                        runs[j]["plain_after"] = plain_idx[-1]
            print(f"T={t} round {rnd} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # ---- aggregate
    rows = []
    for t in lengths:
        for m in methods:
            for b in args.budgets:
                mr = [r for r in runs if r["kind"] == "method" and r["method"] == m and r["budget"] == b and r["tokens"] == t]
                ok = [r for r in mr if "error" not in r]
                if not ok:
                    rows.append({"method": m, "budget": b, "tokens": t, "error": mr[0].get("error") if mr else "not run"})
                    continue
                ratios, mem_ratios, plains, plain_peaks = [], [], [], []
                for r in ok:
                    pb, pa = runs[r["plain_before"]], runs[r["plain_after"]]
                    p = (pb["s"] + pa["s"]) / 2
                    pm = (pb["peak_extra_bytes"] + pa["peak_extra_bytes"]) / 2
                    plains.append(p)
                    plain_peaks.append(pm)
                    ratios.append(r["s"] / p)
                    mem_ratios.append(r["peak_extra_bytes"] / pm if pm > 0 else float("nan"))
                rows.append({
                    "method": m, "budget": b, "tokens": t, "n": len(ok),
                    "prefill_s": statistics.median(r["s"] for r in ok),
                    "plain_prefill_s": statistics.median(plains),
                    "ratio": statistics.median(ratios),
                    "compress_s": statistics.median(r["compress_s"] for r in ok),
                    "compress_share": statistics.median(r["compress_s"] / r["s"] for r in ok),
                    "peak_extra_mb": statistics.median(r["peak_extra_bytes"] for r in ok) / 2**20,
                    "plain_peak_extra_mb": statistics.median(plain_peaks) / 2**20,
                    "peak_ratio": statistics.median(mem_ratios),
                    "cache_bytes": ok[-1]["cache_bytes"], "content_slots": ok[-1]["content_slots"],
                })
    pairs = []
    for t in lengths:
        for b in args.budgets:
            a = next((r for r in rows if r["method"] == "asymkv" and r["tokens"] == t and r["budget"] == b and "ratio" in r), None)
            k = next((r for r in rows if r["method"] == "kvslimmer" and r["tokens"] == t and r["budget"] == b and "ratio" in r), None)
            if a and k:
                # per round, the two ran one after the other: ratio of their times and peaks in the same round
                ar = [r for r in runs if r.get("method") == "asymkv" and r["tokens"] == t and r.get("budget") == b and "s" in r]
                kr = [r for r in runs if r.get("method") == "kvslimmer" and r["tokens"] == t and r.get("budget") == b and "s" in r]
                pairs.append({
                    "tokens": t, "budget": b,
                    "asymkv_s": a["prefill_s"], "kvslimmer_s": k["prefill_s"],
                    "time_ratio": statistics.median(x["s"] / y["s"] for x, y in zip(kr, ar)),
                    "asymkv_peak_mb": a["peak_extra_mb"], "kvslimmer_peak_mb": k["peak_extra_mb"],
                    "peak_ratio": statistics.median(x["peak_extra_bytes"] / y["peak_extra_bytes"] for x, y in zip(kr, ar)),
                    "asymkv_compress_s": a["compress_s"], "kvslimmer_compress_s": k["compress_s"],
                })
    wall = time.perf_counter() - t_start
    info = machine()
    result = {
        "benchmark": "overhead", "machine": info, "wall_s": wall,
        "model": "SmolLM2-135M-Instruct fp32", "prompt": "passkey context (make_passkey_samples seed 0), first T tokens",
        "settings": {"tokens": lengths, "budgets": args.budgets, "methods": methods, "repeats": repeats,
                     "plain_every": every, "logits_to_keep": 1, "quick": args.quick, "threads": threads_note},
        "versions": {"torch": torch.__version__, "kvframe": kvframe.__version__, "python": sys.version.split()[0],
                     "transformers": __import__("transformers").__version__},
        "rows": rows, "kvslimmer_vs_asymkv": pairs, "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [
        f"# Compression overhead — SmolLM2-135M fp32, prefill of {', '.join(map(str, lengths))} tokens",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), CPU. "
        f"Ratio = (prefill + compression) / plain prefill, each method run between two plain prefills of the same "
        f"prompt in the same run; median over rounds ({', '.join(f'{t}: {repeats[t]}' for t in lengths)}). Times in s "
        f"are absolute on this machine. compress share = `cache.compression_seconds` / prefill with compression. "
        f"Peak = heap in use above the level before the prefill (PeakMemory). Chunked cards (asymkv*, kvslimmer) include "
        f"their scoring passes; decode-trigger cards (weightedkv, cam, *_decode) compress once after the prefill here. "
        f"Wall time {wall:.0f} s{' (--quick)' if args.quick else ''}; threads {threads_note}.",
        "",
        "| method | budget | T | prefill+compress s | plain prefill s | ratio | compress share | peak extra MB | plain peak MB | peak ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["method"], r["budget"], r["tokens"])):
        if "error" in r:
            lines.append(f"| {r['method']} | {r['budget']} | {r['tokens']} | error: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['tokens']} | {r['prefill_s']:.2f} | {r['plain_prefill_s']:.2f} | "
            f"{r['ratio']:.2f} | {r['compress_share']:.1%} | {r['peak_extra_mb']:.0f} | {r['plain_peak_extra_mb']:.0f} | {r['peak_ratio']:.2f} |"
        )
    if pairs:
        lines += [
            "",
            "## KVSlimmer vs AsymKV",
            "",
            "Both run one after the other in each round (same chunking, 512; AsymKV's scoring pass has a backward, "
            "KVSlimmer's is forward-only). Ratios are KVSlimmer / AsymKV; the KVSlimmer paper claims -28 % latency "
            "and -29 % memory (0.72 and 0.71).",
            "",
            "| T | budget | asymkv s | kvslimmer s | time ratio | asymkv peak MB | kvslimmer peak MB | peak ratio | compressor s (asymkv / kvslimmer) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in pairs:
            lines.append(
                f"| {p['tokens']} | {p['budget']} | {p['asymkv_s']:.2f} | {p['kvslimmer_s']:.2f} | {p['time_ratio']:.2f} | "
                f"{p['asymkv_peak_mb']:.0f} | {p['kvslimmer_peak_mb']:.0f} | {p['peak_ratio']:.2f} | "
                f"{p['asymkv_compress_s']:.2f} / {p['kvslimmer_compress_s']:.2f} |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
