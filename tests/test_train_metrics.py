"""Regression metrics, per-site intervals and paired differences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def test_metrics_known_values():
    from agbcube.train.metrics import regression_metrics

    m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 6.0]))
    assert m["rmse"] == pytest.approx(1.0)
    assert m["r2"] == pytest.approx(1 - 4 / 5)
    assert m["mae"] == pytest.approx(0.5) and m["bias"] == pytest.approx(0.5)
    assert m["spearman"] == pytest.approx(1.0) and m["rrmse"] == pytest.approx(0.4)
    assert regression_metrics(np.array([1.0]), np.array([2.0]))["r2"] is None


def _chip_frame(n_chips: int, px: int, seed: int = 0) -> pd.DataFrame:
    """Pixels of ``n_chips`` chips: a chip-level signal that one model sees, plus noise."""
    rng = np.random.default_rng(seed)
    level = np.repeat(rng.normal(100, 30, n_chips), px)
    true = level + rng.normal(0, 10, level.size)
    return pd.DataFrame(
        {
            "chip_id": np.repeat([f"s:{i}" for i in range(n_chips)], px),
            "site": "s",
            "fold": 0,
            "agb_true": true,
            "good": level + rng.normal(0, 5, level.size),
            "poor": 100 + 0.5 * (level - 100) + rng.normal(0, 20, level.size),
        }
    )


def test_r2_bootstrap_pools_whole_chips():
    from agbcube.train.metrics import r2_bootstrap, regression_metrics

    f = _chip_frame(30, 16)
    groups = f["chip_id"].to_numpy()
    boot = r2_bootstrap(f["agb_true"], [f["good"], f["poor"]], groups, n_boot=50, seed=3)
    # resample 0 by hand: the same draws, each drawn chip's pixels pooled as often as drawn
    codes = pd.factorize(groups)[0]
    counts = np.random.default_rng(3).multinomial(30, np.full(30, 1 / 30), size=50)[0]
    take = np.concatenate([np.flatnonzero(codes == g).repeat(c) for g, c in enumerate(counts)])
    for j, col in enumerate(("good", "poor")):
        expect = regression_metrics(f["agb_true"].to_numpy()[take], f[col].to_numpy()[take])
        assert boot[0, j] == pytest.approx(expect["r2"], rel=1e-9)
    # pixels of a chip are alike: resampling them one by one would understate the spread
    by_pixel = r2_bootstrap(f["agb_true"], [f["poor"]], np.arange(len(f)), seed=1)[:, 0]
    by_chip = r2_bootstrap(f["agb_true"], [f["poor"]], groups, seed=1)[:, 0]
    assert by_chip.std() > 2 * by_pixel.std()


def test_summaries_and_differences_carry_intervals():
    from agbcube.train.metrics import r2_difference, summarise

    f = _chip_frame(60, 9, seed=5)
    s = summarise(f, true="agb_true", pred="good")
    low, high = s["per_site"]["s"]["r2_ci95"]
    assert low < s["per_site"]["s"]["r2"] < high and s["overall"]["r2_ci95"] == [low, high]
    assert (
        summarise(f.drop(columns="chip_id"), true="agb_true", pred="good")["overall"]["r2_ci95"]
        is None
    )
    d = r2_difference(f["agb_true"], f["good"], f["poor"], f["chip_id"])
    poor = summarise(f, true="agb_true", pred="poor")["overall"]["r2"]
    assert d["r2"] == pytest.approx(s["overall"]["r2"] - poor)
    assert 0 < d["ci95"][0] < d["r2"] < d["ci95"][1] and d["p_a_better"] == 1.0
    same = r2_difference(f["agb_true"], f["good"], f["good"], f["chip_id"])
    assert same["r2"] == 0 and same["ci95"] == [0, 0] and same["p_a_better"] == 0
