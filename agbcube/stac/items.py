"""STAC out: metadata of agbcube's outputs: map Items, a run's map Collection, cube Items.

Every Item sits next to the files it describes and points at them by relative hrefs, so a
folder of maps (or a cube) can be moved or uploaded as it is. The Items carry what a reader
needs to open the data without looking at the files first (odc-stac, stackstac, a STAC
browser): the projection extension (CRS, grid shape, transform, native bbox), the raster
extension on each GeoTIFF asset (dtype, nodata, unit, resolution, statistics), and the datacube
extension on a cube's Zarr asset (its dimensions and variables), with the xarray-assets
extension's ``xarray:open_kwargs`` for ``xr.open_dataset(href, **open_kwargs)``.

A map has no acquisition date of its own (the cube's inputs carry none), so an Item's
``datetime`` is the time it was written, also given as ``created``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agbcube._cf import AGB_UNITS
from agbcube._io import mark_output, output_lock, write_json_atomic, written_by

__all__ = [
    "COG_MEDIA_TYPE",
    "ZARR_MEDIA_TYPE",
    "cube_item",
    "cube_items_dir",
    "map_item",
    "update_map_collection",
    "write_cube_item",
    "write_map_item",
]

COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
ZARR_MEDIA_TYPE = "application/vnd+zarr"
ITEM_FILE = "item.json"
COLLECTION_FILE = "collection.json"
COLLECTION_WAIT_S = 120.0  # how long an update waits for another command's (it takes < 1 s)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _geobox(shape: tuple[int, int], transform: Any, crs: Any) -> Any:
    from odc.geo.geobox import GeoBox

    return GeoBox(shape, transform, crs)


def _footprint(gbox: Any) -> tuple[dict[str, Any], list[float]]:
    """GeoJSON geometry and bbox in longitude/latitude (edges densified, as they curve)."""
    geom = gbox.footprint("EPSG:4326", npoints=8)
    bbox = geom.boundingbox
    doc = geom.json
    # 1e-7 degrees is about a centimetre
    doc["coordinates"] = [[[round(v, 7) for v in xy] for xy in ring] for ring in doc["coordinates"]]
    return doc, [float(v) for v in (bbox.left, bbox.bottom, bbox.right, bbox.top)]


def _apply_projection(obj: Any, gbox: Any) -> None:
    """``proj:code`` (or ``proj:wkt2`` for a CRS without an EPSG code), shape, transform, bbox."""
    from pystac.extensions.projection import ProjectionExtension

    epsg = gbox.crs.epsg
    bbox = gbox.boundingbox
    ProjectionExtension.ext(obj, add_if_missing=True).apply(
        code=f"EPSG:{epsg}" if epsg is not None else None,
        wkt2=None if epsg is not None else gbox.crs.to_wkt(),
        shape=[int(n) for n in gbox.shape],
        transform=[float(v) for v in tuple(gbox.transform)[:6]],
        bbox=[float(v) for v in (bbox.left, bbox.bottom, bbox.right, bbox.top)],
    )


def _gsd_m(gbox: Any) -> float:
    """STAC's ``gsd``, in metres: the side of a square of the area of the grid's centre pixel,
    measured on the CRS's ellipsoid when the CRS is geographic (a degree is not a length)."""
    crs = gbox.crs.proj  # pyproj.CRS
    dx, dy = abs(gbox.transform.a), abs(gbox.transform.e)
    if not crs.is_geographic:
        return float(np.sqrt(dx * dy) * crs.axis_info[0].unit_conversion_factor)
    lon, lat = gbox.transform * (gbox.shape[1] / 2, gbox.shape[0] / 2)
    geod = crs.get_geod()
    width = geod.inv(lon - dx / 2, lat, lon + dx / 2, lat)[2]
    height = geod.inv(lon, lat - dy / 2, lon, lat + dy / 2)[2]
    return float(np.sqrt(width * height))


# --------------------------------------------------------------------------------------------
# maps


