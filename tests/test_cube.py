from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from odc.geo.geobox import GeoBox
from pyproj import Transformer
from rasterio.transform import from_origin

from agbcube.bands import BAND_PRESETS
from agbcube.config import CubeConfig, SiteConfig
from agbcube.cube import (
    align,
    build_cube,
    build_site_cube,
    cube_sites,
    open_cube,
    open_cube_tree,
    target_geobox,
)
from agbcube.errors import (
    BandError,
    CubeError,
    GridError,
    InputFileError,
    MissingCRSError,
    NoOverlapError,
    OutputLockedError,
)
from tests.conftest import write_raster


def _site(d: dict, **kw) -> SiteConfig:
    return SiteConfig(name=d["name"], satellite=d["satellite"], biomass=d["biomass"], **kw)


def _cube(tmp_path: Path, **kw) -> CubeConfig:
    return CubeConfig(output=tmp_path / "cube.zarr", chunks=32, **kw)


class _RaiseIfComputes:
    """Fail if dask computes anything (the check of xarray's own test-suite)."""

    def __enter__(self):
        def scheduler(dsk, keys, **kwargs):
            raise RuntimeError("dask computed something while building the lazy cube")

        self._cm = dask.config.set(scheduler=scheduler)
        self._cm.__enter__()

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def test_same_grid_values_equal_the_rasters(simple_site, tmp_path):
    cube = _cube(tmp_path)
    build_cube([_site(simple_site)], cube, progress=False)
    ds = open_cube(cube.output, "simple").load()
    raw = ["B4_T1", "B8_T1", "VV_T1", "VH_T1"]
    assert list(ds.band.values[:4]) == raw
    np.testing.assert_array_equal(ds.features.sel(band=raw).values, simple_site["stack"])
    # AGB: 0, negative and > 600 become NaN, the rest is kept exactly
    agb = simple_site["agb"]
    valid = (agb > 0) & (agb <= 600)
    np.testing.assert_array_equal(np.isnan(ds.agb.values), ~valid)
    np.testing.assert_array_equal(ds.agb.values[valid], agb[valid])
    assert ds.agb.attrs["units"] == "Mg ha-1"
    assert ds.features.dtype == np.float32 and ds.agb.dtype == np.float32
    ndvi = ds.features.sel(band="S2_NDVI_T1").values
    assert np.nanmin(ndvi) >= -1 and np.nanmax(ndvi) <= 1
    assert "S1_RVI_T1" in ds.band.values
    assert ds.rio.crs.to_epsg() == 4326
    with rasterio.open(simple_site["satellite"]) as src:
        assert ds.rio.transform() == src.transform


def test_build_is_lazy(simple_site, tmp_path):
    with _RaiseIfComputes():
        ds = build_site_cube(_site(simple_site), _cube(tmp_path))
    assert ds.features.chunks is not None
    assert ds.features.data.chunksize == (ds.sizes["band"], 32, 32)


def test_reprojected_float64_stack_with_sentinel_nodata_and_preset(tmp_path):
    """UTM 30 m float64 stack, nodata -9999, no descriptions -> EPSG:4326 ~40 m AGB grid.

    Each band is a plane in UTM metres, so the expected value at any target pixel is that
    plane evaluated at the pixel centre projected to UTM: an independent computation.
    """
    utm = "EPSG:32644"
    to_utm = Transformer.from_crs("EPSG:4326", utm, always_xy=True)
    lon0, lat0, res_deg = 81.0, 22.0, 0.00036
    x0, y1 = to_utm.transform(lon0 - 0.003, lat0 + 0.003)
    n = 90
    xs = x0 + (np.arange(n) + 0.5) * 30.0
    ys = y1 - (np.arange(n) + 0.5) * 30.0
    gx, gy = np.meshgrid(xs, ys)
    slopes = np.linspace(0.05, 0.5, 59)
    planes = np.stack([100 + s * (gx - x0) - 0.5 * s * (y1 - gy) + i for i, s in enumerate(slopes)])
    planes[:, 40:43, 40:43] = -9999.0
    write_raster(
        tmp_path / "sat.tif",
        planes,
        crs=utm,
        transform=from_origin(x0, y1, 30, 30),
        nodata=-9999.0,
        dtype="float64",
    )
    agb = np.full((50, 50), 150.0, dtype="float32")
    write_raster(tmp_path / "agb.tif", agb, transform=from_origin(lon0, lat0, res_deg, res_deg))
    site = SiteConfig(
        name="utm",
        satellite=tmp_path / "sat.tif",
        biomass=tmp_path / "agb.tif",
        bands="multisensor-59",
    )
    cube = _cube(tmp_path, indices="none")
    build_cube([site], cube, progress=False)
    ds = open_cube(cube.output, "utm")
    assert list(ds.band.values) == list(BAND_PRESETS["multisensor-59"])
    assert ds.rio.crs.to_epsg() == 4326 and ds.sizes == {"band": 59, "y": 50, "x": 50}
    feats = ds.features.values
    lon, lat = np.meshgrid(ds.x.values, ds.y.values)
    px, py = to_utm.transform(lon, lat)
    # where the 40 m pixel's footprint is far from the -9999 hole, the result is the plane
    hole_x, hole_y = xs[41], ys[41]
    far = np.hypot(px - hole_x, py - hole_y) > 150
    for i in (0, 30, 58):
        expected = 100 + slopes[i] * (px - x0) - 0.5 * slopes[i] * (y1 - py) + i
        # average resampling of a plane over a ~40 m footprint of 30 m pixels: error bounded by
        # half a source pixel of gradient
        tol = 15 * 1.5 * slopes[i] + 1e-3
        np.testing.assert_allclose(feats[i][far], expected[far], atol=tol)
    assert np.isnan(feats[:, ~far]).any()  # the sentinel became NaN, never a -9999 average
    assert np.nanmin(feats) > -1000  # planes reach -575; any -9999 blend would go far below


