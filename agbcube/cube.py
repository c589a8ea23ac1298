"""Raster pairs → an aligned, lazily computed data cube → a Zarr store.

A cube store holds one Zarr group per site, readable with ``xr.open_zarr(store, group=site)``
or as a whole with ``xr.open_datatree(store, engine="zarr")``:

* ``features (band, y, x)`` float32, ``band`` = raw band names, then index names;
* ``agb (y, x)`` float32 in Mg/ha, NaN where missing;
* ``spatial_ref`` with the CRS and transform (rioxarray / odc-geo conventions);
* attrs ``site``, ``provenance`` (JSON: inputs with sizes and mtimes, settings, versions) and
  ``stats`` (JSON: valid AGB pixels and their summary).

Each site is written into a hidden temporary group and renamed into place when complete, so an
interrupted build never leaves a site that looks finished. The root group's ``agbcube`` attribute
lists the finished sites and says whether the whole build completed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import rasterio
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords, xr_reproject
from rasterio.errors import RasterioError, RasterioIOError

from agbcube import __version__
from agbcube._cf import AGB_UNITS, cf_dataset, linear_units
from agbcube._dask import check_scheduler, compute, dask_scheduler
from agbcube._io import (
    digest,
    file_digest,
    output_lock,
    remove_output,
    remove_path,
    replace_path,
    temporary_sibling,
    url_identity,
    write_errors,
)
from agbcube._log import reporter
from agbcube._store import (
    ZARR_FORMAT,
    cube_sites,
    folder_manifest,
    open_cube,
    open_cube_tree,
    root_meta,
)
from agbcube.bands import resolve_band_names
from agbcube.config import CubeConfig, GridSpec, SiteConfig, StacSource
from agbcube.errors import (
    CubeError,
    GridError,
    InputFileError,
    MissingCRSError,
    NoOverlapError,
)
from agbcube.indices import compute_indices, plan_indices
from agbcube.stac import composites as stac
from agbcube.stac.composites import clear_fraction_checks, warn_no_clear
from agbcube.stac.items import write_cube_item

__all__ = [
    "RasterInfo",
    "build_cube",
    "build_site_cube",
    "cube_sites",
    "open_cube",
    "open_cube_tree",
    "probe_raster",
    "target_geobox",
]

CUBE_FORMAT = 1
# An explicit grid with this many times more pixels than its finest input raster has over the
# site is a unit mistake (a resolution in degrees for a metre CRS), not an upsampling anyone
# wants: 10x finer along each axis.
MAX_UPSAMPLING = 100

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# opening rasters


@dataclass(frozen=True)
class RasterInfo:
    """What a raster's header says, read without touching pixel data."""

    path: Path
    count: int
    dtype: str
    nodata: float | None
    geobox: GeoBox
    descriptions: tuple[str | None, ...]
    block_shape: tuple[int, int]
    units: tuple[str | None, ...] = ()  # each band's, where the file states one


def probe_raster(path: str | Path, *, what: str = "raster", crs: str | None = None) -> RasterInfo:
    """Read a raster's header and check it can be used.

    Parameters
    ----------
    path : str or Path
        The raster file.
    what : str
        Names the file's role in messages, e.g. ``"site 'betul' satellite"``.
    crs : str, optional
        CRS to assume when the file has none.

    Raises
    ------
    InputFileError
        Missing file or not a raster GDAL can read.
    MissingCRSError
        No CRS in the file and none given.
    GridError
        A rotated or sheared grid, or an empty raster.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{what}: file {path} does not exist; check the path in the config")
    try:
        with rasterio.open(path) as src:
            file_crs = src.crs
            transform = src.transform
            shape = (src.height, src.width)
            count = src.count
            dtype = src.dtypes[0] if count else "none"
            nodata = src.nodata
            descriptions = tuple(src.descriptions)
            units = tuple(src.units)
            block = tuple(src.block_shapes[0]) if count else (shape[0], shape[1])
    except RasterioIOError as err:
        raise InputFileError(
            f"{what}: {path} is not a raster GDAL can read ({err}); give a GeoTIFF or another "
            "GDAL raster"
        ) from err
    if count == 0 or shape[0] == 0 or shape[1] == 0:
        raise GridError(f"{what}: {path} holds no pixels ({count} bands, {shape[0]}x{shape[1]})")
    if file_crs is None:
        if crs is None:
            raise MissingCRSError(
                f"{what}: {path} has no CRS. Set `crs:` for this site in the config (e.g. "
                "'EPSG:4326'), or write one into the file (gdal_edit.py -a_srs)."
            )
        file_crs = crs
    if transform.b != 0 or transform.d != 0:
        raise GridError(
            f"{what}: {path} has a rotated or sheared grid ({transform}); warp it north-up "
            "first (gdalwarp)"
        )
    return RasterInfo(
        path=path,
        count=count,
        dtype=str(dtype),
        nodata=None if nodata is None else float(nodata),
        geobox=GeoBox(shape, transform, str(file_crs)),
        descriptions=descriptions,
        block_shape=block,  # type: ignore[arg-type]
        units=units,
    )


def _chunk_along(block: int, target: int, size: int) -> int:
    """A chunk length that is a multiple of the file's block and close to ``target``."""
    block = max(1, min(block, size))
    return min(size, max(block, round(target / block) * block))