def map_item(
    directory: str | Path,
    *,
    site: str,
    layers: Mapping[str, Mapping[str, Any]],
    shape: tuple[int, int],
    transform: Any,
    crs: Any,
    run: str | None = None,
    statistics: Mapping[str, Mapping[str, float]] | None = None,
    created: dt.datetime | None = None,
) -> Any:
    """A STAC Item of one site's maps: one asset per COG, quick looks as overviews.

    Parameters
    ----------
    directory : str or Path
        The folder holding the COGs (``<layer>.tif``) and quick looks (``<layer>.png``).
    site : str
        The site's name; the Item's id.
    layers : mapping
        Per layer: ``title``, ``description``, ``unit`` (or None), ``dtype``, ``nodata``.
    shape, transform, crs
        The maps' grid: ``(ny, nx)``, an affine transform and a CRS (anything odc-geo reads).
    run : str, optional
        The training run's name, shown in the title.
    statistics : mapping, optional
        Per layer, ``minimum``/``maximum``/``mean``/``valid_percent`` (raster extension).
    created : datetime, optional
        Default now (UTC).

    Returns
    -------
    pystac.Item
        Asset hrefs are relative to ``directory``.
    """
    import pystac

    directory = Path(directory)
    created = created or _now()
    gbox = _geobox(shape, transform, crs)
    gsd_m = _gsd_m(gbox)
    geometry, bbox = _footprint(gbox)
    title = f"AGB maps of site '{site}'" + (f", run '{run}'" if run else "")
    item = pystac.Item(
        id=site,
        geometry=geometry,
        bbox=bbox,
        datetime=created,
        properties={
            "title": title,
            "description": "Above-ground biomass (ensemble mean and standard deviation of the "
            "run's fold models), dissimilarity index and area of applicability.",
            "created": pystac.utils.datetime_to_str(created),
            "gsd": gsd_m,
        },
    )
    _apply_projection(item, gbox)
    for name, info in layers.items():
        if (directory / f"{name}.tif").exists():
            _add_cog_asset(item, name, info, gsd_m, (statistics or {}).get(name))
        if (directory / f"{name}.png").exists():
            item.add_asset(
                f"{name}_preview",
                pystac.Asset(
                    href=f"./{name}.png",
                    media_type=pystac.MediaType.PNG,
                    title=f"{info['title']} (quick look)",
                    roles=["thumbnail" if name == "agb_mean" else "overview"],
                ),
            )
    return item


def _add_cog_asset(
    item: Any,
    name: str,
    info: Mapping[str, Any],
    gsd_m: float,
    stats: Mapping[str, float] | None,
) -> None:
    """A COG asset ``./<name>.tif`` with its raster band (dtype, nodata, unit, statistics)."""
    import pystac
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension, Statistics

    asset = pystac.Asset(
        href=f"./{name}.tif",
        media_type=COG_MEDIA_TYPE,
        title=info["title"],
        description=info["description"],
        roles=["data"],
    )
    item.add_asset(name, asset)  # the extension needs the asset's owner
    band = RasterBand.create(
        nodata=_stac_nodata(info["nodata"]),
        data_type=DataType(np.dtype(info["dtype"]).name),
        spatial_resolution=gsd_m,  # metres, as gsd
        unit=info.get("unit"),
        statistics=Statistics.create(**stats) if stats else None,
    )
    RasterExtension.ext(asset, add_if_missing=True).apply(bands=[band])


def _stac_nodata(value: float) -> float | str:
    """The raster extension writes NaN as the string ``"nan"`` (JSON has no NaN)."""
    return "nan" if isinstance(value, float) and np.isnan(value) else value


def write_map_item(item: Any, directory: str | Path) -> Path:
    """Write ``directory/item.json`` atomically, its hrefs relative."""
    path = Path(directory) / ITEM_FILE
    write_json_atomic(path, item.to_dict(include_self_link=False, transform_hrefs=False))
    return path


