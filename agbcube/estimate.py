"""Area estimates: the total AGB (and carbon) of polygons from a run's maps, with honest intervals.

A polygon's mean AGB is the mean of the mapped pixels inside it (pixel centres), its total the
mean times the mapped area. The confidence interval of the mean comes from the error model the
run fitted to its cross-validation's held-out pixels (`agbcube.train.errorfield`): the errors
of a map's pixels are correlated over hundreds of metres and share a part no area averages
away, so the variance of the mean is summed over every pair of the polygon's pixels, each
scaled by the map's fold ensemble spread there (``agb_spread``, the spread the run
calibrated). A map of one of the run's sites uses that site's
model, a new area the model pooled over the run's sites. A polygon over several sites' maps
adds their variances (their errors taken as independent).

What is not mapped is reported, not filled in: ``outside_maps_ha`` (no map covers it) and
``mapped_fraction`` (the share of the polygon with a mapped pixel); totals are of the mapped
part. ``aoa_fraction`` is the share of the mapped part inside the area of applicability: what
lies outside it is extrapolation, and the CV's errors say nothing about it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import xarray as xr
from pyproj import CRS, Geod
from scipy.stats import norm

from agbcube._io import atomic_path, check_outside_stores, check_replaceable
from agbcube._store import cube_crs
from agbcube.chips import grid_box, grid_of, local_metric_crs
from agbcube.errors import EstimateError, one_line
from agbcube.train.errorfield import area_mean_variance, metric_grid
from agbcube.train.intervals import spread_scales

__all__ = [
    "CARBON_FRACTION",
    "TABLE_FORMATS",
    "check_areas",
    "error_models",
    "estimate_areas",
    "read_areas",
    "table_format",
    "write_table",
]

CARBON_FRACTION = 0.47
"""Carbon per unit dry biomass (IPCC 2006 default for forests)."""

CO2_PER_C = 44.0 / 12.0
TABLE_FORMATS = {".parquet": "GeoParquet", ".gpkg": "GeoPackage", ".csv": "CSV"}
_GEOD = Geod(ellps="WGS84")
_NAMED = 6  # polygons named in one error
_SPREAD = "agb_spread"  # the layer that scales each pixel's error


# --------------------------------------------------------------------------------------------
# the polygons


def _label(areas: gpd.GeoDataFrame, i: int) -> str:
    for col in ("name", "id", "NAME", "ID"):
        if col in areas.columns:
            value = areas[col].iloc[i]
            return f"{col}={value.item() if isinstance(value, np.generic) else value!r}"
    return f"row {i}"


def _labels(areas: gpd.GeoDataFrame, rows: Iterable[int]) -> str:
    rows = list(rows)
    named = ", ".join(_label(areas, i) for i in rows[:_NAMED])
    return named + (f" and {len(rows) - _NAMED} more" if len(rows) > _NAMED else "")


def read_areas(path: str | Path) -> gpd.GeoDataFrame:
    """Read the polygons of ``path`` (GeoPackage, GeoJSON, Shapefile, GeoParquet, …), checked.

    Raises
    ------
    EstimateError
        The file cannot be read, holds no polygons, geometries that are not polygons or are
        invalid, or has no CRS.
    """
    path = Path(path)
    if not path.exists():
        raise EstimateError(f"areas file {path} does not exist")
    try:
        areas = gpd.read_parquet(path) if path.suffix == ".parquet" else gpd.read_file(path)
    except Exception as err:  # pyogrio's and pyarrow's errors differ by format
        raise EstimateError(
            f"areas file {path} cannot be read as polygons ({one_line(err, 200)}); give a "
            "GeoPackage, GeoJSON, Shapefile or GeoParquet file"
        ) from None
    return check_areas(areas, str(path))


def check_areas(areas: gpd.GeoDataFrame, source: str = "areas") -> gpd.GeoDataFrame:
    """``areas`` if every geometry is a valid polygon with a known CRS, else `EstimateError`."""
    if not isinstance(areas, gpd.GeoDataFrame) or len(areas) == 0:
        raise EstimateError(f"{source} holds no polygons")
    if areas.crs is None:
        raise EstimateError(
            f"{source} has no CRS, so where its polygons lie is unknown; save it with its CRS "
            "(e.g. `ogr2ogr -a_srs EPSG:32644 fixed.gpkg areas.gpkg`, or GeoDataFrame.set_crs)"
        )
    geoms = areas.geometry
    missing = np.flatnonzero(geoms.isna() | geoms.is_empty)
    if missing.size:
        raise EstimateError(f"{source}: {_labels(areas, missing)} has no geometry")
    kinds = geoms.geom_type.to_numpy()
    other = np.flatnonzero(~np.isin(kinds, ["Polygon", "MultiPolygon"]))
    if other.size:
        raise EstimateError(
            f"{source}: {_labels(areas, other)} is a {kinds[other[0]]}, not a polygon; an "
            "area estimate needs polygons"
        )
    invalid = np.flatnonzero(~geoms.is_valid.to_numpy())
    if invalid.size:
        why = shapely.is_valid_reason(geoms.iloc[invalid[0]])
        raise EstimateError(
            f"{source}: {_labels(areas, invalid)} is not a valid polygon ({why}); repair it "
            "(e.g. shapely.make_valid, or QGIS 'Fix geometries') and run again"
        )
    return areas


def _to_crs(areas: gpd.GeoDataFrame, crs: Any) -> gpd.GeoSeries:
    """The polygons in ``crs``; `EstimateError` when their CRS cannot be transformed."""
    try:
        out = areas.geometry.to_crs(crs)
    except Exception as err:  # pyproj's errors for a CRS it cannot transform
        raise EstimateError(
            f"the areas' CRS ({areas.crs.name}) cannot be transformed to the maps' "
            f"({one_line(err, 160)}); save the polygons in a standard CRS such as EPSG:4326"
        ) from None
    if not np.isfinite(out.total_bounds).all():
        raise EstimateError(
            f"the areas' CRS ({areas.crs.name}) puts them nowhere on the maps' (infinite "
            "coordinates): check the CRS the file declares"
        )
    return out


def _area_ha(geom: Any) -> float:
    """Geodesic area (ha) of a geometry in EPSG:4326."""
    return abs(_GEOD.geometry_area_perimeter(geom)[0]) / 1e4


# --------------------------------------------------------------------------------------------
# the maps and the error model


def _map_folders(maps: Path) -> list[Path]:
    if (maps / "maps.zarr").is_dir():
        return [maps]
    return sorted(p.parent for p in maps.glob("*/maps.zarr"))


def _open_maps(run_dir: Path, maps: Path | None) -> list[xr.Dataset]:
    root = Path(maps) if maps is not None else run_dir / "maps"
    folders = _map_folders(root) if root.is_dir() else []
    if not folders:
        raise EstimateError(
            f"no maps under {root} (no maps.zarr): run `agbcube predict {run_dir}` first, or "
            "give --maps the folder `agbcube predict --output` wrote"
        )
    out = []
    for folder in folders:
        try:
            ds = xr.open_zarr(folder / "maps.zarr")
        except Exception as err:
            raise EstimateError(
                f"maps {folder / 'maps.zarr'} cannot be read ({one_line(err, 200)}); run "
                f"`agbcube predict {run_dir}` again"
            ) from None
        if "agb_mean" not in ds or (_SPREAD not in ds and "agb_std" not in ds):
            raise EstimateError(
                f"maps {folder / 'maps.zarr'} hold no agb_mean and agb_spread: they are not "
                f"agbcube's maps; run `agbcube predict {run_dir}`"
            )
        out.append(ds.assign_attrs(folder=str(folder)))
    return out


def error_models(run_dir: str | Path) -> dict[str, Any]:
    """The run's error model of area means (``pooled`` and ``per_site``, from metrics.json).

    Raises
    ------
    EstimateError
        The run has no metrics.json, or one from before area error models.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        models = metrics["intervals"][metrics["primary_model"]]["area"]
    except FileNotFoundError:
        raise EstimateError(
            f"{path} does not exist: {run_dir} is not a finished training run; finish it with "
            f"`agbcube train CONFIG --output {run_dir} --resume`"
        ) from None
    except (KeyError, TypeError):
        raise EstimateError(
            f"{path} holds no error model of area means (intervals → area): the run was "
            "assembled by an older agbcube; `agbcube train CONFIG --output "
            f"{run_dir} --resume` recomputes its metrics and keeps its fits"
        ) from None
    except (OSError, ValueError) as err:
        raise EstimateError(f"{path} cannot be read ({one_line(err, 200)})") from None
    if not _valid_models(models):
        raise EstimateError(
            f"{path}: its error model of area means (intervals → area) is damaged; "
            f"`agbcube train CONFIG --output {run_dir} --resume` recomputes it"
        )
    return models


