from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agbcube.demo import config_yaml, demo_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_demo_config_is_the_generated_one():
    shipped = (ROOT / "configs" / "demo.yaml").read_text()
    assert shipped == config_yaml(demo_config("../demo-output/data", "../demo-output"))


def test_demo_sites_have_the_promised_quirks(demo_dir):
    import rasterio

    with rasterio.open(demo_dir / "data" / "beta_satellite.tif") as src:
        assert src.crs.to_epsg() != 4326 and src.dtypes[0] == "float64" and src.nodata == -9999
        assert abs(src.res[0] - 30) < 1e-9
    with rasterio.open(demo_dir / "data" / "beta_biomass.tif") as src:
        assert src.crs.to_epsg() == 4326
    with rasterio.open(demo_dir / "data" / "gamma_satellite.tif") as src:
        assert not any(src.descriptions)
    with rasterio.open(demo_dir / "data" / "gamma_biomass.tif") as src:
        agb = src.read(1)
        assert src.nodata is None and (agb == 0).any()


def test_demo_agb_follows_the_bands(demo_config):
    """The known relation: canopy height rises with AGB at every site."""
    import numpy as np

    from agbcube.cube import open_cube

    for site in ("alpha", "beta", "gamma"):
        ds = open_cube(demo_config.cube.output, site)
        ch = ds.features.sel(band="CH").values.ravel()
        agb = ds.agb.values.ravel()
        ok = np.isfinite(ch) & np.isfinite(agb)
        assert np.corrcoef(ch[ok], agb[ok])[0, 1] > 0.5


@pytest.mark.slow
def test_demo_command_runs_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from agbcube.cli import app

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--output", str(out), "--size", "64", "--quiet"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((out / "demo.yaml").read_text())
    assert [s["name"] for s in cfg["sites"]] == ["alpha", "beta", "gamma"]
    for path in (
        "cubes/demo.zarr",
        "runs/folds.parquet",
        "runs/demo/metrics.json",
        "runs/demo/plots/predicted_vs_observed.png",
    ):
        assert (out / path).exists(), path
    assert "cross-validated accuracy" in result.output
