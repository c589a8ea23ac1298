"""Progress of long steps, drawn one way everywhere: rich bars on stderr.

In a terminal a bar redraws in place, and log lines printed through `console` appear above
it. In a notebook it is a live widget (with ipywidgets; without, its final state). Written to a
file or a pipe it is one line per bar when the step ends: no carriage-return frames piling up
on one line.

`progress_bar` is the bar of one step (tasks, tiles or fits); `dask_progress` fills it from a
Dask computation, on the local schedulers (every task of the graph) and on a distributed client
(every future as it completes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["Bar", "console", "dask_progress", "log_width", "progress_bar"]


def log_width(stream: Any) -> int | None:
    # A log file (not a terminal, no COLUMNS) gets 120 columns rather than Rich's 80, so that
    # the summary table, whose R² cells carry intervals, stays one line per row.
    isatty = getattr(stream, "isatty", lambda: False)
    return None if isatty() or "COLUMNS" in os.environ else 120


def _widgets() -> bool | None:
    """A live display in Jupyter needs ipywidgets; without it, a bar's final state only."""
    return None if importlib.util.find_spec("ipywidgets") else False


#: Messages and progress (stderr); it looks its stream up when it prints, so a redirected or
#: captured stream is honoured.
console = Console(stderr=True, width=log_width(sys.stderr), force_jupyter=_widgets())


class Bar:
    """One step's bar: ``advance`` by done units, or ``update`` to a count and total."""

    def __init__(self, progress: Progress | None, task: Any) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, *, completed: float | None = None, total: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, total=total)


@contextlib.contextmanager
def progress_bar(
    label: str, *, total: float | None = None, unit: str = "tasks", enabled: bool = True
) -> Iterator[Bar]:
    """A bar for one step, shown while the block runs (nothing when not ``enabled``).

    Parameters
    ----------
    label : str
        What the step does ("building site 'alpha'").
    total : float, optional
        Units of work, when known at the start (`Bar.update` sets it later).
    unit : str
        What is counted, after ``done/total``.
    """
    if not enabled:
        yield Bar(None, None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield Bar(progress, task)
        total_now = progress.tasks[0].total
        if total_now is not None:  # the final line says the step is whole
            progress.update(task, completed=total_now)


def dask_progress(
    objs: Sequence[Any], *, client: Any = None, label: str = "", enabled: bool = True
) -> tuple:
    """``dask.compute(*objs)`` (on ``client`` when given) with a `progress_bar`."""
    import dask

    with progress_bar(label or "computing", enabled=enabled) as bar:
        if client is not None:
            from distributed import as_completed

            futures = client.compute(list(objs))
            bar.update(completed=0, total=len(futures))
            for _ in as_completed(futures):
                bar.advance()
            return tuple(client.gather(futures))
        with _task_counter(bar):
            return dask.compute(*objs)


def _task_counter(bar: Bar) -> Any:
    """A Dask callback counting a local scheduler's finished tasks into ``bar`` (dask's own
    ProgressBar reads the same counts)."""
    from dask.callbacks import Callback

    def start(dsk: Any, state: dict) -> None:
        bar.update(completed=0, total=_n_tasks(state))

    def posttask(key: Any, result: Any, dsk: Any, state: dict, worker_id: Any) -> None:
        bar.update(completed=len(state["finished"]), total=_n_tasks(state))

    return Callback(start_state=start, posttask=posttask)


def _n_tasks(state: dict) -> int:
    return sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
