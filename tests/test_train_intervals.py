"""Calibrated prediction intervals: coverage checked against a known error field."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter

from agbcube.train.intervals import (
    LEVELS,
    calibrate,
    conformal_quantile,
    interval_metrics,
    nominal_coverage,
)


def _frame(rng, *, correlated: bool, overconfident: float = 2.0, folds: int = 5, side: int = 60):
    """Pixels of ``folds`` square test folds over two sites: a prediction, a members' spread
    that varies in space, and a truth whose error is ``overconfident`` times the spread
    times a unit normal field, independent per pixel or smooth over ~8 pixels."""
    rows = []
    for k in range(folds):
        spread = 5 + 20 * gaussian_filter(rng.random((side, side)), 6) ** 2
        noise = rng.standard_normal((side, side))
        if correlated:
            noise = gaussian_filter(noise, 8)
            noise /= noise.std()
        pred = rng.uniform(50, 250, (side, side))
        rows.append(
            pd.DataFrame(
                {
                    "site": "a" if k % 2 else "b",
                    "fold": k,
                    "agb_pred": pred.ravel(),
                    "agb_std": spread.ravel(),
                    "agb_true": (pred + overconfident * spread * noise).ravel(),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("correlated", [False, True])
def test_calibrated_intervals_cover_what_they_claim_where_the_spread_does_not(correlated):
    rng = np.random.default_rng(3)
    frame = _frame(rng, correlated=correlated)
    out = interval_metrics(frame, 0.9)
    # the spread read as a Gaussian s.d. covers P(|2 Z| <= 1.645) ~ 59 %, far from 90 %
    assert out["raw_spread_coverage"] == pytest.approx(0.59, abs=0.06 if correlated else 0.02)
    # cross-fitted on the other folds: 90 % on held-out pixels, pooled and per site
    tol = 0.06 if correlated else 0.02
    assert out["coverage"] == pytest.approx(0.9, abs=tol)
    for site in ("a", "b"):
        assert out["per_site"][site]["coverage"] == pytest.approx(0.9, abs=2 * tol)
    curve = out["reliability"]["a"]
    assert list(curve) == [f"{lv:g}" for lv in LEVELS]
    assert all(abs(curve[f"{lv:g}"] - lv) < 3 * tol for lv in LEVELS)
    # the scale found is the error's: q ~ 1.645 x 2 for an error twice the spread
    assert out["q"] * (1 + out["beta"] / frame["agb_std"].median()) > 2.5


def test_without_a_spread_the_interval_has_one_width_and_still_covers():
    rng = np.random.default_rng(4)
    frame = _frame(rng, correlated=False).assign(agb_std=np.nan)
    out = interval_metrics(frame, 0.8)
    assert out["scaled_by"] == "none (one width)" and out["beta"] == 0.0
    assert out["raw_spread_coverage"] is None
    assert out["coverage"] == pytest.approx(0.8, abs=0.02)
    err = np.abs(frame["agb_true"] - frame["agb_pred"])
    assert out["mean_width"] == pytest.approx(2 * np.quantile(err, 0.8), rel=0.05)


def test_the_conformal_quantile_is_the_finite_sample_rank():
    scores = np.arange(1.0, 10.0)  # 9 scores: rank ceil(10 * level)
    assert conformal_quantile(scores, 0.5) == 5.0
    assert conformal_quantile(scores, 0.9) == 9.0
    assert conformal_quantile(scores, 0.95) == np.inf  # too few scores for 95 %
    assert conformal_quantile(np.array([np.nan, 1.0, 2.0]), 0.5) == 2.0
    cal = calibrate(pd.DataFrame({"agb_true": [1.0, 2.0], "agb_pred": [1.0, 2.0]}), 0.5)
    assert cal["q"] == 0.0 and cal["scaled_by"] == "none (one width)"


def test_a_spread_of_zero_still_gives_an_interval():
    """Members that agree exactly at a pixel do not make its interval empty (beta)."""
    rng = np.random.default_rng(5)
    frame = _frame(rng, correlated=False)
    frame.loc[::7, "agb_std"] = 0.0
    out = interval_metrics(frame, 0.9)
    assert out["beta"] > 0 and out["coverage"] == pytest.approx(0.9, abs=0.03)
    assert nominal_coverage(frame, 0.9) < 0.7
