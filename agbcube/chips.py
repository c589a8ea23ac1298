"""Cube → chips: square windows of a site's cube, indexed as a GeoDataFrame.

A chip is a ``size × size`` pixel window at pixel offset ``(row, col)`` of its site's cube. Its
row in the GeoDataFrame holds ``chip_id``, ``site``, ``row``, ``col``, ``agb_mean`` (mean of the
valid AGB pixels, Mg/ha), ``valid_fraction`` (valid AGB pixels / all), ``nan_fraction`` (NaN
feature values / all) and the footprint ``geometry`` (EPSG:4326, so that sites on different CRSs
share one table). Windows are slices of the cube, never copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import xarray as xr
from pyproj import CRS, Transformer

__all__ = [
    "CHIP_COLUMNS",
    "ChipGeometry",
    "chip_origins",
    "grid_box",
    "grid_centres_m",
    "grid_of",
    "local_metric_crs",
    "make_chips",
    "no_chip_reason",
    "stride_of",
    "to_local_metric",
]

CHIP_COLUMNS = ("chip_id", "site", "row", "col", "agb_mean", "valid_fraction", "nan_fraction")
CHIP_CRS = "EPSG:4326"


def stride_of(size_px: int, overlap: float) -> int:
    """Pixels between neighbouring chips: ``round(size_px * (1 - overlap))``, at least 1."""
    return max(1, round(size_px * (1.0 - overlap)))


@dataclass(frozen=True)
class ChipGeometry:
    """The chip geometry of a run, as training, assembly and prediction all use it.

    A chip is ``size_px`` square, ``stride_px`` from its neighbours. Training reads it with
    ``context_px`` pixels around it (``read_px``; AGB there is never a label); the model sees
    ``reach_px`` of that context on each side (``window_px``), which its unpadded convolutions
    consume, and predicts the chip. ``crop_px`` is what is cut from the read window first.
    """

    size_px: int
    stride_px: int
    context_px: int = 0
    reach_px: int = 0

    @classmethod
    def of(cls, chips: Any, train: Any) -> ChipGeometry:
        """From a config's ``chips`` and ``train`` sections."""
        stride = stride_of(chips.size, chips.overlap)
        return cls(chips.size, stride, int(train.context_px), train.reach_px)

    @property
    def read_px(self) -> int:
        return self.size_px + 2 * self.context_px

    @property
    def window_px(self) -> int:
        return self.size_px + 2 * self.reach_px

    @property
    def crop_px(self) -> int:
        return self.context_px - self.reach_px

    def to_dict(self) -> dict[str, int]:
        return {
            k: int(getattr(self, k)) for k in ("size_px", "stride_px", "context_px", "reach_px")
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChipGeometry:
        return cls(**{k: int(d[k]) for k in ("size_px", "stride_px", "context_px", "reach_px")})


def chip_origins(n_y: int, n_x: int, *, size_px: int, overlap: float) -> tuple[np.ndarray, ...]:
    """Pixel offsets (rows, cols) of every chip that fits in an ``n_y × n_x`` grid.

    The stride is `stride_of` the chips.
    """
    stride = stride_of(size_px, overlap)
    rows = np.arange(0, n_y - size_px + 1, stride)
    cols = np.arange(0, n_x - size_px + 1, stride)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return rr.ravel(), cc.ravel()


def _window_sums(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """Sum of ``grid`` over each ``size × size`` window, via an integral image (no loop)."""
    ii = np.zeros((grid.shape[0] + 1, grid.shape[1] + 1), dtype=np.float64)
    ii[1:, 1:] = grid.cumsum(0).cumsum(1)
    r1, c1 = rows + size, cols + size
    return ii[r1, c1] - ii[rows, c1] - ii[r1, cols] + ii[rows, cols]


def make_chips(
    ds: xr.Dataset,
    *,
    size_px: int = 24,
    overlap: float = 0.1,
    min_valid_fraction: float = 0.7,
    max_nan_fraction: float = 0.3,
    site: str | None = None,
) -> tuple[gpd.GeoDataFrame, dict[str, Any]]:
    """Cut one site's cube into chips and keep those that pass the validity thresholds.

    Parameters
    ----------
    ds : xr.Dataset
        A site's cube: ``features (band, y, x)``, ``agb (y, x)``, with a CRS (``ds.rio.crs``).
    size_px : int
        Chip side, pixels.
    overlap : float
        Fraction of a chip shared with its neighbour, in [0, 1).
    min_valid_fraction : float
        Least fraction of valid AGB pixels.
    max_nan_fraction : float
        Largest fraction of NaN feature values.
    site : str, optional
        Site name (default: ``ds.attrs["site"]``).

    Returns
    -------
    chips : gpd.GeoDataFrame
        One row per kept chip, footprints in EPSG:4326.
    summary : dict
        ``candidates``, ``kept``, the counts dropped for too few valid AGB pixels or too many
        NaN features, and what `no_chip_reason` needs: ``shape``, ``size_px``,
        ``valid_agb_px`` and ``nan_feature_fraction`` of the whole site.
    """
    site = site or str(ds.attrs.get("site", "site"))
    n_y, n_x = ds.sizes["y"], ds.sizes["x"]
    rows, cols = chip_origins(n_y, n_x, size_px=size_px, overlap=overlap)
    stats, whole = _chip_statistics(ds, rows, cols, size_px)
    too_few = stats["valid_fraction"] < min_valid_fraction
    too_nan = ~too_few & (stats["nan_fraction"] > max_nan_fraction)
    keep = ~(too_few | too_nan)
    summary = {
        "site": site,
        "candidates": int(rows.size),
        "kept": int(keep.sum()),
        "dropped_low_valid_agb": int(too_few.sum()),
        "dropped_nan_features": int(too_nan.sum()),
        "shape": [int(n_y), int(n_x)],
        "size_px": int(size_px),
        **whole,
    }
    rows, cols = rows[keep], cols[keep]
    chips = pd.DataFrame(
        {
            "chip_id": [f"{site}:{r}:{c}" for r, c in zip(rows, cols, strict=True)],
            "site": site,
            "row": rows.astype(np.int64),
            "col": cols.astype(np.int64),
            **{name: values[keep] for name, values in stats.items()},
        }
    )
    geometry = _footprints(ds, rows, cols, size_px)
    gdf = gpd.GeoDataFrame(chips, geometry=geometry, crs=ds.rio.crs).to_crs(CHIP_CRS)
    return gdf, summary


def _chip_statistics(
    ds: xr.Dataset, rows: np.ndarray, cols: np.ndarray, size_px: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every chip's ``agb_mean``, ``valid_fraction`` and ``nan_fraction`` (one pass over the
    cube: per-pixel counts, then window sums for every chip at once), and the whole site's
    valid AGB pixels and NaN feature share."""
    import dask

    agb = ds["agb"]
    valid = np.isfinite(agb)
    nan_count = ds["features"].isnull().sum("band")
    valid_px, agb_filled, nan_px = dask.compute(valid, agb.where(valid, 0.0), nan_count)
    n_px, n_band = size_px * size_px, ds.sizes["band"]
    n_valid = _window_sums(valid_px.values.astype(np.float64), rows, cols, size_px)
    agb_sum = _window_sums(agb_filled.values.astype(np.float64), rows, cols, size_px)
    n_nan = _window_sums(nan_px.values.astype(np.float64), rows, cols, size_px)
    with np.errstate(invalid="ignore", divide="ignore"):
        agb_mean = np.where(n_valid > 0, agb_sum / np.maximum(n_valid, 1), np.nan)
    stats = {
        "agb_mean": agb_mean.astype(np.float64),
        "valid_fraction": n_valid / n_px,
        "nan_fraction": n_nan / (n_px * n_band),
    }
    whole = {
        "valid_agb_px": int(valid_px.values.sum()),
        "nan_feature_fraction": float(nan_px.values.sum() / (valid_px.size * n_band)),
    }
    return stats, whole


def no_chip_reason(
    summary: dict[str, Any], *, min_valid_fraction: float, max_nan_fraction: float
) -> str:
    """Why a site gave no chip, and what to change: from a `make_chips` summary."""
    n_y, n_x = summary["shape"]
    size = summary["size_px"]
    if summary["candidates"] == 0:
        return (
            f"the chip ({size}×{size} px, chips.size) is larger than the site ({n_y}×{n_x} px); "
            "lower chips.size"
        )
    if summary["valid_agb_px"] == 0:
        return (
            "its AGB is NaN everywhere (nodata, or outside cube.agb_range); check the AGB map, "
            "biomass_nodata and cube.agb_range, then rebuild the cube"
        )
    if summary["nan_feature_fraction"] >= 0.999:
        return (
            "its feature bands are all NaN (nodata over the whole site); check the satellite "
            "stack and satellite_nodata, then rebuild the cube"
        )
    share = summary["valid_agb_px"] / (n_y * n_x)
    return (
        f"of {summary['candidates']} chips, {summary['dropped_low_valid_agb']} have less than "
        f"chips.min_valid_fraction={min_valid_fraction:g} valid AGB pixels (the site has valid "
        f"AGB at {share:.1%} of its pixels) and {summary['dropped_nan_features']} more than "
        f"chips.max_nan_fraction={max_nan_fraction:g} NaN feature values (the site's features "
        f"are {summary['nan_feature_fraction']:.1%} NaN); lower chips.min_valid_fraction, "
        "raise chips.max_nan_fraction, or use smaller chips"
    )


def _footprints(ds: xr.Dataset, rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    a = ds.rio.transform()
    x0 = a.c + cols * a.a
    x1 = a.c + (cols + size) * a.a
    y0 = a.f + rows * a.e
    y1 = a.f + (rows + size) * a.e
    return shapely.box(
        np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1)
    )


def local_metric_crs(gdf: gpd.GeoSeries | gpd.GeoDataFrame) -> CRS:
    """A metric CRS for distances among these geometries: their UTM zone."""
    crs = gdf.estimate_utm_crs()
    assert crs is not None
    return crs


def to_local_metric(gdf: gpd.GeoDataFrame, crs: CRS | None = None) -> gpd.GeoDataFrame:
    """Reproject to ``crs`` (default: `local_metric_crs`), for distances in metres."""
    return gdf.to_crs(crs or local_metric_crs(gdf))


def pixel_centres_m(ds: xr.Dataset, rows: np.ndarray, cols: np.ndarray, crs: CRS) -> np.ndarray:
    """Projected (x, y) metres of pixel centres ``(rows, cols)`` of a site's cube."""
    return grid_centres_m(grid_of(ds), ds.rio.crs, rows, cols, crs)


def grid_of(ds: xr.Dataset) -> tuple[float, float, float, float]:
    """The grid ``(x0, dx, y0, dy)`` of a site's cube or maps (the outer corner of the first
    pixel and the step), from its ``x``/``y`` coordinates: no GDAL needed."""
    x, y = ds["x"].values, ds["y"].values
    dx = float(x[1] - x[0]) if x.size > 1 else float(ds.rio.resolution()[0])
    dy = float(y[1] - y[0]) if y.size > 1 else float(ds.rio.resolution()[1])
    return float(x[0]) - dx / 2, dx, float(y[0]) - dy / 2, dy


def grid_box(origin: tuple[float, float, float, float], shape: tuple[int, int]) -> Any:
    """The footprint (a shapely box, in the grid's CRS) of a grid ``origin`` of ``shape``
    rows and columns."""
    x0, dx, y0, dy = origin
    h, w = shape
    (xmin, xmax), (ymin, ymax) = sorted((x0, x0 + w * dx)), sorted((y0, y0 + h * dy))
    return shapely.box(xmin, ymin, xmax, ymax)


def grid_centres_m(
    origin: tuple[float, float, float, float],
    grid_crs: Any,
    rows: np.ndarray,
    cols: np.ndarray,
    crs: Any,
) -> np.ndarray:
    """Projected (x, y) in ``crs`` of the centres of pixels ``(rows, cols)`` of a north-up grid
    ``origin = (x0, dx, y0, dy)`` in ``grid_crs`` (``dy`` negative for north-up)."""
    x0, dx, y0, dy = origin
    tr = Transformer.from_crs(grid_crs, crs, always_xy=True)
    return np.column_stack(tr.transform(x0 + (cols + 0.5) * dx, y0 + (rows + 0.5) * dy))
