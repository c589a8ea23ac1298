"""Scoring a run: the tasks' test predictions assembled into tables and metrics.

Every test chip is predicted once per model (its fold's ensemble, averaged in Mg/ha, and the
baseline). Chip level compares each chip's mean AGB with the mean of its predicted pixels (the
chip head's single value), pixel level every pixel with known AGB; only the chip's own pixels
are scored, never its context. ``random_cv`` scores the baseline under a random K-fold of the
same chips: the leaky figure, beside the honest one.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from agbcube.train.baseline import core_chips
from agbcube.train.batches import make_target
from agbcube.train.data import RunData
from agbcube.train.errorfield import area_metrics, site_grids, with_metric_xy
from agbcube.train.intervals import interval_metrics
from agbcube.train.metrics import r2_difference, summarise
from agbcube.train.plan import CNN, HGB, Task, selection
from agbcube.train.tasks import load_result, test_agb

__all__ = ["assemble"]

log = logging.getLogger(__name__)


def scored_pixels(pred: np.ndarray, agb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel predictions ``(n, h, w)`` kept where the AGB is known, and each chip's mean of
    them: what the chip-level and pixel-level metrics compare with the AGB."""
    pix = np.where(np.isfinite(agb), pred, np.nan)
    return np.nanmean(pix.reshape(len(pix), -1), axis=1), pix


def pixel_frame(
    meta: pd.DataFrame,
    agb: np.ndarray,
    pred: np.ndarray,
    spread: np.ndarray | None = None,
    **columns: Any,
) -> pd.DataFrame:
    """One row per pixel with known AGB of the chips ``meta`` (``chip_id``, ``site``, ``row``,
    ``col``), in order: its chip, site, the pixel's ``row`` and ``col`` in its site's cube,
    ``columns``, AGB, prediction and, given one, the ensemble's spread (``agb_std``, NaN
    without one)."""
    valid = np.isfinite(agb)

    def per_pixel(values: np.ndarray) -> np.ndarray:
        return np.broadcast_to(values[:, None, None], agb.shape)[valid]

    std = np.full(agb.shape, np.nan, np.float32) if spread is None else spread
    _, h, w = agb.shape
    rows = meta["row"].to_numpy(np.int32)[:, None, None] + np.arange(h, dtype=np.int32)[:, None]
    cols = meta["col"].to_numpy(np.int32)[:, None, None] + np.arange(w, dtype=np.int32)
    return pd.DataFrame(
        {
            "chip_id": per_pixel(meta["chip_id"].to_numpy()),
            "site": per_pixel(meta["site"].to_numpy()),
            "row": np.broadcast_to(rows, agb.shape)[valid],
            "col": np.broadcast_to(cols, agb.shape)[valid],
            **columns,
            "agb_true": agb[valid],
            "agb_pred": np.asarray(pred)[valid],
            "agb_std": np.broadcast_to(np.asarray(std, np.float32), agb.shape)[valid],
        }
    )


