"""A fit is a value: the one function that runs each task of a cross-validation run.

A run is planned as `agbcube.train.plan.Task` s, each a pure function of (cube, folds,
settings, seed):

* ``select`` (with ``train.refit``): fold k's early-stopped fit, trained on its training chips
  and stopped on its validation chips; its result is the number of epochs the refits train
  (with ``train.early_stopped_member`` it is member 0 instead, and writes what members do);
* ``member`` m: one model of fold k's ensemble: with ``train.refit`` a fresh model trained on
  every chip beyond the test buffer for the selected number of epochs, else an early-stopped
  fit from its own seed; with ``train.members: branch`` members 1 and up continue from member
  0's weights for a fraction of the epochs (see `TrainConfig`). It writes its model file and
  its test chips' predictions;
* ``baseline``: the ``hgb-pixel`` model of fold k, on the same chips;
* ``random``: the ``hgb-pixel`` model on fold k of a random K-fold of the same chips
  (``train.random_cv``: the leaky figure).

`run_task` runs one: it writes its outputs atomically to its own paths under the run
directory, its result file last, and returns a small summary. A task whose result file exists
is done: resuming skips it. What the tasks of one process share (the chips read, each fold's
preparation) is the process's `agbcube.train.data.RunData`, built from the run directory
alone, so a task can run in another process that sees the same files.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agbcube._io import atomic_path, remove_path
from agbcube.errors import TrainingError, one_line
from agbcube.train.baseline import baseline_fold, random_cv_fold
from agbcube.train.data import FoldData, RunData
from agbcube.train.loop import build_model, chip_centres_km, fit, predict
from agbcube.train.modelfile import model_record, read_record, save_model
from agbcube.train.plan import Task, branch_root, is_refit, selection, task_seed

__all__ = ["checkpoint_path", "load_result", "run_task", "test_agb"]


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
        arrays, summary = random_cv_fold(run, task.fold)
    elif task.kind == "baseline":
        arrays, summary = baseline_fold(run, task.fold)
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
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        why = one_line(err, 160) or type(err).__name__  # truncated or not .npz
        raise TrainingError(
            f"task result {path} cannot be read ({why}); delete it and run again with --resume"
        ) from None
    return summary, arrays


def _cnn(run: RunData, task: Task, *, resume: bool) -> tuple[dict, dict]:
    """An early-stopped fit (``select``, or a member without refit) or a refit member."""
    dev, k = run.device, task.fold
    data = run.fold(k)
    refit = is_refit(run.tcfg, task)
    if refit:
        positions, source, val = data.roles.pool, data.source("pool"), None
        tcfg, epochs, start = _refit_schedule(run, task)
    else:
        positions, source, val = data.roles.train, data.source("train"), None
        val = data.source("val") if data.roles.val.size else None
        tcfg, epochs, start = run.tcfg, run.plan.epochs, None
    centres = torch.from_numpy(chip_centres_km(run.folds.iloc[positions])).to(dev)
    seed = task_seed(tcfg, task)
    kind = "branch" if start is not None else "refit"
    label = f"fold {k}" + (f" {kind}{_suffix(task)} on {positions.size} chips" if refit else "")
    if task.kind == "member" and not refit and task.member:
        label = f"fold {k} member {task.member}"
    checkpoint = checkpoint_path(run.run_dir, task)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_model(tcfg, data.prep.n_channels, run.geometry.window_px).to(dev)
        if start is not None:
            model.load_state_dict(start)
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
    record = model_record(model, data.prep, run.tcfg, bands=run.bands, fold=k, member=task.member)
    save_model(task.model_path(run.run_dir), record)
    return {"pred": pred}, summary


def _refit_schedule(run: RunData, task: Task) -> tuple[Any, int, dict | None]:
    """A refit member's settings, epochs and starting weights (``None``: from scratch).

    A branch (``train.members: branch``) starts from its root member's weights and trains
    ``branch_fraction`` of the selected epochs under a cosine schedule restarted at the
    learning rate; mining runs from its first epoch where the root's last epochs mined.
    """
    tcfg, k = run.tcfg, task.fold
    chosen = load_result(selection(tcfg, k).result_path(run.run_dir))[0]
    epochs = int(chosen["best_epoch"]) + 1
    root = branch_root(tcfg, task)
    if root is None:
        return tcfg, epochs, None
    start = read_record(root.model_path(run.run_dir))["state_dict"]
    mined = tcfg.hard_negative_mining and epochs > tcfg.hnm_start_epoch
    branch = tcfg.model_copy(update={"hnm_start_epoch": 0 if mined else tcfg.hnm_start_epoch})
    return branch, max(1, round(tcfg.branch_fraction * epochs)), start


def _suffix(task: Task) -> str:
    return f"_{task.member}" if task.member else ""


def test_agb(data: FoldData) -> np.ndarray:
    """The test chips' AGB (Mg/ha, NaN where missing) over their own pixels, in test order."""
    return data.in_test_order(lambda block: data.prep.core(block.agb))
