"""AsymKV (docs/methods.md#asymkv): window-attention scorer, adjacent-pair selector, Fisher key merge,
sum value merge (lossless for shared keys, merge fixed points, bookkeeping, overlap rule), on plain tensors."""

from __future__ import annotations

import math

import pytest
import torch

import kvframe
from kvframe.errors import ConfigError
from kvframe.policies.base import CompressionContext
from kvframe.policies.merge_fisher import fisher_merge
from kvframe.policies.select_adjacent_pairs import DEFAULT_GAMMA, AdjacentPairsSelector
from kvframe.rope import Rotary
from kvframe.slots import SlotState

GAMMA = 4096 / math.log(512)


def build(budget: int, n_sink: int = 2, **kw):
    return kvframe.build("asymkv", budget=budget, **{"selector.n_sink": n_sink}, **kw)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reference softmax attention of queries ``[Q, D]`` over slots (logit bias ``log_weights``)."""
    logits = q.double() @ keys.double().T / math.sqrt(q.shape[-1])
    if log_weights is not None:
        logits = logits + log_weights.double()
    return torch.softmax(logits, dim=-1) @ values.double()


def summed(result, b: int = 0, h: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed values, counts) of one head of a compress result."""
    _, v, _, lw = result.head(b, h)
    cnt = lw.double().exp()
    return v.double() * cnt[:, None], cnt


def reference_pairs(m: list[float], l: list[float], n_sink: int, k: int, gamma: float, count_factor: bool) -> list[int]:
    """Pair scores by hand: left ranks of the k lowest-scoring pairs (one head, H_kv = 1)."""
    scores = []
    for j in range(n_sink, len(m) - 1):
        i = j - n_sink
        p = (m[j] + m[j + 1]) / math.exp((i + 1) / gamma)
        if count_factor:
            p *= l[j] + l[j + 1]
        scores.append((p, j))
    return sorted(j for _, j in sorted(scores)[:k])


def reference_apply(picks: list[int], values: list[torch.Tensor], counts: list[float], positions: list[int]):
    """Overlap rule by hand: simultaneous application with overlapping picks turning into eviction."""
    deleted = {j + 1 for j in picks}
    out = []
    for j in range(len(values)):
        if j in deleted:
            continue
        if j in picks:
            out.append((values[j] + values[j + 1], counts[j] + counts[j + 1], positions[j + 1]))
        else:
            out.append((values[j], counts[j], positions[j]))
    return out


# --------------------------------------------------------------------------- 1.11 (1): LMA lossless
def test_lma_lossless_identical_keys_through_compress():
    torch.manual_seed(0)
    t, d = 8, 16
    keys = torch.randn(1, 1, t, d, dtype=torch.float64)
    keys[0, 0, 5] = keys[0, 0, 4]  # tokens a = 4 and b = 5 share a key
    values = torch.randn(1, 1, t, d, dtype=torch.float64)
    window = torch.ones(1, 1, t)
    window[0, 0, 4:6] = 0.0  # pair (4, 5) is the least attended: exactly that pair merges
    grad = torch.randn(1, 1, t, d)
    res = kvframe.compress(build(t - 1), keys, values, stats={"window_attn": window, "grad": grad})
    k_out, v_out, pos, lw = res.head(0, 0)
    assert k_out.shape[0] == t - 1
    assert pos.tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert torch.allclose(k_out[4], keys[0, 0, 4])
    assert lw[4].item() == pytest.approx(math.log(2))
    assert torch.allclose(v_out[4], (values[0, 0, 4] + values[0, 0, 5]) / 2)

    q = torch.randn(5, d, dtype=torch.float64)
    full = attend(q, keys[0, 0], values[0, 0])  # plain softmax over all N tokens
    merged = attend(q, k_out, v_out, lw)  # SDPA with bias ln l and mean values over N - 1 slots
    assert torch.allclose(full, merged, atol=1e-10)
    # the code's cardinality-aware form: w_j = exp(s_j) / sum_i l_i exp(s_i), o = sum_j w_j V_j (summed V)
    v_sum, cnt = summed(res)
    e = (q @ k_out.T / math.sqrt(d)).exp()
    card = (e / (e * cnt).sum(-1, keepdim=True)) @ v_sum
    assert torch.allclose(full, card, atol=1e-10)


