"""The kvpress half of ``benchmarks/kvpress_compare.py``; runs inside ``benchmarks/.venv-kvpress``.

kvpress 0.5.5 needs ``transformers<5.3`` while kvframe runs on a newer one, so this script runs as
a subprocess in kvpress's own virtualenv and serves the main script over a pipe: one JSON request
per line on stdin, one JSON answer per line on the (duplicated) original stdout; everything else
(logging, progress bars, C-level prints) goes to stderr. It never imports kvframe.

Requests::

    {"op": "info"}                                     -> versions, model config, threads
    {"op": "prefill", "press": null | "snapkv" | "knorm" | "streaming_llm" | "tova" | "observed_attention",
     "compression_ratio": 0.5, "record": true, "options": {...press kwargs...}}
                                                       -> seconds, cache lengths, kept indices
    {"op": "quit"}                                     -> writes --out and exits

One prefill is ``model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)``
under the press's context manager, timed with ``time.perf_counter``. ``observed_attention``
(kvpress's ``ObservedAttentionPress``) needs the attention weights, so it runs on a second copy of
the model loaded with ``attn_implementation="eager"``; a ``press: null`` request with
``"attn": "eager"`` gives its uncompressed baseline.

Kept indices: the press's ``score`` is wrapped (on the instance) to record each layer's scores and
full keys; the kept indices are recomputed exactly as ``ScorerPress.compress`` does
(``scores.topk(compute_n_kept(k_len, ratio)).indices``) and checked against the compressed cache
(the gathered full keys must equal the cached keys bit for bit, ``verified``).

Run by the main script as
``benchmarks/.venv-kvpress/bin/python benchmarks/_kvpress_side.py --model DIR --ids FILE --out FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# the protocol channel is the original stdout; anything else written to fd 1 goes to stderr
_PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from kvpress import KnormPress, ObservedAttentionPress, SnapKVPress, StreamingLLMPress, TOVAPress  # noqa: E402
from kvpress.utils import compute_n_kept  # noqa: E402

PRESSES = {
    "snapkv": SnapKVPress,
    "knorm": KnormPress,
    "streaming_llm": StreamingLLMPress,
    "tova": TOVAPress,
    "observed_attention": ObservedAttentionPress,
}
NEEDS_EAGER = {"observed_attention"}


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:  # noqa: BLE001
        return "unknown"


class Side:
    def __init__(self, model_dir: str, ids_file: str) -> None:
        try:
            transformers.utils.logging.disable_progress_bar()
        except Exception:  # noqa: BLE001
            pass
        self.model_dir = model_dir
        with open(ids_file) as fh:
            self.ids = torch.tensor([json.load(fh)["input_ids"]], dtype=torch.long)
        self.models: dict[str, object] = {}
        self.log: list[dict] = []

    def model(self, attn: str):
        if attn not in self.models:
            m = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32, attn_implementation=attn)
            self.models[attn] = m.eval()
        return self.models[attn]

    def info(self) -> dict:
        cfg = self.model("sdpa").config
        return {
            "torch": torch.__version__, "transformers": transformers.__version__, "kvpress": _version("kvpress"),
            "python": sys.version.split()[0], "torch_threads": torch.get_num_threads(),
            "num_layers": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
            "num_kv_heads": cfg.num_key_value_heads, "tokens": int(self.ids.shape[1]),
        }

    def prefill(self, req: dict) -> dict:
        name = req.get("press")
        attn = req.get("attn") or ("eager" if name in NEEDS_EAGER else "sdpa")
        model = self.model(attn)
        ratio = float(req.get("compression_ratio", 0.0))
        press = None
        records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if name is not None:
            press = PRESSES[name](compression_ratio=ratio, **(req.get("options") or {}))
            if req.get("record"):
                inner = press.score

                def score(module, hidden_states, keys, values, attentions, kwargs):
                    s = inner(module, hidden_states, keys, values, attentions, kwargs)
                    records[module.layer_idx] = (s, keys)
                    return s

                press.score = score  # instance attribute: ScorerPress.compress calls self.score
        cache = DynamicCache()
        with torch.no_grad():
            if press is None:
                t0 = time.perf_counter()
                model(self.ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                dt = time.perf_counter() - t0
            else:
                with press(model):
                    t0 = time.perf_counter()
                    model(self.ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    dt = time.perf_counter() - t0
        lengths = [int(layer.keys.shape[2]) for layer in cache.layers]
        out = {"press": name, "attn": attn, "compression_ratio": ratio, "seconds": dt, "cache_lengths": lengths}
        if records:
            kept, verified = [], True
            for li in range(len(cache.layers)):
                s, keys = records[li]
                n_kept = compute_n_kept(keys.shape[2], ratio)
                idx = s.topk(n_kept, dim=-1).indices  # exactly ScorerPress.compress's selection
                gathered = keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
                verified &= bool(torch.equal(gathered, cache.layers[li].keys))
                kept.append(idx[0].sort(dim=-1).values.tolist())  # [H_kv][n_kept] token positions
            out["kept"] = kept
            out["verified"] = verified
        self.log.append({k: v for k, v in out.items() if k != "kept"})
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a saved transformers checkpoint directory")
    ap.add_argument("--ids", required=True, help="JSON file with {'input_ids': [...]}")
    ap.add_argument("--out", required=True, help="JSON file written at 'quit': versions and every prefill")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    side = Side(args.model, args.ids)
    info = None
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            if req["op"] == "info":
                info = side.info()
                ans = info
            elif req["op"] == "prefill":
                ans = side.prefill(req)
            elif req["op"] == "quit":
                with open(args.out, "w") as fh:
                    json.dump({"info": info or side.info(), "prefills": side.log}, fh, indent=1)
                _PROTO.write(json.dumps({"ok": True}) + "\n")
                return
            else:
                raise ValueError(f"unknown op {req['op']!r}")
            _PROTO.write(json.dumps({"ok": True, **ans}) + "\n")
        except Exception as err:  # noqa: BLE001  (reported to the main script, which raises)
            import traceback

            traceback.print_exc()
            _PROTO.write(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}) + "\n")


if __name__ == "__main__":
    main()
