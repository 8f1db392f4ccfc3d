"""Kernel ``kvframe::slot_decode_attention_packed`` (decode attention over a packed slot layout).

The Triton kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set in conftest before
triton is imported) on tiny shapes and must match the torch reference; the torch reference must
match a plain per-row computation of the contract and the dense op on the padded layout; free
capacity between segments holds NaN (and slots that would be visible) and must never reach the
output; the op passes ``torch.library.opcheck`` and compiles without a graph break.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvframe.errors import ConfigError
from kvframe.kernels import kernel_backend
from kvframe.kernels.decode import slot_decode_attention
from kvframe.kernels.packed import (
    pack_dense,
    slot_attention_packed_reference,
    slot_decode_attention_packed,
    slot_decode_attention_packed_op,
    unpack,
)

pytest.importorskip("triton")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

#: per (row, KV head) segment lengths: an empty head, a one-slot head, heads spanning several blocks
LENGTHS = [[23, 0], [1, 41]]


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("KVFRAME_KERNELS", raising=False)


def _packed_inputs(hq, h, q, d, dv, dtype, seed=0, per_head_qpos=False, gap_fill=float("nan")):
    """A packed layer of ``B = 2`` rows with :data:`LENGTHS` (``h = 2``): segments stored out of
    row-major order with free entries between them (keys, values and log-weights ``gap_fill``,
    positions 0 and valid ``True``, so a kernel reading them would see them), increasing positions
    with gaps, a few invalid slots inside segments, nonzero log-weights; the last row's last query
    sees no slot (qpos -3)."""
    assert h == 2
    g = torch.Generator().manual_seed(seed)
    b = 2
    length = torch.tensor(LENGTHS)
    order = [(1, 1), (0, 0), (1, 0), (0, 1)]  # storage order of the heads
    gaps = torch.randint(0, 5, (b * h,), generator=g)
    start = torch.zeros(b, h, dtype=torch.long)
    n = 3  # free entries before the first segment
    for (bi, hi), gap in zip(order, gaps.tolist()):
        start[bi, hi] = n
        n += int(length[bi, hi]) + gap
    keys = torch.full((n, d), gap_fill)
    values = torch.full((n, dv), gap_fill)
    log_weights = torch.full((n,), gap_fill)
    positions = torch.zeros(n, dtype=torch.long)
    valid = torch.ones(n, dtype=torch.bool)
    last = torch.zeros(b, dtype=torch.long)  # the row's last position over all its heads
    for bi in range(b):
        for hi in range(h):
            ln, st = int(length[bi, hi]), int(start[bi, hi])
            seg = slice(st, st + ln)
            keys[seg] = torch.randn(ln, d, generator=g)
            values[seg] = torch.randn(ln, dv, generator=g)
            log_weights[seg] = torch.rand(ln, generator=g) * math.log(3.0)
            positions[seg] = torch.randint(1, 4, (ln,), generator=g).cumsum(0) - 1
            last[bi] = max(int(last[bi]), int(positions[seg].max()) if ln else 0)
            if ln > 5:
                valid[st + 2] = False  # invalid slots inside the segment
                valid[st + ln - 2] = False
    qpos = last[:, None] + 1 - torch.arange(q - 1, -1, -1)[None, :]  # [B, q]
    qpos[-1, -1] = -3  # a row with no visible slot: attends to every slot of its head
    if per_head_qpos:
        qpos = qpos[:, None, :] - 2 * torch.arange(h)[None, :, None]  # [B, H, q]
    query = torch.randn(b, hq, q, d, generator=g).to(dtype)
    return query, keys.to(dtype), values.to(dtype), log_weights, positions, valid, start, length, qpos


def _naive(query, keys, values, log_weights, positions, valid, start, length, qpos, scaling, window):
    """The contract, row by row, in float64."""
    b, hq, q, d = query.shape
    h = start.shape[1]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(b, hq, q, values.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for j in range(hq):
            hi = j // (hq // h)
            st, ln = int(start[bi, hi]), int(length[bi, hi])
            if ln == 0:
                continue
            k, v = keys[st : st + ln].double(), values[st : st + ln].double()
            lw, pos, ok = log_weights[st : st + ln].double(), positions[st : st + ln], valid[st : st + ln]
            for i in range(q):
                qp = int(qpos[bi, i] if qpos.dim() == 2 else qpos[bi, hi, i])
                vis = ok & (pos <= qp)
                if window is not None:
                    vis = vis & (qp - pos < window)
                if not vis.any():
                    vis = torch.ones_like(vis)
                logits = scale * (k @ query[bi, j, i].double()) + lw
                p = torch.softmax(torch.where(vis, logits, float("-inf")), dim=0)
                out[bi, j, i] = p @ v
    return out


def _empty_heads(length, hq):
    return (length == 0).repeat_interleave(hq // length.shape[1], dim=1)  # [B, H_q]


# --------------------------------------------------------------------------- torch reference


@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["gqa1", "gqa3"])
@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("window", [None, 10], ids=["nowin", "win10"])
@pytest.mark.parametrize("per_head_qpos", [False, True], ids=["qpos", "qpos-per-head"])
def test_packed_reference_matches_naive(heads, q, window, per_head_qpos):
    hq, h = heads
    args = _packed_inputs(hq, h, q, 16, 12, torch.float32, seed=q + hq, per_head_qpos=per_head_qpos)
    out = slot_decode_attention_packed(*args, sliding_window=window)  # CPU, default backend: the reference
    assert out.shape == (2, hq, q, 12) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out[_empty_heads(args[7], hq)] == 0).all()
    torch.testing.assert_close(out.double(), _naive(*args, None, window), atol=1e-5, rtol=1e-5)


def test_packed_reference_is_dense_op_on_padded_layout():
    """unpack gives the padded dense equivalent, on which the dense op is the packed reference
    (bit for bit); on the original dense state the dense op agrees wherever a row sees a slot."""
    g = torch.Generator().manual_seed(7)
    b, hq, h, s, d = 2, 6, 2, 30, 16
    keys, values = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)
    positions = torch.arange(s).expand(b, h, s).clone()
    log_weights = torch.rand(b, h, s, generator=g)
    valid = torch.rand(b, h, s, generator=g) > 0.4
    valid[0, 1] = False  # an empty head
    valid[1, 0] = False
    valid[1, 0, 4] = True  # a one-slot head
    query = torch.randn(b, hq, 2, d, generator=g)
    qpos = torch.tensor([[12, 29], [3, -1]])  # row 1's last query sees nothing
    packed = pack_dense(keys, values, log_weights, positions, valid, capacity_extra=3, gap_fill=float("nan"))
    assert packed[6].tolist() == valid.sum(-1).tolist()
    cap = (packed[6] + 3).flatten().tolist()  # row-major segments, 3 free entries after each
    assert packed[5].flatten().tolist() == [sum(cap[:i]) for i in range(b * h)] and packed[0].shape[0] == sum(cap)
    for window in (None, 8):
        ref = slot_attention_packed_reference(query, *packed, qpos, None, window)
        assert torch.isfinite(ref).all() and (ref[_empty_heads(packed[6], hq)] == 0).all()
        padded = unpack(*packed)
        assert padded[0].shape == (b, h, int(packed[6].max()), d) and not padded[4][0, 1].any()
        assert torch.equal(slot_decode_attention(query, *padded, qpos, sliding_window=window), ref)
        dense = slot_decode_attention(query, keys, values, log_weights, positions, valid, qpos, sliding_window=window)
        vis = valid[:, :, None] & (positions[:, :, None] <= qpos[:, None, :, None])
        if window is not None:
            vis = vis & (qpos[:, None, :, None] - positions[:, :, None] < window)
        sees = vis.any(-1).repeat_interleave(hq // h, dim=1)  # [B, H_q, q]
        torch.testing.assert_close(ref[sees], dense[sees], atol=1e-6, rtol=1e-6)
    # unpack(pack_dense(state)) holds the valid slots first, in slot order
    k2, v2, lw2, pos2, ok2 = unpack(*packed, slots=s)
    for bi in range(b):
        for hi in range(h):
            n = int(valid[bi, hi].sum())
            assert torch.equal(k2[bi, hi, :n], keys[bi, hi][valid[bi, hi]]) and not ok2[bi, hi, n:].any()
            assert torch.equal(pos2[bi, hi, :n], positions[bi, hi][valid[bi, hi]])


# --------------------------------------------------------------------------- Triton parity


@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["gqa1", "gqa3"])
@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("window", [None, 10], ids=["nowin", "win10"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_triton_matches_torch(heads, q, window, dtype):
    hq, h = heads
    args = _packed_inputs(hq, h, q, 16, 24, dtype, seed=3 * q + hq, per_head_qpos=q == 2)
    ref = slot_decode_attention_packed(*args, sliding_window=window)
    with kernel_backend("triton"):
        out = slot_decode_attention_packed(*args, sliding_window=window)
    assert out.shape == (2, hq, q, 24) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out[_empty_heads(args[7], hq)] == 0).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_triton_splits(splits, dtype):
    """Splits of each head's segment (merged by log-sum-exp): with 16-slot blocks the 41-slot head
    spans three blocks, splits beyond a head's length are empty, the window leaves early splits
    with nothing visible; per-KV-head query positions, a scale given."""
    from kvframe.kernels._triton_packed_decode import slot_decode_attention_packed_triton

    args = _packed_inputs(6, 2, 2, 16, 16, dtype, seed=11, per_head_qpos=True)
    ref = slot_attention_packed_reference(*args, 0.2, 25)
    out = slot_decode_attention_packed_triton(*args, 0.2, 25, num_splits=splits, block_s=16)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(out.double(), _naive(*args, 0.2, 25), **TOL[dtype])


def test_gap_contents_never_reach_the_output():
    """The same layer with NaN, +inf or finite junk in its free entries gives bit-identical outputs."""
    outs = {"torch": [], "triton": []}
    for fill in (float("nan"), float("inf"), 1e4):
        args = _packed_inputs(6, 2, 2, 16, 8, torch.float32, seed=5, gap_fill=fill)
        for name in outs:
            with kernel_backend(name):
                outs[name].append(slot_decode_attention_packed(*args, sliding_window=12))
    for name, results in outs.items():
        assert torch.isfinite(results[0]).all()
        assert all(torch.equal(results[0], r) for r in results[1:]), name


def test_float64_runs_the_reference_under_triton_backend(monkeypatch):
    from kvframe.kernels import _triton_packed_decode

    monkeypatch.setattr(_triton_packed_decode, "slot_decode_attention_packed_triton", _raise)
    args = _packed_inputs(2, 2, 1, 8, 8, torch.float64, seed=1)
    with kernel_backend("triton"):
        out = slot_decode_attention_packed(*args)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _naive(*args, None, None), atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- validation


def _bad(args: tuple, **change) -> tuple:
    names = ("query", "keys", "values", "log_weights", "positions", "valid", "start", "length", "qpos")
    return tuple(change.get(n, a) for n, a in zip(names, args))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: dict(keys=a[1][None]), r"keys \[N, D\].*\(1, 79, 8\)"),
        (lambda a: dict(keys=a[1][:, :4]), r"keys \(79, 4\)"),
        (lambda a: dict(values=a[2][:-1]), r"values \(78, 8\)"),
        (lambda a: dict(values=a[2].double()), "float64"),
        (lambda a: dict(log_weights=a[3][:-1]), r"log_weights must be \[N\] = \[79\].*\(78,\)"),
        (lambda a: dict(positions=a[4].int()), r"positions must be int64.*int32"),
        (lambda a: dict(valid=a[5].to(torch.uint8)), r"valid must be bool.*uint8"),
        (lambda a: dict(start=a[6][:, :1].expand(2, 4).contiguous(), length=a[7].repeat(1, 2)), r"H dividing.*\(2, 4\)"),
        (lambda a: dict(length=a[7][:1]), r"\(2, 2\), \(1, 2\)"),
        (lambda a: dict(start=a[6].float()), r"start must be an integer.*float32"),
        (lambda a: dict(qpos=a[8][:, None, :].expand(2, 3, 1)), r"query positions must be.*\(2, 3, 1\)"),
    ],
)
def test_bad_shapes_raise(change, match):
    args = _packed_inputs(6, 2, 1, 8, 8, torch.float32, seed=0)
    assert args[1].shape == (79, 8)  # the layout the messages above name
    with pytest.raises(ConfigError, match=match):
        slot_decode_attention_packed(*_bad(args, **change(args)))


# --------------------------------------------------------------------------- dispatch, opcheck, compile


def _raise(*a, **k):
    raise AssertionError("the Triton launcher ran")


def test_default_backend_on_cpu_is_the_torch_reference(monkeypatch):
    from kvframe.kernels import _triton_packed_decode

    monkeypatch.setattr(_triton_packed_decode, "slot_decode_attention_packed_triton", _raise)
    args = _packed_inputs(6, 2, 1, 8, 8, torch.float32, seed=2)
    assert torch.equal(slot_decode_attention_packed(*args, sliding_window=9), slot_attention_packed_reference(*args, None, 9))
    with kernel_backend("triton"), pytest.raises(AssertionError, match="launcher ran"):
        slot_decode_attention_packed(*args)


def test_opcheck_slot_decode_attention_packed():
    args = _packed_inputs(6, 2, 2, 16, 8, torch.float32, seed=4, per_head_qpos=True)
    torch.library.opcheck(slot_decode_attention_packed_op, (*args, None, 7))
    torch.library.opcheck(slot_decode_attention_packed_op, (*args, 0.3, None))
    with kernel_backend("triton"):
        torch.library.opcheck(slot_decode_attention_packed_op, (*args, None, 7))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_packed_op_compiles_fullgraph(backend):
    torch._dynamo.reset()
    args = _packed_inputs(6, 2, 1, 16, 16, torch.float32, seed=6)

    def f(*a):
        return slot_decode_attention_packed(*a, sliding_window=20) + 1.0

    with kernel_backend(backend):
        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(cf(*args), f(*args), atol=0, rtol=0)
