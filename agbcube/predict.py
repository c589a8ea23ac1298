"""Wall-to-wall AGB maps: blended sliding windows, ensemble uncertainty, area of applicability.

Prediction runs tile by tile through Dask. Windows lie on one global grid (stride
``stride_px``, the last row and column of windows flush with the edge), and every pixel's value
is the weighted mean of all windows covering it, with a 2-D cosine taper as weight: a tile
computes exactly the windows of the global grid that touch it, as a single pass over the whole
site would, so tile borders never show, and the taper hides window borders.

Each tile's task reads its own input window (the tile plus the windows reaching into it) from
the cube, so memory is bounded by the tile size and flat in the site's size; tiles are written
into the output store as they finish, so an interrupted write resumes where it stopped
(`write_maps`). A run's ensemble travels as the path of its file: each process (a Dask
worker on a cluster) loads it once, on its own device, and keeps it for the tiles it computes.

* Dense head: each window's per-pixel map is blended directly.
* Chip head: each window's single value is spread over its pixels with the same taper, which
  gives a smooth map at roughly the chip's resolution (a chip model knows nothing finer).

The ensemble is the fold models of a run: the map is their mean AGB (Mg/ha), the uncertainty
their standard deviation.

Area of applicability [Meyer_Pebesma2021]_: the dissimilarity index (DI) of a pixel is the
distance, in standardised feature space, to the nearest training pixel, divided by the mean
distance between training pixels; the threshold is the upper whisker of the training pixels' own
DIs, computed against the other folds' pixels only (cross-validated): the largest training DI
not above Q75 + 1.5 IQR, as in the CAST package; the AOA is ``DI <= threshold``. Features are
equally weighted (the CNN gives no importance).

.. [Meyer_Pebesma2021] Meyer, H. & Pebesma, E. (2021). Predicting into unknown space? Estimating
   the area of applicability of spatial prediction models. Methods in Ecology and Evolution 12,
   1620–1633.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from agbcube._cf import AGB_UNITS, cf_dataset, linear_units
from agbcube._io import (
    atomic_path,
    digest,
    output_lock,
    prepare_output_dir,
    remove_path,
    replace_path,
    temporary_sibling,
    write_json_atomic,
    written_by,
)
from agbcube._plot import label_projected, new_figure, raster_extent, save_figure
from agbcube.errors import BandError, ConfigError, FoldError, InputFileError, TrainingError

__all__ = [
    "AOAReference",
    "aoa_reference",
    "chips_to_dataarray",
    "cosine_weights",
    "predict_run",
    "predict_site",
    "quicklook",
    "run_cube",
    "write_maps",
]

LAYERS = ("agb_mean", "agb_std", "di", "aoa")

log = logging.getLogger(__name__)

# What each map layer is, for the COGs' band metadata, the quick looks and the STAC Item.
LAYER_INFO: dict[str, dict[str, Any]] = {
    "agb_mean": {
        "title": "AGB, ensemble mean",
        "description": "Above-ground biomass: mean of the run's fold models.",
        "unit": AGB_UNITS,
        "dtype": "float32",
        "nodata": float("nan"),
        "cmap": "YlGn",
    },
    "agb_std": {
        "title": "AGB, ensemble standard deviation",
        "description": "Standard deviation of the fold models' AGB (their disagreement).",
        "unit": AGB_UNITS,
        "dtype": "float32",
        "nodata": float("nan"),
        "cmap": "magma",
    },
    "di": {
        "title": "dissimilarity index",
        "description": "Distance to the nearest training pixel in standardised feature space, "
        "over the mean distance between training pixels (Meyer & Pebesma 2021); unitless.",
        "unit": "1",
        "dtype": "float32",
        "nodata": float("nan"),
        "cmap": "viridis",
    },
    "aoa": {
        "title": "area of applicability",
        "description": "1 where the dissimilarity index is within the training data's "
        "threshold (inside the area of applicability), 0 outside, 255 no data.",
        "unit": None,
        "dtype": "uint8",
        "nodata": 255,
        "cmap": "RdYlGn",
        # a palette in the COG (GIS tools draw the classes), and the classes' names in its tags
        "colormap": {0: (215, 48, 39, 255), 1: (26, 152, 80, 255), 255: (0, 0, 0, 0)},
        "classes": {0: "outside", 1: "inside"},
    },
}


def cosine_weights(size: int) -> np.ndarray:
    """2-D cosine (Hann) taper of ``size × size``, sampled at pixel centres.

    Sampling at centres keeps every weight strictly positive (so every pixel counts) while the
    rim's weight stays tiny relative to the inside, whatever the corner; a floor would not.
    """
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.outer(w, w).astype(np.float32)


def window_starts(n: int, window: int, stride: int) -> np.ndarray:
    """Window offsets along an axis: a regular grid plus one flush with the far edge."""
    if n <= window:
        return np.array([0])
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] != n - window:
        starts.append(n - window)
    return np.array(starts)


# --------------------------------------------------------------------------------------------
# area of applicability


@dataclass
class AOAReference:
    """Training pixels in standardised feature space, and the DI threshold."""

    points: np.ndarray  # (n, f) standardised
    mean_distance: float
    threshold: float
    mean: np.ndarray
    std: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_points": int(self.points.shape[0]),
            "mean_distance": self.mean_distance,
            "threshold": self.threshold,
        }


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.nan_to_num((x - mean) / std, nan=0.0).astype(np.float32)


def _nearest(query: np.ndarray, points: np.ndarray, block: int = 8192) -> np.ndarray:
    """Euclidean distance of each query row to its nearest point (matmul-based, blocked)."""
    import torch

    pts = torch.from_numpy(np.ascontiguousarray(points))
    out = np.empty(len(query), dtype=np.float32)
    for i in range(0, len(query), block):
        q = torch.from_numpy(np.ascontiguousarray(query[i : i + block]))
        out[i : i + block] = torch.cdist(q, pts).min(dim=1).values.numpy()
    return out


def aoa_reference(
    pixels: np.ndarray, folds: np.ndarray, *, max_points: int = 4000, random_state: int = 0
) -> AOAReference:
    """The AOA's training reference from labelled pixels and their CV folds.

    Parameters
    ----------
    pixels : np.ndarray, (n, f)
        Feature vectors of labelled pixels (NaN allowed: imputed with the mean).
    folds : np.ndarray, (n,)
        Test fold of each pixel's chip; the threshold uses distances to other folds only.
    max_points : int
        Pixels kept (a stratified random sample).
    """
    rng = np.random.default_rng(random_state)
    if len(pixels) > max_points:
        pick = rng.choice(len(pixels), size=max_points, replace=False)
        pixels, folds = pixels[pick], folds[pick]
    mean = np.nanmean(pixels, axis=0)
    std = np.nanstd(pixels, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
    pts = _standardise(pixels, mean, std)
    import torch

    d = torch.cdist(torch.from_numpy(pts), torch.from_numpy(pts)).numpy()
    n = len(pts)
    mean_distance = float(d[np.triu_indices(n, 1)].mean()) if n > 1 else 1.0
    other = folds[:, None] != folds[None, :]
    d_cv = np.where(other, d, np.inf).min(axis=1)
    di_train = d_cv[np.isfinite(d_cv)] / mean_distance
    threshold = _upper_whisker(di_train)
    return AOAReference(
        pts, mean_distance, threshold, mean.astype(np.float32), std.astype(np.float32)
    )


def _upper_whisker(values: np.ndarray) -> float:
    """The largest value not above ``Q75 + 1.5 IQR`` (the upper whisker of a boxplot).

    This is the AOA threshold of Meyer & Pebesma (2021) as CAST computes it
    (``boxplot.stats(TrainDI)$stats[5]``): a training DI, so an outlier among the training
    pixels' own DIs does not widen the AOA.
    """
    if values.size == 0:
        return 0.0
    q25, q75 = np.percentile(values, [25, 75])
    return float(values[values <= q75 + 1.5 * (q75 - q25)].max())


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
        import dask

        from agbcube._store import site_read_errors

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


@dataclass(frozen=True)
class _TileSpec:
    """What a tile task needs besides the models and its input window."""

    shape: tuple[int, int]  # the site's (y, x) size
    window: int
    stride: int
    tta: int
    device: str
    n_features: int
    crs: str | None  # WKT, when the models take lon/lat channels
    margin: int = 0  # context pixels a model reads around each window (unpadded convolutions)


@dataclass(frozen=True)
class _EnsembleFile:
    """A run's ensemble by its file, as the tile tasks carry it: each process loads it once per
    device (`load`) instead of receiving the models through the task graph."""

    path: str
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: str | Path) -> _EnsembleFile:
        path = Path(path).resolve()
        st = path.stat()
        return cls(str(path), st.st_mtime_ns, st.st_size)

    def load(self, device: str) -> tuple[list[tuple[Any, ...]], dict[str, Any], Any]:
        """The members on ``device`` (``auto`` resolved here), their spec and the device."""
        from agbcube.train.loop import resolve_device

        dev = resolve_device(device)
        key = (self, str(dev))
        with _MODELS_LOCK:  # one load per process, whatever the threads asking
            if key in _MODELS:
                _MODELS.move_to_end(key)
                return (*_MODELS[key], dev)
            self._check()
            from agbcube.train import load_ensemble

            _MODELS[key] = load_ensemble(Path(self.path).parent, device=str(dev))
            _LOADS[key] += 1
            while len(_MODELS) > _KEEP_MODELS:
                _MODELS.popitem(last=False)
            return (*_MODELS[key], dev)

    def _check(self) -> None:
        try:
            st = Path(self.path).stat()
        except OSError as err:
            raise InputFileError(
                f"ensemble {self.path} cannot be read here ({err.strerror or err}); on a "
                "cluster the workers need the run directory and the cube at the same paths as "
                "the client (a shared file system)"
            ) from err
        if (st.st_mtime_ns, st.st_size) != (self.mtime_ns, self.size):
            raise TrainingError(
                f"ensemble {self.path} changed while its maps were being made (the run was "
                "trained again?); run predict again"
            )


_MODELS: OrderedDict[tuple[_EnsembleFile, str], tuple[list, dict]] = OrderedDict()
_MODELS_LOCK = threading.Lock()
_LOADS: Counter = Counter()  # loads per (ensemble, device) in this process
_KEEP_MODELS = 2  # ensembles a process keeps (a long-lived worker maps for several runs)


def _windows_touching(n: int, window: int, stride: int, start: int, size: int) -> np.ndarray:
    """Global window offsets along an axis whose windows overlap ``[start, start + size)``."""
    s = window_starts(n, window, stride)
    return s[(s + window > start) & (s < start + size)]


def _window_batch(n_channels: int, window: int, budget_bytes: float = 64e6) -> int:
    return int(max(1, min(256, budget_bytes // (n_channels * window * window * 4))))


def _predict_tile(
    source: _Window | np.ndarray,
    members: Sequence[tuple[Any, ...]] | _EnsembleFile,
    aoa: AOAReference | None,
    *,
    top: int,
    left: int,
    offset: tuple[int, int],
    core: tuple[int, int],
    spec: _TileSpec,
    xy: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Predict one tile (the core): ``(4, core_y, core_x)`` float32.

    ``source`` holds the features of global rows ``top:`` and columns ``left:``, covering
    every window of the global grid that touches the core (and the core itself) with the
    models' margin; ``xy`` the x and y coordinates of those columns and rows, when the models
    take lon/lat channels; ``members`` the models, or their file, loaded here once per process
    on ``spec.device``.
    """
    if isinstance(members, _EnsembleFile):
        members, _, device = members.load(spec.device)
        spec = replace(spec, device=device)
    feats = source.read() if isinstance(source, _Window) else np.asarray(source, np.float32)
    r0, c0 = offset
    ny, nx = core
    ys = _windows_touching(spec.shape[0], spec.window, spec.stride, r0, ny)
    xs = _windows_touching(spec.shape[1], spec.window, spec.stride, c0, nx)
    if spec.crs is not None and xy is not None:
        from agbcube.train.readers import lonlat_of

        feats = np.concatenate([feats, lonlat_of(*xy, spec.crs)])
    feats = _canvas(feats, (top, left), ys, xs, spec)
    per_model = np.stack([_blend(m, feats, ys, xs, offset, core, spec) for m in members])
    out = np.full((4, ny, nx), np.nan, np.float32)
    out[0] = per_model.mean(axis=0)
    out[1] = per_model.std(axis=0) if len(members) > 1 else 0.0
    oy, ox = int(ys[0]) - spec.margin, int(xs[0]) - spec.margin
    core_feats = feats[: spec.n_features, r0 - oy : r0 - oy + ny, c0 - ox : c0 - ox + nx]
    if aoa is not None:
        flat = np.moveaxis(core_feats, 0, -1).reshape(-1, spec.n_features)
        di = _nearest(_standardise(flat, aoa.mean, aoa.std), aoa.points) / aoa.mean_distance
        out[2] = di.reshape(ny, nx)
        out[3] = (out[2] <= aoa.threshold).astype(np.float32)
    out[:, np.isnan(core_feats).all(axis=0)] = np.nan
    return out


