"""The leakage audit: distances between each fold's test, validation and training chips."""

from __future__ import annotations

from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from agbcube.folds.geometry import metric_geometries, nn_distance
from agbcube.folds.splitter import ROLES

_QUANTILES = np.linspace(0, 1, 21)


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
    metric = metric_geometries(folds, sites)
    records = []
    site_info = {}
    for site in pd.unique(sites):
        in_site = sites == site
        g = metric[in_site]
        spacing = nn_distance(g, g, exclusive=True)
        site_info[site] = {"n_chips": int(in_site.sum()), "chip_nn_m": _quantiles(spacing)}
        for k in range(n_folds):
            role = folds[f"role_{k}"].to_numpy()[in_site]
            counts = {r: int((role == r).sum()) for r in ROLES}
            test, train, val = g[role == "test"], g[role == "train"], g[role == "val"]
            d_train = nn_distance(test, train)
            d_val = nn_distance(test, val)
            d_tv = nn_distance(val, train)
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
