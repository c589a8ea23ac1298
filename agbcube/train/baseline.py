"""The ``hgb-pixel`` baseline: HistGradientBoosting on the pixels of the training chips.

Two tasks fit it, through one fit (`fit_hgb`): ``baseline`` (fold k of the honest folds, on
the pixels of every chip beyond the test buffer) and ``random`` (fold k of a random K-fold of
the same chips: ``train.random_cv``, the leaky figure). The model, the target and the pixel
sampling are the same, so the split is the only difference between their figures.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.model_selection import KFold

from agbcube.train.batches import TargetTransform, make_target, masked_labels
from agbcube.train.data import RunData
from agbcube.train.plan import HGB

__all__ = [
    "baseline_fold",
    "baseline_sample",
    "core_chips",
    "fit_hgb",
    "fit_hgb_pixels",
    "predict_hgb_pixels",
    "random_cv_fold",
]

log = logging.getLogger(__name__)


def _pixels(x: np.ndarray) -> np.ndarray:
    """``(n, band, h, w)`` → ``(n·h·w, band)``."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def fit_hgb_pixels(
    x: np.ndarray,
    target: np.ndarray,
    *,
    max_pixels: int = 60_000,
    random_state: int = 0,
):
    """Fit a HistGradientBoostingRegressor on up to ``max_pixels`` valid training pixels.

    Parameters
    ----------
    x : np.ndarray, (n, band, h, w)
        Raw features of the training chips (NaN allowed: the model handles it natively).
    target : np.ndarray, (n, h, w)
        Target per pixel (NaN where missing), already transformed (e.g. log1p).
    """
    features = _pixels(x)
    y = target.reshape(-1)
    valid = np.flatnonzero(np.isfinite(y))
    rng = np.random.default_rng(random_state)
    if valid.size > max_pixels:
        valid = np.sort(rng.choice(valid, size=max_pixels, replace=False))
    model = HistGradientBoostingRegressor(
        max_iter=300,
        learning_rate=0.05,
        max_leaf_nodes=31,
        min_samples_leaf=40,
        l2_regularization=1.0,
        early_stopping=False,
        random_state=random_state,
    )
    model.fit(features[valid], y[valid])
    return model


def predict_hgb_pixels(model, x: np.ndarray) -> np.ndarray:
    """Per-pixel predictions ``(n, h, w)`` for chips ``(n, band, h, w)``."""
    pred = model.predict(_pixels(x))
    return pred.reshape(x.shape[0], x.shape[2], x.shape[3]).astype(np.float32)


def fit_hgb(x: np.ndarray, agb: np.ndarray, tcfg: Any, *, random_state: int) -> Any:
    """The ``hgb-pixel`` model of chips' raw features ``x`` and AGB windows ``agb`` (NaN:
    no label), on ``train.log_target``'s scale."""
    target = make_target(agb, log=tcfg.log_target, per_chip=False)
    return fit_hgb_pixels(x, target, max_pixels=tcfg.hgb_max_pixels, random_state=random_state)


def decode_hgb(model: Any, x: np.ndarray, tcfg: Any) -> np.ndarray:
    """Per-pixel predictions in Mg/ha (the model's own, unstandardised target decoded)."""
    return TargetTransform(log=tcfg.log_target).decode(predict_hgb_pixels(model, x))


def baseline_sample(
    n_chips: int, size_px: int, max_pixels: int, rng: np.random.Generator, data_path: str
) -> np.ndarray:
    """Sorted positions of the chips, of ``n_chips``, that the ``hgb-pixel`` model draws its
    ``max_pixels`` training pixels from. In memory, every chip; streamed, enough chips for that
    many labelled pixels (1.5× for missing ones), so the baseline reads no more than that."""
    if data_path == "device":
        return np.arange(n_chips)
    n = min(n_chips, int(np.ceil(1.5 * max_pixels / size_px**2)))
    return np.sort(rng.choice(n_chips, size=n, replace=False))


def baseline_fold(run: RunData, k: int) -> tuple[dict, dict]:
    """The ``hgb-pixel`` model of fold k: pixels of every chip beyond the test buffer."""
    tcfg, data, size = run.tcfg, run.fold(k), run.geometry.size_px
    pool, pool_mask = data.roles.pool, data.roles.pool_mask
    rng = np.random.default_rng(tcfg.seed + k)
    pick = baseline_sample(pool.size, size, tcfg.hgb_max_pixels, rng, run.data_path)
    x, agb = run.raw(pool[pick])
    agb = masked_labels(agb, None if pool_mask is None else pool_mask[pick], run.geometry)
    hgb = fit_hgb(x, agb, tcfg, random_state=tcfg.seed + k)
    mg = data.in_test_order(lambda block: decode_hgb(hgb, data.prep.core(block.x), tcfg))
    log.info("fold %d: %s baseline fitted on %d chips", k, HGB, pick.size)
    return {"pred": mg}, {"fold": k, "kind": "baseline", "n_chips": int(pick.size)}


def random_cv_fold(run: RunData, k: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fold ``k`` of a random K-fold of the chips (no buffer, no validation): the ``hgb-pixel``
    model's test predictions (Mg/ha, the chips' own pixels).

    Every chip not in the test fold may train, its neighbours included, which is how a random
    split flatters a map.
    """
    tcfg, n, size = run.tcfg, len(run.folds), run.geometry.size_px
    train, test = list(
        KFold(run.n_folds, shuffle=True, random_state=tcfg.seed).split(np.arange(n))
    )[k]
    rng = np.random.default_rng([tcfg.seed, k])
    pick = train[baseline_sample(train.size, size, tcfg.hgb_max_pixels, rng, run.data_path)]
    hgb = fit_hgb(*core_chips(run, pick), tcfg, random_state=tcfg.seed + k)
    pred = decode_hgb(hgb, core_chips(run, test)[0], tcfg)
    return {"pred": pred, "test": test}, {"fold": k, "kind": "random", "n_chips": int(pick.size)}


def core_chips(run: RunData, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw features and AGB of the chips' own pixels (no context), in ``positions`` order."""
    m, s = run.geometry.context_px, run.geometry.size_px
    x, agb = run.raw(positions)
    return x[:, :, m : m + s, m : m + s], agb[:, m : m + s, m : m + s]
