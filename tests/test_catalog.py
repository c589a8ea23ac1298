"""STAC Items and Collections of maps and cubes: valid, and enough to open the data alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr

from agbcube.predict import aoa_reference, predict_site, write_maps
from agbcube.stac.items import (
    COG_MEDIA_TYPE,
    ZARR_MEDIA_TYPE,
    cube_items_dir,
    update_map_collection,
)
from tests.test_predict import Dense, _identity, _site

SCHEMAS = Path(__file__).parent / "data" / "stac_schemas"
LAYERS = ("agb_mean", "agb_std", "di", "aoa")


@pytest.fixture
def validator(monkeypatch):
    """pystac's JSON-schema validator, offline: extension schemas from tests/data."""
    import pystac
    import pystac.stac_io
    from pystac.validation import JsonSchemaSTACValidator, RegisteredValidator, set_validator

    def no_network(self, href):
        if str(href).startswith("http"):
            raise OSError(f"tests read no schema from the network: {href}")
        return original(self, href)

    original = pystac.stac_io.DefaultStacIO.read_text_from_href
    monkeypatch.setattr(pystac.stac_io.DefaultStacIO, "read_text_from_href", no_network)
    v = JsonSchemaSTACValidator()
    for path in SCHEMAS.glob("*.json"):
        doc = json.loads(path.read_text())
        v.schema_cache[doc["$id"].rstrip("#")] = doc
    previous = RegisteredValidator.get_validator()
    set_validator(v)
    yield v
    set_validator(previous)


def _maps(tmp_path, site="syn", ny=70, nx=90):
    ds = _site(ny, nx)
    ds.attrs["site"] = site
    ref = aoa_reference(
        np.moveaxis(ds.features.values[:, :20], 0, -1).reshape(-1, 3),
        np.arange(20 * nx) % 2,
        max_points=300,
    )
    members = [(Dense(3, 1), _identity(3)), (Dense(3, 1, 1), _identity(3))]
    maps = predict_site(ds, members, window_px=16, log_target=False, aoa=ref)
    maps.attrs["run"] = "cv-test"
    out = tmp_path / "maps" / site
    write_maps(maps, out, progress=False)
    return ds, out


def test_map_item_is_valid_and_describes_every_cog(tmp_path, validator):
    import pystac

    ds, out = _maps(tmp_path)
    item = pystac.Item.from_file(str(out / "item.json"))
    schemas = item.validate()
    assert any("projection/v2.0.0" in s for s in schemas)
    assert any("raster/v1.1.0" in s for s in schemas)
    assert item.id == "syn" and "cv-test" in item.properties["title"]
    assert item.properties["proj:code"] == "EPSG:32643"
    assert item.properties["proj:shape"] == [70, 90]
    assert item.properties["proj:transform"] == list(ds.rio.transform())[:6]
    assert item.bbox[0] < item.bbox[2] and item.bbox[1] < item.bbox[3]
    for name in LAYERS:
        asset = item.assets[name]
        assert asset.media_type == COG_MEDIA_TYPE and asset.roles == ["data"]
        (band,) = asset.extra_fields["raster:bands"]
        with rasterio.open(out / f"{name}.tif") as src:
            assert band["data_type"] == src.dtypes[0]
            nodata = src.nodata
            values = src.read(1)
        assert band["nodata"] == ("nan" if np.isnan(nodata) else nodata)
        assert band["spatial_resolution"] == 40.0
        finite = values[np.isfinite(values) & (values != (255 if name == "aoa" else np.nan))]
        np.testing.assert_allclose(
            [band["statistics"]["minimum"], band["statistics"]["maximum"]],
            [finite.min(), finite.max()],
            rtol=1e-6,
        )
        assert Path(asset.get_absolute_href()).resolve() == (out / f"{name}.tif").resolve()
    units = {n: item.assets[n].extra_fields["raster:bands"][0].get("unit") for n in LAYERS}
    assert units == {"agb_mean": "Mg ha-1", "agb_std": "Mg ha-1", "di": "1", "aoa": None}
    assert item.assets["agb_mean_preview"].roles == ["thumbnail"]


def test_maps_open_through_odc_stac_from_the_item_alone(tmp_path):
    import odc.stac
    import pystac

    ds, out = _maps(tmp_path)
    item = pystac.Item.from_file(str(out / "item.json"))
    loaded = odc.stac.load([item], bands=list(LAYERS)).isel(time=0)
    assert loaded.odc.geobox.crs.epsg == 32643
    np.testing.assert_allclose(loaded.x.values, ds.x.values)
    np.testing.assert_allclose(loaded.y.values, ds.y.values)
    stored = xr.open_zarr(out / "maps.zarr")
    for name in LAYERS:
        with rasterio.open(out / f"{name}.tif") as src:
            np.testing.assert_array_equal(loaded[name].values, src.read(1), err_msg=name)
        expect = stored[name].values
        if name == "aoa":
            expect = np.where(np.isfinite(expect), expect, 255)
        np.testing.assert_array_equal(loaded[name].values, expect, err_msg=name)
    assert np.isnan(loaded["agb_mean"].values).any() or np.isfinite(loaded["agb_mean"]).all()


