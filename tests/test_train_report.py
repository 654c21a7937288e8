"""lorakit.train.report: the plain progress lines of a run that has no terminal."""

from __future__ import annotations


def test_progress_lines_every_tenth_of_the_run():
    from lorakit.train.report import log_progress

    lines: list[str] = []
    for step in range(1, 21):
        log_progress(
            lines.append, step, 20, loss=1.0 / step, lr=1e-3, tokens_per_s=100.0, elapsed_s=step * 2.0, steps_done=step
        )
    assert [ln.split()[1] for ln in lines] == [f"{s}/20" for s in range(2, 21, 2)]
    assert lines[0] == "step 2/20  loss 0.5000  lr 1.00e-03  100 tok/s  ETA 0:36"
    assert lines[-1].endswith("ETA 0:00")