def update_map_collection(
    path: str | Path,
    items: Sequence[str | Path],
    *,
    run_dir: str | Path | None = None,
) -> Path:
    """Create or update the STAC Collection of a run's maps.

    The Collection lists the Items given and those it already listed whose files still exist
    (so predicting one site after another grows it), links each Item to it, and points at the
    training run's ``metrics.json`` and ``config.yaml`` as metadata assets.

    Parameters
    ----------
    path : str or Path
        The ``collection.json`` to write.
    items : sequence of path
        Item files (``<site folder>/item.json``) to add or refresh.
    run_dir : str or Path, optional
        The training run; its name becomes the Collection's id.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path).resolve()
    # several `predict` commands may add their sites at once: one reads and writes at a time
    with output_lock(path, what="maps collection", wait_s=COLLECTION_WAIT_S):
        return _update_collection(path, items, run_dir)


def _update_collection(path: Path, items: Sequence[str | Path], run_dir: Any) -> Path:
    import pystac

    hrefs = _listed_items(path) | {Path(p).resolve() for p in items}
    loaded = sorted(
        (pystac.Item.from_file(str(p)) for p in hrefs if p.exists()), key=lambda i: i.id
    )
    run = Path(run_dir).resolve() if run_dir is not None else None
    name = run.name if run is not None else path.parent.name
    collection = pystac.Collection(
        id=f"agbcube-{name}-maps",
        title=f"AGB maps of run '{name}'",
        description="Above-ground biomass maps written by `agbcube predict`: per site, the "
        "ensemble mean and standard deviation of the run's fold models (Mg/ha), the "
        "dissimilarity index and the area of applicability, as Cloud-Optimised GeoTIFFs.",
        extent=_extent(loaded),
        license="other",
    )
    if run is not None:
        for key, file, media in (
            ("metrics", "metrics.json", pystac.MediaType.JSON),
            ("config", "config.yaml", "application/yaml"),
        ):
            if (run / file).exists():
                collection.add_asset(
                    key,
                    pystac.Asset(
                        href=_relative(run / file, path.parent),
                        media_type=media,
                        title=f"training run: {file}",
                        roles=["metadata"],
                    ),
                )
    collection.summaries.add("proj:code", sorted({str(_proj_code(i)) for i in loaded}))
    doc = collection.to_dict(include_self_link=False, transform_hrefs=False)
    doc["links"] = [
        {"rel": "item", "href": _relative(p, path.parent), "type": pystac.MediaType.JSON}
        for p in sorted(hrefs)
        if p.exists()
    ]
    doc["written_by"] = written_by()  # marks the file as agbcube's, so a rerun may refresh it
    write_json_atomic(path, doc)
    for p in hrefs:
        if p.exists():
            _link_item_to(p, path)
    return path


def _proj_code(item: Any) -> str | None:
    return item.properties.get("proj:code") or ("wkt2" if "proj:wkt2" in item.properties else None)


def _listed_items(path: Path) -> set[Path]:
    """Item files an existing collection lists."""
    if not path.exists():
        return set()
    links = json.loads(path.read_text()).get("links", [])
    return {(path.parent / link["href"]).resolve() for link in links if link.get("rel") == "item"}


def _relative(target: Path, start: Path) -> str:
    import os

    rel = os.path.relpath(target, start)
    return rel if rel.startswith("..") else f"./{rel}"


def _extent(items: Sequence[Any]) -> Any:
    import pystac

    if not items:
        now = _now()
        return pystac.Extent(
            pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
            pystac.TemporalExtent([[now, now]]),
        )
    boxes = np.array([i.bbox for i in items], dtype=float)
    union = [*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0)]
    times = [i.datetime for i in items]
    return pystac.Extent(
        pystac.SpatialExtent([[float(v) for v in union], *boxes.tolist()]),
        pystac.TemporalExtent([[min(times), max(times)]]),
    )


def _link_item_to(item_path: Path, collection_path: Path) -> None:
    """Give an Item file its ``collection`` and ``parent`` links (and the collection id)."""
    doc = json.loads(item_path.read_text())
    href = _relative(collection_path, item_path.parent)
    doc["collection"] = json.loads(collection_path.read_text())["id"]
    doc["links"] = [
        link for link in doc.get("links", []) if link.get("rel") not in ("collection", "parent")
    ] + [
        {"rel": "collection", "href": href, "type": "application/json"},
        {"rel": "parent", "href": href, "type": "application/json"},
    ]
    write_json_atomic(item_path, doc)


# --------------------------------------------------------------------------------------------
# cubes


def cube_items_dir(store: str | Path) -> Path:
    """Where a cube's Items live: ``<store>.stac/`` beside the store.

    Not inside it: Zarr warns about every file in a hierarchy it does not know.
    """
    store = Path(store)
    return store.with_name(store.name + ".stac")


def cube_item(ds: Any, *, group: str, store_href: str, created: dt.datetime | None = None) -> Any:
    """A STAC Item of one site's Zarr group, its asset described by the datacube extension.

    Parameters
    ----------
    ds : xr.Dataset
        The site's cube (``features (band, y, x)``, ``agb (y, x)``, CRS), lazy or not.
    group : str
        The group's name in the store (the site).
    store_href : str
        The store's href, relative to where the Item will be written.
    created : datetime, optional
        Default now (UTC).

    Returns
    -------
    pystac.Item
        With one asset, ``zarr``: the store, with ``xarray:open_kwargs`` that select the
        group, so ``xr.open_dataset(asset.get_absolute_href(), **open_kwargs)`` opens it.
    """
    import pystac
    from pystac.extensions.datacube import DatacubeExtension

    created = created or _now()
    transform = ds.rio.transform()
    gbox = _geobox((ds.sizes["y"], ds.sizes["x"]), transform, ds.rio.crs.to_wkt())
    geometry, bbox = _footprint(gbox)
    item = pystac.Item(
        id=group,
        geometry=geometry,
        bbox=bbox,
        datetime=created,
        properties={
            "title": f"agbcube cube of site '{group}'",
            "description": "Satellite features aligned with a LiDAR AGB map on one grid "
            "(agbcube build-cube).",
            "created": pystac.utils.datetime_to_str(created),
            "gsd": _gsd_m(gbox),
        },
        stac_extensions=["https://stac-extensions.github.io/xarray-assets/v1.0.0/schema.json"],
    )
    _apply_projection(item, gbox)
    asset = pystac.Asset(
        href=store_href,
        media_type=ZARR_MEDIA_TYPE,
        title=f"Zarr group '{group}'",
        roles=["data"],
        extra_fields={
            "xarray:open_kwargs": {"engine": "zarr", "group": group, "consolidated": True}
        },
    )
    dims, variables = _datacube_fields(ds, gbox)
    item.add_asset("zarr", asset)
    DatacubeExtension.ext(asset, add_if_missing=True).apply(dimensions=dims, variables=variables)
    return item


def _datacube_fields(ds: Any, gbox: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``cube:dimensions`` (x, y at pixel centres; band names) and ``cube:variables``."""
    from pystac.extensions.datacube import Dimension, Variable

    transform = gbox.transform
    crs_code = gbox.crs.epsg if gbox.crs.epsg is not None else gbox.crs.to_wkt()
    half_x, half_y = abs(transform.a) / 2, abs(transform.e) / 2
    bounds = gbox.boundingbox
    spatial = {
        "x": [bounds.left + half_x, bounds.right - half_x],
        "y": [bounds.bottom + half_y, bounds.top - half_y],
    }
    dims = {
        axis: Dimension.from_dict(
            {
                "type": "spatial",
                "axis": axis,
                "extent": [float(v) for v in spatial[axis]],
                "step": float(transform.a if axis == "x" else transform.e),
                "reference_system": crs_code,
            }
        )
        for axis in ("x", "y")
    }
    dims["band"] = Dimension.from_dict(
        {"type": "bands", "values": [str(b) for b in ds["band"].values]}
    )
    variables = {
        "features": Variable.from_dict(
            {
                "type": "data",
                "dimensions": ["band", "y", "x"],
                "description": "Satellite bands, then spectral indices computed by band name.",
            }
        ),
        "agb": Variable.from_dict(
            {
                "type": "data",
                "dimensions": ["y", "x"],
                "unit": AGB_UNITS,
                "description": "Above-ground biomass (NaN where missing or out of range).",
            }
        ),
    }
    return dims, variables


def write_cube_item(ds: Any, store: str | Path) -> Path:
    """Write ``<store>.stac/<site>.json``, the Item of a site's group (see `cube_item`)."""
    store = Path(store)
    site = str(ds.attrs["site"])
    path = cube_items_dir(store) / f"{site}.json"
    mark_output(path.parent, "cube-items")  # so a rebuild may replace its own Items
    item = cube_item(ds, group=site, store_href=_relative(store, path.parent))
    write_json_atomic(path, item.to_dict(include_self_link=False, transform_hrefs=False))
    return path
