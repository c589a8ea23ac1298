"""The cross-validation's errors as a spatial field: what they make the error of an area's mean.

An area's mean AGB is the mean of its mapped pixels, and its error the mean of their errors.
Those errors are not independent: neighbouring pixels share their inputs, their context and the
model's blind spots, so a naive standard error (``σ / √n``) shrinks far faster than the truth
does. The error of pixel ``i`` is modelled as ``e_i = w_i z_i``: ``w_i = spread_i + β`` the
pixel's scale (the ensemble's spread, as in the calibrated intervals of
`agbcube.train.intervals`; 1 without a spread), and ``z`` a stationary field whose covariance
at distance ``h`` is

    K(0) = σ²,    K(h) = b + c · exp(−3h / r)  (h > 0),

fitted to the CV's held-out pixels (pairs of test pixels of the same fold and site, whose errors
come from one model, as a map's do). ``K`` is not centred: ``b`` is the part of the error every
pixel of a site shares (a fold model's bias there), which no area averages away;
``σ² − b − c`` is the nugget, what averages away fastest. The variance of an area's mean error
is then

    V = (1/n²) Σ_i Σ_j w_i w_j K(d_ij),

computed exactly with an FFT of the area's weights (the pairs' lags), on a coarser grid for
areas of more than `MAX_FFT_PIXELS` (pairs within a coarse cell are then counted at distance
0, which widens the interval slightly). The ensemble's model variance enters through ``w``:
where members disagree the errors are larger, and the CV's errors already hold the members'
own errors, so it is not added a second time.

The check (`block_coverage`) is cross-fitted like the intervals: squares laid over each test
fold get the 95 % interval of their mean from the model fitted on the other folds only, beside
the naive interval of independent pixels with the same per-pixel variance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
from scipy import fft
from scipy.stats import norm

from agbcube._store import cube_crs, open_cube
from agbcube.chips import grid_box, grid_centres_m, grid_of, local_metric_crs
from agbcube.train.intervals import has_spread, row_scales

__all__ = [
    "BLOCK_KM2",
    "MAX_FFT_PIXELS",
    "area_mean_variance",
    "area_metrics",
    "block_coverage",
    "fit_error_model",
    "metric_grid",
    "site_grids",
    "with_metric_xy",
]

BLOCK_KM2 = (0.5, 1.0)
"""Sizes (km²) of the squares whose mean's interval `block_coverage` checks."""

MAX_FFT_PIXELS = 4_000_000
"""Above this many pixels in an area's bounding box, its weights are summed into coarser cells."""

_PIXELS_PER_GROUP = 1500  # test pixels sampled per (site, fold): ~1.1 M pairs each
_BINS = 20
_MIN_PAIRS = 30


# --------------------------------------------------------------------------------------------
# where the pixels are