def _canvas(
    feats: np.ndarray, at: tuple[int, int], ys: np.ndarray, xs: np.ndarray, spec: _TileSpec
) -> np.ndarray:
    """``feats`` (read from global pixel ``at``) placed on the region every window of ``ys``
    × ``xs`` reads with its margin, NaN beyond the site (also a site smaller than a window)."""
    m, window = spec.margin, spec.window
    oy, ox = int(ys[0]) - m, int(xs[0]) - m
    need = (int(ys[-1]) + window + m - oy, int(xs[-1]) + window + m - ox)
    if (oy, ox) == at and need == feats.shape[1:]:
        return feats
    canvas = np.full((feats.shape[0], *need), np.nan, np.float32)
    ya, xa = at[0] - oy, at[1] - ox
    part = feats[:, : need[0] - ya, : need[1] - xa]
    canvas[:, ya : ya + part.shape[1], xa : xa + part.shape[2]] = part
    return canvas


def _blend(
    member: tuple[Any, ...],
    canvas: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    offset: tuple[int, int],
    core: tuple[int, int],
    spec: _TileSpec,
) -> np.ndarray:
    """One member's map of the tile core: the cosine-tapered mean of every window over it."""
    import torch

    from agbcube.train.loop import predict

    model, std, *rest = member
    target = rest[0] if rest else None
    (r0, c0), (ny, nx), window = offset, core, spec.window
    side = window + 2 * spec.margin  # each window's input: the window and its margin
    taper = cosine_weights(window)
    acc = np.zeros((ny, nx), np.float64)
    wsum = np.zeros((ny, nx), np.float64)
    windows = [(y, x) for y in ys for x in xs]
    batch_size = _window_batch(canvas.shape[0], side)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        stack = np.stack(
            [
                canvas[:, y - ys[0] : y - ys[0] + side, x - xs[0] : x - xs[0] + side]
                for y, x in batch
            ]
        )
        x_t = torch.from_numpy(std.apply(stack)).to(spec.device)
        out = predict(model, x_t, tta=spec.tta).cpu().numpy().astype(np.float64)
        if target is not None:
            out = target.decode(out)
        for (y, x), value in zip(batch, out, strict=True):
            ya, yb = max(y, r0), min(y + window, r0 + ny)
            xa, xb = max(x, c0), min(x + window, c0 + nx)
            w = taper[ya - y : yb - y, xa - x : xb - x]
            v = value if np.ndim(value) == 0 else value[ya - y : yb - y, xa - x : xb - x]
            acc[ya - r0 : yb - r0, xa - c0 : xb - c0] += w * v
            wsum[ya - r0 : yb - r0, xa - c0 : xb - c0] += w
    return acc / np.maximum(wsum, 1e-12)


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
    margin_px: int = 0,
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
    margin_px : int
        Context the models read around each window (their ``margin``); NaN beyond the site.

    Returns
    -------
    xr.Dataset
        ``agb_mean``, ``agb_std``, ``di``, ``aoa`` (y, x) float32, dask-backed, with the CRS;
        one Dask chunk per tile.
    """
    import dask

    feats = _site_features(ds, bands)
    shape = (feats.sizes["y"], feats.sizes["x"])
    spec = _TileSpec(
        shape=shape,
        window=window_px,
        stride=stride_px or max(1, window_px // 4),
        tta=tta,
        device=device,
        n_features=feats.sizes["band"],
        crs=ds.rio.crs.to_wkt() if coordinates else None,
        margin=margin_px,
    )
    if isinstance(models, str | Path):
        members_d: Any = _EnsembleFile.of(models)  # a few bytes in every tile's task
    else:
        members = [(m[0], m[1], m[2] if len(m) > 2 else _Decode(log_target)) for m in models]
        # one graph key, so a cluster ships the models once per worker
        members_d = dask.delayed(members, traverse=False)
    # one graph key, so a cluster ships the AOA reference once per worker
    aoa_d = dask.delayed(aoa, traverse=False) if aoa is not None else None
    block_px = block_px or default_block(shape, window_px)
    tiles = _tiles(feats, spec, (members_d, aoa_d), block_px, str(ds.attrs.get("site", "site")))
    return _maps_dataset(ds, tiles, aoa)


def _site_features(ds: xr.Dataset, bands: Sequence[str] | None) -> xr.DataArray:
    """The site's features, restricted to and ordered as ``bands`` when given (checked)."""
    have = [str(b) for b in ds["band"].values]
    feats = ds["features"]
    if bands is not None:
        check_bands(have, list(bands), site=str(ds.attrs.get("site", "site")))
        feats = feats.isel(band=_band_index(have, list(bands)))
    return feats.drop_vars([c for c in feats.coords if c not in feats.dims])


