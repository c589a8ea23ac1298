"""Choosing a Dask scheduler and computing with a progress bar in every mode."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import dask

from agbcube._progress import dask_progress
from agbcube.errors import ConfigError, MissingDependencyError

__all__ = ["IN_PROCESS", "check_scheduler", "compute", "dask_scheduler", "probe_worker"]

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

    cluster = None
    if spec == "local":
        # Processes, one thread each: GDAL reads and numpy chunk math both hold the GIL in
        # places, and a dying worker must not take the others with it.
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
        client = Client(cluster)
    else:
        try:
            client = Client(spec)
        except OSError as err:  # distributed's connection timeout
            raise ConfigError(
                f"cannot reach the Dask scheduler at {spec} ({err}); check the address, and "
                "that the scheduler is running and reachable from this machine"
            ) from err
    try:
        if echo:
            log.info("Dask dashboard: %s", client.dashboard_link)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


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