# --------------------------------------------------------------------------- 1.11 (2): key merge
def test_fisher_fixed_points():
    torch.manual_seed(1)
    k = torch.randn(2, 8)
    g = torch.randn(2, 8)
    same = torch.stack([k[0], k[0]])
    assert torch.allclose(fisher_merge(same, g), k[0])  # identical keys: any F
    assert torch.allclose(fisher_merge(k, torch.stack([g[0], -g[0]])), k.mean(0))  # equal F: average
    assert torch.allclose(fisher_merge(k, torch.stack([g[0], torch.zeros(8)])), k[0])  # F_{j+1} = 0: k_j
    # the formula itself, per dimension
    f = g**2
    assert torch.allclose(fisher_merge(k, g), (f[0] * k[0] + f[1] * k[1]) / (f[0] + f[1] + 1e-21))


def _one_pair_case(t: int = 8, d: int = 4, seed: int = 2):
    """Slots 0..t-1 where pair (3, 4) is the unique least-attended pair (n_sink 2, budget t-1)."""
    torch.manual_seed(seed)
    keys = torch.randn(1, 2, t, d)
    values = torch.randn(1, 2, t, d)
    window = torch.ones(1, 2, t)
    window[..., 3:5] = 0.01
    grad = torch.randn(1, 2, t, d)
    return keys, values, window, grad


def test_fisher_merge_through_compress_and_gradient_propagation():
    keys, values, window, grad = _one_pair_case()
    res = kvframe.compress(build(7), keys, values, stats={"window_attn": window, "grad": grad})
    f = grad.double() ** 2
    expect = (f[:, :, 3] * keys[:, :, 3] + f[:, :, 4] * keys[:, :, 4]) / (f[:, :, 3] + f[:, :, 4] + 1e-21)
    assert torch.allclose(res.keys[:, :, 3].double(), expect, atol=1e-6)
    others = [0, 1, 2, 5, 6, 7]
    assert torch.equal(res.keys[:, :, [0, 1, 2, 4, 5, 6]], keys[:, :, others])  # untouched slots bit for bit
    g_out = res.state.stats["grad"]
    assert torch.allclose(g_out[:, :, 3], grad[:, :, 3] + grad[:, :, 4])  # raw gradients summed
    assert torch.equal(g_out[:, :, [0, 1, 2, 4, 5, 6]], grad[:, :, others])
    # no overlap, no clamp reached: the counts are conserved
    assert res.log_weights.exp().sum(-1).tolist() == [[pytest.approx(8.0), pytest.approx(8.0)]]
    assert res.positions[0, 0].tolist() == [0, 1, 2, 4, 5, 6, 7]


def test_fisher_fallback_averages_keys_and_keeps_summed_values():
    keys, values, window, grad = _one_pair_case()
    for bad in (0.0, float("nan")):
        g = grad.clone()
        g[:, :, 3:5] = bad
        res = kvframe.compress(build(7), keys, values, stats={"window_attn": window, "grad": g})
        assert torch.allclose(res.keys[:, :, 3], (keys[:, :, 3] + keys[:, :, 4]) / 2)
        v_sum = res.values[:, :, 3] * res.log_weights[:, :, 3, None].exp()
        assert torch.allclose(v_sum, values[:, :, 3] + values[:, :, 4], atol=1e-6)  # summed, not averaged
    # F == 0 in one dimension only: that dimension is averaged, the others follow F
    g = grad.clone()
    g[:, :, 3:5, 0] = 0.0
    res = kvframe.compress(build(7), keys, values, stats={"window_attn": window, "grad": g})
    assert torch.allclose(res.keys[:, :, 3, 0], (keys[:, :, 3, 0] + keys[:, :, 4, 0]) / 2)
    f = g**2
    expect = (f[:, :, 3, 1:] * keys[:, :, 3, 1:] + f[:, :, 4, 1:] * keys[:, :, 4, 1:]) / (f[:, :, 3, 1:] + f[:, :, 4, 1:] + 1e-21)
    assert torch.allclose(res.keys[:, :, 3, 1:], expect, atol=1e-6)


