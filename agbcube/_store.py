"""Reading a cube: the sites of a store and a site's lazy dataset.

Kept apart from :mod:`agbcube.cube` (which builds cubes with rasterio, rioxarray and odc-geo,
hence GDAL) so that training needs only xarray, zarr and numcodecs to read a cube: a GPU machine
needs no GDAL.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import xarray as xr

from agbcube.errors import CubeError

__all__ = ["cube_crs", "cube_sites", "open_cube", "open_cube_tree"]

_ZARR_FORMAT = 2  # read by zarr-python 2 and 3, GDAL and every xarray since 2023


def _root_meta(store: Path) -> dict[str, Any] | None:
    import zarr

    try:
        root = zarr.open_group(store, mode="r")
    except (FileNotFoundError, ValueError, KeyError):  # zarr's GroupNotFoundError is both
        return None
    meta = root.attrs.get("agbcube")
    return dict(meta) if isinstance(meta, dict) else None


def cube_sites(store: str | Path) -> list[str]:
    """The sites of a complete cube, in build order.

    Raises
    ------
    CubeError
        Missing store, not an agbcube cube, or an unfinished build.
    """
    store = Path(store)
    if not store.exists():
        raise CubeError(f"cube {store} does not exist; run `agbcube build-cube <config>` first")
    meta = _root_meta(store)
    if meta is None:
        raise CubeError(f"{store} is not an agbcube cube (no 'agbcube' attribute in its root)")
    if not meta.get("complete"):
        raise CubeError(
            f"cube {store} is incomplete (its build was interrupted); re-run "
            "`agbcube build-cube <config>` to finish it"
        )
    return [s for s in meta.get("expected_sites", []) if s in meta["sites"]]


def open_cube(store: str | Path, site: str, *, chunks: Any = "auto") -> xr.Dataset:
    """Open one site of a cube lazily.

    Parameters
    ----------
    store : str or Path
        The Zarr store written by :func:`build_cube`.
    site : str
        The site's name.
    chunks : "auto", dict or None
        Dask chunks (default: the store's); ``None`` opens without Dask and without xarray's
        in-memory cache: variables stay lazily indexed, and a slice reads only its own window
        from the store each time its values are used.

    Returns
    -------
    xr.Dataset
        ``features (band, y, x)``, ``agb (y, x)``, with the CRS (``ds.rio.crs``).
    """
    names = cube_sites(store)
    if site not in names:
        raise CubeError(f"cube {store} has no site {site!r}; its sites: {names}")
    with contextlib.suppress(ImportError):  # the .rio accessor users expect; not for training
        import rioxarray  # noqa: F401

    if chunks is None:
        # no Dask and no in-memory cache: a slice read for one task must not stay behind
        ds = xr.open_dataset(
            Path(store),
            engine="zarr",
            group=site,
            consolidated=True,
            zarr_format=_ZARR_FORMAT,
            chunks=None,
            cache=False,
        )
    else:
        ds = xr.open_zarr(
            Path(store), group=site, consolidated=True, zarr_format=_ZARR_FORMAT, chunks=chunks
        )
    return ds.set_coords([v for v in ("spatial_ref",) if v in ds.data_vars])


def open_cube_tree(store: str | Path) -> xr.DataTree:
    """Open a whole cube as a DataTree with one child per site."""
    cube_sites(store)
    return xr.open_datatree(Path(store), engine="zarr", consolidated=True)


def cube_crs(ds: xr.Dataset) -> str:
    """A site's CRS as WKT, read from its ``spatial_ref`` variable (no rioxarray needed)."""
    if "spatial_ref" in ds.coords or "spatial_ref" in ds.variables:
        attrs = ds["spatial_ref"].attrs
        for key in ("crs_wkt", "spatial_ref"):
            if attrs.get(key):
                return str(attrs[key])
    crs = ds.rio.crs if hasattr(ds, "rio") else None
    if crs is None:
        raise CubeError("this cube site has no CRS (no spatial_ref variable with crs_wkt)")
    return crs.to_wkt()
