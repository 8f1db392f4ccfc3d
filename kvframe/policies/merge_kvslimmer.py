"""KVSlimmer key merge: a gradient-free closed form with the off-diagonal Hessian coupling.

KVSlimmer (arXiv 2603.00907); the defaults follow the released code ``lianjunl13-sudo/KVSlimmer``
(``pred.py``: proxy and smoothing; ``kvslimmer/cache.py``, ``kvslimmer/merge.py``: the merge).
Derivation, defaults and where kvframe departs from the code: ``docs/methods.md#kvslimmer``.
Per layer and KV head:

**Proxy** (in :meth:`KVSlimmerKeyMerge.observe`, every time the trigger fires):
``alpha_j = m_j / sum_i m_i`` over the middle slots (valid rank ``>= n_sink``; ``m`` = the
framework's count-weighted window attention ``window_attn``; the code's mean over the query heads of
a group is our sum divided by ``G`` and cancels in the normalisation); ``o = sum_j alpha_j V_j``
with ``V`` the *summed* value of each slot (stored mean value times count, as the code does);
``d_j = ||V_j - o||_1`` (``norm: l2``: Euclidean); ``h_j = alpha_j (1 - 2 alpha_j) d_j``; sinks 0.
**Smoothing**: slots that already held a proxy after the previous firing
(statistic ``hproxy_set``) get ``h = h_new / delta + (1 - 1/delta) h_old`` with ``delta`` the
window index (``ctx.step + 1``); newer slots take ``h_new``.

**Merge**: ``alpha`` as above, ``d^_j = h_j / (alpha_j (1 - 2 alpha_j) + 1e-21)``,
coupling between consecutive members of a group ``h_il = alpha_i alpha_l (d^_i + d^_l)``
(``exact_c12``: ``||alpha_i alpha_l (V_i + V_l - 2 o)||`` in the chosen norm, the paper's form).
Member weights ``A_i = h_i - sum_{partners l} h_il`` and ``k = sum_i A_i k_i / (sum_i A_i + 1e-21)``.
For a pair this is the code's ``A = h_j - h12, B = h_{j+1} - h12``; for any group it is the exact
minimiser of ``1/2 sum_i h_i ||k - k_i||^2 - sum_{consecutive (i,l)} h_il (k - k_i).(k - k_l)``, so
the merge also composes with selectors that fold more than two slots. ``power: 2`` squares every
term (``h_i^2``, ``h_il^2``), the paper's Eq. (33) as transcribed in a public review. Keys are
merged before RoPE with one scalar weight per slot and head, and re-rotated at the merged slot's
position. The merged slot's proxy is ``sum_i a_i^2 h_i`` (``a_i = A_i / sum A``).

**Guard** (``guard: true``, kvframe's addition; the code has none): where ``sum_i A_i <= 1e-21``
or a weight falls outside ``[0, 1]`` the coupling is dropped, ``a_i = h_i^p / sum_l h_l^p`` (for
pairs and ``power: 1``: ``a = h_j / (h_j + h_{j+1})``), and if that is degenerate too, the plain
average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import Tensor

from kvframe.errors import ConfigError
from kvframe.policies.base import CompressionContext, KeyMerge, MergedKeys, Selection
from kvframe.policies.contracts import Ge, Note
from kvframe.policies.groups import group_sum, valid_rank
from kvframe.policies.prerope import finish_keys, group_assign, group_counts, pre_rope_keys
from kvframe.registry import register
from kvframe.slots import SlotState

EPS = 1e-21
Norm = Literal["l1_code", "l2"]


# --------------------------------------------------------------------------- paper math: d^2 o / d s^2
def softmax_output_c11(alpha: Tensor, values: Tensor, m: int) -> Tensor:
    """``d^2 o / d s_m^2 = alpha_m (1 - 2 alpha_m) (v_m - o)`` for ``o = softmax(s)^T V``
    (``alpha`` ``[T]``, ``values`` ``[T, D]``)."""
    o = alpha @ values
    return alpha[m] * (1 - 2 * alpha[m]) * (values[m] - o)


def softmax_output_c12(alpha: Tensor, values: Tensor, m: int, n: int | None = None) -> Tensor:
    """``d^2 o / d s_m d s_n = -alpha_m alpha_n (v_m + v_n - 2 o)`` (``n = m + 1`` by default)."""
    n = m + 1 if n is None else n
    o = alpha @ values
    return -alpha[m] * alpha[n] * (values[m] + values[n] - 2 * o)


def vector_norm(x: Tensor, norm: Norm) -> Tensor:
    """L1 (the code's deviation norm) or L2 norm over the last dimension."""
    return x.abs().sum(-1) if norm == "l1_code" else x.norm(dim=-1)


def pair_weights(h_j: Tensor, h_k: Tensor, h12: Tensor, power: int = 1) -> tuple[Tensor, Tensor]:
    """The code's closed form for one pair: ``(a, b)`` with ``k = a k_j + b k_{j+1}``.

    ``A = h_j^p - h12^p``, ``B = h_{j+1}^p - h12^p``, ``a = A / (A + B + 1e-21)``. Minimiser of
    ``1/2 h_j ||k - k_j||^2 - h12 (k - k_j).(k - k_{j+1}) + 1/2 h_{j+1} ||k - k_{j+1}||^2`` (``p = 1``).
    """
    a = h_j**power - h12**power
    b = h_k**power - h12**power
    d = a + b + EPS
    return a / d, b / d


# --------------------------------------------------------------------------- proxy (the code's pred.py)
def attention_share(state: SlotState, n_sink: int) -> Tensor:
    """``[B, H, T]`` ``alpha_j``: window attention normalised over the middle slots (0 elsewhere)."""
    mass = state.stats.get("window_attn")
    if mass is None:
        raise ConfigError(
            "key_merge 'kvslimmer' needs the slot statistic 'window_attn' (attention of the scoring pass); use it "
            "inside kvframe.attach with a per_chunk trigger, or pass stats={'window_attn': ...} to kvframe.compress"
        )
    rank, _ = valid_rank(state.valid)
    middle = state.valid & (rank >= n_sink)
    a = torch.where(middle, mass.float(), 0.0)
    return a / (a.sum(-1, keepdim=True) + EPS)


def summed_values(state: SlotState) -> Tensor:
    """``[B, H, T, D]`` float32 summed values ``V_j = l_j * mean value`` (invalid slots 0)."""
    count = torch.where(state.valid, state.log_weights.float().exp(), 0.0)
    return state.values.float() * count[..., None]


def hessian_proxy(state: SlotState, n_sink: int, norm: Norm = "l1_code") -> tuple[Tensor, Tensor, Tensor]:
    """``(alpha, h, o)``: attention share, fresh proxy ``h_j = alpha_j (1 - 2 alpha_j) ||V_j - o||``
    (``[B, H, T]``, 0 for sinks and padding) and the aggregated output ``o`` ``[B, H, D]``."""
    alpha = attention_share(state, n_sink)
    v = summed_values(state)
    o = torch.einsum("bht,bhtd->bhd", alpha, v)
    d = vector_norm(v - o[:, :, None, :], norm)
    h = torch.where(alpha > 0, alpha * (1 - 2 * alpha) * d, 0.0)
    return alpha, h, o


@register("key_merge", "kvslimmer")
@dataclass
class KVSlimmerKeyMerge(KeyMerge):
    needs_rope: ClassVar[bool] = True
    stats: ClassVar[tuple[str, ...]] = ("window_attn",)
    provides: ClassVar[tuple[str, ...]] = ("hproxy", "hproxy_set")

    n_sink: Annotated[int, Ge(0), Note("sink slots, proxy 0")] = 32
    norm: Norm = "l1_code"
    power: Annotated[Literal[1, 2], Note("1: first powers, the code; 2: squared, Eq. 33 as transcribed")] = 1
    exact_c12: bool = False
    guard: bool = True
    smoothing: bool = True

    # ------------------------------------------------------------------------------------
    def observe(self, state: SlotState, ctx: CompressionContext) -> SlotState:
        _, h_new, _ = hessian_proxy(state, self.n_sink, self.norm)
        h = h_new
        old, was_set = state.stats.get("hproxy"), state.stats.get("hproxy_set")
        if self.smoothing and old is not None and was_set is not None:
            delta = float(ctx.step + 1)
            smoothed = h_new / delta + (1.0 - 1.0 / delta) * old.float()
            h = torch.where((was_set > 0.5) & state.valid, smoothed, h_new)
        return state.with_stats(hproxy=h, hproxy_set=state.valid.float())

    def merge(self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext) -> MergedKeys:
        alpha, h_fresh, o = hessian_proxy(state, self.n_sink, self.norm)
        h = state.stats["hproxy"].float() if "hproxy" in state.stats else h_fresh
        h = torch.where(state.valid, h, 0.0)
        h_kept = torch.where(kept.valid, h.gather(-1, selection.keep), 0.0)
        done = {"hproxy": h_kept, "hproxy_set": kept.valid.float()}
        if selection.assign is None:
            return MergedKeys(kept.keys, done)
        s, t = kept.num_slots, state.num_slots
        assign = group_assign(selection, state)
        member = assign >= 0
        size = group_counts(assign, s)
        multi = size >= 2

        # consecutive members of every group: neighbours after sorting slots by (group, position)
        ar = torch.arange(t, device=assign.device)
        order = torch.where(member, assign * t + ar, s * t + ar).argsort(dim=-1)
        grp = assign.gather(-1, order)
        linked = (grp[..., :-1] == grp[..., 1:]) & (grp[..., :-1] >= 0)
        left, right = order[..., :-1], order[..., 1:]
        a_l, a_r = alpha.gather(-1, left), alpha.gather(-1, right)
        if self.exact_c12:
            v = summed_values(state)
            d4 = v.shape[-1]
            vl = v.gather(2, left[..., None].expand(-1, -1, -1, d4))
            vr = v.gather(2, right[..., None].expand(-1, -1, -1, d4))
            h12 = vector_norm((a_l * a_r)[..., None] * (vl + vr - 2 * o[:, :, None, :]), self.norm)
        else:
            dhat = h / (alpha * (1 - 2 * alpha) + EPS)
            h12 = a_l * a_r * (dhat.gather(-1, left) + dhat.gather(-1, right))
        h12 = torch.where(linked, h12, 0.0) ** self.power
        coupling = torch.zeros_like(h).scatter_add_(-1, left, h12).scatter_add_(-1, right, h12)
        hp = h**self.power
        weight_raw = torch.where(member, hp - coupling, 0.0)
        total = group_sum(weight_raw, assign, s)
        idx = assign.clamp(min=0)
        w = torch.where(member, weight_raw / (total.gather(-1, idx) + EPS), 0.0)
        if self.guard:
            w = self._guarded(w, total, hp, member, assign, idx, size)
        pre = pre_rope_keys(state, ctx)
        merged = group_sum(w[..., None] * pre, assign, s)
        keys = finish_keys(merged, multi, kept, ctx)
        h_new = group_sum(w**2 * h, assign, s)
        done["hproxy"] = torch.where(multi & kept.valid, h_new, h_kept)
        return MergedKeys(keys, done)

    @staticmethod
    def _guarded(w: Tensor, total: Tensor, hp: Tensor, member: Tensor, assign: Tensor, idx: Tensor, size: Tensor) -> Tensor:
        """The convexity guard: non-convex groups fall back to ``h^p`` weights, then to the average."""
        s = total.shape[-1]
        out_of_range = member & ((w < 0) | (w > 1))
        bad = (total <= EPS) | (group_sum(out_of_range.long(), assign, s) > 0)
        diag_total = group_sum(torch.where(member, hp, 0.0), assign, s)
        diag = torch.where(member, hp / (diag_total.gather(-1, idx) + EPS), 0.0)
        diag_bad = (diag_total <= EPS) | (group_sum((member & ((diag < 0) | (diag > 1))).long(), assign, s) > 0)
        uniform = torch.where(member, 1.0 / size.clamp(min=1).gather(-1, idx).float(), 0.0)
        fallback = torch.where(diag_bad.gather(-1, idx), uniform, diag)
        return torch.where(bad.gather(-1, idx) & member, fallback, w)