def _tiles(
    feats: xr.DataArray, spec: _TileSpec, shared: tuple[Any, Any], block_px: int, site: str
) -> Any:
    """The map as a Dask array ``(4, y, x)``: one delayed `_predict_tile` per tile, each
    given the windows touching its core with their margin (``shared``: the members' and the
    AOA reference's graph keys; ``site`` names the site in read errors)."""
    import dask
    import dask.array as dsa

    # a cube already in memory is sliced here; a lazy one is read by each tile's task
    loaded = feats.chunks is None and getattr(feats.variable, "_in_memory", False)
    x, y = feats["x"].values, feats["y"].values
    (ny_all, nx_all), window, margin = spec.shape, spec.window, spec.margin
    ychunks, xchunks = _axis_chunks(ny_all, block_px), _axis_chunks(nx_all, block_px)
    rows = []
    for r0, ny in zip(_offsets(ychunks), ychunks, strict=True):
        ys = _windows_touching(ny_all, window, spec.stride, int(r0), ny)
        top, bottom = max(0, int(ys[0]) - margin), min(ny_all, int(ys[-1]) + window + margin)
        row = []
        for c0, nx in zip(_offsets(xchunks), xchunks, strict=True):
            xs = _windows_touching(nx_all, window, spec.stride, int(c0), nx)
            left = max(0, int(xs[0]) - margin)
            right = min(nx_all, int(xs[-1]) + window + margin)
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
            row.append(dsa.from_delayed(tile, shape=(4, ny, nx), dtype=np.float32))
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


