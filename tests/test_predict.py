from __future__ import annotations

import json

import dask
import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
from rio_cogeo.cogeo import cog_validate

from agbcube.errors import BandError, OutputLockedError
from agbcube.predict import (
    LAYER_INFO,
    aoa_reference,
    chips_to_dataarray,
    cosine_weights,
    predict_site,
    write_maps,
)
from agbcube.predict.aoa import _upper_whisker
from agbcube.predict.windows import window_starts
from agbcube.train.batches import Standardiser
from tests.test_chips import synthetic_cube


class Dense(torch.nn.Module):
    """A fixed fully convolutional 'model' whose single-pass output is known."""

    def __init__(self, n_in: int, kernel: int, seed: int = 0, shift: float = 0.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(n_in, 4, kernel, padding=kernel // 2)
        self.out = torch.nn.Conv2d(4, 1, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.shift = shift

    def forward(self, x):
        return self.out(torch.tanh(self.conv(x)))[:, 0] + 100.0 + self.shift


def _identity(n: int) -> Standardiser:
    return Standardiser(np.zeros(n, np.float32), np.ones(n, np.float32))


def _site(ny=90, nx=110):
    ds = synthetic_cube(ny, nx, n_band=3, seed=1)
    # a smooth "landscape" so that window edges would show if blending were wrong
    yy, xx = np.mgrid[:ny, :nx]
    feats = np.stack([np.sin(yy / 9.0), np.cos(xx / 7.0), np.sin((xx + yy) / 11.0)])
    return ds.assign(features=(("band", "y", "x"), feats.astype("float32")))


def _single_pass(model, ds):
    with torch.no_grad():
        return model(torch.from_numpy(ds.features.values[None]))[0].numpy()


def test_weights_and_window_grid():
    w = cosine_weights(16)
    assert w.shape == (16, 16) and (w > 0).all() and w[8, 8] > 0.9 > w[0, 0]
    starts = window_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 68 and np.all(np.diff(starts) <= 8)
    assert list(window_starts(10, 32, 8)) == [0]


def test_pixelwise_model_tiles_exactly():
    ds = _site()
    model = Dense(3, 1)
    maps = predict_site(
        ds, [(model, _identity(3))], window_px=24, stride_px=6, log_target=False, block_px=40
    )
    got = maps.agb_mean.values
    np.testing.assert_allclose(got, _single_pass(model, ds), rtol=1e-5, atol=1e-4)
    assert np.all(maps.agb_std.values == 0)


def test_a_model_with_a_margin_reads_real_context_and_tiles_exactly():
    """Unpadded convolutions take ``margin`` pixels of context around every window: fed the
    site's own pixels there (NaN, i.e. the imputed 0, beyond its edge), every window gives a
    pixel the value one pass over the whole site gives it, so the blend is exact, across
    windows, tiles and blocks."""
    from agbcube.train.model import CNNCoordinateModel

    torch.manual_seed(0)
    model = CNNCoordinateModel(3, 10, head="dense", conv_channels=(4, 5), norm="none").eval()
    ds = _site()
    padded = np.pad(ds.features.values, ((0, 0), (2, 2), (2, 2)))  # 0 beyond the edge
    with torch.no_grad():
        truth = model(torch.from_numpy(padded[None]))[0].numpy()
    for block in (40, 64):
        maps = predict_site(
            ds,
            [(model, _identity(3))],
            window_px=24,
            stride_px=8,
            log_target=False,
            block_px=block,
            reach_px=model.reach_px,
        )
        np.testing.assert_allclose(maps.agb_mean.values, truth, rtol=1e-5, atol=1e-5)


def test_no_seams_at_tile_and_block_borders():
    ds = _site()
    model = Dense(3, 3)
    truth = _single_pass(model, ds)
    maps = predict_site(
        ds, [(model, _identity(3))], window_px=32, stride_px=8, log_target=False, block_px=40
    )
    got = maps.agb_mean.values
    err = np.abs(got - truth)
    span = truth.max() - truth.min()
    assert err[1:-1, 1:-1].max() < 0.02 * span
    # the block borders (rows/cols 40, 80) are no worse than anywhere else
    border = np.zeros_like(err, bool)
    border[38:42, :] = border[:, 38:42] = border[78:82, :] = border[:, 78:82] = True
    assert err[border].max() <= err[1:-1, 1:-1].max() + 1e-6
    # and the Dask block size does not change the result
    other = predict_site(
        ds, [(model, _identity(3))], window_px=32, stride_px=8, log_target=False, block_px=64
    ).agb_mean.values
    np.testing.assert_allclose(got, other, rtol=1e-6, atol=1e-5)


def test_ensemble_mean_and_std():
    ds = _site(40, 40)
    models = [(Dense(3, 1, shift=-5.0), _identity(3)), (Dense(3, 1, shift=5.0), _identity(3))]
    maps = predict_site(ds, models, window_px=16, log_target=False).compute()
    single = _single_pass(Dense(3, 1), ds)
    np.testing.assert_allclose(maps.agb_mean.values, single, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(maps.agb_std.values, 5.0, rtol=1e-5)
    np.testing.assert_allclose(maps.agb_spread.values, 5.0, rtol=1e-5)  # one fold: the same


def test_the_fold_spread_is_the_members_spread_within_each_fold():
    ds = _site(40, 40)
    shifts = [-5.0, 5.0, 15.0, 25.0]  # folds 0 (-5, 5) and 1 (15, 25): s.d. 5 within each
    models = [(Dense(3, 1, shift=s), _identity(3)) for s in shifts]
    maps = predict_site(ds, models, window_px=16, log_target=False, member_folds=[0, 0, 1, 1])
    maps = maps.compute()
    np.testing.assert_allclose(maps.agb_spread.values, 5.0, rtol=1e-5)
    np.testing.assert_allclose(maps.agb_std.values, np.std(shifts), rtol=1e-5)
    one_each = predict_site(ds, models[:2], window_px=16, log_target=False, member_folds=[0, 1])
    assert float(one_each.agb_spread.max()) == 0.0  # no fold with two members: no spread


def test_aoa_flags_pixels_far_outside_training_data(rng):
    ds = _site(60, 60)
    feats = ds.features.values.copy()
    train_pixels = np.moveaxis(feats[:, :30], 0, -1).reshape(-1, 3)
    folds = np.arange(len(train_pixels)) % 3
    ref = aoa_reference(train_pixels, folds)
    assert ref.threshold > 0
    feats[:, 45:, 45:] = 50.0  # far outside the training range
    ds = ds.assign(features=(("band", "y", "x"), feats))
    maps = predict_site(
        ds, [(Dense(3, 1), _identity(3))], window_px=16, log_target=False, aoa=ref
    ).compute()
    assert (maps.aoa.values[45:, 45:] == 0).all()
    assert maps.di.values[45:, 45:].min() > 10 * ref.threshold
    assert maps.aoa.values[:30].mean() > 0.9


def test_band_mismatch_lists_the_differences():
    ds = _site(30, 30)
    with pytest.raises(BandError, match=r"missing \['NDVI'\]; not used by the model: \['b2'\]"):
        predict_site(ds, [(Dense(3, 1), _identity(3))], window_px=16, bands=["b0", "b1", "NDVI"])


def test_cogs_zarr_and_pngs(tmp_path):
    import odc.geo.xr  # noqa: F401  (the .odc accessor)
    import rioxarray  # noqa: F401  (the .rio accessor)

    ds = _site(300, 280)
    ref = aoa_reference(
        np.moveaxis(ds.features.values[:, :50], 0, -1).reshape(-1, 3),
        np.arange(50 * 280) % 2,
        max_points=500,
    )
    maps = predict_site(
        ds,
        [(Dense(3, 1), _identity(3)), (Dense(3, 1, 1), _identity(3))],
        window_px=16,
        log_target=False,
        aoa=ref,
    )
    paths = write_maps(maps, tmp_path / "maps", progress=False)
    assert (tmp_path / "maps" / "maps.zarr").is_dir()
    back = xr.open_zarr(tmp_path / "maps" / "maps.zarr")
    assert set(back.data_vars) == {"agb_mean", "agb_std", "agb_spread", "di", "aoa"}
    # CF: a plain open_zarr gives rioxarray and odc-geo the CRS; x/y say what they are
    assert "spatial_ref" in back.coords and back.rio.crs == ds.rio.crs
    assert back.odc.geobox.crs == ds.odc.geobox.crs and back.attrs["Conventions"] == "CF-1.8"
    x_attrs = {k: back.x.attrs.get(k) for k in ("standard_name", "axis", "units")}
    assert x_attrs == {"standard_name": "projection_x_coordinate", "axis": "X", "units": "m"}
    assert back.agb_mean.attrs["units"] == back.agb_std.attrs["units"] == "Mg ha-1"
    with rasterio.open(f'ZARR:"{tmp_path / "maps" / "maps.zarr"}":/agb_mean') as gdal:
        assert gdal.crs == ds.rio.crs  # GDAL's Zarr driver follows grid_mapping
    units = {"agb_mean": "Mg ha-1", "agb_std": "Mg ha-1", "agb_spread": "Mg ha-1", "di": "1"}
    units["aoa"] = None
    for layer in ("agb_mean", "agb_std", "agb_spread", "di", "aoa"):
        tif = tmp_path / "maps" / f"{layer}.tif"
        valid, errors, warns = cog_validate(str(tif), strict=True)
        assert valid and not errors and not warns, (layer, errors, warns)
        with rasterio.open(tif) as src:
            assert src.descriptions == (LAYER_INFO[layer]["title"],)
            assert src.units == (units[layer],)
            assert src.tags(1)["DESCRIPTION"] == LAYER_INFO[layer]["description"]
            if layer == "aoa":  # a palette GIS tools draw, and the classes' names
                palette = src.colormap(1)
                assert palette[0] == (215, 48, 39, 255) and palette[1] == (26, 152, 80, 255)
                assert (src.tags(1)["CLASS_0"], src.tags(1)["CLASS_1"]) == ("outside", "inside")
            predictor = "3" if layer != "aoa" else "2"  # floating point / horizontal
            assert src.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == predictor, layer
            assert src.crs == ds.rio.crs
            assert src.transform.almost_equals(ds.rio.transform())
            assert src.nodata is not None
            assert src.overviews(1), layer
            assert src.shape == (300, 280)
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            values = src.read(1)
        stored = back[layer].values
        if layer == "aoa":
            np.testing.assert_array_equal(values, np.where(np.isfinite(stored), stored, 255))
        else:
            np.testing.assert_array_equal(values, stored)
        assert (tmp_path / "maps" / f"{layer}.png").read_bytes()[:4] == b"\x89PNG"
    assert len(paths) == 12 and paths[-1] == tmp_path / "maps" / "item.json"


def test_chips_to_dataarray_is_the_inverse_of_chipping():
    ds = synthetic_cube(40, 40)
    rows, cols = [0, 0, 20], [0, 20, 10]
    da = chips_to_dataarray(np.array([1.0, 2.0, 3.0]), rows, cols, ds, size_px=20)
    assert da.values[5, 5] == 1.0 and da.values[5, 25] == 2.0 and da.values[30, 15] == 3.0
    assert np.isnan(da.values[30, 35])
    assert da.rio.crs == ds.rio.crs
    patches = ds.agb.values
    per_pixel = np.stack([patches[r : r + 20, c : c + 20] for r, c in zip(rows, cols, strict=True)])
    back = chips_to_dataarray(per_pixel, rows, cols, ds, size_px=20, weights="cosine")
    covered = np.isfinite(back.values)
    np.testing.assert_allclose(back.values[covered], patches[covered], rtol=1e-6)


def test_aoa_threshold_is_the_upper_whisker_of_training_dis():
    # CAST: boxplot.stats(TrainDI)$stats[5], the largest DI not above Q75 + 1.5 IQR
    di = np.array([1.0, 2.0, 2.5, 3.0, 4.0, 100.0])
    q25, q75 = np.percentile(di, [25, 75])
    assert q75 + 1.5 * (q75 - q25) > 4.0
    assert _upper_whisker(di) == 4.0
    assert _upper_whisker(np.array([0.5, 0.5, 0.5])) == 0.5


@pytest.mark.parametrize("chunks", [None, "auto"])
def test_a_lazily_opened_cube_predicts_as_one_in_memory(tmp_path, chunks, monkeypatch):
    from agbcube.predict import tiles

    ds = _site(70, 90)
    ds.to_zarr(tmp_path / "site.zarr", zarr_format=2)
    lazy = xr.open_zarr(tmp_path / "site.zarr", chunks=chunks, zarr_format=2)  # cache on
    assert lazy.features.chunks is None if chunks is None else lazy.features.chunks
    kw = {"window_px": 16, "stride_px": 4, "log_target": False, "block_px": 32}
    members = [(Dense(3, 3), _identity(3))]
    want = predict_site(ds, members, **kw).agb_mean.values
    windows = []
    read = tiles._Window.read

    def spy(self):
        windows.append(self)
        return read(self)

    monkeypatch.setattr(tiles._Window, "read", spy)
    got = predict_site(lazy.rio.write_crs(ds.rio.crs), members, **kw).agb_mean.values
    np.testing.assert_array_equal(got, want)
    # each task read its own window (9 tiles), and none of them stayed in memory afterwards
    assert len(windows) == 9
    assert not any(w.data.variable._in_memory for w in windows)
    assert not lazy.features.variable._in_memory


class Flaky(torch.nn.Module):
    """Wraps a model; counts its calls and raises once ``fail_at`` calls have been made."""

    def __init__(self, model, fail_at=None):
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise RuntimeError("killed")
        return self.model(x)


def test_an_interrupted_write_resumes_tile_by_tile(tmp_path):
    ds = _site(96, 96)
    kw = {"window_px": 16, "stride_px": 8, "log_target": False, "block_px": 32}  # 9 tiles
    model = Dense(3, 1)
    counted = Flaky(model)
    clean = predict_site(ds, [(counted, _identity(3))], **kw)
    write_maps(clean, tmp_path / "clean", progress=False)
    every_tile = counted.calls

    out = tmp_path / "maps"
    flaky = Flaky(model, fail_at=4)
    maps = predict_site(ds, [(flaky, _identity(3))], **kw)
    maps.attrs["key"] = "same-run"
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="killed"):
        write_maps(maps, out, progress=False)
    # nothing looks complete; the tiles that finished are kept
    assert not (out / "maps.zarr").exists() and not (out / "agb_mean.tif").exists()
    assert (out / "maps.zarr.partial").is_dir()
    assert 0 < len(list((out / ".maps.zarr.tiles").iterdir())) < 9

    again = Flaky(model)
    maps = predict_site(ds, [(again, _identity(3))], **kw)
    maps.attrs["key"] = "same-run"
    write_maps(maps, out, progress=False)
    assert 0 < again.calls < every_tile  # only the missing tiles
    assert not (out / "maps.zarr.partial").exists() and not (out / ".maps.zarr.tiles").exists()
    got = xr.open_zarr(out / "maps.zarr").agb_mean.values
    want = xr.open_zarr(tmp_path / "clean" / "maps.zarr").agb_mean.values
    np.testing.assert_array_equal(got, want)

    # maps made differently (another key) start over instead of mixing tiles
    (out / "maps.zarr.partial").mkdir()  # an unreadable leftover: started over
    shifted = Dense(3, 1, shift=7.0)
    maps = predict_site(ds, [(Flaky(shifted, fail_at=2), _identity(3))], **kw)
    maps.attrs["key"] = "other-run"
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError):
        write_maps(maps, out, progress=False)
    fresh = Flaky(shifted)
    maps = predict_site(ds, [(fresh, _identity(3))], **kw)
    maps.attrs["key"] = "another-run"
    write_maps(maps, out, progress=False)
    assert fresh.calls == every_tile
    np.testing.assert_allclose(
        xr.open_zarr(out / "maps.zarr").agb_mean.values, want + 7.0, rtol=1e-6
    )


def test_a_second_writer_of_the_same_maps_is_refused(tmp_path):
    from agbcube._io import output_lock

    ds = _site(40, 40)
    maps = predict_site(ds, [(Dense(3, 1), _identity(3))], window_px=16, log_target=False)
    with (
        output_lock(tmp_path / "maps" / "maps.zarr", what="maps"),
        pytest.raises(OutputLockedError, match="being written by process"),
    ):
        write_maps(maps, tmp_path / "maps", progress=False)


# --- reliability: outputs that are not agbcube's, damaged cubes, run configs, windows ----------


@pytest.mark.parametrize("kind", ["file", "foreign folder", "under a file"])
def test_maps_are_never_written_over_a_file_or_into_a_foreign_folder(tmp_path, kind):
    from agbcube.errors import OutputExistsError

    maps = predict_site(_site(40, 40), [(Dense(3, 1), _identity(3))], window_px=16)
    target = tmp_path / "out"
    if kind == "foreign folder":
        target.mkdir()
        (target / "field_notes.txt").write_text("plot 7: 212 Mg/ha")
        match = "holds files agbcube did not write"
    else:
        target.write_text("a file of the user's")
        match = "is a file; give a folder"
        if kind == "under a file":
            target = target / "betul"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError, match=f"maps output {target}.*{match}"):
        write_maps(maps, target, progress=False)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_damaged_cube_chunk_names_the_site_while_mapping(tmp_path, simple_site):
    from agbcube.config import CubeConfig, SiteConfig
    from agbcube.cube import build_cube, open_cube
    from agbcube.errors import CubeError

    cube = CubeConfig(output=tmp_path / "cube.zarr", chunks=16, indices="none")
    site = SiteConfig(
        name="mapped", satellite=simple_site["satellite"], biomass=simple_site["biomass"]
    )
    build_cube([site], cube, progress=False)
    next((cube.output / "mapped" / "features").glob("0.1.*")).write_bytes(b"junk" * 30)
    ds = open_cube(cube.output, "mapped", chunks=None)
    maps = predict_site(ds, [(Dense(4, 1), _identity(4))], window_px=8, block_px=16)
    with (
        dask.config.set(scheduler="synchronous"),
        pytest.raises(CubeError, match=r"site 'mapped': its data cannot be read .*build-cube"),
    ):
        write_maps(maps, tmp_path / "maps", progress=False)
    assert not (tmp_path / "maps" / "maps.zarr").exists()


_SITES = "sites: [{name: s, satellite: s.tif, biomass: b.tif}]\n"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"config.yaml not found: is .* a run directory"),
        ("cube: [unclosed\n", r"run config .*config.yaml is not valid YAML"),
        ("cube: {output: c.zarr}\n", r"run config .*config.yaml.*sites: required key"),
        (_SITES + "cube: {chunks: lots}\n", r"run config .*cube.chunks: Input should be"),
        (_SITES + "train: {new_key: 1}\n", r"run config .*train.new_key: unknown key"),
    ],
)
def test_a_broken_run_config_is_a_config_error(tmp_path, content, match):
    """A run's config is read back through the same validation as a fresh one."""
    from agbcube.errors import ConfigError
    from agbcube.predict import run_cube

    if content is not None:
        (tmp_path / "config.yaml").write_text(content)
    with pytest.raises(ConfigError, match=match):
        run_cube(tmp_path)
    (tmp_path / "config.yaml").write_text(_SITES + "cube: {output: c.zarr}\n")
    assert run_cube(tmp_path) == tmp_path / "c.zarr"  # relative to the run


