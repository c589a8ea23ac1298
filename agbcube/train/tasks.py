"""A fit is a value: the tasks of a cross-validation run and the one function that runs each.

A run is planned as `Task` s, each a pure function of (cube, folds, settings, seed):

* ``select`` (with ``train.refit``): fold k's early-stopped fit, trained on its training chips
  and stopped on its validation chips; its result is the number of epochs the refits train
  (with ``train.early_stopped_member`` it is member 0 instead, and writes what members do);
* ``member`` m: one model of fold k's ensemble: with ``train.refit`` a fresh model trained on
  every chip beyond the test buffer for the selected number of epochs, else an early-stopped
  fit from its own seed. It writes its model file and its test chips' predictions;
* ``baseline``: the ``hgb-pixel`` model of fold k, on the same chips;
* ``random``: the ``hgb-pixel`` model on fold k of a random K-fold of the same chips
  (``train.random_cv``: the leaky figure).

`run_task` runs one: it writes its outputs atomically to its own paths under the run
directory, its result file last, and returns a small summary. A task whose result file exists
is done: resuming skips it. What the tasks of one process share (the chips read, each fold's
preparation) lives in `RunData`, built from the run directory alone, so a task can run
in another process that sees the same files.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from agbcube._io import atomic_path, remove_path
from agbcube.errors import TrainingError

__all__ = ["FoldData", "RunData", "Task", "load_result", "plan_tasks", "run_task"]

log = logging.getLogger(__name__)

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


def _seed(tcfg: Any, task: Task) -> int:
    """A fit's seed: fold k's base seed, then apart by member and by kind."""
    base = tcfg.seed * 1000 + task.fold
    if is_refit(tcfg, task):
        return base + 500_000 + 100_000 * task.member
    return base + 100_000 * task.member


# --------------------------------------------------------------------------------------------
# what the tasks of one process share


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
    preparation. Built from a run directory (its ``config.yaml`` and ``folds.parquet``).

    Parameters
    ----------
    config : agbcube.config.Config
        The run's configuration (its ``train`` section as the run uses it).
    run_dir : Path
    device : torch.device
    data_path : str
        ``device``, ``chunks`` or ``stream`` (already resolved from ``auto``).
    folds : GeoDataFrame, optional
        The folds, when not the run directory's copy (`agbcube.train.ChipDataset`).
    """

    def __init__(
        self, config: Any, run_dir: Path, device: Any, data_path: str, *, folds: Any = None
    ) -> None:
        from agbcube.folds import read_folds

        self.config, self.run_dir, self.device, self.data_path = config, run_dir, device, data_path
        self.tcfg = config.train
        self.folds = read_folds(run_dir / "folds.parquet") if folds is None else folds
        self.n_folds = sum(1 for c in self.folds.columns if c.startswith("role_"))
        self.size_px = config.chips.size
        self.margin = self.tcfg.context_px  # read around every chip
        # the dense head's unpadded convolutions take one pixel of context per block
        dense = self.tcfg.head == "dense" and self.tcfg.model == CNN
        self.model_margin = len(self.tcfg.conv_channels) if dense else 0
        self._fold: FoldData | None = None

    @property
    def stride_px(self) -> int:
        chips = self.config.chips
        return max(1, round(chips.size * (1.0 - chips.overlap)))

    @cached_property
    def bands(self) -> list[str]:
        from agbcube.train.readers import resolve_bands

        return resolve_bands(self.config.cube.output, self.folds["site"], self.tcfg.bands)

    @cached_property
    def reader(self) -> Any:
        """The chips of the whole folds table, through the run's data path."""
        from agbcube.train.readers import make_reader

        t0 = time.perf_counter()
        reader = make_reader(
            self.data_path,
            self.config.cube.output,
            self.folds,
            size_px=self.size_px,
            stride_px=self.stride_px,
            bands=self.bands,
            margin=self.margin,
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
        from agbcube.train.readers import chip_lonlat

        return chip_lonlat(self.config.cube.output, self.folds, size_px=self.size_px)

    def roles(self, k: int) -> FoldRoles:
        """Fold ``k``'s roles, with the label masks of ``train.label_buffer: pixel``."""
        from agbcube.folds import label_masks, training_pool

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
        from agbcube.train.batches import Preparation

        self.run, self.k = run, k
        self.roles = run.roles(k)
        tcfg = run.tcfg
        self.prep = Preparation.fit(
            run.blocks(self.roles.train),
            self.mask_of(self.roles.train, self.roles.train_mask),
            coordinates=tcfg.coordinates == "geographic",
            per_chip=tcfg.head != "dense",
            log_target=tcfg.log_target,
            size_px=run.size_px,
            margin=run.margin,
            model_margin=run.model_margin,
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
        from agbcube.train.batches import DeviceBatches, StreamBatches

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
# running a task


def run_task(task: Task, run: RunData, *, resume: bool = False) -> dict[str, Any]:
    """Run one task and write its outputs; return its summary.

    A task whose result file exists is not run again: its summary is read back.
    """
    path = task.result_path(run.run_dir)
    if task.is_done(run.run_dir):
        return load_result(path)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if task.kind == "random":
        from agbcube.train.evaluate import random_cv_fold

        arrays, summary = random_cv_fold(run, task.fold)
    elif task.kind == "baseline":
        arrays, summary = _baseline(run, task)
    else:
        arrays, summary = _cnn(run, task, resume=resume)
    summary.update(task=task.name, seconds=time.perf_counter() - t0)
    _write_result(path, arrays, summary)
    if task.kind in ("select", "member"):  # only a fit without its result needs its checkpoint
        remove_path(checkpoint_path(run.run_dir, task))
    return summary


def checkpoint_path(run_dir: Path, task: Task) -> Path:
    """Where a fit keeps its last epoch until its result is written (``--resume`` reads it)."""
    return run_dir / f"fold_{task.fold}" / f"checkpoint_{task.name.split('/')[-1]}.pt"


def _write_result(path: Path, arrays: dict[str, np.ndarray], summary: dict[str, Any]) -> None:
    with atomic_path(path, what="task result") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays, summary=np.array(json.dumps(summary, default=float)))


def load_result(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A task's summary and arrays, read back from its result file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k != "summary"}
            summary = json.loads(str(npz["summary"]))
    except (OSError, ValueError, KeyError) as err:
        raise TrainingError(
            f"task result {path} cannot be read ({err}); delete it and run again with --resume"
        ) from None
    return summary, arrays


def _cnn(run: RunData, task: Task, *, resume: bool) -> tuple[dict, dict]:
    """An early-stopped fit (``select``, or a member without refit) or a refit member."""
    import torch

    from agbcube.train.loop import build_model, chip_centres_km, fit, predict
    from agbcube.train.modelfile import model_record, save_model

    tcfg, dev, k = run.tcfg, run.device, task.fold
    data = run.fold(k)
    refit = is_refit(tcfg, task)
    if refit:
        chosen = load_result(selection(tcfg, k).result_path(run.run_dir))[0]
        positions, source, val = data.roles.pool, data.source("pool"), None
        epochs = int(chosen["best_epoch"]) + 1
    else:
        positions, source, val = data.roles.train, data.source("train"), None
        val = data.source("val") if data.roles.val.size else None
        epochs = tcfg.epochs
    centres = torch.from_numpy(chip_centres_km(run.folds.iloc[positions])).to(dev)
    seed = _seed(tcfg, task)
    label = f"fold {k}" + (f" refit{_suffix(task)} on {positions.size} chips" if refit else "")
    if task.kind == "member" and not refit and task.member:
        label = f"fold {k} member {task.member}"
    checkpoint = checkpoint_path(run.run_dir, task)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        window = run.size_px + 2 * run.model_margin
        model = build_model(tcfg, data.prep.n_channels, window).to(dev)
        result = fit(
            model,
            source,
            val,
            tcfg,
            n_spectral=len(run.bands),
            seed=seed,
            epochs=epochs,
            checkpoint=checkpoint,
            resume=resume,
            centres=centres,
            label=label,
            restore_best=not refit,
        )
    summary = {
        "fold": k,
        "kind": task.kind,
        "member": task.member,
        "refit": refit,
        "seed": seed,
        "n_chips": int(positions.size),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped": result.stopped,
        "bad_steps": result.bad_steps,
        "history": result.history,
    }
    if task.kind == "select":
        return {}, summary
    tta = tcfg.tta_rotations if tcfg.tta else 1

    def mg_ha(block: Any) -> np.ndarray:
        x = torch.from_numpy(data.prep.inputs(block)).to(dev)
        return data.prep.target.decode(predict(model, x, tta=tta).cpu().numpy())

    pred = data.in_test_order(mg_ha)
    record = model_record(model, data.prep, tcfg, bands=run.bands, fold=k, member=task.member)
    save_model(task.model_path(run.run_dir), record)
    return {"pred": pred}, summary


def _suffix(task: Task) -> str:
    return f"_{task.member}" if task.member else ""


def _baseline(run: RunData, task: Task) -> tuple[dict, dict]:
    """The ``hgb-pixel`` model of fold k: pixels of every chip beyond the test buffer."""
    from agbcube.train.baseline import fit_hgb_pixels, predict_hgb_pixels
    from agbcube.train.batches import TargetTransform, make_target
    from agbcube.train.evaluate import baseline_sample

    tcfg, k = run.tcfg, task.fold
    data = run.fold(k)
    pool, pool_mask = data.roles.pool, data.roles.pool_mask
    rng = np.random.default_rng(tcfg.seed + k)
    pick = baseline_sample(pool.size, run.size_px, tcfg.hgb_max_pixels, rng, run.data_path)
    x, agb = _raw(run, pool[pick], None if pool_mask is None else pool_mask[pick])
    target = make_target(agb, log=tcfg.log_target, per_chip=False)
    hgb = fit_hgb_pixels(x, target, max_pixels=tcfg.hgb_max_pixels, random_state=tcfg.seed + k)
    pred = data.in_test_order(lambda block: predict_hgb_pixels(hgb, data.prep.core(block.x)))
    mg = TargetTransform(log=tcfg.log_target).decode(pred)  # its own, unstandardised target
    log.info("fold %d: %s baseline fitted on %d chips", k, HGB, pick.size)
    return {"pred": mg}, {"fold": k, "kind": "baseline", "n_chips": int(pick.size)}


def _raw(run: RunData, positions: np.ndarray, mask: np.ndarray | None) -> tuple[Any, Any]:
    """Raw features and AGB (labels ``mask`` hides set to NaN) of chips, in order."""
    from agbcube.train.batches import masked_labels

    x, agb = run.raw(positions)
    return x, masked_labels(agb, mask, run.margin, run.size_px)


def test_agb(data: FoldData) -> np.ndarray:
    """The test chips' AGB (Mg/ha, NaN where missing) over their own pixels, in test order."""
    return data.in_test_order(lambda block: data.prep.core(block.agb))
