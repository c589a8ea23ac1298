"""Wall-to-wall AGB maps: blended sliding windows, ensemble uncertainty, area of applicability.

Prediction runs block by block through Dask (``map_overlap`` with a halo of one window), so a
site of any size stays out of core. Windows lie on one global grid (stride ``stride_px``, the last
row and column of windows flush with the edge), and every pixel's value is the weighted mean of
all windows covering it, with a 2-D cosine taper as weight: a block sees exactly the windows a
single pass over the whole site would, so block borders never show, and the taper hides window
borders.

* Dense head: each window's per-pixel map is blended directly.
* Chip head: each window's single value is spread over its pixels with the same taper, which
  gives a smooth map at roughly the chip's resolution (a chip model knows nothing finer).

The ensemble is the fold models of a run: the map is their mean AGB (Mg/ha), the uncertainty
their standard deviation.

Area of applicability [Meyer_Pebesma2021]_: the dissimilarity index (DI) of a pixel is the
distance, in standardised feature space, to the nearest training pixel, divided by the mean
distance between training pixels; the threshold is the upper whisker (Q75 + 1.5 IQR) of the
training pixels' own DI computed against the other folds' pixels only (cross-validated), and the
AOA is ``DI <= threshold``. Features are equally weighted (the CNN gives no importance).

.. [Meyer_Pebesma2021] Meyer, H. & Pebesma, E. (2021). Predicting into unknown space? Estimating
   the area of applicability of spatial prediction models. Methods in Ecology and Evolution 12,
   1620–1633.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from agbcube.errors import BandError

__all__ = [
    "AOAReference",
    "aoa_reference",
    "chips_to_dataarray",
    "cosine_weights",
    "predict_run",
    "predict_site",
    "write_maps",
]

LAYERS = ("agb_mean", "agb_std", "di", "aoa")


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
    q25, q75 = np.percentile(di_train, [25, 75]) if di_train.size else (0.0, 0.0)
    threshold = float(min(q75 + 1.5 * (q75 - q25), di_train.max() if di_train.size else 0.0))
    return AOAReference(
        pts, mean_distance, threshold, mean.astype(np.float32), std.astype(np.float32)
    )


# --------------------------------------------------------------------------------------------
# tiled prediction of one block


def _predict_block(
    block: np.ndarray,
    *,
    offset: tuple[int, int],
    core: tuple[int, int],
    depth: int,
    shape: tuple[int, int],
    models: Sequence[tuple[Any, Any]],
    window: int,
    stride: int,
    log_target: bool,
    tta: int,
    device: str,
    aoa: AOAReference | None,
    n_features: int,
) -> np.ndarray:
    """Predict the core of one halo-padded block: ``(4, core_y, core_x)`` float32."""
    import torch

    from agbcube.train.loop import predict

    r0, c0 = offset  # global offset of the core
    ny, nx = core
    n_y, n_x = shape
    # windows of the global grid that touch the core
    ys = window_starts(n_y, window, stride)
    xs = window_starts(n_x, window, stride)
    ys = ys[(ys + window > r0) & (ys < r0 + ny)]
    xs = xs[(xs + window > c0) & (xs < c0 + nx)]
    taper = cosine_weights(window)
    # block covers global rows [r0 - depth, r0 + ny + depth); padding outside the site is NaN
    top, left = r0 - depth, c0 - depth
    feats = block  # features, then lon/lat when the models use coordinates
    acc = np.zeros((len(models), ny, nx), np.float64)
    wsum = np.zeros((ny, nx), np.float64)
    windows = [(y, x) for y in ys for x in xs]
    all_nan = np.isnan(block[:n_features]).all(axis=0)
    for m, (model, std, *rest) in enumerate(models):
        target = rest[0] if rest else None
        for start in range(0, len(windows), 256):
            batch = windows[start : start + 256]
            stack = np.stack(
                [
                    feats[:, y - top : y - top + window, x - left : x - left + window]
                    for y, x in batch
                ]
            )
            x_t = torch.from_numpy(std.apply(stack)).to(device)
            out = predict(model, x_t, tta=tta).cpu().numpy().astype(np.float64)
            if target is not None:
                out = target.decode(out)
            elif log_target:
                out = np.expm1(out)
            for (y, x), value in zip(batch, out, strict=True):
                ya, yb = max(y, r0), min(y + window, r0 + ny)
                xa, xb = max(x, c0), min(x + window, c0 + nx)
                w = taper[ya - y : yb - y, xa - x : xb - x]
                v = value if np.ndim(value) == 0 else value[ya - y : yb - y, xa - x : xb - x]
                acc[m, ya - r0 : yb - r0, xa - c0 : xb - c0] += w * v
                if m == 0:
                    wsum[ya - r0 : yb - r0, xa - c0 : xb - c0] += w
    per_model = acc / np.maximum(wsum, 1e-12)
    out = np.full((4, ny, nx), np.nan, np.float32)
    out[0] = per_model.mean(axis=0)
    out[1] = per_model.std(axis=0) if len(models) > 1 else 0.0
    if aoa is not None:
        core_feats = block[:n_features, depth : depth + ny, depth : depth + nx]
        flat = np.moveaxis(core_feats, 0, -1).reshape(-1, n_features)
        di = _nearest(_standardise(flat, aoa.mean, aoa.std), aoa.points) / aoa.mean_distance
        out[2] = di.reshape(ny, nx)
        out[3] = (out[2] <= aoa.threshold).astype(np.float32)
    core_nan = all_nan[depth : depth + ny, depth : depth + nx]
    out[:, core_nan] = np.nan
    return out


def predict_site(
    ds: xr.Dataset,
    models: Sequence[tuple[Any, Any]],
    *,
    window_px: int,
    stride_px: int | None = None,
    coordinates: bool = False,
    log_target: bool = True,
    tta: int = 1,
    device: str = "cpu",
    aoa: AOAReference | None = None,
    bands: Sequence[str] | None = None,
    block_px: int = 256,
) -> xr.Dataset:
    """Lazily predict every pixel of a site's cube.

    Parameters
    ----------
    ds : xr.Dataset
        The site's cube (``features (band, y, x)``, CRS).
    models : list of (torch.nn.Module, Standardiser[, TargetTransform])
        The ensemble members; the target transform turns outputs into Mg/ha (without one,
        ``log_target`` decides).
    window_px : int
        Window side (the chip size for the chip head; any size for the dense head).
    stride_px : int, optional
        Window stride (default: a quarter window).
    coordinates : bool
        Append lon/lat channels (as the models were trained).
    log_target : bool
        The models predict ``log1p(AGB)``.
    tta : int
        Dihedral transforms averaged per window.
    device : str
        Torch device for the models.
    aoa : AOAReference, optional
        When given, the ``di`` and ``aoa`` layers are computed.
    bands : list of str, optional
        The bands the models expect, in order; a mismatch raises :class:`BandError`.
    block_px : int
        Dask block side (memory per task ~ bands × (block + 2 window)² × 4 bytes).

    Returns
    -------
    xr.Dataset
        ``agb_mean``, ``agb_std``, ``di``, ``aoa`` (y, x) float32, dask-backed, with the CRS.
    """
    import dask.array as dsa

    have = [str(b) for b in ds["band"].values]
    if bands is not None:
        check_bands(have, list(bands), site=str(ds.attrs.get("site", "site")))
        feats = ds["features"].sel(band=list(bands))
    else:
        feats = ds["features"]
    n_features = feats.sizes["band"]
    data = feats.data if isinstance(feats.data, dsa.Array) else dsa.from_array(feats.values)
    if coordinates:
        from agbcube.train.data import _lonlat_grid

        lonlat = dsa.from_array(_lonlat_grid(ds), chunks=(2, -1, -1))
        data = dsa.concatenate([data, lonlat.astype(np.float32)], axis=0)
    stride = stride_px or max(1, window_px // 4)
    depth = window_px
    # No block thinner than the halo: dask would otherwise re-chunk inside map_overlap and the
    # block offsets computed here would no longer match its blocks.
    data = data.rechunk(
        {
            0: -1,
            1: _axis_chunks(data.shape[1], block_px, depth),
            2: _axis_chunks(data.shape[2], block_px, depth),
        }
    )
    shape = (feats.sizes["y"], feats.sizes["x"])
    y_starts = np.cumsum((0, *data.chunks[1][:-1]))
    x_starts = np.cumsum((0, *data.chunks[2][:-1]))

    def run(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        iy, ix = block_info[None]["chunk-location"][1:]
        core = (data.chunks[1][iy], data.chunks[2][ix])
        return _predict_block(
            block,
            offset=(int(y_starts[iy]), int(x_starts[ix])),
            core=core,
            depth=depth,
            shape=shape,
            models=models,
            window=window_px,
            stride=stride,
            log_target=log_target,
            tta=tta,
            device=device,
            aoa=aoa,
            n_features=n_features,
        )

    out = dsa.map_overlap(
        run,
        data,
        depth={0: 0, 1: depth, 2: depth},
        boundary=np.nan,
        trim=False,
        dtype=np.float32,
        chunks=((4,), data.chunks[1], data.chunks[2]),
        meta=np.array((), dtype=np.float32),
    )
    coords = {k: ds.coords[k] for k in ("y", "x", "spatial_ref") if k in ds.coords}
    result = xr.Dataset(
        {name: (("y", "x"), out[i]) for i, name in enumerate(LAYERS)}, coords=coords
    )
    if aoa is None:
        result = result.drop_vars(["di", "aoa"])
    result["agb_mean"].attrs.update(units="Mg ha-1", long_name="AGB, ensemble mean")
    result["agb_std"].attrs.update(units="Mg ha-1", long_name="AGB, ensemble standard deviation")
    if aoa is not None:
        result["di"].attrs.update(long_name="dissimilarity index", threshold=aoa.threshold)
        result["aoa"].attrs.update(long_name="area of applicability (1 inside, 0 outside)")
    result.attrs["site"] = str(ds.attrs.get("site", ""))
    import rioxarray  # noqa: F401

    return result.rio.write_crs(ds.rio.crs)


def _axis_chunks(n: int, block: int, minimum: int) -> tuple[int, ...]:
    """Chunk lengths of ``block`` along an axis of ``n``, the last one at least ``minimum``."""
    block = max(block, minimum)
    sizes = [block] * (n // block)
    rest = n - sum(sizes)
    if rest:
        if sizes and rest < minimum:
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return tuple(sizes) or (n,)


def check_bands(have: Sequence[str], want: Sequence[str], *, site: str) -> None:
    """Raise :class:`BandError` listing the differences when a cube lacks the models' bands."""
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
    from agbcube.cube import open_cube

    rng = np.random.default_rng(random_state)
    feats, fold_of = [], []
    for site, sub in folds.groupby("site"):
        ds = open_cube(store, str(site))
        f = ds["features"] if site_bands is None else ds["features"].sel(band=list(site_bands))
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
) -> xr.Dataset:
    """Predict a site's cube with the fold ensemble of a training run (lazily).

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by ``agbcube train``.
    ds : xr.Dataset
        A site's cube, from the training cube or built the same way for a new area.
    device : str
        Torch device.
    window_px : int, optional
        Window side; default the chip size (chip head) or 4 chips (dense head).
    stride_px : int, optional
        Window stride; default half a window (chip head: each pixel blends ~4 chip values) or
        a quarter window (dense head).
    aoa : bool
        Compute the dissimilarity index and the AOA mask.
    """
    import yaml

    from agbcube.folds import read_folds
    from agbcube.train import load_ensemble

    run_dir = Path(run_dir)
    models, spec = load_ensemble(run_dir, device=device)
    tcfg = spec["train"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    size = int(spec["size_px"])
    dense = tcfg["head"] == "dense"
    window = window_px or (4 * size if dense else size)
    reference = None
    if aoa:
        folds = read_folds(run_dir / "folds.parquet")
        pixels, fold_of = _labelled_pixels(Path(cfg["cube"]["output"]), folds, spec["bands"], size)
        reference = aoa_reference(pixels, fold_of)
    return predict_site(
        ds,
        models,
        window_px=window,
        stride_px=stride_px or max(1, window // (4 if dense else 2)),
        coordinates=tcfg["coordinates"] == "geographic",
        log_target=bool(tcfg["log_target"]),
        tta=int(tcfg["tta_rotations"]) if tcfg["tta"] else 1,
        device=device,
        aoa=reference,
        bands=spec["bands"],
    )


def write_maps(
    maps: xr.Dataset,
    output: str | Path,
    *,
    client: Any = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> list[Path]:
    """Compute the maps into ``output/maps.zarr`` (atomically), then write COGs and PNGs.

    Each layer becomes ``output/<layer>.tif`` (Cloud-Optimised GeoTIFF, deflate, with overviews,
    nodata: NaN for floats, 255 for the AOA mask) and ``output/<layer>.png`` (a quick look).
    """
    from agbcube._dask import compute
    from agbcube._io import atomic_path

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    say = echo or (lambda _m: None)
    written = []
    zpath = output / "maps.zarr"
    with atomic_path(zpath) as tmp:
        delayed = maps.to_zarr(tmp, mode="w", compute=False, consolidated=True, zarr_format=2)
        compute(delayed, client=client, progress=progress, label="predicting")
    written.append(zpath)
    import rioxarray  # noqa: F401

    stored = xr.open_zarr(zpath, consolidated=True, zarr_format=2)
    stored = stored.set_coords([v for v in ("spatial_ref",) if v in stored.data_vars])
    for name in stored.data_vars:
        da = stored[name].load().rio.write_crs(maps.rio.crs)
        if name == "aoa":
            da = xr.where(np.isfinite(da), da, 255).astype(np.uint8).rio.write_crs(maps.rio.crs)
            da = da.rio.write_nodata(255)
        else:
            da = da.astype(np.float32).rio.write_nodata(np.nan)
        tif = output / f"{name}.tif"
        with atomic_path(tif) as tmp:
            da.rio.to_raster(
                tmp,
                driver="COG",
                compress="DEFLATE",
                blocksize=128,
                overview_count=max(1, int(np.log2(max(da.shape) / 128)) + 1),
                overview_resampling="average" if name != "aoa" else "nearest",
            )
        written.append(tif)
        png = output / f"{name}.png"
        with atomic_path(png) as tmp:
            _quicklook(da.where(da != 255) if name == "aoa" else da, tmp, name)
        written.append(png)
        say(f"wrote {tif} and {png.name}")
    meta = {"layers": list(stored.data_vars), "attrs": {k: str(v) for k, v in maps.attrs.items()}}
    (output / "maps.json").write_text(json.dumps(meta, indent=2))
    return written


def _quicklook(da: xr.DataArray, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1, int(np.ceil(max(da.sizes["y"], da.sizes["x"]) / 1000)))
    small = da.isel(y=slice(None, None, step), x=slice(None, None, step)).values
    cmap = {"agb_mean": "YlGn", "agb_std": "magma", "di": "viridis", "aoa": "RdYlGn"}[name]
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(small, cmap=cmap)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(name)
    ax.set_axis_off()
    fig.savefig(path, dpi=90, format="png", bbox_inches="tight")
    plt.close(fig)
