"""Honest hybrid site-spatial K-fold cross-validation of chips.

Within every site, chips are clustered spatially (KMeans on footprint centres, in metres in the
site's UTM zone) into more clusters than folds, and whole clusters are dealt to folds so that each
fold holds a balanced share of every site's chips. That makes the folds a **true partition**: every
chip is tested exactly once.

For fold ``k``, a chip that is not tested but whose footprint lies within ``buffer_m`` metres of a
test footprint gets the role ``buffer`` and is used for nothing (overlapping chips are always
within the buffer). From the remaining pool, whole clusters are drawn per site as a spatially
separate **validation** set for early stopping, and pool chips within the buffer of a validation
chip are buffered too. Everything left is ``train``.

``buffer_m: auto`` takes each site's AGB autocorrelation range from an empirical variogram (an
exponential model fitted to sampled pixel pairs), the distance beyond which residuals of a model
stop sharing information [Roberts_etal2017]_.

References
----------
.. [Roberts_etal2017] Roberts, D. R. et al. (2017). Cross-validation strategies for data with
   temporal, spatial, hierarchical, or phylogenetic structure. Ecography 40, 913–929.
.. [Mila_etal2022] Milà, C. et al. (2022). Nearest neighbour distance matching Leave-One-Out
   Cross-Validation for map validation. Methods in Ecology and Evolution 13, 1304–1316.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import warnings
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import xarray as xr
from sklearn.model_selection import BaseCrossValidator

from agbcube.chips import make_chips, no_chip_reason, pixel_centres_m
from agbcube.errors import CubeError, FoldError

__all__ = [
    "ROLES",
    "HybridSiteSpatialKFold",
    "check_folds_cube",
    "estimate_range_m",
    "label_mask",
    "label_masks",
    "leakage_audit",
    "make_folds",
    "read_folds",
    "write_folds",
]

ROLES = ("train", "val", "test", "buffer")
_QUANTILES = np.linspace(0, 1, 21)

log = logging.getLogger(__name__)


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
    from agbcube.chips import local_metric_crs

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


# --------------------------------------------------------------------------------------------
# the splitter


class HybridSiteSpatialKFold(BaseCrossValidator):
    """Hybrid site-spatial K-fold over a chips GeoDataFrame: a true partition with buffers.

    Parameters
    ----------
    n_splits : int
        Number of folds.
    buffer_m : float or mapping of site to float
        Gap in metres between test footprints and the footprints used for training or validation.
    validation_fraction : float
        Share of each site's training pool drawn (as whole clusters) for validation.
    clusters_per_fold : int
        KMeans clusters per fold and site; more clusters balance folds better, fewer make test
        regions more compact.
    random_state : int
        Seed; equal seeds give equal folds.
    layout : int or mapping of site to int
        Which of a site's random layouts (seeded by ``random_state``, the site's name and this
        number) to use; 0 is the default. `make_folds` moves on to the next layout when
        one leaves a fold too few training chips.

    Notes
    -----
    ``split`` yields ``(train, test)`` integer positions (train excludes validation and buffer
    chips); `split_with_validation` also yields the validation positions; `assign`
    returns the ``fold`` and ``role_k`` columns.

    Examples
    --------
    >>> cv = HybridSiteSpatialKFold(n_splits=5, buffer_m=1000, random_state=0)  # doctest: +SKIP
    >>> for train, test in cv.split(chips):  # doctest: +SKIP
    ...     model.fit(X[train], y[train])
    """

    def __init__(
        self,
        n_splits: int = 5,
        *,
        buffer_m: float | Mapping[str, float] = 0.0,
        validation_fraction: float = 0.15,
        clusters_per_fold: int = 4,
        random_state: int = 0,
        layout: int | Mapping[str, int] = 0,
    ) -> None:
        self.n_splits = n_splits
        self.buffer_m = buffer_m
        self.validation_fraction = validation_fraction
        self.clusters_per_fold = clusters_per_fold
        self.random_state = random_state
        self.layout = layout

    def get_n_splits(self, X: Any = None, y: Any = None, groups: Any = None) -> int:
        return self.n_splits

    def _iter_test_indices(self, X: Any = None, y: Any = None, groups: Any = None):
        roles = self.assign(X, groups=groups)
        for k in range(self.n_splits):
            yield np.flatnonzero(roles["fold"].to_numpy() == k)

    def split(
        self, X: gpd.GeoDataFrame, y: Any = None, groups: Any = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(train, test)`` positions for each fold."""
        for train, _, test in self.split_with_validation(X, y, groups):
            yield train, test

    def split_with_validation(
        self, X: gpd.GeoDataFrame, y: Any = None, groups: Any = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(train, val, test)`` positions for each fold."""
        roles = self.assign(X, groups=groups)
        for k in range(self.n_splits):
            role = roles[f"role_{k}"].to_numpy()
            yield (
                np.flatnonzero(role == "train"),
                np.flatnonzero(role == "val"),
                np.flatnonzero(role == "test"),
            )

    # -- the work ----------------------------------------------------------------------------

    def _buffer_for(self, site: str) -> float:
        if isinstance(self.buffer_m, Mapping):
            if site not in self.buffer_m:
                raise FoldError(f"buffer_m has no value for site '{site}'")
            return float(self.buffer_m[site])
        return float(self.buffer_m)

    def _layout_of(self, site: str) -> int:
        return int(self.layout.get(site, 0) if isinstance(self.layout, Mapping) else self.layout)

    def _rng(self, site: str, *more: int) -> np.random.Generator:
        layout = self._layout_of(site)
        # layout 0 keeps the generator (and the folds) of earlier versions
        return _site_rng(self.random_state, site, *((layout,) if layout else ()), *more)

    def assign(self, X: gpd.GeoDataFrame, *, groups: Any = None) -> pd.DataFrame:
        """Test fold and per-fold role of every chip.

        Parameters
        ----------
        X : gpd.GeoDataFrame
            Chips with footprint geometries (any CRS) and a ``site`` column unless ``groups``.
        groups : array-like, optional
            Site label per chip (overrides ``X["site"]``).

        Returns
        -------
        pd.DataFrame
            Indexed like ``X``: ``fold`` (0…K−1), ``cluster`` and ``role_0`` … ``role_{K-1}``.

        Raises
        ------
        FoldError
            A site has fewer chips than folds, or a buffer empties a site's training set.
        """
        if not isinstance(X, gpd.GeoDataFrame) or X.crs is None:
            raise FoldError("X must be a GeoDataFrame of chip footprints with a CRS")
        if self.n_splits < 2:
            raise FoldError(f"n_splits must be at least 2, got {self.n_splits}")
        sites = np.asarray(groups if groups is not None else X["site"]).astype(str)
        n = len(X)
        fold = np.full(n, -1, dtype=np.int64)
        cluster = np.full(n, -1, dtype=np.int64)
        metric = _metric_geometries(X, sites)
        for site in pd.unique(sites):
            idx = np.flatnonzero(sites == site)
            f, c = self._deal_site(site, metric[idx])
            fold[idx], cluster[idx] = f, c
        out = pd.DataFrame({"fold": fold, "cluster": cluster}, index=X.index)
        for k in range(self.n_splits):
            out[f"role_{k}"] = self._roles_for_fold(k, fold, cluster, sites, metric)
        return out

    def _deal_site(self, site: str, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """KMeans clusters of a site's chips, dealt to folds as compact, balanced regions."""
        from sklearn.cluster import KMeans

        n = len(geoms)
        if n < self.n_splits:
            raise FoldError(
                f"site '{site}' has {n} chips, fewer than n_folds={self.n_splits}: lower "
                "folds.n_folds, use smaller or more overlapping chips, or drop the site"
            )
        n_clusters = min(n, self.n_splits * self.clusters_per_fold)
        centres = shapely.get_coordinates(shapely.centroid(geoms))
        layout = self._layout_of(site)
        km_seed = self.random_state + 7919 * layout  # other layouts, other clusters too
        km = KMeans(n_clusters=n_clusters, n_init=10, random_state=km_seed)
        labels = km.fit_predict(centres)
        sizes = np.bincount(labels, minlength=n_clusters).astype(np.float64)
        where = np.array([centres[labels == c].mean(0) for c in range(n_clusters)])
        rng = self._rng(site)
        # Seeds: farthest-point sampling from a random cluster, so regions start far apart.
        seeds = [int(rng.integers(n_clusters))]
        d = np.linalg.norm(where - where[seeds[0]], axis=1)
        for _ in range(1, self.n_splits):
            seeds.append(int(np.argmax(d)))
            d = np.minimum(d, np.linalg.norm(where - where[seeds[-1]], axis=1))
        cluster_fold = np.full(n_clusters, -1, dtype=np.int64)
        fold_chips = np.zeros(self.n_splits)
        for k, c in enumerate(rng.permutation(seeds)):
            cluster_fold[c] = k
            fold_chips[k] += sizes[c]
        # Grow: the fold with the fewest chips takes the unassigned cluster nearest to its own
        # clusters. Folds stay balanced and each fold's test region stays compact, which keeps
        # the buffer ring around it (and the training chips it costs) small.
        while (cluster_fold < 0).any():
            k = int(np.argmin(fold_chips))
            free = np.flatnonzero(cluster_fold < 0)
            mine = where[cluster_fold == k]
            gap = np.linalg.norm(where[free, None, :] - mine[None], axis=2).min(1)
            c = free[int(np.argmin(gap))]
            cluster_fold[c] = k
            fold_chips[k] += sizes[c]
        return cluster_fold[labels], labels

    def _roles_for_fold(
        self,
        k: int,
        fold: np.ndarray,
        cluster: np.ndarray,
        sites: np.ndarray,
        metric: np.ndarray,
    ) -> np.ndarray:
        role = np.full(len(fold), "train", dtype=object)
        test = fold == k
        role[test] = "test"
        near_test = _within(metric, test, ~test, sites, self._buffer_for)
        role[near_test] = "buffer"
        if self.validation_fraction > 0:
            val = np.zeros(len(fold), dtype=bool)
            for site in pd.unique(sites):
                pool = (sites == site) & (role == "train")
                candidates = np.unique(cluster[pool])
                if candidates.size < 2:
                    continue  # always leave one cluster to train on
                # Nearest clusters to the test region first: their own buffer ring then falls
                # largely inside the test's ring, which costs the fewest training chips.
                site_test = metric[(sites == site) & test]
                gap = np.array(
                    [
                        _nn_distance(metric[pool & (cluster == c)], site_test).min()
                        for c in candidates
                    ]
                )
                jitter = self._rng(site, k).random(candidates.size)
                want = self.validation_fraction * pool.sum()
                taken = 0
                for c in candidates[np.lexsort((jitter, gap))][:-1]:
                    if taken >= want:
                        break
                    members = pool & (cluster == c)
                    val |= members
                    taken += members.sum()
            role[val] = "val"
            near_val = _within(metric, val, role == "train", sites, self._buffer_for)
            role[near_val] = "buffer"
        for site in pd.unique(sites):
            in_site = sites == site
            if (in_site & test).any() and not (in_site & (role == "train")).any():
                counts = {r: int((in_site & (role == r)).sum()) for r in ROLES}
                raise FoldError(
                    f"site '{site}', fold {k}: the buffer of {self._buffer_for(site):.0f} m "
                    f"leaves no training chips ({counts}); set a smaller folds.buffer_m, use "
                    "fewer folds, or smaller chips"
                )
        return role.astype(str)


def _site_rng(seed: int, site: str, *more: int) -> np.random.Generator:
    """A generator per (seed, site, ...): a site's folds do not depend on the other sites."""
    return np.random.default_rng([seed, zlib.crc32(site.encode()), *more])


def _metric_geometries(X: gpd.GeoDataFrame, sites: np.ndarray) -> np.ndarray:
    """Footprints in metres: each site in its own UTM zone."""
    out = np.empty(len(X), dtype=object)
    for site in pd.unique(sites):
        idx = np.flatnonzero(sites == site)
        out[idx] = X.geometry.iloc[idx].to_crs(_metric_crs(X, idx)).to_numpy()
    return out


def _metric_crs(X: gpd.GeoDataFrame, idx: np.ndarray) -> Any:
    """The CRS in which a site's distances are measured: its own if projected, else its UTM."""
    if X.crs.is_projected:
        return X.crs
    bounds = tuple(np.round(X.geometry.iloc[idx].to_crs(4326).total_bounds, 6))
    return _utm_of(bounds)


@functools.lru_cache(maxsize=256)
def _utm_of(bounds: tuple[float, float, float, float]) -> Any:
    """The UTM CRS of a lon/lat box (pyproj's database lookup is slow: once per box)."""
    from pyproj import CRS
    from pyproj.aoi import AreaOfInterest
    from pyproj.database import query_utm_crs_info

    west, south, east, north = bounds
    infos = query_utm_crs_info(
        datum_name="WGS 84",
        area_of_interest=AreaOfInterest(west, south, east, north),
    )
    return CRS.from_epsg(infos[0].code)


def _within(
    metric: np.ndarray,
    source: np.ndarray,
    candidates: np.ndarray,
    sites: np.ndarray,
    buffer_for: Any,
) -> np.ndarray:
    """Candidates whose footprint is within the site's buffer of a source footprint.

    Overlapping footprints count as within any buffer; with a zero buffer, only overlap counts.
    Distances are compared within a site (sites are kilometres to continents apart).
    """
    hit = np.zeros(len(metric), dtype=bool)
    for site in pd.unique(sites):
        src = np.flatnonzero(source & (sites == site))
        cand = np.flatnonzero(candidates & (sites == site))
        if src.size == 0 or cand.size == 0:
            continue
        tree = shapely.STRtree(metric[cand])
        buffer = buffer_for(site)
        if buffer > 0:
            _, j = tree.query(metric[src], predicate="dwithin", distance=buffer)
            hit[cand[np.unique(j)]] = True
        else:
            i, j = tree.query(metric[src], predicate="intersects")
            area = shapely.area(shapely.intersection(metric[src][i], metric[cand][j]))
            hit[cand[np.unique(j[area > 0])]] = True
    return hit


# --------------------------------------------------------------------------------------------
# audit


def _nn_distance(
    geoms_from: np.ndarray, geoms_to: np.ndarray, *, exclusive: bool = False
) -> np.ndarray:
    """Distance (m) from each footprint in ``geoms_from`` to its nearest in ``geoms_to``.

    ``exclusive`` skips a footprint's own equal geometry (nearest *other* chip).
    """
    if len(geoms_from) == 0 or len(geoms_to) == 0:
        return np.array([])
    tree = shapely.STRtree(geoms_to)
    i, j = tree.query_nearest(geoms_from, all_matches=False, exclusive=exclusive)
    d = np.full(len(geoms_from), np.inf)
    d[i] = shapely.distance(geoms_from[i], geoms_to[j])
    return d


def _quantiles(d: np.ndarray) -> list[float] | None:
    return np.quantile(d, _QUANTILES).round(1).tolist() if d.size else None


def leakage_audit(folds: gpd.GeoDataFrame, n_folds: int) -> dict[str, Any]:
    """Check a folds table for leakage.

    For every fold and site: chips per role, the minimum footprint distance between test and
    train (and test and validation) chips, and the distribution of nearest-training-chip distances
    of the test chips, beside the nearest-other-chip distance of every chip of the site (the
    distances a model trained on all chips meets when mapping the sampled area; see NNDM,
    [Mila_etal2022]_).

    Returns
    -------
    dict
        ``folds`` (a list of per fold and site records), ``sites`` (per site: chip spacing
        quantiles), ``tested_once`` (every chip in exactly one test fold), ``quantiles``.
    """
    sites = folds["site"].to_numpy().astype(str)
    metric = _metric_geometries(folds, sites)
    records = []
    site_info = {}
    for site in pd.unique(sites):
        in_site = sites == site
        g = metric[in_site]
        spacing = _nn_distance(g, g, exclusive=True)
        site_info[site] = {"n_chips": int(in_site.sum()), "chip_nn_m": _quantiles(spacing)}
        for k in range(n_folds):
            role = folds[f"role_{k}"].to_numpy()[in_site]
            counts = {r: int((role == r).sum()) for r in ROLES}
            test, train, val = g[role == "test"], g[role == "train"], g[role == "val"]
            d_train = _nn_distance(test, train)
            d_val = _nn_distance(test, val)
            d_tv = _nn_distance(val, train)
            records.append(
                {
                    "fold": k,
                    "site": site,
                    **{f"n_{r}": c for r, c in counts.items()},
                    "min_train_test_m": float(d_train.min()) if d_train.size else None,
                    "min_val_test_m": float(d_val.min()) if d_val.size else None,
                    "min_train_val_m": float(d_tv.min()) if d_tv.size else None,
                    "test_nn_train_m": _quantiles(d_train),
                }
            )
    tested = np.stack([folds[f"role_{k}"].to_numpy() == "test" for k in range(n_folds)])
    return {
        "n_folds": n_folds,
        "tested_once": bool((tested.sum(0) == 1).all()),
        "quantiles": _QUANTILES.round(2).tolist(),
        "folds": records,
        "sites": site_info,
    }


# --------------------------------------------------------------------------------------------
# the stage: cube -> chips -> folds


def make_folds(config: Any, *, echo: Any = None, client: Any = None) -> gpd.GeoDataFrame:
    """Chips of the config's sites in a built cube, with their folds and roles.

    Parameters
    ----------
    config : agbcube.config.Config
        Uses ``sites`` (their names), ``cube.output``, ``chips`` and ``folds``.
    echo : callable, optional
        Deprecated: receives the progress lines instead of the ``agbcube.folds`` logger.
    client : distributed.Client, optional
        Each site's chips, variogram and buffer search run as a task on its workers (which
        read the cube at the same path); the folds are the same as without it.

    Returns
    -------
    gpd.GeoDataFrame
        The chip columns, ``cluster``, ``fold`` and ``role_0`` … ``role_{K-1}``;
        ``attrs["agbcube"]`` holds the per-site chip summary, buffers, fold layouts, variograms,
        the audit and the cube the chips were cut from (its sites' build keys).

    Raises
    ------
    CubeError
        The cube is missing, incomplete, damaged, or lacks a site of the config.
    FoldError
        No site gives a usable chip (the message gives each site's cause), or the chips cannot
        be split.
    """
    from agbcube._log import reporter

    say = reporter(log, echo)
    store = config.cube.output
    chips_cfg, folds_cfg = config.chips, config.folds
    keys = _config_site_keys(config)
    parts, summaries, buffers, variograms = [], {}, {}, {}
    layouts: dict[str, int] = {}
    for site, (gdf, summary, variogram, buffer, layout) in _sites(config, list(keys), client, say):
        summaries[site] = summary
        if gdf is None:
            continue
        if variogram is not None:
            variograms[site] = variogram
        buffers[site], layouts[site] = buffer, layout
        parts.append(gdf)
    if not parts:
        causes = "; ".join(f"site '{s}': {_no_chip(m, config)}" for s, m in summaries.items())
        raise FoldError(f"no site has a usable chip. {causes}")
    chips = pd.concat(parts, ignore_index=True)
    cv = HybridSiteSpatialKFold(
        folds_cfg.n_folds,
        buffer_m=buffers,
        validation_fraction=folds_cfg.validation_fraction,
        clusters_per_fold=folds_cfg.clusters_per_fold,
        random_state=folds_cfg.seed,
        layout=layouts,
    )
    roles = cv.assign(chips)
    out = gpd.GeoDataFrame(pd.concat([chips, roles], axis=1), geometry="geometry", crs=chips.crs)
    out.attrs["agbcube"] = {
        "n_folds": folds_cfg.n_folds,
        "chips": chips_cfg.model_dump(mode="json"),
        "folds": folds_cfg.model_dump(mode="json"),
        "buffer_m": buffers,
        "layout": layouts,
        "variograms": variograms,
        "chip_summary": summaries,
        "audit": leakage_audit(out, folds_cfg.n_folds),
        "cube": {"store": str(Path(store).resolve()), "sites": {s: keys[s] for s in summaries}},
    }
    return out


def _config_site_keys(config: Any) -> dict[str, str]:
    """The build key of each of the config's sites in its cube; a site not built is an error."""
    from agbcube._store import cube_site_keys

    keys = cube_site_keys(config.cube.output)
    missing = [site.name for site in config.sites if site.name not in keys]
    if missing:
        raise CubeError(
            f"cube {config.cube.output} has no site {missing} of the config (its sites: "
            f"{list(keys)}); run `agbcube build-cube CONFIG` first"
        )
    return {site.name: keys[site.name] for site in config.sites}


_SiteFolds = tuple[gpd.GeoDataFrame | None, dict, dict | None, float, int]


def _sites(
    config: Any, sites: list[str], client: Any, say: Any
) -> Iterator[tuple[str, _SiteFolds]]:
    """Every site's `_site_folds`, in the config's order: here one after another, or
    as tasks on ``client`` (their warnings raised here, the first site's error raised)."""
    if client is None:
        for site in sites:
            part = _site_folds(config, site)
            _say_site(say, site, part)
            yield site, part
        return
    from uuid import uuid4

    from distributed import as_completed

    token = uuid4().hex[:8]
    futures = {
        client.submit(_site_folds_task, config, site, key=f"folds/{site}-{token}"): site
        for site in sites
    }
    done: dict[str, _SiteFolds] = {}
    failed: dict[str, BaseException] = {}
    for future in as_completed(list(futures)):
        site = futures[future]
        if future.status != "finished":
            failed[site] = future.exception()
            continue
        done[site], caught = future.result()
        for category, message in caught:
            warnings.warn(message, category, stacklevel=3)
        _say_site(say, site, done[site])
    if failed:
        raise failed[next(s for s in sites if s in failed)]
    for site in sites:
        yield site, done[site]


def _say_site(say: Any, site: str, part: _SiteFolds) -> None:
    gdf, summary, _, buffer, _ = part
    if gdf is not None:
        say(
            f"site '{site}': {summary['kept']} chips of {summary['candidates']} "
            f"(dropped {summary['dropped_low_valid_agb']} for AGB, "
            f"{summary['dropped_nan_features']} for NaN features); buffer {buffer:.0f} m"
        )


def _site_folds(config: Any, site: str) -> _SiteFolds:
    """A site's chips, their summary, its variogram (``buffer_m: auto``), buffer and layout;
    no chips: ``(None, summary, None, nan, 0)``."""
    folds_cfg = config.folds
    gdf, summary, variogram = _cut_site(config, site)
    if gdf is None:
        return None, summary, None, float("nan"), 0
    if variogram is not None:
        buffer, layout = _auto_buffer(gdf, variogram["range_m"], folds_cfg)
    else:
        buffer = max(float(folds_cfg.buffer_m), folds_cfg.min_buffer_m)
        # none enough: layout 0, and the splitter's error if a fold keeps nothing at all
        layout = _first_layout(gdf, buffer, folds_cfg) or 0
    return gdf, summary, variogram, buffer, layout


_ONE_SITE = threading.Lock()  # catching warnings is per process: one site task at a time


def _site_folds_task(config: Any, site: str) -> tuple[_SiteFolds, list[tuple[type, str]]]:
    """`_site_folds` on a worker, with its warnings returned to be raised by the client."""
    import dask

    with _ONE_SITE, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the chip statistics run here, not on the cluster from inside one of its tasks
        with dask.config.set(scheduler="synchronous"):
            part = _site_folds(config, site)
    return part, [(w.category, str(w.message)) for w in caught]


def _cut_site(config: Any, site: str) -> tuple[gpd.GeoDataFrame | None, dict, dict | None]:
    """A site's chips (None, with a warning naming the cause, when it has none), their summary
    and, with ``buffer_m: auto``, its variogram; a damaged store is named with the site."""
    from agbcube._store import open_cube, site_read_errors

    store, chips_cfg = config.cube.output, config.chips
    with site_read_errors(store, site):
        ds = open_cube(store, site)
        gdf, summary = make_chips(
            ds,
            size_px=chips_cfg.size,
            overlap=chips_cfg.overlap,
            min_valid_fraction=chips_cfg.min_valid_fraction,
            max_nan_fraction=chips_cfg.max_nan_fraction,
            site=site,
        )
        if summary["kept"] == 0:
            warnings.warn(
                f"site '{site}' has no usable chip and is left out: {_no_chip(summary, config)}",
                UserWarning,
                stacklevel=5,
            )
            return None, summary, None
        if config.folds.buffer_m != "auto":
            return gdf, summary, None
        return gdf, summary, estimate_range_m(ds, random_state=config.folds.seed)


def _no_chip(summary: dict[str, Any], config: Any) -> str:
    return no_chip_reason(
        summary,
        min_valid_fraction=config.chips.min_valid_fraction,
        max_nan_fraction=config.chips.max_nan_fraction,
    )


LAYOUTS = 8  # layouts tried per site before a buffer is judged too wide for it


def _train_share(
    chips: gpd.GeoDataFrame, buffer_m: float, folds_cfg: Any, layout: int = 0
) -> float:
    """Smallest share, over folds, of a site's non-test chips left for training (0 if none)."""
    cv = HybridSiteSpatialKFold(
        folds_cfg.n_folds,
        buffer_m=buffer_m,
        validation_fraction=folds_cfg.validation_fraction,
        clusters_per_fold=folds_cfg.clusters_per_fold,
        random_state=folds_cfg.seed,
        layout=layout,
    )
    try:
        roles = cv.assign(chips)
    except FoldError:
        return 0.0
    shares = [
        (roles[f"role_{k}"] == "train").sum() / max(1, (roles["fold"] != k).sum())
        for k in range(folds_cfg.n_folds)
    ]
    return float(min(shares))


def _first_layout(chips: gpd.GeoDataFrame, buffer_m: float, folds_cfg: Any) -> int | None:
    """The first of a site's layouts whose every fold keeps ``min_train_fraction`` to train on.

    Which fold a region of a small site falls in decides how much of the site its buffer ring
    takes; another layout (another random start) often keeps enough where the first does not.
    None when none of `LAYOUTS` does at this buffer.
    """
    for layout in range(LAYOUTS):
        if _train_share(chips, buffer_m, folds_cfg, layout) >= folds_cfg.min_train_fraction:
            return layout
    return None


def _auto_buffer(chips: gpd.GeoDataFrame, range_m: float, folds_cfg: Any) -> tuple[float, int]:
    """The variogram range, or the largest smaller buffer that keeps enough training chips.

    A range comparable to the site's size would buffer away every training chip; then the
    buffer is shrunk (never below ``min_buffer_m``) until every fold keeps
    ``min_train_fraction`` of the site's non-test chips, with a warning that says so. Each
    buffer is tried with up to `LAYOUTS` layouts of the site's folds.

    Returns
    -------
    buffer_m : float
    layout : int
        The layout to deal the site's folds with.
    """
    site = str(chips["site"].iloc[0])
    floor = folds_cfg.min_buffer_m
    want = max(range_m, floor)
    layout = _first_layout(chips, want, folds_cfg)
    if layout is not None:
        return want, layout
    layout = _first_layout(chips, floor, folds_cfg)
    if layout is None:
        raise FoldError(
            f"site '{site}': even the minimum buffer of {floor:.0f} m leaves a fold with less "
            f"than {folds_cfg.min_train_fraction:.0%} of the site's chips to train on (tried "
            f"{LAYOUTS} fold layouts); lower folds.min_buffer_m or folds.n_folds, or use "
            "smaller chips"
        )
    lo, hi = floor, want
    for _ in range(10):
        mid = 0.5 * (lo + hi)
        if _train_share(chips, mid, folds_cfg, layout) >= folds_cfg.min_train_fraction:
            lo = mid
        else:
            hi = mid
    warnings.warn(
        f"site '{site}': its AGB autocorrelation range ({range_m:.0f} m) would leave a fold "
        f"with less than {folds_cfg.min_train_fraction:.0%} of the chips to train on; the "
        f"buffer is {lo:.0f} m instead. Test chips closer than the range to training chips may "
        "give optimistic estimates at this site.",
        UserWarning,
        stacklevel=5,
    )
    return lo, layout


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}_{suffix}")