def test_run_collection_grows_site_by_site_and_links_the_metrics(tmp_path, validator):
    import pystac

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    (run / "config.yaml").write_text("cube: {}\n")
    _, first = _maps(run, site="alpha", ny=40, nx=50)
    path = update_map_collection(
        run / "maps" / "collection.json", [first / "item.json"], run_dir=run
    )
    _, second = _maps(run, site="beta", ny=50, nx=40)
    update_map_collection(path, [second / "item.json"], run_dir=run)

    collection = pystac.Collection.from_file(str(path))
    collection.validate()
    assert collection.id == "agbcube-run-maps"
    items = list(collection.get_items())
    assert sorted(i.id for i in items) == ["alpha", "beta"]
    for item in items:
        item.validate()
        assert item.collection_id == collection.id
        assert item.get_single_link("parent").get_absolute_href() == str(path)
    metrics = collection.assets["metrics"]
    assert metrics.roles == ["metadata"]
    assert Path(metrics.get_absolute_href()).resolve() == (run / "metrics.json").resolve()
    boxes = collection.extent.spatial.bboxes
    assert len(boxes) == 3  # the union, then one per item
    assert boxes[0][0] == min(b[0] for b in boxes[1:])
    # the Collection is relocatable: every href is relative
    doc = json.loads(path.read_text())
    assert all(not link["href"].startswith("/") for link in doc["links"])
    assert all(not a["href"].startswith("/") for a in doc["assets"].values())


def test_cube_item_follows_the_datacube_extension_and_opens_the_group(demo_config, validator):
    import pystac

    from agbcube.cube import open_cube

    store = Path(demo_config.cube.output)
    for site in ("alpha", "beta"):
        item = pystac.Item.from_file(str(cube_items_dir(store) / f"{site}.json"))
        schemas = item.validate()
        assert any("datacube/v2.2.0" in s for s in schemas)
        assert any("xarray-assets" in s for s in schemas)
        asset = item.assets["zarr"]
        assert asset.media_type == ZARR_MEDIA_TYPE
        ds = open_cube(store, site)
        dims = asset.extra_fields["cube:dimensions"]
        assert dims["band"]["values"] == [str(b) for b in ds.band.values]
        assert dims["x"]["extent"] == pytest.approx([float(ds.x.min()), float(ds.x.max())])
        assert dims["y"]["step"] == float(ds.rio.transform().e)
        # gsd is in metres (STAC), not in the CRS's degrees: a degree of latitude is ~110.6 km,
        # of longitude ~111.3 km times the cosine of the latitude
        assert ds.rio.crs.is_geographic
        dx, dy = abs(ds.rio.transform().a), abs(ds.rio.transform().e)
        lat = np.radians(float(ds.y.mean()))
        expect = np.sqrt(dx * 111_320 * np.cos(lat) * dy * 110_600)
        assert item.properties["gsd"] == pytest.approx(expect, rel=0.01)
        assert asset.extra_fields["cube:variables"]["agb"]["unit"] == "Mg ha-1"
        opened = xr.open_dataset(
            asset.get_absolute_href(), **asset.extra_fields["xarray:open_kwargs"]
        )
        np.testing.assert_array_equal(opened["agb"].values, ds["agb"].values)
        np.testing.assert_array_equal(opened["features"].values, ds["features"].values)
        np.testing.assert_array_equal(opened["x"].values, ds["x"].values)


def test_commands_adding_sites_at_once_both_land_in_the_collection(tmp_path, monkeypatch):
    """Two `predict` commands updating one collection.json together: each reads, changes and
    writes it under the lock, so neither site is lost (both read the old list before)."""
    import contextlib
    import threading

    from agbcube.stac import items as catalog

    run = tmp_path / "run"
    sites = {site: _maps(run, site=site, ny=30, nx=30)[1] for site in ("alpha", "beta")}
    path = run / "maps" / "collection.json"
    listed, read_both = catalog._listed_items, threading.Barrier(2, timeout=2)

    def slow_listed(p):
        items = listed(p)
        # without the lock both threads read here before either writes; with it, the second
        # waits for the lock and the first goes on when the barrier times out
        with contextlib.suppress(threading.BrokenBarrierError):
            read_both.wait()
        return items

    monkeypatch.setattr(catalog, "_listed_items", slow_listed)
    threads = [
        threading.Thread(target=update_map_collection, args=(path, [folder / "item.json"]))
        for folder in sites.values()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    links = [link["href"] for link in json.loads(path.read_text())["links"]]
    assert sorted(links) == ["./alpha/item.json", "./beta/item.json"]
