"""Writing maps: the Zarr store tile by tile, the COGs, the quick looks."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from agbcube._cf import AGB_UNITS
from agbcube._dask import compute
from agbcube._io import (
    atomic_path,
    output_lock,
    prepare_output_dir,
    remove_path,
    replace_path,
    temporary_sibling,
    write_json_atomic,
    written_by,
)
from agbcube._log import reporter
from agbcube._plot import label_projected, new_figure, raster_extent, save_figure
from agbcube.predict.layers import LAYER_INFO
from agbcube.predict.windows import chunk_offsets
from agbcube.stac.items import map_item, write_map_item

log = logging.getLogger(__name__)


def write_maps(
    maps: xr.Dataset,
    output: str | Path,
    *,
    client: Any = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> list[Path]:
    """Compute the maps tile by tile into ``output/maps.zarr``, then write COGs and PNGs.

    Tiles are written into ``output/maps.zarr.partial`` as they finish, each followed by a
    marker; the store is renamed to ``maps.zarr`` only when every tile is in. A write that was
    interrupted resumes: when ``maps.attrs["key"]`` (set by `predict_run`) matches the
    partial store's, only the missing tiles are computed; otherwise it starts over. One writer
    per output: a second one is refused (`OutputLockedError`).

    Each layer then becomes ``output/<layer>.tif`` (Cloud-Optimised GeoTIFF, deflate with the
    floating-point predictor, overviews, the band's description and unit; nodata NaN for
    floats, 255 for the AOA mask), written window by window, and ``output/<layer>.png`` (a
    quick look). Last comes ``output/item.json``, a STAC Item of the COGs
    (`agbcube.stac.items.map_item`). Memory stays bounded by the tile size throughout.
    Progress goes to the ``agbcube.predict`` logger (``echo`` is deprecated).

    Returns
    -------
    list of Path
        ``maps.zarr``, every COG and PNG, and ``item.json``.

    Raises
    ------
    OutputExistsError
        ``output`` is a file, or a folder holding files agbcube did not write.
    """

    output = Path(output)
    say = reporter(log, echo)
    zpath = output / "maps.zarr"
    # GDAL's block cache (5 % of RAM by default) would grow with the map while the COG driver
    # builds overviews; as in build_cube, a small one costs nothing. The user's setting wins.
    os.environ.setdefault("GDAL_CACHEMAX", "256")
    site, run = str(maps.attrs.get("site") or output.name), maps.attrs.get("run")
    prepare_output_dir(output, kind="maps", what="maps output")
    with output_lock(zpath, what="maps"):
        _write_tiles(maps, zpath, client=client, progress=progress, say=say)
        written = [zpath]
        stored = xr.open_zarr(zpath, consolidated=True, zarr_format=2)
        crs, transform = maps.rio.crs, maps.rio.transform()
        layers = _layers_of(stored)
        for name in layers:
            tif, png = output / f"{name}.tif", output / f"{name}.png"
            _write_cog(stored[name], tif, crs=crs, transform=transform, info=LAYER_INFO[name])
            fig = quicklook(stored[name], name, site=site, run=run, transform=transform, crs=crs)
            save_figure(fig, png, tight=True)
            written += [tif, png]
            say(f"wrote {tif} and {png.name}")
        meta = {"layers": layers, "attrs": {k: str(v) for k, v in maps.attrs.items()}}
        write_json_atomic(output / "maps.json", meta)
        item = map_item(
            output,
            site=site,
            run=run,
            layers={name: LAYER_INFO[name] for name in layers},
            shape=(stored.sizes["y"], stored.sizes["x"]),
            transform=transform,
            crs=crs.to_wkt(),
            statistics=_statistics(stored, layers),
        )
        written.append(write_map_item(item, output))
    return written


def _statistics(stored: xr.Dataset, layers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Minimum, maximum, mean and valid share of each layer (raster extension statistics)."""
    import dask

    todo = {
        name: (stored[name].min(), stored[name].max(), stored[name].mean(), stored[name].count())
        for name in layers
    }
    (done,) = dask.compute(todo)
    size = stored.sizes["y"] * stored.sizes["x"]
    out = {}
    for name, (lo, hi, mean, count) in done.items():
        if int(count) == 0:
            continue
        out[name] = {
            "minimum": float(lo),
            "maximum": float(hi),
            "mean": float(mean),
            "valid_percent": round(100.0 * int(count) / size, 3),
        }
    return out


