"""Prediction intervals calibrated on the cross-validation's held-out predictions.

A fold ensemble's spread (``agb_std``: the s.d. of its members' predictions) says where the
members disagree, not how far the truth is: a few members trained on the same chips agree
more than they should, and far from the training data most of all. Split-conformal
calibration turns the spread into an interval with the coverage asked for: the score of a
held-out pixel is its error in units of the spread,

    s = |AGB − prediction| / (agb_std + β),    β = the median spread of the scored pixels,

(β keeps pixels where the members happen to agree from getting a zero-width interval), and the
interval is ``prediction ± q · (agb_std + β)`` with ``q`` the conformal quantile of the scores
at the level. Without a spread (one member, or the pixel baseline) the score is the absolute
error and the interval has one width.

Only test-fold predictions are used, and the coverage a run reports is cross-fitted: each
fold's pixels are checked against ``q`` calibrated on the other folds' test pixels, so no pixel
is scored by an interval it helped to fit. Scores are pooled over sites and also calibrated
per site; a map of one of the run's sites uses the site's own ``q``, a new area the pooled one
(sites differ, so one scale pooled over them under-covers some and over-covers others).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

__all__ = [
    "LEVELS",
    "calibrate",
    "conformal_quantile",
    "has_spread",
    "interval_metrics",
    "nominal_coverage",
    "row_scales",
    "spread_scales",
]

LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
"""The levels of the reliability curve (nominal against observed coverage)."""


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The split-conformal quantile: the ``⌈(n + 1) level⌉``-th smallest score, so a new
    exchangeable score falls at or below it with probability at least ``level`` (``inf``
    when there are too few scores for that level)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64)[np.isfinite(scores)])
    rank = int(np.ceil((scores.size + 1) * level))
    return float(scores[rank - 1]) if 0 < rank <= scores.size else float("inf")


def _scale(spread: np.ndarray | None, beta: float) -> np.ndarray | float:
    return 1.0 if spread is None else spread + beta


def calibrate(frame: pd.DataFrame, level: float) -> dict[str, Any]:
    """``q`` (and ``beta``) of the interval ``agb_pred ± q · (agb_std + beta)`` at ``level``
    from the held-out rows of ``frame`` (``agb_true``, ``agb_pred``, optional ``agb_std``)."""
    spread = _spread(frame)
    beta = float(np.nanmedian(spread)) if spread is not None else 0.0
    err = _errors(frame)
    q = conformal_quantile(err / _scale(spread, beta), level)
    return {"level": level, "q": q, "beta": beta, "scaled_by": _scaled_by(spread)}


def _errors(frame: pd.DataFrame) -> np.ndarray:
    """|AGB − prediction| of each row, in Mg/ha."""
    return np.abs(frame["agb_true"].to_numpy(np.float64) - frame["agb_pred"].to_numpy(np.float64))


def _spread(frame: pd.DataFrame) -> np.ndarray | None:
    if "agb_std" not in frame or not np.isfinite(frame["agb_std"]).any():
        return None
    return frame["agb_std"].to_numpy(np.float64)


def has_spread(frame: pd.DataFrame) -> bool:
    """Whether ``frame``'s rows have an ensemble spread to scale (else one width)."""
    return _spread(frame) is not None


def spread_scales(spread: np.ndarray | None, beta: float) -> np.ndarray | float:
    """The interval scale of values with ``spread``: spread + ``beta`` (a missing spread
    counted as 0), or 1 without a spread (a model calibrated with one width)."""
    return 1.0 if spread is None else np.nan_to_num(spread, nan=0.0) + beta


def row_scales(frame: pd.DataFrame, beta: float) -> np.ndarray:
    """Each row's interval scale (`spread_scales` of its ``agb_std``)."""
    return np.broadcast_to(spread_scales(_spread(frame), beta), (len(frame),)).copy()


def _scaled_by(spread: np.ndarray | None) -> str:
    return "none (one width)" if spread is None else "ensemble spread"


def _covered(frame: pd.DataFrame, cal: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Whether each row's truth lies in its calibrated interval, and the interval's width."""
    spread = _spread(frame)
    half = cal["q"] * _scale(spread, cal["beta"])
    err = _errors(frame)
    half = np.broadcast_to(half, err.shape)
    return err <= half, 2 * half


def nominal_coverage(frame: pd.DataFrame, level: float) -> float | None:
    """How often the truth lies in ``agb_pred ± z · agb_std``, the interval the raw spread
    implies if it were a Gaussian s.d. (None without a spread)."""
    spread = _spread(frame)
    if spread is None:
        return None
    z = float(norm.ppf(0.5 + level / 2))
    err = _errors(frame)
    return float(np.mean(err <= z * spread))


def cross_fitted(frame: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per row of ``frame``: covered by, and width of, the interval calibrated on the other
    folds' rows (``fold`` column)."""
    covered = np.zeros(len(frame), dtype=bool)
    width = np.full(len(frame), np.nan)
    folds = frame["fold"].to_numpy()
    for k in np.unique(folds):
        mine = folds == k
        cal = calibrate(frame[~mine], level)
        covered[mine], width[mine] = _covered(frame[mine], cal)
    return pd.DataFrame({"covered": covered, "width": width}, index=frame.index)


def _coverage(frame: pd.DataFrame, level: float) -> dict[str, Any]:
    checked = cross_fitted(frame, level)
    finite = np.isfinite(checked["width"])
    return {
        "n": len(frame),
        "coverage": float(checked["covered"].mean()) if len(frame) else None,
        "mean_width": float(checked["width"][finite].mean()) if finite.any() else None,
        "raw_spread_coverage": nominal_coverage(frame, level),
    }


def interval_metrics(frame: pd.DataFrame, level: float, *, by: str = "site") -> dict[str, Any]:
    """The calibration of one model's held-out rows (pixels or chips) at ``level``.

    Returns the pooled calibration (``q``, ``beta``: a new area's maps use it), the per-site
    one (a run's own sites' maps), and the cross-fitted coverage and mean width (Mg/ha) of
    both, beside the coverage of the raw spread read as a Gaussian s.d.; ``reliability``
    gives the pooled intervals' cross-fitted coverage at each of `LEVELS`.
    """
    groups = dict(tuple(frame.groupby(by))) if len(frame) else {}
    per_site = {
        str(site): {**calibrate(g, level), **_coverage(g, level)} for site, g in groups.items()
    }
    curves: dict[str, dict[str, float]] = {str(site): {} for site in groups}
    for lv in LEVELS:
        covered = cross_fitted(frame, lv)["covered"].groupby(frame[by]).mean()
        for site, value in covered.items():
            curves[str(site)][f"{lv:g}"] = float(value)
    return {
        **calibrate(frame, level),
        **_coverage(frame, level),
        "per_site": per_site,
        "reliability": curves,
    }
