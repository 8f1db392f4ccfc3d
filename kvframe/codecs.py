"""Codecs: how a slot store holds the keys and values of its slots.

A codec turns a ``[B, H, S, D]`` float tensor of keys (or values) into one or more *parts*, tensors
whose dim 2 is the slot axis (``[B, H, S, ...]``), and back. The slot store
(:mod:`kvframe.store`) allocates, grows, copies, gathers and forks parts slot by slot without
knowing what they hold, so a codec decides only the per-slot encoding:

- ``parts(x)``: encode ``x`` into a dict ``{name: tensor}`` of parts (slot axis dim 2);
- ``empty(shape, dtype, device)``: uninitialised parts for ``shape = (B, H, S, D)`` slots;
- ``decode(parts)``: the ``[B, H, S, D]`` tensor attention reads (for ``fp``, a view of the stored
  part: no copy);
- ``slot_bytes(dim, dtype)``: bytes one slot of one head takes in the parts.

``fp`` (:class:`FpCodec`, the default) stores the model's dtype as it is: its single part
``data`` *is* the tensor, and decode returns it. A quantizing or channel-pruning codec adds
parts (payload, scales, zero points, kept-channel indices) and does its arithmetic in ``parts``
and ``decode``; nothing else in the store changes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from kvframe.errors import ConfigError


class Codec:
    """Per-slot encoding of keys or values (see the module docstring)."""

    name: ClassVar[str] = "codec"

    def parts(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def empty(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def decode(self, parts: dict[str, Tensor]) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def slot_bytes(self, dim: int, dtype: torch.dtype) -> int:  # pragma: no cover - interface
        raise NotImplementedError


class FpCodec(Codec):
    """Keys and values at the dtype they come in (the model's): one part, ``data``, decoded as is."""

    name = "fp"

    def parts(self, x: Tensor) -> dict[str, Tensor]:
        return {"data": x}

    def empty(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        return {"data": torch.empty(shape, dtype=dtype, device=device)}

    def decode(self, parts: dict[str, Tensor]) -> Tensor:
        return parts["data"]

    def slot_bytes(self, dim: int, dtype: torch.dtype) -> int:
        return dim * torch.empty((), dtype=dtype).element_size()


CODECS: dict[str, type[Codec]] = {"fp": FpCodec}


def get_codec(name: str) -> Codec:
    """The codec registered as ``name``; an unknown name is an error listing the accepted ones."""
    try:
        return CODECS[name]()
    except KeyError:
        raise ConfigError(f"codec {name!r}; accepted: {', '.join(sorted(CODECS))}") from None
