"""Key re-rotation: a framework service for policies that move or merge rotated keys.

Hugging Face models cache keys *after* RoPE. RoPE at position ``p`` is a rotation ``R(p)`` (up to
a constant scale some RoPE variants apply to cos and sin), and ``R(a) R(b) = R(a + b)``, so a key
cached at position ``p`` is moved to ``p'`` by rotating it by ``p' - p``; ``unrotate(k, p)`` gives
the pre-RoPE key (times that constant), and ``rerotate`` composes both. The frequencies come from
the model's own rotary embedding module (per layer type where a model has several, e.g. Gemma3's
local and global layers). Supported convention: the ``rotate_half`` layout used by Llama, Qwen2,
Mistral, Gemma and most Hugging Face decoders, including partial rotary dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kvframe.errors import UnsupportedModelError

#: model types whose attention applies RoPE with the ``rotate_half`` convention.
ROTATE_HALF_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "olmo2", "granite", "smollm3"}
)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary:
    """Rotate cached keys (or queries) by position deltas, using a model's RoPE frequencies.

    Parameters
    ----------
    inv_freq:
        One inverse-frequency vector for every layer (``[D_rot / 2]``; ``D_rot <= head_dim``).
    """

    #: Integer rotations by fewer than this many positions read cos/sin from a table (one per
    #: distinct frequency vector, at most ``TABLE_MAX x D_rot`` entries: 1 MB for head size 64).
    TABLE_MAX = 4096

    def __init__(self, inv_freq: list[Tensor]):
        self.inv_freq = [f.detach().float() for f in inv_freq]
        self._tables: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _table(self, layer_idx: int, size: int, device: torch.device, work: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin ``[size', D_rot]`` of rotations by ``0..size'-1`` positions (``size' >= size``,
        grown geometrically up to :attr:`TABLE_MAX`), computed exactly as :meth:`rotate` computes
        them (float64, then cast)."""
        inv_cpu = self.inv_freq[layer_idx]
        key = (inv_cpu.data_ptr(), device, work)  # layers sharing frequencies share a table
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < size:
            n = min(max(size, 2 * (table[0].shape[0] if table is not None else 256)), self.TABLE_MAX)
            inv = self.inv_freq[layer_idx].to(device).double()
            angle = torch.arange(n, device=device, dtype=torch.float64)[:, None] * inv
            emb = torch.cat((angle, angle), dim=-1)
            table = (emb.cos().to(work), emb.sin().to(work))
            self._tables[key] = table
        return table

    @classmethod
    def from_frequencies(cls, inv_freq: Tensor, num_layers: int = 1) -> Rotary:
        return cls([inv_freq] * num_layers)

    @classmethod
    def from_model(cls, model: nn.Module) -> Rotary:
        """Build the service from a model's rotary embedding; fails loudly if it has none."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        model_type = getattr(config, "model_type", "?")
        if model_type not in ROTATE_HALF_MODEL_TYPES:
            raise UnsupportedModelError(
                f"key re-rotation is not supported for model type {model_type!r}; supported: "
                f"{', '.join(sorted(ROTATE_HALF_MODEL_TYPES))}"
            )
        rotary = None
        for mod in model.modules():
            if type(mod).__name__.endswith("RotaryEmbedding"):
                rotary = mod
                break
        if rotary is None:
            raise UnsupportedModelError(f"model type {model_type!r} has no rotary embedding module; cannot re-rotate keys")
        n = config.num_hidden_layers
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n
        freqs = []
        for lt in layer_types:
            f = getattr(rotary, f"{lt}_inv_freq", None)
            if f is None:
                f = getattr(rotary, "inv_freq", None)
            if f is None:
                raise UnsupportedModelError(f"cannot find RoPE frequencies for layer type {lt!r} in {type(rotary).__name__}")
            freqs.append(f)
        return cls(freqs)

    def rotate(self, x: Tensor, delta: Tensor, layer_idx: int = 0) -> Tensor:
        """Rotate ``x`` ``[..., T, D]`` by ``delta`` positions (broadcastable to ``[..., T]``)."""
        inv = self.inv_freq[layer_idx].to(x.device)
        rot = inv.numel() * 2
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        delta = delta.to(x.device)
        most = int(delta.abs().max()) if (not delta.is_floating_point() and delta.numel() and not torch.compiler.is_compiling()) else -1
        if 0 <= most < self.TABLE_MAX:
            # integer rotations: look cos/sin up (the same values; cos is even, sin odd)
            cos_t, sin_t = self._table(layer_idx, most + 1, x.device, work)
            mag = delta.abs()
            cos = cos_t[mag]
            sin = sin_t[mag] * delta.sign()[..., None].to(work)
        else:
            angle = delta.double()[..., None] * inv.double()
            emb = torch.cat((angle, angle), dim=-1)
            cos, sin = emb.cos().to(work), emb.sin().to(work)
        xr = x[..., :rot].to(work)
        out = xr * cos + _rotate_half(xr) * sin
        if rot < x.shape[-1]:
            out = torch.cat((out, x[..., rot:].to(work)), dim=-1)
        return out.to(x.dtype)

    def unrotate(self, x: Tensor, positions: Tensor, layer_idx: int = 0) -> Tensor:
        """Undo RoPE at ``positions``: the pre-RoPE key (times the model's RoPE scale, if any)."""
        return self.rotate(x, -positions, layer_idx)

    def rerotate(self, x: Tensor, from_positions: Tensor, to_positions: Tensor, layer_idx: int = 0) -> Tensor:
        """Move keys rotated at ``from_positions`` to ``to_positions``."""
        return self.rotate(x, to_positions - from_positions, layer_idx)
