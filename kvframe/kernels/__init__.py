"""Fused kernels: Triton where they pay, a torch reference everywhere, chosen per call by device.

Every kernel is a ``torch.library`` custom op (namespace ``kvframe``), so a compiled compressor calls
it as one opaque node with no graph break, and every op has a fake (meta) implementation for
shape propagation under ``torch.compile``. Inside the op, :func:`use_triton` decides between the
Triton kernel and the torch reference:

``KVFRAME_KERNELS`` (environment) or :func:`kernel_backend` (context manager) select

* ``auto`` (default): Triton for CUDA tensors when ``triton`` is importable, torch otherwise;
* ``torch``: always the torch reference;
* ``triton``: always Triton; on CPU this needs ``TRITON_INTERPRET=1`` (set before triton is
  imported), Triton's interpreter, which is how the parity tests run without a GPU. Asking for
  Triton where it cannot run is an error, never a silent fallback.

Ops: ``kvframe::window_scores`` (observation-window scoring), ``kvframe::group_reduce``
(compaction with merge), ``kvframe::balance_signs`` (BalanceKV's self-balancing walk),
``kvframe::slot_decode_attention`` (decode attention over weighted, ragged slots),
``kvframe::slot_decode_attention_packed`` (the same over a packed layout: one flat slot buffer per
layer, each head a ``start``/``length`` segment).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from kvframe.errors import ConfigError

BACKENDS = ("auto", "torch", "triton")
_override: list[str] = []


def backend() -> str:
    """The kernel backend in force (innermost :func:`kernel_backend`, else ``KVFRAME_KERNELS``)."""
    name = _override[-1] if _override else os.environ.get("KVFRAME_KERNELS", "auto")
    if name not in BACKENDS:
        raise ConfigError(f"KVFRAME_KERNELS={name!r}; accepted: {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with kernel backend ``name`` (``auto``, ``torch`` or ``triton``)."""
    if name not in BACKENDS:
        raise ConfigError(f"kernel backend {name!r}; accepted: {', '.join(BACKENDS)}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` runs its Triton kernel (see the module docstring)."""
    name = backend()
    if name == "torch":
        return False
    if name == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise ConfigError("kernel backend 'triton' was asked for but triton is not installed (pip install triton)")
    if t.is_cuda or interpreting():
        return True
    raise ConfigError(
        f"kernel backend 'triton' on a {t.device.type} tensor needs TRITON_INTERPRET=1 (Triton's CPU interpreter), "
        "set before triton is imported; accepted otherwise: CUDA tensors, or backend 'torch'/'auto'"
    )


def norm_window(sliding_window: int | None) -> int | None:
    """A sliding window as the ops take it: ``None`` for none (``None`` or negative given)."""
    return None if sliding_window is None or sliding_window < 0 else int(sliding_window)
