"""Synthetic STAC catalogues: the ``agbcube demo --stac`` sites, and a writer tests share.

`write_catalogue` writes scenes (arrays on a grid) as Cloud-Optimised GeoTIFFs and a
self-contained static STAC catalogue of items with projection and raster metadata, one collection
per sensor, named as the ``raw`` provider table names them (agbcube/stac/composites.py).
`write_stac_demo` writes the demo's three AGB maps and, over each, seasonal Sentinel-2,
Landsat-8 and Sentinel-1 scenes with clouds and shadows, a DEM, a canopy-height map and a PALSAR-2
yearly mosaic, sampled from the same synthetic landscapes as ``agbcube demo``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.transform import Affine, from_origin

from agbcube.demo import SITES, Field, Landscape, config_yaml, demo_config, holes, site_grid

__all__ = ["Scene", "synthetic_scenes", "write_catalogue", "write_stac_demo"]


@dataclass(frozen=True)
class Scene:
    """One STAC item: single-band assets on one grid.

    ``start``/``end`` make a period item (a yearly mosaic); otherwise ``datetime`` is its time.
    """

    collection: str
    id: str
    datetime: dt.datetime
    crs: str
    transform: Affine
    assets: dict[str, np.ndarray]
    nodata: dict[str, float] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    end: dt.datetime | None = None


def write_catalogue(directory: str | Path, scenes: Iterable[Scene]) -> Path:
    """Write ``scenes`` as COGs and a self-contained static STAC catalogue.

    Parameters
    ----------
    directory : str or Path
        Folder of the catalogue (created); COGs go to ``<collection>/<item>/<asset>.tif``.
    scenes : iterable of Scene

    Returns
    -------
    Path
        The catalogue's ``catalog.json``.
    """
    import pystac

    directory = Path(directory).resolve()  # pystac makes hrefs relative to an absolute root
    catalog = pystac.Catalog("agbcube-synthetic", "Synthetic scenes written by agbcube")
    collections: dict[str, Any] = {}
    for scene in scenes:
        if scene.collection not in collections:
            collections[scene.collection] = pystac.Collection(
                scene.collection,
                f"synthetic {scene.collection}",
                pystac.Extent(
                    pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
                    pystac.TemporalExtent([[None, None]]),
                ),
            )
            catalog.add_child(collections[scene.collection])
        collections[scene.collection].add_item(_item(directory, scene))
    catalog.normalize_hrefs(str(directory))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return directory / "catalog.json"


def _item(directory: Path, scene: Scene) -> Any:
    import pystac
    from shapely.geometry import box, mapping

    shape = next(iter(scene.assets.values())).shape
    west, north = scene.transform.c, scene.transform.f
    east = west + scene.transform.a * shape[1]
    south = north + scene.transform.e * shape[0]
    to_ll = Transformer.from_crs(scene.crs, "EPSG:4326", always_xy=True)
    xs, ys = np.meshgrid(np.linspace(west, east, 9), np.linspace(south, north, 9))
    lon, lat = to_ll.transform(xs, ys)
    footprint = box(lon.min(), lat.min(), lon.max(), lat.max())
    props = {"proj:code": scene.crs, **scene.properties}
    if scene.end is not None:
        props.update(start_datetime=scene.datetime.isoformat(), end_datetime=scene.end.isoformat())
    item = pystac.Item(
        scene.id,
        mapping(footprint),
        list(footprint.bounds),
        scene.datetime,
        props,
        collection=scene.collection,
    )
    folder = directory / scene.collection / scene.id
    folder.mkdir(parents=True, exist_ok=True)
    for key, data in scene.assets.items():
        path = folder / f"{key}.tif"
        nodata = scene.nodata.get(key)
        _write_cog(path, data, crs=scene.crs, transform=scene.transform, nodata=nodata)
        band = {"data_type": str(data.dtype), **({} if nodata is None else {"nodata": nodata})}
        item.add_asset(
            key,
            pystac.Asset(
                str(path),
                media_type=pystac.MediaType.COG,
                roles=["data"],
                extra_fields={
                    "proj:shape": list(data.shape),
                    "proj:transform": list(scene.transform)[:6],
                    "raster:bands": [band],
                },
            ),
        )
    return item


def _write_cog(
    path: Path, data: np.ndarray, *, crs: str, transform: Affine, nodata: float | None
) -> None:
    with rasterio.open(
        path,
        "w",
        driver="COG",
        height=data.shape[0],
        width=data.shape[1],
        count=1,
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        compress="deflate",
        blocksize=256,
    ) as dst:
        dst.write(data, 1)


# --------------------------------------------------------------------------------------------
# the demo's catalogue

_SEASONS = {"T1": ("2020-01-01", "2020-05-01"), "T2": ("2020-05-02", "2020-09-01")}
_SEASONS["T3"] = ("2020-09-02", "2020-12-31")
_SEASON_GAIN = {"T1": 1.0, "T2": 0.8, "T3": 0.9}
_S2_ASSETS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
# QA_PIXEL values as Landsat C2 writes them: clear land, cloud (+dilated), cloud shadow, fill.
_QA_CLEAR, _QA_CLOUD, _QA_SHADOW, _QA_FILL = 21824, 22280, 23888, 1
_MARGIN_M = 300.0


@dataclass(frozen=True)
class _Grid:
    """A scene grid over a site, and its pixel centres in lon/lat."""

    crs: str
    transform: Affine
    lon: np.ndarray
    lat: np.ndarray


def _utm_grid(lon0: float, lat0: float, size_m: float, res_m: float) -> _Grid:
    epsg = 32600 + int((lon0 + 180) // 6) + 1
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    x0, y1 = to_utm.transform(lon0, lat0)
    x0, y1 = (np.floor((x0 - _MARGIN_M) / res_m) * res_m, np.ceil((y1 + _MARGIN_M) / res_m) * res_m)
    n = int(np.ceil((size_m + 2 * _MARGIN_M) / res_m))
    ux, uy = np.meshgrid(x0 + (np.arange(n) + 0.5) * res_m, y1 - (np.arange(n) + 0.5) * res_m)
    lon, lat = to_utm.transform(ux, uy, direction="INVERSE")
    return _Grid(f"EPSG:{epsg}", from_origin(x0, y1, res_m, res_m), lon, lat)


def _ll_grid(lon0: float, lat0: float, size_m: float, res_deg: float) -> _Grid:
    pad = _MARGIN_M / 111_000
    n = int(np.ceil((size_m / 100_000 + 2 * pad) / res_deg))
    west, north = lon0 - pad, lat0 + pad
    cols, rows = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5)
    return _Grid(
        "EPSG:4326",
        from_origin(west, north, res_deg, res_deg),
        west + cols * res_deg,
        north - rows * res_deg,
    )


def _date_in_season(start: str, k: int, n: int, *, first_day: int) -> dt.datetime:
    """The ``k``-th of ``n`` acquisition dates spread over a season from ``start``."""
    day0 = dt.datetime.fromisoformat(start).replace(tzinfo=dt.UTC)
    return day0 + dt.timedelta(days=first_day + round(100 * k / n), hours=5)


def _saturation(land: Landscape, grid: _Grid) -> Any:
    _, visible = land.agb(grid.lon, grid.lat)
    return lambda scale: 1 - np.exp(-visible / scale)


def _s2_reflectance(sat: Any, gain: float, noise: Any) -> dict[str, np.ndarray]:
    """Sentinel-2 L2A DN (pre-04.00 scale) of the ten bands, from the visible AGB."""
    return {
        "B02": 300 + 200 * (1 - sat(60)) + noise(15),
        "B03": 550 + 250 * (1 - sat(70)) + noise(20),
        "B04": 250 + 900 * (1 - sat(50)) * gain + noise(25),
        "B05": 800 + 500 * (1 - sat(60)) * gain + noise(25),
        "B06": 1500 + 1200 * sat(80) * gain + noise(45),
        "B07": 1700 + 1600 * sat(90) * gain + noise(55),
        "B08": 1800 + 1800 * sat(90) * gain + noise(60),
        "B8A": 1900 + 1800 * sat(90) * gain + noise(60),
        "B11": 2400 - 900 * sat(110) + noise(50),
        "B12": 1700 - 900 * sat(100) + noise(45),
    }


def _clouds(rng: np.random.Generator, shape: tuple[int, int], frac: float) -> tuple[Any, Any]:
    """A cloud mask and its shadow (the same blobs shifted), each ~``frac`` of the scene."""
    cloud = holes(rng, shape, frac=frac / 4)
    cloud = cloud | np.roll(cloud, (1, 1), (0, 1)) | np.roll(cloud, (-1, 2), (0, 1))
    shadow = np.roll(cloud, (6, -5), (0, 1)) & ~cloud
    return cloud, shadow


def _s2_scenes(
    site: str, land: Landscape, grid: _Grid, rng: np.random.Generator, n: int = 3
) -> list[Scene]:
    sat = _saturation(land, grid)
    shape = grid.lon.shape
    scenes = []
    for season, (start, _) in _SEASONS.items():
        for k in range(n):
            bands = _s2_reflectance(sat, _SEASON_GAIN[season], lambda sd: rng.normal(0, sd, shape))
            cloud, shadow = _clouds(rng, shape, frac=(0.1, 0.25, 0.45)[k % 3])
            scl = np.where(sat(90) > 0.3, 4, 5).astype(np.uint8)
            scl[cloud] = rng.choice([8, 9, 10], size=int(cloud.sum()))
            scl[shadow] = 3
            new = k % 3 == 1  # processing baseline 04.00: DN carry +1000
            edge = np.add.outer(np.arange(shape[0]), np.arange(shape[1])) < shape[0] // 3
            for key, value in bands.items():
                value = np.where(cloud, 6000 + rng.normal(0, 300, shape), value)
                value = np.where(shadow, value * 0.4, value)
                dn = np.clip(value + (1000 if new else 0), 1, 20000).astype(np.uint16)
                dn[edge & (k % 3 == 2)] = 0  # every third scene misses a corner
                bands[key] = dn
            scl[edge & (k % 3 == 2)] = 0
            when = _date_in_season(start, k, n, first_day=15)
            scenes.append(
                Scene(
                    "sentinel-2-l2a",
                    f"S2_{site}_{season}_{k}",
                    when,
                    grid.crs,
                    grid.transform,
                    {**bands, "SCL": scl},
                    nodata={key: 0 for key in _S2_ASSETS},
                    properties={
                        "eo:cloud_cover": round(100 * float(cloud.mean()), 1),
                        "s2:processing_baseline": "04.00" if new else "02.14",
                        "platform": "sentinel-2a",
                    },
                )
            )
    return scenes


def _landsat_scenes(
    site: str, land: Landscape, grid: _Grid, rng: np.random.Generator, n: int = 2
) -> list[Scene]:
    sat = _saturation(land, grid)
    shape = grid.lon.shape
    scenes = []
    for season, (start, _) in _SEASONS.items():
        for k in range(n):
            s2 = _s2_reflectance(sat, _SEASON_GAIN[season], lambda sd: rng.normal(0, sd, shape))
            cloud, shadow = _clouds(rng, shape, frac=0.15)
            qa = np.full(shape, _QA_CLEAR, np.uint16)
            qa[cloud], qa[shadow] = _QA_CLOUD, _QA_SHADOW
            assets = {}
            for key, src in zip(
                ("SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"),
                ("B02", "B03", "B04", "B8A", "B11", "B12"),
                strict=True,
            ):
                reflectance = np.where(cloud, 0.6, s2[src] / 1e4)
                assets[key] = np.clip((reflectance + 0.2) / 2.75e-5, 1, 65535).astype(np.uint16)
            assets["QA_PIXEL"] = qa
            when = _date_in_season(start, k, n, first_day=20)
            scenes.append(
                Scene(
                    "landsat-c2-l2",
                    f"LC08_{site}_{season}_{k}",
                    when,
                    grid.crs,
                    grid.transform,
                    assets,
                    nodata={key: 0 for key in assets if key != "QA_PIXEL"} | {"QA_PIXEL": 1},
                    properties={
                        "eo:cloud_cover": round(100 * float(cloud.mean()), 1),
                        "platform": "landsat-8",
                    },
                )
            )
    return scenes


def _s1_scenes(
    site: str, land: Landscape, grid: _Grid, rng: np.random.Generator, n: int = 3
) -> list[Scene]:
    sat = _saturation(land, grid)
    shape = grid.lon.shape
    scenes = []
    for season, (start, _) in _SEASONS.items():
        for k in range(n):
            orbit = "ascending" if k % 3 == 2 else "descending"
            db = {
                "VV": -13 + 5 * sat(70) + rng.normal(0, 1.0, shape),
                "VH": -21 + 7 * sat(110) + rng.normal(0, 1.2, shape),
            }
            when = _date_in_season(start, k, n, first_day=10)
            scenes.append(
                Scene(
                    "sentinel-1-grd",
                    f"S1_{site}_{season}_{k}",
                    when,
                    grid.crs,
                    grid.transform,
                    {p: (10 ** (v / 10)).astype(np.float32) for p, v in db.items()},
                    nodata={"VV": -32768.0, "VH": -32768.0},
                    properties={
                        "sat:orbit_state": orbit,
                        "sar:instrument_mode": "IW",
                        "sar:polarizations": ["VV", "VH"],
                    },
                )
            )
    return scenes


def _static_scenes(
    site: str, land: Landscape, lon0: float, lat0: float, size_m: float, rng: np.random.Generator
) -> list[Scene]:
    """DEM (GLO-30-like, 1″), canopy height (uint8, 255 nodata) and two PALSAR-2 years."""
    dem_grid = _ll_grid(lon0, lat0, size_m, 1 / 3600)
    x, y = land.metres(dem_grid.lon, dem_grid.lat)
    dem = (400 + 120 * land.terrain(x, y)).astype(np.float32)
    ch_grid = _utm_grid(lon0, lat0, size_m, 20.0)
    ch = np.clip(
        38 * _saturation(land, ch_grid)(220) + rng.normal(0, 1.5, ch_grid.lon.shape), 0, 80
    )
    pal_grid = _ll_grid(lon0, lat0, size_m, 1 / 4500)
    sat = _saturation(land, pal_grid)
    t0 = dt.datetime(2015, 6, 1, tzinfo=dt.UTC)
    scenes = [
        Scene("cop-dem-glo-30", f"DEM_{site}", t0, dem_grid.crs, dem_grid.transform, {"DEM": dem}),
        Scene(
            "canopy-height",
            f"CH_{site}",
            t0,
            ch_grid.crs,
            ch_grid.transform,
            {"CH": ch.astype(np.uint8)},
            nodata={"CH": 255},
        ),
    ]
    for year, shift in ((2019, -0.5), (2020, 0.0)):
        shape = pal_grid.lon.shape
        hh = -9 + 3 * sat(150) + shift + rng.normal(0, 0.4, shape)
        hv = -18 + 8 * sat(200) + shift + rng.normal(0, 0.5, shape)
        dn = {
            p: np.sqrt(10 ** ((v + 83) / 10)).astype(np.uint16) for p, v in (("HH", hh), ("HV", hv))
        }
        start = dt.datetime(year, 1, 1, tzinfo=dt.UTC)
        scenes.append(
            Scene(
                "alos-palsar-mosaic",
                f"PALSAR_{site}_{year}",
                start,
                pal_grid.crs,
                pal_grid.transform,
                dn,
                nodata={"HH": 0, "HV": 0},
                end=dt.datetime(year, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
            )
        )
    return scenes


def _demo_sites(directory: Path, catalogue: Path, size_px: int, seed: int) -> list[Scene]:
    """Write the three AGB maps into ``directory``; return every site's scenes."""
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    size_m = size_px * 40.0
    for name, spec in SITES.items():
        lon0, lat0 = spec["lon0"], spec["lat0"]
        land = Landscape(
            lon0,
            lat0,
            Field.random(rng),
            Field.random(rng, min_m=600, max_m=3000),
            Field.random(rng, min_m=800, max_m=6000),
            spec["scale"],
        )
        lon, lat, transform = site_grid(lon0, lat0, size_px)
        agb, _ = land.agb(lon, lat)
        if name == "gamma":  # an irregular LiDAR footprint, 0 outside, as `agbcube demo`
            dx, dy = (lon - lon.mean()) / np.ptp(lon), (lat - lat.mean()) / np.ptp(lat)
            agb = np.where(
                np.hypot(dx, dy) < 0.42 + 0.06 * np.sin(8 * np.arctan2(dy, dx)), agb, 0.0
            )
        with rasterio.open(
            directory / f"{name}_biomass.tif",
            "w",
            driver="GTiff",
            height=size_px,
            width=size_px,
            count=1,
            dtype="float32",
            crs="EPSG:4326",
            transform=transform,
        ) as dst:
            dst.write(agb.astype(np.float32), 1)
        scenes += synthetic_scenes(name, land, size_m, rng)
    return scenes