def open_raster(
    info: RasterInfo, *, nodata: float | None = None, chunk_px: int = 256
) -> xr.DataArray:
    """Open a raster lazily as float32 ``(band, y, x)`` with nodata turned into NaN.

    The nodata value (``nodata`` or the file's tag) is masked in the file's own dtype, before the
    cast to float32, so sentinel values such as -9999 or 65535 never leak into resampling.
    """
    import rioxarray

    # All bands of a window in one chunk: one read task per window instead of one per band,
    # and the index kernel then sees every band at once. lock=False lets the threads decode
    # windows in parallel (each gets its own dataset handle).
    chunks = {
        "band": -1,
        "y": _chunk_along(info.block_shape[0], chunk_px, info.geobox.shape.y),
        "x": _chunk_along(info.block_shape[1], chunk_px, info.geobox.shape.x),
    }
    da = rioxarray.open_rasterio(
        info.path, chunks=chunks, mask_and_scale=False, cache=False, lock=False
    )
    assert isinstance(da, xr.DataArray)  # one subdataset: always an array
    if da.rio.crs is None:
        da = da.rio.write_crs(info.geobox.crs.to_wkt())
    fill = info.nodata if nodata is None else nodata
    if fill is not None and not math.isnan(fill):
        da = da.where(da != fill)
    da = da.astype(np.float32)
    da.attrs = {}
    da.encoding = {}
    return da


# --------------------------------------------------------------------------------------------
# grids and alignment


def target_geobox(
    satellite: GeoBox, biomass: GeoBox, grid: str | GridSpec = "biomass", *, site: str = ""
) -> tuple[GeoBox, float]:
    """The grid a site's cube is built on, cropped to where both rasters have data.

    Parameters
    ----------
    satellite, biomass : GeoBox
        The two rasters' grids.
    grid : "biomass", "satellite" or GridSpec
        Which grid to use, or an explicit CRS and resolution (then the AGB map's footprint).
    site : str
        Names the site in messages.

    Returns
    -------
    geobox : GeoBox
    overlap : float
        Fraction of the AGB map's footprint that the satellite stack covers.

    Raises
    ------
    NoOverlapError
        The two footprints do not intersect.
    """
    if grid == "biomass":
        full = biomass
    elif grid == "satellite":
        full = satellite
    else:
        assert isinstance(grid, GridSpec)
        bbox = biomass.extent.to_crs(grid.crs).boundingbox
        full = GeoBox.from_bbox(bbox, crs=grid.crs, resolution=grid.resolution)
        _check_grid_size(full, (satellite, biomass), grid, site=site)
    crs = full.crs
    sat_ext = satellite.extent.to_crs(crs)
    agb_ext = biomass.extent.to_crs(crs)
    common = sat_ext.intersection(agb_ext).intersection(full.extent)
    overlap = 0.0 if common.is_empty else common.area / agb_ext.area
    if common.is_empty or overlap < 1e-6:
        raise NoOverlapError(
            f"site '{site}': the satellite stack ({_bounds(satellite)}) and the AGB map "
            f"({_bounds(biomass)}) do not overlap; check that both files cover the same area "
            "and carry the right CRS"
        )
    if overlap < 0.999:
        warnings.warn(
            f"site '{site}': the satellite stack covers only {overlap:.1%} of the AGB map; the "
            "cube is cropped to the overlap",
            UserWarning,
            stacklevel=2,
        )
    return _crop(full, common.boundingbox), overlap


