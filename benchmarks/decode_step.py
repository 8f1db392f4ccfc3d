"""Decode step of SmolLM2-135M: DynamicCache vs kvframe's full and compressed SlotCache, against the bandwidth limit.

For each context length (1k, 2k, 4k, 8k by default; SmolLM2 has 8192 positions) the prompt is
prefilled **once** at batch 1 through ``kvframe.attach`` with the ``full`` card. Compressed caches
are copies of that cache compressed to each budget (0.5, 0.25, 0.125) by ``streaming_llm``
(``--method``) through the same code path a real prefill trigger uses
(``kvframe.attention.apply_compression``): a decode step's cost depends on the number of slots, not on
which slots are kept. Batch 8 repeats the rows of these caches (``batch_repeat_interleave``).

Configurations at each context and batch, timed interleaved (one step of each in turn, ``--steps``
rounds after ``--warmup`` rounds, median per configuration):

- ``dynamic_cache``: plain transformers, **no kvframe attached** (the model's own SDPA attention and
  a ``transformers.DynamicCache``), holding the same prompt keys and values as ``full`` (copied from
  its layers; the first step's logits are compared with ``full``'s and the difference recorded).
  Each round steps it outside the ``kvframe.attach`` block the other configurations step in;
- ``full``: the uncompressed SlotCache; its layers take kvframe's vanilla fast path (transformers'
  own SDPA). ``full / DynamicCache`` is kvframe's cost on an uncompressed cache (target <= 1.0);
- ``full_masked`` (reference, not a budget): the same full cache marked as compressed, so every step
  builds kvframe's per-head position mask like a compressed cache does — separates the cost of
  kvframe's slot attention from the effect of fewer slots (skipped where the full KV cache is over
  ``--masked-max-gb``, 2 GB: at 8k x batch 8 it would add 3 GB to the memory held);
- ``budget 0.5 / 0.25 / 0.125``: the compressed copies (0.25 is always added to ``--budgets``).

Every step feeds one token (``logits_to_keep=1``); the SlotCache grows by one slot per step, written
into the slot store's free capacity in place, while DynamicCache concatenates (copies) each layer.

Reported per configuration:

- the step time (absolute, this machine) and the speed-up full / configuration (side by side);
- the **bandwidth-limit speed-up** ``(weight_bytes + kv_full_bytes) / (weight_bytes + kv_bytes)``:
  a step must at least read the weights and the KV cache once, so fewer slots can at most speed it
  up by this much. Weight bytes from the model's parameters (tied embedding counted once), KV bytes
  from ``SlotCache.memory().kv_bytes`` (DynamicCache: its key and value tensors), batch included;
- the **physical limit**: ``(weight_bytes + kv_bytes) / read bandwidth`` in ms, and measured step /
  limit (1.0 = the step runs at the machine's read bandwidth; the budget-0.25 target is <= 1.3 at
  8k, batch 8).

Memory bandwidth is measured in the same process with the same torch threads: at the start a
microbenchmark (``--bw-mb`` MB fp32 buffers, far above the last-level cache; median of
``--bw-repeats``) of a copy ``dst.copy_(src)`` (GB/s counting bytes read + bytes written) and a
read-only reduction ``src.sum()`` (bytes read); then one read sample per round, interleaved with the
steps of each context and batch. **The limit uses the read bandwidth**, the median of the samples
taken among that context and batch's steps (same load as the steps), because a decode step mostly
reads (weights, KV) and writes little.

Limits: fp32, no torch.compile; on a shared CPU absolute ms and GB/s carry the machine's load
(ratios are side by side). Compression time is not included (see ``overhead.py``); decode-time
cards that evict one slot per step add that work on top (``stream.py``).

Run: ``python benchmarks/decode_step.py [--quick] [--contexts 1024 2048 4096 8192]
[--budgets 0.5 0.25 0.125] [--batches 1 8] [--steps 15] [--bw-mb 512]``. Writes
``benchmarks/results/decode_step.{json,md}`` (``--out`` to write elsewhere). Default run about
3-5 min on a free 2-core CPU (the committed run before the DynamicCache reference took 156 s),
10-15 min on a loaded one; ~13 GB held at 8k x batch 8, DynamicCache included.
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
from transformers import DynamicCache

import kvframe
from kvframe.attach import cache_argument
from kvframe.layer_pass import apply_compression, compression_context
from kvframe.eval.models import load_model
from kvframe.eval.tasks.passkey import make_passkey_samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import choose_threads, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DYNAMIC = "dynamic_cache"


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


def dynamic_copy(model, cache) -> DynamicCache:
    """A transformers ``DynamicCache`` holding the keys and values of the (uncompressed) SlotCache."""
    dc = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        st = layer.state
        dc.update(st.keys.clone(), st.values.clone(), i)
    return dc


def repeat_rows(cache, n: int):
    """A copy of ``cache`` (SlotCache or DynamicCache) with every row repeated ``n`` times."""
    c = copy.deepcopy(cache)
    if n > 1:
        for layer in c.layers:
            layer.batch_repeat_interleave(n)
    return c


def kv_bytes(cache) -> int:
    if isinstance(cache, kvframe.SlotCache):
        return cache.memory().kv_bytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def slots_layer0(cache) -> int:
    if isinstance(cache, kvframe.SlotCache):
        return cache.memory().per_layer_slots[0]
    return int(cache.layers[0].keys.shape[-2])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_seconds(buf: torch.Tensor) -> float:
    """One read-only pass over ``buf`` (a reduction), in seconds."""
    _sync(buf.device)
    t0 = time.perf_counter()
    buf.sum()
    _sync(buf.device)
    return time.perf_counter() - t0


def bandwidth(mb: float, repeats: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """Copy and read bandwidth over ``mb`` MB fp32 buffers (median of ``repeats``, interleaved).
    Returns the results and the source buffer, kept for the per-round read samples."""
    n = int(mb * 1e6) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch both buffers once (page faults outside the timings)
    src.sum()
    copy_s, read_s = [], []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        copy_s.append(time.perf_counter() - t0)
        read_s.append(read_seconds(src))
    del dst
    nbytes = n * 4
    res = {
        "buffer_bytes": nbytes, "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device),
        "copy_gb_s": 2 * nbytes / statistics.median(copy_s) / 1e9,  # bytes read + bytes written
        "read_gb_s": nbytes / statistics.median(read_s) / 1e9,
        "copy_gb_s_best": 2 * nbytes / min(copy_s) / 1e9, "read_gb_s_best": nbytes / min(read_s) / 1e9,
        "raw_copy_s": copy_s, "raw_read_s": read_s,
    }
    return res, src


def llc_bytes() -> int | None:
    """Size of the largest CPU cache (Linux sysfs), for the record: the bandwidth buffer must dwarf it."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            txt = f.read_text().strip()
        except OSError:
            continue
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(txt[-1:], 1)
        try:
            sizes.append(int(txt.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", nargs="*", type=int, default=[1024, 2048, 4096, 8192])
    ap.add_argument("--budgets", nargs="*", type=float, default=[0.5, 0.25, 0.125],
                    help="compressed configurations (0.25 is always included)")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--steps", type=int, default=15, help="timed rounds (one step of every configuration each)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--method", default="streaming_llm", help="card that compresses the copies (cost depends on slot count only)")
    ap.add_argument("--no-masked", action="store_true", help="skip the full_masked reference configuration")
    ap.add_argument("--masked-max-gb", type=float, default=2.0,
                    help="skip full_masked where the full KV cache exceeds this (default: only 8k x batch 8, 3 GB)")
    ap.add_argument("--no-dynamic", action="store_true", help="skip the transformers DynamicCache reference (saves its memory)")
    ap.add_argument("--bw-mb", type=float, default=512, help="bandwidth buffer size in MB (fp32; far above the LLC)")
    ap.add_argument("--bw-repeats", type=int, default=9, help="repeats of the start-of-run bandwidth microbenchmark")
    ap.add_argument("--quick", action="store_true", help="contexts 512 and 1024, 5 steps (development check)")
    ap.add_argument("--out", default=str(RESULTS / "decode_step"), help="output path without suffix (.json and .md)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own choice, or 1 if the machine is already busy)")
    args = ap.parse_args()
    threads_note = choose_threads(args.threads)
    if args.quick:
        args.contexts = [512, 1024]
        args.steps = 5
        args.warmup = 1
    if not any(abs(b - 0.25) < 1e-12 for b in args.budgets):
        args.budgets = sorted([*args.budgets, 0.25], reverse=True)

    t_start = time.perf_counter()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    model.eval()
    device = next(model.parameters()).device
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    text = make_passkey_samples(tok, n=1, length=max(args.contexts) + 64, seed=0)[0].context
    all_ids = tok(text, return_tensors="pt").input_ids.to(device)
    if all_ids.shape[1] < max(args.contexts):
        raise SystemExit(f"prompt has only {all_ids.shape[1]} tokens")
    full_comp = kvframe.build("full")
    arg = cache_argument(model)

    bw, bw_buf = bandwidth(args.bw_mb, args.bw_repeats, device)
    bw["llc_bytes"] = llc_bytes()
    print(f"bandwidth: copy {bw['copy_gb_s']:.1f} GB/s, read {bw['read_gb_s']:.1f} GB/s "
          f"({bw['buffer_bytes'] / 1e6:.0f} MB buffers, {bw['threads']} threads)", flush=True)

    rows, raw, raw_read, logit_diff = [], {}, {}, {}
    with torch.no_grad():
        for ctx_len in args.contexts:
            ids = all_ids[:, :ctx_len]
            with kvframe.attach(model, full_comp) as h:
                base = h.new_cache()
                t0 = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1, **{arg: base})
                prefill_s = time.perf_counter() - t0
            next_tok = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            del out
            configs1 = {} if args.no_dynamic else {DYNAMIC: dynamic_copy(model, base)}
            configs1["full"] = base
            if not args.no_masked:
                configs1["full_masked"] = masked_copy(base)
            for b in args.budgets:
                configs1[f"budget {b}"] = compressed_copy(base, kvframe.build(args.method, budget=b))
            for batch in args.batches:
                full_kv = kv_bytes(configs1["full"]) * batch
                skip = {"full_masked"} if full_kv > args.masked_max_gb * 1e9 else set()  # bound the memory held
                caches = {name: repeat_rows(c, batch) for name, c in configs1.items() if name not in skip}
                kv = {name: kv_bytes(c) for name, c in caches.items()}
                slots = {name: slots_layer0(c) for name, c in caches.items()}
                token = next_tok.expand(batch, 1).contiguous()
                times: dict[str, list[float]] = {name: [] for name in caches}
                reads: list[float] = []
                first_logits = {}
                gc.collect()
                for rnd in range(args.warmup + args.steps):
                    # interleaved: one read-bandwidth sample and one step of each configuration per round;
                    # SlotCaches step inside kvframe.attach, the DynamicCache outside it (plain transformers)
                    read_s = read_seconds(bw_buf)
                    if rnd >= args.warmup:
                        reads.append(read_s)
                    with kvframe.attach(model, full_comp):
                        for name, c in caches.items():
                            if name == DYNAMIC:
                                continue
                            _sync(device)
                            t0 = time.perf_counter()
                            o = model(token, use_cache=True, logits_to_keep=1, **{arg: c})
                            _sync(device)
                            dt = time.perf_counter() - t0
                            if rnd >= args.warmup:
                                times[name].append(dt)
                            if rnd == 0 and name == "full":
                                first_logits[name] = o.logits.float()
                    if DYNAMIC in caches:
                        _sync(device)
                        t0 = time.perf_counter()
                        o = model(token, use_cache=True, logits_to_keep=1, past_key_values=caches[DYNAMIC])
                        _sync(device)
                        dt = time.perf_counter() - t0
                        if rnd >= args.warmup:
                            times[DYNAMIC].append(dt)
                        if rnd == 0:
                            first_logits[DYNAMIC] = o.logits.float()
                    del o
                if len(first_logits) == 2:
                    logit_diff[f"{ctx_len}/{batch}"] = float((first_logits["full"] - first_logits[DYNAMIC]).abs().max())
                med = {name: statistics.median(ts) for name, ts in times.items()}
                read_gb_s = bw["buffer_bytes"] / statistics.median(reads) / 1e9
                raw[f"{ctx_len}/{batch}"] = times
                raw_read[f"{ctx_len}/{batch}"] = reads
                for name in caches:
                    budget = float(name.split()[1]) if name.startswith("budget") else None
                    limit_ms = (weight_bytes + kv[name]) / (read_gb_s * 1e9) * 1e3
                    rows.append({
                        "context": ctx_len, "batch": batch, "config": name, "budget": budget,
                        "slots_per_head_layer0": slots[name], "kv_bytes": kv[name],
                        "step_ms": med[name] * 1e3, "speedup": med["full"] / med[name],
                        "speedup_vs_masked": (med["full_masked"] / med[name]) if "full_masked" in med else None,
                        "bandwidth_limit": (weight_bytes + kv["full"]) / (weight_bytes + kv[name]),
                        "vs_dynamic_cache": (med[name] / med[DYNAMIC]) if DYNAMIC in med else None,
                        "read_gb_s": read_gb_s, "limit_ms": limit_ms, "over_limit": med[name] * 1e3 / limit_ms,
                        "prefill_s_batch1": prefill_s,
                    })
                    r = rows[-1]
                    vs_dyn = "" if r["vs_dynamic_cache"] is None else f"  vs DynamicCache {r['vs_dynamic_cache']:.2f}"
                    print(f"ctx {ctx_len} batch {batch} {name:13s} {r['step_ms']:8.1f} ms  speed-up {r['speedup']:.2f} "
                          f"(limit {r['bandwidth_limit']:.2f})  physical limit {limit_ms:.1f} ms, measured/limit "
                          f"{r['over_limit']:.2f}{vs_dyn}", flush=True)
                del caches
            del configs1, base
            gc.collect()
            print(f"context {ctx_len} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    bw_end, _ = bandwidth(args.bw_mb, args.bw_repeats, device)
    del bw_buf
    for k in ("copy_gb_s", "read_gb_s"):
        bw[f"{k}_end"] = bw_end[k]
    wall = time.perf_counter() - t_start
    info = machine()
    info["llc_bytes"] = bw["llc_bytes"]
    result = {
        "benchmark": "decode_step", "machine": info, "wall_s": wall, "model": "SmolLM2-135M-Instruct fp32",
        "weight_bytes": weight_bytes, "bandwidth": bw,
        "settings": {"contexts": args.contexts, "budgets": args.budgets, "batches": args.batches, "steps": args.steps,
                     "warmup": args.warmup, "method": args.method, "masked_reference": not args.no_masked,
                     "dynamic_cache_reference": not args.no_dynamic, "bw_mb": args.bw_mb, "bw_repeats": args.bw_repeats,
                     "quick": args.quick, "threads": threads_note},
        "versions": {"torch": torch.__version__, "kvframe": kvframe.__version__, "python": sys.version.split()[0],
                     "transformers": __import__("transformers").__version__},
        "dynamic_vs_full_first_step_max_logit_diff": logit_diff,
        "rows": rows, "raw_step_s": raw, "raw_read_s": raw_read,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    llc = f", last-level cache {bw['llc_bytes'] / 2**20:.0f} MiB" if bw["llc_bytes"] else ""
    diff = max(logit_diff.values()) if logit_diff else None
    lines = [
        "# Decode step time — SmolLM2-135M fp32: DynamicCache vs kvframe full vs compressed SlotCache, against the physical limit",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores{llc}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"{device.type}; threads {threads_note}. Wall time {wall:.0f} s{' (--quick)' if args.quick else ''}.",
        "",
        f"Memory bandwidth on this machine, same process and threads ({bw['buffer_bytes'] / 1e6:.0f} MB fp32 buffers, "
        f"median of {args.bw_repeats}): copy {bw['copy_gb_s']:.1f} GB/s (bytes read + written), read {bw['read_gb_s']:.1f} "
        f"GB/s (`sum` over the buffer) at the start; copy {bw['copy_gb_s_end']:.1f}, read {bw['read_gb_s_end']:.1f} GB/s at "
        "the end. The physical limit of a step is (weights + KV held) bytes / **read** bandwidth, the read bandwidth "
        "being the median of one sample per round taken among that context and batch's steps ('read GB/s').",
        "",
        f"One-token step (`logits_to_keep=1`), median of {args.steps} steps per configuration, configurations interleaved "
        f"step by step. `{DYNAMIC}` = plain transformers (no kvframe attached: the model's own SDPA and a `DynamicCache` "
        "holding the same prompt keys and values; first-step logits differ from `full`'s by at most "
        f"{'—' if diff is None else f'{diff:.1e}'}). Compressed caches: `{args.method}` copies of one batch-1 prefill, rows "
        "repeated for batch > 1. speed-up = full step / this step (side by side); bandwidth limit = (weights + full KV) / "
        f"(weights + this KV) bytes, weights {weight_bytes / 1e6:.0f} MB. `full_masked` = the full cache through "
        "kvframe's masked slot attention (what a compressed cache uses); 'vs masked' = full_masked / this step. "
        "'/ DynamicCache' = this step / the DynamicCache step (side by side; for `full` the target is <= 1.0). "
        "limit ms = (weights + this KV) / read bandwidth; 'measured / limit' = step ms / limit ms. Step ms, limit ms and "
        "GB/s are absolute on this machine.",
        "",
        "| context | batch | cache | slots/head | KV MB | step ms | speed-up | bandwidth limit | vs masked | / DynamicCache "
        "| read GB/s | limit ms | measured / limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vm = "—" if r["speedup_vs_masked"] is None or not r["config"].startswith("budget") else f"{r['speedup_vs_masked']:.2f}"
        vd = "—" if r["vs_dynamic_cache"] is None or r["config"] == DYNAMIC else f"{r['vs_dynamic_cache']:.2f}"
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['config']} | {r['slots_per_head_layer0']} | {r['kv_bytes'] / 1e6:.1f} | "
            f"{r['step_ms']:.1f} | {r['speedup']:.2f} | {r['bandwidth_limit']:.2f} | {vm} | {vd} | {r['read_gb_s']:.1f} | "
            f"{r['limit_ms']:.1f} | {r['over_limit']:.2f} |"
        )
    out_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