# --------------------------------------------------------------------------- 1.11 (3): bookkeeping
def _random_case(t: int = 40, d: int = 4, seed: int = 3, spacing: int = 3):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, t, d, generator=g, dtype=torch.float64)
    values = torch.randn(1, 2, t, d, generator=g, dtype=torch.float64)
    window = torch.rand(1, 2, t, generator=g)
    counts = torch.randint(1, 4, (1, 1, t), generator=g).double().expand(1, 2, t)
    grad = torch.randn(1, 2, t, d, generator=g)
    positions = torch.arange(t) * spacing + 7  # gaps: merged positions must come from the slots
    return keys, values, window, counts, grad, positions


@pytest.mark.parametrize("count_factor", [True, False])
def test_bookkeeping_matches_hand_reference(count_factor):
    keys, values, window, counts, grad, positions = _random_case()
    t, n_sink, budget = keys.shape[2], 4, 25
    comp = build(budget, n_sink, **{"value_merge.clamp": None, "selector.count_factor": count_factor})
    res = kvframe.compress(comp, keys, values, positions=positions, log_weights=counts.log().float(), stats={"window_attn": window, "grad": grad})
    assert res.kept_per_head.tolist() == [[budget, budget]]
    m = window.double().sum(1)[0].tolist()  # summed over the KV heads
    picks = reference_pairs(m, counts[0, 0].tolist(), n_sink, t - budget, GAMMA, count_factor)
    assert any(j + 1 in picks for j in picks), "this case should contain an overlapping pick"
    for h in range(2):
        ref = reference_apply(picks, list(values[0, h] * counts[0, h, :, None]), counts[0, h].tolist(), positions.tolist())
        v_sum, cnt = summed(res, 0, h)
        assert res.head(0, h)[2].tolist() == [p for _, _, p in ref]  # merged slot at its later token
        assert cnt.tolist() == pytest.approx([c for _, c, _ in ref])
        assert torch.allclose(v_sum, torch.stack([v for v, _, _ in ref]), atol=1e-9)
    lost = sum(counts[0, 0, j + 2].item() for j in picks if j + 1 in picks)
    assert cnt.sum().item() == pytest.approx(counts[0, 0].sum().item() - lost)  # conserved up to overlap losses


def test_disjoint_never_overlaps_and_conserves_counts():
    keys, values, window, counts, grad, positions = _random_case(seed=5)
    t, n_sink, budget = keys.shape[2], 4, 26
    comp = kvframe.build(
        "asymkv_disjoint", budget=budget, **{"selector.n_sink": n_sink, "value_merge.clamp": None}
    )
    res = kvframe.compress(comp, keys, values, positions=positions, log_weights=counts.log().float(), stats={"window_attn": window, "grad": grad})
    assert res.kept_per_head.tolist() == [[budget, budget]]
    _, cnt = summed(res)
    assert cnt.sum().item() == pytest.approx(counts[0, 0].sum().item())  # nothing evicted
    v_sum, _ = summed(res)
    assert torch.allclose(v_sum.sum(0), (values[0, 0] * counts[0, 0, :, None]).sum(0), atol=1e-9)
    # every output slot is one slot or one adjacent pair: its position is its own or its right neighbour's
    pos = positions.tolist()
    out_pos = res.head(0, 0)[2].tolist()
    idx = [pos.index(p) for p in out_pos]
    covered = []
    prev = -1
    for i in idx:
        covered += list(range(prev + 1, i + 1))
        assert i - prev in (1, 2)
        prev = i
    assert covered == list(range(t))
    # greedy: ascending score, skipping pairs sharing a slot with an earlier pick
    m = window.double().sum(1)[0].tolist()
    scores = sorted(((m[j] + m[j + 1]) / math.exp((j - n_sink + 1) / GAMMA) * (counts[0, 0, j] + counts[0, 0, j + 1]).item(), j) for j in range(n_sink, t - 1))
    used, picks = set(), []
    for _, j in scores:
        if j in used or j + 1 in used:
            continue
        used |= {j, j + 1}
        picks.append(j)
        if len(picks) == t - budget:
            break
    assert out_pos == [pos[i + 1] if i in picks else pos[i] for i in range(t) if i - 1 not in picks]


