"""``agbcube train``: plan a cross-validation run's fit tasks, run them, assemble the metrics.

Run directory::

    run.json               what made the run: digests of the cube, the folds
                           and the training settings (``--resume`` refuses when one changed),
                           and its plan (`agbcube.train.plan.RunPlan`), which workers read
    config.yaml            the configuration, as the run used it
    folds.parquet          the folds used (a copy)
    fold_k/select.npz      the early-stopped fit whose epoch count the refits train for
    fold_k/member_m.npz    member m's test predictions and summary (its task is done)
    fold_k/model_m.pt      member m's model file (weights, standardisation, bands, settings)
    fold_k/baseline.npz    the hgb-pixel baseline's test predictions
    fold_k/checkpoint_*.pt a running fit's last epoch (for --resume; gone with its result)
    random_cv/fold_k.npz   train.random_cv: the baseline under a random split
    predictions.parquet    chip_id, site, fold, model, agb_true, agb_pred, log_true, log_pred
    pixels.parquet         chip_id, site, row, col, fold, model, agb_true, agb_pred, agb_std
                           per scored pixel (row, col: the pixel in its site's cube)
    metrics.json           chip and pixel level, Mg/ha and log scale, per fold/site/overall,
                           R² intervals; "difference": the model minus the baseline per site;
                           "random_cv": the baseline under a random split
    ensemble.pt            every member, for `agbcube predict`
    plots/*.png
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

import agbcube
from agbcube._dask import IN_PROCESS
from agbcube._io import (
    MARKER,
    atomic_path,
    digest,
    file_digest,
    output_kind,
    output_lock,
    prepare_output_dir,
    remove_path,
    write_json_atomic,
)
from agbcube._progress import progress_bar
from agbcube._store import open_cube
from agbcube.chips import ChipGeometry
from agbcube.config import ChipsConfig, TrainConfig, with_overrides
from agbcube.errors import OutputExistsError, TrainingError
from agbcube.folds import make_folds, read_folds, write_folds
from agbcube.train.data import RunData, release_run, run_data
from agbcube.train.evaluate import assemble
from agbcube.train.execute import InProcess, execute, remove_temporaries
from agbcube.train.modelfile import load_bundle, read_record, save_bundle
from agbcube.train.plan import RunPlan, auto_data_path, make_plan, resolve_device
from agbcube.train.plots import write_plots
from agbcube.train.tasks import load_result

__all__ = ["load_ensemble", "run_cv", "training_history"]

log = logging.getLogger(__name__)

# Settings that do not change a run's results: a run may be resumed with other values.
_NEUTRAL = ("output", "device")


def run_cv(
    config: Any,
    *,
    device: str | None = None,
    epochs: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    output: str | Path | None = None,
    plots: bool = True,
    scheduler: str | None = None,
    threads_per_task: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every fold; write the run directory.

    Parameters
    ----------
    config : agbcube.config.Config
        Reads ``cube.output``, ``chips``, ``folds`` (making the folds when missing) and ``train``.
    device : str, optional
        Overrides ``train.device``: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    epochs : int, optional
        Overrides ``train.epochs`` (validated as the config's own value would be).
    resume : bool
        Continue an interrupted run: finished tasks are kept, a running fit continues from
        its last checkpoint. Refused when the cube, the folds or the settings changed.
    overwrite : bool
        Replace an existing run (only a folder that holds an agbcube run).
    output : str or Path, optional
        Overrides ``train.output``.
    plots : bool
        Write the plots.
    scheduler : str, optional
        Where the tasks run: here one after another (default, ``"threads"``, ``"synchronous"``),
        on a LocalCluster started for the run (``"local"``, ``"processes"``) or on the cluster
        at an address (``"tcp://host:8786"``); see `agbcube.train.cluster`.
    threads_per_task : int, optional
        On a cluster: torch threads of each task (default: each worker process's share of its
        machine's cores).
    progress : bool
        A bar of the run's tasks (fits) on stderr: in a terminal, a notebook or a log.

    Returns
    -------
    dict
        The content of ``metrics.json``.
    """
    t_start = time.perf_counter()
    tcfg = with_overrides(config.train, "train", device=device, epochs=epochs)
    config = config.model_copy(update={"train": tcfg})
    out = Path(output or tcfg.output)
    with (
        output_lock(out, what="run directory"),
        _tidy_when_interrupted(out, scheduler),
        _cluster(scheduler, tcfg.device, threads_per_task) as cluster,
    ):
        dev = cluster.device if cluster else resolve_device(tcfg.device)
        _prepare_output(out, resume=resume, overwrite=overwrite)
        folds_path = _ensure_folds(config)
        plan = _plan(config, folds_path, dev, cluster)
        _record_run(config, folds_path, out, plan=plan, resume=resume)
        log.info(
            "%d tasks over %d folds; training on %s (%s)",
            len(plan.tasks),
            plan.n_folds,
            dev,
            plan.data_path,
        )
        executor = cluster or InProcess(out, dev, resume=resume)
        with progress_bar("training", total=len(plan.tasks), enabled=progress) as advance:
            execute(list(plan.tasks), out, executor, tcfg=tcfg, bar=advance)
        # on a cluster this process only assembles the workers' results: on its CPU
        run = run_data(out, torch.device("cpu") if cluster else dev)
        metrics = _finish(run, plots=plots)
    release_run(out)
    metrics["run"] = _how_it_ran(scheduler, dev, t_start, len(run.folds), plan)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


