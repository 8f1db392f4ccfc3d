"""Per-token cost of a decode-time stream: eviction cards at a fixed capacity vs the full cache.

SmolLM2-135M (fp32, batch 1) reads a ``--prompt``-token prompt, then streams one token per step up
to stream position ``--until`` (the token ids are fixed random ids, the same for every
configuration; ``logits_to_keep=1``). Configurations, all held at once and timed interleaved (each
step runs one token of every configuration in turn, so load changes hit all of them alike):

- ``full``: the uncompressed cache (it grows with the stream);
- every card of ``--cards`` (default ``streaming_llm_decode``, ``tova_decode``, ``h2o_decode``,
  ``weightedkv``, ``cam``) at absolute budget ``--capacity`` (default 256): the cache is held at the
  capacity, one slot evicted (or merged) per step, in place (``docs/architecture.md``,
  "In-place eviction").

Reported per configuration: the mean step time over the whole stream and its ratio to the full
cache's (side by side; target <= 1.0), the same ratio over the last ``--window`` steps (where the
full cache is largest), and the per-step compression cost (``SlotCache.compression_seconds``: the
trigger firing and the in-place eviction, all layers) averaged over the first ``--window`` steps
(stream positions ``--prompt`` .. ``--prompt + --window``, i.e. near 256 by default) and the last
(near ``--until``, 2048), with their ratio last / first (target <= 1.2: at a fixed capacity the
per-step eviction cost should not grow with the stream position).

Limits: CPU only, eager (no torch.compile), 2 cores possibly shared; absolute ms carry the machine's
load, ratios are side by side. On CPU at batch 1 a step is dominated by reading the 538 MB of weights
and by per-op overhead, so a 256-slot cache saves little attention time against the full cache.

Run: ``python benchmarks/stream.py [--prompt 256] [--until 2048] [--capacity 256] [--window 64]
[--cards ...] [--threads N] [--out PATH]``. Writes ``benchmarks/results/stream.{json,md}`` (``--out``
without suffix to write elsewhere). At the defaults (1792 steps x 6 configurations) about 10-15 min on a
free 2-core CPU, up to ~40 min on a loaded one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import kvframe
from kvframe.attach import cache_argument
from kvframe.eval.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import choose_threads, machine  # noqa: E402

CARDS = ["streaming_llm_decode", "tova_decode", "h2o_decode", "weightedkv", "cam"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens before the stream (default 256)")
    ap.add_argument("--until", type=int, default=2048, help="stream position of the last token (default 2048)")
    ap.add_argument("--capacity", type=int, default=256, help="absolute budget of every card (default 256)")
    ap.add_argument("--window", type=int, default=64, help="steps averaged at the start and at the end (default 64)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes, each its own interleaved run (default 1)")
    ap.add_argument("--cards", nargs="+", default=CARDS, help=f"decode-time cards (default: {' '.join(CARDS)})")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own choice, or 1 if the machine is already busy)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "stream"),
                    help="output path without suffix (.json and .md)")
    args = ap.parse_args(argv)
    if args.until <= args.prompt + 2 * args.window:
        ap.error(f"--until {args.until} must exceed --prompt + 2 * --window = {args.prompt + 2 * args.window}")
    threads = choose_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model, _ = load_model("smollm2-135m", dtype="float32")
    model.eval()
    arg = cache_argument(model)
    names = ["full", *args.cards]
    w = args.window
    rows = []
    raw_step: dict[str, list[float]] = {}
    raw_compress: dict[str, list[float]] = {}
    for batch in args.batches:
        ids = torch.randint(10, 1000, (batch, args.until))
        runs = {}
        with torch.no_grad(), kvframe.attach(model, kvframe.build("full")):
            # an explicit SlotCache runs with its own compressor inside any attach block
            for name in names:
                comp = kvframe.build(name) if name == "full" else kvframe.build(name, budget=args.capacity)
                cache = kvframe.SlotCache.for_model(model, comp)
                model(ids[:, : args.prompt], use_cache=True, logits_to_keep=1, **{arg: cache})
                runs[name] = {"cache": cache, "step_s": [], "compress_s": []}
            for i in range(args.prompt, args.until):
                tok = ids[:, i : i + 1]
                for name in names:
                    r = runs[name]
                    before = r["cache"].compression_seconds
                    t0 = time.perf_counter()
                    model(tok, use_cache=True, logits_to_keep=1, **{arg: r["cache"]})
                    r["step_s"].append(time.perf_counter() - t0)
                    r["compress_s"].append(r["cache"].compression_seconds - before)
        full_mean = statistics.mean(runs["full"]["step_s"])
        full_last = statistics.mean(runs["full"]["step_s"][-w:])
        for name in names:
            r = runs[name]
            mem = r["cache"].memory()
            early = statistics.mean(r["compress_s"][:w]) * 1e3
            late = statistics.mean(r["compress_s"][-w:]) * 1e3
            mean = statistics.mean(r["step_s"])
            last = statistics.mean(r["step_s"][-w:])
            rows.append({
                "config": name,
                "batch": batch,
                "slots_per_head": int(r["cache"].layers[0].content_slots().max()),
                "kv_mb": round(mem.kv_bytes / 1e6, 2),
                "step_ms": round(mean * 1e3, 2),
                "vs_full": round(mean / full_mean, 3),
                "step_ms_last": round(last * 1e3, 2),
                "vs_full_last": round(last / full_last, 3),
                "compress_ms_first": round(early, 3),
                "compress_ms_last": round(late, 3),
                "compress_growth": round(late / early, 3) if early > 0 else None,
            })
            raw_step[f"{name}@{batch}"] = r["step_s"]
            raw_compress[f"{name}@{batch}"] = r["compress_s"]
        del runs
    out = {"benchmark": "stream", "machine": machine(), "threads": threads, "model": "SmolLM2-135M-Instruct fp32",
           "prompt": args.prompt, "until": args.until, "capacity": args.capacity, "window": w,
           "first_window_positions": [args.prompt, args.prompt + w - 1], "last_window_positions": [args.until - w, args.until - 1],
           "wall_s": round(time.perf_counter() - t_start, 1),
           "versions": {"torch": torch.__version__, "kvframe": kvframe.__version__, "python": sys.version.split()[0],
                        "transformers": __import__("transformers").__version__},
           "batches": args.batches,
           "rows": rows,
           "raw_step_s": raw_step,
           "raw_compress_s": raw_compress}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    m = out["machine"]
    lines = [
        "# Decode-time stream — SmolLM2-135M fp32, per-token cost at a fixed capacity vs the full cache",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), CPU; threads {threads}. "
        f"Prompt {args.prompt} tokens, then one token per step to stream position {args.until} "
        f"({args.until - args.prompt} steps), batch {', '.join(map(str, args.batches))} (each its own run), eager. Cards at absolute budget {args.capacity}, evicting in place. "
        f"All configurations held at once and timed interleaved step by step. vs full = mean step / full's mean step "
        f"over the whole stream (side by side), and over the last {w} steps (positions {args.until - w}-{args.until - 1}, "
        f"where the full cache is largest). compress ms = trigger firing + in-place eviction per step (all layers), mean "
        f"of the first {w} steps (positions {args.prompt}-{args.prompt + w - 1}) and of the last {w}; last / first is their "
        f"ratio. Step and compress ms are absolute on this machine. Wall time {out['wall_s']} s.",
        "",
        "| config | batch | slots/head at the end | KV MB | step ms | vs full | step ms, last | vs full, last | compress ms, first "
        "| compress ms, last | last / first |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        growth = "—" if r["compress_growth"] is None else f"{r['compress_growth']:.2f}"
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['slots_per_head']} | {r['kv_mb']:.1f} | {r['step_ms']:.1f} | {r['vs_full']:.2f} | "
            f"{r['step_ms_last']:.1f} | {r['vs_full_last']:.2f} | {r['compress_ms_first']:.2f} | {r['compress_ms_last']:.2f} "
            f"| {growth} |"
        )
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
