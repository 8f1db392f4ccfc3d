"""kvframe.eval.progress: the grid's progress line (text and counts; time comes from a fake clock)."""

from __future__ import annotations

import io

from kvframe.eval.progress import GridProgress, PredictionsTail, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3600, 90061)] == ["0:00:00", "0:00:59", "0:01:01", "1:00:00", "25:01:01"]


def test_lines_count_cells_and_samples_and_the_eta_uses_this_invocations_speed():
    clock, out = Clock(), io.StringIO()
    # three cells of 4 samples; the first was finished by an earlier invocation, the second half-way
    p = GridProgress([(4, 4), (4, 2), (4, 0)], stream=out, live=False, sample_interval=None, clock=clock)
    p.start()
    p.cell_started(1)
    clock.t += 10
    p.samples_finished(1)  # no line: sample lines are off (sample_interval=None)
    clock.t += 10
    p.samples_finished(1)
    p.cell_finished()
    p.cell_started(2)
    clock.t += 20
    p.samples_finished(2)
    p.cell_finished(failed=True)  # its 2 other samples will not run: no longer remaining
    assert out.getvalue().splitlines() == [
        "kvframe eval: cells 1/3 | samples 6/12 (6 resumed) | elapsed 0:00:00 | ETA -",
        # 2 new samples in 20 s (the 6 resumed ones do not count toward the speed), 4 remaining: 40 s
        "kvframe eval: cells 2/3 | samples 8/12 (6 resumed) | elapsed 0:00:20 | ETA 0:00:40",
        "kvframe eval: cells 3/3 (1 failed) | samples 10/12 (6 resumed) | elapsed 0:00:40 | ETA 0:00:00",
    ]


def test_sample_lines_appear_once_the_interval_has_passed():
    clock, out = Clock(), io.StringIO()
    p = GridProgress([(10, 0)], stream=out, sample_interval=30.0, clock=clock)
    p.start()
    p.cell_started(0)
    for _ in range(4):
        clock.t += 10
        p.samples_finished()
    assert out.getvalue().splitlines() == [
        "kvframe eval: cells 0/1 | samples 0/10 | elapsed 0:00:00 | ETA -",
        "kvframe eval: cells 0/1 | samples 3/10 | elapsed 0:00:30 | ETA 0:01:10",  # 30 s after the last line
    ]


def test_live_line_is_redrawn_in_place_and_ended_by_close():
    clock, out = Clock(), io.StringIO()
    p = GridProgress([(2, 0)], stream=out, live=True, clock=clock)
    p.start()
    p.cell_started(0)
    clock.t += 5
    p.samples_finished()
    p.cell_finished()
    p.close()
    first = "kvframe eval: cells 0/1 | samples 0/2 | elapsed 0:00:00 | ETA -"
    second = "kvframe eval: cells 0/1 | samples 1/2 | elapsed 0:00:05 | ETA 0:00:05"
    third = "kvframe eval: cells 1/1 | samples 2/2 | elapsed 0:00:05 | ETA 0:00:00"
    # a shorter line is padded with spaces so nothing of the longer one stays visible
    assert out.getvalue() == "\r" + first + "\r" + second + "\r" + third + " " * (len(second) - len(third)) + "\n"


def test_predictions_tail_counts_complete_new_lines_only(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"a": 1}\n')
    tail = PredictionsTail(path)  # what is there already is not new
    assert tail.new_records() == 0
    with path.open("a") as f:
        f.write('{"a": 2}\n{"a": 3}\n{"a": 4')  # the last one is still being written
    assert tail.new_records() == 2
    with path.open("a") as f:
        f.write('}\n')
    assert tail.new_records() == 1 and tail.new_records() == 0
    assert PredictionsTail(tmp_path / "missing.jsonl").new_records() == 0
