"""Tiled prediction of one site: the Dask graph of tiles, each reading its own window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask
import dask.array as dsa
import numpy as np
import xarray as xr

from agbcube._cf import AGB_UNITS, cf_dataset, linear_units
from agbcube._store import site_read_errors
from agbcube.errors import BandError
from agbcube.predict.aoa import AOAReference, nearest, standardise
from agbcube.predict.layers import LAYER_INFO, LAYERS
from agbcube.predict.models import EnsembleFile
from agbcube.predict.windows import (
    TileSpec,
    axis_chunks,
    blend,
    canvas,
    chunk_offsets,
    default_block,
    windows_touching,
)
from agbcube.train.readers import lonlat_of

# --------------------------------------------------------------------------------------------
# tiled prediction of one block


class _Window:
    """A site's features over one tile's read region, read inside the tile's own task.

    Holding the lazy array in a plain object (not a Dask collection Dask would traverse) keeps
    the read out of the task graph: otherwise the scheduler reads input chunks ahead of the
    slow prediction tasks and keeps the chunks neighbouring tiles share in memory, so memory
    grew with the site. Here a task holds only its own window, and memory stays flat.
    """

    __slots__ = ("data", "site")

    def __init__(self, data: xr.DataArray, site: str = "") -> None:
        self.data = data
        self.site = site

    def read(self) -> np.ndarray:
        # a Dask-backed input is computed here, in this task, never on a cluster from inside it
        with dask.config.set(scheduler="synchronous"), site_read_errors(None, self.site):
            return np.asarray(self.data.values, dtype=np.float32)


def _without_cache(da: xr.DataArray) -> xr.DataArray:
    """The same lazy array minus xarray's in-memory cache (``open_*(..., cache=True)``).

    A cached slice keeps what its task read for as long as the graph lives: every tile's input
    would stay in memory until the whole site is done.
    """
    data = getattr(da.variable, "_data", None)
    if type(data).__name__ == "MemoryCachedArray" and hasattr(data, "array"):
        return da.copy(data=data.array)
    return da


def _predict_tile(
    source: _Window | np.ndarray,
    members: Sequence[tuple[Any, ...]] | EnsembleFile,
    aoa: AOAReference | None,
    *,
    top: int,
    left: int,
    offset: tuple[int, int],
    core: tuple[int, int],
    spec: TileSpec,
    xy: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Predict one tile (the core): ``(len(LAYERS), core_y, core_x)`` float32.

    ``source`` holds the features of global rows ``top:`` and columns ``left:``, covering
    every window of the global grid that touches the core (and the core itself) with the
    models' margin; ``xy`` the x and y coordinates of those columns and rows, when the models
    take lon/lat channels; ``members`` the models, or their file, loaded here once per process
    on ``spec.device``.
    """
    if isinstance(members, EnsembleFile):
        members, _, device = members.load(spec.device)
        spec = replace(spec, device=device)
    feats = source.read() if isinstance(source, _Window) else np.asarray(source, np.float32)
    r0, c0 = offset
    ny, nx = core
    ys = windows_touching(spec.shape[0], spec.window, spec.stride, r0, ny)
    xs = windows_touching(spec.shape[1], spec.window, spec.stride, c0, nx)
    if spec.crs is not None and xy is not None:
        feats = np.concatenate([feats, lonlat_of(*xy, spec.crs)])
    feats = canvas(feats, (top, left), ys, xs, spec)
    per_model = np.stack([blend(m, feats, ys, xs, offset, core, spec) for m in members])
    out = np.full((len(LAYERS), ny, nx), np.nan, np.float32)
    out[0] = per_model.mean(axis=0)
    out[1] = per_model.std(axis=0) if len(members) > 1 else 0.0
    out[4] = fold_spread(per_model, spec.member_folds)
    oy, ox = int(ys[0]) - spec.reach_px, int(xs[0]) - spec.reach_px
    core_feats = feats[: spec.n_features, r0 - oy : r0 - oy + ny, c0 - ox : c0 - ox + nx]
    if aoa is not None:
        flat = np.moveaxis(core_feats, 0, -1).reshape(-1, spec.n_features)
        di = nearest(standardise(flat, aoa.mean, aoa.std), aoa.points) / aoa.mean_distance
        out[2] = di.reshape(ny, nx)
        out[3] = (out[2] <= aoa.threshold).astype(np.float32)
    out[:, np.isnan(core_feats).all(axis=0)] = np.nan
    return out


