"""What a run's tasks read, once per process: the folds, the chips, each fold's preparation.

`RunData` holds a run's folds table and its chips (through the plan's data path), and keeps
the last fold's preparation and batch sources. `run_data` is the process's cache of them, keyed
by the run directory, the device and the digest of the run's record (``run.json``, which holds
the plan): the sequential path and every Dask worker take their `RunData` from it, so the tasks
of one process share what they read and a run directory that now holds another run is read
afresh.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agbcube.config import load_run_config
from agbcube.errors import TrainingError
from agbcube.folds import label_masks, training_pool
from agbcube.train.batches import DeviceBatches, Preparation, StreamBatches
from agbcube.train.plan import RunPlan, run_folds
from agbcube.train.readers import chip_lonlat, make_reader

__all__ = ["FoldData", "FoldRoles", "RunData", "release_run", "run_data"]

log = logging.getLogger(__name__)


@dataclass
class FoldRoles:
    """Which chips (rows of the folds table) and pixels each role of fold k uses."""

    train: np.ndarray
    train_mask: np.ndarray | None  # pixels whose labels may train (label_buffer: pixel)
    val: np.ndarray
    test: np.ndarray
    pool: np.ndarray  # every chip beyond the test buffer: a refit's and the baseline's
    pool_mask: np.ndarray | None
    label_distance_m: float


class RunData:
    """What a run's tasks read, read once per process: the folds, the chips, each fold's
    preparation. Built from a run directory (its ``config.yaml``, ``run.json`` and
    ``folds.parquet``: `run_data`), or from a config and a folds table.

    Parameters
    ----------
    config : agbcube.config.Config
        The run's configuration (its ``train`` section as the run uses it).
    run_dir : Path or None
    plan : RunPlan
        The run's settings (data path, bands, chip geometry …), resolved once.
    device : torch.device
        This process's device of the plan's type.
    folds : GeoDataFrame, optional
        The folds, when not the run directory's copy (`agbcube.train.ChipDataset`).
    """

    def __init__(
        self, config: Any, run_dir: Path | None, plan: RunPlan, device: Any, *, folds: Any = None
    ) -> None:
        self.config, self.run_dir, self.plan, self.device = config, run_dir, plan, device
        self.tcfg = config.train
        self.folds = run_folds(run_dir) if folds is None else folds
        self.data_path, self.geometry = plan.data_path, plan.geometry
        self.bands, self.n_folds = list(plan.bands), plan.n_folds
        self._fold: FoldData | None = None

    @cached_property
    def reader(self) -> Any:
        """The chips of the whole folds table, through the run's data path."""
        t0 = time.perf_counter()
        g = self.geometry
        reader = make_reader(
            self.data_path,
            self.config.cube.output,
            self.folds,
            size_px=g.size_px,
            stride_px=g.stride_px,
            bands=self.bands,
            context_px=g.context_px,
            lonlat=self.tcfg.coordinates == "geographic",
        )
        if self.data_path == "device":
            log.info(
                "read %d chips × %d bands in %.1f s; training on %s, device-resident",
                len(reader),
                len(self.bands),
                time.perf_counter() - t0,
                self.device,
            )
        return reader

    @cached_property
    def lonlat(self) -> np.ndarray:
        """Longitude and latitude of every chip pixel (for the label masks; no data read)."""
        return chip_lonlat(self.config.cube.output, self.folds, size_px=self.geometry.size_px)

    def roles(self, k: int) -> FoldRoles:
        """Fold ``k``'s roles, with the label masks of ``train.label_buffer: pixel``."""
        role = self.folds[f"role_{k}"].to_numpy()
        train, val, test = (np.flatnonzero(role == r) for r in ("train", "val", "test"))
        if self.tcfg.label_buffer != "pixel":
            return FoldRoles(train, None, val, test, training_pool(self.folds, k), None, np.inf)
        masks = label_masks(self.folds, k, self.lonlat)
        (train, train_mask, d_train), (pool, pool_mask, d_pool) = masks["train"], masks["pool"]
        return FoldRoles(train, train_mask, val, test, pool, pool_mask, min(d_train, d_pool))

    def fold(self, k: int) -> FoldData:
        """Fold ``k``'s data (the last fold asked for is kept)."""
        if self._fold is None or self._fold.k != k:
            self._fold = None  # release the previous fold's device memory first
            self._fold = FoldData(self, k)
        return self._fold

    def blocks(self, positions: np.ndarray) -> Any:
        return self.reader.blocks(positions)

    def raw(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw features and AGB windows of chips (unique ``positions``), in that order
        (readers may deliver them in another)."""
        xs, agbs, where = [], [], []
        for block in self.blocks(positions):
            xs.append(block.x)
            agbs.append(block.agb)
            where.append(block.positions)
        local = {int(p): i for i, p in enumerate(positions)}
        order = np.argsort([local[int(p)] for p in np.concatenate(where)], kind="stable")
        return np.concatenate(xs)[order], np.concatenate(agbs)[order]


class FoldData:
    """Fold k's roles, its preparation (fitted on its training chips) and batch sources."""

    def __init__(self, run: RunData, k: int) -> None:
        self.run, self.k = run, k
        self.roles = run.roles(k)
        tcfg = run.tcfg
        self.prep = Preparation.fit(
            run.blocks(self.roles.train),
            self.mask_of(self.roles.train, self.roles.train_mask),
            coordinates=tcfg.coordinates == "geographic",
            per_chip=tcfg.head != "dense",
            log_target=tcfg.log_target,
            geometry=run.geometry,
        )
        self._sources: dict[str, Any] = {}

    @staticmethod
    def mask_of(positions: np.ndarray, mask: np.ndarray | None) -> Any:
        """``table rows → their label masks`` for chips of ``positions`` (None: no mask)."""
        if mask is None:
            return lambda rows: None
        local = {int(p): i for i, p in enumerate(positions)}
        return lambda rows: mask[[local[int(r)] for r in rows]]

    def source(self, role: str) -> Any:
        """The `BatchSource` of ``train``, ``val`` or ``pool``."""
        if role not in self._sources:
            self._sources[role] = self._make_source(role)
        return self._sources[role]

    def chips(self, role: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The table rows of ``train``, ``val``, ``test`` or ``pool`` and their label masks
        (None: every label may be used)."""
        r = self.roles
        return {
            "train": (r.train, r.train_mask),
            "val": (r.val, None),
            "test": (r.test, None),
            "pool": (r.pool, r.pool_mask),
        }[role]

    def _make_source(self, role: str) -> Any:
        positions, mask = self.chips(role)
        run = self.run
        if run.data_path == "device":
            return DeviceBatches.prepare(
                run.blocks(positions), self.prep, self.mask_of(positions, mask), run.device
            )
        return StreamBatches(
            run.reader,
            positions,
            mask,
            self.prep,
            run.device,
            shuffle_chips=run.tcfg.shuffle_chips,
        )

    def in_test_order(self, fn: Any) -> np.ndarray:
        """``fn(block)`` of the test chips' raw blocks, stacked in the order of ``roles.test``
        (readers may deliver them in another order)."""
        test = self.roles.test
        local = {int(p): i for i, p in enumerate(test)}
        out = None
        for block in self.run.blocks(test):
            part = fn(block)
            if out is None:
                out = np.empty((test.size, *part.shape[1:]), part.dtype)
            out[[local[int(p)] for p in block.positions]] = part
        if out is None:
            raise TrainingError(f"fold {self.k} has no test chips")
        return out


# --------------------------------------------------------------------------------------------
# the process's cache

ONE_FIT = threading.Lock()  # a process trains one model at a time (agbcube.train.cluster)
_RUNS: OrderedDict[tuple[str, str], tuple[str, RunData]] = OrderedDict()
_KEEP_RUNS = 2  # run directories whose chips a process keeps (a long-lived worker serves many)


def run_data(run_dir: Path, device: Any) -> RunData:
    """This process's `RunData` of a run directory on ``device``: built once (from the run's
    ``config.yaml``, ``run.json`` and ``folds.parquet``), and again only when the run
    directory holds another run (its ``run.json`` or ``config.yaml`` changed)."""
    try:
        stamp = (run_dir / "run.json").read_bytes() + (run_dir / "config.yaml").read_bytes()
    except OSError as err:
        raise TrainingError(
            f"cannot read the run directory {run_dir} ({err.strerror or err}); a Dask worker "
            "needs the run directory, the cube and the folds at the same paths as the client "
            "(a shared file system)"
        ) from err
    key, token = (str(run_dir.resolve()), str(device)), hashlib.sha256(stamp).hexdigest()
    hit = _RUNS.get(key)
    if hit is not None and hit[0] == token:
        _RUNS.move_to_end(key)
        return hit[1]
    _RUNS.pop(key, None)  # release the old run's chips first
    run = RunData(load_run_config(run_dir), run_dir, RunPlan.read(run_dir), device)
    _RUNS[key] = (token, run)
    while len(_RUNS) > _KEEP_RUNS:
        _RUNS.popitem(last=False)
    return run


def release_run(run_dir: str | Path) -> int:
    """Drop this process's chips and fold preparations of a run (its device memory too), as
    a run does in every process when it has ended; the entries dropped."""
    key = str(Path(run_dir).resolve())
    with ONE_FIT:
        drop = [k for k in _RUNS if k[0] == key]
        for k in drop:
            del _RUNS[k]
    if drop and any(k[1].startswith("cuda") for k in drop):
        torch.cuda.empty_cache()
    return len(drop)