def test_clamp_caps_counts_but_keeps_summed_values():
    t, d = 12, 4
    torch.manual_seed(4)
    keys, values = torch.randn(1, 1, t, d, dtype=torch.float64), torch.randn(1, 1, t, d, dtype=torch.float64)
    counts = torch.ones(1, 1, t, dtype=torch.float64)
    counts[0, 0, 6:8] = 4.0  # a pair standing for 8 tokens
    window = torch.ones(1, 1, t)
    window[0, 0, 6:8] = 0.0
    stats = {"window_attn": window, "grad": torch.randn(1, 1, t, d)}
    for clamp, expect in ((5, 5.0), (None, 8.0)):
        comp = build(t - 1, **{"value_merge.clamp": clamp})
        res = kvframe.compress(comp, keys, values, log_weights=counts.log().float(), stats=stats)
        v_sum, cnt = summed(res)
        assert cnt[6].item() == pytest.approx(expect)
        assert torch.allclose(v_sum[6], 4 * (values[0, 0, 6] + values[0, 0, 7]), atol=1e-6)
        assert res.head(0, 0)[2].tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11]  # clamp never moves positions


def test_left_padding_rows_match_unpadded_rows():
    keys, values, window, counts, grad, _ = _random_case(t=30, seed=6)
    pad = 5
    t = keys.shape[2]
    # row 0: unpadded; row 1: the same content behind `pad` padding slots (and `pad` fewer... same length)
    kp = torch.cat([torch.zeros(1, 2, pad, 4, dtype=torch.float64), keys], 2)
    vp = torch.cat([torch.zeros(1, 2, pad, 4, dtype=torch.float64), values], 2)
    wp = torch.cat([torch.full((1, 2, pad), 100.0), window], 2)
    cp = torch.cat([torch.ones(1, 2, pad, dtype=torch.float64), counts], 2)
    gp = torch.cat([torch.zeros(1, 2, pad, 4), grad], 2)
    k2 = torch.cat([torch.cat([keys, torch.zeros(1, 2, pad, 4, dtype=torch.float64)], 2), kp])
    v2 = torch.cat([torch.cat([values, torch.zeros(1, 2, pad, 4, dtype=torch.float64)], 2), vp])
    w2 = torch.cat([torch.cat([window, torch.zeros(1, 2, pad)], 2), wp])
    c2 = torch.cat([torch.cat([counts, torch.ones(1, 2, pad, dtype=torch.float64)], 2), cp])
    g2 = torch.cat([torch.cat([grad, torch.zeros(1, 2, pad, 4)], 2), gp])
    valid = torch.ones(2, t + pad, dtype=torch.bool)
    valid[0, t:] = False
    valid[1, :pad] = False
    pos = torch.stack([torch.arange(t + pad), torch.arange(t + pad) - pad])
    comp = build(20, 3)
    both = kvframe.compress(comp, k2, v2, positions=pos, valid=valid, log_weights=c2.log().float(), stats={"window_attn": w2, "grad": g2})
    alone = kvframe.compress(comp, keys, values, log_weights=counts.log().float(), stats={"window_attn": window, "grad": grad})
    assert both.kept_per_head.tolist() == [[20, 20], [20, 20]]
    for b in range(2):
        for h in range(2):
            for x, y in zip(both.head(b, h), alone.head(0, h)):
                assert torch.allclose(x.double(), y.double(), atol=1e-6)


# --------------------------------------------------------------------------- 1.11 (4): overlap rule
def _overlap_case():
    t, d = 8, 4
    torch.manual_seed(7)
    keys, values = torch.randn(1, 1, t, d, dtype=torch.float64), torch.randn(1, 1, t, d, dtype=torch.float64)
    window = torch.ones(1, 1, t)
    window[0, 0, 3:6] = 0.0  # pairs (3,4) and (4,5) both score 0: both picked with K = 2
    return keys, values, window, torch.randn(1, 1, t, d)


def test_overlap_rule_turns_into_eviction():
    keys, values, window, grad = _overlap_case()
    res = kvframe.compress(build(6), keys, values, stats={"window_attn": window, "grad": grad})
    _, _, pos, _ = res.head(0, 0)
    assert pos.tolist() == [0, 1, 2, 4, 6, 7]  # slots 4 and 5 removed; slot 3 sits at 4's position
    v_sum, cnt = summed(res)
    assert torch.allclose(v_sum[3], values[0, 0, 3] + values[0, 0, 4])  # V_j + V_{j+1}; V_{j+2} lost
    assert cnt.tolist() == pytest.approx([1, 1, 1, 2, 1, 1])
    assert cnt.sum().item() == pytest.approx(7)  # one token's count evicted