def _check_grid_size(
    full: GeoBox, inputs: tuple[GeoBox, ...], grid: GridSpec, *, site: str
) -> None:
    """Refuse an explicit grid whose size betrays a unit mistake, before anything is planned.

    Only the shape is computed here (GeoBox arithmetic); a grid of 10^14 pixels would otherwise
    be planned chunk by chunk and never finish.
    """
    unit = full.crs.units[0] if full.crs is not None else "unit"
    finest = min(_pixel_area(g, full.crs) for g in inputs)  # in the grid's units, squared
    ny, nx = full.shape.yx
    upsampling = finest / grid.resolution**2  # target pixels per finest input pixel
    hint = (
        f"cube.grid.resolution is in the units of cube.grid.crs ({unit}); the finer input "
        f"raster's pixels are {math.sqrt(finest):.3g} {unit} wide"
    )
    if upsampling > MAX_UPSAMPLING:
        raise GridError(
            f"site '{site}': cube.grid resolution {grid.resolution:g} {unit} in {grid.crs} "
            f"gives a {ny}×{nx}-pixel grid, {upsampling:.3g} times more pixels than the finer "
            f"input raster has over the site. {hint}: give a resolution in {unit}"
        )
    if min(ny, nx) < 2:
        raise GridError(
            f"site '{site}': cube.grid resolution {grid.resolution:g} {unit} in {grid.crs} is "
            f"coarser than the site itself ({ny}×{nx} pixels). {hint}: give a resolution in "
            f"{unit}"
        )


def _bounds(gbox: GeoBox) -> str:
    b = gbox.boundingbox
    return f"{gbox.crs} [{b.left:.6g}, {b.bottom:.6g}, {b.right:.6g}, {b.top:.6g}]"


def _crop(gbox: GeoBox, bbox: Any) -> GeoBox:
    """The pixels of ``gbox`` whose area intersects ``bbox`` (same CRS), by slicing."""
    inv = ~gbox.affine
    cols, rows = zip(
        *(inv @ (x, y) for x in (bbox.left, bbox.right) for y in (bbox.bottom, bbox.top)),
        strict=True,
    )
    eps = 1e-6
    r0 = max(0, math.floor(min(rows) + eps))
    r1 = min(gbox.shape.y, math.ceil(max(rows) - eps))
    c0 = max(0, math.floor(min(cols) + eps))
    c1 = min(gbox.shape.x, math.ceil(max(cols) - eps))
    return gbox[r0:r1, c0:c1]


def _integer_offset(src: GeoBox, dst: GeoBox) -> tuple[int, int] | None:
    """Pixel offset (row, col) of ``dst`` inside ``src`` when only a whole-pixel shift differs."""
    if src.crs != dst.crs:
        return None
    a, b = src.affine, dst.affine
    if not np.allclose([a.a, a.b, a.d, a.e], [b.a, b.b, b.d, b.e], rtol=1e-9, atol=0):
        return None
    col, row = ~a @ (b.c, b.f)
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(row), round(col)


def _pixel_area(gbox: GeoBox, crs: Any) -> float:
    ext = gbox.extent.to_crs(crs)
    return ext.area / (gbox.shape.y * gbox.shape.x)


def align(da: xr.DataArray, src: GeoBox, dst: GeoBox, *, resampling: str) -> xr.DataArray:
    """Put a lazy ``(band, y, x)`` array onto ``dst``.

    Identical grids pass through, whole-pixel shifts are sliced (no resampling), anything else is
    reprojected chunk by chunk with odc-geo. ``resampling="bilinear"`` turns into ``"average"``
    when the target pixels are more than 1.5 times larger than the source's (coarsening).
    """
    offset = _integer_offset(src, dst)
    if offset is not None:
        r, c = offset
        ny, nx = dst.shape.yx
        pad_y = (max(0, -r), max(0, r + ny - src.shape.y))
        pad_x = (max(0, -c), max(0, c + nx - src.shape.x))
        out = da.isel(
            y=slice(max(0, r), min(src.shape.y, r + ny)),
            x=slice(max(0, c), min(src.shape.x, c + nx)),
        )
        if any(pad_y + pad_x):
            out = out.pad(y=pad_y, x=pad_x, constant_values=np.nan)
        return _with_grid(out.drop_vars(["x", "y", "spatial_ref"], errors="ignore"), dst)
    if resampling == "bilinear" and _pixel_area(dst, dst.crs) > 1.5 * _pixel_area(src, dst.crs):
        resampling = "average"
    out = xr_reproject(
        da,
        dst,
        resampling=resampling,
        src_nodata=np.nan,
        dst_nodata=np.nan,
        always_yx=True,
        chunks=(min(512, dst.shape.y), min(512, dst.shape.x)),
    )
    return _with_grid(out.drop_vars(["x", "y", "spatial_ref"], errors="ignore"), dst)


def _with_grid(da: xr.DataArray, gbox: GeoBox) -> xr.DataArray:
    da = da.assign_coords(xr_coords(gbox, crs_coord_name="spatial_ref", always_yx=True))
    da.attrs = {}
    da.encoding = {}
    return da


