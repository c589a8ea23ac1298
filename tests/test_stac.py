"""STAC sources: seasonal composites from local catalogues of synthetic scenes (no network)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from odc.geo.geobox import GeoBox
from rasterio.transform import from_origin

from agbcube.config import CubeConfig, SiteConfig, StacSource, parse_config
from agbcube.cube import build_cube, build_site_cube, open_cube
from agbcube.errors import CatalogueUnreachableError, ConfigError, GridError, StacError
from agbcube.stac.composites import (
    PROVIDERS,
    SENSORS,
    asset_table,
    provider_of,
    s2_offset,
    slope_deg,
)
from agbcube.stac.demo import Scene, write_catalogue
from tests.conftest import write_raster

CRS = "EPSG:32643"
GRID = from_origin(500_000, 2_400_000, 20, 20)
SHAPE = (40, 48)
S2_KEYS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
SEASONS = {"T1": ["2020-01-01", "2020-05-01"], "T2": ["2020-05-02", "2020-09-01"]}
SEASONS["T3"] = ["2020-09-02", "2020-12-31"]
# (baseline, offset-applied flag, DN offset the scene's values carry)
BASELINES = [("02.14", None, 0), ("04.00", None, 1000), ("05.09", None, 1000), ("04.00", True, 0)]


def _when(season: str, k: int) -> dt.datetime:
    start = dt.date.fromisoformat(SEASONS[season][0])
    if season == "T1" and k == 0:  # on the season's last day: the end is inclusive
        return dt.datetime(2020, 5, 1, 10, tzinfo=dt.UTC)
    return dt.datetime.combine(start, dt.time(10), tzinfo=dt.UTC) + dt.timedelta(days=9 * k + 3)


def _s2_scene(rng: np.random.Generator, season: str, k: int, *, cloudy: float = 0.3) -> Scene:
    baseline, applied, offset = BASELINES[k % len(BASELINES)]
    bands = {key: rng.integers(1, 9000, SHAPE).astype(np.uint16) + offset for key in S2_KEYS}
    for value in bands.values():
        value[rng.random(SHAPE) < 0.02] = 0  # scattered nodata DN
    clear = rng.choice([4, 5, 6, 7, 11], size=SHAPE)
    masked = rng.choice([0, 3, 8, 9, 10], size=SHAPE)  # nodata, shadow, clouds, cirrus
    scl = np.where(rng.random(SHAPE) < cloudy, masked, clear).astype(np.uint8)
    props = {"eo:cloud_cover": 20.0, "s2:processing_baseline": baseline}
    if applied is not None:
        props["earthsearch:boa_offset_applied"] = applied
    return Scene(
        "sentinel-2-l2a",
        f"S2_{season}_{k}",
        _when(season, k),
        CRS,
        GRID,
        {**bands, "SCL": scl},
        nodata={key: 0 for key in S2_KEYS},
        properties=props,
    )


def _expected_median(scenes: list[Scene], key: str) -> np.ndarray:
    """The per-pixel median over the clear pixels, computed directly from the scene arrays."""
    stack = []
    for scene in scenes:
        dn = scene.assets[key].astype(np.float64)
        baseline = float(scene.properties["s2:processing_baseline"])
        applied = scene.properties.get("earthsearch:boa_offset_applied", False)
        offset = 1000.0 if baseline >= 4 and not applied else 0.0
        bad = np.isin(scene.assets["SCL"], [0, 3, 8, 9, 10]) | (dn == 0)
        stack.append(np.where(bad, np.nan, dn - offset))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
        return np.nanmedian(np.stack(stack), axis=0)


def _site(tmp_path: Path, catalogue: Path, **satellite) -> SiteConfig:
    agb = tmp_path / "agb.tif"
    if not agb.exists():
        values = np.random.default_rng(1).uniform(20, 300, SHAPE).astype("float32")
        write_raster(agb, values, crs=CRS, transform=GRID)
    source = {"stac": str(catalogue), "seasons": SEASONS, **satellite}
    return SiteConfig(name="s", biomass=agb, satellite=source)


def _cube(tmp_path: Path, **kw) -> CubeConfig:
    return CubeConfig(output=tmp_path / "cube.zarr", chunks=16, indices="none", **kw)


@pytest.fixture
def s2_catalogue(tmp_path: Path) -> tuple[Path, dict[str, list[Scene]]]:
    """Four Sentinel-2 scenes per season with clouds, shadows, nodata and mixed baselines."""
    rng = np.random.default_rng(7)
    seasons = {s: [_s2_scene(rng, s, k) for k in range(4)] for s in SEASONS}
    out = tmp_path / "stac"
    scenes = [sc for scs in seasons.values() for sc in scs]
    return write_catalogue(out, scenes), seasons


# --------------------------------------------------------------------------------------------
# composites


def test_every_band_is_the_numpy_median_of_the_clear_pixels(tmp_path, s2_catalogue):
    catalogue, seasons = s2_catalogue
    ds = build_site_cube(_site(tmp_path, catalogue), _cube(tmp_path)).compute()
    bands = SENSORS["sentinel-2"].bands
    assert list(ds.band.values) == [f"{b}_{s}" for s in SEASONS for b in bands]
    for season, scenes in seasons.items():
        for band, key in zip(bands, S2_KEYS, strict=True):
            expected = _expected_median(scenes, key)
            got = ds.features.sel(band=f"{band}_{season}").values
            np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)
            assert np.isnan(got).sum() == np.isnan(expected).sum()
    # The fixture leaves some pixels with no clear scene: NaN there, never 0.
    assert np.isnan(ds.features.values).any() and not (ds.features.values == 0).any()


def test_scene_on_the_last_day_belongs_to_its_season(tmp_path, s2_catalogue):
    catalogue, _ = s2_catalogue
    ds = build_site_cube(_site(tmp_path, catalogue), _cube(tmp_path))
    items = json.loads(ds.attrs["provenance"])["satellite"]["items"]["sentinel-2"]
    assert items["T1"] == ["S2_T1_0", "S2_T1_1", "S2_T1_2", "S2_T1_3"]
    assert items["T2"] == ["S2_T2_0", "S2_T2_1", "S2_T2_2", "S2_T2_3"]


@pytest.mark.parametrize(
    ("props", "offset"),
    [
        ({"s2:processing_baseline": "02.14"}, 0),
        ({"s2:processing_baseline": "03.01"}, 0),
        ({"s2:processing_baseline": "04.00"}, 1000),
        ({"s2:processing_baseline": "05.11"}, 1000),
        ({"sentinel:processing_baseline": "04.00"}, 1000),
        ({"processing:version": "05.10"}, 1000),
        ({"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": True}, 0),
        ({"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": False}, 1000),
        ({}, 0),
        ({"s2:processing_baseline": "unknown"}, 0),
    ],
)
def test_s2_offset_follows_the_processing_baseline(props, offset):
    class Item:
        properties = props

    assert s2_offset(Item()) == offset


def test_cloud_cover_filter_drops_cloudy_scenes(tmp_path):
    rng = np.random.default_rng(3)
    scenes = [_s2_scene(rng, "T1", k) for k in range(3)]
    cloudy = _s2_scene(rng, "T1", 3)
    cloudy.properties["eo:cloud_cover"] = 80.0
    catalogue = write_catalogue(tmp_path / "stac", [*scenes, cloudy])
    site = _site(tmp_path, catalogue, seasons={"T1": SEASONS["T1"]}, max_cloud_cover=30)
    ds = build_site_cube(site, _cube(tmp_path)).compute()
    used = json.loads(ds.attrs["provenance"])["satellite"]["items"]["sentinel-2"]["T1"]
    assert "S2_T1_3" not in used and len(used) == 3
    expected = _expected_median(scenes, "B04")
    np.testing.assert_allclose(ds.features.sel(band="B4_T1"), expected, rtol=1e-6, equal_nan=True)


def _landsat(rng, k: int, qa: np.ndarray, platform: str = "landsat-8") -> Scene:
    keys = ("blue", "green", "red", "nir08", "swir16", "swir22")
    bands = {key: rng.integers(7000, 20000, SHAPE).astype(np.uint16) for key in keys}
    return Scene(
        "landsat-c2-l2",
        f"LC_{k}",
        dt.datetime(2020, 2, 1 + 3 * k, tzinfo=dt.UTC),
        CRS,
        GRID,
        {**bands, "qa_pixel": qa},
        nodata={**{key: 0 for key in keys}, "qa_pixel": 1},
        properties={"eo:cloud_cover": 10.0, "platform": platform},
    )


def test_landsat_qa_bits_mask_fill_cloud_and_shadow_and_keep_dn(tmp_path):
    rng = np.random.default_rng(5)
    clear = 21824  # bit 6 (clear) + confidence bits: kept
    flagged = [clear | (1 << b) for b in (0, 1, 2, 3, 4)]  # fill, dilated, cirrus, cloud, shadow
    kept = [clear, clear | (1 << 5), clear | (1 << 7), 1 << 6]  # snow and water stay
    scenes = [
        _landsat(rng, k, rng.choice(flagged + kept, size=SHAPE).astype(np.uint16)) for k in range(3)
    ]
    landsat9 = _landsat(rng, 9, np.full(SHAPE, clear, np.uint16), platform="landsat-9")
    catalogue = write_catalogue(tmp_path / "stac", [*scenes, landsat9])
    site = _site(tmp_path, catalogue, seasons={"T1": SEASONS["T1"]}, provider="planetary-computer")
    ds = build_site_cube(site, _cube(tmp_path)).compute()
    used = json.loads(ds.attrs["provenance"])["satellite"]["items"]["landsat-8"]["T1"]
    assert used == ["LC_0", "LC_1", "LC_2"]  # landsat-9 is not landsat-8
    stack = np.stack(
        [
            np.where((s.assets["qa_pixel"] & 0b11111) != 0, np.nan, s.assets["red"].astype(float))
            for s in scenes
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmedian(stack, axis=0)
    got = ds.features.sel(band="SR_B4_T1").values
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)
    assert np.nanmin(got) >= 7000  # DN, not reflectance


def test_sentinel1_orbit_filter_and_db(tmp_path):
    rng = np.random.default_rng(2)
    scenes = []
    for k, orbit in enumerate(["descending", "descending", "descending", "ascending"]):
        lin = {p: rng.uniform(0.001, 0.3, SHAPE).astype(np.float32) for p in ("vv", "vh")}
        scenes.append(
            Scene(
                "sentinel-1-rtc",
                f"S1_{k}",
                dt.datetime(2020, 3, 1 + k, tzinfo=dt.UTC),
                CRS,
                GRID,
                lin,
                nodata={"vv": -32768.0, "vh": -32768.0},
                properties={"sat:orbit_state": orbit, "sar:polarizations": ["VV", "VH"]},
            )
        )
    catalogue = write_catalogue(tmp_path / "stac", scenes)
    kw = {"seasons": {"T1": SEASONS["T1"]}, "provider": "planetary-computer"}
    linear = build_site_cube(_site(tmp_path, catalogue, **kw), _cube(tmp_path)).compute()
    db = build_site_cube(
        _site(tmp_path, catalogue, sentinel1_db=True, **kw), _cube(tmp_path)
    ).compute()
    desc = np.stack([s.assets["vv"] for s in scenes[:3]]).astype(np.float64)
    np.testing.assert_allclose(linear.features.sel(band="VV_T1"), np.median(desc, 0), rtol=1e-6)
    expected_db = np.median(10 * np.log10(desc), 0)
    np.testing.assert_allclose(db.features.sel(band="VV_T1"), expected_db, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# static layers: DEM and slope, canopy height, PALSAR-2 years


def test_slope_of_a_plane_is_exact_everywhere():
    gbox = GeoBox((30, 40), GRID, CRS)
    rows, cols = np.mgrid[:30, :40]
    z = 100 + 0.10 * cols * 20 - 0.05 * rows * 20  # 10 % east, 5 % north-south
    dem = xr.DataArray(z.astype(np.float32), dims=("y", "x")).chunk(16)
    slope = slope_deg(dem, gbox).values
    np.testing.assert_allclose(slope, np.degrees(np.arctan(np.hypot(0.10, 0.05))), rtol=1e-5)


def test_slope_on_a_geographic_grid_uses_metres():
    lat0, res = 22.0, 0.0003
    gbox = GeoBox((20, 20), from_origin(80.0, lat0, res, res), "EPSG:4326")
    metres_per_deg_lon = 111_320 * np.cos(np.radians(lat0 - 10 * res))
    cols = np.mgrid[:20, :20][1]
    z = 0.2 * cols * res * metres_per_deg_lon  # 20 % east
    dem = xr.DataArray(z.astype(np.float32), dims=("y", "x")).chunk(8)
    np.testing.assert_allclose(slope_deg(dem, gbox).values, np.degrees(np.arctan(0.2)), rtol=5e-3)


def test_static_layers_and_palsar_year(tmp_path):
    rng = np.random.default_rng(4)
    dem = (300 + rng.uniform(0, 50, SHAPE)).astype(np.float32)
    ch = rng.integers(0, 40, SHAPE).astype(np.uint8)
    ch[:4] = 255
    t = dt.datetime(2015, 1, 1, tzinfo=dt.UTC)
    scenes = [
        Scene("cop-dem-glo-30", "dem", t, CRS, GRID, {"DEM": dem}),
        Scene("canopy-height", "ch", t, CRS, GRID, {"CH": ch}, nodata={"CH": 255}),
    ]
    for year in (2019, 2020, 2021):
        hh = np.full(SHAPE, year - 2000, np.uint16)
        scenes.append(
            Scene(
                "alos-palsar-mosaic",
                f"pal{year}",
                dt.datetime(year, 1, 1, tzinfo=dt.UTC),
                CRS,
                GRID,
                {"HH": hh, "HV": hh + 100},
                nodata={"HH": 0, "HV": 0},
                end=dt.datetime(year, 12, 31, 23, 59, tzinfo=dt.UTC),
            )
        )
    catalogue = write_catalogue(tmp_path / "stac", scenes)
    ds = build_site_cube(_site(tmp_path, catalogue), _cube(tmp_path)).compute()
    assert list(ds.band.values) == ["PAL_HH", "PAL_HV", "dem", "slope", "CH"]
    np.testing.assert_array_equal(ds.features.sel(band="PAL_HH"), 20)  # 2020 overlaps most
    np.testing.assert_allclose(ds.features.sel(band="dem"), dem)
    ch_out = ds.features.sel(band="CH").values
    assert np.isnan(ch_out[:4]).all()
    np.testing.assert_array_equal(ch_out[4:], ch[4:])
    assert np.isfinite(ds.features.sel(band="slope")).all()


# --------------------------------------------------------------------------------------------
# NaN and warnings, errors, provenance


def test_a_season_with_no_clear_observation_is_nan_with_a_warning(tmp_path):
    rng = np.random.default_rng(9)
    scenes = [_s2_scene(rng, "T1", k) for k in range(2)]
    scenes += [_s2_scene(rng, "T2", k, cloudy=1.0) for k in range(2)]  # every pixel masked
    catalogue = write_catalogue(tmp_path / "stac", scenes)
    site = _site(tmp_path, catalogue)  # T3 has no scene at all
    with pytest.warns(UserWarning) as record:
        build_cube([site], _cube(tmp_path), progress=False)
    messages = [str(w.message) for w in record]
    assert any(
        "site 's'" in m and "sentinel-2 season T2" in m and "no clear observation" in m
        for m in messages
    ), messages
    assert any(
        "site 's'" in m and "sentinel-2 season T3" in m and "no scene" in m for m in messages
    )
    ds = open_cube(tmp_path / "cube.zarr", "s")
    for season in ("T2", "T3"):
        values = ds.features.sel(band=[f"{b}_{season}" for b in SENSORS["sentinel-2"].bands])
        assert values.isnull().all()
    assert ds.features.sel(band="B4_T1").notnull().any()
    stats = json.loads(ds.attrs["stats"])
    assert stats["clear_fraction"]["sentinel-2 season T2"] == 0.0
    assert stats["clear_fraction"]["sentinel-2 season T1"] > 0.5


def test_unreachable_catalogue_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "catalog.json"
    with pytest.raises(CatalogueUnreachableError, match=r"site 's'.*nowhere/catalog.json"):
        build_site_cube(_site(tmp_path, missing), _cube(tmp_path))
    url = "http://127.0.0.1:9/stac/v1"  # nothing listens on the discard port
    with pytest.raises(CatalogueUnreachableError, match="127.0.0.1:9"):
        build_site_cube(_site(tmp_path, url), _cube(tmp_path))
    static = "http://127.0.0.1:9/stac/catalog.json"  # a static catalogue over HTTP
    with pytest.raises(CatalogueUnreachableError, match="127.0.0.1:9/stac/catalog.json"):
        build_site_cube(_site(tmp_path, static), _cube(tmp_path))


@pytest.mark.parametrize(
    "text", ["{not json", '{"hello": 1}', '{"type": "Catalog"}', "[1, 2]", '{"type": "Feature"}']
)
def test_a_catalogue_that_is_not_stac_is_one_error_naming_it(tmp_path, text):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(StacError, match=r"site 's': \S*bad.json is not a STAC catalogue") as err:
        build_site_cube(_site(tmp_path, tmp_path / "bad.json"), _cube(tmp_path))
    assert "\n" not in str(err.value)


def test_sensor_without_items_is_an_error_before_any_pixel_is_read(tmp_path, s2_catalogue):
    catalogue, _ = s2_catalogue
    with pytest.raises(StacError, match=r"site 's'.*landsat-c2-l2.*for landsat-8"):
        build_site_cube(_site(tmp_path, catalogue, sensors=["landsat-8"]), _cube(tmp_path))
    far = _site(tmp_path, catalogue, seasons={"T1": ["2023-01-01", "2023-02-01"]})
    with pytest.raises(StacError, match=r"no sentinel-2 item .*2023-01-01 and 2023-02-01"):
        build_site_cube(far, _cube(tmp_path))
    # a collection named in the config but not in the catalogue (a typo) is never dropped
    typo = _site(tmp_path, catalogue, collections={"sentinel-2": "sentinel-2-l2x"})
    with pytest.raises(StacError, match=r"no collection 'sentinel-2-l2x' for sentinel-2 "
                       r"\(did you mean 'sentinel-2-l2a'\?\)"):  # fmt: skip
        build_site_cube(typo, _cube(tmp_path))
    with pytest.raises(StacError, match="no canopy-height collection"):
        site = _site(tmp_path, catalogue, sensors=["canopy-height"], provider="earth-search")
        build_site_cube(site, _cube(tmp_path))
    with pytest.raises(StacError, match=r"item 'S2_T1_0' has no asset \['blue'"):
        build_site_cube(_site(tmp_path, catalogue, provider="earth-search"), _cube(tmp_path))
    with pytest.raises(GridError, match="STAC source"):
        build_site_cube(_site(tmp_path, catalogue), _cube(tmp_path, grid="satellite"))


def test_rebuild_with_the_same_answer_skips_and_a_new_item_rebuilds(tmp_path, s2_catalogue):
    catalogue, seasons = s2_catalogue
    site, cube = _site(tmp_path, catalogue), _cube(tmp_path)
    assert build_cube([site], cube, progress=False)["s"]["status"] == "built"
    assert build_cube([site], cube, progress=False)["s"]["status"] == "up to date"
    prov = json.loads(open_cube(cube.output, "s").attrs["provenance"])["satellite"]
    assert prov["items"]["sentinel-2"]["T3"] == [s.id for s in seasons["T3"]]
    # A COG behind the catalogue rewritten in place, its size and time given back
    cog = Path(json.loads(open_cube(cube.output, "s").attrs["input_files"])[1])
    st = cog.stat()
    with rasterio.open(cog, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:  # same size
        dst.write(dst.read() + 1)
    assert cog.stat().st_size == st.st_size
    os.utime(cog, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build_cube([site], cube, progress=False)["s"]["status"] == "built"
    # The catalogue answers differently: one more scene in T3.
    extra = _s2_scene(np.random.default_rng(11), "T3", 4)
    shutil.rmtree(catalogue.parent)
    write_catalogue(catalogue.parent, [*(s for v in seasons.values() for s in v), extra])
    assert build_cube([site], cube, progress=False)["s"]["status"] == "built"
    prov = json.loads(open_cube(cube.output, "s").attrs["provenance"])["satellite"]
    assert prov["items"]["sentinel-2"]["T3"][-1] == "S2_T3_4"


# --------------------------------------------------------------------------------------------
# the asset-name table and the config


def test_every_provider_names_every_band_of_every_sensor():
    for name, provider in PROVIDERS.items():
        assert set(provider.collections) == set(SENSORS) == set(provider.assets), name
        for sensor, spec in SENSORS.items():
            needed = {*spec.bands, *([spec.mask] if spec.mask else [])}
            assert needed <= set(provider.assets[sensor]), (name, sensor)


@pytest.mark.parametrize(
    ("provider", "sensor", "band", "asset"),
    [
        ("raw", "sentinel-2", "B2", "B02"),
        ("raw", "sentinel-2", "B8A", "B8A"),
        ("raw", "sentinel-2", "SCL", "SCL"),
        ("planetary-computer", "sentinel-2", "B8", "B08"),
        ("planetary-computer", "sentinel-2", "SCL", "SCL"),
        ("earth-search", "sentinel-2", "B2", "blue"),
        ("earth-search", "sentinel-2", "B8", "nir"),
        ("earth-search", "sentinel-2", "B8A", "nir08"),
        ("earth-search", "sentinel-2", "B11", "swir16"),
        ("earth-search", "sentinel-2", "SCL", "scl"),
        ("planetary-computer", "landsat-8", "SR_B5", "nir08"),
        ("planetary-computer", "landsat-8", "QA_PIXEL", "qa_pixel"),
        ("raw", "landsat-8", "QA_PIXEL", "QA_PIXEL"),
        ("planetary-computer", "sentinel-1", "VH", "vh"),
        ("planetary-computer", "palsar-2", "PAL_HV", "HV"),
        ("planetary-computer", "dem", "dem", "data"),
    ],
)
def test_asset_names(provider, sensor, band, asset):
    source = StacSource(
        stac="x.json", seasons={"T1": ("2020-01-01", "2020-02-01")}, provider=provider
    )
    assert asset_table(source)[sensor][1][band] == asset


def test_provider_is_recognised_from_the_url_and_overrides_apply():
    def source(**kw):
        return StacSource(seasons={"T1": ("2020-01-01", "2020-02-01")}, **kw)

    pc = source(stac="https://planetarycomputer.microsoft.com/api/stac/v1")
    es = source(stac="https://earth-search.aws.element84.com/v1")
    assert provider_of(pc) == "planetary-computer" and provider_of(es) == "earth-search"
    assert provider_of(source(stac="/data/catalog.json")) == "raw"
    custom = source(
        stac="https://planetarycomputer.microsoft.com/api/stac/v1",
        collections={"canopy-height": "my-chm"},
        assets={"canopy-height": {"CH": "height"}, "sentinel-2": {"B2": "blue"}},
    )
    table = asset_table(custom)
    assert table["canopy-height"] == ("my-chm", {"CH": "height"})
    assert table["sentinel-2"][1]["B2"] == "blue" and table["sentinel-2"][1]["B3"] == "B03"
    assert table["sentinel-1"][0] == "sentinel-1-rtc"


def test_config_stac_source_paths_and_errors(tmp_path):
    base = {"name": "b", "biomass": "b.tif"}
    rel = {"stac": "cat/catalog.json", "seasons": {"T1": ["2020-01-01", "2020-05-01"]}}
    cfg = parse_config({"sites": [{**base, "satellite": rel}]}, base_dir=tmp_path)
    assert cfg.sites[0].satellite.stac == str(tmp_path / "cat" / "catalog.json")
    url = {**rel, "stac": "https://earth-search.aws.element84.com/v1"}
    cfg = parse_config({"sites": [{**base, "satellite": url}]}, base_dir=tmp_path)
    assert cfg.sites[0].satellite.stac == url["stac"]
    cfg = parse_config({"sites": [{**base, "satellite": "s.tif"}]}, base_dir=tmp_path)
    assert cfg.sites[0].satellite == tmp_path / "s.tif"  # a plain path is still a file
    with pytest.raises(ConfigError, match=r"satellite.max_clod_cover.*Did you mean 'max_cloud"):
        parse_config({"sites": [{**base, "satellite": {**rel, "max_clod_cover": 3}}]})
    with pytest.raises(ConfigError, match=r"season 'T1' ends \(2020-01-01\) before"):
        parse_config(
            {
                "sites": [
                    {**base, "satellite": {**rel, "seasons": {"T1": ["2020-02-01", "2020-01-01"]}}}
                ]
            }
        )
    with pytest.raises(ConfigError, match="season name 'T_1'"):
        parse_config(
            {
                "sites": [
                    {**base, "satellite": {**rel, "seasons": {"T_1": ["2020-01-01", "2020-02-01"]}}}
                ]
            }
        )
    with pytest.raises(ConfigError, match=r"names its bands .* remove \['bands'\]"):
        parse_config({"sites": [{**base, "bands": "multisensor-59", "satellite": rel}]})
    with pytest.raises(ConfigError, match="sign must be"):
        parse_config({"sites": [{**base, "satellite": {**rel, "sign": "planetary"}}]})


def test_signing_hook_must_be_importable(tmp_path, s2_catalogue):
    catalogue, _ = s2_catalogue
    site = _site(tmp_path, catalogue, sign="no_such_module_xyz:sign")
    with pytest.raises(StacError, match="no_such_module_xyz"):
        build_site_cube(site, _cube(tmp_path))
    site = _site(tmp_path, catalogue, sign="tests.test_stac:_identity_signer")
    assert build_site_cube(site, _cube(tmp_path)).sizes["band"] == 30


def _identity_signer(href: str) -> str:
    return href


def test_coarser_target_grid_averages_the_scene_pixels(tmp_path):
    """20 m scenes onto a 40 m AGB grid: each cube pixel is the mean of its four scene pixels."""
    rng = np.random.default_rng(12)
    scene = _s2_scene(rng, "T1", 0, cloudy=0.0)
    for value in scene.assets.values():
        value[value == 0] = 1  # no nodata: a plain block mean
    scene.assets["SCL"][:] = 4
    catalogue = write_catalogue(tmp_path / "stac", [scene])
    agb = np.random.default_rng(1).uniform(20, 300, (20, 24)).astype("float32")
    write_raster(
        tmp_path / "agb.tif", agb, crs=CRS, transform=from_origin(500_000, 2_400_000, 40, 40)
    )
    site = _site(tmp_path, catalogue, seasons={"T1": SEASONS["T1"]})
    ds = build_site_cube(site, _cube(tmp_path)).compute()
    dn = scene.assets["B04"].astype(np.float64)
    block_mean = dn.reshape(20, 2, 24, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(ds.features.sel(band="B4_T1"), block_mean, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# the whole pipeline on STAC-built sites


def test_stac_demo_catalogue_holds_what_the_config_asks(tmp_path):
    import pystac
    import yaml

    from agbcube.config import load_config
    from agbcube.stac.demo import write_stac_demo

    path = write_stac_demo(tmp_path, size_px=32)
    cfg = load_config(path)
    assert all(s.satellite.stac == str(tmp_path / "catalogue" / "catalog.json") for s in cfg.sites)
    raw = yaml.safe_load(path.read_text())
    assert raw["sites"][0]["satellite"]["stac"] == "catalogue/catalog.json"  # relative
    catalog = pystac.Catalog.from_file(str(tmp_path / "catalogue" / "catalog.json"))
    ids = {c.id for c in catalog.get_children()}
    assert ids == {v for v in PROVIDERS["raw"].collections.values() if v}
    s2 = [i for i in catalog.get_items(recursive=True) if i.collection_id == "sentinel-2-l2a"]
    assert len(s2) == 3 * 3 * 3
    assert {i.properties["s2:processing_baseline"] for i in s2} == {"02.14", "04.00"}


@pytest.mark.slow
def test_build_folds_train_predict_on_stac_built_sites(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from agbcube.cli import app
    from agbcube.stac.demo import write_stac_demo

    path = write_stac_demo(tmp_path, size_px=64)
    cfg = yaml.safe_load(path.read_text())  # the demo's, with a tiny, quick model
    cfg["train"].update(conv_channels=[8, 8], fc_units=[8], baseline="none", refit=False)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = CliRunner()
    for args in (
        ["build-cube", str(path), "-q"],
        ["folds", str(path), "--no-maps", "-q"],
        ["train", str(path), "--epochs", "2", "--device", "cpu", "-q"],
    ):
        result = run.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    ds = open_cube(tmp_path / "cubes" / "demo.zarr", "alpha")
    from agbcube.bands import BAND_PRESETS

    assert list(ds.band.values[:59]) == list(BAND_PRESETS["multisensor-59"])
    assert "S2_NDVI_T1" in ds.band.values and "S1_RVI_T3" in ds.band.values
    metrics = json.loads((tmp_path / "runs" / "demo" / "metrics.json").read_text())
    assert metrics
    result = run.invoke(app, ["predict", str(tmp_path / "runs" / "demo"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    maps = list((tmp_path / "runs" / "demo" / "maps").rglob("*.tif"))
    assert {p.parent.name for p in maps} >= {"alpha", "beta", "gamma"}


def test_missing_asset_file_is_an_error_before_reading(tmp_path, s2_catalogue):
    catalogue, _ = s2_catalogue
    (catalogue.parent / "sentinel-2-l2a" / "S2_T2_1" / "B04.tif").unlink()
    with pytest.raises(StacError, match=r"item 'S2_T2_1' asset 'B04' points to .*B04.tif"):
        build_site_cube(_site(tmp_path, catalogue), _cube(tmp_path))


def test_catalogue_written_under_a_relative_path_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scene = _s2_scene(np.random.default_rng(0), "T1", 0)
    catalogue = write_catalogue("rel/stac", [scene])
    site = _site(tmp_path, catalogue, seasons={"T1": SEASONS["T1"]})
    assert build_site_cube(site, _cube(tmp_path)).features.notnull().any().compute()


def test_a_static_catalogue_that_cycles_or_is_too_big_is_one_error(
    tmp_path, s2_catalogue, monkeypatch
):
    """Walking a static catalogue is bounded: a child link back to itself is named, not a
    RecursionError, and a catalogue larger than a walk can hold is refused with what to do."""
    import agbcube.stac.composites as composites

    cyclic = tmp_path / "cyclic" / "catalog.json"
    cyclic.parent.mkdir()
    links = [{"rel": "root", "href": "./catalog.json"}, {"rel": "child", "href": "./catalog.json"}]
    cyclic.write_text(
        json.dumps(
            {"type": "Catalog", "id": "c", "stac_version": "1.0.0", "description": "loop"}
            | {"links": links}
        )
    )
    with pytest.raises(StacError, match=r"catalog.json .*its child links form a cycle"):
        build_site_cube(_site(tmp_path, cyclic), _cube(tmp_path))
    catalogue, _ = s2_catalogue
    monkeypatch.setattr(composites, "STATIC_MAX_ITEMS", 3)
    with pytest.raises(StacError, match=r"more than 3 items.*through a STAC API"):
        build_site_cube(_site(tmp_path, catalogue), _cube(tmp_path))


@pytest.fixture
def served(tmp_path):
    """A plain web server (no ETag, as Python's) over ``tmp_path``: ``served(path)`` is the
    URL of a file below it."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield lambda path: f"http://127.0.0.1:{server.server_port}/{path.relative_to(tmp_path)}"
    server.shutdown()


def test_a_cog_changed_in_place_behind_a_served_catalogue_is_rebuilt(
    tmp_path, s2_catalogue, served
):
    """Over HTTP, up to date is decided by content too: a COG rewritten with its old size
    and time (the server's Last-Modified) on a server that gives no ETag is digested."""
    catalogue, _ = s2_catalogue
    site, cube = _site(tmp_path, served(catalogue)), _cube(tmp_path)
    assert build_cube([site], cube, progress=False)["s"]["status"] == "built"
    assert build_cube([site], cube, progress=False)["s"]["status"] == "up to date"
    urls = json.loads(open_cube(cube.output, "s").attrs["input_files"])
    served_cogs = [u for u in urls if u.startswith("http://127.0.0.1") and u.endswith(".tif")]
    cog = tmp_path / served_cogs[0].split("/", 3)[3]
    st = cog.stat()
    with rasterio.open(cog, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:  # same size
        dst.write(dst.read() + 1)
    os.utime(cog, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build_cube([site], cube, progress=False)["s"]["status"] == "built"
    assert build_cube([site], cube, progress=False)["s"]["status"] == "up to date"