_MODEL_KEYS = ("sill", "nugget", "psill", "constant", "range_m", "beta")


def _valid_models(models: Any) -> bool:
    """Whether ``models`` holds a pooled error model and per-site ones of numbers."""

    def valid(m: Any) -> bool:
        return (
            isinstance(m, dict)
            and all(isinstance(m.get(k), int | float) and np.isfinite(m[k]) for k in _MODEL_KEYS)
            and m["range_m"] > 0
            and min(m[k] for k in _MODEL_KEYS) >= 0
        )

    if not isinstance(models, dict) or not isinstance(models.get("per_site", {}), dict):
        return False
    return valid(models.get("pooled")) and all(map(valid, models.get("per_site", {}).values()))


def _model_of(models: dict[str, Any], site: str) -> tuple[dict[str, Any], str]:
    own = models.get("per_site", {}).get(site)
    return (own, f"site '{site}'") if own else (models["pooled"], "pooled")


# --------------------------------------------------------------------------------------------
# one polygon on one map


def _window(geom: Any, origin: tuple[float, ...], shape: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of the map that ``geom``'s bounds cover (possibly empty)."""
    x0, dx, y0, dy = origin
    minx, miny, maxx, maxy = geom.bounds
    c = sorted(((minx - x0) / dx, (maxx - x0) / dx))
    r = sorted(((miny - y0) / dy, (maxy - y0) / dy))
    c0, c1 = max(0, int(np.floor(c[0]))), min(shape[1], int(np.ceil(c[1])))
    r0, r1 = max(0, int(np.floor(r[0]))), min(shape[0], int(np.ceil(r[1])))
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _inside(geom: Any, origin: tuple[float, ...], rows: slice, cols: slice) -> np.ndarray:
    """Whether each pixel centre of the window lies in ``geom``."""
    x0, dx, y0, dy = origin
    xs = x0 + (np.arange(cols.start, cols.stop) + 0.5) * dx
    ys = y0 + (np.arange(rows.start, rows.stop) + 0.5) * dy
    xx, yy = np.meshgrid(xs, ys)
    return shapely.contains_xy(geom, xx, yy)


@dataclass(frozen=True)
class _Map:
    """One site's maps and what every polygon on them needs, found once."""

    ds: xr.Dataset
    site: str
    origin: tuple[float, float, float, float]  # `grid_of`
    crs: str  # WKT
    extent: Any  # in EPSG:4326
    metric: Any  # the metric CRS its pixels are measured in

    @classmethod
    def of(cls, ds: xr.Dataset) -> _Map:
        origin, crs = grid_of(ds), cube_crs(ds)
        box = shapely.segmentize(grid_box(origin, (ds.sizes["y"], ds.sizes["x"])), _step(origin))
        extent = gpd.GeoSeries([box], crs=crs).to_crs(4326)
        site = str(ds.attrs.get("site", ""))
        return cls(ds, site, origin, crs, extent.iloc[0], local_metric_crs(extent))


def _step(origin: tuple[float, ...]) -> float:
    """Vertices every 16 pixels along a map's edge (a reprojected edge bends)."""
    return max(abs(origin[1]), abs(origin[3])) * 16


def _on_map(geom: Any, m: _Map, model: dict[str, Any]) -> dict[str, Any] | None:
    """The mapped pixels of ``geom`` (in the map's CRS) on map ``m``: their count and area,
    sums of AGB and of the AOA, and the variance of their mean; None without any."""
    ds, origin = m.ds, m.origin
    rows, cols = _window(geom, origin, (ds.sizes["y"], ds.sizes["x"]))
    if rows.stop <= rows.start or cols.stop <= cols.start:
        return None
    window = ds.isel(y=rows, x=cols)
    mean = window["agb_mean"].values.astype(np.float64)
    mapped = _inside(geom, origin, rows, cols) & np.isfinite(mean)
    if not mapped.any():
        return None
    # the spread the run calibrated (maps from before agb_spread: the members' s.d.)
    spread = window[_SPREAD if _SPREAD in window else "agb_std"]
    std = spread.values.astype(np.float64) if model.get("scaled", True) else None
    w = spread_scales(std, model["beta"])  # as the run fitted it
    scale = np.where(mapped, w, np.nan)
    grid = metric_grid(
        (
            origin[0] + cols.start * origin[1],
            origin[1],
            origin[2] + rows.start * origin[3],
            origin[3],
        ),
        m.crs,
        mapped.shape,
        m.metric,
    )
    var = area_mean_variance(scale, grid["dx_m"], grid["dy_m"], model)
    aoa = window["aoa"].values[mapped] if "aoa" in window else np.full(mapped.sum(), np.nan)
    return {
        "n": int(mapped.sum()),
        "ha": mapped.sum() * grid["dx_m"] * grid["dy_m"] / 1e4,
        "agb_sum": float(mean[mapped].sum()),
        "aoa_sum": float(np.nansum(aoa == 1)),
        **{k: var[k] for k in ("variance", "naive_variance")},
    }


# --------------------------------------------------------------------------------------------
# the table


def _combine(parts: list[dict[str, Any]], z: float) -> dict[str, float]:
    """Mean AGB of several maps' parts (area-weighted), its standard errors and interval
    (NaN without any part)."""
    if not parts:
        keys = ("aoa_fraction", "agb_mean_mg_ha", "agb_mean_se", "agb_mean_se_naive")
        keys += ("agb_mean_lower", "agb_mean_upper")
        return {"mapped_ha": 0.0, "n_pixels": 0, **dict.fromkeys(keys, float("nan"))}
    ha = sum(p["ha"] for p in parts)
    mean = sum(p["agb_sum"] / p["n"] * p["ha"] for p in parts) / ha
    se = np.sqrt(sum((p["ha"] / ha) ** 2 * p["variance"] for p in parts))
    naive = np.sqrt(sum((p["ha"] / ha) ** 2 * p["naive_variance"] for p in parts))
    return {
        "mapped_ha": ha,
        "n_pixels": sum(p["n"] for p in parts),
        "aoa_fraction": sum(p["aoa_sum"] for p in parts) / sum(p["n"] for p in parts),
        "agb_mean_mg_ha": mean,
        "agb_mean_se": se,
        "agb_mean_se_naive": naive,
        "agb_mean_lower": max(mean - z * se, 0.0),
        "agb_mean_upper": mean + z * se,
    }


def _totals(row: dict[str, float], carbon_fraction: float) -> dict[str, float]:
    """Totals (Mg) of the mapped part: AGB, carbon and CO₂e, with their bounds."""
    out = {}
    for suffix, mean in (
        ("", "agb_mean_mg_ha"),
        ("_lower", "agb_mean_lower"),
        ("_upper", "agb_mean_upper"),
    ):
        agb = row[mean] * row["mapped_ha"]
        out[f"agb_total_mg{suffix}"] = agb
        out[f"carbon_mg{suffix}"] = agb * carbon_fraction
        out[f"co2e_mg{suffix}"] = agb * carbon_fraction * CO2_PER_C
    return out


def estimate_areas(
    run_dir: str | Path,
    areas: str | Path | gpd.GeoDataFrame,
    *,
    maps: str | Path | None = None,
    carbon_fraction: float = CARBON_FRACTION,
    level: float = 0.95,
) -> gpd.GeoDataFrame:
    """Total AGB, carbon and CO₂e of each polygon, with confidence intervals.

    Parameters
    ----------
    run_dir : str or Path
        A finished training run (its metrics.json holds the error model of area means).
    areas : str, Path or gpd.GeoDataFrame
        Polygons in any CRS (a file: GeoPackage, GeoJSON, Shapefile or GeoParquet).
    maps : str or Path, optional
        The maps: a folder of site folders, or one site's folder, as `agbcube predict` wrote
        them. Default ``run_dir/maps``.
    carbon_fraction : float
        Carbon per unit dry biomass.
    level : float
        Confidence level of the intervals.

    Returns
    -------
    gpd.GeoDataFrame
        The polygons (their own columns and CRS) with ``area_ha``, ``outside_maps_ha``,
        ``mapped_ha``, ``mapped_fraction``, ``n_pixels``, ``aoa_fraction``,
        ``agb_mean_mg_ha`` with ``agb_mean_se`` (and ``agb_mean_se_naive``, the standard error
        were the pixels' errors independent) and its ``_lower``/``_upper`` bounds,
        ``agb_total_mg``, ``carbon_mg`` and ``co2e_mg`` each with ``_lower``/``_upper``, the
        ``maps`` used and the ``error_model`` (a site's or pooled).

    Raises
    ------
    EstimateError
        Bad polygons, polygons outside every map, no maps, or a run without an error model.
    """
    if not 0 < level < 1:
        raise EstimateError(f"level {level} is not between 0 and 1 (e.g. 0.95)")
    if not 0 < carbon_fraction <= 1:
        raise EstimateError(f"carbon fraction {carbon_fraction} is not in (0, 1] (e.g. 0.47)")
    areas = read_areas(areas) if not isinstance(areas, gpd.GeoDataFrame) else check_areas(areas)
    run_dir = Path(run_dir)
    models = error_models(run_dir)
    maps_ = [_Map.of(ds) for ds in _open_maps(run_dir, None if maps is None else Path(maps))]
    z = float(norm.ppf(0.5 + level / 2))
    in_4326 = _to_crs(areas, 4326)
    extents = [m.extent for m in maps_]
    per_map = [_to_crs(areas, CRS.from_wkt(m.crs)) for m in maps_]
    off = [i for i, g in enumerate(in_4326) if not any(g.intersects(e) for e in extents)]
    if off:  # before any work
        _no_overlap(areas, off, maps_)
    rows, unmapped = [], []
    for i in range(len(areas)):
        parts = _parts([g.iloc[i] for g in per_map], maps_, models)
        unmapped += [] if parts else [i]
        covered = shapely.union_all([in_4326.iloc[i].intersection(e) for e in extents])
        rows.append(_row(parts, in_4326.iloc[i], covered, z, carbon_fraction))
    if unmapped:
        warnings.warn(
            f"{_labels(areas, unmapped)} of the areas hold{'s' if len(unmapped) == 1 else ''} "
            "no mapped pixel (no data in the maps there, or no pixel centre inside): their "
            "rows have n_pixels 0 and no estimate",
            UserWarning,
            stacklevel=2,
        )
    table = pd.DataFrame(rows)
    out = areas.copy()  # the user's index, columns and CRS, row for row
    for col in table.columns:
        out[col] = table[col].to_numpy()
    out.attrs["estimate"] = {
        "run": str(run_dir),
        "level": level,
        "carbon_fraction": carbon_fraction,
    }
    return out


def _parts(geoms: list[Any], maps: list[_Map], models: dict[str, Any]) -> list[dict[str, Any]]:
    """A polygon's mapped pixels on each map it overlaps (``geoms``: it in each map's CRS),
    each with the map's site and whose error model it took."""
    parts = []
    for geom, m in zip(geoms, maps, strict=True):
        model, source = _model_of(models, m.site)
        part = _on_map(geom, m, model)
        if part is not None:
            parts.append({**part, "site": m.site, "model": source})
    return parts


def _row(
    parts: list[dict[str, Any]], geom: Any, covered: Any, z: float, carbon_fraction: float
) -> dict[str, Any]:
    """One polygon's table row (``geom`` and its part ``covered`` by maps, in EPSG:4326)."""
    area_ha = _area_ha(geom)
    row = _combine(parts, z)
    return {
        "area_ha": area_ha,
        "outside_maps_ha": max(area_ha - _area_ha(covered), 0.0),
        "mapped_fraction": min(row["mapped_ha"] / area_ha, 1.0) if area_ha else 0.0,
        **row,
        **_totals(row, carbon_fraction),
        "maps": ",".join(p["site"] for p in parts),
        "error_model": ",".join(p["model"] for p in parts),
    }


def _no_overlap(areas: gpd.GeoDataFrame, outside: list[int], maps: list[_Map]) -> None:
    """Raise `EstimateError` naming the polygons ``outside`` every map."""
    sites = ", ".join(m.site or str(m.ds.attrs.get("folder")) for m in maps)
    raise EstimateError(
        f"{_labels(areas, outside)} of the areas lie{'s' if len(outside) == 1 else ''} outside "
        f"every map ({sites}); map those areas first (`agbcube predict RUN --config "
        "NEW_AREA.yaml`) or leave them out"
    )


def table_format(path: str | Path) -> str:
    """The table format of an output path, by its extension, checked to be writable there:
    `EstimateError` for an unknown extension, `OutputExistsError` for a file agbcube did not
    write (or a path inside a Zarr store)."""
    fmt = TABLE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise EstimateError(
            f"output {path}: unknown table format {Path(path).suffix!r}; use one of "
            f"{', '.join(TABLE_FORMATS)}"
        )
    check_outside_stores(path, what="estimate table")
    check_replaceable(path, what="estimate table")
    return fmt


def write_table(table: gpd.GeoDataFrame, path: str | Path) -> Path:
    """Write an estimate table as GeoParquet, GeoPackage or CSV (by extension), atomically."""
    path = Path(path)
    fmt = table_format(path)
    with atomic_path(path, what="estimate table") as tmp:
        if fmt == "GeoParquet":
            table.to_parquet(tmp)
        elif fmt == "GeoPackage":
            with warnings.catch_warnings():  # the temporary's name has no .gpkg
                warnings.filterwarnings("ignore", "The filename extension", RuntimeWarning)
                table.to_file(tmp, driver="GPKG", layer=path.stem)
        else:
            pd.DataFrame(table.drop(columns=table.geometry.name)).assign(
                geometry_wkt=table.geometry.to_wkt()
            ).to_csv(tmp, index=False)
    return path