# --------------------------------------------------------------------------------------------
# one site


def same_inputs(
    paths: list[str], recorded: dict[str, dict[str, Any]] | None
) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Whether the inputs at ``paths`` (files or URLs) hold what they held when ``recorded``
    (their identities, as this returns them) was taken, and their identities now.

    A file's identity is its size, times, inode and a digest of its content. The digest is
    computed again only when the others changed: the change time cannot be set back (a file
    edited in place and given its old size and modification time has a new one), while a copy
    of the same bytes (a new inode and change time) keeps its digest. A URL's identity is the
    server's ETag, or a digest of its content where the server gives none
    (`agbcube._io.url_identity`); one that cannot be reached is not called changed (the
    build that reads it will say why). Without a record (a cube from before these were kept)
    the inputs are taken as they are.
    """
    recorded = recorded or {}
    urls = [p for p in paths if "://" in p]
    # the servers are asked at once: a STAC site reads hundreds of assets
    asked = dask.compute(*[dask.delayed(url_identity)(u) for u in urls], scheduler="threads")
    now = dict(zip(urls, asked, strict=True))
    now |= {p: _identity(Path(p), recorded.get(p)) for p in paths if "://" not in p}
    changed = [
        p
        for p in paths
        if now[p].get("digest")
        and recorded.get(p, {}).get("digest") not in (None, now[p]["digest"])
    ]
    return not changed, {p: now[p] for p in paths}


def _identity(path: Path, before: dict[str, Any] | None) -> dict[str, Any]:
    st = path.stat()
    stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    stat["inode"] = st.st_ino
    if before is not None and all(before.get(k) == v for k, v in stat.items()):
        return before
    return {**stat, "digest": file_digest(path)}


def _file_facts(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def site_provenance(
    site: SiteConfig, cube: CubeConfig, *, satellite: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a site's cube depends on; its ``key`` changes when any input or setting does.

    ``satellite`` describes a STAC source's answer (`agbcube.stac.StacPlan.facts`: the
    item ids and a key of their content); a file is described by its path, size and mtime.
    """
    if satellite is None:
        assert isinstance(site.satellite, Path)
        satellite = _file_facts(site.satellite)
    deps = {
        "format": CUBE_FORMAT,
        "satellite": satellite,
        "biomass": _file_facts(site.biomass),
        "site": site.model_dump(mode="json"),
        "cube": cube.model_dump(mode="json", exclude={"output"}),
    }
    return {"key": digest(deps), **deps, "versions": _versions()}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"agbcube": __version__}
    for pkg in ("xarray", "zarr", "dask", "numpy", "rioxarray", "rasterio", "odc-geo"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:  # pragma: no cover - all are dependencies
            continue
    return out


def build_site_cube(site: SiteConfig, cube: CubeConfig) -> xr.Dataset:
    """Build one site's cube lazily: aligned features with indices and masked AGB.

    Parameters
    ----------
    site : SiteConfig
        The raster pair and its band names and nodata overrides.
    cube : CubeConfig
        Grid, AGB range, indices and chunking.

    Returns
    -------
    xr.Dataset
        ``features (band, y, x)`` float32 and ``agb (y, x)`` float32, chunked for writing;
        nothing has been computed.

    Raises
    ------
    InputFileError, MissingCRSError, GridError, NoOverlapError, BandError
        Problems found from the file headers, before any pixel is read.
    """
    where = f"site '{site.name}'"
    agb_info = probe_raster(site.biomass, what=f"{where} biomass", crs=site.crs)
    if agb_info.count != 1:
        raise GridError(
            f"{where} biomass: {site.biomass} has {agb_info.count} bands; the AGB map must be a "
            "single band in Mg/ha"
        )
    if isinstance(site.satellite, StacSource):
        sat, gbox, overlap, extra = _stac_satellite(site, cube, agb_info)
    else:
        sat, gbox, overlap = _file_satellite(site, cube, agb_info)
        extra = {}
    names = [str(b) for b in sat["band"].values]
    specs = plan_indices(names, cube.indices, source=where)

    agb = open_raster(agb_info, nodata=site.biomass_nodata, chunk_px=cube.chunks)
    lo, hi = cube.agb_range
    agb = agb.where((agb > lo) & (agb <= hi))  # NaN compares False: non-finite goes too
    agb = align(agb, agb_info.geobox, gbox, resampling="average").isel(band=0, drop=True)

    # the units are read before chunking: a chunked coordinate would be computed to read
    raw_units = (
        list(map(str, sat.coords["band_units"].values)) if "band_units" in sat.coords else []
    )
    chunks = {"y": cube.chunks, "x": cube.chunks}
    sat = sat.chunk({"band": -1, **chunks})
    features = compute_indices(sat, specs, keep_bands=True)  # raw bands, then indices
    features = features.assign_coords(band=features["band"].astype(str))
    # each band's unit: the input file's where it states one, "1" for the indices
    n_raw = features.sizes["band"] - len(specs)
    units = (raw_units or [""] * n_raw) + ["1"] * len(specs)
    features = features.assign_coords(band_units=("band", units))
    features["band_units"].attrs.update(long_name="unit of each band ('' where not stated)")
    ds = xr.Dataset(
        {
            "features": features,
            "agb": agb.astype(np.float32).chunk(chunks),
        }
    )
    ds["agb"].attrs.update(units=AGB_UNITS, long_name="above-ground biomass")
    ds["features"].attrs.update(long_name="satellite bands and derived indices")
    ds = ds.rio.write_crs(gbox.crs.to_wkt(), grid_mapping_name="spatial_ref")
    ds = ds.rio.write_transform(gbox.affine)
    ds = cf_dataset(ds, geographic=gbox.crs.geographic, linear_units=linear_units(gbox.crs))
    inputs = [str(site.biomass), *extra.pop("input_files", [str(site.satellite)])]
    ds.attrs.update(
        site=site.name,
        n_raw_bands=len(names),
        overlap_fraction=round(float(overlap), 6),
        provenance=json.dumps(site_provenance(site, cube, satellite=extra.pop("facts", None))),
        input_files=json.dumps(inputs),  # whose content is checked (`same_inputs`)
        **extra,
    )
    return ds


def _file_satellite(
    site: SiteConfig, cube: CubeConfig, agb_info: RasterInfo
) -> tuple[xr.DataArray, GeoBox, float]:
    """A satellite GeoTIFF, lazily aligned onto the target grid, with its bands named."""
    where = f"site '{site.name}'"
    assert isinstance(site.satellite, Path)
    sat_info = probe_raster(site.satellite, what=f"{where} satellite", crs=site.crs)
    names = resolve_band_names(
        sat_info.count, sat_info.descriptions, site.bands, source=f"{where} ({site.satellite})"
    )
    gbox, overlap = target_geobox(sat_info.geobox, agb_info.geobox, cube.grid, site=site.name)
    sat = open_raster(sat_info, nodata=site.satellite_nodata, chunk_px=cube.chunks)
    sat = align(sat, sat_info.geobox, gbox, resampling="bilinear")
    units = [u or "" for u in sat_info.units] or [""] * len(names)
    return sat.assign_coords(band=names, band_units=("band", units)), gbox, overlap


def _stac_satellite(
    site: SiteConfig, cube: CubeConfig, agb_info: RasterInfo
) -> tuple[xr.DataArray, GeoBox, float, dict[str, Any]]:
    """Seasonal composites from a STAC source on the target grid (the AGB map's footprint).

    The catalogue is searched and checked here, before any pixel is read; the extra attrs carry
    the provenance facts (item ids) and the layers whose clear share is checked after writing.
    """

    assert isinstance(site.satellite, StacSource)
    if cube.grid == "satellite":
        raise GridError(
            f"site '{site.name}': cube.grid is 'satellite' but the satellite is a STAC source, "
            "which has no grid of its own; use grid: biomass or {crs, resolution}"
        )
    gbox, overlap = target_geobox(agb_info.geobox, agb_info.geobox, cube.grid, site=site.name)
    plan = stac.plan_composites(site.satellite, gbox, site=site.name)
    sat = _with_grid(stac.composite(plan, gbox, chunk_px=cube.chunks), gbox)
    extra = {
        "facts": plan.facts(),
        "stac_layers": json.dumps(stac.layer_labels(plan)),
        "input_files": plan.input_files(),
    }
    return sat, gbox, overlap, extra


# --------------------------------------------------------------------------------------------
# the store


def _write_root_meta(store: Path, meta: dict[str, Any]) -> None:
    import zarr

    root = zarr.open_group(store, mode="a", zarr_format=ZARR_FORMAT)
    root.attrs["agbcube"] = meta
    zarr.consolidate_metadata(store)


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    from numcodecs import Blosc

    # lz4 + byte shuffle: fast to decompress, which is what chip streaming pays for.
    codec = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)
    key = {"compressors": (codec,)}
    # the CF names (coordinates, grid_mapping) go to the attributes before this is applied
    cf = ("coordinates",)
    return {
        name: {
            **{k: v for k, v in ds[name].encoding.items() if k not in cf},
            **key,
            "chunks": ds[name].data.chunksize,
        }
        for name in ("features", "agb")
    }