def metric_grid(
    origin: tuple[float, ...], crs: Any, shape: tuple[int, int], metric: Any = None
) -> dict[str, Any]:
    """A grid's local metric frame: its UTM zone and its pixels' size there, in metres.

    ``origin = (x0, dx, y0, dy)`` in ``crs`` (`agbcube.chips.grid_of`), ``shape`` its rows and
    columns; the pixel size is measured at the grid's centre, in ``metric`` (default the UTM
    zone of the grid's centre).
    """
    h, w = shape
    if metric is None:
        box = grid_box(origin, shape)
        metric = local_metric_crs(gpd.GeoSeries([box], crs=crs).to_crs(4326))
    r, c = np.array([h // 2, h // 2, h // 2 + 1]), np.array([w // 2, w // 2 + 1, w // 2])
    xy = grid_centres_m(origin, crs, r, c, metric)
    dx_m = float(np.hypot(*(xy[1] - xy[0])))
    dy_m = float(np.hypot(*(xy[2] - xy[0])))
    return {"crs": metric, "dx_m": dx_m, "dy_m": dy_m}


# --------------------------------------------------------------------------------------------
# the error model


def _unique_pixels(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per pixel (overlapping test chips predict some twice: their mean)."""
    cols = ["site", "fold", "row", "col"]
    keep = [c for c in ("x_m", "y_m", "agb_true", "agb_pred", "agb_std") if c in frame]
    return frame.groupby(cols, sort=False, as_index=False)[keep].mean()


def _pair_sums(frame: pd.DataFrame, beta: float, edges: np.ndarray, seed: int) -> dict[str, Any]:
    """Per distance bin, the sum of ``z_i z_j`` and the number of pairs among a sample of one
    (site, fold)'s test pixels; with their ``Σ z²`` and count (for ``σ²``)."""
    z = (frame["agb_pred"] - frame["agb_true"]).to_numpy(np.float64) / row_scales(frame, beta)
    xy = frame[["x_m", "y_m"]].to_numpy(np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(z), size=min(_PIXELS_PER_GROUP, len(z)), replace=False)
    zs, xys = z[pick], xy[pick]
    i, j = np.triu_indices(len(zs), 1)
    d = np.hypot(*(xys[i] - xys[j]).T)
    which = np.digitize(d, edges) - 1
    ok = (which >= 0) & (which < len(edges) - 1)
    n_bins = len(edges) - 1
    return {
        "k_sum": np.bincount(which[ok], weights=(zs[i] * zs[j])[ok], minlength=n_bins),
        "n": np.bincount(which[ok], minlength=n_bins),
        "z2_sum": float(np.sum(z**2)),
        "z_n": len(z),
    }


def _covariance(h: np.ndarray, b: float, c: float, r: float) -> np.ndarray:
    return b + c * np.exp(-3.0 * h / r)


def _fit(sums: list[dict[str, Any]], edges: np.ndarray) -> dict[str, Any]:
    """``K(h) = b + c exp(−3h/r)`` fitted to the pooled bins, with ``b + c ≤ σ²``."""
    from scipy.optimize import curve_fit

    k_sum = np.sum([s["k_sum"] for s in sums], axis=0)
    n = np.sum([s["n"] for s in sums], axis=0)
    sill = sum(s["z2_sum"] for s in sums) / max(1, sum(s["z_n"] for s in sums))
    centres = 0.5 * (edges[1:] + edges[:-1])
    use = n >= _MIN_PAIRS
    h, k = centres[use], k_sum[use] / np.maximum(n[use], 1)
    try:
        (b, c, r), _ = curve_fit(
            _covariance,
            h,
            k,
            p0=(max(0.0, float(k[-1])), max(1e-9, float(k[0] - k[-1])), edges[-1] / 3),
            bounds=([0.0, 0.0, 0.5 * edges[1]], [sill, sill, 20 * edges[-1]]),
            sigma=1.0 / np.sqrt(n[use]),
            maxfev=20000,
        )
        how = "exponential+constant"
    except (RuntimeError, ValueError, IndexError):  # too few bins: the data's own levels
        b = float(np.clip(np.median(k[-3:]), 0, sill)) if k.size else 0.0
        c = float(np.clip(k[0] - b, 0, sill - b)) if k.size else 0.0
        r, how = float(edges[-1] / 3), "empirical"
    if b + c > sill:  # a covariance: the nugget is not negative
        b, c = b * sill / (b + c), c * sill / (b + c)
    return {
        "model": how,
        "sill": float(sill),
        "nugget": max(float(sill - b - c), 0.0),  # not below 0 by rounding
        "psill": float(c),
        "constant": float(b),
        "range_m": float(r),
        "bins_m": centres.round(1).tolist(),
        "k": np.where(n > 0, k_sum / np.maximum(n, 1), np.nan).round(5).tolist(),
        "n_pairs": n.astype(int).tolist(),
    }


def _edges(frame: pd.DataFrame) -> np.ndarray:
    """Distance bins up to half the widest (site, fold)'s extent."""
    ext = frame.groupby(["site", "fold"])[["x_m", "y_m"]].agg(np.ptp)
    reach = 0.5 * float(np.hypot(ext["x_m"], ext["y_m"]).max()) if len(ext) else 0.0
    return np.linspace(0.0, max(reach, 1.0), _BINS + 1)


def fit_error_model(pixels: pd.DataFrame, beta: float, *, seed: int = 0) -> dict[str, Any]:
    """The covariance model of the standardised errors of held-out ``pixels``.

    Parameters
    ----------
    pixels : pd.DataFrame
        Test pixels of one model: ``site``, ``fold``, ``row``, ``col``, ``x_m``, ``y_m``
        (metres in the site's local frame), ``agb_true``, ``agb_pred`` and ``agb_std``.
    beta : float
        The scale's offset (the calibrated interval's ``beta``).
    seed : int
        Seed of the pixel sample of each (site, fold).

    Returns
    -------
    dict
        ``sill`` (σ²), ``nugget``, ``psill`` (c), ``constant`` (b), ``range_m`` (r, the
        practical range), ``beta``, ``scaled`` (whether ``w`` is the spread + ``beta``, or 1
        without a spread), and the empirical bins (``bins_m``, ``k``, ``n_pairs``).
    """
    frame = _unique_pixels(pixels)
    return _site_models(frame, beta, seed)[0]


def _site_models(
    frame: pd.DataFrame, beta: float, seed: int = 0
) -> tuple[dict[str, Any], dict[Any, dict[str, Any]]]:
    """The error model of ``frame``'s unique pixels, and each fold's from the other folds'
    pixels only (cross-fitted), all from one set of pair sums."""
    edges, sums = _sums_by_group(frame, beta, seed)

    def model(groups: list[dict[str, Any]]) -> dict[str, Any]:
        return {**_fit(groups, edges), "beta": float(beta), "scaled": has_spread(frame)}

    folds = {fold for _, fold in sums}
    held_out = {
        k: model([s for (_, fold), s in sums.items() if fold != k]) for k in folds if len(folds) > 1
    }
    return model(list(sums.values())), held_out


def _sums_by_group(
    frame: pd.DataFrame, beta: float, seed: int = 0
) -> tuple[np.ndarray, dict[tuple, dict[str, Any]]]:
    """The distance bins and each (site, fold)'s pair sums (`_pair_sums`) of unique pixels:
    computed once, any subset of groups is fitted from them."""
    edges = _edges(frame)
    groups = frame.groupby(["site", "fold"])
    return edges, {key: _pair_sums(g, beta, edges, seed + i) for i, (key, g) in enumerate(groups)}


# --------------------------------------------------------------------------------------------
# an area's mean


def _coarsen(grid: np.ndarray, f: int) -> np.ndarray:
    h, w = grid.shape
    padded = np.zeros((-(-h // f) * f, -(-w // f) * f))
    padded[:h, :w] = grid
    return padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f).sum(axis=(1, 3))


def area_mean_variance(
    scale: np.ndarray, dx_m: float, dy_m: float, model: dict[str, Any]
) -> dict[str, float]:
    """The variance of an area's mean error, and the naive one of independent pixels.

    Parameters
    ----------
    scale : np.ndarray
        The area's pixels ``(rows, cols)``: each mapped pixel's scale ``w`` (the spread + ``beta``),
        NaN where the area is not mapped or outside it.
    dx_m, dy_m : float
        The pixels' size in metres.
    model : dict
        A covariance model (`fit_error_model`).

    Returns
    -------
    dict
        ``n`` (mapped pixels), ``variance`` (Mg²/ha², of the area's mean) and
        ``naive_variance`` (the same pixels' errors taken as independent).
    """
    w = np.nan_to_num(np.asarray(scale, dtype=np.float64), nan=0.0)
    n = int(np.isfinite(scale).sum())
    if n == 0:
        return {"n": 0, "variance": float("nan"), "naive_variance": float("nan")}
    s1, s2 = float(w.sum()), float((w**2).sum())
    f = max(1, int(np.ceil(np.sqrt(w.size / MAX_FFT_PIXELS))))
    coarse = _coarsen(w, f) if f > 1 else w
    h, wd = coarse.shape
    shape = (fft.next_fast_len(2 * h - 1, real=True), fft.next_fast_len(2 * wd - 1, real=True))
    pairs = fft.irfft2(np.abs(fft.rfft2(coarse, shape)) ** 2, shape)  # Σ w_i w_j per lag
    lag_y = np.fft.fftfreq(shape[0], 1.0 / shape[0]) * dy_m * f
    lag_x = np.fft.fftfreq(shape[1], 1.0 / shape[1]) * dx_m * f
    dist = np.hypot(lag_y[:, None], lag_x[None, :])
    decay = float(np.sum(pairs * np.exp(-3.0 * dist / model["range_m"])))
    total = model["nugget"] * s2 + model["constant"] * s1**2 + model["psill"] * decay
    return {
        "n": n,
        "variance": max(total, 0.0) / n**2,
        "naive_variance": model["sill"] * s2 / n**2,
    }


# --------------------------------------------------------------------------------------------
# the check: squares laid over the test folds


def _blocks(frame: pd.DataFrame, side_m: float, pixel_m2: float) -> list[pd.DataFrame]:
    """The test pixels of each square of ``side_m`` (by fold) that they cover at least half of."""
    bx = np.floor(frame["x_m"].to_numpy() / side_m)
    by = np.floor(frame["y_m"].to_numpy() / side_m)
    full = side_m**2 / pixel_m2
    groups = frame.groupby([frame["fold"].to_numpy(), bx, by], sort=False)
    return [g for _, g in groups if len(g) >= 0.5 * full]


def _block_error(block: pd.DataFrame, model: dict[str, Any], grid: dict[str, Any]) -> tuple:
    rows = block["row"].to_numpy() - block["row"].min()
    cols = block["col"].to_numpy() - block["col"].min()
    scale = np.full((rows.max() + 1, cols.max() + 1), np.nan)
    scale[rows, cols] = row_scales(block, model["beta"])
    v = area_mean_variance(scale, grid["dx_m"], grid["dy_m"], model)
    err = float((block["agb_pred"] - block["agb_true"]).mean())
    return err, v["variance"], v["naive_variance"]


def block_coverage(
    pixels: pd.DataFrame,
    betas: dict[str, float],
    grids: dict[str, dict[str, Any]],
    *,
    level: float = 0.95,
    sizes_km2: tuple[float, ...] = BLOCK_KM2,
) -> dict[str, Any]:
    """How often the interval of a square's mean AGB covers the truth, per site and size.

    Each fold's squares are checked against the error model fitted on the other folds' test
    pixels of their site (cross-fitted), beside the naive interval (independent pixels).
    ``pixels`` as `fit_error_model` takes them; ``betas`` and ``grids`` (`metric_grid`) per site.
    """
    frame = _unique_pixels(pixels)
    held_out = {site: _site_models(g, betas[str(site)])[1] for site, g in frame.groupby("site")}
    return _coverage(frame, held_out, grids, level, sizes_km2)


def _coverage(
    frame: pd.DataFrame,
    held_out: dict[Any, dict[Any, dict[str, Any]]],
    grids: dict[str, dict[str, Any]],
    level: float,
    sizes_km2: tuple[float, ...],
) -> dict[str, Any]:
    """`block_coverage` of unique pixels, given each site's fold-out models."""
    z = float(norm.ppf(0.5 + level / 2))
    models = {(site, k): m for site, folds in held_out.items() for k, m in folds.items()}
    out: dict[str, Any] = {"level": level}
    for size in sizes_km2:
        side = 1000.0 * np.sqrt(size)
        rows = []
        for (site, k), g in frame.groupby(["site", "fold"]):
            if (site, k) not in models:
                continue
            grid = grids[str(site)]
            for block in _blocks(g, side, grid["dx_m"] * grid["dy_m"]):
                err, var, naive = _block_error(block, models[site, k], grid)
                rows.append((site, err, z * np.sqrt(var), z * np.sqrt(naive)))
        out[f"{size:g}"] = _block_summary(pd.DataFrame(rows, columns=["site", "e", "h", "hn"]))
    return out


def _block_summary(rows: pd.DataFrame) -> dict[str, Any]:
    def summary(r: pd.DataFrame) -> dict[str, Any]:
        return {
            "n_blocks": len(r),
            "coverage": float(np.mean(np.abs(r["e"]) <= r["h"])) if len(r) else None,
            "naive_coverage": float(np.mean(np.abs(r["e"]) <= r["hn"])) if len(r) else None,
            "mean_half_width": float(r["h"].mean()) if len(r) else None,
            "naive_mean_half_width": float(r["hn"].mean()) if len(r) else None,
            "rmse": float(np.sqrt(np.mean(r["e"] ** 2))) if len(r) else None,
        }

    return {
        **summary(rows),
        "per_site": {str(s): summary(g) for s, g in rows.groupby("site")},
    }


# --------------------------------------------------------------------------------------------
# a run's figures


def site_grids(store: str | Path, sites: list[str]) -> dict[str, dict[str, Any]]:
    """Each site's grid in the cube ``store`` and its local metric frame (`metric_grid`)."""
    grids = {}
    for site in sites:
        ds = open_cube(store, site, chunks=None)
        origin, crs = grid_of(ds), cube_crs(ds)
        shape = (ds.sizes["y"], ds.sizes["x"])
        grids[site] = {**metric_grid(origin, crs, shape), "origin": origin, "grid_crs": crs}
    return grids


def with_metric_xy(pixels: pd.DataFrame, grids: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """``pixels`` with ``x_m``, ``y_m``: each pixel's centre in its site's metric frame."""
    xy = np.empty((len(pixels), 2))
    rows, cols = pixels["row"].to_numpy(), pixels["col"].to_numpy()
    for site, idx in pixels.groupby("site").indices.items():
        g = grids[str(site)]
        xy[idx] = grid_centres_m(g["origin"], g["grid_crs"], rows[idx], cols[idx], g["crs"])
    return pixels.assign(x_m=xy[:, 0], y_m=xy[:, 1])


def area_metrics(
    pixels: pd.DataFrame, cal: dict[str, Any], grids: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The error model of an area's mean (pooled, as a new area's maps use it, and per site)
    and the cross-fitted coverage of its 95 % intervals on squares over the test folds."""
    betas = {site: float(c["beta"]) for site, c in cal["per_site"].items()}
    frame = _unique_pixels(pixels)
    # each site's model and its fold-out models (the check's) from one set of pair sums
    sites = {site: _site_models(g, betas[str(site)]) for site, g in frame.groupby("site")}
    return {
        "pooled": _site_models(frame, float(cal["beta"]))[0],
        "per_site": {str(site): full for site, (full, _) in sites.items()},
        "pixel_m": {s: [round(g["dx_m"], 3), round(g["dy_m"], 3)] for s, g in grids.items()},
        "blocks": _coverage(
            frame, {s: held for s, (_, held) in sites.items()}, grids, 0.95, BLOCK_KM2
        ),
    }