def synthetic_scenes(
    site: str,
    land: Landscape,
    size_m: float,
    rng: np.random.Generator,
    *,
    per_season: tuple[int, int, int] = (3, 2, 3),
) -> list[Scene]:
    """Every sensor's scenes over a square of ``size_m`` from the landscape's NW corner.

    ``per_season`` counts Sentinel-2, Landsat-8 and Sentinel-1 scenes per season; the DEM, the
    canopy height and two PALSAR-2 years come once.
    """
    lon0, lat0 = land.lon0, land.lat0
    s2 = _utm_grid(lon0, lat0, size_m, 20.0)
    n_s2, n_l8, n_s1 = per_season
    return [
        *_s2_scenes(site, land, s2, rng, n_s2),
        *_landsat_scenes(site, land, _utm_grid(lon0, lat0, size_m, 30.0), rng, n_l8),
        *_s1_scenes(site, land, s2, rng, n_s1),
        *_static_scenes(site, land, lon0, lat0, size_m, rng),
    ]


def stac_demo_config(data_dir: str = "data", catalogue: str = "catalogue/catalog.json") -> dict:
    """The ``demo --stac`` configuration: the demo's, with every site's bands from the catalogue."""
    cfg = demo_config(data_dir)
    satellite = {
        "stac": catalogue,
        "seasons": {name: list(days) for name, days in _SEASONS.items()},
        "max_cloud_cover": 40,
        "provider": "raw",
        "sentinel1_db": True,  # the scenes are linear γ0, as on Planetary Computer
    }
    cfg["sites"] = [
        {"name": s["name"], "biomass": s["biomass"], "satellite": satellite} for s in cfg["sites"]
    ]
    return cfg


def write_stac_demo(directory: str | Path, *, size_px: int = 160, seed: int = 0) -> Path:
    """Write the demo's AGB maps, a local STAC catalogue of their scenes, and ``demo.yaml``.

    Layout: ``directory/data/<site>_biomass.tif``, ``directory/catalogue/catalog.json`` (COGs and
    items), ``directory/demo.yaml``. Returns the config's path.
    """
    directory = Path(directory)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    scenes = _demo_sites(directory / "data", directory / "catalogue", size_px, seed)
    write_catalogue(directory / "catalogue", scenes)
    path = directory / "demo.yaml"
    text = config_yaml(stac_demo_config()).replace(
        "written by `agbcube demo`", "and their STAC catalogue written by `agbcube demo --stac`"
    )
    path.write_text(text)
    return path