@contextmanager
def _tidy_when_interrupted(out: Path, scheduler: str | None) -> Iterator[None]:
    """After Ctrl-C, once the fits have stopped (this process's, or a LocalCluster's workers,
    closed first), remove what they left half-written; a remote cluster's workers may still
    be writing, so their leftovers wait for the next ``--resume``, which removes them."""
    try:
        yield
    except KeyboardInterrupt:
        if scheduler is None or "://" not in scheduler:
            remove_temporaries(out)
        raise


@contextmanager
def _cluster(scheduler: str | None, device: str, threads: int | None) -> Iterator[Any]:
    """The Dask cluster a run's tasks go to, or None to run them here (the cluster extra,
    distributed, is imported only for a cluster)."""
    if scheduler is None or scheduler in IN_PROCESS:
        yield None
        return
    from agbcube.train.cluster import cluster_tasks

    with cluster_tasks(scheduler, device, threads_per_task=threads) as cluster:
        yield cluster


def _plan(config: Any, folds_path: Path, dev: Any, cluster: Any) -> RunPlan:
    """The run's plan; ``data_path: auto`` is decided here or, on a cluster, on a worker."""

    def decide(geometry: ChipGeometry, n_chips: int, n_bands: int) -> str:
        if cluster is not None:
            return cluster.data_path(geometry, n_chips, n_bands)
        return auto_data_path(geometry, n_chips, n_bands, dev)

    return make_plan(config, read_folds(folds_path), device=dev, data_path=decide)


def _how_it_ran(scheduler: str | None, dev: Any, t0: float, n_chips: int, plan: RunPlan) -> dict:
    """metrics.json's ``run``: where and how the fits ran, and the run's wall time."""
    return {
        "scheduler": scheduler or "in-process",
        "device": str(dev),
        "wall_s": time.perf_counter() - t0,
        "n_chips": n_chips,
        "data_path": plan.data_path,
    }


def _finish(run: RunData, *, plots: bool) -> dict[str, Any]:
    """Assemble the tasks' results into the run's tables, metrics, ensemble and plots."""
    tasks = list(run.plan.tasks)
    predictions, pixels, fold_info, metrics = assemble(run, tasks)
    out = run.run_dir
    with atomic_path(out / "predictions.parquet") as tmp:
        predictions.to_parquet(tmp, index=False)
    with atomic_path(out / "pixels.parquet") as tmp:
        pixels.to_parquet(tmp, index=False)
    if any(t.kind == "member" for t in tasks):
        _write_ensemble(run, tasks)
    if plots:
        write_plots(out / "plots", predictions, pixels, fold_info, run.folds, metrics)
    return metrics


