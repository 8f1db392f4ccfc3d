"""kvframe versus NVIDIA kvpress on the presses both have: prefill time and kept-token agreement.

Same input ids on both sides (a ``--tokens``-token passkey context, SmolLM2-135M fp32 on CPU),
query-agnostic (the context alone is compressed), one prefill with ``logits_to_keep=1``:

- presses: SnapKV, KNorm, StreamingLLM, TOVA and observed attention (kvpress
  ``ObservedAttentionPress``, eager attention), mapped to kvframe's cards ``snapkv``, ``knorm``,
  ``streaming_llm``, ``tova`` and ``h2o`` with aligned hyper-parameters;
- budgets (kept fractions, kvframe's convention) 0.5 and 0.25, i.e. kvpress
  ``compression_ratio = 1 - budget``; kvpress keeps ``int(n * (1 - compression_ratio))`` tokens, so
  kvframe is given that count as an absolute budget;
- timings: for each (press, budget) and repeat, kvpress without then with the press, then kvframe
  with ``full`` then with the card (median of ``--repeats``): overhead ratios with/without on each
  side and the cross ratio kvframe / kvpress;
- agreement: per layer and KV head, ``|kept_kvframe & kept_kvpress| / |kept_kvpress|``.

kvpress 0.5.5 needs ``transformers<5.3``, so its half (``benchmarks/_kvpress_side.py``) runs in
``benchmarks/.venv-kvpress`` (created here if missing) as a subprocess that answers requests over a
pipe; the kvframe half runs in this process. The two never compute at the same time.

Run: ``.venv/bin/python benchmarks/kvpress_compare.py [--tokens 2048] [--repeats 3] [--quick]``.
Writes ``benchmarks/results/kvpress_compare.json`` and ``.md``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import kvframe  # noqa: E402
from kvframe.eval.models import load_model, smollm2_cache_path  # noqa: E402
from kvframe.eval.tasks.passkey import make_passkey_samples  # noqa: E402

from _common import timed_prefill  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _machine import machine  # noqa: E402

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-kvpress"
WORK = HERE / ".work"
SIDE = HERE / "_kvpress_side.py"
KVPRESS_PINS = ["torch==2.13.0", "kvpress==0.5.5"]  # an unpinned torch pulls a multi-GB CUDA build

SNAPKV_WINDOW, SNAPKV_KERNEL, N_SINK = 64, 5, 4
# kvpress press -> (kvframe card, kvframe overrides, kvpress press kwargs)
PRESSES: dict[str, tuple[str, dict, dict]] = {
    "snapkv": ("snapkv", {"scorer.window": SNAPKV_WINDOW, "scorer.kernel": SNAPKV_KERNEL, "scorer.pool": "avg"},
               {"window_size": SNAPKV_WINDOW, "kernel_size": SNAPKV_KERNEL}),
    "knorm": ("knorm", {}, {}),
    "streaming_llm": ("streaming_llm", {"scorer.n_sink": N_SINK}, {"n_sink": N_SINK}),
    "tova": ("tova", {}, {}),
    "observed_attention": ("h2o", {"scorer.normalize": True}, {}),
}
KVPRESS_CLASS = {
    "snapkv": "SnapKVPress", "knorm": "KnormPress", "streaming_llm": "StreamingLLMPress",
    "tova": "TOVAPress", "observed_attention": "ObservedAttentionPress",
}
BUDGETS = [0.5, 0.25]


# -- the kvpress virtualenv and subprocess ---------------------------------------------------
def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import kvpress"], capture_output=True).returncode == 0:
        return py
    print(f"creating {VENV} ({' '.join(KVPRESS_PINS)}; about 2 minutes) ...", flush=True)
    base = shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *KVPRESS_PINS], check=True)
    return py


class KVPressSide:
    """The subprocess in kvpress's venv; one JSON request and one JSON answer per line."""

    def __init__(self, py: Path, model_dir: Path, ids_file: Path, out_file: Path, log_file: Path) -> None:
        self.log_file = log_file
        self._log = log_file.open("w")
        self.proc = subprocess.Popen(
            [str(py), str(SIDE), "--model", str(model_dir), "--ids", str(ids_file), "--out", str(out_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
        )

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"kvpress side died; its log ({self.log_file}):\n" + self.log_file.read_text()[-4000:])
        ans = json.loads(line)
        if not ans.pop("ok"):
            raise RuntimeError(f"kvpress side failed on {req}: {ans['error']} (log: {self.log_file})")
        return ans

    def close(self) -> None:
        try:
            self.ask(op="quit")
        finally:
            self.proc.wait(timeout=60)
            self._log.close()


# -- the kvframe side ----------------------------------------------------------------------------
def kvframe_kept(cache) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Per layer and KV head, the kept token positions (valid slots) and their counts (batch row 0)."""
    kept, counts = [], []
    for st in cache.slot_states():
        pos, valid = st.positions[0], st.valid[0]
        heads = [sorted(pos[h][valid[h]].tolist()) for h in range(pos.shape[0])]
        kept.append(heads)
        counts.append([len(x) for x in heads])
    return kept, counts


def agreement(ours: list[list[list[int]]], theirs: list[list[list[int]]], max_diffs: int = 40) -> dict:
    """Overlap of kept sets per layer and head; ``differences`` lists the first ``max_diffs`` heads that differ."""
    fr, per_layer, exact, equal_counts, diffs = [], [], 0, True, []
    for li, (lo, lt) in enumerate(zip(ours, theirs, strict=True)):
        row = []
        for hi, (ho, ht) in enumerate(zip(lo, lt, strict=True)):
            row.append(len(set(ho) & set(ht)) / max(len(ht), 1))
            exact += set(ho) == set(ht)
            equal_counts &= len(ho) == len(ht)
            if set(ho) != set(ht) and len(diffs) < max_diffs:
                diffs.append({"layer": li, "head": hi, "only_kvframe": sorted(set(ho) - set(ht)),
                              "only_kvpress": sorted(set(ht) - set(ho))})
        fr.extend(row)
        per_layer.append(statistics.fmean(row))
    return {"mean": statistics.fmean(fr), "min": min(fr), "heads_identical": exact, "heads": len(fr),
            "counts_equal": equal_counts, "per_layer_mean": per_layer, "differences": diffs}


# -- main -------------------------------------------------------------------------------------------
def model_directory(model, tok) -> Path:
    """A saved transformers checkpoint kvpress's transformers can ``from_pretrained``."""
    d = smollm2_cache_path()
    if (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file():
        return d
    d = WORK / "smollm2"
    if not (d / "config.json").is_file():
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d)
        tok.save_pretrained(d)
    return d


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="context length in tokens (default 2048)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per (press, budget), median reported")
    ap.add_argument("--budgets", type=float, nargs="+", default=BUDGETS, help="kept fractions (default 0.5 0.25)")
    ap.add_argument("--presses", nargs="+", default=list(PRESSES), choices=list(PRESSES))
    ap.add_argument("--quick", action="store_true", help="512 tokens, 1 repeat (a smoke run)")
    ap.add_argument("--out", default=str(HERE / "results" / "kvpress_compare"))
    ap.add_argument("--render", metavar="JSON", help="only re-write the markdown beside JSON from it (no run)")
    args = ap.parse_args()
    if args.render:
        src = Path(args.render)
        src.with_suffix(".md").write_text(markdown(json.loads(src.read_text())))
        return
    if args.quick:
        args.tokens, args.repeats = 512, 1
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    py = ensure_venv()
    model, tok = load_model("smollm2-135m")  # fp32, sdpa, CPU
    text = make_passkey_samples(tok, n=1, length=args.tokens + 64, seed=0)[0].context
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    n = int(ids.shape[1])
    WORK.mkdir(parents=True, exist_ok=True)
    ids_file = WORK / "kvpress_compare_ids.json"
    ids_file.write_text(json.dumps({"input_ids": ids[0].tolist()}))
    side = KVPressSide(py, model_directory(model, tok), ids_file, WORK / "kvpress_side.json", WORK / "kvpress_side.log")
    try:
        info = side.ask(op="info")
        assert info["tokens"] == n
        # warm-up (not recorded): both kvpress models and kvframe's attention path
        side.ask(op="prefill", press=None)
        if "observed_attention" in args.presses:
            side.ask(op="prefill", press=None, attn="eager")
        timed_prefill(model, kvframe.build("full"), ids)

        rows = []
        for press in args.presses:
            card, overrides, press_kwargs = PRESSES[press]
            for budget in args.budgets:
                ratio = 1.0 - budget  # kvpress's compression_ratio: the fraction removed
                n_kept = max(1, int(n * (1 - ratio)))  # kvpress's compute_n_kept
                comp = kvframe.build(card, budget=n_kept, **overrides)
                full = kvframe.build("full")
                t = {"kvpress_without": [], "kvpress_with": [], "kvframe_full": [], "kvframe_card": []}
                for r in range(args.repeats):
                    base = side.ask(op="prefill", press=None, attn="eager" if press == "observed_attention" else "sdpa")
                    res = side.ask(op="prefill", press=press, compression_ratio=ratio, options=press_kwargs, record=r == 0)
                    t["kvpress_without"].append(base["seconds"])
                    t["kvpress_with"].append(res["seconds"])
                    if r == 0:
                        theirs, verified, their_lengths = res["kept"], res["verified"], res["cache_lengths"]
                    ft, _ = timed_prefill(model, full, ids)
                    ct, cache = timed_prefill(model, comp, ids)
                    t["kvframe_full"].append(ft)
                    t["kvframe_card"].append(ct)
                    if r == 0:
                        ours, our_counts = kvframe_kept(cache)
                agr = agreement(ours, theirs)
                m = {k: med(v) for k, v in t.items()}
                row = {
                    "press": press, "kvpress_class": KVPRESS_CLASS[press], "kvpress_kwargs": press_kwargs,
                    "kvframe_card": card, "kvframe_overrides": overrides, "budget": budget,
                    "kvpress_compression_ratio": ratio, "kept_tokens": n_kept,
                    "kvpress_attn": "eager" if press == "observed_attention" else "sdpa",
                    "times_s": t, "median_s": m, "min_s": {k: min(v) for k, v in t.items()},
                    "kvpress_overhead": m["kvpress_with"] / m["kvpress_without"],
                    "kvframe_overhead": m["kvframe_card"] / m["kvframe_full"],
                    "cross_ratio": m["kvframe_card"] / m["kvpress_with"],
                    "cross_ratio_baseline": m["kvframe_full"] / m["kvpress_without"],
                    "kvpress_cache_lengths": sorted(set(their_lengths)),
                    "kvpress_indices_verified": verified,
                    "kvframe_kept_counts": sorted({c for layer in our_counts for c in layer}),
                    "agreement": agr,
                }
                rows.append(row)
                print(f"{press:18s} budget {budget:<5} kept {n_kept:5d} | kvpress {m['kvpress_with']:.2f}/{m['kvpress_without']:.2f} s "
                      f"| kvframe {m['kvframe_card']:.2f}/{m['kvframe_full']:.2f} s | cross {row['cross_ratio']:.2f} "
                      f"| agreement mean {agr['mean']:.4f} min {agr['min']:.4f} counts equal {agr['counts_equal']}", flush=True)
    finally:
        side.close()

    result = {
        "benchmark": "kvpress_compare",
        "command": " ".join([".venv/bin/python", "benchmarks/kvpress_compare.py", *sys.argv[1:]]),
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct fp32 (kvframe's converted checkpoint), CPU",
        "input": {"source": "kvframe.eval.tasks.passkey.make_passkey_samples(tok, n=1, length=tokens+64, seed=0)[0].context, first tokens",
                  "tokens": n},
        "settings": {"repeats": args.repeats, "budgets": args.budgets, "quick": args.quick, "snapkv_window": SNAPKV_WINDOW,
                     "snapkv_kernel": SNAPKV_KERNEL, "n_sink": N_SINK},
        "versions": {
            "kvframe_side": {"kvframe": kvframe.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                             "python": sys.version.split()[0], "torch_threads": torch.get_num_threads()},
            "kvpress_side": {k: info[k] for k in ("kvpress", "torch", "transformers", "python", "torch_threads")},
        },
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},  # 1, 5, 15 min (other jobs on the machine)
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


NOTES = """\
## Alignment

- **Same input, same model.** One passkey context (`make_passkey_samples(tok, n=1, length=tokens+64, seed=0)`,
  first `tokens` ids), written to `benchmarks/.work/kvpress_compare_ids.json` and read by both sides; both load
  kvframe's converted SmolLM2-135M-Instruct safetensors checkpoint in fp32 on CPU. Batch 1, no padding, no
  question: the whole context is compressed once, after a single prefill with `logits_to_keep=1`.
- **Kept count.** kvframe's budget is the kept fraction; kvpress's `compression_ratio` is the removed fraction, so
  budget `b` runs kvpress at `compression_ratio = 1 - b`. kvpress keeps `int(n * (1 - compression_ratio))` tokens
  per head (`compute_n_kept`); kvframe rounds a ratio half up, so it is given that count as an *absolute* budget
  and both keep exactly the same number of tokens in every layer and head ("counts equal").
- **Press ↔ card.**
  - `SnapKVPress(window_size=64, kernel_size=5)` ↔ `snapkv` with `scorer.window=64, scorer.kernel=5,
    scorer.pool=avg`. Both keep the observation window and count it in the budget.
  - `KnormPress` ↔ `knorm` (score `-||k||`, keys as cached, i.e. after RoPE; the norm is RoPE-invariant).
  - `StreamingLLMPress(n_sink=4)` ↔ `streaming_llm` with `scorer.n_sink=4`, `positions: original` (kvpress
    does not re-rotate keys either unless wrapped in `KeyRerotationPress`).
  - `TOVAPress` ↔ `tova` (prefill variant: last query's attention averaged over all query heads, one score
    shared by the KV heads).
  - `ObservedAttentionPress` ↔ `h2o` (scorer `observed_attention`, `normalize: true`: attention received from
    all prompt queries divided by the number of queries that could see the key, averaged over the GQA group).
    kvpress reads the attention weights the model returns, so its model is loaded with
    `attn_implementation="eager"`, and its "without press" baseline is the same eager model; kvframe computes
    the same quantity in 256-query chunks from its own attention function and needs no eager model.
- **kvpress kept indices.** The press's `score` is wrapped on the instance to record each layer's scores; the
  kept indices are recomputed exactly as `ScorerPress.compress` does (`scores.topk(n_kept)`), and the full keys
  gathered at them are checked to equal the compressed cache's keys bit for bit ("indices verified").
  kvframe's kept positions are the `positions` of the valid slots of each layer's `SlotState`.
- **Timing.** For each (press, budget) and repeat: kvpress without the press, kvpress with it, kvframe with
  `full`, kvframe with the card; the median of the repeats is reported. The two processes never compute at
  the same time (the idle one waits on a pipe). Both use torch's default thread count (recorded). A warm-up
  prefill on each side is not recorded. Cross ratio = kvframe card time / kvpress press time; the baseline cross
  ratio (kvframe `full` / kvpress without press) shows how much of it is the uncompressed forward itself
  (kvframe's attention function under transformers {tf_ours} versus sdpa/eager under transformers {tf_theirs}).

## Semantic differences found (by reading kvpress 0.5.5's source)

- **SnapKV pooling at the edges (found by this benchmark, fixed in kvframe).** kvpress (like the original
  SnapKV code) pools only the columns *before* the window, `avg_pool1d(scores[..., :n-w], 5, padding=2)` with
  the default `count_include_pad=True`. kvframe's `snapkv` scorer used to pool over all slots, window
  included, with `count_include_pad=False`, so the two tokens next to the window and tokens 0-1 scored higher
  (the only differing positions in the first run: {{0, 1, n-w-2, n-w-1}}, agreement 0.9998). It now pools the
  pre-window scores alone with zero padding counted (`tests/test_compress.py` checks it against this
  formula), and the kept sets agree on every head.
- **TOVA's last token.** kvpress scores only the first `n-1` keys and pads the last token with `max + 1`, so the
  last token is always kept; kvframe scores the last token by its own (averaged) attention, so it is kept only
  if it ranks in the top `n_kept` (it usually does: it attends strongly to itself). Both average over all 9
  query heads and share the score across the 3 KV heads.
- **Ties.** Where scores tie at the cut (StreamingLLM's 0/1 scores have none at the cut; attention scores rarely
  tie exactly) `topk` may pick different members of the tie on the two sides.
- **Numerics.** kvpress recomputes the window queries from the hidden states (`get_prerope_query_states` + RoPE,
  `1/sqrt(head_dim)` scaling) and, for observed attention, uses the eager attention weights; kvframe uses the
  queries the attention layer computed and its own float32 softmax. Float differences (and transformers
  {tf_ours} vs {tf_theirs} producing slightly different hidden states) can swap tokens whose scores are within
  rounding of the cut.
"""


def markdown(res: dict) -> str:
    m = res["machine"]
    v = res["versions"]
    s = res["settings"]
    n = res["input"]["tokens"]
    lines = [
        f"# kvframe vs kvpress — SmolLM2-135M fp32, {n}-token context, CPU",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}. kvframe side: kvframe {v['kvframe_side']['kvframe']}, "
        f"torch {v['kvframe_side']['torch']}, transformers {v['kvframe_side']['transformers']} "
        f"({v['kvframe_side']['torch_threads']} threads). kvpress side: kvpress {v['kvpress_side']['kvpress']}, "
        f"torch {v['kvpress_side']['torch']}, transformers {v['kvpress_side']['transformers']} "
        f"({v['kvpress_side']['torch_threads']} threads).",
        "",
        f"Command: `{res['command']}` (repeats {s['repeats']}{', --quick' if s['quick'] else ''}; wall {res['wall_s']:.0f} s). "
        "Times are medians in seconds of one prefill (compression included). Overhead = with / without on the same side; "
        "cross = kvframe card / kvpress press; base cross = kvframe `full` / kvpress without press. Agreement = "
        "|kept_kvframe ∩ kept_kvpress| / |kept_kvpress| over every layer and KV head (mean, min); identical = heads "
        "whose kept sets are equal.",
        "",
        *([f"Load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in res['load_average']['start'])}, at end "
           f"{'/'.join(f'{x:.1f}' for x in res['load_average']['end'])} on {m['cores']} cores.", ""] if "load_average" in res else []),
        *([f"Note: {res['note']}", ""] if res.get("note") else []),
        "| kvpress press | kvframe card | budget | kvpress ratio | kept | kvpress with / without | kvpress overhead | "
        "kvframe card / full | kvframe overhead | cross | base cross | agreement mean | agreement min | identical heads | counts equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        md, a = r["median_s"], r["agreement"]
        eager = " (eager)" if r["kvpress_attn"] == "eager" else ""
        lines.append(
            f"| {r['kvpress_class']}{eager} | {r['kvframe_card']} | {r['budget']} | {r['kvpress_compression_ratio']:.2f} | {r['kept_tokens']} | "
            f"{md['kvpress_with']:.2f} / {md['kvpress_without']:.2f} | {r['kvpress_overhead']:.3f} | "
            f"{md['kvframe_card']:.2f} / {md['kvframe_full']:.2f} | {r['kvframe_overhead']:.3f} | {r['cross_ratio']:.2f} | "
            f"{r['cross_ratio_baseline']:.2f} | {a['mean']:.4f} | {a['min']:.4f} | {a['heads_identical']}/{a['heads']} | "
            f"{'yes' if r['kvpress_cache_lengths'] == r['kvframe_kept_counts'] == [r['kept_tokens']] else 'no'} |"
        )
    verified = all(r["kvpress_indices_verified"] for r in res["rows"])
    lines += ["", f"kvpress kept indices verified against its compressed cache: {'yes' if verified else 'NO'}.", ""]
    diff_rows = [r for r in res["rows"] if r["agreement"]["heads_identical"] < r["agreement"]["heads"]]
    if diff_rows:
        lines += ["Where the kept sets differ (first differing heads, from the JSON's `differences`): token positions kept "
                  "only by kvframe / only by kvpress, with how many heads each appears in.", ""]
        for r in diff_rows:
            ours, theirs = {}, {}
            for d in r["agreement"]["differences"]:
                for p in d["only_kvframe"]:
                    ours[p] = ours.get(p, 0) + 1
                for p in d["only_kvpress"]:
                    theirs[p] = theirs.get(p, 0) + 1
            fmt = lambda c: ", ".join(f"{p}×{k}" if k > 1 else str(p) for p, k in sorted(c.items()))  # noqa: E731
            extra = ""
            if r["press"] == "snapkv":
                w = s["snapkv_window"]
                extra = f" (the pre-window boundary is positions {n - w - 2} and {n - w - 1}; the first two are 0 and 1)"
            lines.append(f"- {r['kvpress_class']} budget {r['budget']}: {len(r['agreement']['differences'])} heads listed; "
                         f"only kvframe: {fmt(ours)}{extra}; only kvpress: {fmt(theirs)}.")
        lines.append("")
    lines.append(NOTES.format(tf_ours=v["kvframe_side"]["transformers"], tf_theirs=v["kvpress_side"]["transformers"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
