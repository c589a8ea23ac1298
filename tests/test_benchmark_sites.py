"""End-to-end checks on the real benchmark sites (skipped when ../shared is absent)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely

from agbcube.config import load_config
from tests.conftest import requires_benchmark

pytestmark = pytest.mark.slow  # builds the benchmark cube and folds


@pytest.fixture(scope="module")
def bench_cfg(tmp_path_factory):
    from pathlib import Path

    from agbcube.config import parse_config
    from agbcube.cube import build_cube

    cfg_path = Path(__file__).resolve().parents[1] / "configs" / "benchmark.yaml"
    cfg = load_config(cfg_path)
    out = tmp_path_factory.mktemp("bench")
    raw = cfg.model_dump(mode="json")
    raw.pop("source", None)
    raw["cube"]["output"] = str(out / "benchmark.zarr")
    raw["folds"]["output"] = str(out / "folds.parquet")
    cfg = parse_config(raw)
    build_cube(cfg.sites, cfg.cube, progress=False)
    return cfg


@requires_benchmark
def test_benchmark_cube_matches_rasters(bench_cfg):
    from agbcube.cube import open_cube

    rng = np.random.default_rng(0)
    for site in bench_cfg.sites:
        ds = open_cube(bench_cfg.cube.output, site.name)
        with rasterio.open(site.satellite) as src:
            sat = src.read()
        with rasterio.open(site.biomass) as src:
            agb = src.read(1)
        rows = rng.integers(0, agb.shape[0], 200)
        cols = rng.integers(0, agb.shape[1], 200)
        cube = ds.features.isel(band=slice(0, 59)).values
        np.testing.assert_array_equal(cube[:, rows, cols], sat[:, rows, cols])
        got = ds.agb.values
        holds_missing = (agb <= 0) | (agb > 600)
        assert np.isnan(got[holds_missing]).all()
        np.testing.assert_array_equal(got[~holds_missing], agb[~holds_missing])
        for season in ("T1", "T2", "T3"):
            ndvi = ds.features.sel(band=f"S2_NDVI_{season}").values
            assert np.nanmin(ndvi) >= -1 and np.nanmax(ndvi) <= 1
            assert np.isfinite(ndvi).mean() > 0.9


@requires_benchmark
def test_benchmark_folds_are_honest(bench_cfg):
    from agbcube.folds import make_folds

    folds = make_folds(bench_cfg)
    meta = folds.attrs["agbcube"]
    assert meta["audit"]["tested_once"]
    assert set(meta["variograms"]) == {"achanakmar", "betul", "khaoyai"}
    n_folds = bench_cfg.folds.n_folds
    for site, buffer in meta["buffer_m"].items():
        assert buffer >= bench_cfg.folds.min_buffer_m
        sub = folds[folds.site == site]
        metric = sub.to_crs(sub.estimate_utm_crs())
        geoms = metric.geometry.to_numpy()
        for k in range(n_folds):
            role = sub[f"role_{k}"].to_numpy()
            test, used = geoms[role == "test"], geoms[np.isin(role, ["train", "val"])]
            assert len(test) > 0 and (role == "train").any()
            d = shapely.distance(test[:, None], used[None, :])
            assert d.min() > buffer