def member_spread(
    member_preds: list[np.ndarray], agb: np.ndarray, *, dense: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The s.d. of an ensemble's members (Mg/ha, as `predict` maps it): per chip, of their
    chip means, and per pixel (NaN for a single member)."""
    shape = (len(agb),)
    if len(member_preds) < 2:
        return np.full(shape, np.nan), np.full(agb.shape, np.nan, np.float32)
    if dense:
        chips = np.std([scored_pixels(p, agb)[0] for p in member_preds], axis=0)
        return chips, np.std(member_preds, axis=0).astype(np.float32)
    chips = np.std(member_preds, axis=0)
    return chips, np.broadcast_to(chips[:, None, None], agb.shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# assembling a run


def _fold_tables(
    run: RunData, k: int, tasks: list[Task]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Fold ``k``'s chip and pixel rows (every model) and its summary."""
    data = run.fold(k)
    roles = data.roles
    agb = test_agb(data)
    meta = run.folds[["chip_id", "site", "row", "col"]].iloc[roles.test].reset_index(drop=True)
    info = _fold_info(run, k, roles)
    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    spreads: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    members = [t for t in tasks if t.fold == k and t.kind == "member"]
    if members:
        results = [load_result(t.result_path(run.run_dir)) for t in members]
        member_preds = [arrays["pred"] for _, arrays in results]
        mg = np.mean(member_preds, axis=0)
        dense = run.tcfg.head == "dense"
        if dense:
            preds[CNN] = scored_pixels(mg, agb)
        else:
            preds[CNN] = (mg, np.broadcast_to(mg[:, None, None], agb.shape))
        spreads[CNN] = member_spread(member_preds, agb, dense=dense)
        _cnn_info(run, k, tasks, results, info)
    if any(t.fold == k and t.kind == "baseline" for t in tasks):
        summary, arrays = load_result(Task(k, "baseline").result_path(run.run_dir))
        preds[HGB] = scored_pixels(arrays["pred"], agb)
        info["hgb_s"] = summary["seconds"]
    true_chip = make_target(agb, log=False, per_chip=True)
    frames, pixel_frames = [], []
    agb32 = agb.astype(np.float32)
    for name, (chip_pred, pix) in preds.items():
        chip_std, pix_std = spreads.get(name, (np.full(len(meta), np.nan), None))
        frames.append(
            meta[["chip_id", "site"]].assign(
                fold=k,
                model=name,
                agb_true=true_chip.astype(np.float64),
                agb_pred=chip_pred.astype(np.float64),
                log_true=np.log1p(true_chip.astype(np.float64)),
                log_pred=np.log1p(np.clip(chip_pred.astype(np.float64), 0, None)),
                agb_std=chip_std.astype(np.float64),
            )
        )
        pix32 = np.asarray(pix, dtype=np.float32)
        pixel_frames.append(pixel_frame(meta, agb32, pix32, pix_std, fold=k, model=name))
    return pd.concat(frames, ignore_index=True), pd.concat(pixel_frames, ignore_index=True), info


def _fold_info(run: RunData, k: int, roles: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "fold": k,
        "n_train": int(roles.train.size),
        "n_val": int(roles.val.size),
        "n_test": int(roles.test.size),
        "data_path": run.data_path,
    }
    if roles.train_mask is not None:
        info["label_buffer"] = "pixel"
        info["n_train_px"] = int(roles.train_mask.sum())
        info["min_label_distance_m"] = roles.label_distance_m
    return info


def _cnn_info(
    run: RunData, k: int, tasks: list[Task], results: list[tuple], info: dict[str, Any]
) -> None:
    """The CNN's part of a fold's summary: its early-stopped fit's history and the members."""
    tcfg = run.tcfg
    chosen = results[0][0]
    seconds = sum(s["seconds"] for s, _ in results)
    if tcfg.refit:
        task = selection(tcfg, k)
        if task.kind == "select":
            chosen = load_result(task.result_path(run.run_dir))[0]
            seconds += chosen["seconds"]
        info.update(n_refit=results[-1][0]["n_chips"], refit_epochs=chosen["best_epoch"] + 1)
        if tcfg.members == "branch" and len(results) > 1:
            info.update(branch_epochs=results[-1][0]["epochs_run"])
    info.update(
        ensemble=len(results),
        best_epoch=chosen["best_epoch"],
        epochs_run=chosen["epochs_run"],
        stopped=chosen["stopped"],
        bad_steps=chosen["bad_steps"],
        history=chosen["history"],
        cnn_s=seconds,
    )


def assemble(run: RunData, tasks: list[Task]) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    """Predictions (chip level), pixels, per-fold summaries and metrics of a finished run."""
    rows, pixel_rows, fold_info = [], [], {}
    for k in range(run.n_folds):
        chips, pixels, info = _fold_tables(run, k, tasks)
        rows.append(chips)
        pixel_rows.append(pixels)
        fold_info[k] = info
    predictions = pd.concat(rows, ignore_index=True)
    pixels = pd.concat(pixel_rows, ignore_index=True)
    metrics = _metrics(predictions, pixels, fold_info, run.tcfg.model)
    metrics["intervals"] = _intervals(run, predictions, pixels)
    if any(t.kind == "random" for t in tasks):
        metrics["random_cv"] = _random_cv_metrics(run)
    return predictions, pixels, fold_info, metrics


def _intervals(run: RunData, predictions: pd.DataFrame, pixels: pd.DataFrame) -> dict[str, Any]:
    """Per model: the intervals calibrated on the test chips and pixels, and the error model
    of an area's mean with its check on squares laid over the test folds."""
    level = run.tcfg.interval_level
    grids = site_grids(run.config.cube.output, sorted(pixels["site"].unique()))
    out = {}
    for name, chips in predictions.groupby("model"):
        pix = with_metric_xy(pixels[pixels["model"] == name], grids)
        cal = interval_metrics(pix, level)
        out[str(name)] = {"chip": interval_metrics(chips, level), "pixel": cal}
        if name == run.tcfg.model:  # the model the maps are made with
            out[str(name)]["area"] = area_metrics(pix, cal, grids)
    return out


def _metrics(
    predictions: pd.DataFrame, pixels: pd.DataFrame, fold_info: dict, primary: str
) -> dict[str, Any]:
    out: dict[str, Any] = {"models": {}}
    for name, chip in predictions.groupby("model"):
        pix = pixels[pixels["model"] == name].assign(
            log_true=lambda d: np.log1p(d["agb_true"].astype(np.float64)),
            log_pred=lambda d: np.log1p(np.clip(d["agb_pred"].astype(np.float64), 0, None)),
        )
        out["models"][name] = {
            "chip": {
                "mg_ha": summarise(chip, true="agb_true", pred="agb_pred"),
                "log": summarise(chip, true="log_true", pred="log_pred"),
            },
            "pixel": {
                "mg_ha": summarise(pix, true="agb_true", pred="agb_pred"),
                "log": summarise(pix, true="log_true", pred="log_pred"),
            },
        }
    others = [name for name in out["models"] if name != primary]
    if primary in out["models"] and others:
        out["difference"] = _difference(predictions, pixels, primary, others[0])
    out["folds"] = {
        int(k): {key: v for key, v in info.items() if key != "history"}
        for k, info in fold_info.items()
    }
    out["primary_model"] = primary
    return out


def _random_cv_metrics(run: RunData) -> dict[str, Any]:
    frames, pixel_frames = [], []
    for k in range(run.n_folds):
        _, arrays = load_result(Task(k, "random").result_path(run.run_dir))
        test = arrays["test"]
        agb = core_chips(run, test)[1].astype(np.float64)
        chip_pred, pix = scored_pixels(arrays["pred"], agb)
        meta = run.folds[["chip_id", "site", "row", "col"]].iloc[test].reset_index(drop=True)
        frames.append(
            meta[["chip_id", "site"]].assign(
                fold=k,
                agb_true=make_target(agb, log=False, per_chip=True).astype(np.float64),
                agb_pred=chip_pred,
            )
        )
        pixel_frames.append(pixel_frame(meta, agb, pix, fold=k))
    chip, pix = pd.concat(frames, ignore_index=True), pd.concat(pixel_frames, ignore_index=True)
    return {
        "model": HGB,
        "n_folds": run.n_folds,
        "seed": run.tcfg.seed,
        "chip": {"mg_ha": summarise(chip, true="agb_true", pred="agb_pred")},
        "pixel": {"mg_ha": summarise(pix, true="agb_true", pred="agb_pred")},
    }


def _difference(predictions: pd.DataFrame, pixels: pd.DataFrame, a: str, b: str) -> dict:
    """Per-site R² of model ``a`` minus model ``b``, chip and pixel level, paired intervals."""
    out: dict[str, Any] = {"models": [a, b]}
    for level, frame in (("chip", predictions), ("pixel", pixels)):
        fa = frame[frame["model"] == a].reset_index(drop=True)
        fb = frame[frame["model"] == b].reset_index(drop=True)
        keys = ["chip_id", "agb_true"]
        if fa.empty or len(fa) != len(fb) or not fa[keys].equals(fb[keys]):
            out[level] = None
            continue
        out[level] = {
            str(site): r2_difference(
                g["agb_true"].to_numpy(),
                g["agb_pred"].to_numpy(),
                fb.loc[g.index, "agb_pred"].to_numpy(),
                g["chip_id"].to_numpy(),
            )
            for site, g in fa.groupby("site")
        }
    return out
