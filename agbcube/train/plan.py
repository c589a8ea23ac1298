"""A run's plan: its settings resolved once, and the tasks they make.

`RunPlan` is a frozen value worked out once, by the process that starts a run, from the
config, the folds and the machine: the device type, the data path (``auto`` decided), the
bands (in order), the chip geometry, the epochs, the seed and every `Task` with its own seed.
It is written to ``run.json`` and read back from there by the Dask workers that run the tasks;
the model files carry the geometry to ``agbcube predict``. Nothing downstream derives a
setting again.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agbcube._io import digest, file_digest
from agbcube.chips import ChipGeometry
from agbcube.config import check_device
from agbcube.errors import FoldError, TrainingError, one_line
from agbcube.folds import n_folds_of, read_folds
from agbcube.train.readers import resolve_bands

__all__ = [
    "RunPlan",
    "Task",
    "auto_data_path",
    "branch_root",
    "make_plan",
    "plan_tasks",
    "prerequisites",
    "resolve_device",
    "run_folds",
]

CNN = "cnn-coordinate"
HGB = "hgb-pixel"


@dataclass(frozen=True, order=True)
class Task:
    """One unit of a run's work: a fit and what it predicts."""

    fold: int
    kind: str  # "select", "member", "baseline" or "random"
    member: int = 0

    @property
    def name(self) -> str:
        """Its result file's stem, relative to the run directory."""
        if self.kind == "random":
            return f"random_cv/fold_{self.fold}"
        if self.kind == "member":
            return f"fold_{self.fold}/member_{self.member}"
        return f"fold_{self.fold}/{self.kind}"

    def result_path(self, run_dir: Path) -> Path:
        return run_dir / f"{self.name}.npz"

    def model_path(self, run_dir: Path) -> Path:
        """A member's model file."""
        return run_dir / f"fold_{self.fold}" / f"model_{self.member}.pt"

    def is_done(self, run_dir: Path) -> bool:
        """Whether its result file (written last) exists, and a member's model file: a member
        whose model file was lost runs again."""
        model = self.kind != "member" or self.model_path(run_dir).exists()
        return model and self.result_path(run_dir).exists()


def plan_tasks(tcfg: Any, n_folds: int) -> list[Task]:
    """Every task of a run, in an order that runs each after the tasks it needs."""
    tasks: list[Task] = []
    for k in range(n_folds):
        if tcfg.model == CNN:
            if tcfg.refit and not tcfg.early_stopped_member:
                tasks.append(Task(k, "select"))
            tasks += [Task(k, "member", m) for m in range(tcfg.ensemble)]
        if HGB in (tcfg.model, tcfg.baseline):
            tasks.append(Task(k, "baseline"))
    if tcfg.random_cv:
        tasks += [Task(k, "random") for k in range(n_folds)]
    return tasks


def is_refit(tcfg: Any, task: Task) -> bool:
    """A member trained for the selected number of epochs on every chip beyond the buffer."""
    if task.kind != "member" or not tcfg.refit:
        return False
    return not (tcfg.early_stopped_member and task.member == 0)


def selection(tcfg: Any, fold: int) -> Task:
    """The task whose early-stopped fit picks fold ``fold``'s number of refit epochs."""
    return Task(fold, "member", 0) if tcfg.early_stopped_member else Task(fold, "select")


def branch_root(tcfg: Any, task: Task) -> Task | None:
    """The member whose weights a member continues from (``train.members: branch``: member 0
    of its fold, for members 1 and up), or ``None`` for a member trained from scratch."""
    if tcfg.members != "branch" or not is_refit(tcfg, task) or task.member == 0:
        return None
    return Task(task.fold, "member", 0)


def prerequisites(tcfg: Any, task: Task) -> list[Task]:
    """The tasks whose results a task reads: a refit member's selection (the number of
    epochs), and a branch member's root (its starting weights)."""
    if not is_refit(tcfg, task):
        return []
    root = branch_root(tcfg, task)
    needs = [selection(tcfg, task.fold)]
    return [*needs, root] if root is not None and root not in needs else needs


def task_seed(tcfg: Any, task: Task) -> int:
    """A task's seed: fold k's base seed, then apart by member and by kind (the ``hgb-pixel``
    fits seed ``train.seed + k``)."""
    base = tcfg.seed * 1000 + task.fold
    if task.kind in ("baseline", "random"):
        return tcfg.seed + task.fold
    if is_refit(tcfg, task):
        return base + 500_000 + 100_000 * task.member
    return base + 100_000 * task.member