def _ensure_folds(config: Any) -> Path:
    """The folds file the run uses (made first when missing), checked against the chips
    settings."""

    path = Path(config.folds.output)
    if not path.exists():
        log.info("no folds at %s: making them first", path)
        write_folds(make_folds(config), path)
    # folds cut from an earlier build of the cube (a site rebuilt since) are refused here
    made_with = read_folds(path, cube=config.cube.output).attrs.get("agbcube", {}).get("chips")
    if made_with is not None:
        want = config.chips.model_dump(mode="json")
        if any(made_with.get(k) != want[k] for k in ("size", "overlap")):
            raise TrainingError(
                f"folds {path} were made with chips {made_with}, the config says {want}; run "
                "`agbcube folds` again"
            )
    return path


# --------------------------------------------------------------------------------------------
# the run directory: ours, and tied to what made it


def _prepare_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``out`` a run directory; only an agbcube run (its marker) is continued or replaced."""

    is_run = output_kind(out) == "run"
    if out.is_dir() and not is_run and any(not c.name.startswith(".") for c in out.iterdir()):
        raise OutputExistsError(
            f"run directory {out} holds files but no agbcube run (no {MARKER} marker); agbcube "
            "never deletes or mixes with files it did not write, with or without --overwrite: "
            "give a new or empty folder (--output or train.output)"
        )
    if is_run and not (resume or overwrite):
        raise TrainingError(
            f"run directory {out} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or --output for a new one"
        )
    if overwrite and is_run:
        for child in out.iterdir():
            if not child.name.startswith(".") or ".tmp-" in child.name:
                remove_path(child)
    prepare_output_dir(out, kind="run", what="run directory")
    remove_temporaries(out)


def _cube_digest(config: Any, sites: list[str]) -> str:

    store = config.cube.output
    return digest({s: open_cube(store, s, chunks=None).attrs.get("provenance") for s in sites})


def _train_settings(tcfg: Any) -> dict[str, Any]:
    """The training settings a run's results depend on (all but where it is written and run)."""
    return {k: v for k, v in tcfg.model_dump(mode="json").items() if k not in _NEUTRAL}


def _settings(config: Any, data_path: str, device: str) -> dict[str, Any]:
    """What the results depend on besides the cube and the folds."""
    return {
        "train": _train_settings(config.train),
        "chips": config.chips.model_dump(mode="json"),
        "data_path": data_path,
        "device": device,
    }


def _record_run(config: Any, folds_path: Path, out: Path, *, plan: RunPlan, resume: bool) -> None:
    """Write ``config.yaml``, the folds' copy and ``run.json`` (with the plan, which the
    workers read); on ``resume``, first check that nothing the finished tasks depend on has
    changed."""
    sites = sorted(set(read_folds(folds_path)["site"].astype(str)))
    record = {
        "version": agbcube.__version__,
        "digests": {
            "cube": _cube_digest(config, sites),
            "folds": file_digest(folds_path),
        },
        "settings": _settings(config, plan.data_path, plan.device),
        "plan": plan.to_dict(),
    }
    if resume and (out / "run.json").exists():
        _check_resumable(json.loads((out / "run.json").read_text()), record, out)
    write_json_atomic(out / "run.json", record)
    data = config.model_dump(mode="json")
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    if not (resume and (out / "folds.parquet").exists()):
        with atomic_path(out / "folds.parquet") as tmp:
            shutil.copyfile(folds_path, tmp)


def _section_defaults() -> dict[str, dict[str, Any]]:

    return {
        "train": TrainConfig().model_dump(mode="json"),
        "chips": ChipsConfig().model_dump(mode="json"),
    }


