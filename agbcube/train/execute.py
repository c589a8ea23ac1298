"""Running a run's tasks: what is pending and what waits on what, decided in one place.

`execute` takes the plan's tasks, keeps those already done (their result files), submits the
others to an executor, each with the tasks it waits for (`agbcube.train.plan.prerequisites`:
a refit member waits for its fold's selection, a branch also for member 0), and follows them
as they end: one progress bar, one log line per task, one error naming every failed task. Two
executors run the same submissions, as scikit-learn runs its fits through joblib whatever the
backend:

* `InProcess`: here, one task after another in plan order; the first failure stops the run
  with the task's own error;
* `agbcube.train.cluster.ClusterTasks`: one Dask task per fit on a cluster's workers; every
  task runs, then one error names each failure.

Either way a task runs `agbcube.train.tasks.run_task` on the `agbcube.train.data.RunData`
its process keeps for the run directory (`agbcube.train.data.run_data`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from agbcube._io import remove_path
from agbcube._progress import Bar
from agbcube.errors import AgbcubeError, TrainingError
from agbcube.train.data import ONE_FIT, run_data
from agbcube.train.plan import Task, deterministic, prerequisites
from agbcube.train.tasks import run_task

__all__ = ["Executor", "InProcess", "describe", "execute", "remove_temporaries"]

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Where a run's tasks run (`InProcess`, `agbcube.train.cluster.ClusterTasks`)."""

    #: whether every task runs after one has failed
    keep_going: bool

    def running(self, run_dir: Path) -> contextlib.AbstractContextManager[None]:
        """The context the run's tasks run in."""
        ...

    def submit(self, task: Task, *, after: list[Task], first: bool) -> None:
        """Run ``task`` once the tasks ``after`` have ended; ``first``: before others."""
        ...

    def outcomes(self) -> Iterator[tuple[Task, dict[str, Any] | BaseException]]:
        """Each submitted task as it ends: its summary, or its exception."""
        ...


class InProcess:
    """Runs tasks in this process, one after another, in the order they were submitted (the
    plan's, which puts every task after those it waits for)."""

    keep_going = False

    def __init__(self, run_dir: Path, device: Any, *, resume: bool) -> None:
        self.run_dir, self.device, self.resume = run_dir, device, resume
        self._queue: list[Task] = []

    @contextlib.contextmanager
    def running(self, run_dir: Path) -> Iterator[None]:
        yield

    def submit(self, task: Task, *, after: list[Task], first: bool) -> None:
        self._queue.append(task)

    def outcomes(self) -> Iterator[tuple[Task, dict[str, Any] | BaseException]]:
        queue, self._queue = self._queue, []
        for task in queue:
            with ONE_FIT, deterministic(self.device):
                summary = run_task(task, run_data(self.run_dir, self.device), resume=self.resume)
            yield task, summary


def execute(tasks: list[Task], run_dir: Path, executor: Any, *, tcfg: Any, bar: Bar) -> None:
    """Run every task of ``tasks`` without a result in ``run_dir`` on ``executor``; ``bar``
    advances as each task ends.

    Raises
    ------
    TrainingError
        Naming each failed task and its cause (an executor that keeps going), or the failed
        task's own error (one that stops).
    """
    pending = [t for t in tasks if not t.is_done(run_dir)]
    n_done, n_tasks = len(tasks) - len(pending), len(tasks)
    if n_done:
        log.info("%d of %d tasks done and kept; %d to run", n_done, n_tasks, len(pending))
    bar.advance(n_done)
    failures: dict[Task, BaseException] = {}
    with executor.running(run_dir):
        needed = {t for task in pending for t in prerequisites(tcfg, task)}
        for task in pending:
            after = [t for t in prerequisites(tcfg, task) if t in pending]
            executor.submit(task, after=after, first=task in needed)
        for task, outcome in executor.outcomes():
            bar.advance()
            if isinstance(outcome, BaseException):
                failures[task] = outcome
                log.warning("%s: failed (%s)", describe(task), cause(outcome))
                continue
            n_done += 1
            where = f" on {outcome['worker']} ({outcome['device']})" if "worker" in outcome else ""
            seconds = outcome["seconds"]
            log.info("[%d/%d] %s: done in %.1f s%s", n_done, n_tasks, task.name, seconds, where)
    remove_temporaries(run_dir)  # what killed workers left half-written
    if failures:
        raise _failure(failures, tcfg, run_dir, n_tasks)


def remove_temporaries(out: Path) -> None:
    """What killed fits left half-written in a run directory (their temporary siblings); call
    only when none of the run's tasks is running."""
    for stale in [*out.glob("fold_*/.*.tmp-*"), *out.glob("random_cv/.*.tmp-*")]:
        remove_path(stale)


def describe(task: Task) -> str:
    """A task in words: ``fold 2 member 1``, ``fold 2 select``, ``random-CV fold 2``."""
    if task.kind == "random":
        return f"random-CV fold {task.fold}"
    if task.kind == "member":
        return f"fold {task.fold} member {task.member}"
    return f"fold {task.fold} {task.kind}"


def cause(err: BaseException) -> str:
    """A task's failure in words."""
    if isinstance(err, AgbcubeError):
        return str(err)
    return f"{type(err).__name__}: {err}" if str(err) else repr(err)


def _failure(failures: dict[Task, BaseException], tcfg: Any, out: Path, n_tasks: int) -> Exception:
    """One error naming every failed task and its cause; a bug's stays a bug (exit 1)."""
    parts = []
    for task in sorted(failures):
        failed = [t for t in prerequisites(tcfg, task) if t in failures]
        if failed:
            parts.append(f"{describe(task)}: not run, {describe(failed[0])} failed")
        else:
            parts.append(f"{describe(task)}: {cause(failures[task])}")
    message = (
        f"{len(failures)} of {n_tasks} tasks failed; the other tasks' results are kept in "
        f"{out} (fix the cause, then run again with --resume). " + "; ".join(parts)
    )
    known = (AgbcubeError, OSError, MemoryError)
    error: Exception
    if all(isinstance(e, known) for e in failures.values()):
        error = TrainingError(message)
    else:
        error = RuntimeError(message)
    error.__cause__ = failures[min(failures)]
    return error
