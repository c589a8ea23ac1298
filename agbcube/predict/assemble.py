"""Chips back into a map: the inverse of chipping."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from agbcube.predict.windows import cosine_weights

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
