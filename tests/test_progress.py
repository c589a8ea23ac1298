"""Progress bars: one line per finished bar in a log (no carriage-return frames), counted per
task on the local schedulers, per future on a cluster, per fit in training."""

from __future__ import annotations

import re

import dask
import dask.array as da
import numpy as np
import pytest

from agbcube._dask import compute
from agbcube._progress import progress_bar


def _bars(text: str) -> list[str]:
    return [line for line in text.splitlines() if "━" in line]


def test_a_bar_in_a_log_is_one_final_line_without_carriage_returns(capsys):
    with progress_bar("step", total=4, unit="tiles") as bar:
        for _ in range(3):
            bar.advance()
    err = capsys.readouterr().err
    assert "\r" not in err
    (line,) = _bars(err)
    assert line.startswith("step ") and "4/4 tiles" in line and "100%" in line


def test_a_disabled_bar_prints_nothing(capsys):
    with progress_bar("step", total=2, enabled=False) as bar:
        bar.advance()
        bar.update(completed=2, total=2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_local_schedulers_count_every_task_of_the_graph(capsys, scheduler):
    x = da.ones((40, 40), chunks=10)  # 16 chunks
    with dask.config.set(scheduler=scheduler):
        (total,) = compute((x + 1).sum(), label="summing")
    assert total == 3200
    (line,) = _bars(capsys.readouterr().err)
    done, n = map(int, re.search(r"(\d+)/(\d+) tasks", line).groups())
    assert line.startswith("summing") and done == n and n > 16  # ones, add, sums, aggregate


@pytest.mark.slow
def test_a_cluster_counts_each_result_as_it_arrives(capsys, local_cluster):
    from distributed import Client

    parts = [dask.delayed(np.sum)(np.arange(i)) for i in range(5)]
    with Client(local_cluster) as client:
        values = compute(*parts, client=client, label="parts")
    assert list(values) == [0, 0, 1, 3, 6]
    (line,) = _bars(capsys.readouterr().err)
    assert line.startswith("parts") and "5/5 tasks" in line
