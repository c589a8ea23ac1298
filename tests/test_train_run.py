"""Whole cross-validation runs: tasks, outputs, resume, data paths, ensembles."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import torch
import xarray as xr

from agbcube._store import open_cube
from agbcube.errors import ConfigError, FoldError, OutputExistsError, TrainingError
from agbcube.estimate import estimate_areas
from agbcube.train import load_ensemble, run_cv

pytestmark = pytest.mark.slow


def _small(demo_config, **train):
    """The demo config with a small, short dense model and these train settings."""
    settings = {"epochs": 2, "conv_channels": [8], "ensemble": 2, "hgb_max_pixels": 2000}
    return demo_config.model_copy(
        update={"train": demo_config.train.model_copy(update={**settings, **train})}
    )


def test_run_writes_every_output_and_maps_a_site(demo_config, demo_folds, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = run_cv(_small(demo_config), output=out, device="cpu")
    n = demo_config.folds.n_folds
    # a bar of the run's fits (select, 2 members, baseline per fold), one line in a log
    bars = [line for line in capsys.readouterr().err.splitlines() if "━" in line]
    assert len(bars) == 1 and bars[0].startswith("training") and f"{4 * n}/{4 * n} tasks" in bars[0]
    for name in (
        "run.json",
        "config.yaml",
        "folds.parquet",
        "predictions.parquet",
        "pixels.parquet",
        "metrics.json",
        "ensemble.pt",
        "plots/predicted_vs_observed.png",
        "plots/training_history.png",
        "plots/residual_map_alpha.png",
        "plots/reliability_cnn-coordinate.png",
        *(f"fold_{k}/{f}" for k in range(n) for f in ("select.npz", "baseline.npz")),
        *(f"fold_{k}/model_{m}.pt" for k in range(n) for m in range(2)),
        *(f"fold_{k}/member_{m}.npz" for k in range(n) for m in range(2)),
    ):
        assert (out / name).exists(), name
    assert not list(out.glob("fold_*/checkpoint_*.pt"))  # finished fits keep no checkpoint
    pred = pd.read_parquet(out / "predictions.parquet")
    assert set(pred.model) == {"cnn-coordinate", "hgb-pixel"}
    cnn = pred[pred.model == "cnn-coordinate"]
    assert sorted(cnn.chip_id) == sorted(demo_folds.chip_id)  # every chip tested once
    on_disk = json.loads((out / "metrics.json").read_text())
    for level in ("chip", "pixel"):
        for site, m in on_disk["models"]["cnn-coordinate"][level]["mg_ha"]["per_site"].items():
            low, high = m["r2_ci95"]
            assert low <= high, (level, site)
            hgb = on_disk["models"]["hgb-pixel"][level]["mg_ha"]["per_site"][site]["r2"]
            assert on_disk["difference"][level][site]["r2"] == pytest.approx(m["r2"] - hgb)
    assert metrics["models"]["hgb-pixel"]["chip"]["mg_ha"]["overall"]["r2"] > 0.5
    # intervals calibrated on the test folds: the members' spread in every table, the
    # cross-fitted coverage near the level asked for (90 %) on the run's ~5 000 test pixels
    pixels = pd.read_parquet(out / "pixels.parquet")
    for table in (pred, pixels):
        cnn_std = table.loc[table.model == "cnn-coordinate", "agb_std"]
        assert (cnn_std >= 0).all() and (cnn_std > 0).any()
        assert table.loc[table.model == "hgb-pixel", "agb_std"].isna().all()
    calibrated = on_disk["intervals"]["cnn-coordinate"]["pixel"]
    assert calibrated["level"] == 0.9 and calibrated["scaled_by"] == "ensemble spread"
    assert 0.8 < calibrated["coverage"] < 0.97 and calibrated["q"] > 0
    assert (
        set(calibrated["per_site"]) == set(calibrated["reliability"]) == {"alpha", "beta", "gamma"}
    )
    for info in metrics["folds"].values():  # the refits train on every chip beyond the buffer
        assert info["n_refit"] > info["n_train"] and info["refit_epochs"] == info["best_epoch"] + 1
        assert info["ensemble"] == 2 and info["min_label_distance_m"] > 0
    models, spec = load_ensemble(out)
    assert len(models) == 2 * n
    # the window a model sees: the chip and one pixel a side per (unpadded) conv block
    assert spec["geometry"].window_px == demo_config.chips.size + 2 * 1
    assert spec["geometry"].size_px == demo_config.chips.size
    with pytest.raises(TrainingError, match="already holds a run"):
        run_cv(_small(demo_config), output=out, device="cpu")

    from typer.testing import CliRunner

    from agbcube.cli import app
    from agbcube.cube import open_cube

    maps = tmp_path / "maps"
    result = CliRunner().invoke(app, ["predict", str(out), "--site", "beta", "--output", str(maps)])
    assert result.exit_code == 0, result.output
    cube = open_cube(demo_config.cube.output, "beta")
    with rasterio.open(maps / "agb_mean.tif") as src:
        assert src.crs == cube.rio.crs and src.shape == (cube.sizes["y"], cube.sizes["x"])
        assert np.isfinite(src.read(1)).mean() > 0.9
    attrs = xr.open_zarr(maps / "maps.zarr").attrs  # finished: no resume key left behind
    assert "agbcube_partial_key" not in attrs and attrs["agbcube_maps"].startswith("agbcube ")
    with rasterio.open(maps / "agb_std.tif") as src:
        std = src.read(1)
    assert np.nanmin(std) >= 0 and np.nanmax(std) > 0  # the members disagree
    with rasterio.open(maps / "agb_spread.tif") as src:  # within each fold's two members
        spread = src.read(1)
    assert np.nanmin(spread) >= 0 and np.nanmax(spread) > 0
    assert np.nanmean(spread) < np.nanmean(std)  # the folds' models differ more
    # the interval calibrated on the test folds, mapped: mean ± q (std + beta), lower >= 0
    layers = {}
    for name in ("agb_lower", "agb_mean", "agb_upper"):
        with rasterio.open(maps / f"{name}.tif") as src:
            layers[name] = src.read(1).astype(np.float64)
    own = calibrated["per_site"]["beta"]  # a site the run tested: its own calibration
    half = own["q"] * (spread + own["beta"])
    np.testing.assert_allclose(layers["agb_upper"], layers["agb_mean"] + half, rtol=1e-5)
    lower = np.maximum(layers["agb_mean"] - half, 0)
    np.testing.assert_allclose(layers["agb_lower"], lower, rtol=1e-5, atol=1e-3)
    assert json.loads(xr.open_zarr(maps / "maps.zarr").attrs["interval"])["calibrated_on"] == (
        "site 'beta'"
    )
    item = json.loads((maps / "item.json").read_text())
    assert "extrapolation" in item["assets"]["agb_lower"]["description"]
    # the error model of area means, and an area estimate of the whole map: its mean
    area = on_disk["intervals"]["cnn-coordinate"]["area"]
    assert set(area["per_site"]) == {"alpha", "beta", "gamma"}
    assert area["per_site"]["beta"]["beta"] == pytest.approx(own["beta"])
    assert area["blocks"]["level"] == 0.95 and "0.5" in area["blocks"]
    whole = gpd.GeoDataFrame(geometry=[shapely.box(*cube.rio.bounds())], crs=cube.rio.crs)
    table = estimate_areas(out, whole.to_crs(3857), maps=maps)
    assert table["agb_mean_mg_ha"].iloc[0] == pytest.approx(np.nanmean(layers["agb_mean"]), 1e-3)
    assert table["error_model"].iloc[0] == "site 'beta'"


def test_the_ensemble_is_the_mean_of_its_members_in_mg_ha(demo_config, demo_folds, tmp_path):
    from agbcube.train.batches import Preparation
    from agbcube.train.loop import predict
    from agbcube.train.modelfile import load_model
    from agbcube.train.readers import MemoryReader

    cfg = _small(demo_config, epochs=1, baseline="none", tta=False, context_px=1)
    run_cv(cfg, output=tmp_path / "e", device="cpu", plots=False)
    test = np.flatnonzero(demo_folds["fold"].to_numpy() == 0)
    maps, agb = [], None
    for m in range(2):
        member = load_model(tmp_path / "e" / "fold_0" / f"model_{m}.pt")
        reader = MemoryReader(
            cfg.cube.output, demo_folds, size_px=16, bands=member.bands, context_px=1
        )
        prep = Preparation(member.standardiser, member.target, False, False, member.geometry)
        block = next(reader.blocks(test, block=len(test)))
        x = torch.from_numpy(prep.inputs(block))
        maps.append(member.target.decode(predict(member.model, x).numpy()))
        agb = prep.core(block.agb)
    assert not np.allclose(maps[0], maps[1])  # two different models
    pix = np.where(np.isfinite(agb), np.mean(maps, axis=0), np.nan)
    expect = np.nanmean(pix.reshape(len(test), -1), axis=1)
    got = pd.read_parquet(tmp_path / "e" / "predictions.parquet").query("fold == 0")
    np.testing.assert_allclose(got["agb_pred"].to_numpy(), expect, rtol=1e-5)


def test_branch_members_continue_from_member_0_for_a_fraction_of_its_epochs(
    demo_config, tmp_path, monkeypatch
):
    import agbcube.train.tasks as tasks
    from agbcube.train.modelfile import read_record

    starts, real_fit = {}, tasks.fit

    def fit(model, *args, label, epochs, **kwargs):
        starts[label] = (copy_state(model), epochs, args[2].hnm_start_epoch)
        return real_fit(model, *args, label=label, epochs=epochs, **kwargs)

    def copy_state(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(tasks, "fit", fit)
    cfg = _small(
        demo_config,
        epochs=6,
        ensemble=3,
        baseline="none",
        members="branch",
        branch_fraction=0.5,
        hnm_start_epoch=2,
    )
    out = tmp_path / "b"
    run_cv(cfg, output=out, device="cpu", plots=False)
    metrics = json.loads((out / "metrics.json").read_text())
    for k, info in metrics["folds"].items():
        root = read_record(out / f"fold_{k}" / "model_0.pt")
        for m in (1, 2):
            state, epochs, mining_from = starts[f"fold {k} branch_{m} on {info['n_refit']} chips"]
            for name, value in root["state_dict"].items():  # member 0's final weights
                torch.testing.assert_close(state[name], value, rtol=0, atol=0)
            assert epochs == max(1, round(0.5 * info["refit_epochs"])) == info["branch_epochs"]
            assert mining_from == (0 if info["refit_epochs"] > 2 else 2)  # as member 0 ended
            branch = read_record(out / f"fold_{k}" / f"model_{m}.pt")
            assert branch["train"] == root["train"]  # the run's settings, not the branch's
            assert any(  # trained on from there with its own seed
                not torch.equal(branch["state_dict"][n], v) for n, v in root["state_dict"].items()
            )
        _, fresh, _ = starts[f"fold {k} refit on {info['n_refit']} chips"]
        assert fresh == info["refit_epochs"] and info["ensemble"] == 3


def test_resume_runs_only_missing_tasks_and_ends_identical(demo_config, tmp_path, caplog):
    cfg = _small(demo_config, baseline="none")
    run_cv(cfg, output=tmp_path / "a", device="cpu", plots=False)
    run_cv(cfg, output=tmp_path / "b", device="cpu", plots=False)
    # as if killed during fold 1's second member: its result and everything after are gone
    for name in ("fold_1/member_1.npz", "fold_2/select.npz", "fold_2/member_0.npz"):
        (tmp_path / "b" / name).unlink()
    (tmp_path / "b" / "fold_2" / "member_1.npz").unlink()
    (tmp_path / "b" / "fold_0" / "model_1.pt").unlink()  # a lost model file: its member reruns
    for name in ("metrics.json", "predictions.parquet", "ensemble.pt"):
        (tmp_path / "b" / name).unlink()
    caplog.set_level("INFO", logger="agbcube.train")
    run_cv(cfg, output=tmp_path / "b", device="cpu", plots=False, resume=True)
    ran = [r.getMessage() for r in caplog.records if "done in" in r.getMessage()]
    assert [m.split(":")[0].split("] ")[1] for m in ran] == [
        "fold_0/member_1",
        "fold_1/member_1",
        "fold_2/select",
        "fold_2/member_0",
        "fold_2/member_1",
    ]
    a = pd.read_parquet(tmp_path / "a" / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "b" / "predictions.parquet")
    pd.testing.assert_frame_equal(a, b)
    # a model file from elsewhere (other settings) never enters the ensemble
    foreign = torch.load(tmp_path / "b" / "fold_1" / "model_0.pt", weights_only=True)
    foreign["train"]["learning_rate"] = 0.5
    torch.save(foreign, tmp_path / "b" / "fold_1" / "model_0.pt")
    with pytest.raises(TrainingError, match=r"fold_1/model_0.pt was not made by this run \(its "
                       r"settings differ from the run's: learning_rate\); delete it"):  # fmt: skip
        run_cv(cfg, output=tmp_path / "b", device="cpu", plots=False, resume=True)


def test_resume_is_refused_when_what_made_the_run_changed(demo_config, demo_folds, tmp_path):
    cfg = _small(demo_config, epochs=1, baseline="none", ensemble=1)
    run_cv(cfg, output=tmp_path / "r", device="cpu", plots=False)
    with pytest.raises(TrainingError, match=r"train.learning_rate: 0.001 → 0.01"):
        other = _small(demo_config, epochs=1, baseline="none", ensemble=1, learning_rate=0.01)
        run_cv(other, output=tmp_path / "r", device="cpu", plots=False, resume=True)
    with pytest.raises(TrainingError, match=r"train.epochs: 1 → 3"):
        run_cv(cfg, output=tmp_path / "r", device="cpu", plots=False, resume=True, epochs=3)
    # other folds (a copy in which one training chip of fold 0 became buffer) are refused too
    folds = demo_folds.copy()
    folds.loc[(folds["role_0"] == "train").idxmax(), "role_0"] = "buffer"
    moved = tmp_path / "folds.parquet"
    from agbcube.folds import write_folds

    write_folds(folds, moved, maps=False)
    cfg2 = cfg.model_copy(update={"folds": cfg.folds.model_copy(update={"output": moved})})
    with pytest.raises(TrainingError, match=r"\(folds\)"):
        run_cv(cfg2, output=tmp_path / "r", device="cpu", plots=False, resume=True)
    # nothing was lost: the run resumes with what made it
    run_cv(cfg, output=tmp_path / "r", device="cpu", plots=False, resume=True)
    # the run's own copy of the folds, which its fits read, edited: refused, then restored
    copy = tmp_path / "r" / "folds.parquet"
    original = copy.read_bytes()
    write_folds(folds, copy, maps=False)
    with pytest.raises(TrainingError, match=r"folds.parquet \(the run's copy of the folds"):
        run_cv(cfg, output=tmp_path / "r", device="cpu", plots=False, resume=True)
    from agbcube.predict import predict_run  # nor is it mapped with that copy's AOA

    not_its = r"r/folds.parquet is not the folds file run .*r was trained on .*--no-aoa"
    with pytest.raises(FoldError, match=not_its):
        predict_run(tmp_path / "r", open_cube(cfg.cube.output, "alpha"), device="cpu")
    copy.write_bytes(original)
    run_cv(cfg, output=tmp_path / "r", device="cpu", plots=False, resume=True)
    # a run made before a setting existed resumes while it is at its default, not otherwise
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    del record["settings"]["train"]["bottleneck"]
    (tmp_path / "r" / "run.json").write_text(json.dumps(record))
    run_cv(cfg, output=tmp_path / "r", device="cpu", plots=False, resume=True)
    (tmp_path / "r" / "run.json").write_text(json.dumps(record))
    with pytest.raises(TrainingError, match=r"train.bottleneck: 0 → 4"):
        wider = _small(demo_config, epochs=1, baseline="none", ensemble=1, bottleneck=4)
        run_cv(wider, output=tmp_path / "r", device="cpu", plots=False, resume=True)


def test_overrides_are_validated_and_foreign_folders_left_alone(demo_config, tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        run_cv(_small(demo_config), output=tmp_path / "x", device="cpu", epochs=0)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExistsError, match="holds files but no agbcube run"):
        run_cv(_small(demo_config), output=foreign, device="cpu", overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("path", ["chunks", "stream"])
def test_out_of_core_runs_score_every_test_chip(demo_config, demo_folds, tmp_path, path):
    fast = {"context_px": 3, "ensemble": 1, "baseline": "none"}  # the CNN's chips are the point
    cfg = _small(demo_config, data_path=path, shuffle_chips=32, **fast)
    metrics = run_cv(cfg, output=tmp_path / path, device="cpu", plots=False)
    device = _small(demo_config, data_path="device", **fast)
    ref = run_cv(device, output=tmp_path / "d", device="cpu", plots=False)
    assert metrics["run"]["data_path"] == path
    a = pd.read_parquet(tmp_path / path / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "d" / "predictions.parquet")
    keys = ["chip_id", "site", "fold", "model", "agb_true"]
    pd.testing.assert_frame_equal(a[keys], b[keys])
    assert np.isfinite(a["agb_pred"]).all()
    # the same chips and label masks whatever the path
    for k, info in metrics["folds"].items():
        assert info["n_train"] == ref["folds"][k]["n_train"]
        assert info["n_train_px"] == ref["folds"][k]["n_train_px"]


def test_random_cv_scores_every_chip_once_beside_the_honest_folds(demo_config, tmp_path):
    from agbcube.cli import _metrics_table

    cfg = _small(demo_config, model="hgb-pixel", baseline="none", random_cv=True)
    metrics = run_cv(cfg, output=tmp_path / "rc", device="cpu", plots=False)
    leaky, honest = metrics["random_cv"], metrics["models"]["hgb-pixel"]
    n_chips = metrics["run"]["n_chips"]
    assert leaky["model"] == "hgb-pixel" and leaky["chip"]["mg_ha"]["overall"]["n"] == n_chips
    assert leaky["pixel"]["mg_ha"]["overall"]["n"] == honest["pixel"]["mg_ha"]["overall"]["n"]
    caption = str(_metrics_table(metrics).caption)
    n = demo_config.folds.n_folds
    assert f"random {n}-fold split (leaky, no buffer)" in caption and "(honest " in caption


def test_training_needs_no_gdal(demo_dir, demo_config, demo_folds, tmp_path):
    """A GPU machine that only trains needs no rasterio, rioxarray or odc-geo (GDAL)."""
    import subprocess
    import sys

    script = f"""