def test_explicit_grid_and_coarsening(simple_site, tmp_path):
    from agbcube.config import GridSpec

    cube = _cube(tmp_path, grid=GridSpec(crs="EPSG:4326", resolution=0.0008))
    ds = build_site_cube(_site(simple_site), cube)
    assert ds.sizes["y"] == 20 and ds.sizes["x"] == 24
    # 2x2 average of the AGB (NaN excluded) and of a band
    agb = simple_site["agb"].astype("float64")
    agb[(agb <= 0) | (agb > 600)] = np.nan
    block = np.nanmean(agb[:2, 2:4])
    assert np.isnan(block) or ds.agb.values[0, 1] == pytest.approx(block, rel=1e-5)
    red = simple_site["stack"][0, 10:12, 10:12].mean()
    assert ds.features.sel(band="B4_T1").values[5, 5] == pytest.approx(red, rel=1e-5)


def test_nodata_overrides_for_integer_stacks(tmp_path, rng):
    stack = rng.integers(1, 3000, (2, 20, 20)).astype("uint16")
    stack[0, :2] = 65535
    stack[1, 5, :] = 0
    write_raster(tmp_path / "s.tif", stack, descriptions=["B4", "B8"])  # untagged
    write_raster(tmp_path / "b.tif", rng.uniform(10, 100, (20, 20)).astype("float32"))
    for nodata, masked_rows in ((65535, [0, 1]), (0, [5])):
        site = SiteConfig(
            name=f"n{nodata}",
            satellite=tmp_path / "s.tif",
            biomass=tmp_path / "b.tif",
            satellite_nodata=nodata,
        )
        ds = build_site_cube(site, _cube(tmp_path)).compute()
        raw = ds.features.sel(band=["B4", "B8"]).values
        rows_nan = sorted(set(np.where(np.isnan(raw).any(axis=(0, 2)))[0]))
        assert rows_nan == masked_rows
    # a tagged nodata needs no override
    write_raster(tmp_path / "t.tif", stack, descriptions=["B4", "B8"], nodata=65535)
    site = SiteConfig(name="t", satellite=tmp_path / "t.tif", biomass=tmp_path / "b.tif")
    raw = build_site_cube(site, _cube(tmp_path)).features.sel(band="B4").values
    assert np.isnan(raw[:2]).all() and not np.isnan(raw[2:]).any()


def test_partial_overlap_warns_and_crops(simple_site, tmp_path):
    with rasterio.open(simple_site["satellite"]) as src:
        t = src.transform
    half = simple_site["stack"][:, :, 24:]
    write_raster(
        tmp_path / "half.tif",
        half,
        transform=from_origin(t.c + 24 * t.a, t.f, t.a, -t.e),
        descriptions=["B4_T1", "B8_T1", "VV_T1", "VH_T1"],
    )
    site = SiteConfig(name="half", satellite=tmp_path / "half.tif", biomass=simple_site["biomass"])
    with pytest.warns(UserWarning, match=r"covers only 50\.0% of the AGB map"):
        ds = build_site_cube(site, _cube(tmp_path))
    assert ds.sizes["x"] == 24
    np.testing.assert_array_equal(ds.features.isel(band=0).values, half[0])