EMPTY_BAND_FRACTION = 0.01  # a band with valid values at fewer pixels than this share is empty


def _agb_stats(agb: xr.DataArray) -> dict[str, Any]:
    valid = np.isfinite(agb)
    return {
        "n_valid_agb": valid.sum(),
        "agb_min": agb.min(),
        "agb_mean": agb.mean(),
        "agb_max": agb.max(),
    }


def _empty_bands(group: Path, max_chunks: int = 8) -> list[str]:
    """Bands valid at fewer than `EMPTY_BAND_FRACTION` of the pixels of a written group.

    Read back from the store, at most ``max_chunks`` chunk rows and columns spread over the
    site: a tenth of a second for a benchmark site, bounded for any size, where counting in the
    build's own pass cost a fifth of the build.
    """
    feats = xr.open_zarr(group, consolidated=False, zarr_format=ZARR_FORMAT)["features"]
    picks = {}
    for dim, chunks in zip(("y", "x"), feats.chunks[1:], strict=True):
        starts = np.cumsum((0, *chunks[:-1]))
        keep = np.unique(np.linspace(0, len(chunks) - 1, min(len(chunks), max_chunks)).round())
        picks[dim] = np.concatenate(
            [np.arange(starts[i], starts[i] + chunks[i]) for i in keep.astype(int)]
        )
    valid = feats.isel(picks).notnull().mean(("y", "x")).values
    return [str(b) for b in feats["band"].values[valid < EMPTY_BAND_FRACTION]]


