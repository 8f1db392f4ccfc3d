"""Fitting generated prompts to a length in tokens (passkey, RULER and needle tasks).

A generated sample is described by a :class:`Builder`: a pure function from an integer amount of
filler (filler words, essay words, noise sentences, distractor needles, ...) to the prompt, so a
given amount always gives the same text and the sample's content never depends on how the fit
got there.  :func:`fit_amount` chooses the amount whose prompt is within
:data:`LENGTH_TOLERANCE` of the requested length, tokenizing the whole prompt only a few times.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvframe.errors import ConfigError

__all__ = ["LENGTH_TOLERANCE", "Builder", "LazyList", "fit_amount"]

#: Relative tolerance of a fitted prompt's length in tokens.
LENGTH_TOLERANCE = 0.05
_TARGET_TOLERANCE = 0.01  # the fit stops early once this close (or _TARGET_MIN_TOKENS)
_TARGET_MIN_TOKENS = 6
_MAX_FIT_ITERS = 48

T = TypeVar("T")


@dataclass(frozen=True)
class Builder(Generic[T]):
    """A prompt as a pure function ``build(n)`` of its amount of filler ``n`` (``start <= n <= cap``).

    ``unit`` names one filler unit in error messages (e.g. ``"essay word"``).
    """

    build: Callable[[int], T]
    start: int = 0
    cap: int | None = None
    unit: str = "filler unit"


def fit_amount(
    measure: Callable[[T], int], builder: Builder[T], length: int, what: str, hint: int | None = None
) -> tuple[T, int, int]:
    """Choose the amount of filler so that ``measure(prompt)`` is within :data:`LENGTH_TOLERANCE` of ``length``.

    After a first probe the amount is extrapolated from the measured tokens per unit, then
    refined by interpolation between the closest amounts below and above the target (a
    safeguarded secant search on integers).  It stops as soon as the prompt is within 1 % (at
    least a few tokens) of ``length`` and otherwise keeps the closest prompt within the 5 %
    tolerance.  Each amount is built and measured at most once.

    Parameters
    ----------
    measure
        Token count of a built prompt (e.g. the tokenizer's length of its text).
    builder
        The prompt as a function of the amount of filler.
    length
        Target length in tokens.
    what
        What is being fitted, for error messages (e.g. ``"RULER sub-task 'vt'"``).
    hint
        An amount fitted for a similar sample, tried first (saves tokenizer calls).

    Returns
    -------
    tuple
        ``(built prompt, measured tokens, amount of filler)``.

    Raises
    ------
    kvframe.errors.ConfigError
        If ``length`` is below the prompt without filler, above what the source data can fill,
        or cannot be hit within the tolerance (filler units too coarse for a short length).
    """
    lo = math.ceil(length * (1 - LENGTH_TOLERANCE))
    hi = math.floor(length * (1 + LENGTH_TOLERANCE))
    tight = min(hi - length, length - lo, max(length * _TARGET_TOLERANCE, _TARGET_MIN_TOKENS))
    seen: dict[int, tuple[int, T]] = {}

    def tokens(n: int) -> int:
        if n not in seen:
            built = builder.build(n)
            seen[n] = (measure(built), built)
        return seen[n][0]

    def result(n: int) -> tuple[T, int, int]:
        return seen[n][1], seen[n][0], n

    start, cap = builder.start, builder.cap
    t0 = tokens(start)
    if t0 > hi:
        raise ConfigError(
            f"length={length} is too small for {what}: its prompt without filler already has {t0} tokens"
        )
    best: int | None = start if t0 >= lo else None
    if abs(t0 - length) <= tight:
        return result(start)
    n_lo, t_lo = start, t0
    n_hi: int | None = None
    t_hi = 0
    n = hint if hint is not None and hint > start else start + 16
    for _ in range(_MAX_FIT_ITERS):
        if cap is not None:
            n = min(n, cap)
        t = tokens(n)
        if lo <= t <= hi and (best is None or abs(t - length) < abs(seen[best][0] - length)):
            best = n
        if abs(t - length) <= tight:
            return result(n)
        if t < length:
            if n > n_lo:
                n_lo, t_lo = n, t
            if cap is not None and n >= cap:
                break
        elif n_hi is None or n < n_hi:
            n_hi, t_hi = n, t
        if n_hi is None:
            rate = (t_lo - t0) / (n_lo - start) if n_lo > start else 0.0
            n = n_lo + math.ceil((length - t_lo) / rate) if rate > 0 else n_lo + max(16, n_lo - start)
            n = max(n, n_lo + 1)
        else:
            if n_hi - n_lo <= 1:
                break
            frac = (length - t_lo) / (t_hi - t_lo) if t_hi > t_lo else 0.5
            n = min(max(n_lo + round(frac * (n_hi - n_lo)), n_lo + 1), n_hi - 1)
    if best is not None:
        return result(best)
    if n_hi is None and cap is not None and n_lo >= cap:
        raise ConfigError(
            f"length={length} is too large for {what}: the source data fills at most {seen[cap][0]} tokens"
        )
    raise ConfigError(
        f"cannot fit {what} to length={length} tokens (+/-{LENGTH_TOLERANCE:.0%}): one {builder.unit} is too "
        f"coarse at this length (closest prompts: {t_lo} and {t_hi} tokens); use a larger length"
    )


class LazyList:
    """A list extended on demand from a seeded generator, so its prefixes never change.

    Lets a builder be a pure function of its amount: ``take(n)`` is always the same ``n`` items,
    whatever amounts were taken before.
    """

    def __init__(self, make: Callable[[], str]) -> None:
        self._make, self._items = make, []

    def take(self, n: int) -> list[str]:
        """The first ``n`` items."""
        while len(self._items) < n:
            self._items.append(self._make())
        return self._items[:n]

    def __getitem__(self, i: int) -> str:
        """Item ``i`` (``i >= 0``)."""
        while len(self._items) <= i:
            self._items.append(self._make())
        return self._items[i]
