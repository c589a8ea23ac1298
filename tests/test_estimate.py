"""Area estimates: the error model of an area's mean, checked against known error fields, and
`agbcube estimate` on maps made by hand."""

from __future__ import annotations

import json
import re

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rioxarray  # noqa: F401  (the .rio accessor)
import shapely
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from agbcube.cli import app
from agbcube.errors import EstimateError
from agbcube.estimate import estimate_areas, write_table
from agbcube.train import errorfield
from agbcube.train.errorfield import area_mean_variance, block_coverage, fit_error_model

MODEL = {
    "sill": 2.0,
    "nugget": 0.5,
    "psill": 1.2,
    "constant": 0.3,
    "range_m": 400.0,
    "beta": 1.0,
}


def _brute_force(scale: np.ndarray, dx: float, dy: float, model: dict) -> float:
    rows, cols = np.nonzero(np.isfinite(scale))
    w = scale[rows, cols]
    d = np.hypot((rows[:, None] - rows) * dy, (cols[:, None] - cols) * dx)
    k = model["constant"] + model["psill"] * np.exp(-3 * d / model["range_m"])
    k[d == 0] = model["sill"]
    return float(w @ k @ w) / len(w) ** 2


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 14),
    w=st.integers(1, 14),
    holes=st.floats(0, 0.6),
    dx=st.floats(5, 100),
    dy=st.floats(5, 100),
    seed=st.integers(0, 2**16),
)
def test_the_variance_of_an_area_mean_is_the_sum_over_every_pair(h, w, holes, dx, dy, seed):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, (h, w))
    scale[rng.random((h, w)) < holes] = np.nan
    if not np.isfinite(scale).any():
        scale[0, 0] = 1.0
    got = area_mean_variance(scale, dx, dy, MODEL)
    assert got["n"] == np.isfinite(scale).sum()
    assert got["variance"] == pytest.approx(_brute_force(scale, dx, dy, MODEL), rel=1e-9)
    naive = MODEL["sill"] * np.nansum(scale**2) / got["n"] ** 2
    assert got["naive_variance"] == pytest.approx(naive, rel=1e-12)


def test_a_large_area_is_summed_on_coarser_cells_and_stays_close(monkeypatch):
    scale = np.random.default_rng(1).uniform(1, 2, (90, 120))
    exact = area_mean_variance(scale, 30, 30, MODEL)["variance"]
    monkeypatch.setattr(errorfield, "MAX_FFT_PIXELS", 1500)  # cells of 3 x 3 pixels
    coarse = area_mean_variance(scale, 30, 30, MODEL)["variance"]
    assert exact <= coarse <= 1.05 * exact  # pairs within a cell at distance 0: a bit wider


def test_an_unmapped_area_has_no_variance():
    got = area_mean_variance(np.full((3, 3), np.nan), 30, 30, MODEL)
    assert got["n"] == 0 and np.isnan(got["variance"])


# --------------------------------------------------------------------------------------------
# known error fields


def _field(rng, shape, *, smooth: float) -> np.ndarray:
    noise = rng.standard_normal(shape)
    if smooth:
        noise = gaussian_filter(noise, smooth)
    return noise / noise.std()