def test_window_settings_that_cannot_work_are_refused():
    from agbcube.errors import ConfigError
    from agbcube.predict.windows import check_window

    check_window(96, 12, (20, 30), 96)  # the run's default window may exceed a small site
    check_window(30, 12, (20, 30), 24)
    with pytest.raises(ConfigError, match=r"window 100000 px is larger than the site \(20×30"):
        check_window(100_000, 12, (20, 30), 24)
    with pytest.raises(ConfigError, match="must be >= 2"):
        check_window(1, 1, (20, 30), 24)


def _models_in(graph) -> list:
    """The torch modules a task graph would carry to the workers."""
    import io

    import cloudpickle

    found = []

    class Spy(cloudpickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.nn.Module):
                found.append(obj)
            return None

    Spy(io.BytesIO()).dump(dict(graph))
    return found


@pytest.mark.slow
def test_a_run_maps_the_same_on_a_cluster_whose_workers_load_the_models(
    cluster_reference, local_cluster, tmp_path
):
    """The tile tasks carry the ensemble's path, not the models: each worker loads them once,
    on the device it resolves (``auto``), and the maps equal the threaded ones."""
    from distributed import Client

    from agbcube.cube import open_cube
    from agbcube.predict import models as predict_models
    from agbcube.predict import predict_run
    from agbcube.train import load_ensemble

    cfg, run = cluster_reference
    ds = open_cube(cfg.cube.output, "beta", chunks=None)
    threaded = predict_run(run, ds, device="cpu")
    # one torch thread, as each cluster task has: convolutions sum in another order with
    # another thread count (the maps then differ in the last bit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_maps(threaded, tmp_path / "threads", progress=False)
    finally:
        torch.set_num_threads(threads)
    on_cluster = predict_run(run, ds, device="auto")
    assert not _models_in(on_cluster["agb_mean"].data.__dask_graph__())
    members, _ = load_ensemble(run)  # the detector finds models where a graph has them
    listed = predict_site(ds, members, window_px=16)
    found = {id(m) for m in _models_in(listed["agb_mean"].data.__dask_graph__())}
    assert {id(m[0]) for m in members} <= found
    with Client(local_cluster) as client:
        write_maps(on_cluster, tmp_path / "cluster", client=client, progress=False)
        loads = client.run(lambda: {str(k[0].path): n for k, n in predict_models._LOADS.items()})
    ensemble = str((run / "ensemble.pt").resolve())
    assert sum(w.get(ensemble, 0) for w in loads.values()) >= 1
    assert all(w.get(ensemble, 0) <= 1 for w in loads.values()), loads  # once per worker
    a = xr.open_zarr(tmp_path / "threads" / "maps.zarr")
    b = xr.open_zarr(tmp_path / "cluster" / "maps.zarr")
    xr.testing.assert_identical(a.load(), b.load())
    for layer in ("agb_mean", "agb_std", "di"):
        with (
            rasterio.open(tmp_path / "threads" / f"{layer}.tif") as x,
            rasterio.open(tmp_path / "cluster" / f"{layer}.tif") as y,
        ):
            np.testing.assert_array_equal(x.read(1), y.read(1))