def write_folds(folds: gpd.GeoDataFrame, path: str | Path, *, maps: bool = True) -> list[Path]:
    """Write the folds GeoParquet, its leakage audit (JSON) and a PNG map per site, atomically.

    Every path is checked before anything is written: a folder, or a file agbcube did not
    write, at any of them raises `OutputExistsError` and nothing is
    written. Returns the paths written.
    """
    from agbcube._io import (
        atomic_path,
        check_replaceable,
        output_lock,
        write_json_atomic,
        written_by,
    )

    path = Path(path)
    meta = folds.attrs.get("agbcube", {})
    audit_path = _sidecar(path, "audit.json")
    sites = pd.unique(folds["site"]) if maps else []
    pngs = {site: _sidecar(path, f"map_{site}.png") for site in sites}
    for target, what in [(path, "folds.output"), (audit_path, "folds audit")] + [
        (png, "folds map") for png in pngs.values()
    ]:
        check_replaceable(target, what=what)
    with output_lock(path, what="folds"):
        with atomic_path(path, what="folds.output") as tmp:
            table = folds.copy()
            table.attrs = {}
            table.to_parquet(tmp, index=False, schema_version="1.0.0", write_covering_bbox=False)
            _add_parquet_metadata(tmp, {"agbcube": json.dumps(meta, default=str)})
        write_json_atomic(audit_path, {"written_by": written_by(), **meta}, what="folds audit")
        n_folds = int(meta.get("n_folds", _n_folds(folds)))
        for site, png in pngs.items():
            with atomic_path(png, what="folds map") as tmp:
                plot_fold_map(folds, site, n_folds, tmp, buffer_m=meta.get("buffer_m", {}))
    return [path, audit_path, *pngs.values()]


