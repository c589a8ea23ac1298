"""Accuracy metrics, per fold, per site (pooled over folds) and overall."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["regression_metrics", "summarise"]


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


def summarise(frame: pd.DataFrame, *, true: str, pred: str) -> dict[str, Any]:
    """Metrics per fold, per site pooled over folds, per site and fold, and overall."""
    return {
        "overall": regression_metrics(frame[true], frame[pred]),
        "per_site": {
            str(site): regression_metrics(g[true], g[pred]) for site, g in frame.groupby("site")
        },
        "per_fold": {
            int(k): regression_metrics(g[true], g[pred]) for k, g in frame.groupby("fold")
        },
    }