def _layers_of(ds: xr.Dataset) -> list[str]:
    return [v for v in ds.data_vars if v != "spatial_ref"]


def _write_tiles(
    maps: xr.Dataset, zpath: Path, *, client: Any, progress: bool, say: Callable[[str], None]
) -> None:
    """Every tile of ``maps`` into ``zpath`` through a resumable partial store."""
    import dask
    import dask.array as dsa
    import zarr

    layers = _layers_of(maps)
    partial = zpath.with_name(zpath.name + ".partial")
    marks = zpath.with_name(f".{zpath.name}.tiles")
    key = maps.attrs.get("key")
    chunks = (maps[layers[0]].chunks[0], maps[layers[0]].chunks[1])
    done: set[str] = set()
    if partial.exists() and key is not None and _partial_key(partial) == key:
        done = {p.name for p in marks.glob("*")} if marks.exists() else set()
        say(f"resuming {partial}: {len(done)} tile(s) already written")
    else:
        remove_path(partial)
        remove_path(marks)
        encoding = {v: {"chunks": (chunks[0][0], chunks[1][0])} for v in layers}
        template = maps.copy()
        template.attrs["agbcube_partial_key"] = key or ""
        template.to_zarr(partial, mode="w", compute=False, zarr_format=2, encoding=encoding)
    marks.mkdir(exist_ok=True)
    stacked = dsa.stack([maps[v].data for v in layers]).rechunk({0: -1})
    blocks = stacked.to_delayed(optimize_graph=True)[0]
    y_off, x_off = chunk_offsets(chunks[0]), chunk_offsets(chunks[1])
    tasks = []
    for iy, r0 in enumerate(y_off):
        for ix, c0 in enumerate(x_off):
            name = f"{iy}_{ix}"
            if name in done:
                continue
            region = (
                slice(int(r0), int(r0) + chunks[0][iy]),
                slice(int(c0), int(c0) + chunks[1][ix]),
            )
            tasks.append(
                dask.delayed(_store_tile, pure=False)(
                    blocks[iy, ix], str(partial), layers, region, str(marks / name)
                )
            )
    if tasks:
        site = maps.attrs.get("site", "")
        compute(*tasks, client=client, progress=progress, label=f"predicting site '{site}'")
    # complete: the resume key goes; what marks the store as agbcube's maps stays
    attrs = zarr.open_group(str(partial), mode="r+", zarr_format=2).attrs
    attrs.update(agbcube_maps=written_by())
    del attrs["agbcube_partial_key"]
    zarr.consolidate_metadata(str(partial), zarr_format=2)
    replace_path(partial, zpath)
    remove_path(marks)


def _partial_key(partial: Path) -> str | None:
    import zarr

    try:
        return zarr.open_group(str(partial), mode="r", zarr_format=2).attrs.get(
            "agbcube_partial_key"
        )
    except Exception:  # an unreadable leftover is simply started over
        return None


def _store_tile(
    tile: np.ndarray, store: str, layers: Sequence[str], region: tuple[slice, slice], mark: str
) -> int:
    """Write one computed tile into every layer of the partial store, then its marker."""
    import zarr

    for i, name in enumerate(layers):
        arr = zarr.open_array(f"{store}/{name}", mode="r+", zarr_format=2)
        arr[region] = tile[i].astype(arr.dtype)
    Path(mark).touch()
    return 1


