"""Which chips and pixels may train a fold: the training pool and the label masks."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from agbcube.folds.geometry import metric_crs, metric_geometries, within


def training_pool(folds: gpd.GeoDataFrame, k: int) -> np.ndarray:
    """Positions of the chips fold ``k`` may train on once validation is over.

    Every chip outside the test fold and beyond the site's buffer of every test chip: the
    training and validation chips, and the ring buffered around the validation chips only.
    Without the folds' buffers in ``attrs`` (folds not made by `make_folds`), the
    training and validation chips.
    """
    fold = folds["fold"].to_numpy()
    buffers = folds.attrs.get("agbcube", {}).get("buffer_m")
    if not buffers:
        return np.flatnonzero(folds[f"role_{k}"].isin(["train", "val"]).to_numpy())
    sites = folds["site"].to_numpy().astype(str)
    metric = metric_geometries(folds, sites)
    near = within(metric, fold == k, fold != k, sites, lambda site: float(buffers[site]))
    return np.flatnonzero((fold != k) & ~near)


def label_mask(
    folds: gpd.GeoDataFrame,
    k: int,
    lonlat: np.ndarray,
    *,
    validation: bool,
    min_fraction: float = 0.25,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The chips fold ``k`` may take AGB labels from, pixel by pixel.

    A pixel's label may be trained on when its centre lies farther than the site's buffer from
    every test footprint (and, with ``validation``, from every validation footprint, whose
    chips are then left out too). Chips of the buffer ring whose far side clears the buffer
    thus give their far pixels; the chip-level roles throw the whole chip away. Inputs are not
    restricted: features are known everywhere, as when predicting a map.

    Parameters
    ----------
    folds : gpd.GeoDataFrame
        From `make_folds` (its ``attrs`` hold the per-site buffers).
    k : int
        The fold.
    lonlat : np.ndarray, (n_chips, 2, h, w)
        Longitude and latitude of every pixel centre of every chip of ``folds``.
    validation : bool
        Also keep labels beyond the buffer of the validation chips (training with early
        stopping); without it, the pool of a refit.
    min_fraction : float
        A chip joins when at least this share of its pixels may be trained on.

    Returns
    -------
    positions : np.ndarray of int
        Rows of ``folds``.
    mask : np.ndarray of bool, (len(positions), h, w)
        Pixels whose labels may be trained on.
    min_distance_m : float
        The smallest distance from such a pixel's centre to an excluded footprint (``inf``
        when nothing is excluded).
    """
    masks = label_masks(folds, k, lonlat, min_fraction=min_fraction)
    return masks["train" if validation else "pool"]


def label_masks(
    folds: gpd.GeoDataFrame, k: int, lonlat: np.ndarray, *, min_fraction: float = 0.25
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """`label_mask` with and without validation (``"train"`` and ``"pool"``) in one pass:
    every non-test pixel is projected once and its distances to the test and to the
    validation footprints are measured once."""
    role = folds[f"role_{k}"].to_numpy().astype(str)
    test, val = role == "test", role == "val"
    buffers = folds.attrs.get("agbcube", {}).get("buffer_m")
    shape = lonlat.shape[2:]
    if not buffers:  # folds not made by make_folds: the roles' chips, whole
        out = {}
        for kind, keep in (("train", role == "train"), ("pool", np.isin(role, ["train", "val"]))):
            pos = np.flatnonzero(keep)
            out[kind] = (pos, np.ones((pos.size, *shape), dtype=bool), np.inf)
        return out
    sites = folds["site"].to_numpy().astype(str)
    d_test, d_val = _label_distances(folds, sites, lonlat, test, val)
    limit = np.array([float(buffers.get(s, np.inf)) for s in sites])[:, None, None]
    out = {}
    for kind, excluded, dist in (
        ("train", test | val, np.minimum(d_test, d_val)),
        ("pool", test, d_test),
    ):
        mask = dist > limit
        mask[excluded] = False
        clear = dist[mask]
        nearest = float(clear.min()) if clear.size and np.isfinite(clear.min()) else np.inf
        pos = np.flatnonzero(mask.mean(axis=(1, 2)) >= min_fraction)
        out[kind] = (pos, mask[pos], nearest)
    return out


def _label_distances(
    folds: gpd.GeoDataFrame,
    sites: np.ndarray,
    lonlat: np.ndarray,
    test: np.ndarray,
    val: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance (m) of every non-test pixel centre to the nearest test footprint, and of every
    pixel of chips neither test nor validation to the nearest validation footprint, within its
    site (``inf`` where there is none, or for the chips not measured)."""
    from pyproj import Transformer

    metric = metric_geometries(folds, sites)
    n, _, h, w = lonlat.shape
    d_test = np.full((n, h, w), np.inf)
    d_val = np.full((n, h, w), np.inf)
    for site in pd.unique(sites):
        in_site = np.flatnonzero(sites == site)
        cand = in_site[~test[in_site]]
        if cand.size == 0:
            continue
        to_m = Transformer.from_crs(4326, metric_crs(folds, in_site), always_xy=True)
        px, py = to_m.transform(lonlat[cand, 0].ravel(), lonlat[cand, 1].ravel())
        points = shapely.points(px, py)
        for src, into, among in (
            (in_site[test[in_site]], d_test, np.ones(cand.size, bool)),
            (in_site[val[in_site]], d_val, ~val[cand]),
        ):
            if src.size == 0 or not among.any():
                continue
            pick = np.repeat(among, h * w)
            # the distance to the footprints' union is the distance to the nearest of them,
            # and a few times faster to measure than a nearest-neighbour query
            dist = shapely.distance(points[pick], shapely.union_all(metric[src]))
            into[cand[among]] = dist.reshape(-1, h, w)
    return d_test, d_val
