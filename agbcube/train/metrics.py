"""Accuracy metrics, per fold, per site (pooled over folds) and overall.

A per-site R² rests on tens to hundreds of chips (63 at the benchmark's smallest site), so it comes
with a bootstrap interval, and two models scored on the same chips with a paired interval of
their difference: both resample whole chips, so a chip's pixels stay together.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["BOOTSTRAP", "r2_bootstrap", "r2_difference", "regression_metrics", "summarise"]

BOOTSTRAP = 1000
"""Resamples behind every interval; they are seeded, so a run's intervals are reproducible."""


def regression_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float | int | None]:
    """RMSE, R², MAE, bias (pred − true), Spearman ρ and relative RMSE of paired values.

    Non-finite pairs are ignored. R² is ``1 − SSE/SST`` about the mean of ``true`` (so it can
    be negative), the figure the issues quote.
    """
    from scipy.stats import spearmanr

    true = np.asarray(true, dtype=np.float64).ravel()
    pred = np.asarray(pred, dtype=np.float64).ravel()
    ok = np.isfinite(true) & np.isfinite(pred)
    true, pred = true[ok], pred[ok]
    n = int(true.size)
    if n < 2:
        return dict.fromkeys(("rmse", "r2", "mae", "bias", "spearman", "rrmse"), None) | {"n": n}
    err = pred - true
    rmse = float(np.sqrt(np.mean(err**2)))
    sst = float(np.sum((true - true.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / sst if sst > 0 else None
    rho = spearmanr(true, pred).statistic if np.ptp(true) > 0 and np.ptp(pred) > 0 else None
    mean = float(true.mean())
    return {
        "n": n,
        "rmse": rmse,
        "r2": r2,
        "mae": float(np.mean(np.abs(err))),
        "bias": float(np.mean(err)),
        "spearman": None if rho is None else float(rho),
        "rrmse": rmse / mean if mean != 0 else None,
    }


def r2_bootstrap(
    true: np.ndarray,
    preds: list[np.ndarray],
    groups: np.ndarray,
    *,
    n_boot: int = BOOTSTRAP,
    seed: int = 0,
) -> np.ndarray:
    """R² of each prediction under ``n_boot`` resamples of whole groups: ``(n_boot, n_preds)``.

    Each resample draws as many groups (chips) as there are, with replacement, and pools their
    values; every prediction is scored on the same resamples, so differences are paired.
    Non-finite pairs are dropped first. A resample whose truth has no variance gives NaN.
    """
    true = np.asarray(true, dtype=np.float64).ravel()
    preds = [np.asarray(p, dtype=np.float64).ravel() for p in preds]
    ok = np.isfinite(true) & np.logical_and.reduce([np.isfinite(p) for p in preds])
    codes, uniques = pd.factorize(np.asarray(groups)[ok])
    t = true[ok]
    n_groups = len(uniques)
    if n_groups < 2:
        return np.full((n_boot, len(preds)), np.nan)
    # per-group sums are all a resample needs: R² = 1 − ΣSSE / (Σt² − (Σt)²/N)
    sums = np.stack(
        [
            np.bincount(codes, minlength=n_groups).astype(np.float64),
            np.bincount(codes, t, minlength=n_groups),
            np.bincount(codes, t * t, minlength=n_groups),
            *(np.bincount(codes, (p[ok] - t) ** 2, minlength=n_groups) for p in preds),
        ],
        axis=1,
    )
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    total = counts.astype(np.float64) @ sums  # (n_boot, 3 + n_preds)
    sst = total[:, 2] - total[:, 1] ** 2 / total[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - total[:, 3:] / sst[:, None]
    r2[~(sst > 1e-12 * np.maximum(total[:, 2], 1.0))] = np.nan
    return r2


def _interval(samples: np.ndarray, level: float = 0.95) -> list[float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size < 10:
        return None
    tail = 50 * (1 - level)
    return [float(v) for v in np.percentile(samples, [tail, 100 - tail])]


def r2_difference(
    true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    groups: np.ndarray,
    *,
    n_boot: int = BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """R² of ``pred_a`` minus that of ``pred_b`` on the same values, with a paired interval.

    Returns ``{"r2": difference, "ci95": [low, high], "p_a_better": share of resamples in
    which ``a`` scores higher}``; the interval is None when there are too few groups.
    """
    a = regression_metrics(true, pred_a)["r2"]
    b = regression_metrics(true, pred_b)["r2"]
    boot = r2_bootstrap(true, [pred_a, pred_b], groups, n_boot=n_boot, seed=seed)
    diff = boot[:, 0] - boot[:, 1]
    finite = diff[np.isfinite(diff)]
    return {
        "r2": None if a is None or b is None else a - b,
        "ci95": _interval(diff),
        "p_a_better": float(np.mean(finite > 0)) if finite.size else None,
    }


def summarise(
    frame: pd.DataFrame, *, true: str, pred: str, groups: str | None = "chip_id"
) -> dict[str, Any]:
    """Metrics per fold, per site pooled over folds, per site and fold, and overall.

    The per-site and overall entries get ``r2_ci95``, a 95 % bootstrap interval resampling
    the ``groups`` column's chips (None when the frame has no such column or it has gaps).
    Chips near each other are alike, so the interval is narrower than one that also resampled
    places: read it as the least uncertainty there is.
    """
    with_ci = groups is not None and groups in frame and frame[groups].notna().all()

    def block(g: pd.DataFrame) -> dict[str, Any]:
        out = regression_metrics(g[true], g[pred])
        if with_ci:
            boot = r2_bootstrap(g[true].to_numpy(), [g[pred].to_numpy()], g[groups].to_numpy())
            out["r2_ci95"] = _interval(boot[:, 0])
        else:
            out["r2_ci95"] = None
        return out

    return {
        "overall": block(frame),
        "per_site": {str(site): block(g) for site, g in frame.groupby("site")},
        "per_fold": {
            int(k): regression_metrics(g[true], g[pred]) for k, g in frame.groupby("fold")
        },
    }
