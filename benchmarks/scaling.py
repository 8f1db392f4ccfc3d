"""How each method's compression cost grows with the number of tokens T (one layer, synthetic inputs).

For T = 512, 1024, ..., 8192 (doubling) and every registry card except ``full``, times one
``kvframe.compress`` call on synthetic inputs shaped like one SmolLM2-135M layer (batch 1, 3 KV
heads, 9 query heads, head dim 64, fp32; :func:`_synthetic.synthetic_inputs`: the queries of all T
prompt tokens for cards that read attention, and the statistics each card reads), and fits
``time ~ c * T^alpha`` by least squares on log-log, over all T and over T >= 2048 (where fixed
per-call overhead matters less). Calls are interleaved (each repeat runs every card once at a given
T), each figure is the median of ``--repeats`` samples after one warm-up call, a sample being the
mean time of back-to-back calls lasting at least ``--min-sample-s`` (at most 50 calls), so that
millisecond calls are not decided by one scheduler tick.

Two modes:

- ``oneshot``: compress T slots to ``--budget`` (default 0.5) in one call, what every card does after
  a one-shot prefill (decode-trigger cards with ``prefill: true`` do exactly this after the prompt;
  chunked cards do it with T = budget + chunk at every chunk). ``asymkv_disjoint`` cannot halve in one
  call (greedy disjoint pairs run out), so it is timed at 0.75, recorded in ``budget_used``.
- ``evict_one`` (decode-trigger cards only): T + 1 slots down to a capacity of T, the cost paid per
  generated token once the cache is full.

Limits: synthetic random inputs (data-dependent selectors such as adjacent-pair overlaps and the
balanced walk may behave differently on real attention), one layer on CPU (multiply by 30 layers for
the model, roughly), no rotary service (the pre-RoPE key merges of AsymKV/KVSlimmer skip the
un-rotate/re-rotate they do inside a model), and the scoring passes of chunked cards (AsymKV's
backward, KVSlimmer's forward) are not part of ``kvframe.compress`` — see ``overhead.py`` for those.
Absolute times are for the machine named in the output; alpha is machine-independent only roughly.

Run: ``python benchmarks/scaling.py [--quick] [--tokens 512 1024 ...] [--methods ...]``. Writes
``benchmarks/results/scaling.{json,md}``. Default run about 1-2 min (66 s measured on a busy 2-core Xeon).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import kvframe
from kvframe.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import builtin_cards  # noqa: E402
from _machine import choose_threads, machine  # noqa: E402
from _synthetic import synthetic_inputs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYER = {"layer_idx": 15, "num_layers": 30}  # a middle layer of SmolLM2 (only pyramidkv's budget depends on it)


def fit_alpha(ts: list[int], times: list[float]) -> float | None:
    """Least-squares slope of log(time) on log(T)."""
    pts = [(math.log(t), math.log(s)) for t, s in zip(ts, times) if s and s > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def build_case(name: str, mode: str, t: int, budget: float, seed: int):
    """``(compressor, kwargs, budget_used)`` for one card, mode and size, or None if not applicable."""
    if mode == "evict_one":
        comp = kvframe.build(name)
        if comp.trigger.name != "decode":
            return None
        comp = kvframe.build(name, budget=t)  # capacity T slots
        return comp, {**synthetic_inputs(comp, t + 1, seed=seed, n_queries=1), **LAYER}, t  # one decode query
    for b in ((budget, 0.75) if name == "asymkv_disjoint" else (budget,)):
        comp = kvframe.build(name, budget=b)
        kw = {**synthetic_inputs(comp, t, seed=seed), **LAYER}
        try:
            kvframe.compress(comp, **kw)  # warm-up call, also checks the budget is feasible
        except ConfigError:
            continue
        return comp, kw, b
    raise RuntimeError(f"{name}: no feasible budget")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", nargs="*", type=int, default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--methods", nargs="*", default=None, help="registry cards (default: all but full)")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-sample-s", type=float, default=0.05, help="back-to-back calls per sample until this long (max 50)")
    ap.add_argument("--modes", nargs="*", default=["oneshot", "evict_one"], choices=["oneshot", "evict_one"])
    ap.add_argument("--quick", action="store_true", help="T up to 2048, 3 repeats (development check)")
    ap.add_argument("--out", default=str(RESULTS / "scaling"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own choice, or 1 if the machine is already busy)")
    args = ap.parse_args()
    threads_note = choose_threads(args.threads)
    if args.quick:
        args.tokens = [t for t in args.tokens if t <= 2048] or [512, 1024, 2048]
        args.repeats = min(args.repeats, 3)
    methods = args.methods or builtin_cards()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    raw: dict[str, dict[str, dict[str, list[float]]]] = {m: {mode: {} for mode in args.modes} for m in methods}
    budget_used: dict[str, dict[str, dict[str, float]]] = {m: {mode: {} for mode in args.modes} for m in methods}
    calls: dict[str, dict[str, dict[str, int]]] = {m: {mode: {} for mode in args.modes} for m in methods}
    for t in args.tokens:
        cases = {}
        for mode in args.modes:
            for name in methods:
                c = build_case(name, mode, t, args.budget, seed=t)
                if c is not None:
                    if mode == "evict_one":
                        kvframe.compress(c[0], **c[1])  # warm-up
                    cases[(name, mode)] = c
                    budget_used[name][mode][str(t)] = c[2]
        # calls per sample: enough back-to-back calls for >= --min-sample-s (timeit-style), so that
        # millisecond calls are not at the mercy of one scheduler tick; time per call = elapsed / calls
        inner = {}
        for key, (comp, kw, _) in cases.items():
            t0 = time.perf_counter()
            kvframe.compress(comp, **kw)
            one = time.perf_counter() - t0
            inner[key] = max(1, min(50, math.ceil(args.min_sample_s / max(one, 1e-6))))
        for _ in range(args.repeats):
            for (name, mode), (comp, kw, _) in cases.items():  # interleaved: every card once per repeat
                n = inner[(name, mode)]
                t0 = time.perf_counter()
                for _ in range(n):
                    kvframe.compress(comp, **kw)
                raw[name][mode].setdefault(str(t), []).append((time.perf_counter() - t0) / n)
                calls[name][mode][str(t)] = n
        print(f"T={t} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    rows = []
    for name in methods:
        for mode in args.modes:
            r = raw[name][mode]
            if not r:
                continue
            ts = [t for t in args.tokens if str(t) in r]
            med = [statistics.median(r[str(t)]) for t in ts]
            hi = [(t, m) for t, m in zip(ts, med) if t >= 2048]
            rows.append({
                "method": name, "mode": mode, "tokens": ts, "median_s": med,
                "alpha": fit_alpha(ts, med),
                "alpha_T_ge_2048": fit_alpha([t for t, _ in hi], [m for _, m in hi]) if len(hi) >= 2 else None,
                "budget_used": [budget_used[name][mode][str(t)] for t in ts],
                "calls_per_sample": [calls[name][mode][str(t)] for t in ts],
                "min_s": [min(r[str(t)]) for t in ts],
            })
    wall = time.perf_counter() - t_start
    info = machine()
    result = {
        "benchmark": "scaling", "machine": info, "wall_s": wall,
        "settings": {"tokens": args.tokens, "budget": args.budget, "repeats": args.repeats, "modes": args.modes,
                     "batch": 1, "kv_heads": 3, "q_heads": 9, "head_dim": 64, "dtype": "float32", **LAYER,
                     "quick": args.quick, "threads": threads_note},
        "versions": {"torch": torch.__version__, "kvframe": getattr(kvframe, "__version__", None), "python": sys.version.split()[0]},
        "rows": rows, "raw_s": raw,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    def fmt_t(s: float) -> str:
        return f"{s * 1e3:.2f}" if s < 0.1 else f"{s * 1e3:.0f}"

    def fmt_a(a: float | None) -> str:
        return "—" if a is None else f"{a:.2f}"

    lines = [
        "# Compression cost vs tokens T — one SmolLM2-sized layer, synthetic inputs",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), CPU, fp32. "
        f"One `kvframe.compress` call on B=1, 3 KV heads, 9 query heads, D=64; median of {args.repeats} interleaved samples "
        f"after a warm-up, each sample the mean of back-to-back calls lasting >= {args.min_sample_s * 1e3:.0f} ms (at most 50); times in ms (absolute, this machine). alpha: least-squares slope of log time on log T "
        f"(all T, and T >= 2048). Wall time {wall:.0f} s{' (--quick)' if args.quick else ''}; threads {threads_note}.",
        "",
    ]
    for mode in args.modes:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        if mode == "oneshot":
            lines += [f"## One-shot: T slots to budget {args.budget} (asymkv_disjoint at 0.75)", ""]
        else:
            lines += ["## Decode-trigger cards: one eviction/merge per token (T + 1 slots to capacity T)", ""]
        lines += ["| method | " + " | ".join(f"T={t}" for t in args.tokens) + " | alpha | alpha (T≥2048) |",
                  "|---|" + "---|" * (len(args.tokens) + 2)]
        for r in mrows:
            cells = dict(zip(r["tokens"], r["median_s"]))
            lines.append(f"| {r['method']} | " + " | ".join(fmt_t(cells[t]) if t in cells else "—" for t in args.tokens)
                         + f" | {fmt_a(r['alpha'])} | {fmt_a(r['alpha_T_ge_2048'])} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
