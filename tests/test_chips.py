from __future__ import annotations

import numpy as np
import pytest
import shapely
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords
from rasterio.transform import from_origin

from agbcube.chips import chip_origins, make_chips


def synthetic_cube(ny=50, nx=60, n_band=3, crs="EPSG:32643", res=40.0, seed=0) -> xr.Dataset:
    """A small in-memory cube like a site's group of the Zarr store."""
    import rioxarray  # noqa: F401

    rng = np.random.default_rng(seed)
    gbox = GeoBox((ny, nx), from_origin(500000.0, 2400000.0, res, res), crs)
    coords = xr_coords(gbox, crs_coord_name="spatial_ref", always_yx=True)
    agb = rng.uniform(10, 300, (ny, nx)).astype("float32")
    feats = rng.normal(size=(n_band, ny, nx)).astype("float32")
    ds = xr.Dataset(
        {"features": (("band", "y", "x"), feats), "agb": (("y", "x"), agb)},
        coords={**coords, "band": [f"b{i}" for i in range(n_band)]},
    )
    ds.attrs["site"] = "syn"
    return ds.rio.write_crs(crs)


def test_chip_origins_stride_and_fit():
    rows, cols = chip_origins(50, 60, size_px=24, overlap=0.1)
    assert sorted(set(rows)) == [0, 22]  # stride round(24*0.9)=22; 44+24>50
    assert sorted(set(cols)) == [0, 22]
    rows, cols = chip_origins(50, 60, size_px=10, overlap=0.0)
    assert len(rows) == 5 * 6


def test_chip_statistics_match_a_direct_computation():
    ds = synthetic_cube()
    agb = ds.agb.values.copy()
    agb[:12, :12] = np.nan  # chip (0, 0) of size 16 keeps 1 - 144/256 valid pixels
    feats = ds.features.values.copy()
    feats[:, 20:30, 40:50] = np.nan
    ds = ds.assign(agb=(("y", "x"), agb), features=(("band", "y", "x"), feats))
    chips, summary = make_chips(
        ds, size_px=16, overlap=0.0, min_valid_fraction=0.0, max_nan_fraction=1.0
    )
    assert summary == {
        "site": "syn",
        "candidates": 9,
        "kept": 9,
        "dropped_low_valid_agb": 0,
        "dropped_nan_features": 0,
        "shape": [50, 60],
        "size_px": 16,
        "valid_agb_px": 50 * 60 - 144,
        "nan_feature_fraction": pytest.approx(100 / (50 * 60)),
    }
    for row in chips.itertuples():
        win = agb[row.row : row.row + 16, row.col : row.col + 16]
        fwin = feats[:, row.row : row.row + 16, row.col : row.col + 16]
        assert row.valid_fraction == np.isfinite(win).mean()
        assert np.isclose(row.agb_mean, np.nanmean(win))
        assert np.isclose(row.nan_fraction, np.isnan(fwin).mean())
    assert chips.crs.to_epsg() == 4326
    assert chips.chip_id.is_unique and chips.chip_id.iloc[0] == "syn:0:0"


def test_thresholds_drop_and_count():
    ds = synthetic_cube()
    agb = ds.agb.values.copy()
    agb[:16, :16] = np.nan
    feats = ds.features.values.copy()
    feats[:, :16, 16:32] = np.nan
    ds = ds.assign(agb=(("y", "x"), agb), features=(("band", "y", "x"), feats))
    chips, summary = make_chips(
        ds, size_px=16, overlap=0.0, min_valid_fraction=0.7, max_nan_fraction=0.3
    )
    assert summary["dropped_low_valid_agb"] == 1 and summary["dropped_nan_features"] == 1
    assert summary["kept"] == 7 == len(chips)
    assert "syn:0:0" not in set(chips.chip_id) and "syn:0:16" not in set(chips.chip_id)


@settings(max_examples=30, deadline=None)
@given(
    ny=st.integers(10, 60),
    nx=st.integers(10, 60),
    size=st.integers(2, 10),
    overlap=st.sampled_from([0.0, 0.1, 0.5]),
    crs=st.sampled_from(["EPSG:32643", "EPSG:4326"]),
)
def test_chips_lie_inside_their_site(ny, nx, size, overlap, crs):
    res = 40.0 if crs != "EPSG:4326" else 0.0004
    ds = synthetic_cube(ny, nx, crs=crs, res=res)
    if crs == "EPSG:4326":
        from odc.geo.geobox import GeoBox

        gbox = GeoBox((ny, nx), from_origin(80.0, 22.0, res, res), crs)
        ds = ds.assign_coords(xr_coords(gbox, crs_coord_name="spatial_ref", always_yx=True))
        ds = ds.rio.write_crs(crs)
    chips, _ = make_chips(
        ds, size_px=size, overlap=overlap, min_valid_fraction=0.0, max_nan_fraction=1.0
    )
    site = shapely.box(*ds.rio.transform_bounds("EPSG:4326"))
    assert len(chips) > 0
    assert shapely.covers(site.buffer(1e-9), chips.geometry.values).all()
    assert (chips.row + size <= ny).all() and (chips.col + size <= nx).all()