def write_site(
    ds: xr.Dataset,
    store: str | Path,
    *,
    client: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute a site's lazy cube into ``store/<site>`` atomically.

    The data goes to a hidden temporary group, which is renamed into place only once every chunk
    is written; an existing group of the same name is replaced only then.

    A STAC Item then describes the group: ``<store>.stac/<site>.json``
    (`agbcube.stac.items.write_cube_item`).

    Returns
    -------
    dict
        Summary statistics of the site's valid AGB and the names of its empty bands (valid at
        fewer than 1 % of the pixels), also stored in the group's ``stats`` attr.

    Raises
    ------
    InputFileError
        An input raster cannot be read past its header (truncated or damaged).
    """
    import zarr

    store = Path(store)
    site = ds.attrs["site"]
    tmp = temporary_sibling(store / site, "tmp")
    try:
        delayed = ds.to_zarr(
            tmp,
            mode="w",
            compute=False,
            consolidated=False,
            zarr_format=ZARR_FORMAT,
            encoding=_encoding(ds),
        )
        stats = _agb_stats(ds["agb"])
        checks = clear_fraction_checks(ds)  # STAC sites: share of clear pixels per season
        try:
            _, *values = compute(
                delayed,
                *stats.values(),
                *checks.values(),
                client=client,
                progress=progress,
                label=f"building site '{site}'",
            )
        except RasterioError as err:
            raise _read_failure(site, json.loads(ds.attrs["provenance"]), err) from err
        stats = {k: _jsonable(v) for k, v in zip([*stats, *checks], values, strict=True)}
        if checks:
            clear = {k: stats.pop(k) for k in checks}
            stats["clear_fraction"] = clear
            warn_no_clear(site, clear)
        stats["empty_bands"] = _empty_bands(tmp)
        group = zarr.open_group(tmp, mode="a", zarr_format=ZARR_FORMAT)
        group.attrs["stats"] = json.dumps(stats)
        zarr.consolidate_metadata(tmp)
        replace_path(tmp, store / site, what=f"cube site '{site}'")
        write_cube_item(ds, store)  # a STAC Item of the group, beside the store
    finally:
        remove_path(tmp)
    return stats


def _read_failure(site: str, inputs: dict, err: Exception) -> InputFileError:
    """The error for rasters whose pixels failed to read: the file at fault, found by reading
    every block of each (a truncated or damaged file), or else all of them."""
    paths = [inputs.get(role, {}).get("path") for role in ("satellite", "biomass")]
    files = [str(p) for p in paths if p and Path(p).is_file()]
    culprit = next((f for f in files if not _every_block_reads(f)), None)
    if culprit is not None:
        return InputFileError(
            f"site '{site}': {culprit} is truncated or damaged (its header reads but some of "
            f"its pixel blocks do not: {err}); write or download it again, and check it with "
            "`gdalinfo -checksum`"
        )
    roles = ("satellite", "biomass")
    sources = [str(p or f"its {role} input") for p, role in zip(paths, roles, strict=True)]
    return InputFileError(
        f"site '{site}': reading its rasters failed after their headers were read ({err}); a "
        f"file is probably truncated or damaged: check {' and '.join(sources)} with "
        "`gdalinfo -checksum`"
    )


def _every_block_reads(path: str) -> bool:
    try:
        with rasterio.open(path) as src:
            for _, window in src.block_windows(1):
                src.read(window=window)
    except RasterioError:
        return False
    return True


def _jsonable(value: Any) -> Any:
    value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_cube(
    sites: list[SiteConfig],
    cube: CubeConfig,
    *,
    overwrite: bool = False,
    prune: bool = False,
    replace_changed: bool = True,
    scheduler: str = "threads",
    progress: bool = True,
    echo: Any = None,
) -> dict[str, dict[str, Any]]:
    """Build (or bring up to date) the Zarr cube of every site.

    Sites whose inputs, settings and stored files are unchanged since they were built are
    skipped unless ``overwrite``; each site is validated from its file headers before any site
    is computed. Sites of the cube that the list does not name are kept unless ``prune``.
    Progress goes to the ``agbcube.cube`` logger.

    Parameters
    ----------
    sites : list of SiteConfig
    cube : CubeConfig
    overwrite : bool
        Rebuild every site even when it is up to date.
    prune : bool
        Remove the cube's sites that ``sites`` does not name (CLI: ``--prune``).
    replace_changed : bool
        False: a site of the cube built from other inputs or settings is an error, not rebuilt
        (``predict --config`` must never replace a training site sharing the cube).
    scheduler : str
        Dask scheduler (see `agbcube._dask.dask_scheduler`).
    progress : bool
        Show a progress bar per site.
    echo : callable, optional
        Deprecated: receives the progress lines instead of the logger.

    Returns
    -------
    dict
        Per site: ``status`` ("built", "up to date"), ``shape``, ``bands``, AGB stats…

    Raises
    ------
    CubeError
        ``cube.output`` is not an agbcube cube, or a site would replace another (see above).
    """

    store = Path(cube.output)
    say = reporter(log, echo)
    # GDAL's block cache defaults to 5 % of RAM (13 GB on a 256 GB node) and made peak memory
    # grow; chunks are read once, so a small cache costs nothing. The user's setting wins.
    os.environ.setdefault("GDAL_CACHEMAX", "256")
    # Validate everything first: a bad third site must not fail after an hour on the first two.
    check_scheduler(scheduler)
    for site in sites:
        build_site_cube(site, cube).close()
    # Each site's lazy cube (open rasters and task graph, ~40 MB for a benchmark site) is planned
    # again when its turn comes and closed after it: memory stays flat in the number of sites.
    planned = {site.name: functools.partial(build_site_cube, site, cube) for site in sites}
    with output_lock(store, what="cube"), write_errors(store, what="cube"):
        meta = _existing_meta(store)
        if not replace_changed and not overwrite:
            _refuse_replacing(store, meta, sites, cube)
        _remove_leftovers(store)
        others = [name for name in meta["sites"] if name not in planned]
        meta["complete"] = False
        meta["expected_sites"] = [*planned, *([] if prune else others)]
        _write_root_meta(store, meta)
        results = {}
        with dask_scheduler(scheduler) as client:
            for name, plan in planned.items():
                with plan() as ds:
                    results[name] = _build_one(ds, store, meta, overwrite, client, progress)
                say(_build_message(name, results[name]))
                _warn_if_empty(name, results[name], cube)
        _prune_or_keep(store, meta, others, prune=prune, say=say)
        meta["complete"] = True
        _write_root_meta(store, meta)
    return results


def _existing_meta(store: Path) -> dict[str, Any]:
    """The root metadata of the cube at ``store``, or a new one; a foreign path is refused."""
    meta = root_meta(store)
    if meta is None and store.exists() and (not store.is_dir() or any(store.iterdir())):
        raise CubeError(
            f"cube.output {store} exists and is not an agbcube cube (no 'agbcube' attribute in "
            f"its root {store / '.zattrs'}); agbcube never writes into what it did not make: "
            "choose another path"
        )
    if meta is None:
        meta = {"format": CUBE_FORMAT, "sites": {}}
    meta.setdefault("files", {})
    meta.setdefault("inputs", {})
    return meta


def _refuse_replacing(
    store: Path, meta: dict[str, Any], sites: list[SiteConfig], cube: CubeConfig
) -> None:
    for site in sites:
        key = meta["sites"].get(site.name)
        if key is not None and key != site_provenance(site, cube)["key"]:
            raise CubeError(
                f"site '{site.name}' is already in cube {store}, built from other rasters or "
                "settings; it is never replaced from here (it may be a training site): give "
                "the new area's sites other names, or set cube.output to another store"
            )


def _prune_or_keep(
    store: Path, meta: dict[str, Any], others: list[str], *, prune: bool, say: Any
) -> None:
    """Remove the sites the config does not name (``prune``) or say that they are kept."""
    for name in others:
        if prune:
            remove_output(store / name, what=f"cube site '{name}'")
            meta["sites"].pop(name)
            meta["files"].pop(name, None)
            meta["inputs"].pop(name, None)
            say(f"site '{name}': not in the config, removed from the cube (--prune)")
        else:
            say(f"site '{name}': in the cube but not in the config; kept (--prune removes it)")


def _build_one(
    ds: xr.Dataset, store: Path, meta: dict[str, Any], overwrite: bool, client: Any, progress: bool
) -> dict[str, Any]:
    """Write one planned site unless it is up to date; record it in the root metadata."""
    name = ds.attrs["site"]
    key = json.loads(ds.attrs["provenance"])["key"]
    summary = {
        "shape": [int(ds.sizes["y"]), int(ds.sizes["x"])],
        "bands": int(ds.sizes["band"]),
        "indices": int(ds.sizes["band"]) - int(ds.attrs["n_raw_bands"]),
        "overlap": ds.attrs["overlap_fraction"],
    }
    # the inputs' identities, taken once: they decide "up to date" and are recorded with a build
    inputs = json.loads(ds.attrs.get("input_files", "[]"))
    same, identities = same_inputs(inputs, meta["inputs"].get(name))
    if not overwrite and meta["sites"].get(name) == key:
        # the files as written: a damaged or edited chunk (its size or mtime) is rebuilt
        recorded = meta["files"].get(name)
        if recorded is not None and recorded == folder_manifest(store / name) and same:
            meta["inputs"][name] = identities  # a copy of the same content, now recorded
            stats = json.loads(_site_attrs(store, name).get("stats", "{}"))
            return {"status": "up to date", **summary, **stats}
        if not same:
            log.warning(
                "site '%s': an input file was changed in place since the site was built (other "
                "content under the same name, size and modification time); rebuilding it",
                name,
            )
        elif recorded is None:
            log.info("site '%s': built by an earlier agbcube (no file record); rebuilding", name)
        else:
            log.warning(
                "site '%s': its files in %s changed since they were written (damaged or "
                "edited); rebuilding it",
                name,
                store / name,
            )
    stats = write_site(ds, store, client=client, progress=progress)
    meta["sites"][name] = key
    meta["files"][name] = folder_manifest(store / name)
    meta["inputs"][name] = identities
    _write_root_meta(store, meta)
    return {"status": "built", **summary, **stats}


def _build_message(name: str, result: dict[str, Any]) -> str:
    if result["status"] == "up to date":
        return f"site '{name}': up to date, skipped (--overwrite rebuilds)"
    return f"site '{name}': built {result['shape']} px, {result['bands']} bands"


def _warn_if_empty(name: str, result: dict[str, Any], cube: CubeConfig) -> None:
    """Warn about a site that cannot give a single chip: no AGB, or mostly empty bands."""
    if result.get("n_valid_agb", 1) == 0:
        warnings.warn(
            f"site '{name}': no valid AGB pixel on the cube's grid: every pixel is nodata, NaN "
            f"or outside cube.agb_range {list(cube.agb_range)} (low < AGB <= high, Mg/ha); "
            "check biomass_nodata, cube.agb_range and the AGB map's units",
            UserWarning,
            stacklevel=3,
        )
    empty = result.get("empty_bands") or []
    if len(empty) > result["bands"] / 2:
        shown = ", ".join(empty[:8]) + (", …" if len(empty) > 8 else "")
        warnings.warn(
            f"site '{name}': {len(empty)} of {result['bands']} feature bands are empty (valid at "
            f"fewer than {EMPTY_BAND_FRACTION:.0%} of the pixels: {shown}); check "
            "satellite_nodata and the satellite stack",
            UserWarning,
            stacklevel=3,
        )


def _remove_leftovers(store: Path) -> None:
    """Delete temporary groups left by an interrupted build."""
    if store.is_dir():
        for child in store.iterdir():
            if child.name.startswith(".") and (".tmp-" in child.name or ".old-" in child.name):
                remove_path(child)


def _site_attrs(store: Path, site: str) -> dict[str, Any]:
    import zarr

    return dict(zarr.open_group(store / site, mode="r").attrs)