def _pixels(rng, *, smooth: float, sites: int = 3, side: int = 150, pixel_m: float = 30.0):
    """Test pixels of ``sites`` sites, each in 5 folds of vertical strips: a prediction, a
    spread varying in space, and a truth off by twice the spread times a unit field (white, or
    smooth over ``smooth`` pixels)."""
    rows, cols = np.mgrid[0:side, 0:side]
    frames = []
    for s in range(sites):
        spread = 5 + 10 * gaussian_filter(rng.random((side, side)), 8)
        pred = rng.uniform(50, 250, (side, side))
        truth = pred - 2 * spread * _field(rng, (side, side), smooth=smooth)
        frames.append(
            pd.DataFrame(
                {
                    "site": f"s{s}",
                    "fold": (cols * 5 // side).ravel(),
                    "row": rows.ravel(),
                    "col": cols.ravel(),
                    "x_m": (cols.ravel() + 0.5) * pixel_m,
                    "y_m": -(rows.ravel() + 0.5) * pixel_m,
                    "agb_true": truth.ravel(),
                    "agb_pred": pred.ravel(),
                    "agb_std": spread.ravel(),
                }
            )
        )
    pixels = pd.concat(frames, ignore_index=True)
    betas = {f"s{s}": 0.0 for s in range(sites)}
    grids = {f"s{s}": {"dx_m": pixel_m, "dy_m": pixel_m} for s in range(sites)}
    return pixels, betas, grids


@pytest.mark.parametrize("smooth", [0.0, 4.0])
def test_block_intervals_cover_on_a_known_error_field_where_naive_ones_do_not(smooth):
    pixels, betas, grids = _pixels(np.random.default_rng(7), smooth=smooth)
    out = block_coverage(pixels, betas, grids, sizes_km2=(0.5,))["0.5"]
    assert out["n_blocks"] >= 60
    assert 0.85 <= out["coverage"] <= 1.0
    if smooth:  # correlated errors: independent pixels' intervals are far too narrow
        assert out["naive_coverage"] < 0.5
        assert out["mean_half_width"] > 4 * out["naive_mean_half_width"]
    else:  # independent errors: both models agree
        assert out["naive_coverage"] >= 0.85
        assert out["mean_half_width"] == pytest.approx(out["naive_mean_half_width"], rel=0.3)


def test_the_error_model_finds_the_fields_correlation():
    rng = np.random.default_rng(3)
    white = fit_error_model(_pixels(rng, smooth=0.0, sites=1)[0], 0.0)
    smooth = fit_error_model(_pixels(rng, smooth=4.0, sites=1)[0], 0.0)
    assert white["sill"] == pytest.approx(4.0, rel=0.1)  # twice the spread: z has variance 4
    assert white["nugget"] > 0.8 * white["sill"]
    assert smooth["psill"] + smooth["constant"] > 0.8 * smooth["sill"]
    assert 100 < smooth["range_m"] < 1000  # a Gaussian filter of 4 pixels of 30 m


# --------------------------------------------------------------------------------------------
# agbcube estimate


@pytest.fixture
def mapped_run(tmp_path):
    """A run folder with an error model, and maps of one site (UTM 44N, 20 m pixels)."""
    run = tmp_path / "run"
    (run / "maps" / "alpha").mkdir(parents=True)
    area = {"pooled": {**MODEL, "beta": 2.0}, "per_site": {"alpha": MODEL}}
    metrics = {"primary_model": "cnn", "intervals": {"cnn": {"area": area}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    rng = np.random.default_rng(0)
    x = 500_000 + 10 + 20 * np.arange(60.0)
    y = 2_400_000 - 10 - 20 * np.arange(50.0)
    mean = rng.uniform(50, 200, (50, 60)).astype(np.float32)
    mean[:5, :5] = np.nan  # a hole
    maps = xr.Dataset(
        {
            "agb_mean": (("y", "x"), mean),
            "agb_std": (("y", "x"), rng.uniform(5, 20, (50, 60)).astype(np.float32)),
            "agb_spread": (("y", "x"), rng.uniform(1, 10, (50, 60)).astype(np.float32)),
            "aoa": (("y", "x"), np.where(np.arange(60) < 30, 1.0, 0.0)[None].repeat(50, 0)),
        },
        coords={"x": x, "y": y},
        attrs={"site": "alpha"},
    ).rio.write_crs("EPSG:32644")
    maps.to_zarr(run / "maps" / "alpha" / "maps.zarr", zarr_format=2)
    return run, maps


def _box(x0, y0, x1, y1, crs="EPSG:32644", **cols):
    return gpd.GeoDataFrame(cols, geometry=[shapely.box(x0, y0, x1, y1)], crs=crs)


def test_an_area_estimate_is_the_maps_mean_over_the_polygon(mapped_run):
    run, maps = mapped_run
    areas = _box(500_200, 2_399_400, 500_600, 2_399_800, name=["stand"])  # 20 x 20 pixels
    got = estimate_areas(run, areas).iloc[0]
    inside = maps["agb_mean"].sel(x=slice(500_200, 500_600), y=slice(2_399_800, 2_399_400))
    assert inside.shape == (20, 20)
    assert got["agb_mean_mg_ha"] == pytest.approx(float(inside.mean()), rel=1e-6)
    assert got["n_pixels"] == 400 and got["mapped_fraction"] == pytest.approx(1.0, abs=1e-3)
    assert got["area_ha"] == pytest.approx(16.0, rel=2e-3)  # UTM scale factor: geodesic area
    assert got["agb_total_mg"] == pytest.approx(got["agb_mean_mg_ha"] * got["mapped_ha"])
    assert got["carbon_mg"] == pytest.approx(0.47 * got["agb_total_mg"])
    assert got["co2e_mg"] == pytest.approx(44 / 12 * got["carbon_mg"])
    window = {"x": slice(500_200, 500_600), "y": slice(2_399_800, 2_399_400)}
    std = maps["agb_spread"].sel(**window).values  # the spread the run calibrated
    model = area_mean_variance(std.astype(np.float64) + MODEL["beta"], 20, 20, MODEL)
    assert got["agb_mean_se"] == pytest.approx(np.sqrt(model["variance"]), rel=0.01)
    half = 1.959964 * got["agb_mean_se"]
    assert got["agb_mean_upper"] == pytest.approx(got["agb_mean_mg_ha"] + half, rel=1e-6)
    assert got["agb_mean_se"] > 3 * got["agb_mean_se_naive"]  # correlated errors
    assert got["aoa_fraction"] == 1.0 and got["error_model"] == "site 'alpha'"


def test_polygons_in_another_crs_give_the_same_estimate(mapped_run):
    run, _ = mapped_run
    utm = _box(500_200, 2_399_400, 500_600, 2_399_800)
    a = estimate_areas(run, utm).iloc[0]
    b = estimate_areas(run, utm.to_crs(4326)).iloc[0]
    assert b["agb_mean_mg_ha"] == pytest.approx(a["agb_mean_mg_ha"], rel=0.01)
    assert abs(b["n_pixels"] - a["n_pixels"]) <= 4  # the box's edges, reprojected
    assert b["area_ha"] == pytest.approx(a["area_ha"], rel=1e-3)


def test_parts_outside_the_maps_and_holes_are_reported(mapped_run):
    run, _ = mapped_run
    # half the box beyond the maps' west edge, and over the hole in the north-west corner
    areas = _box(499_800, 2_399_800, 500_200, 2_400_000)
    got = estimate_areas(run, areas).iloc[0]
    assert got["outside_maps_ha"] == pytest.approx(4.0, rel=0.01)
    assert got["n_pixels"] == 10 * 10 - 5 * 5
    assert got["mapped_fraction"] == pytest.approx(75 / 200, rel=0.01)
    east = estimate_areas(run, _box(501_000, 2_399_400, 501_200, 2_399_600)).iloc[0]
    assert east["aoa_fraction"] == 0.0  # all outside the area of applicability
    hole = _box(500_000, 2_399_920, 500_080, 2_400_000, name=["in the hole"])
    with pytest.warns(UserWarning, match="name='in the hole' of the areas holds no mapped pixel"):
        got = estimate_areas(run, pd.concat([areas.assign(name="half out"), hole]))
    assert got["n_pixels"].tolist() == [75, 0] and np.isnan(got["agb_total_mg"].iloc[1])


def test_an_area_of_a_new_site_uses_the_pooled_model(mapped_run):
    run, _ = mapped_run
    ds = xr.open_zarr(run / "maps" / "alpha" / "maps.zarr")
    moved = run / "maps" / "new"
    ds.assign_attrs(site="new").to_zarr(moved / "maps.zarr", zarr_format=2)
    got = estimate_areas(run, _box(500_200, 2_399_400, 500_600, 2_399_800), maps=moved)
    assert got.iloc[0]["error_model"] == "pooled"


def test_the_table_is_written_by_extension_and_replaced_only_when_its_own(mapped_run, tmp_path):
    run, _ = mapped_run
    table = estimate_areas(run, _box(500_200, 2_399_400, 500_600, 2_399_800, name=["a"]))
    for ext in ("parquet", "gpkg", "csv"):
        path = write_table(table, tmp_path / f"t.{ext}")
        write_table(table, path)  # its own: replaced
    assert gpd.read_parquet(tmp_path / "t.parquet").crs == table.crs
    assert gpd.read_file(tmp_path / "t.gpkg")["agb_total_mg"].iloc[0] == pytest.approx(
        table["agb_total_mg"].iloc[0]
    )
    assert "geometry_wkt" in pd.read_csv(tmp_path / "t.csv").columns
    mine = tmp_path / "mine.csv"
    mine.write_text("a,b\n1,2\n")
    with pytest.raises(Exception, match="not written by agbcube"):
        write_table(table, mine)
    assert mine.read_text() == "a,b\n1,2\n"


def test_the_cli_prints_the_table_and_writes_the_file(mapped_run, tmp_path):
    run, _ = mapped_run
    areas = tmp_path / "areas.gpkg"
    _box(500_200, 2_399_400, 500_600, 2_399_800, name=["stand-7"]).to_file(areas)
    out = tmp_path / "estimate.parquet"
    result = CliRunner().invoke(
        app, ["estimate", str(run), "--areas", str(areas), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "stand-7" in result.stdout and out.is_file()
    assert gpd.read_parquet(out)["name"].tolist() == ["stand-7"]


def _junk(path):
    path.write_text("not a GeoPackage")
    return path


def _areas_file(tmp_path, frame, name="areas.gpkg"):
    path = tmp_path / name
    frame.to_file(path)
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "missing.gpkg", r"missing\.gpkg does not exist"),
        (lambda p: _junk(p / "junk.gpkg"), "junk.gpkg cannot be read as polygons"),
        (
            lambda p: _areas_file(p, _box(0, 0, 1, 1).set_crs(None, allow_override=True)),
            "has no CRS",
        ),
        (
            lambda p: _areas_file(
                p,
                gpd.GeoDataFrame(
                    {"name": ["bowtie"]},
                    geometry=[shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1)])],
                    crs="EPSG:32644",
                ),
            ),
            r"name='bowtie' is not a valid polygon \(Self-intersection",
        ),
        (
            lambda p: _areas_file(
                p, gpd.GeoDataFrame(geometry=[shapely.Point(0, 0)], crs="EPSG:32644")
            ),
            "row 0 is a Point, not a polygon",
        ),
        (
            lambda p: _areas_file(p, _box(0, 0, 100, 100, id=[17])),
            "id=17 of the areas lies outside every map",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:.crs. was not provided")
def test_bad_areas_are_one_line_naming_the_polygon_or_file(mapped_run, tmp_path, make, match):
    run, _ = mapped_run
    result = CliRunner().invoke(app, ["estimate", str(run), "--areas", str(make(tmp_path))])
    assert result.exit_code == 2, result.output
    assert "EstimateError" in result.output and len(result.output.strip().splitlines()) == 1
    assert re.search(match, result.output), result.output


def test_a_run_without_an_error_model_or_maps_is_named(mapped_run, tmp_path):
    run, _ = mapped_run
    areas = _box(500_200, 2_399_400, 500_600, 2_399_800)
    with pytest.raises(EstimateError, match="no maps under"):
        estimate_areas(run, areas, maps=tmp_path / "nowhere")
    (run / "metrics.json").write_text(json.dumps({"primary_model": "cnn", "intervals": {}}))
    with pytest.raises(EstimateError, match="holds no error model of area means"):
        estimate_areas(run, areas)
    area = {"pooled": {**MODEL, "range_m": "far"}, "per_site": {}}
    damaged = {"primary_model": "cnn", "intervals": {"cnn": {"area": area}}}
    (run / "metrics.json").write_text(json.dumps(damaged))
    with pytest.raises(EstimateError, match="area means .intervals → area. is damaged"):
        estimate_areas(run, areas)
    (run / "metrics.json").unlink()
    with pytest.raises(EstimateError, match="is not a finished training run"):
        estimate_areas(run, areas)


def test_the_polygons_own_index_and_columns_are_kept(mapped_run):
    run, _ = mapped_run
    areas = pd.concat(
        [
            _box(500_200, 2_399_400, 500_600, 2_399_800, owner=["x"]),
            _box(500_000, 2_399_000, 500_400, 2_399_200, owner=["y"]),
        ]
    ).set_index(pd.Index(["stand-b", "stand-a"], name="stand"))
    got = estimate_areas(run, areas)
    assert got.index.tolist() == ["stand-b", "stand-a"] and got.index.name == "stand"
    assert got["owner"].tolist() == ["x", "y"] and got.crs == areas.crs
    assert got.loc["stand-a", "n_pixels"] == 20 * 10


def test_maps_from_before_the_fold_spread_are_scaled_by_their_std(mapped_run):
    run, _ = mapped_run
    ds = xr.open_zarr(run / "maps" / "alpha" / "maps.zarr")
    old = run / "old-maps"
    ds.drop_vars("agb_spread").to_zarr(old / "maps.zarr", zarr_format=2)
    areas = _box(500_200, 2_399_400, 500_600, 2_399_800)
    new_se = estimate_areas(run, areas).iloc[0]["agb_mean_se"]
    old_se = estimate_areas(run, areas, maps=old).iloc[0]["agb_mean_se"]
    assert old_se > new_se  # agb_std (5-20) is wider than agb_spread (1-10) here


def test_polygons_in_a_crs_that_cannot_reach_the_maps_are_one_error(mapped_run):
    run, _ = mapped_run
    local = gpd.GeoDataFrame(
        geometry=[shapely.box(0, 0, 1, 1)], crs='LOCAL_CS["site",UNIT["metre",1]]'
    )
    with pytest.raises(EstimateError, match="cannot be transformed to the maps'"):
        estimate_areas(run, local)


def test_a_run_without_a_spread_gives_every_pixel_one_scale(mapped_run):
    run, _ = mapped_run  # e.g. one member per fold: the CV's errors were not scaled
    area = {"pooled": {**MODEL, "scaled": False}, "per_site": {"alpha": {**MODEL, "scaled": False}}}
    metrics = {"primary_model": "cnn", "intervals": {"cnn": {"area": area}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    got = estimate_areas(run, _box(500_200, 2_399_400, 500_600, 2_399_800)).iloc[0]
    ones = area_mean_variance(np.ones((20, 20)), 20, 20, MODEL)
    assert got["agb_mean_se"] == pytest.approx(np.sqrt(ones["variance"]), rel=0.01)
    assert got["agb_mean_upper"] > got["agb_mean_mg_ha"]  # never a zero-width interval
