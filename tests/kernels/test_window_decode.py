"""Kernels ``kvframe::window_scores`` and ``kvframe::slot_decode_attention``.

The Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set in conftest before
triton is imported) on tiny shapes, and must match the torch references; the default backend on CPU
must be the torch reference itself; both ops pass ``torch.library.opcheck`` and compile without a
graph break.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvframe.errors import ConfigError
from kvframe.kernels import kernel_backend
from kvframe.kernels.decode import slot_attention_reference, slot_decode_attention, slot_decode_attention_op
from kvframe.kernels.window import window_scores, window_scores_op, window_scores_reference

pytest.importorskip("triton")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("KVFRAME_KERNELS", raising=False)


def _slots(b: int, h: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compressed-cache-like slots: increasing positions with gaps, ragged heads (different valid
    counts, padding at the end), a few invalid slots inside, nonzero log-weights."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(1, 4, (b, h, t), generator=g)
    positions = gaps.cumsum(-1) - 1
    valid = torch.ones(b, h, t, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            n = t - (3 * hi + 5 * bi) % max(1, t // 2)  # ragged: every head keeps a different count
            valid[bi, hi, n:] = False
    valid[0, 0, 2] = False
    positions = torch.where(valid, positions, -1)
    log_weights = torch.rand(b, h, t, generator=g) * math.log(3.0)
    log_weights = torch.where(valid, log_weights, 0.0)
    return positions, valid, log_weights


def _last_pos(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, positions, -1).amax(dim=(1, 2))  # [B]


# --------------------------------------------------------------------------- window_scores


def _window_inputs(b, hq, h, w, t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, hq, w, d, generator=g).to(dtype)
    keys = torch.randn(b, h, t, d, generator=g).to(dtype)
    positions, valid, log_weights = _slots(b, h, t, seed)
    last = _last_pos(positions, valid)
    qpos = last[:, None] - torch.arange(w - 1, -1, -1)[None, :]  # the window ends at the last slot
    qvalid = torch.ones(b, w, dtype=torch.bool)
    qvalid[-1, 0] = False  # a padding query
    qpos[-1, 1] = -5  # a real query that sees no slot at all
    return queries, keys, log_weights, positions, valid, qpos, qvalid


@pytest.mark.parametrize("heads", [(4, 2), (3, 1)], ids=["gqa4-2", "gqa3-1"])
@pytest.mark.parametrize("t", [37, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 9], ids=["nowin", "win9"])
def test_window_scores_triton_matches_torch(heads, t, dtype, window):
    hq, h = heads
    args = _window_inputs(2, hq, h, 5, t, 24, dtype, seed=t)
    ref = window_scores(*args, scaling=None, sliding_window=window)
    with kernel_backend("triton"):
        out = window_scores(*args, scaling=None, sliding_window=window)
    assert out.shape == (2, h, t) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL[torch.float32])  # both accumulate in fp32 from the same inputs
    if window is None:
        # the query that sees nothing and the padding query contribute nothing: per head, the
        # scores sum to (queries that see a slot) / (valid queries)
        assert ref[0].sum(-1).allclose(torch.ones(h), atol=1e-5)
        assert ref[1].sum(-1).allclose(torch.full((h,), 3 / 4), atol=1e-5)


def test_window_scores_triton_no_positions_and_scaling():
    q, k, lw, pos, valid, _, _ = _window_inputs(1, 4, 2, 3, 37, 16, torch.float32, seed=3)
    ref = window_scores(q, k, lw, pos, valid, scaling=0.3)
    with kernel_backend("triton"):
        out = window_scores(q, k, lw, pos, valid, scaling=0.3)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_window_scores_reference_is_former_attention_rows():
    """SnapKV's former computation (attention_rows, summed and averaged) is the op's reference."""
    from kvframe.policies.base import CompressionContext
    from kvframe.slots import SlotState
    from tests.kernels.reference import attention_rows

    q, k, lw, pos, valid, qpos, qvalid = _window_inputs(2, 4, 2, 6, 37, 16, torch.float32, seed=5)
    state = SlotState.from_tensors(k, k.clone(), positions=pos, log_weights=lw, valid=valid)
    ctx = CompressionContext(queries=q, query_positions=qpos, query_valid=qvalid, sliding_window=11)
    rows = attention_rows(ctx, state, 4)
    former = rows.sum(dim=3).mean(dim=2) / qvalid[:, -4:].sum(-1).clamp(min=1).float()[:, None, None]
    assert torch.equal(ctx.window_scores(state, 4), former)


def test_window_scores_reference_chunking(monkeypatch):
    from kvframe.kernels import window as window_mod

    args = _window_inputs(2, 4, 2, 7, 37, 16, torch.float32, seed=6)
    whole = window_scores(*args, sliding_window=10)
    monkeypatch.setattr(window_mod, "REFERENCE_CHUNK_ELEMENTS", 2 * 2 * 37)  # one window query at a time
    torch.testing.assert_close(window_scores(*args, sliding_window=10), whole, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- slot_decode_attention


def _decode_inputs(b, hq, h, q, s, d, dv, dtype, seed=0, per_head_qpos=False):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, hq, q, d, generator=g).to(dtype)
    keys = torch.randn(b, h, s, d, generator=g).to(dtype)
    values = torch.randn(b, h, s, dv, generator=g).to(dtype)
    positions, valid, log_weights = _slots(b, h, s, seed)
    last = _last_pos(positions, valid)
    qpos = last[:, None] + 1 - torch.arange(q - 1, -1, -1)[None, :]  # [B, q]
    qpos[-1, -1] = -3  # a row with no visible slot (a padding query): attends to every slot
    if per_head_qpos:
        qpos = qpos[:, None, :] - torch.arange(h)[None, :, None]  # [B, H, q]
    return query, keys, values, log_weights, positions, valid, qpos


@pytest.mark.parametrize("heads", [(4, 2), (3, 1)], ids=["gqa4-2", "gqa3-1"])
@pytest.mark.parametrize("s", [37, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 20], ids=["nowin", "win20"])
def test_decode_triton_matches_torch(heads, s, dtype, window):
    hq, h = heads
    args = _decode_inputs(2, hq, h, 1, s, 16, 24, dtype, seed=s)
    ref = slot_decode_attention(*args, sliding_window=window)
    with kernel_backend("triton"):
        out = slot_decode_attention(*args, sliding_window=window)
    assert out.shape == (2, hq, 1, 24) and out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_triton_splits_and_small_q(splits, dtype):
    """Flash-decoding splits of S (merged by log-sum-exp), 2 queries with per-KV-head positions,
    a head whose last split holds only padding (no visible slot there), a scale given."""
    from kvframe.kernels._triton_decode import slot_decode_attention_triton

    args = _decode_inputs(2, 4, 2, 2, 70, 16, 16, dtype, seed=11, per_head_qpos=True)
    args[5][1, 1, 20:] = False  # row 1, head 1: slots 20.. are padding, so split 3 sees nothing
    ref = slot_attention_reference(*args, 0.2, 25)
    out = slot_decode_attention_triton(*args, 0.2, 25, num_splits=splits, block_s=16)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_decode_triton_shared_head_masks():
    """positions / valid / log-weights given once for all heads ([B, 1, S])."""
    q, k, v, lw, pos, valid, qpos = _decode_inputs(2, 4, 2, 1, 37, 16, 16, torch.float32, seed=2)
    shared = (lw[:, :1] * 0, pos[:, :1], valid[:, :1])
    ref = slot_decode_attention(q, k, v, *shared, qpos)
    with kernel_backend("triton"):
        out = slot_decode_attention(q, k, v, *shared, qpos)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


# --------------------------------------------------------------------------- dispatch, opcheck, compile


def _raise(*a, **k):
    raise AssertionError("the Triton launcher ran on CPU under the default backend")


def test_default_backend_on_cpu_is_the_torch_reference(monkeypatch):
    from kvframe.kernels import _triton_decode, _triton_window

    monkeypatch.setattr(_triton_window, "window_scores_triton", _raise)
    monkeypatch.setattr(_triton_decode, "slot_decode_attention_triton", _raise)
    wargs = _window_inputs(2, 4, 2, 5, 37, 16, torch.float32)
    assert torch.equal(window_scores(*wargs, scaling=0.25, sliding_window=9), window_scores_reference(*wargs, 0.25, 9))
    dargs = _decode_inputs(2, 4, 2, 1, 37, 16, 16, torch.float32)
    assert torch.equal(slot_decode_attention(*dargs, sliding_window=20), slot_attention_reference(*dargs, None, 20))
    with kernel_backend("torch"):
        window_scores(*wargs)
        slot_decode_attention(*dargs)
    with kernel_backend("triton"):  # the same calls do reach the launchers under backend "triton"
        with pytest.raises(AssertionError, match="launcher ran"):
            window_scores(*wargs)
        with pytest.raises(AssertionError, match="launcher ran"):
            slot_decode_attention(*dargs)


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    wargs = _window_inputs(1, 4, 2, 3, 37, 16, torch.float32)
    dargs = _decode_inputs(1, 4, 2, 1, 37, 16, 16, torch.float32)
    with kernel_backend("triton"):
        with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
            window_scores(*wargs)
        with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
            slot_decode_attention(*dargs)


def test_opcheck_window_scores():
    q, k, lw, pos, valid, qpos, qvalid = _window_inputs(2, 4, 2, 3, 19, 16, torch.float32)
    torch.library.opcheck(window_scores_op, (q, k, lw, pos, valid, qpos, qvalid, 0.25, 7))
    torch.library.opcheck(window_scores_op, (q, k, lw, pos, valid, qpos, qvalid, 0.25, None))


def test_opcheck_slot_decode_attention():
    args = _decode_inputs(2, 4, 2, 1, 19, 16, 8, torch.float32)
    torch.library.opcheck(slot_decode_attention_op, (*args, None, 7))
    torch.library.opcheck(slot_decode_attention_op, (*args, 0.3, None))


def test_opcheck_under_triton_backend():
    """The Triton path also satisfies the op's contract (schema, fake tensors, aot dispatch)."""
    wargs = _window_inputs(1, 2, 1, 2, 19, 16, torch.float32)
    dargs = _decode_inputs(1, 2, 1, 1, 19, 16, 16, torch.float32)
    with kernel_backend("triton"):
        torch.library.opcheck(window_scores_op, (*wargs, 0.25, None))
        torch.library.opcheck(slot_decode_attention_op, (*dargs, None, None))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_ops_compile_fullgraph(backend):
    torch._dynamo.reset()
    wargs = _window_inputs(2, 4, 2, 3, 37, 16, torch.float32)
    dargs = _decode_inputs(2, 4, 2, 1, 37, 16, 16, torch.float32)

    def fw(*a):
        return window_scores(*a, sliding_window=9) * 2.0

    def fd(*a):
        return slot_decode_attention(*a, sliding_window=20) + 1.0

    with kernel_backend(backend):
        cw = torch.compile(fw, fullgraph=True, backend="aot_eager")
        cd = torch.compile(fd, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(cw(*wargs), fw(*wargs), atol=0, rtol=0)
        torch.testing.assert_close(cd(*dargs), fd(*dargs), atol=0, rtol=0)


# --------------------------------------------------------------------------- wiring


def test_snapkv_and_tova_score_alike_on_both_backends():
    from kvframe.policies.base import CompressionContext
    from kvframe.policies.score_snapkv import SnapKVScorer
    from kvframe.policies.score_tova import TOVAScorer
    from kvframe.slots import SlotState

    q, k, lw, pos, valid, qpos, qvalid = _window_inputs(2, 4, 2, 6, 37, 16, torch.float32, seed=9)
    state = SlotState.from_tensors(k, k.clone(), positions=pos, log_weights=lw, valid=valid)
    for scorer in (SnapKVScorer(window=4, kernel=5), SnapKVScorer(window=4, kernel=3, pool="max"), TOVAScorer()):
        ref = scorer.score(state, CompressionContext(queries=q, query_positions=qpos, query_valid=qvalid, sliding_window=12))
        with kernel_backend("triton"):
            out = scorer.score(state, CompressionContext(queries=q, query_positions=qpos, query_valid=qvalid, sliding_window=12))
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_attend_decode_goes_through_the_op(monkeypatch):
    from kvframe import attention
    from kvframe.kernels import _triton_decode
    from kvframe.slots import SlotState

    q, k, v, lw, pos, valid, qpos = _decode_inputs(2, 4, 2, 1, 37, 16, 16, torch.float32, seed=4)
    state = SlotState.from_tensors(k, v, positions=pos, log_weights=lw, valid=valid)
    ref = attention._attend(q, state, qpos, None, 20, heads_uniform=False)
    calls = []
    launcher = _triton_decode.slot_decode_attention_triton
    monkeypatch.setattr(_triton_decode, "slot_decode_attention_triton", lambda *a, **kw: calls.append(1) or launcher(*a, **kw))
    with kernel_backend("triton"):
        out = attention._attend(q, state, qpos, None, 20, heads_uniform=False)
        # more queries than DECODE_MAX_QUERIES, or a pass that needs gradients: torch SDPA
        qn = torch.randn(2, 4, attention.DECODE_MAX_QUERIES + 1, 16)
        attention._attend(qn, state, torch.arange(50, 55).expand(2, -1), None, None, heads_uniform=False)
        with torch.enable_grad():
            attention._attend(q.clone().requires_grad_(True), state, qpos, None, None, heads_uniform=False)
    assert calls == [1]
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