def test_no_overlap_is_an_error(simple_site, tmp_path):
    write_raster(
        tmp_path / "far.tif",
        simple_site["stack"],
        transform=from_origin(10.0, 50.0, 0.0004, 0.0004),
        descriptions=["a", "b", "c", "d"],
    )
    site = SiteConfig(name="far", satellite=tmp_path / "far.tif", biomass=simple_site["biomass"])
    with pytest.raises(NoOverlapError, match="site 'far'.*do not overlap"):
        build_site_cube(site, _cube(tmp_path))


def test_bad_inputs_fail_before_compute(simple_site, tmp_path):
    with pytest.raises(InputFileError, match="site 'simple' satellite: file .*nope.tif"):
        build_site_cube(_site({**simple_site, "satellite": tmp_path / "nope.tif"}), _cube(tmp_path))
    junk = tmp_path / "junk.tif"
    junk.write_text("not a raster")
    with pytest.raises(InputFileError, match="not a raster GDAL can read"):
        build_site_cube(_site({**simple_site, "biomass": junk}), _cube(tmp_path))
    nocrs = write_raster(tmp_path / "nocrs.tif", simple_site["agb"], crs=None)
    with pytest.raises(MissingCRSError, match="has no CRS. Set `crs:`"):
        build_site_cube(_site({**simple_site, "biomass": nocrs}), _cube(tmp_path))
    ds = build_site_cube(_site({**simple_site, "biomass": nocrs}, crs="EPSG:4326"), _cube(tmp_path))
    assert ds.sizes["y"] == 40
    two = write_raster(tmp_path / "two.tif", np.stack([simple_site["agb"]] * 2))
    with pytest.raises(GridError, match="has 2 bands; the AGB map must be a single band"):
        build_site_cube(_site({**simple_site, "biomass": two}), _cube(tmp_path))
    with pytest.raises(BandError, match="has 4 bands but `bands:` in the config gives 2"):
        build_site_cube(_site(simple_site, bands=["a", "b"]), _cube(tmp_path))
    with pytest.raises(BandError, match=r"needs band\(s\) \['B11_T1'\]"):
        build_site_cube(_site(simple_site), _cube(tmp_path, indices=["S2_NDMI_T1"]))


def test_zero_band_stack_is_a_clear_error(simple_site, tmp_path):
    """A stack declaring no bands (a VRT: GDAL writes no band-less GeoTIFF) is refused by name.

    GDAL itself will not open it; the error names the site, the file and what GDAL said.
    """
    vrt = tmp_path / "empty.vrt"
    vrt.write_text(
        '<VRTDataset rasterXSize="48" rasterYSize="40">'
        "<SRS>EPSG:4326</SRS><GeoTransform>80.0, 0.0004, 0, 22.0, 0, -0.0004</GeoTransform>"
        "</VRTDataset>"
    )
    with pytest.raises(InputFileError, match=r"site 'simple' satellite: .*empty.vrt.*bands"):
        build_site_cube(_site({**simple_site, "satellite": vrt}), _cube(tmp_path))


def test_single_band_stack_builds(simple_site, tmp_path):
    one = write_raster(tmp_path / "one.tif", simple_site["stack"][:1], descriptions=["CH"])
    ds = build_site_cube(_site({**simple_site, "satellite": one}), _cube(tmp_path))
    assert list(ds.band.values) == ["CH"]


def test_resume_skips_unchanged_sites_and_rebuilds_changed(simple_site, tmp_path):
    cube = _cube(tmp_path)
    site = _site(simple_site)
    first = build_cube([site], cube, progress=False)
    assert first["simple"]["status"] == "built"
    group = cube.output / "simple"
    stamp = (group / ".zattrs").stat().st_mtime_ns
    again = build_cube([site], cube, progress=False)
    assert again["simple"]["status"] == "up to date"
    assert (group / ".zattrs").stat().st_mtime_ns == stamp
    assert again["simple"]["n_valid_agb"] == first["simple"]["n_valid_agb"]
    os.utime(simple_site["biomass"], ns=(1, 1))  # input changed
    assert build_cube([site], cube, progress=False)["simple"]["status"] == "built"
    assert build_cube([site], cube, overwrite=True, progress=False)["simple"]["status"] == "built"
    # a different setting rebuilds too
    cube2 = cube.model_copy(update={"agb_range": (0.0, 300.0)})
    assert build_cube([site], cube2, progress=False)["simple"]["status"] == "built"


