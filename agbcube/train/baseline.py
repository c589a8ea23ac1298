"""The ``hgb-pixel`` baseline: HistGradientBoosting on the pixels of the training chips."""

from __future__ import annotations

import numpy as np

__all__ = ["fit_hgb_pixels", "predict_hgb_pixels"]


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
    from sklearn.ensemble import HistGradientBoostingRegressor

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