import json, sys
for name in ("rasterio", "rioxarray", "odc", "odc.geo", "osgeo", "pyogrio", "fiona"):
    sys.modules[name] = None  # importing any of them fails
from agbcube.config import load_config
from agbcube.train import run_cv
cfg = load_config({str(demo_dir / "demo.yaml")!r})
train = cfg.train.model_copy(update=dict(
    epochs=1, conv_channels=[4], data_path="chunks", coordinates="geographic", baseline="none",
    ensemble=1))
m = run_cv(cfg.model_copy(update=dict(train=train)), output={str(tmp_path / "run")!r},
           device="cpu", plots=False)
print(json.dumps(m["run"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"data_path": "chunks"' in done.stdout


def test_predict_takes_the_chip_from_the_models_reach_not_the_readers_context(
    demo_config, tmp_path, monkeypatch
):
    """A run read with more context than its convolutions reach (context_px 3, reach 1) maps
    with the chip's default window and takes the AOA's training chips at the chip's size."""
    import agbcube.predict as predict
    from agbcube.cube import open_cube
    from agbcube.predict import aoa

    cfg = _small(demo_config, epochs=1, ensemble=1, baseline="none", tta=False, context_px=3)
    out = tmp_path / "run"
    run_cv(cfg, output=out, device="cpu", plots=False)
    chip = demo_config.chips.size
    sizes = []
    labelled = aoa._labelled_pixels
    monkeypatch.setattr(aoa, "_labelled_pixels", lambda *a: sizes.append(a[-1]) or labelled(*a))
    maps = predict.predict_run(out, open_cube(demo_config.cube.output, "beta"))
    assert sizes == [chip]  # the AOA's reference chips
    assert maps.attrs["window_px"] == 4 * chip  # the dense head's default window
    assert maps.attrs["stride_px"] == chip