def _write_cog(
    layer: xr.DataArray,
    path: Path,
    *,
    crs: Any,
    transform: Any,
    info: dict[str, Any],
    block: int = 512,
) -> None:
    """A Cloud-Optimised GeoTIFF of a lazily opened layer, written window by window.

    The layer goes into a tiled GeoTIFF a block of rows at a time, which GDAL's COG driver
    then copies with overviews; neither step holds the layer in memory. The band carries the
    layer's description and unit (``info``, from `LAYER_INFO`), which the copy keeps.
    """
    import rasterio
    import rasterio.shutil
    from rasterio.windows import Window

    ny, nx = layer.sizes["y"], layer.sizes["x"]
    dtype, nodata = np.dtype(info["dtype"]), info["nodata"]
    mask = dtype.kind == "u"
    profile = {
        "driver": "GTiff",
        "height": ny,
        "width": nx,
        "count": 1,
        "dtype": dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "BIGTIFF": "IF_SAFER",
    }
    plain = temporary_sibling(path, "plain")
    try:
        with rasterio.open(plain, "w", **profile) as dst:
            for r0 in range(0, ny, block):
                rows = layer.isel(y=slice(r0, r0 + block)).values
                if mask:
                    rows = np.where(np.isfinite(rows), rows, nodata)
                dst.write(rows.astype(dtype), 1, window=Window(0, r0, nx, rows.shape[0]))
            dst.set_band_description(1, info["title"])
            if info.get("unit"):
                dst.set_band_unit(1, info["unit"])
            dst.update_tags(1, DESCRIPTION=info["description"])
            if "colormap" in info:
                dst.write_colormap(1, info["colormap"])
                dst.update_tags(1, **{f"CLASS_{v}": n for v, n in info["classes"].items()})
        with atomic_path(path) as tmp:
            rasterio.shutil.copy(
                plain,
                tmp,
                driver="COG",
                COMPRESS="DEFLATE",
                # horizontal differencing of floats (TIFF predictor 3): smaller COGs
                PREDICTOR="STANDARD" if mask else "FLOATING_POINT",
                BLOCKSIZE=128,
                OVERVIEW_RESAMPLING="NEAREST" if mask else "AVERAGE",
                BIGTIFF="IF_SAFER",
            )
    finally:
        remove_path(plain)


def quicklook(
    da: xr.DataArray,
    name: str,
    *,
    site: str,
    run: str | None = None,
    transform: Any = None,
    crs: Any = None,
    max_px: int = 1000,
) -> Any:
    """A quick-look figure of a map layer, decimated to at most ``max_px`` a side as it is read.

    The colour bar carries the layer's unit; with ``transform`` and ``crs`` the axes show
    projected coordinates. Returns a ``matplotlib.figure.Figure`` (no pyplot state).
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap

    info = LAYER_INFO[name]
    step = max(1, int(np.ceil(max(da.sizes["y"], da.sizes["x"]) / max_px)))
    small = da.isel(y=slice(None, None, step), x=slice(None, None, step)).values
    fig = new_figure((6.4, 5.2))
    ax = fig.subplots()
    extent = None if transform is None else raster_extent(transform, da.shape)
    if name == "aoa":
        cmap = ListedColormap(["#d7301f", "#1a9850"])
        im = ax.imshow(small, cmap=cmap, norm=BoundaryNorm([-0.5, 0.5, 1.5], 2), extent=extent)
        bar = fig.colorbar(im, ax=ax, shrink=0.8, ticks=[0, 1])
        bar.ax.set_yticklabels(["outside", "inside"])
        bar.set_label("area of applicability")
    else:
        im = ax.imshow(small, cmap=info["cmap"], extent=extent)
        unit = {"1": "unitless", AGB_UNITS: "Mg/ha"}.get(info["unit"], info["unit"])  # for eyes
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.set_label(f"{info['title']} ({unit})")
    if extent is not None and crs is not None:
        label_projected(ax, crs)
    else:
        ax.set_axis_off()
    ax.set_title(f"{site}: {info['title']}" + (f"\nrun '{run}'" if run else ""), fontsize=10)
    return fig