def test_an_ensemble_file_that_changed_or_cannot_be_read_is_named(tmp_path):
    from agbcube.errors import InputFileError, TrainingError
    from agbcube.predict.models import EnsembleFile

    path = tmp_path / "ensemble.pt"
    path.write_bytes(b"models")
    ref = EnsembleFile.of(path)
    assert ref.path == str(path.resolve()) and ref.size == 6
    path.write_bytes(b"retrained models")  # the run was trained again meanwhile
    with pytest.raises(TrainingError, match=r"ensemble .*ensemble.pt changed while its maps"):
        ref.load("cpu")
    path.unlink()  # a worker without the shared file system
    with pytest.raises(InputFileError, match="cannot be read here .*same paths as the client"):
        ref.load("cpu")


def test_a_run_without_its_ensemble_or_readable_metrics_is_named(tmp_path):
    """An unfinished run (no ensemble.pt) is one error saying how to finish it; a damaged
    metrics.json costs the maps their calibrated interval, with a warning, not the maps."""
    from agbcube.errors import TrainingError
    from agbcube.predict import predict_run
    from agbcube.predict.stage import calibrated_interval

    (tmp_path / "config.yaml").write_text(_SITES + "cube: {output: c.zarr}\n")
    with pytest.raises(TrainingError, match=r"ensemble.pt does not exist: .*--resume"):
        predict_run(tmp_path, xr.Dataset())
    assert calibrated_interval(tmp_path, "cnn-coordinate", "s") is None  # no metrics: none
    (tmp_path / "metrics.json").write_text('{"models": {}}')  # before intervals: none, quietly
    assert calibrated_interval(tmp_path, "cnn-coordinate", "s") is None
    (tmp_path / "metrics.json").write_text('{"intervals": ')
    with pytest.warns(UserWarning, match=r"metrics.json cannot be read .*no calibrated interval"):
        assert calibrated_interval(tmp_path, "cnn-coordinate", "s") is None
    pooled = {"level": 0.9, "q": 2.0, "beta": 1.0}
    found = {"intervals": {"m": {"pixel": {**pooled, "per_site": {"s": {**pooled, "q": 3.0}}}}}}
    (tmp_path / "metrics.json").write_text(json.dumps(found))
    assert calibrated_interval(tmp_path, "m", "s")["q"] == 3.0  # the site's own
    new_area = calibrated_interval(tmp_path, "m", "elsewhere")
    assert new_area["q"] == 2.0 and new_area["calibrated_on"] == "pooled over the run's sites"


def test_an_interval_calibrated_without_a_spread_has_one_width():
    from agbcube.predict.stage import with_interval

    maps = xr.Dataset(
        {
            "agb_mean": (("y", "x"), np.array([[100.0, np.nan]], np.float32)),
            "agb_spread": (("y", "x"), np.zeros((1, 2), np.float32)),  # one member per fold
        }
    )
    one = {"level": 0.9, "q": 30.0, "beta": 0.0, "scaled": False}
    out = with_interval(maps, one)
    assert out["agb_upper"].values[0, 0] == 130.0 and out["agb_lower"].values[0, 0] == 70.0
    assert np.isnan(out["agb_upper"].values[0, 1])
    scaled = with_interval(maps, {**one, "scaled": True})  # a spread of 0: no width
    assert scaled["agb_upper"].values[0, 0] == 100.0