def _check_resumable(before: dict[str, Any], now: dict[str, Any], out: Path) -> None:
    recorded = before.get("digests", {})
    changed = [what for what in ("cube", "folds") if recorded.get(what) != now["digests"][what]]
    copy = out / "folds.parquet"  # what the fits read: the run's own copy, as recorded
    if copy.exists() and file_digest(copy) != recorded.get("folds"):
        changed.append(f"{copy} (the run's copy of the folds, which its fits read)")
    old, new = before.get("settings", {}), now["settings"]
    for section, defaults in _section_defaults().items():
        # a setting newer than the run, at its default, is what the run was made with
        b = new[section]
        a = {**{k: v for k, v in defaults.items() if k in b}, **old.get(section, {})}
        changed += [
            f"{section}.{k}: {a.get(k)!r} → {b.get(k)!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
        ]
    changed += [
        f"{k}: {old.get(k)!r} → {new[k]!r}" for k in ("data_path", "device") if old.get(k) != new[k]
    ]
    if changed:
        raise TrainingError(
            f"cannot resume {out}: its finished tasks were made with other inputs or settings "
            f"({'; '.join(changed)}). Restore them, or start again with --overwrite or another "
            "--output"
        )


# --------------------------------------------------------------------------------------------
# the ensemble


def _write_ensemble(run: Any, tasks: list[Any]) -> None:
    """Every member's model file into ``ensemble.pt``, each checked to be this run's."""

    members = sorted((t for t in tasks if t.kind == "member"), key=lambda t: (t.fold, t.member))
    ours = _train_settings(run.tcfg)
    records = [_own_record(run, t.model_path(run.run_dir), ours) for t in members]
    save_bundle(run.run_dir / "ensemble.pt", records)


def _own_record(run: Any, path: Path, ours: dict[str, Any]) -> dict[str, Any]:
    """A member's model record, refused (naming the file) unless this run's settings (``ours``)
    and bands made it: a model file copied in from another run never enters the ensemble."""

    record = read_record(path)
    theirs = record["train"]
    differ = [k for k in sorted(ours) if k in theirs and theirs[k] != ours[k]]
    if list(record["bands"]) != list(run.bands):
        differ.append("bands")
    if differ:
        raise TrainingError(
            f"{path} was not made by this run (its settings differ from the run's: "
            f"{', '.join(differ)}); delete it and run `agbcube train … --resume`, which trains "
            "that member again"
        )
    return record


def load_ensemble(run_dir: str | Path, device: str = "cpu") -> tuple[list[Any], dict[str, Any]]:
    """The members of a run, ready for prediction, and their shared settings.

    Returns
    -------
    models : list of (torch.nn.Module, Standardiser, TargetTransform)
    spec : dict
        ``bands``, ``geometry`` (`agbcube.chips.ChipGeometry`: the chip a model predicts,
        the window it sees), ``train`` (the settings, as a dict) and ``folds`` (each
        member's fold).
    """

    members = load_bundle(Path(run_dir) / "ensemble.pt", device)
    first = members[0]
    spec = {
        "bands": first.bands,
        "geometry": first.geometry,
        "train": first.train.model_dump(mode="json"),
        "folds": [m.fold for m in members],
    }
    return [(m.model, m.standardiser, m.target) for m in members], spec


def training_history(run_dir: str | Path) -> Any:
    """Every fit's epochs in a run: a DataFrame with ``fold``, ``task`` (``select``,
    ``member_m``), ``refit``, ``epoch``, ``train_loss``, ``val_loss``, ``lr`` and
    ``seconds`` (a refit has no validation chips: its ``val_loss`` is its training loss)."""

    frames = []
    for path in sorted(Path(run_dir).glob("fold_*/*.npz")):
        summary = load_result(path)[0]
        if summary.get("history"):
            frame = pd.DataFrame(summary["history"])
            refit = bool(summary.get("refit", False))
            frames.append(frame.assign(fold=int(summary["fold"]), task=path.stem, refit=refit))
    if not frames:
        raise TrainingError(f"{run_dir} holds no finished fit: train with `agbcube train`")
    history = pd.concat(frames, ignore_index=True)
    columns = ["fold", "task", "refit", "epoch", "train_loss", "val_loss", "lr", "seconds"]
    return history[columns].sort_values(["fold", "task", "epoch"], ignore_index=True)