def test_disjoint_variant_on_the_overlap_case_and_minimum_budget_error():
    keys, values, window, grad = _overlap_case()
    comp = kvframe.build("asymkv_disjoint", budget=6, **{"selector.n_sink": 2})
    res = kvframe.compress(comp, keys, values, stats={"window_attn": window, "grad": grad})
    _, _, pos, _ = res.head(0, 0)
    # (3,4) first (tie with (4,5): older pair), (4,5) blocked, then (5,6) beats (2,3) by the position penalty
    assert pos.tolist() == [0, 1, 2, 4, 6, 7]
    v_sum, cnt = summed(res)
    assert cnt.tolist() == pytest.approx([1, 1, 1, 2, 2, 1])
    assert torch.allclose(v_sum[4], values[0, 0, 5] + values[0, 0, 6])
    # 6 middle slots hold 3 disjoint pairs, but after (3,4) and (5,6) the greedy is stuck (slots 2 and 7
    # have no free neighbour): budget 5 cannot be reached this way, and the error says so
    with pytest.raises(ConfigError, match="minimum budget here 6"):
        kvframe.compress(kvframe.build("asymkv_disjoint", budget=5, **{"selector.n_sink": 2}), keys, values, stats={"window_attn": window, "grad": grad})


# --------------------------------------------------------------------------- penalty and count factor
def test_pair_scores_formula():
    torch.manual_seed(8)
    t, h = 9, 2
    window = torch.rand(1, h, t)
    counts = torch.randint(1, 5, (1, 1, t)).float().expand(1, h, t)
    state = SlotState.from_tensors(torch.zeros(1, h, t, 2), torch.zeros(1, h, t, 2), log_weights=counts.log())
    sel = AdjacentPairsSelector(n_sink=2, gamma=7.0)
    p, ok, _ = sel.pair_scores(window, state)
    assert ok[0].tolist() == [False, False] + [True] * 6
    for j in range(2, t - 1):
        mass = (window[0, :, j] + window[0, :, j + 1]).sum().item()
        expect = mass / math.exp((j - 2 + 1) / 7.0) * h * (counts[0, 0, j] + counts[0, 0, j + 1]).item()
        assert p[0, j].item() == pytest.approx(expect, rel=1e-6)
    assert AdjacentPairsSelector().temperature == pytest.approx(GAMMA) == DEFAULT_GAMMA


def test_position_penalty_makes_recent_pairs_merge_first():
    t, d = 8, 4
    keys, values = torch.randn(1, 1, t, d), torch.randn(1, 1, t, d)
    window = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0]]])  # older pairs less attended
    stats = {"window_attn": window, "grad": torch.randn(1, 1, t, d)}
    strong = kvframe.compress(build(7, **{"selector.gamma": 1.0}), keys, values, stats=stats)
    assert strong.head(0, 0)[2].tolist() == [0, 1, 2, 3, 4, 5, 7]  # (6,7): 10/e^5 < 2/e^1
    weak = kvframe.compress(build(7, **{"selector.gamma": 1e9}), keys, values, stats=stats)
    assert weak.head(0, 0)[2].tolist() == [0, 1, 3, 4, 5, 6, 7]  # no penalty: (2,3) has the least mass


def test_count_factor_protects_pairs_with_large_counts():
    t, d = 6, 4
    keys, values = torch.randn(1, 2, t, d), torch.randn(1, 2, t, d)
    window = torch.tensor([1.0, 1.0, 0.3, 0.3, 1.0, 1.0]).expand(1, 2, t)
    counts = torch.tensor([1.0, 1.0, 4.0, 4.0, 1.0, 1.0]).expand(1, 2, t)
    stats = {"window_attn": window, "grad": torch.randn(1, 2, t, d)}
    kw = {"selector.gamma": 1e9, "value_merge.clamp": None}
    on = kvframe.compress(build(5, 0, **kw), keys, values, log_weights=counts.log(), stats=stats)
    # per pair, summed over the 2 heads: (0,1) and (4,5): mass 4 x counts 4 = 16 < (2,3): 1.2 x 16 = 19.2;
    # the tie between (0,1) and (4,5) goes to the more recent pair through the (tiny) position penalty
    assert on.head(0, 0)[2].tolist() == [0, 1, 2, 3, 5]
    off = kvframe.compress(build(5, 0, **kw, **{"selector.count_factor": False}), keys, values, log_weights=counts.log(), stats=stats)
    assert off.head(0, 0)[2].tolist() == [0, 1, 3, 4, 5]  # mass only: (2,3) = 0.6 is the smallest


