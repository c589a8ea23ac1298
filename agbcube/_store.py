"""Reading a cube: the sites of a store and a site's lazy dataset.

Kept apart from `agbcube.cube` (which builds cubes with rasterio, rioxarray and odc-geo,
hence GDAL) so that training needs only xarray, zarr and numcodecs to read a cube: a GPU machine
needs no GDAL.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xarray as xr

from agbcube._io import digest, writer_of
from agbcube.errors import AgbcubeError, CubeError

__all__ = [
    "cube_crs",
    "cube_site_keys",
    "cube_sites",
    "folder_manifest",
    "open_cube",
    "open_cube_tree",
    "site_read_errors",
]

ZARR_FORMAT = 2  # stores zarr-python 2 and 3, GDAL and every xarray since 2023 read
# (written with zarr-python 3: pyproject.toml says why)


def root_meta(store: Path) -> dict[str, Any] | None:
    """The cube's root ``agbcube`` attribute, read from ``.zattrs`` (no consolidated metadata
    needed, so a cube whose ``.zmetadata`` was lost is still recognised and repaired)."""
    try:
        attrs = json.loads((Path(store) / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    meta = attrs.get("agbcube") if isinstance(attrs, dict) else None
    return dict(meta) if isinstance(meta, dict) else None


def folder_manifest(folder: Path) -> str | None:
    """A digest of every file under ``folder`` (relative path, size, mtime); None if absent.

    Recorded when a site is written; a chunk damaged or edited since changes it, so
    ``build-cube`` rebuilds the site instead of calling it up to date. A stat per file: cheap
    next to reading the chunks.
    """
    if not folder.is_dir():
        return None
    entries = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            rel = os.path.relpath(os.path.join(root, name), folder)
            entries.append((rel, st.st_size, st.st_mtime_ns))
    return digest(sorted(entries))


@contextlib.contextmanager
def site_read_errors(store: str | Path | None, site: str) -> Iterator[None]:
    """Turn a failure to read or decode a cube site's data into a `CubeError` naming it.

    Zarr and its codecs report a damaged chunk as ``RuntimeError: error during blosc
    decompression: -1`` and the like, naming neither the store nor the site.
    """
    try:
        yield
    except AgbcubeError:
        raise
    except (RuntimeError, ValueError, OSError, KeyError) as err:
        where = f"cube {store}, site '{site}'" if store is not None else f"cube site '{site}'"
        raise CubeError(
            f"{where}: its data cannot be read ({type(err).__name__}: {err}); the store is "
            "damaged or was changed by hand: run `agbcube build-cube CONFIG`, which rebuilds "
            "damaged sites, then `agbcube folds CONFIG`"
        ) from err


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
    meta = root_meta(store)
    if meta is None:
        raise CubeError(f"{store} is not an agbcube cube (no 'agbcube' attribute in its root)")
    if not meta.get("complete"):
        if building := writer_of(store, what="cube"):
            raise CubeError(f"{building} Run this again once `agbcube build-cube` has finished.")
        raise CubeError(
            f"cube {store} is incomplete (its build was interrupted); re-run "
            "`agbcube build-cube <config>` to finish it"
        )
    return [s for s in meta.get("expected_sites", []) if s in meta["sites"]]


def cube_site_keys(store: str | Path) -> dict[str, str]:
    """Each site's build key (a digest of its inputs and settings) in a complete cube.

    Folds record these keys (see `agbcube.folds.check_folds_cube`): a site rebuilt from
    other inputs or settings since the folds were cut has another key.
    """
    sites = cube_sites(store)
    meta = root_meta(Path(store)) or {}
    return {s: str(meta["sites"][s]) for s in sites}


def open_cube(store: str | Path, site: str, *, chunks: Any = "auto") -> xr.Dataset:
    """Open one site of a cube lazily.

    Parameters
    ----------
    store : str or Path
        The Zarr store written by `build_cube`.
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
    if not (Path(store) / ".zmetadata").is_file():
        raise CubeError(
            f"cube {store} has lost its consolidated metadata ({Path(store) / '.zmetadata'}); "
            "run `agbcube build-cube CONFIG` on it to restore it"
        )
    with contextlib.suppress(ImportError):  # the .rio accessor users expect; not for training
        import rioxarray  # noqa: F401

    with site_read_errors(store, site):
        ds = _open_site(Path(store), site, chunks)
    return ds.set_coords([v for v in ("spatial_ref",) if v in ds.data_vars])


def _open_site(store: Path, site: str, chunks: Any) -> xr.Dataset:
    if chunks is None:
        # no Dask and no in-memory cache: a slice read for one task must not stay behind
        ds = xr.open_dataset(
            store,
            engine="zarr",
            group=site,
            consolidated=True,
            zarr_format=ZARR_FORMAT,
            chunks=None,
            cache=False,
        )
    else:
        ds = xr.open_zarr(
            Path(store), group=site, consolidated=True, zarr_format=ZARR_FORMAT, chunks=chunks
        )
    return ds


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
