"""A run's tasks on a Dask cluster: one Dask task per fit, on the workers' own devices.

``agbcube train CONFIG --scheduler local|processes|tcp://…`` submits the tasks that
`plan_tasks` plans (select, members, baseline, random) to the
cluster, with keys that say fold and member (``fold_2/member_1-<token>``: the dashboard groups
the task stream by them). Each task runs `run_task` on a worker:
it reads its chips from the cube there, trains on the worker's device (``--device auto`` is
resolved by the worker), writes its model and predictions atomically into the run directory,
its result file last, and returns a small summary. A refit member depends on its fold's
``select`` task. The client then assembles the run as the sequential path does.

What the workers need: the cube, the folds file and the run directory at the same paths as the
client (a shared file system such as NFS, Lustre or GPFS; an object store mounted at the same
path on every machine works for the cube), and an environment with ``agbcube[train]``.

Faults:

* a worker killed mid-task: Dask runs the task again elsewhere; every file is written
  atomically and the result file last, so nothing half-written counts as done, and the rerun
  continues from the fit's last checkpoint (bit for bit on the CPU);
* the client killed: ``--resume`` submits only the tasks without a result file;
* a task that fails (a non-finite loss, a damaged chunk): every other task still runs, then one
  error names each failed task's fold and member and its cause; the finished results are kept.

A worker process trains one model at a time: torch's random generator and its thread pool are
per process, so two fits in one process would disturb each other's random numbers. Each task
sets torch's thread count explicitly (``threads_per_task``), the same on every worker, so that
a run's results do not depend on where its tasks ran: on the CPU a run on a cluster equals the
sequential run with as many torch threads, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import torch
from distributed import (
    KilledWorker,
    Nanny,
    Scheduler,
    SpecCluster,
    as_completed,
    get_worker,
)

from agbcube._dask import IN_PROCESS, check_scheduler, dask_scheduler, own_cluster, probe_worker
from agbcube.errors import ConfigError, MissingDependencyError, TrainingError
from agbcube.train.data import ONE_FIT, release_run, run_data
from agbcube.train.plan import auto_data_path, deterministic, resolve_device
from agbcube.train.tasks import run_task

__all__ = ["ClusterTasks", "cluster_tasks", "gpu_worker_specs", "placement"]

log = logging.getLogger(__name__)

LOCAL = ("local", "processes")  # a LocalCluster of worker processes
WORKER_WAIT_S = 300.0  # how long a run waits for the first worker to join
#: dask's nanny sets it (to 65536) in every worker it starts: any value turns off glibc's
#: adaptive mmap threshold, so each CPU training step maps and unmaps its activations afresh
TRIM_ENV = "MALLOC_TRIM_THRESHOLD_"
DASK_TRIM = "65536"  # the value dask's nanny gives it
UNTRIMMED_CONFIG = """distributed:
  nanny:
    pre-spawn-environ:
      MALLOC_TRIM_THRESHOLD_: null"""


@contextlib.contextmanager
def cluster_tasks(
    scheduler: str | None, device: str, *, threads_per_task: int | None = None
) -> Iterator[ClusterTasks | None]:
    """The cluster a run's tasks go to, or ``None`` to run them in this process.

    Parameters
    ----------
    scheduler : str or None
        ``None``, ``"threads"`` or ``"synchronous"``: in this process, one task after another.
        ``"local"`` or ``"processes"``: a LocalCluster started for the run (one worker process
        per core with one thread each, or one per GPU when this machine has CUDA and the device
        is not ``cpu``), whose dashboard link is logged. ``"tcp://host:port"``: an existing
        cluster.
    device : str
        ``train.device`` as configured (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
    threads_per_task : int, optional
        Torch threads of each task (default: the smallest share of a machine's cores per worker
        process, over the cluster's machines).
    """
    if scheduler is None or scheduler in IN_PROCESS:
        yield None
        return
    check_scheduler(scheduler)
    with _client(scheduler, device) as client:
        yield ClusterTasks(client, device, threads_per_task=threads_per_task)


@contextlib.contextmanager
def _client(scheduler: str, device: str) -> Iterator[Any]:
    if scheduler not in LOCAL:
        with dask_scheduler(scheduler) as client:
            yield client
        return
    n_gpus = _local_gpus() if device != "cpu" else 0
    with untrimmed_workers():
        if not n_gpus:
            with dask_scheduler("local") as client:
                yield client
            return
        with _local_gpu_cluster(n_gpus) as client:
            log.info("Dask dashboard: %s (one worker per GPU, %d)", client.dashboard_link, n_gpus)
            yield client


@contextlib.contextmanager
def untrimmed_workers() -> Iterator[None]:
    """Worker processes started in this context lack dask's ``MALLOC_TRIM_THRESHOLD_``.

    Its nanny sets the variable (65536) in every worker to hand freed memory back to the
    system. Any value of it turns off glibc's adaptive mmap threshold, so every tensor of a
    CPU training step above 128 KiB is mapped and unmapped afresh: torch trained at 0.35–0.65×
    its speed in such workers (BENCHMARKS.md, "Training and folds on a Dask cluster"). A value
    this process's environment holds other than dask's own is kept (it is the user's).
    """
    leaked = os.environ.get(TRIM_ENV) == DASK_TRIM  # an earlier nanny in this process set it
    saved = os.environ.pop(TRIM_ENV) if leaked else None
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{TRIM_ENV}": None}):
            yield
    finally:
        if saved is not None:
            os.environ[TRIM_ENV] = saved


def _local_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_worker_specs(n_gpus: int) -> dict[str, dict[str, Any]]:
    """SpecCluster worker specs: one single-threaded worker process per GPU, seeing only its
    own (``CUDA_VISIBLE_DEVICES``) and offering one ``GPU`` resource."""
    return {
        f"gpu-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "env": {"CUDA_VISIBLE_DEVICES": str(i)},
                "resources": {"GPU": 1},
                "name": f"gpu-{i}",
            },
        }
        for i in range(n_gpus)
    }


@contextlib.contextmanager
def _local_gpu_cluster(n_gpus: int) -> Iterator[Any]:
    """A client of dask-cuda's LocalCUDACluster when installed (it also pins each worker to its
    GPU's CPU cores), else of the same layout from `gpu_worker_specs`."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}

        def make() -> Any:
            return SpecCluster(workers=gpu_worker_specs(n_gpus), scheduler=scheduler)
    else:

        def make() -> Any:
            return LocalCUDACluster(dashboard_address=":0")

    with own_cluster(make) as client:
        yield client


# --------------------------------------------------------------------------------------------
# where the tasks run


def _workers(client: Any) -> dict[str, dict[str, Any]]:
    """Every worker's host, threads, resources and what it offers a fit (`probe_worker`), once
    one has joined."""
    if not client.scheduler_info()["workers"]:
        log.info("waiting for a worker to join the cluster (up to %.0f s)", WORKER_WAIT_S)
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError as err:
            raise ConfigError(
                f"no worker joined the Dask cluster at {client.scheduler.address} within "
                f"{WORKER_WAIT_S:.0f} s; start workers (dask-jobqueue: cluster.scale(...)) or "
                "check the address"
            ) from err
    probes = client.run(probe_worker)
    info = client.scheduler_info()["workers"]
    return {
        addr: {
            **probe,
            "host": info[addr]["host"],
            "nthreads": info[addr]["nthreads"],
            "resources": info[addr].get("resources") or {},
        }
        for addr, probe in probes.items()
        if addr in info
    }


def placement(workers: dict[str, dict[str, Any]], device: str) -> tuple[Any, dict | None]:
    """The run's device and the resources each task asks for, from what the workers offer.

    ``cpu`` runs anywhere. ``auto`` trains on CUDA when a worker has it, else on the CPU;
    ``cuda``/``cuda:N`` need a worker with CUDA. On CUDA each task asks for ``{"GPU": 1}``
    when workers offer that resource, so fits go only to them and one at a time per GPU;
    without it every worker must have CUDA.

    Parameters
    ----------
    workers : dict
        Per worker address: ``cuda`` (devices torch sees), ``resources``.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns
    -------
    device : torch.device
        The run's device (its type is what the run records).
    resources : dict or None
    """
    gpu = sorted(a for a, w in workers.items() if w["cuda"])
    if device == "cpu" or (device == "auto" and not gpu):
        return torch.device("cpu"), None
    want = torch.device("cuda" if device == "auto" else device)
    if want.type != "cuda":
        raise ConfigError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    if not gpu:
        raise TrainingError(
            f"device {device!r} was requested but none of the cluster's {len(workers)} workers "
            "has CUDA; start GPU workers (docs: Clusters and GPUs) or use --device cpu"
        )
    offered = [a for a, w in workers.items() if w["resources"].get("GPU", 0) >= 1]
    for addr in sorted(set(offered) - set(gpu)):
        log.warning("worker %s offers a GPU resource but torch sees no CUDA device there", addr)
    if offered:
        return want, {"GPU": 1}
    cpu_only = sorted(set(workers) - set(gpu))
    if cpu_only:
        raise ConfigError(
            f"workers {cpu_only} have no GPU and no worker offers a GPU resource, so fits could "
            "land on them: start the GPU workers with `--resources GPU=1` (dask-jobqueue: "
            "worker_extra_args=['--resources', 'GPU=1']; LocalCluster(resources={'GPU': 1}))"
        )
    return want, None


def _check_torch(workers: dict[str, dict[str, Any]], resources: dict | None) -> None:
    """Every worker a fit may land on can import torch (GPU tasks go to GPU workers only)."""
    eligible = {
        a: w for a, w in workers.items() if resources is None or w["resources"].get("GPU", 0) >= 1
    }
    missing = sorted(a for a, w in eligible.items() if w["torch"] is None)
    if missing:
        raise MissingDependencyError(
            f"Dask workers {missing} cannot import torch, and fits could land on them: install "
            "agbcube[train] (and a PyTorch build for their device) on every training worker"
        )


def _warn_trimmed(workers: dict[str, dict[str, Any]], device: Any) -> None:
    """Warn when CPU fits would run in workers started with ``MALLOC_TRIM_THRESHOLD_``."""
    trimmed = sorted(a for a, w in workers.items() if w.get("trim") is not None)
    if trimmed and device.type == "cpu":
        log.warning(
            "workers %s run with %s set (dask's nanny sets it), which makes torch train on the "
            "CPU at a third to two thirds of its speed; start them with this in a Dask config file "
            "(~/.config/dask/agbcube.yaml):\n%s",
            trimmed,
            TRIM_ENV,
            UNTRIMMED_CONFIG,
        )


def processes_per_host(workers: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many worker processes each machine runs."""
    return dict(Counter(w["host"] for w in workers.values()))


def default_threads(workers: dict[str, dict[str, Any]]) -> int:
    """Torch threads per task: the smallest share of a machine's cores per worker process."""
    per_host = processes_per_host(workers)
    return max(1, min(w["cpus"] // per_host[w["host"]] for w in workers.values()))


# --------------------------------------------------------------------------------------------
# the client's side


class ClusterTasks:
    """Runs a run's tasks on the workers of a Dask client.

    Parameters
    ----------
    client : distributed.Client
    device : str
        ``train.device``; the workers resolve ``auto`` themselves.
    threads_per_task : int, optional
        Torch threads of each task (default `default_threads`).
    """

    def __init__(self, client: Any, device: str, *, threads_per_task: int | None = None) -> None:
        self.client, self.spec = client, device
        workers = _workers(client)
        self.device, self.resources = placement(workers, device)
        _check_torch(workers, self.resources)
        self.threads = threads_per_task or default_threads(workers)
        # how many copies of the chips one machine's memory holds (one per worker process)
        per_host = processes_per_host(workers)
        self.copies = 1 if self.device.type == "cuda" else max(per_host.values())
        self.token = uuid.uuid4().hex[:8]
        _warn_trimmed(workers, self.device)
        busy = sorted(a for a, w in workers.items() if w["nthreads"] > 1)
        if busy and self.resources is None:
            log.warning(
                "workers %s run several threads, but a worker process trains one model at a "
                "time, so tasks would wait behind each other there: start training workers "
                "with one thread each (`dask worker --nthreads 1`)",
                busy,
            )
        log.info(
            "cluster: %d workers on %d machines; training on %s, %d torch threads per task%s",
            len(workers),
            len(per_host),
            self.device.type,
            self.threads,
            ", one GPU per task" if self.resources else "",
        )

    def data_path(self, geometry: Any, n_chips: int, n_bands: int) -> str:
        """``data_path: auto`` decided on a worker, for its device and memory."""
        future = self.client.submit(
            _data_path_on_worker,
            geometry,
            n_chips,
            n_bands,
            self.spec,  # `auto` resolved on the worker, as its tasks will
            self.copies,
            key=f"train/data_path-{self.token}",
            resources=self.resources,
        )
        return future.result()

    # -- the executor (agbcube.train.execute) -----------------------------------------------

    keep_going = True

    @contextlib.contextmanager
    def running(self, run_dir: Path) -> Iterator[None]:
        """The workers' ``agbcube.train`` log records forwarded here while the tasks run; each
        worker releases the run's chips afterwards."""
        self._run_dir, self._futures = run_dir, {}
        self._level = logging.getLogger("agbcube.train").getEffectiveLevel()
        with _forwarded_logs(self.client, self._level):
            yield
        with contextlib.suppress(Exception):  # a worker that is gone holds nothing
            self.client.run(release_run, str(run_dir))

    def submit(self, task: Any, *, after: list[Any], first: bool) -> None:
        """One Dask task per fit, keyed by fold and member (the dashboard groups them)."""
        waits = [self._futures[t] for t in after if t in self._futures]
        self._futures[task] = self.client.submit(
            _run_on_worker,
            task,
            str(self._run_dir),
            self.spec,
            self.threads,
            self._level,
            *waits,
            key=f"{task.name}-{self.token}",
            resources=self.resources,
            priority=1 if first else 0,  # what others wait on first (selections, branch roots)
        )

    def outcomes(self) -> Iterator[tuple[Any, Any]]:
        """Each task as it ends on the cluster: its summary, or its exception."""
        task_of = {f.key: t for t, f in self._futures.items()}
        for future in as_completed(list(self._futures.values())):
            task = task_of[future.key]
            if future.status == "finished":
                yield task, future.result()
                continue
            try:
                err = future.exception()
            except Exception as gone:  # cancelled: the scheduler forgot it
                err = gone
            yield task, _killed(err) if isinstance(err, KilledWorker) else err


def _killed(err: BaseException) -> TrainingError:
    killed = TrainingError(
        "its worker died each time it ran it (out of memory? see the worker's log; a smaller "
        "train.batch_size or train.data_path: chunks needs less)"
    )
    killed.__cause__ = err
    return killed


@contextlib.contextmanager
def _forwarded_logs(client: Any, level: int) -> Iterator[None]:
    """The workers' ``agbcube.train`` records at ``level`` and above (INFO: each epoch's line)
    in this process's log."""
    client.forward_logging("agbcube.train", level=level)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # the cluster may be gone already
            client.unforward_logging("agbcube.train")


# --------------------------------------------------------------------------------------------
# the workers' side


def _run_on_worker(
    task: Any, run_dir: str, device: str, threads: int, level: int, *after: Any
) -> dict[str, Any]:
    """Run one task on this worker (``after``: the results of the tasks it waits for)."""
    logging.getLogger("agbcube.train").setLevel(level)
    with ONE_FIT:
        torch.set_num_threads(threads)
        dev = resolve_device(device)
        run = run_data(Path(run_dir), dev)
        # a resumed fit is the fit: a rerun after a lost worker continues from its checkpoint
        with deterministic(dev), dask.config.set(scheduler="synchronous"):
            summary = run_task(task, run, resume=True)
    keep = ("task", "seconds", "best_epoch", "epochs_run", "stopped", "n_chips")
    return {
        **{k: summary[k] for k in keep if k in summary},
        "worker": get_worker().address,
        "device": str(dev),
    }


def _data_path_on_worker(
    geometry: Any, n_chips: int, n_bands: int, device: str, copies: int
) -> str:
    return auto_data_path(geometry, n_chips, n_bands, resolve_device(device), copies=copies)