# --------------------------------------------------------------------------- RoPE
def test_rope_identical_pre_rope_keys_merge_to_the_key_at_the_later_position():
    d = 8
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    rope = Rotary.from_frequencies(inv_freq)
    torch.manual_seed(9)
    t = 6
    pre = torch.randn(1, 1, t, d)
    pre[0, 0, 4] = pre[0, 0, 3]
    positions = torch.tensor([0, 1, 2, 10, 17, 20])
    stored = rope.rotate(pre, positions.expand(1, 1, t))
    window = torch.ones(1, 1, t)
    window[0, 0, 3:5] = 0.0
    for card, extra in (("asymkv", {"grad": torch.randn(1, 1, t, d)}), ("kvslimmer", {})):
        comp = kvframe.build(card, budget=t - 1, **{"selector.n_sink": 2, "key_merge.n_sink": 2} if card == "kvslimmer" else {"selector.n_sink": 2})
        state = SlotState.from_tensors(stored, torch.randn(1, 1, t, d), positions=positions).with_stats(window_attn=window, **extra)
        out = comp.compress(state, CompressionContext(rope=rope))
        assert out.positions[0, 0].tolist() == [0, 1, 2, 17, 20]
        expect = rope.rotate(pre[0, 0, 3], torch.tensor(17))
        assert torch.allclose(out.keys[0, 0, 3], expect, atol=1e-5), card
        assert torch.equal(out.keys[0, 0, [0, 1, 2, 4]], stored[0, 0, [0, 1, 2, 5]])


def test_rope_fisher_merges_in_pre_rope_space():
    d = 8
    rope = Rotary.from_frequencies(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    torch.manual_seed(10)
    t = 6
    pre = torch.randn(1, 1, t, d)
    positions = torch.tensor([0, 1, 2, 10, 17, 20])
    grad = torch.randn(1, 1, t, d)
    window = torch.ones(1, 1, t)
    window[0, 0, 3:5] = 0.0
    state = SlotState.from_tensors(rope.rotate(pre, positions.expand(1, 1, t)), torch.randn(1, 1, t, d), positions=positions)
    out = build(t - 1).compress(state.with_stats(window_attn=window, grad=grad), CompressionContext(rope=rope))
    merged_pre = fisher_merge(pre[0, 0, 3:5], grad[0, 0, 3:5])
    assert torch.allclose(rope.unrotate(out.keys[0, 0, 3], torch.tensor(17)), merged_pre, atol=1e-5)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "override, field",
    [
        ({"selector.n_sink": -1}, "n_sink"),
        ({"selector.gamma": 0}, "gamma"),
        ({"selector.overlap": "greedy"}, "overlap"),
        ({"selector.count_factor": "yes"}, "count_factor"),
        ({"value_merge.clamp": 0.5}, "clamp"),
        ({"key_merge.eps": -1.0}, "eps"),
    ],
)
def test_bad_hyperparameters_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        kvframe.build("asymkv", **override)


def test_fisher_needs_a_backward_scoring_pass():
    with pytest.raises(ConfigError, match="grad"):
        kvframe.build("asymkv", **{"trigger.scoring_pass": "forward"})
    with pytest.raises(ConfigError, match="backward"):
        kvframe.build("asymkv", trigger="after_prefill")


def test_runtime_errors_are_clear():
    t, d = 8, 4
    keys, values = torch.randn(1, 2, t, d), torch.randn(1, 2, t, d)
    with pytest.raises(ConfigError, match="window_attn"):
        kvframe.compress(build(6), keys, values, stats={"grad": torch.randn(1, 2, t, d)})
    stats = {"window_attn": torch.rand(1, 2, t), "grad": torch.randn(1, 2, t, d)}
    with pytest.raises(ConfigError, match="minimum budget 3"):
        kvframe.compress(build(2), keys, values, stats=stats)  # 2 sinks + at least one merged slot
    valid = torch.ones(1, 2, t, dtype=torch.bool)
    valid[0, 1, 0] = False
    with pytest.raises(ConfigError, match="same number"):
        kvframe.compress(build(6), keys, values, valid=valid, stats=stats)
