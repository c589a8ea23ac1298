"""Choosing a Dask scheduler and computing with a progress bar in every mode."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dask

from agbcube._progress import dask_progress
from agbcube.errors import ConfigError, MissingDependencyError

__all__ = [
    "IN_PROCESS",
    "check_scheduler",
    "compute",
    "dask_scheduler",
    "own_cluster",
    "probe_worker",
]

SCHEDULERS = ("threads", "processes", "synchronous", "local")
#: schedulers under which a run's torch fits share this process: one after another
IN_PROCESS = ("threads", "synchronous")

log = logging.getLogger(__name__)


def check_scheduler(spec: str) -> None:
    """Raise ConfigError for a scheduler that is neither known nor a cluster address."""
    if spec not in SCHEDULERS and "://" not in spec:
        raise ConfigError(
            f"unknown scheduler {spec!r}: use one of {list(SCHEDULERS)} or a cluster address "
            "such as tcp://10.0.0.5:8786"
        )


@contextlib.contextmanager
def dask_scheduler(
    spec: str = "threads", *, n_workers: int | None = None, echo: bool = True
) -> Iterator[Any]:
    """Run the enclosed Dask work on the scheduler ``spec``.

    Parameters
    ----------
    spec : str
        ``"threads"`` (default), ``"processes"``, ``"synchronous"``, ``"local"`` (starts a
        ``distributed.LocalCluster`` and prints its dashboard link) or the address of an existing
        cluster (``"tcp://host:8786"``).
    n_workers : int, optional
        Workers for ``"local"`` (default: one per core).
    echo : bool
        Log the dashboard link (``agbcube._dask`` logger, INFO).

    Yields
    ------
    distributed.Client or None
        The client for ``local`` and addresses; None for the single-machine schedulers.
    """
    check_scheduler(spec)
    if spec in ("threads", "processes", "synchronous"):
        with dask.config.set(scheduler=spec):
            yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise MissingDependencyError(
            f"--scheduler {spec} needs dask.distributed, which is not installed: "
            "pip install 'agbcube[cluster]' (or use threads, processes or synchronous)"
        ) from err

    if spec == "local":
        # Processes, one thread each: GDAL reads and numpy chunk math both hold the GIL in
        # places, and a dying worker must not take the others with it.
        def make() -> Any:
            return LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            )

        with own_cluster(make) as client:
            if echo:
                log.info("Dask dashboard: %s", client.dashboard_link)
            yield client
        return
    try:
        client = Client(spec)
    except OSError as err:  # distributed's connection timeout
        raise ConfigError(
            f"cannot reach the Dask scheduler at {spec} ({err}); check the address, and "
            "that the scheduler is running and reachable from this machine"
        ) from err
    with client:
        if echo:
            log.info("Dask dashboard: %s", client.dashboard_link)
        yield client


@contextlib.contextmanager
def own_cluster(make: Callable[[], Any]) -> Iterator[Any]:
    """A client of a cluster this process starts (``make()``), both closed on leaving.

    The cluster's worker processes ignore SIGINT: Ctrl-C, which a terminal sends to the whole
    process group, interrupts this process alone, which then stops the workers in order,
    instead of each worker dying mid-task with its own traceback. Stopping them after an
    interrupt is quiet: dask would warn about each task it cancels and each worker it stops.
    """
    from distributed import Client

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:  # the worker processes start now, inheriting the ignored signal
        with _environ(PYTHONWARNINGS=_TRACKER_QUIET):
            cluster = make()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    try:
        with Client(cluster) as client:
            client.run(_hush_cancelled_tasks)
            yield client
    except KeyboardInterrupt:
        with _quiet("distributed"):
            cluster.close()
        raise
    cluster.close()


# multiprocessing's resource tracker, started with the workers, warns at exit about the
# semaphores of a worker stopped mid-task, which it then removes: nothing is left behind
_TRACKER_QUIET = "ignore:resource_tracker:UserWarning"


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Processes started in this context get ``values`` added to their environment (a
    warnings filter is appended to the user's own)."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ[k] = ",".join(filter(None, [saved[k], v]))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _CancelledTasks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Async instruction for")


def _hush_cancelled_tasks() -> None:
    """On a worker: no warning for a task cancelled because its client stopped."""
    logging.getLogger("distributed.worker.state_machine").addFilter(_CancelledTasks())


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        target.setLevel(level)


def compute(*objs: Any, client: Any = None, progress: bool = True, label: str = "") -> tuple:
    """``dask.compute`` with a progress bar (`agbcube._progress`), on ``client`` when given."""

    return dask_progress(objs, client=client, label=label, enabled=progress)


def probe_worker() -> dict[str, Any]:
    """What a worker offers a fit: torch, CUDA devices and usable cores (runs on the worker)."""
    cpus = len(os.sched_getaffinity(0))
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    try:
        import torch
    except ImportError:  # a worker for build-cube and folds only
        return {"cuda": 0, "cpus": cpus, "torch": None, "trim": trim}
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"cuda": cuda, "cpus": cpus, "torch": torch.__version__, "trim": trim}
