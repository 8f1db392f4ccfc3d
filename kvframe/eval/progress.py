"""One progress line for a whole ``kvframe eval`` grid, on top of Lightning's per-cell bars.

The line says how many cells and samples of the grid are finished, how long this invocation has
been running and how long the rest should take::

    kvframe eval: cells 3/12 (1 failed) | samples 10/48 (4 resumed) | elapsed 0:01:05 | ETA 0:04:10

Samples finished by an earlier invocation (resumed) count as done but not toward the speed: the ETA
is the remaining samples times this invocation's mean time per finished sample (``-`` before the
first one finishes). A failed cell's unfinished samples leave the remaining work. The line goes to
stderr; where it is redrawn depends on the terminal (see :class:`GridProgress`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

#: without a live line, a finished sample prints a line when the last one is at least this old
SAMPLE_LINE_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours grow past 24 rather than turning into days)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class GridProgress:
    """Progress of a grid of cells, printed as one line.

    ``cells`` gives, per cell in run order, ``(samples, already_done)``: its sample count and how
    many of them earlier invocations finished (resumed). With ``live`` (a terminal that no other
    progress bar draws on) the line is redrawn in place (``\\r``) after every event; otherwise a
    plain line is printed at the start, after each cell, and after a finished sample when
    ``sample_interval`` seconds (``None``: never) have passed since the last line.
    """

    def __init__(
        self,
        cells: Sequence[tuple[int, int]],
        stream: TextIO | None = None,
        live: bool = False,
        sample_interval: float | None = SAMPLE_LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        prefix: str = "kvframe eval: ",
    ):
        self.sizes = [int(n) for n, _ in cells]
        self.done = [min(int(d), int(n)) for n, d in cells]
        self.resumed = sum(self.done)
        self.finished = [d >= n for n, d in zip(self.sizes, self.done)]
        self.failed = 0
        self.abandoned = 0  # unfinished samples of failed cells: no longer part of the remaining work
        self.current: int | None = None
        self.stream = stream if stream is not None else sys.stderr
        self.live = live
        self.sample_interval = sample_interval
        self.clock = clock
        self.prefix = prefix
        self.start_time = clock()
        self._last_print = self.start_time
        self._width = 0

    # -- state --------------------------------------------------------------------------------
    @property
    def total_samples(self) -> int:
        return sum(self.sizes)

    @property
    def done_samples(self) -> int:
        return sum(self.done)

    def eta_seconds(self) -> float | None:
        """Remaining samples x this invocation's mean seconds per finished sample (None: unknown)."""
        new = self.done_samples - self.resumed
        remaining = self.total_samples - self.done_samples - self.abandoned
        if remaining <= 0:
            return 0.0
        if new <= 0:
            return None
        return remaining * (self.clock() - self.start_time) / new

    def line(self) -> str:
        cells = f"cells {sum(self.finished)}/{len(self.sizes)}" + (f" ({self.failed} failed)" if self.failed else "")
        samples = f"samples {self.done_samples}/{self.total_samples}" + (f" ({self.resumed} resumed)" if self.resumed else "")
        eta = self.eta_seconds()
        return (f"{self.prefix}{cells} | {samples} | elapsed {format_duration(self.clock() - self.start_time)} | "
                f"ETA {'-' if eta is None else format_duration(eta)}")

    # -- events -------------------------------------------------------------------------------
    def start(self) -> None:
        self._emit()

    def cell_started(self, index: int) -> None:
        self.current = index

    def samples_finished(self, n: int = 1) -> None:
        """``n`` more samples of the current cell finished in this invocation."""
        if self.current is None or n <= 0:
            return
        i = self.current
        self.done[i] = min(self.sizes[i], self.done[i] + n)
        due = self.sample_interval is not None and self.clock() - self._last_print >= self.sample_interval
        if self.live or due:
            self._emit()

    def cell_finished(self, failed: bool = False) -> None:
        """The current cell ended: all its samples are done, or it failed (the rest never will be)."""
        if self.current is None:
            return
        i = self.current
        if failed:
            self.failed += 1
            self.abandoned += self.sizes[i] - self.done[i]
        else:
            self.done[i] = self.sizes[i]
        self.finished[i] = True
        self.current = None
        self._emit()

    def close(self) -> None:
        """End the live line (the next output starts on a line of its own)."""
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def _emit(self) -> None:
        text = self.line()
        if self.live:
            self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_print = self.clock()


class PredictionsTail:
    """Counts the records appended to ``predictions.jsonl`` since the last call (by every DDP rank:
    they all append to the same file), reading only the new bytes; a line still being written is
    left for the next call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_records(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].count(b"\n")


def lightning_callback(progress: GridProgress, tail: PredictionsTail) -> Any:
    """A Lightning callback that reports each test batch's finished samples to ``progress``."""
    from lightning.pytorch.callbacks import Callback

    class _GridProgressCallback(Callback):
        def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
            progress.samples_finished(tail.new_records())

    return _GridProgressCallback()


def cell_bar(name: str) -> Any:
    """Lightning's tqdm bar for one cell, described by the cell's name instead of ``Testing``."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class _CellBar(TQDMProgressBar):
        @property
        def test_description(self) -> str:
            return name

        def init_test_tqdm(self) -> Any:
            bar = super().init_test_tqdm()
            bar.set_description(name)
            return bar

        def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
            super().on_test_batch_start(*args, **kwargs)
            # the cell's name alone, without Lightning's " DataLoader 0" (a cell has one dataloader)
            self.test_progress_bar.set_description(name)

    return _CellBar()
