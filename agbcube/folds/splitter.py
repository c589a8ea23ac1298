"""`HybridSiteSpatialKFold`: the hybrid site-spatial K-fold, a scikit-learn cross-validator."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from sklearn.model_selection import BaseCrossValidator

from agbcube.errors import FoldError
from agbcube.folds.geometry import metric_geometries, nn_distance, within

ROLES = ("train", "val", "test", "buffer")
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
        metric = metric_geometries(X, sites)
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
        near_test = within(metric, test, ~test, sites, self._buffer_for)
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
                        nn_distance(metric[pool & (cluster == c)], site_test).min()
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
            near_val = within(metric, val, role == "train", sites, self._buffer_for)
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