def _add_parquet_metadata(path: Path, extra: dict[str, str]) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = dict(table.schema.metadata or {})
    meta.update({k.encode(): v.encode() for k, v in extra.items()})
    pq.write_table(table.replace_schema_metadata(meta), path)


def _n_folds(folds: pd.DataFrame) -> int:
    return sum(1 for c in folds.columns if c.startswith("role_"))


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
    metric = _metric_geometries(folds, sites)
    near = _within(metric, fold == k, fold != k, sites, lambda site: float(buffers[site]))
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

    metric = _metric_geometries(folds, sites)
    n, _, h, w = lonlat.shape
    d_test = np.full((n, h, w), np.inf)
    d_val = np.full((n, h, w), np.inf)
    for site in pd.unique(sites):
        in_site = np.flatnonzero(sites == site)
        cand = in_site[~test[in_site]]
        if cand.size == 0:
            continue
        to_m = Transformer.from_crs(4326, _metric_crs(folds, in_site), always_xy=True)
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


def read_folds(path: str | Path, *, cube: str | Path | None = None) -> gpd.GeoDataFrame:
    """Read a folds GeoParquet written by `write_folds` (metadata in ``attrs``).

    The file is validated as strictly as a fresh config: geometry with a CRS, the chip
    columns, ``fold`` and ``role_0`` … ``role_{K-1}`` with roles among `ROLES`, every
    chip once, each fold testing its own chips and training on some. The folds are then
    checked against the cube they were cut from (`check_folds_cube`).

    Parameters
    ----------
    path : str or Path
        The folds file.
    cube : str or Path, optional
        The cube the folds will be used with; default the cube they record, when it exists.

    Raises
    ------
    FoldError
        Missing or unreadable file, a malformed table, or folds cut from an earlier build of
        the cube.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    again = "run `agbcube folds CONFIG` to make them again"
    if not path.exists():
        raise FoldError(f"folds file {path} does not exist; run `agbcube folds <config>` first")
    if path.is_dir():
        raise FoldError(f"folds file {path} is a folder; folds.output must name a GeoParquet file")
    try:
        meta = pq.read_schema(path).metadata or {}
        gdf = gpd.read_parquet(path)
    except (OSError, ValueError, TypeError, KeyError) as err:  # ArrowInvalid is a ValueError
        raise FoldError(
            f"folds file {path} is not a GeoParquet table of chips ({type(err).__name__}: "
            f"{err}); {again}"
        ) from err
    if b"agbcube" in meta:
        try:
            gdf.attrs["agbcube"] = json.loads(meta[b"agbcube"])
        except ValueError as err:
            raise FoldError(
                f"folds file {path}: its 'agbcube' metadata is not JSON; {again}"
            ) from err
    _validate_folds(gdf, f"folds file {path}", again)
    record = gdf.attrs.get("agbcube", {}).get("cube") or {}
    store = cube if cube is not None else record.get("store")
    if store is not None and (cube is not None or Path(store).exists()):
        check_folds_cube(gdf, store, source=f"folds {path}")
    return gdf


def _validate_folds(gdf: gpd.GeoDataFrame, where: str, again: str) -> None:
    """Raise FoldError for anything `make_folds` would never have written."""
    if not isinstance(gdf, gpd.GeoDataFrame) or gdf.geometry.name not in gdf or gdf.crs is None:
        raise FoldError(f"{where} has no chip footprints (a geometry column with a CRS); {again}")
    roles = {str(c) for c in gdf.columns if str(c).startswith("role_")}
    n_folds = len(roles)
    missing = [c for c in ("chip_id", "site", "row", "col", "fold") if c not in gdf]
    if missing or n_folds < 2 or roles != {f"role_{k}" for k in range(n_folds)}:
        raise FoldError(
            f"{where} lacks columns: needs chip_id, site, row, col, fold and role_0 … "
            f"role_{{K-1}} (K >= 2), has {list(gdf.columns)}; {again}"
        )
    for col in roles:
        bad = sorted(set(gdf[col].astype(str)) - set(ROLES))
        if bad:
            raise FoldError(f"{where}: column {col} holds {bad}, not one of {list(ROLES)}; {again}")
    _validate_chips(gdf, n_folds, where, again)


def _validate_chips(gdf: gpd.GeoDataFrame, n_folds: int, where: str, again: str) -> None:
    fold = pd.to_numeric(gdf["fold"], errors="coerce").to_numpy()
    pos = pd.to_numeric(pd.concat([gdf["row"], gdf["col"]]), errors="coerce").to_numpy()
    if not (np.isin(fold, np.arange(n_folds)).all() and (pos >= 0).all()):
        raise FoldError(
            f"{where}: 'fold' must hold 0…{n_folds - 1} and row/col non-negative pixel offsets "
            f"(found fold {sorted(set(map(str, gdf['fold'])))[:8]}); {again}"
        )
    ids = gdf["chip_id"].astype(str)
    cells = gdf["site"].astype(str) + ":" + gdf["row"].astype(str) + ":" + gdf["col"].astype(str)
    dupes = sorted(set(ids[ids.duplicated()]) | set(cells[cells.duplicated()]))
    if dupes:
        raise FoldError(f"{where} lists chips more than once: {dupes[:5]}; {again}")
    roles = np.stack([gdf[f"role_{k}"].astype(str).to_numpy() for k in range(n_folds)], axis=1)
    tested = roles == "test"
    if not (tested.sum(1) == 1).all() or not tested[np.arange(len(gdf)), fold.astype(int)].all():
        raise FoldError(
            f"{where}: a chip must be 'test' in exactly its own fold (column 'fold'); {again}"
        )
    empty = [k for k in range(n_folds) if not (roles[:, k] == "train").any()]
    if empty:
        raise FoldError(f"{where}: fold(s) {empty} have no training chip; {again}")


def check_folds_cube(
    folds: gpd.GeoDataFrame, store: str | Path, *, source: str = "the folds"
) -> None:
    """Refuse folds cut from another build of the cube than the one at ``store``.

    `make_folds` records each site's build key (a digest of its inputs and settings);
    a site rebuilt since from other rasters or settings, or gone, has another. Folds from an
    older agbcube record nothing and are not checked.

    Raises
    ------
    FoldError
        Naming the sites that changed and what to run.
    CubeError
        ``store`` is not a complete cube.
    """
    from agbcube._store import cube_site_keys

    record = folds.attrs.get("agbcube", {}).get("cube")
    if not record:
        return
    keys = cube_site_keys(store)
    used = set(pd.unique(folds["site"].astype(str)))
    changed = sorted(
        s for s, k in record.get("sites", {}).items() if s in used and keys.get(s) != k
    )
    if changed:
        raise FoldError(
            f"{source} were cut from an earlier build of cube {store}: site(s) {changed} have "
            "been rebuilt from other rasters or settings (or removed) since, so the chips' "
            "windows no longer match the cube; run `agbcube folds CONFIG` again"
        )


_ROLE_COLOURS = {"train": "#4c72b0", "val": "#dd8452", "test": "#c44e52", "buffer": "#cccccc"}


def plot_fold_map(
    folds: gpd.GeoDataFrame,
    site: str,
    n_folds: int,
    path: str | Path,
    *,
    buffer_m: Mapping[str, float] | None = None,
) -> None:
    """A PNG per site: chips coloured by test fold, then the roles of each fold.

    Chips are drawn in the site's UTM zone, with its coordinates (km) on the axes.
    """
    from matplotlib.patches import Patch

    from agbcube._plot import label_projected, new_figure

    sub = folds[folds["site"] == site]
    sub = sub.to_crs(sub.estimate_utm_crs())
    n = n_folds + 1
    fig = new_figure((3.4 * n, 4.4))
    axes = fig.subplots(1, n, squeeze=False, sharex=True, sharey=True)[0]
    sub.plot(column="fold", categorical=True, cmap="tab10", ax=axes[0], edgecolor="none")
    axes[0].set_title(f"{site}: test fold", fontsize=9)
    for k in range(n_folds):
        colours = sub[f"role_{k}"].map(_ROLE_COLOURS)
        sub.plot(color=colours, ax=axes[k + 1], edgecolor="none")
        axes[k + 1].set_title(f"fold {k} roles", fontsize=9)
    for i, ax in enumerate(axes):
        ax.set_aspect("equal")
        label_projected(ax, sub.crs)
        if i:
            ax.set_ylabel("")
    handles = [Patch(color=c, label=r) for r, c in _ROLE_COLOURS.items()]
    buf = (buffer_m or {}).get(site)
    title = f"{site}: {len(sub)} chips" + (f", buffer {buf:.0f} m" if buf is not None else "")
    fig.suptitle(title)
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    from agbcube._io import written_by

    # the caller writes through a temporary path; the metadata marks the PNG as agbcube's
    fig.savefig(path, dpi=90, format="png", metadata={"agbcube": written_by()})
