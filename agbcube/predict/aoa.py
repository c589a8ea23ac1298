"""The area of applicability: dissimilarity index and its cross-validated threshold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from agbcube._store import open_cube, site_read_errors
from agbcube.errors import FoldError
from agbcube.train.plan import run_folds

# --------------------------------------------------------------------------------------------
# area of applicability


@dataclass
class AOAReference:
    """Training pixels in standardised feature space, and the DI threshold."""

    points: np.ndarray  # (n, f) standardised
    mean_distance: float
    threshold: float
    mean: np.ndarray
    std: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_points": int(self.points.shape[0]),
            "mean_distance": self.mean_distance,
            "threshold": self.threshold,
        }


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.nan_to_num((x - mean) / std, nan=0.0).astype(np.float32)


def nearest(query: np.ndarray, points: np.ndarray, block: int = 8192) -> np.ndarray:
    """Euclidean distance of each query row to its nearest point (matmul-based, blocked)."""

    pts = torch.from_numpy(np.ascontiguousarray(points))
    out = np.empty(len(query), dtype=np.float32)
    for i in range(0, len(query), block):
        q = torch.from_numpy(np.ascontiguousarray(query[i : i + block]))
        out[i : i + block] = torch.cdist(q, pts).min(dim=1).values.numpy()
    return out


def aoa_reference(
    pixels: np.ndarray, folds: np.ndarray, *, max_points: int = 4000, random_state: int = 0
) -> AOAReference:
    """The AOA's training reference from labelled pixels and their CV folds.

    Parameters
    ----------
    pixels : np.ndarray, (n, f)
        Feature vectors of labelled pixels (NaN allowed: imputed with the mean).
    folds : np.ndarray, (n,)
        Test fold of each pixel's chip; the threshold uses distances to other folds only.
    max_points : int
        Pixels kept (a stratified random sample).
    """
    rng = np.random.default_rng(random_state)
    if len(pixels) > max_points:
        pick = rng.choice(len(pixels), size=max_points, replace=False)
        pixels, folds = pixels[pick], folds[pick]
    mean = np.nanmean(pixels, axis=0)
    std = np.nanstd(pixels, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
    pts = standardise(pixels, mean, std)

    d = torch.cdist(torch.from_numpy(pts), torch.from_numpy(pts)).numpy()
    n = len(pts)
    mean_distance = float(d[np.triu_indices(n, 1)].mean()) if n > 1 else 1.0
    other = folds[:, None] != folds[None, :]
    d_cv = np.where(other, d, np.inf).min(axis=1)
    di_train = d_cv[np.isfinite(d_cv)] / mean_distance
    threshold = _upper_whisker(di_train)
    return AOAReference(
        pts, mean_distance, threshold, mean.astype(np.float32), std.astype(np.float32)
    )


def _upper_whisker(values: np.ndarray) -> float:
    """The largest value not above ``Q75 + 1.5 IQR`` (the upper whisker of a boxplot).

    This is the AOA threshold of Meyer & Pebesma (2021) as CAST computes it
    (``boxplot.stats(TrainDI)$stats[5]``): a training DI, so an outlier among the training
    pixels' own DIs does not widen the AOA.
    """
    if values.size == 0:
        return 0.0
    q25, q75 = np.percentile(values, [25, 75])
    return float(values[values <= q75 + 1.5 * (q75 - q25)].max())


def _labelled_pixels(
    store: Path,
    folds: pd.DataFrame,
    site_bands: Sequence[str] | None,
    size: int,
    per_chip: int = 40,
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A sample of labelled pixels' features from every chip, with the chip's test fold."""

    rng = np.random.default_rng(random_state)
    feats, fold_of = [], []
    for site, sub in folds.groupby("site"):
        ds = open_cube(store, str(site))
        f = ds["features"] if site_bands is None else ds["features"].sel(band=list(site_bands))
        with site_read_errors(store, str(site)):
            f = f.values
            agb = ds["agb"].values
        for r, c, k in zip(sub["row"], sub["col"], sub["fold"], strict=True):
            win = f[:, r : r + size, c : c + size].reshape(f.shape[0], -1)
            ok = np.flatnonzero(np.isfinite(agb[r : r + size, c : c + size].ravel()))
            pick = rng.choice(ok, size=min(per_chip, ok.size), replace=False)
            feats.append(win[:, pick].T)
            fold_of.append(np.full(pick.size, k))
    return np.concatenate(feats), np.concatenate(fold_of)


def run_aoa(run_dir: Path, store: Path, bands: list[str], size: int) -> AOAReference:
    """The AOA reference of a run: its training chips' labelled pixels, by fold."""

    try:
        folds = run_folds(run_dir, cube=store)
    except FoldError as err:
        raise FoldError(
            f"{err}. The area of applicability of run {run_dir} needs the folds and the cube it "
            "was trained on; without them map with --no-aoa"
        ) from err
    pixels, fold_of = _labelled_pixels(store, folds, bands, size)
    return aoa_reference(pixels, fold_of)