def default_block(shape: tuple[int, int], window: int, largest: int = 512) -> int:
    """Tile side: ``largest``, or half the site's longer side (at least 4 windows) if smaller."""
    half = -(-max(shape) // 2)
    return int(min(largest, max(half, 4 * window)))


def _offsets(chunks: Sequence[int]) -> np.ndarray:
    """Start of each chunk along an axis."""
    return np.cumsum((0, *chunks[:-1]))


def _axis_chunks(n: int, block: int) -> tuple[int, ...]:
    """Regular chunk lengths of ``block`` along an axis of ``n`` (the last one shorter)."""
    block = max(1, block)
    return tuple(min(block, n - s) for s in range(0, n, block)) or (n,)


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


# --------------------------------------------------------------------------------------------
# reassembly (the inverse of chipping)


def chips_to_dataarray(
    values: np.ndarray,
    rows: Sequence[int],
    cols: Sequence[int],
    template: xr.DataArray | xr.Dataset,
    *,
    size_px: int,
    weights: str = "uniform",
) -> xr.DataArray:
    """Reassemble per-chip or per-pixel predictions into a georeferenced ``(y, x)`` DataArray.

    Parameters
    ----------
    values : np.ndarray
        ``(n,)`` one value per chip, or ``(n, size, size)`` per pixel.
    rows, cols : sequence of int
        Pixel offsets of the chips in the template (the chips table's ``row``/``col``).
    template : xr.DataArray or xr.Dataset
        The site's cube (or any array on its grid): gives shape, coordinates and CRS.
    size_px : int
        Chip side.
    weights : {"uniform", "cosine"}
        How overlapping chips are averaged.

    Returns
    -------
    xr.DataArray
        NaN where no chip covers a pixel.
    """
    ny, nx = template.sizes["y"], template.sizes["x"]
    acc = np.zeros((ny, nx), np.float64)
    wsum = np.zeros((ny, nx), np.float64)
    w = cosine_weights(size_px) if weights == "cosine" else np.ones((size_px, size_px), np.float32)
    values = np.asarray(values, dtype=np.float64)
    for v, r, c in zip(values, rows, cols, strict=True):
        patch = v if np.ndim(v) == 2 else np.full((size_px, size_px), v)
        ok = np.isfinite(patch)
        acc[r : r + size_px, c : c + size_px] += np.where(ok, patch, 0.0) * w * ok
        wsum[r : r + size_px, c : c + size_px] += w * ok
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(wsum > 0, acc / wsum, np.nan).astype(np.float32)
    coords = {k: template.coords[k] for k in ("y", "x", "spatial_ref") if k in template.coords}
    return xr.DataArray(out, dims=("y", "x"), coords=coords)


# --------------------------------------------------------------------------------------------
# the stage


def _labelled_pixels(
    store: Path,
    folds: pd.DataFrame,
    site_bands: Sequence[str] | None,
    size: int,
    per_chip: int = 40,
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A sample of labelled pixels' features from every chip, with the chip's test fold."""
    from agbcube._store import open_cube, site_read_errors

    rng = np.random.default_rng(random_state)
    feats, fold_of = [], []
    for site, sub in folds.groupby("site"):
        ds = open_cube(store, str(site))
        f = ds["features"] if site_bands is None else ds["features"].sel(band=list(site_bands))
        with site_read_errors(store, str(site)):
            f = f.values
            agb = ds["agb"].values
        for r, c, k in zip(sub["row"], sub["col"], sub["fold"], strict=True):
            win = f[:, r : r + size, c : c + size].reshape(f.shape[0], -1)
            ok = np.flatnonzero(np.isfinite(agb[r : r + size, c : c + size].ravel()))
            pick = rng.choice(ok, size=min(per_chip, ok.size), replace=False)
            feats.append(win[:, pick].T)
            fold_of.append(np.full(pick.size, k))
    return np.concatenate(feats), np.concatenate(fold_of)


def predict_run(
    run_dir: str | Path,
    ds: xr.Dataset,
    *,
    device: str = "cpu",
    window_px: int | None = None,
    stride_px: int | None = None,
    aoa: bool = True,
    block_px: int | None = None,
) -> xr.Dataset:
    """Predict a site's cube with the fold ensemble of a training run (lazily).

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by ``agbcube train``.
    ds : xr.Dataset
        A site's cube, from the training cube or built the same way for a new area.
    device : str
        Torch device; ``auto`` is resolved by each process that computes tiles (on a cluster,
        each worker loads the ensemble once, on its own device).
    window_px : int, optional
        Window side; default the chip size (chip head) or 4 chips (dense head).
    stride_px : int, optional
        Window stride; default half a window (chip head: each pixel blends ~4 chip values) or
        a quarter window (dense head).
    aoa : bool
        Compute the dissimilarity index and the AOA mask.
    block_px : int, optional
        Tile side (see `predict_site`).

    Returns
    -------
    xr.Dataset
        As `predict_site`, with ``attrs["key"]``: a digest of the ensemble, the site's
        cube and the settings, with which `write_maps` resumes an interrupted write.
    """
    run_dir = Path(run_dir)
    store = run_cube(run_dir)
    ensemble_file = run_dir / "ensemble.pt"
    # the settings and the margin, from the models as this process loads them (the tiles of a
    # threaded run share them; a cluster's workers load their own)
    models, spec, _ = _EnsembleFile.of(ensemble_file).load(_here(device))
    tcfg = spec["train"]
    size = int(spec["chip_px"])  # the chips, not windows
    dense = tcfg["head"] == "dense"
    default = 4 * size if dense else size
    window = window_px or default
    stride = stride_px or max(1, window // (4 if dense else 2))
    _check_window(window, stride, (ds.sizes["y"], ds.sizes["x"]), default)
    reference = _run_aoa(run_dir, store, spec["bands"], size) if aoa else None
    maps = predict_site(
        ds,
        ensemble_file,
        window_px=window,
        stride_px=stride,
        coordinates=tcfg["coordinates"] == "geographic",
        log_target=bool(tcfg["log_target"]),
        tta=int(tcfg["tta_rotations"]) if tcfg["tta"] else 1,
        device=device,
        aoa=reference,
        bands=spec["bands"],
        block_px=block_px,
        margin_px=int(getattr(models[0][0], "margin", 0)),
    )
    maps.attrs["key"] = _maps_key(run_dir, ds, maps, window=window, stride=stride, aoa=aoa)
    maps.attrs["run"] = run_dir.resolve().name
    maps.attrs.update(window_px=window, stride_px=stride)
    return maps


def _run_aoa(run_dir: Path, store: Path, bands: list[str], size: int) -> AOAReference:
    """The AOA reference of a run: its training chips' labelled pixels, by fold."""
    from agbcube.folds import read_folds

    try:
        folds = read_folds(run_dir / "folds.parquet", cube=store)
    except FoldError as err:
        raise FoldError(
            f"run {run_dir}: {err}. The run's area of applicability needs the cube it was "
            "trained on: train the run again, or map without it (--no-aoa)"
        ) from err
    pixels, fold_of = _labelled_pixels(store, folds, bands, size)
    return aoa_reference(pixels, fold_of)


def _maps_key(
    run_dir: Path, ds: xr.Dataset, maps: xr.Dataset, *, window: int, stride: int, aoa: bool
) -> str:
    """What the maps depend on: an interrupted write resumes only into maps made the same way."""
    ensemble = (run_dir / "ensemble.pt").stat()
    return digest(
        {
            "ensemble": [str((run_dir / "ensemble.pt").resolve()), ensemble.st_size],
            "ensemble_mtime_ns": ensemble.st_mtime_ns,
            "site": ds.attrs.get("site"),
            "cube": ds.attrs.get("provenance"),
            "shape": [ds.sizes["y"], ds.sizes["x"]],
            "window": window,
            "stride": stride,
            "tiles": [list(c) for c in maps["agb_mean"].chunks],
            "aoa": aoa,
        }
    )


def _here(device: str) -> str:
    """``device`` when this process has it, else the CPU (a client without the GPUs its
    cluster's workers have)."""
    from agbcube.train.loop import resolve_device

    try:
        return str(resolve_device(device))
    except TrainingError:
        return "cpu"


def run_cube(run_dir: str | Path) -> Path:
    """The cube a training run was trained on, from its config.yaml (read back through the
    same validation as a fresh config).

    Raises
    ------
    ConfigError
        ``run_dir`` holds no readable, valid config.yaml.
    """
    from agbcube.config import load_run_config

    return load_run_config(run_dir).cube.output


def _check_window(window: int, stride: int, shape: tuple[int, int], default: int) -> None:
    """Refuse window settings that cannot work or would read far more than the site.

    A window may exceed the site up to the run's default (a chip model's window is its chip).
    """
    if window < 2 or stride < 1:
        raise ConfigError(f"window ({window} px) must be >= 2 and stride ({stride} px) >= 1")
    largest = max(*shape, default)
    if window > largest:
        raise ConfigError(
            f"window {window} px is larger than the site ({shape[0]}×{shape[1]} px) and the "
            f"run's default window ({default} px); give --window {largest} or less"
        )


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
    (`agbcube.catalog.map_item`). Memory stays bounded by the tile size throughout.
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
    from agbcube._log import reporter
    from agbcube.catalog import map_item, write_map_item

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

    from agbcube._dask import compute

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
    y_off, x_off = _offsets(chunks[0]), _offsets(chunks[1])
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