@dataclass(frozen=True)
class RunPlan:
    """A run's settings, resolved once (see the module docstring).

    Attributes
    ----------
    device : str
        The device type the fits train on (``cpu``, ``cuda``); each process takes its own
        device of that type (a worker sees its GPU as ``cuda``).
    data_path : str
        ``device``, ``chunks`` or ``stream``.
    bands : tuple of str
        The model's input bands, in order.
    geometry : ChipGeometry
    epochs, seed, n_folds : int
    tasks : tuple of Task
    """

    device: str
    data_path: str
    bands: tuple[str, ...]
    geometry: ChipGeometry
    epochs: int
    seed: int
    n_folds: int
    tasks: tuple[Task, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "data_path": self.data_path,
            "bands": list(self.bands),
            "geometry": self.geometry.to_dict(),
            "epochs": self.epochs,
            "seed": self.seed,
            "n_folds": self.n_folds,
            "tasks": [[t.fold, t.kind, t.member] for t in self.tasks],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunPlan:
        return cls(
            str(d["device"]),
            str(d["data_path"]),
            tuple(d["bands"]),
            ChipGeometry.from_dict(d["geometry"]),
            int(d["epochs"]),
            int(d["seed"]),
            int(d["n_folds"]),
            tuple(Task(int(k), str(kind), int(m)) for k, kind, m in d["tasks"]),
        )

    @property
    def digest(self) -> str:
        return digest(self.to_dict())

    @classmethod
    def read(cls, run_dir: Path) -> RunPlan:
        """The plan ``run.json`` records."""
        path = Path(run_dir) / "run.json"
        try:
            return cls.from_dict(json.loads(path.read_text())["plan"])
        except OSError as err:
            raise TrainingError(
                f"cannot read {path} ({err.strerror or err}); a Dask worker needs the run "
                "directory, the cube and the folds at the same paths as the client (a shared "
                "file system)"
            ) from err
        except (ValueError, KeyError, TypeError, OverflowError, AttributeError) as err:
            why = one_line(err, 160)
            raise TrainingError(
                f"{path} holds no readable run plan ({type(err).__name__}: {why}); start the run "
                "again with --overwrite"
            ) from None


def run_folds(run_dir: Path, *, cube: Any = None) -> Any:
    """The run's own copy of its folds (``folds.parquet``), which its fits read, checked to be
    the file ``run.json`` records: a copy replaced by other folds is refused, since a run's
    predictions and its area of applicability hold only for the partition it was trained on.

    Raises
    ------
    FoldError
        The copy is not the file the run recorded, or is not a valid folds file
        (`agbcube.folds.read_folds`, which ``cube`` is passed to).
    """
    copy = Path(run_dir) / "folds.parquet"
    try:
        recorded = json.loads((Path(run_dir) / "run.json").read_text())["digests"]["folds"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None  # a run from before digests: read as it is
    if recorded and copy.is_file() and file_digest(copy) != recorded:
        raise FoldError(
            f"{copy} is not the folds file run {run_dir} was trained on (run.json records "
            "another); put back the folds the run was made with, or train the run again"
        )
    return read_folds(copy, cube=cube)


def make_plan(
    config: Any, folds: Any, *, device: Any, data_path: str | Callable[..., str]
) -> RunPlan:
    """The plan of a run of ``config`` (its ``train`` section as the run uses it) on the
    chips of ``folds``.

    ``data_path``: the data path, or a function of ``(geometry, n_chips, n_bands)`` that
    decides ``train.data_path: auto`` (`auto_data_path` here, a worker on a cluster).
    """
    tcfg = config.train
    bands = resolve_bands(config.cube.output, folds["site"], tcfg.bands)
    geometry = ChipGeometry.of(config.chips, tcfg)
    if callable(data_path):
        path = tcfg.data_path
        if path == "auto":
            path = data_path(geometry, len(folds), len(bands))
    else:
        path = data_path
    n_folds = n_folds_of(folds)
    return RunPlan(
        device=torch.device(device).type,
        data_path=path,
        bands=tuple(bands),
        geometry=geometry,
        epochs=int(tcfg.epochs),
        seed=int(tcfg.seed),
        n_folds=n_folds,
        tasks=tuple(plan_tasks(tcfg, n_folds)),
    )


def auto_data_path(
    geometry: ChipGeometry, n_chips: int, n_bands: int, device: Any, *, copies: int = 1
) -> str:
    """``data_path: auto``: device-resident when every chip fits in half the free memory of
    ``device`` (``copies``: processes of this machine that each hold them, e.g. its Dask
    workers), else ``chunks``."""
    need = n_chips * (n_bands + 3) * geometry.read_px**2 * 4 * 2 * copies  # host + device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return "chunks" if need > 0.5 * free else "device"


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device when present, else the CPU; ``gpu`` is ``cuda``.

    Raises
    ------
    ConfigError
        For a name that is not a device (listing those accepted).
    TrainingError
        For a CUDA device where torch has no CUDA.
    """
    spec = check_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            f"device {spec!r} was requested but CUDA is not available; use --device cpu or "
            "install a CUDA build of torch (docs: Getting started, 'PyTorch builds')"
        )
    return device


@contextlib.contextmanager
def deterministic(dev: Any) -> Iterator[None]:
    """Deterministic kernels on the CPU (bit-identical resume and reruns), restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
