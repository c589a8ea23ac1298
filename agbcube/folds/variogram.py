"""The AGB autocorrelation range of a site, from an empirical variogram (``buffer_m: auto``)."""

from __future__ import annotations

from typing import Any

import geopandas as gpd
import numpy as np
import shapely
import xarray as xr

from agbcube.chips import local_metric_crs, pixel_centres_m
from agbcube.errors import FoldError

# --------------------------------------------------------------------------------------------
# variogram


def _exponential_drift(
    h: np.ndarray, nugget: float, psill: float, range_m: float, drift: float
) -> np.ndarray:
    # Exponential model in its "practical range" form (95 % of the sill at range_m) plus a
    # linear term: site-scale AGB trends make empirical variograms keep rising, and a plain
    # exponential would then report the trend's scale (the site's size) as the range.
    return nugget + psill * (1.0 - np.exp(-3.0 * h / range_m)) + drift * h


def estimate_range_m(
    ds: xr.Dataset, *, n_samples: int = 2000, n_bins: int = 20, random_state: int = 0
) -> dict[str, Any]:
    """Estimate the AGB autocorrelation range of a site from an empirical variogram.

    Parameters
    ----------
    ds : xr.Dataset
        A site's cube with ``agb (y, x)`` and a CRS.
    n_samples : int
        Valid AGB pixels sampled (all pairs among them are used).
    n_bins : int
        Distance bins of the empirical variogram, up to half the site's extent.
    random_state : int
        Seed of the pixel sample.

    Returns
    -------
    dict
        ``range_m`` (practical range of the fitted exponential part), ``nugget``, ``psill``,
        ``drift_per_m``, ``model``, and the empirical ``bins_m`` / ``gamma`` / ``n_pairs``.
    """

    agb = ds["agb"].values
    rows, cols = np.nonzero(np.isfinite(agb))
    if rows.size < 10:
        raise FoldError(
            f"site '{ds.attrs.get('site')}': only {rows.size} valid AGB pixels, too few for a "
            "variogram; set folds.buffer_m to a number of metres"
        )
    rng = np.random.default_rng(random_state)
    pick = rng.choice(rows.size, size=min(n_samples, rows.size), replace=False)
    rows, cols = rows[pick], cols[pick]
    bounds = gpd.GeoSeries([shapely.box(*ds.rio.bounds())], crs=ds.rio.crs).to_crs(4326)
    xy = pixel_centres_m(ds, rows, cols, local_metric_crs(bounds))
    values = agb[rows, cols].astype(np.float64)
    if np.ptp(values) == 0:
        raise FoldError(
            f"site '{ds.attrs.get('site')}': AGB is constant ({values[0]:g} Mg/ha at every "
            "valid pixel), so it has no autocorrelation range and nothing to learn; check the "
            "AGB map and cube.agb_range, or set folds.buffer_m to a number of metres"
        )
    centres, gamma, n_pairs, max_d = _empirical_variogram(xy, values, n_bins)
    fit = _fit_variogram(centres, gamma, n_pairs, max_d, float(values.var()))
    return {
        **fit,
        "n_samples": int(rows.size),
        "bins_m": centres.round(1).tolist(),
        "gamma": gamma.round(3).tolist(),
        "n_pairs": n_pairs.tolist(),
    }


def _empirical_variogram(
    xy: np.ndarray, values: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Semivariance per distance bin up to half the sample's extent: bin centres, gamma, pair
    counts and that half extent."""
    from scipy.spatial.distance import pdist

    dist = pdist(xy)
    half_sq = 0.5 * pdist(values[:, None], "sqeuclidean")
    max_d = 0.5 * dist.max()
    edges = np.linspace(0.0, max_d, n_bins + 1)
    which = np.digitize(dist, edges) - 1
    ok = (which >= 0) & (which < n_bins)
    n_pairs = np.bincount(which[ok], minlength=n_bins)
    gamma = np.bincount(which[ok], weights=half_sq[ok], minlength=n_bins) / np.maximum(n_pairs, 1)
    return 0.5 * (edges[1:] + edges[:-1]), gamma, n_pairs, float(max_d)


def _fit_variogram(
    centres: np.ndarray, gamma: np.ndarray, n_pairs: np.ndarray, max_d: float, var: float
) -> dict[str, Any]:
    """An exponential variogram with a linear drift fitted to the bins with ≥ 30 pairs (so a
    site-wide trend is not read as range); without convergence, the first bin reaching 95 %
    of the plateau."""
    from scipy.optimize import curve_fit

    use = n_pairs >= 30
    h, g = centres[use], gamma[use]
    try:
        (nugget, psill, range_m, drift), _ = curve_fit(
            _exponential_drift,
            h,
            g,
            p0=(0.1 * var, 0.9 * var, max_d / 4, 0.0),
            bounds=([0, 0, h.min() if h.size else 1.0, 0], [var * 2, var * 4, max_d, var / max_d]),
            sigma=1.0 / np.sqrt(n_pairs[use]),
            maxfev=20000,
        )
        model = "exponential+drift"
    except (RuntimeError, ValueError):
        plateau = np.median(g[-max(3, g.size // 3) :]) if g.size else var
        reach = np.nonzero(g >= 0.95 * plateau)[0]
        range_m = float(h[reach[0]]) if reach.size else float(max_d)
        nugget, psill, model = float(g[0]) if g.size else 0.0, plateau, "empirical"
        drift = 0.0
    return {
        "range_m": float(range_m),
        "nugget": float(nugget),
        "psill": float(psill),
        "drift_per_m": float(drift),
        "model": model,
    }
