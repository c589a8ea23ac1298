"""Chip footprints in metres: each site's UTM zone, distances, chips within a buffer."""

from __future__ import annotations

import functools
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely


def metric_geometries(X: gpd.GeoDataFrame, sites: np.ndarray) -> np.ndarray:
    """Footprints in metres: each site in its own UTM zone."""
    out = np.empty(len(X), dtype=object)
    for site in pd.unique(sites):
        idx = np.flatnonzero(sites == site)
        out[idx] = X.geometry.iloc[idx].to_crs(metric_crs(X, idx)).to_numpy()
    return out


def metric_crs(X: gpd.GeoDataFrame, idx: np.ndarray) -> Any:
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


def within(
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


def nn_distance(
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