def fold_spread(per_model: np.ndarray, folds: Sequence[int | None] | None) -> np.ndarray:
    """The spread of a fold ensemble: the s.d. of each fold's members (as the CV measured and
    calibrated it), averaged over the folds with two or more members; 0 without any. All the
    members are one fold when ``folds`` is None."""
    groups: dict[Any, list[int]] = {}
    for i, fold in enumerate(folds if folds is not None else [None] * len(per_model)):
        groups.setdefault(fold, []).append(i)
    spreads = [per_model[idx].std(axis=0) for idx in groups.values() if len(idx) > 1]
    return np.mean(spreads, axis=0) if spreads else np.zeros(per_model.shape[1:], np.float32)


class _Decode:
    """Turns a model's output into Mg/ha when a member has no target transform of its own."""

    def __init__(self, log_target: bool) -> None:
        self.log_target = log_target

    def decode(self, out: np.ndarray) -> np.ndarray:
        return np.expm1(out) if self.log_target else out


def predict_site(
    ds: xr.Dataset,
    models: Sequence[tuple[Any, ...]] | str | Path,
    *,
    window_px: int,
    stride_px: int | None = None,
    coordinates: bool = False,
    log_target: bool = True,
    tta: int = 1,
    device: str = "cpu",
    aoa: AOAReference | None = None,
    bands: Sequence[str] | None = None,
    block_px: int | None = None,
    reach_px: int = 0,
    member_folds: Sequence[int | None] | None = None,
) -> xr.Dataset:
    """Lazily predict every pixel of a site's cube.

    Parameters
    ----------
    ds : xr.Dataset
        The site's cube (``features (band, y, x)``, CRS). Best opened without Dask
        (``open_cube(store, site, chunks=None)``): each tile task then reads just its own window
        from the store. A Dask-backed or in-memory cube works too.
    models : list of (torch.nn.Module, Standardiser[, TargetTransform]), or str or Path
        The ensemble members; the target transform turns outputs into Mg/ha (without one,
        ``log_target`` decides). Or a run's ``ensemble.pt``, which each process computing tiles
        (a Dask worker) loads once, on ``device`` as it resolves there.
    window_px : int
        Window side (the chip size for the chip head; any size for the dense head).
    stride_px : int, optional
        Window stride (default: a quarter window).
    coordinates : bool
        Append lon/lat channels (as the models were trained).
    log_target : bool
        The models predict ``log1p(AGB)`` (members without a target transform only).
    tta : int
        Dihedral transforms averaged per window.
    device : str
        Torch device for the models (``auto``: each process's own, with an ensemble file).
    aoa : AOAReference, optional
        When given, the ``di`` and ``aoa`` layers are computed.
    bands : list of str, optional
        The bands the models expect, in order; a mismatch raises `BandError`.
    block_px : int, optional
        Tile (Dask block and output chunk) side; a task holds ``bands × (block + 2 window)² × 4``
        bytes of input. Default 512, less for a small site, to split it into 2 × 2 tiles.
    reach_px : int
        Context the models consume around each window (their convolutions' reach); NaN
        beyond the site.
    member_folds : list of int, optional
        Each member's fold, for ``agb_spread`` (the spread within a fold's members, which the
        run's intervals are calibrated on); default all one fold.

    Returns
    -------
    xr.Dataset
        ``agb_mean``, ``agb_std``, ``di``, ``aoa`` (y, x) float32, dask-backed, with the CRS;
        one Dask chunk per tile.
    """
    feats = _site_features(ds, bands)
    shape = (feats.sizes["y"], feats.sizes["x"])
    spec = TileSpec(
        shape=shape,
        window=window_px,
        stride=stride_px or max(1, window_px // 4),
        tta=tta,
        device=device,
        n_features=feats.sizes["band"],
        crs=ds.rio.crs.to_wkt() if coordinates else None,
        reach_px=reach_px,
        member_folds=None if member_folds is None else tuple(member_folds),
    )
    members_d = _members_in_graph(models, log_target)
    # one graph key, so a cluster ships the AOA reference once per worker
    aoa_d = dask.delayed(aoa, traverse=False) if aoa is not None else None
    block_px = block_px or default_block(shape, window_px)
    tiles = _tiles(feats, spec, (members_d, aoa_d), block_px, str(ds.attrs.get("site", "site")))
    return _maps_dataset(ds, tiles, aoa)


def _members_in_graph(models: Sequence[tuple[Any, ...]] | str | Path, log_target: bool) -> Any:
    """The ensemble as the tile tasks carry it: its file (a few bytes in every task), or the
    members as one graph key (a cluster ships them once per worker)."""
    if isinstance(models, str | Path):
        return EnsembleFile.of(models)
    members = [(m[0], m[1], m[2] if len(m) > 2 else _Decode(log_target)) for m in models]
    return dask.delayed(members, traverse=False)


def _site_features(ds: xr.Dataset, bands: Sequence[str] | None) -> xr.DataArray:
    """The site's features, restricted to and ordered as ``bands`` when given (checked)."""
    have = [str(b) for b in ds["band"].values]
    feats = ds["features"]
    if bands is not None:
        check_bands(have, list(bands), site=str(ds.attrs.get("site", "site")))
        feats = feats.isel(band=_band_index(have, list(bands)))
    return feats.drop_vars([c for c in feats.coords if c not in feats.dims])


def _tiles(
    feats: xr.DataArray, spec: TileSpec, shared: tuple[Any, Any], block_px: int, site: str
) -> Any:
    """The map as a Dask array ``(len(LAYERS), y, x)``: one delayed `_predict_tile` per tile, each
    given the windows touching its core with their margin (``shared``: the members' and the
    AOA reference's graph keys; ``site`` names the site in read errors)."""
    # a cube already in memory is sliced here; a lazy one is read by each tile's task
    loaded = feats.chunks is None and getattr(feats.variable, "_in_memory", False)
    x, y = feats["x"].values, feats["y"].values
    (ny_all, nx_all), window, reach_px = spec.shape, spec.window, spec.reach_px
    ychunks, xchunks = axis_chunks(ny_all, block_px), axis_chunks(nx_all, block_px)
    rows = []
    for r0, ny in zip(chunk_offsets(ychunks), ychunks, strict=True):
        ys = windows_touching(ny_all, window, spec.stride, int(r0), ny)
        top, bottom = max(0, int(ys[0]) - reach_px), min(ny_all, int(ys[-1]) + window + reach_px)
        row = []
        for c0, nx in zip(chunk_offsets(xchunks), xchunks, strict=True):
            xs = windows_touching(nx_all, window, spec.stride, int(c0), nx)
            left = max(0, int(xs[0]) - reach_px)
            right = min(nx_all, int(xs[-1]) + window + reach_px)
            region = feats.isel(y=slice(top, bottom), x=slice(left, right))
            source = region.values if loaded else _Window(_without_cache(region), site)
            tile = dask.delayed(_predict_tile, pure=False)(
                source,
                *shared,
                top=top,
                left=left,
                offset=(int(r0), int(c0)),
                core=(ny, nx),
                spec=spec,
                xy=(x[left:right], y[top:bottom]) if spec.crs is not None else None,
            )
            row.append(dsa.from_delayed(tile, shape=(len(LAYERS), ny, nx), dtype=np.float32))
        rows.append(row)
    return dsa.block(rows)


def _maps_dataset(ds: xr.Dataset, tiles: Any, aoa: AOAReference | None) -> xr.Dataset:
    """The layers of ``tiles`` as a Dataset on the site's grid, with units and the CRS."""
    import rioxarray  # noqa: F401

    coords = {k: ds.coords[k] for k in ("y", "x", "spatial_ref") if k in ds.coords}
    result = xr.Dataset(
        {name: (("y", "x"), tiles[i]) for i, name in enumerate(LAYERS)}, coords=coords
    )
    if aoa is None:
        result = result.drop_vars(["di", "aoa"])
    result["agb_mean"].attrs.update(units=AGB_UNITS, long_name="AGB, ensemble mean")
    result["agb_std"].attrs.update(units=AGB_UNITS, long_name="AGB, ensemble standard deviation")
    result["agb_spread"].attrs.update(units=AGB_UNITS, long_name=LAYER_INFO["agb_spread"]["title"])
    if aoa is not None:
        result["di"].attrs.update(long_name="dissimilarity index", threshold=aoa.threshold)
        result["aoa"].attrs.update(long_name="area of applicability (1 inside, 0 outside)")
    result.attrs["site"] = str(ds.attrs.get("site", ""))
    crs = ds.rio.crs
    result = result.rio.write_crs(crs)
    return cf_dataset(result, geographic=crs.is_geographic, linear_units=linear_units(crs))


def _band_index(have: list[str], want: list[str]) -> slice | list[int]:
    """Positions of ``want`` in ``have``: a slice when they are a run (Zarr reads a slice of
    bands about twice as fast as the same bands picked by a list)."""
    idx = [have.index(b) for b in want]
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return idx


def check_bands(have: Sequence[str], want: Sequence[str], *, site: str) -> None:
    """Raise `BandError` listing the differences when a cube lacks the models' bands."""
    missing = [b for b in want if b not in have]
    if missing:
        extra = [b for b in have if b not in want]
        raise BandError(
            f"site '{site}': the cube's bands differ from the model's: missing {missing}"
            + (f"; not used by the model: {extra}" if extra else "")
            + ". Build the cube with the same band names (and indices) as the training sites."
        )