def test_a_cube_being_built_is_named_as_such_not_as_interrupted(simple_site, tmp_path, monkeypatch):
    """`folds` or `train` started while `build-cube` still writes: the message names the
    writer and says to wait, not to rebuild."""
    import agbcube.cube as cube_mod

    cube = _cube(tmp_path)
    real, seen = cube_mod.compute, []

    def compute_then_look(*args, **kwargs):
        with pytest.raises(CubeError) as caught:
            cube_sites(cube.output)
        seen.append(str(caught.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(cube_mod, "compute", compute_then_look)
    build_cube([_site(simple_site)], cube, progress=False)
    assert seen and all(f"is being written by process {os.getpid()}" in m for m in seen)
    assert all("once `agbcube build-cube` has finished" in m for m in seen)
    monkeypatch.undo()
    assert cube_sites(cube.output) == ["simple"]


def test_interrupted_build_never_looks_complete(simple_site, tmp_path, monkeypatch):
    import agbcube.cube as cube_mod

    cube = _cube(tmp_path)
    site_a = _site(simple_site)
    site_b = _site({**simple_site, "name": "other"})
    build_cube([site_a], cube, progress=False)
    before = open_cube(cube.output, "simple").load()

    calls = {"n": 0}
    real = cube_mod.compute

    def failing_compute(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # die while writing the second site
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cube_mod, "compute", failing_compute)
    with pytest.raises(KeyboardInterrupt):
        build_cube([site_a, site_b], cube, overwrite=True, progress=False)
    monkeypatch.undo()
    with pytest.raises(CubeError, match="incomplete"):
        cube_sites(cube.output)
    assert not (cube.output / "other").exists()
    assert not [p for p in cube.output.iterdir() if ".tmp-" in p.name]
    result = build_cube([site_a, site_b], cube, progress=False)
    assert result["simple"]["status"] == "up to date"  # finished work was kept
    assert result["other"]["status"] == "built"
    xr.testing.assert_identical(open_cube(cube.output, "simple").load(), before)
    assert cube_sites(cube.output) == ["simple", "other"]
    tree = open_cube_tree(cube.output)
    assert set(tree.children) == {"simple", "other"}
    # a site dropped from the config is kept, unless pruned
    build_cube([site_b], cube, progress=False)
    assert cube_sites(cube.output) == ["other", "simple"]
    build_cube([site_b], cube, prune=True, progress=False)
    assert cube_sites(cube.output) == ["other"] and not (cube.output / "simple").exists()


def test_leftover_temporaries_are_cleaned(simple_site, tmp_path):
    cube = _cube(tmp_path)
    build_cube([_site(simple_site)], cube, progress=False)
    junk = cube.output / ".simple.tmp-deadbeef"
    junk.mkdir()
    build_cube([_site(simple_site)], cube, progress=False)
    assert not junk.exists()


def test_refuses_foreign_output_and_second_writer(simple_site, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(CubeError, match="not an agbcube cube"):
        build_cube([_site(simple_site)], CubeConfig(output=out), progress=False)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "x"
    # a file at cube.output is refused too, and left alone
    (tmp_path / "file.zarr").write_text("mine")
    with pytest.raises(CubeError, match="not an agbcube cube"):
        build_cube([_site(simple_site)], CubeConfig(output=tmp_path / "file.zarr"), progress=False)
    assert (tmp_path / "file.zarr").read_text() == "mine"
    cube = _cube(tmp_path)
    from agbcube._io import output_lock

    with (
        output_lock(cube.output, what="cube"),
        pytest.raises(OutputLockedError, match=f"being written by process {os.getpid()}"),
    ):
        build_cube([_site(simple_site)], cube, progress=False)
    # whatever a lock file holds, only a live OS lock counts: no stale-lock guessing
    lock = cube.output.with_name(f".{cube.output.name}.lock")
    lock.write_text('{"host": "elsewhere", "pid": 1, "started": 0')
    build_cube([_site(simple_site)], cube, progress=False)
    assert not lock.exists()


def test_open_cube_errors(tmp_path):
    with pytest.raises(CubeError, match="does not exist; run `agbcube build-cube"):
        open_cube(tmp_path / "none.zarr", "a")


# --- alignment properties -----------------------------------------------------------------


def _grid_da(data: np.ndarray, gbox: GeoBox) -> xr.DataArray:
    from odc.geo.xr import xr_coords

    return xr.DataArray(data[None], dims=("band", "y", "x")).assign_coords(
        xr_coords(gbox, crs_coord_name="spatial_ref", always_yx=True)
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ny=st.integers(3, 30),
    nx=st.integers(3, 30),
    res=st.sampled_from([10.0, 30.0, 0.0004]),
    seed=st.integers(0, 1000),
)
def test_align_onto_own_grid_is_identity(ny, nx, res, seed):
    crs = "EPSG:4326" if res < 1 else "EPSG:32643"
    gbox = GeoBox(
        (ny, nx),
        from_origin(500000.0 if res > 1 else 80.0, 2400000.0 if res > 1 else 22.0, res, res),
        crs,
    )
    data = np.random.default_rng(seed).normal(size=(ny, nx)).astype("float32")
    out = align(_grid_da(data, gbox), gbox, gbox, resampling="bilinear")
    np.testing.assert_array_equal(out.values[0], data)


@settings(max_examples=25, deadline=None)
@given(dy=st.integers(-5, 5), dx=st.integers(-5, 5), seed=st.integers(0, 1000))
def test_shifted_copy_aligns_back(dy, dx, seed):
    res = 30.0
    gbox = GeoBox((20, 24), from_origin(500000.0, 2400000.0, res, res), "EPSG:32643")
    data = np.random.default_rng(seed).normal(size=(20, 24)).astype("float32")
    shifted = gbox.translate_pix(dx, dy)  # the same pixels, another origin
    moved = _grid_da(data, gbox).pipe(align, gbox, shifted, resampling="bilinear")
    back = align(moved, shifted, gbox, resampling="bilinear").values[0]
    keep = np.zeros_like(data, bool)
    keep[max(0, dy) : 20 + min(0, dy), max(0, dx) : 24 + min(0, dx)] = True
    np.testing.assert_array_equal(back[keep], data[keep])
    assert np.isnan(back[~keep]).all()


def test_target_geobox_for_grids(simple_site):
    from agbcube.cube import probe_raster

    sat = probe_raster(simple_site["satellite"]).geobox
    bio = probe_raster(simple_site["biomass"]).geobox
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no partial-overlap warning
        gbox, overlap = target_geobox(sat, bio, "satellite")
    assert gbox == sat and overlap == pytest.approx(1.0)


def test_zarr_round_trip_keeps_crs_and_attrs(simple_site, tmp_path):
    cube = _cube(tmp_path)
    lazy = build_site_cube(_site(simple_site), cube)
    build_cube([_site(simple_site)], cube, progress=False)
    ds = open_cube(cube.output, "simple")
    xr.testing.assert_allclose(ds.features.load(), lazy.features.compute())
    assert ds.attrs["site"] == "simple" and "provenance" in ds.attrs
    import json

    prov = json.loads(ds.attrs["provenance"])
    assert prov["satellite"]["path"].endswith("sat.tif") and "zarr" in prov["versions"]
    assert ds.rio.crs == lazy.rio.crs


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    ny=st.integers(3, 70),
    nx=st.integers(3, 70),
    n_band=st.integers(1, 4),
    chunks=st.integers(16, 40),
    dtype=st.sampled_from(["uint16", "int16", "float32", "float64"]),
    tagged=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_cube_round_trips_raster_values(
    tmp_path_factory, ny, nx, n_band, chunks, dtype, tagged, seed
):
    """Whatever the shape, dtype, chunking and nodata: the cube holds the rasters' values."""
    tmp = tmp_path_factory.mktemp("roundtrip")
    rng = np.random.default_rng(seed)
    sentinel = {"uint16": 65535, "int16": -9999, "float32": -9999.0, "float64": -9999.0}[dtype]
    stack = rng.integers(1, 3000, (n_band, ny, nx)).astype(dtype)
    holes = rng.random(stack.shape) < 0.15
    stack[holes] = sentinel
    agb = rng.uniform(-50, 700, (ny, nx)).astype("float32")
    agb[rng.random(agb.shape) < 0.1] = 0.0
    names = [f"X{i}" for i in range(n_band)]
    write_raster(tmp / "sat.tif", stack, descriptions=names, nodata=sentinel if tagged else None)
    write_raster(tmp / "agb.tif", agb)
    site = SiteConfig(
        name="s",
        satellite=tmp / "sat.tif",
        biomass=tmp / "agb.tif",
        satellite_nodata=None if tagged else sentinel,
    )
    cube = CubeConfig(output=tmp / "cube.zarr", chunks=chunks, indices="none")
    build_cube([site], cube, progress=False)
    ds = open_cube(cube.output, "s")
    assert ds.features.encoding["chunks"][1:] == (min(chunks, ny), min(chunks, nx))
    ds = ds.load()
    assert list(ds.band.values) == names
    want = np.where(holes, np.nan, stack.astype("float64")).astype("float32")
    np.testing.assert_array_equal(ds.features.values, want)
    valid = (agb > 0) & (agb <= 600)
    np.testing.assert_array_equal(ds.agb.values, np.where(valid, agb, np.nan))


def test_sites_missing_from_the_config_are_kept_unless_pruned(simple_site, tmp_path):
    cube = _cube(tmp_path)
    site_a = _site(simple_site)
    site_b = _site({**simple_site, "name": "other"})
    build_cube([site_a, site_b], cube, progress=False)
    before = open_cube(cube.output, "simple").load()
    for overwrite in (False, True):
        build_cube([site_b], cube, overwrite=overwrite, progress=False)
        assert cube_sites(cube.output) == ["other", "simple"]
        xr.testing.assert_identical(open_cube(cube.output, "simple").load(), before)
    build_cube([site_b], cube, prune=True, progress=False)
    assert cube_sites(cube.output) == ["other"]
    assert not (cube.output / "simple").exists()
    assert set(open_cube_tree(cube.output).children) == {"other"}


def test_a_new_area_never_replaces_a_site_of_the_cube(simple_site, tmp_path, rng):
    """predict --config builds with replace_changed=False: the training sites are safe."""
    cube = _cube(tmp_path)
    train = _site(simple_site)
    build_cube([train], cube, progress=False)
    before = open_cube(cube.output, "simple").load()
    new_agb = write_raster(tmp_path / "new_agb.tif", rng.uniform(10, 300, (40, 48)).astype("f4"))
    new_area = _site({**simple_site, "name": "new", "biomass": new_agb})
    build_cube([new_area], cube, replace_changed=False, progress=False)
    assert cube_sites(cube.output) == ["new", "simple"]
    same_name = _site({**simple_site, "biomass": new_agb})  # 'simple' from other rasters
    with pytest.raises(CubeError, match="site 'simple' is already in cube .* never replaced"):
        build_cube([same_name], cube, replace_changed=False, progress=False)
    xr.testing.assert_identical(open_cube(cube.output, "simple").load(), before)
    assert cube_sites(cube.output) == ["new", "simple"]


@pytest.mark.slow
def test_local_cluster_build_equals_threaded_and_dashboard_answers(
    simple_site, tmp_path, monkeypatch
):
    """--scheduler local: a LocalCluster whose dashboard answers, and the same cube."""
    import urllib.request

    import agbcube._dask as agb_dask

    threaded = _cube(tmp_path)
    build_cube([_site(simple_site)], threaded, progress=False)
    seen = {}
    real = agb_dask.dask_scheduler

    def spy(spec, **kw):
        cm = real(spec, **kw)

        class Wrapper:
            def __enter__(self):
                client = cm.__enter__()
                url = client.dashboard_link.replace("/status", "/info/main/workers.html")
                with urllib.request.urlopen(url, timeout=20) as resp:
                    seen["status"] = resp.status
                return client

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrapper()

    import agbcube.cube as cube_mod

    monkeypatch.setattr(cube_mod, "dask_scheduler", spy)
    local = CubeConfig(output=tmp_path / "local.zarr", chunks=32)
    build_cube([_site(simple_site)], local, scheduler="local", progress=True)
    assert seen["status"] == 200
    xr.testing.assert_identical(
        open_cube(local.output, "simple").load().drop_attrs(),
        open_cube(threaded.output, "simple").load().drop_attrs(),
    )


def test_unknown_scheduler_is_a_config_error(simple_site, tmp_path):
    from agbcube.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown scheduler 'gpu'"):
        build_cube([_site(simple_site)], _cube(tmp_path), scheduler="gpu", progress=False)
    assert not _cube(tmp_path).output.exists()  # refused before anything was written


# --- reliability: hangs, damaged stores and inputs, empty sites --------------------------------


@pytest.mark.parametrize(
    ("crs", "resolution", "match"),
    [
        ("EPSG:32644", 0.0004, r"times more pixels .* give a resolution in metre"),  # degrees
        ("EPSG:32644", 1e-9, r"times more pixels"),
        ("EPSG:4326", 30.0, r"coarser than the site itself .* give a resolution in degree"),
    ],
)
def test_a_grid_size_from_the_wrong_units_fails_before_planning(
    simple_site, tmp_path, crs, resolution, match
):
    from agbcube.config import GridSpec

    cube = _cube(tmp_path, grid=GridSpec(crs=crs, resolution=resolution))
    with _RaiseIfComputes(), pytest.raises(GridError, match=f"site 'simple': cube.grid .*{match}"):
        build_cube([_site(simple_site)], cube, progress=False)
    assert not cube.output.exists()


def test_a_damaged_chunk_names_the_site_and_is_rebuilt(simple_site, tmp_path, caplog):
    from agbcube._store import site_read_errors

    cube = _cube(tmp_path)
    site = _site(simple_site)
    build_cube([site], cube, progress=False)
    before = open_cube(cube.output, "simple").load()
    chunk = next((cube.output / "simple" / "features").glob("0.*"))
    chunk.write_bytes(b"garbage" * 50)
    with (
        pytest.raises(CubeError, match=r"cube .*, site 'simple': its data cannot be read"),
        site_read_errors(cube.output, "simple"),  # what every reader of agbcube wraps reads in
    ):
        open_cube(cube.output, "simple").load()
    with caplog.at_level(logging.WARNING, logger="agbcube"):
        result = build_cube([site], cube, progress=False)
    assert "site 'simple': its files" in caplog.text and "rebuilding it" in caplog.text
    assert result["simple"]["status"] == "built"  # never "up to date"
    xr.testing.assert_identical(open_cube(cube.output, "simple").load(), before)
    assert build_cube([site], cube, progress=False)["simple"]["status"] == "up to date"


def test_a_lost_zmetadata_is_named_and_restored(simple_site, tmp_path):
    cube = _cube(tmp_path)
    site = _site(simple_site)
    build_cube([site], cube, progress=False)
    before = open_cube(cube.output, "simple").load()
    (cube.output / ".zmetadata").unlink()
    with pytest.raises(CubeError, match=r"lost its consolidated metadata .*\.zmetadata"):
        open_cube(cube.output, "simple")
    assert build_cube([site], cube, progress=False)["simple"]["status"] == "up to date"
    xr.testing.assert_identical(open_cube(cube.output, "simple").load(), before)


def test_a_raster_damaged_past_its_header_names_the_site(tmp_path, rng):
    path = tmp_path / "sat.tif"
    with rasterio.open(
        path, "w", driver="GTiff", height=200, width=200, count=2, dtype="float32",
        crs="EPSG:4326", transform=from_origin(80, 22, 0.0004, 0.0004), tiled=True,
        blockxsize=64, blockysize=64, compress="deflate",
    ) as dst:  # fmt: skip
        dst.write(rng.uniform(100, 3000, (2, 200, 200)).astype("float32"))
    data = bytearray(path.read_bytes())
    data[len(data) // 4 : len(data) // 2] = bytes(len(data) // 2 - len(data) // 4)
    path.write_bytes(bytes(data))  # the tiles are garbage, the header is intact
    agb = write_raster(tmp_path / "agb.tif", rng.uniform(10, 300, (200, 200)).astype("f4"))
    site = SiteConfig(name="broken", satellite=path, biomass=agb, bands=["B4", "B8"])
    with pytest.raises(InputFileError, match=r"site .broken.: \S*sat.tif is truncated or damaged"):
        build_cube([site], _cube(tmp_path, indices="none"), progress=False)
    with pytest.raises(CubeError, match="incomplete"):  # nothing looks built
        cube_sites(_cube(tmp_path).output)
    assert not (_cube(tmp_path).output / "broken").exists()


def test_empty_agb_or_mostly_empty_bands_warn(simple_site, tmp_path):
    cube = _cube(tmp_path, agb_range=(1000.0, 2000.0))  # no AGB value in range
    with pytest.warns(UserWarning, match=r"site 'simple': no valid AGB pixel .*agb_range"):
        result = build_cube([_site(simple_site)], cube, progress=False)
    assert result["simple"]["n_valid_agb"] == 0
    stack = np.full((4, 40, 48), -9999, "float32")
    stack[0] = 500.0  # one band of four holds data
    sat = write_raster(tmp_path / "empty.tif", stack, descriptions=["B4", "B8", "VV", "VH"])
    site = _site({**simple_site, "name": "blank", "satellite": sat}, satellite_nodata=-9999)
    with pytest.warns(UserWarning, match=r"site 'blank': 3 of 4 feature bands are empty"):
        result = build_cube([site], _cube(tmp_path, indices="none"), progress=False)
    assert result["blank"]["empty_bands"] == ["B8", "VV", "VH"]


def test_a_plain_open_zarr_finds_the_crs_and_the_axes(demo_config):
    """CF: xr.open_zarr without decode_coords="all" gives spatial_ref as a coordinate, so
    rioxarray and odc-geo find each site's CRS; x/y and AGB say what they are."""
    import odc.geo.xr  # noqa: F401
    import rioxarray  # noqa: F401

    from agbcube.cube import open_cube

    for site in ("alpha", "beta"):
        ds = xr.open_zarr(demo_config.cube.output, group=site)
        assert "spatial_ref" in ds.coords and "spatial_ref" not in ds.data_vars
        assert ds.rio.crs == open_cube(demo_config.cube.output, site).rio.crs
        assert ds.rio.crs is not None and ds.odc.geobox.crs.epsg == ds.rio.crs.to_epsg()
        assert ds.attrs["Conventions"] == "CF-1.8" and ds.agb.attrs["units"] == "Mg ha-1"
        with rasterio.open(f'ZARR:"{demo_config.cube.output}":/{site}/agb') as gdal:
            assert gdal.crs == ds.rio.crs  # GDAL's Zarr driver follows grid_mapping
        x, y = ds.x.attrs, ds.y.attrs
        assert (x["standard_name"], x["axis"], x["units"]) == ("longitude", "X", "degrees_east")
        assert (y["standard_name"], y["axis"], y["units"]) == ("latitude", "Y", "degrees_north")


def test_each_band_carries_its_unit_where_the_file_states_one(simple_site, tmp_path):
    """The satellite GeoTIFF's band units (GDAL's per-band unit) go into the cube's
    band_units coordinate; the indices agbcube computes are unitless ("1")."""
    with rasterio.open(simple_site["satellite"], "r+") as dst:
        dst.units = ("", "", "dB", "dB")  # reflectance bands without a unit, backscatter in dB
    cube = _cube(tmp_path)
    build_cube([_site(simple_site)], cube, progress=False)
    ds = xr.open_zarr(cube.output, group="simple")
    units = dict(zip(ds.band.values, ds.band_units.values, strict=True))
    assert [units[b] for b in ("B4_T1", "B8_T1", "VV_T1", "VH_T1")] == ["", "", "dB", "dB"]
    assert units["S2_NDVI_T1"] == units["S1_RVI_T1"] == "1"


@pytest.mark.parametrize("role", ["satellite", "biomass"])
def test_a_truncated_raster_is_named_not_its_partner(simple_site, tmp_path, role):
    """A COG cut short after its header (a download that stopped): the header reads, a pixel
    block does not, and the error names that file alone."""
    from rasterio.shutil import copy as copy_raster

    site = dict(simple_site)
    for r in ("satellite", "biomass"):
        cog = tmp_path / f"{r}_cog.tif"
        copy_raster(site[r], cog, driver="COG", BLOCKSIZE=16, COMPRESS="NONE")
        site[r] = cog
    data = site[role].read_bytes()
    site[role].write_bytes(data[: int(len(data) * 0.6)])
    cube = _cube(tmp_path)
    with pytest.raises(InputFileError) as caught:
        build_cube([_site(site)], cube, progress=False)
    message = str(caught.value)
    assert f"{site[role]} is truncated or damaged" in message
    other = "biomass" if role == "satellite" else "satellite"
    assert str(site[other]) not in message and "\n" not in message
    assert not (cube.output / "simple").exists()


def test_an_input_changed_in_place_with_its_old_size_and_time_is_rebuilt(simple_site, tmp_path):
    """Up to date is decided by content: a raster rewritten in place and given back its size
    and modification time (a tool that preserves them, `touch -r`) is seen; the same bytes
    written again are not a change."""
    cube, site = _cube(tmp_path), _site(simple_site)
    build_cube([site], cube, progress=False)
    before = open_cube(cube.output, "simple")["agb"].values
    path = Path(simple_site["biomass"])
    st = path.stat()
    original = path.read_bytes()
    with rasterio.open(path, "r+") as dst:  # same size: only pixel values change
        dst.write(dst.read(1) * 0.5, 1)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build_cube([site], cube, progress=False)["simple"]["status"] == "built"
    after = open_cube(cube.output, "simple")["agb"].values
    assert np.nanmax(after) < np.nanmax(before)
    path.write_bytes(original)  # back as it was, through a new write
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build_cube([site], cube, progress=False)["simple"]["status"] == "built"
    replaced = path.with_name("copy.tif")
    replaced.write_bytes(original)  # the same bytes as another file (a restore from backup)
    os.utime(replaced, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replaced, path)
    assert build_cube([site], cube, progress=False)["simple"]["status"] == "up to date"
