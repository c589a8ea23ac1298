from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch

from agbcube.config import TrainConfig
from agbcube.train.data import (
    DeviceChips,
    Standardiser,
    StreamingChips,
    StreamSource,
    TargetTransform,
    make_target,
    model_inputs,
    read_chips,
)
from agbcube.train.loop import build_model, fit_fold, predict
from agbcube.train.model import (
    CNNCoordinateModel,
    augment_batch,
    dihedral,
    dihedral_inverse,
    make_loss,
    per_sample_loss,
)


def _stride(cfg) -> int:
    return max(1, round(cfg.chips.size * (1 - cfg.chips.overlap)))


@pytest.fixture(scope="module")
def demo_folds(demo_config):
    from agbcube.folds import make_folds, read_folds, write_folds

    write_folds(make_folds(demo_config), demo_config.folds.output, maps=False)
    return read_folds(demo_config.folds.output)


@pytest.fixture(scope="module")
def demo_chips(demo_config, demo_folds):
    return read_chips(
        demo_config.cube.output,
        demo_folds,
        size_px=demo_config.chips.size,
        stride_px=_stride(demo_config),
    )


def test_read_chips_matches_cube_windows(demo_config, demo_folds, demo_chips):
    from agbcube.cube import open_cube

    assert demo_chips.x.shape[0] == len(demo_folds)
    size = demo_config.chips.size
    for i in (0, len(demo_folds) // 2, len(demo_folds) - 1):
        row = demo_folds.iloc[i]
        ds = open_cube(demo_config.cube.output, row.site)
        win = dict(y=slice(row.row, row.row + size), x=slice(row.col, row.col + size))
        np.testing.assert_array_equal(demo_chips.x[i], ds.features.isel(win).values)
        np.testing.assert_array_equal(demo_chips.agb[i], ds.agb.isel(win).values)
        # lon/lat channels hold the pixel's geographic position, different for every chip
        assert np.allclose(demo_chips.lonlat[i, 0, 0], ds.x.values[win["x"]])
    assert not np.allclose(demo_chips.lonlat[0], demo_chips.lonlat[1])
    # chip means agree with the folds table
    np.testing.assert_allclose(
        make_target(demo_chips.agb, log=False, per_chip=True), demo_folds.agb_mean, rtol=1e-5
    )


@pytest.fixture(scope="module")
def demo_context_chips(demo_config, demo_folds):
    return read_chips(
        demo_config.cube.output,
        demo_folds,
        size_px=demo_config.chips.size,
        stride_px=_stride(demo_config),
        context_px=5,
    )


def _window(a: np.ndarray, r: int, c: int, s: int) -> np.ndarray:
    """``a[..., r:r+s, c:c+s]`` with NaN where the window leaves ``a`` (r, c may be < 0)."""
    out = np.full((*a.shape[:-2], s, s), np.nan, np.float32)
    ya, yb = max(r, 0), min(r + s, a.shape[-2])
    xa, xb = max(c, 0), min(c + s, a.shape[-1])
    out[..., ya - r : yb - r, xa - c : xb - c] = a[..., ya:yb, xa:xb]
    return out


def test_context_windows_hold_features_around_the_chip_and_no_labels(
    demo_config, demo_folds, demo_chips, demo_context_chips
):
    from agbcube.cube import open_cube

    size, m = demo_config.chips.size, 5
    ctx = demo_context_chips
    assert ctx.x.shape[-2:] == (size + 2 * m,) * 2 and ctx.margin == m
    # the chip itself is unchanged, its AGB too; the margin's AGB is never a label
    np.testing.assert_array_equal(ctx.x[..., m:-m, m:-m], demo_chips.x)
    np.testing.assert_array_equal(ctx.agb[..., m:-m, m:-m], demo_chips.agb)
    assert np.isnan(ctx.agb[..., :m, :]).all() and np.isnan(ctx.agb[..., :, -m:]).all()
    edge = np.flatnonzero((demo_folds.row.to_numpy() == 0) | (demo_folds.col.to_numpy() == 0))
    assert edge.size  # some chips touch the site's edge: their context there is NaN
    for i in (0, *edge[:2], len(demo_folds) - 1):
        row = demo_folds.iloc[i]
        ds = open_cube(demo_config.cube.output, row.site)
        want = _window(ds.features.values, int(row.row) - m, int(row.col) - m, size + 2 * m)
        np.testing.assert_array_equal(ctx.x[i], want)
        # lon/lat of the window's pixels, NaN beyond the site like every input
        lon = np.broadcast_to(ds.x.values, ds.agb.shape)
        want = _window(lon, int(row.row) - m, int(row.col) - m, size + 2 * m)
        np.testing.assert_allclose(ctx.lonlat[i, 0], want, rtol=1e-6)


@pytest.mark.parametrize("path", ["stream", "chunks"])
def test_out_of_core_paths_cut_the_same_context_windows(
    demo_config, demo_folds, demo_context_chips, small_chunk_cube, path
):
    from agbcube.train.data import ChunkedChips

    idx = np.arange(len(demo_folds))
    mask = np.random.default_rng(3).random((idx.size, 16, 16)) > 0.3
    common = {
        "size_px": demo_config.chips.size,
        "standardiser": None,
        "coordinates": True,
        "log_target": True,
        "label_mask": mask,
        "context_px": 5,
    }
    if path == "chunks":  # 20-px tiles: windows span up to three tiles a side, or leave the site
        ds = ChunkedChips(small_chunk_cube, demo_folds, **common)
    else:
        ds = StreamingChips(
            demo_config.cube.output, demo_folds, stride_px=_stride(demo_config), **common
        )
    got_x, got_a, got_p = (np.concatenate(v) for v in zip(*ds.blocks(), strict=True))
    ctx = demo_context_chips
    np.testing.assert_array_equal(got_x, model_inputs(ctx, coordinates=True)[got_p])
    labels = np.where(np.pad(mask, ((0, 0), (5, 5), (5, 5))), ctx.agb, np.nan)
    np.testing.assert_array_equal(got_a, labels[got_p])


def test_standardiser_uses_training_chips_and_imputes(rng):
    x = rng.normal(5, 2, (10, 3, 4, 4)).astype("float32")
    x[0, 1, 0, 0] = np.nan
    std = Standardiser.fit(x[:6])
    flat = np.moveaxis(x[:6], 1, 0).reshape(3, -1)
    np.testing.assert_allclose(std.mean, np.nanmean(flat, axis=1), rtol=1e-5)
    out = std.apply(x)
    assert out[0, 1, 0, 0] == 0.0 and np.isfinite(out).all()
    t = std.apply(torch.from_numpy(x))
    np.testing.assert_allclose(t.numpy(), out, rtol=1e-6, atol=1e-6)


def test_streamed_and_device_batches_are_equal(demo_config, demo_folds, demo_chips):
    idx = np.arange(24)
    inputs = model_inputs(demo_chips, coordinates=True)
    std = Standardiser.fit(inputs[idx])
    target = make_target(demo_chips.agb, log=True, per_chip=False)
    dev = DeviceChips(inputs[idx], target[idx], std, "cpu")
    ds = StreamingChips(
        demo_config.cube.output,
        demo_folds.iloc[idx],
        size_px=demo_config.chips.size,
        stride_px=_stride(demo_config),
        standardiser=std,
        coordinates=True,
        log_target=True,
    )
    stream = StreamSource(ds, "cpu", num_workers=0)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    for (xa, ya, ia), (xb, yb, ib) in zip(
        dev.iterate(order, 8), stream.iterate(order, 8), strict=True
    ):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(ia, ib)


@pytest.fixture(scope="module")
def small_chunk_cube(demo_config, tmp_path_factory):
    """The demo cube again with 20-px chunks: 16-px chips straddle tile edges, edge tiles are
    partial."""
    from agbcube.cube import build_cube

    cube = demo_config.cube.model_copy(
        update={"chunks": 20, "output": tmp_path_factory.mktemp("c20") / "cube.zarr"}
    )
    build_cube(demo_config.sites, cube, progress=False)
    return cube.output


def test_chunked_chips_cut_the_same_chips_reading_each_tile_once(
    demo_config, demo_folds, demo_chips, small_chunk_cube
):
    from agbcube.train.data import ChunkedChips

    size = demo_config.chips.size
    ds = ChunkedChips(
        small_chunk_cube,
        demo_folds,
        size_px=size,
        standardiser=None,
        coordinates=True,
        log_target=True,
    )
    rng = np.random.default_rng(0)
    positions = rng.choice(len(demo_folds), size=len(demo_folds) + 17)  # repeats, some absent
    got_x, got_a, got_p = (np.concatenate(v) for v in zip(*ds.blocks(positions), strict=True))
    np.testing.assert_array_equal(np.sort(got_p), np.sort(positions))
    expect = model_inputs(demo_chips, coordinates=True)
    np.testing.assert_array_equal(got_x, expect[got_p])
    np.testing.assert_array_equal(got_a, demo_chips.agb[got_p])
    # every 20-px tile under the chips read once, no more
    tiles = set()
    for p in np.unique(positions):
        r, c, site = demo_folds.row.iloc[p], demo_folds.col.iloc[p], demo_folds.site.iloc[p]
        for ti in range(r // 20, (r + size - 1) // 20 + 1):
            for tj in range(c // 20, (c + size - 1) // 20 + 1):
                tiles.add((site, ti, tj))
    assert ds.tiles_read == len(tiles)


def test_chunked_batches_hold_each_chip_as_often_as_asked(
    demo_config, demo_folds, demo_chips, small_chunk_cube
):
    from agbcube.train.data import ChunkedChips

    idx = np.arange(40)
    inputs = model_inputs(demo_chips, coordinates=False)
    std = Standardiser.fit(inputs[idx])
    mask = np.random.default_rng(1).random((40, 16, 16)) > 0.3
    ds = ChunkedChips(
        small_chunk_cube,
        demo_folds.iloc[idx],
        size_px=16,
        standardiser=std,
        coordinates=False,
        log_target=True,
        label_mask=mask,
        shuffle_chips=16,
    )
    order = torch.multinomial(
        torch.ones(40), 60, replacement=True, generator=torch.Generator().manual_seed(2)
    )
    seen = []
    sizes = []
    for xb, yb, ib in ds.iterate(order, 8):
        i = ib.numpy()
        seen.append(i)
        sizes.append(len(i))
        torch.testing.assert_close(xb, torch.from_numpy(std.apply(inputs[idx][i])), rtol=0, atol=0)
        want = make_target(
            np.where(mask[i], demo_chips.agb[idx][i], np.nan), log=True, per_chip=False
        )
        torch.testing.assert_close(yb, torch.from_numpy(want), rtol=0, atol=0, equal_nan=True)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.sort(order.numpy()))
    # full batches but the last of each site
    assert sum(n != 8 for n in sizes) <= demo_folds.iloc[idx]["site"].nunique()
    # not simply storage order: the shuffle buffer mixes chips
    assert not (np.diff(np.concatenate(seen)) >= 0).all()
    # an abandoned pass stops its reader thread
    it = ds.iterate(order, 8)
    next(it)
    it.close()


@pytest.mark.parametrize("head", ["chip", "dense"])
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_model_shapes(head, norm):
    model = CNNCoordinateModel(7, 16, head=head, norm=norm, conv_channels=(8, 16), fc_units=(12,))
    out = model(torch.randn(5, 7, 16, 16))
    assert out.shape == ((5,) if head == "chip" else (5, 16, 16))
    assert torch.isfinite(out).all()
    # odd sizes work too
    model = CNNCoordinateModel(3, 24, head=head, norm=norm)
    assert model(torch.randn(2, 3, 24, 24)).shape[0] == 2


@pytest.mark.parametrize("log", [False, True])
def test_target_transform_round_trips_and_never_decodes_below_zero(log):
    agb = np.array([0.0, 5.0, 80.0, 300.0, np.nan], dtype=np.float32)
    target = TargetTransform.fit(make_target(agb[None, None], log=log, per_chip=False), log=log)
    encoded = target.encode(make_target(agb, log=log, per_chip=False))
    assert abs(np.nanmean(encoded)) < 1e-5 and np.nanstd(encoded) == pytest.approx(1, rel=1e-4)
    np.testing.assert_allclose(target.decode(encoded), agb, rtol=1e-4, atol=1e-3)
    # an output far below the training range is 0 Mg/ha, not negative AGB
    assert target.decode(np.array([-50.0]))[0] == 0.0
    assert TargetTransform.from_dict(target.to_dict()) == target


def test_losses_known_values():
    pred = torch.tensor([1.0, 3.0])
    target = torch.tensor([1.0, 1.0])
    assert make_loss("mse")(pred, target).item() == pytest.approx(2.0)
    assert make_loss("huber", delta=1.0)(pred, target).item() == pytest.approx(0.75)
    # dense: only valid pixels count
    p = torch.zeros(1, 2, 2)
    t = torch.tensor([[[1.0, float("nan")], [3.0, float("nan")]]])
    assert per_sample_loss(p, t, kind="mse").item() == pytest.approx(5.0)


def test_spatial_loss_penalises_autocorrelated_residuals():
    torch.manual_seed(0)
    target = torch.zeros(4, 16, 16)
    smooth = torch.linspace(-1, 1, 16)[None, :, None].expand(4, 16, 16).clone()
    noisy = torch.randn(4, 16, 16) * smooth.std()
    loss = make_loss("spatial", spatial_weight=1.0)
    huber = make_loss("huber")
    extra_smooth = loss(smooth, target) - huber(smooth, target)
    extra_noisy = loss(noisy, target) - huber(noisy, target)
    assert extra_smooth > 0.5 and extra_noisy < 0.2
    # chip head: residuals similar for near chips are penalised through the centres
    centres = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
    pred = torch.tensor([1.0, 1.0, -1.0, -1.0])
    assert loss(pred, torch.zeros(4), centres) > huber(pred, torch.zeros(4))


def test_augmentation_is_consistent():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    y = x[:, 0].clone()
    g = torch.Generator().manual_seed(1)
    xa, ya = augment_batch(
        x, y, g, probability=1.0, geometric=True, spectral=False, jitter=0.0, n_spectral=2
    )
    # inputs, coordinate channels and target move together
    torch.testing.assert_close(xa[:, 0], ya)
    torch.testing.assert_close(xa[:, 2], xa[:, 0] + 32)
    assert not torch.equal(xa, x)
    # spectral jitter touches only the spectral channels
    g = torch.Generator().manual_seed(1)
    xs, _ = augment_batch(
        x, y, g, probability=1.0, geometric=False, spectral=True, jitter=0.1, n_spectral=2
    )
    torch.testing.assert_close(xs[:, 2], x[:, 2])
    assert not torch.equal(xs[:, :2], x[:, :2])
    # probability 0: untouched; same seed, same result
    g = torch.Generator().manual_seed(1)
    xn, yn = augment_batch(
        x, y, g, probability=0.0, geometric=True, spectral=True, jitter=0.1, n_spectral=2
    )
    assert torch.equal(xn, x) and torch.equal(yn, y)
    for k in range(8):
        torch.testing.assert_close(dihedral_inverse(dihedral(x, k), k), x)


def test_tta_averages_dihedral_predictions():
    torch.manual_seed(0)
    model = CNNCoordinateModel(3, 8, head="dense", conv_channels=(4,), norm="none")
    x = torch.randn(3, 3, 8, 8)
    one = predict(model, x, tta=1)
    four = predict(model, x, tta=4)
    manual = sum(dihedral_inverse(model(dihedral(x, k)), k) for k in range(4)) / 4
    torch.testing.assert_close(four, manual.detach())
    assert not torch.allclose(one, four)
    # chip head: a scalar per chip, the mean over the transforms
    chip = CNNCoordinateModel(3, 8, head="chip", conv_channels=(4,), fc_units=(4,))
    want = sum(chip.eval()(dihedral(x, k)) for k in range(4)) / 4
    torch.testing.assert_close(predict(chip, x, tta=4), want.detach())


def _toy(n=48, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, size, size)).astype("float32")
    y = (2.0 * x[:, 0].mean(axis=(1, 2)) + 5.0).astype("float32")
    return x, y


def _cfg(**kw) -> TrainConfig:
    base = dict(
        conv_channels=[8, 16],
        fc_units=[16],
        epochs=6,
        batch_size=8,
        patience=50,
        hnm_start_epoch=2,
        aug_probability=0.5,
        dropout=0.1,
    )
    return TrainConfig(**{**base, **kw})


def _fit(cfg, x, y, checkpoint=None, resume=False, echo=None, seed=3):
    std = Standardiser.fit(x[:32])
    train = DeviceChips(x[:32], y[:32], std, "cpu")
    val = DeviceChips(x[32:], y[32:], std, "cpu")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(cfg, 3, x.shape[-1])
        fit = fit_fold(
            model,
            train,
            val,
            cfg,
            n_spectral=3,
            seed=seed,
            checkpoint=checkpoint,
            resume=resume,
            echo=echo,
        )
    return model, fit


def test_training_learns_and_restores_best_weights():
    x, y = _toy()
    model, fit = _fit(_cfg(epochs=15, learning_rate=3e-3), x, y)
    assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"]
    best = min(h["val_loss"] for h in fit.history)
    assert fit.history[fit.best_epoch]["val_loss"] == best
    std = Standardiser.fit(x[:32])
    val = DeviceChips(x[32:], y[32:], std, "cpu")
    model.eval()
    with torch.no_grad():
        now = per_sample_loss(model(val.x), val.y, kind="huber").mean().item()
    assert now == pytest.approx(best, rel=1e-5)


def test_early_stopping():
    x, y = _toy()
    _, fit = _fit(_cfg(epochs=40, patience=2, learning_rate=0.5), x, y)
    assert fit.stopped.startswith("early stop") and len(fit.history) < 40


def test_early_stopping_follows_the_trailing_mean_of_the_validation_loss(monkeypatch):
    import agbcube.train.loop as loop

    # scripted validation losses: epoch 1 is the lowest single epoch, a lucky one; the trailing
    # mean of 3 is lowest at epoch 7, where the loss has come down for good
    losses = [5.0, 1.0, 6.0, 6.0, 2.0, 2.0, 2.0, 1.5, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]
    script = iter(losses)
    monkeypatch.setattr(
        loop, "_per_sample", lambda model, data, *a: torch.full((len(data),), next(script))
    )
    x, y = _toy()
    cfg = dict(epochs=15, patience=6, hard_negative_mining=False)
    _, raw = _fit(_cfg(**cfg), x, y)
    assert (raw.best_epoch, len(raw.history)) == (1, 8)  # stopped 6 epochs after the lucky one
    script = iter(losses)
    _, smooth = _fit(_cfg(**cfg, val_window=3), x, y)
    assert smooth.best_epoch == 7
    assert smooth.stopped.startswith("early stop") and len(smooth.history) == 14
    assert [h["val_loss"] for h in smooth.history] == losses[:14]  # the raw losses


def test_hnm_weights_follow_per_sample_loss(monkeypatch):
    import agbcube.train.loop as loop

    seen = {}
    real = torch.multinomial

    def spy(weights, n, **kw):
        seen["w"] = weights.clone()
        return real(weights, n, **kw)

    monkeypatch.setattr(loop.torch, "multinomial", spy)
    x, y = _toy()
    y[:4] += 50.0  # four very hard chips
    _fit(_cfg(epochs=3, hnm_start_epoch=1, oversampling_factor=3.0), x, y)
    w = seen["w"]
    assert w.shape == (32,)
    assert w.max().item() == pytest.approx(3.0) and w.min().item() >= 1.0
    assert set(torch.topk(w, 4).indices.tolist()) == {0, 1, 2, 3}


def test_resume_is_bit_identical(tmp_path):
    x, y = _toy()
    cfg = _cfg(epochs=6)
    full, _ = _fit(cfg, x, y, checkpoint=tmp_path / "a.pt")

    class Stop(Exception):
        pass

    def die_at_epoch_3(line):
        if "epoch   3/" in line:
            raise Stop

    with pytest.raises(Stop):
        _fit(cfg, x, y, checkpoint=tmp_path / "b.pt", echo=die_at_epoch_3)
    resumed, fit = _fit(cfg, x, y, checkpoint=tmp_path / "b.pt", resume=True)
    assert len(fit.history) == 6
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_nan_losses_are_skipped_then_stop():
    from agbcube.errors import TrainingError

    x, y = _toy()
    y[:] = np.nan
    with pytest.raises(TrainingError, match="not finite for 3 consecutive steps"):
        _fit(_cfg(epochs=3, max_bad_steps=3, loss="mse"), x, y)


def test_metrics_known_values():
    from agbcube.train.metrics import regression_metrics

    m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 6.0]))
    assert m["rmse"] == pytest.approx(1.0)
    assert m["r2"] == pytest.approx(1 - 4 / 5)
    assert m["mae"] == pytest.approx(0.5) and m["bias"] == pytest.approx(0.5)
    assert m["spearman"] == pytest.approx(1.0) and m["rrmse"] == pytest.approx(0.4)
    assert regression_metrics(np.array([1.0]), np.array([2.0]))["r2"] is None


def _chip_frame(n_chips: int, px: int, seed: int = 0) -> pd.DataFrame:
    """Pixels of ``n_chips`` chips: a chip-level signal that one model sees, plus noise."""
    rng = np.random.default_rng(seed)
    level = np.repeat(rng.normal(100, 30, n_chips), px)
    true = level + rng.normal(0, 10, level.size)
    return pd.DataFrame(
        {
            "chip_id": np.repeat([f"s:{i}" for i in range(n_chips)], px),
            "site": "s",
            "fold": 0,
            "agb_true": true,
            "good": level + rng.normal(0, 5, level.size),
            "poor": 100 + 0.5 * (level - 100) + rng.normal(0, 20, level.size),
        }
    )


def test_r2_bootstrap_pools_whole_chips():
    from agbcube.train.metrics import r2_bootstrap, regression_metrics

    f = _chip_frame(30, 16)
    groups = f["chip_id"].to_numpy()
    boot = r2_bootstrap(f["agb_true"], [f["good"], f["poor"]], groups, n_boot=50, seed=3)
    # resample 0 by hand: the same draws, each drawn chip's pixels pooled as often as drawn
    codes = pd.factorize(groups)[0]
    counts = np.random.default_rng(3).multinomial(30, np.full(30, 1 / 30), size=50)[0]
    take = np.concatenate([np.flatnonzero(codes == g).repeat(c) for g, c in enumerate(counts)])
    for j, col in enumerate(("good", "poor")):
        expect = regression_metrics(f["agb_true"].to_numpy()[take], f[col].to_numpy()[take])
        assert boot[0, j] == pytest.approx(expect["r2"], rel=1e-9)
    # pixels of a chip are alike: resampling them one by one would understate the spread
    by_pixel = r2_bootstrap(f["agb_true"], [f["poor"]], np.arange(len(f)), seed=1)[:, 0]
    by_chip = r2_bootstrap(f["agb_true"], [f["poor"]], groups, seed=1)[:, 0]
    assert by_chip.std() > 2 * by_pixel.std()


def test_summaries_and_differences_carry_intervals():
    from agbcube.train.metrics import r2_difference, summarise

    f = _chip_frame(60, 9, seed=5)
    s = summarise(f, true="agb_true", pred="good")
    low, high = s["per_site"]["s"]["r2_ci95"]
    assert low < s["per_site"]["s"]["r2"] < high and s["overall"]["r2_ci95"] == [low, high]
    assert (
        summarise(f.drop(columns="chip_id"), true="agb_true", pred="good")["overall"]["r2_ci95"]
        is None
    )
    d = r2_difference(f["agb_true"], f["good"], f["poor"], f["chip_id"])
    poor = summarise(f, true="agb_true", pred="poor")["overall"]["r2"]
    assert d["r2"] == pytest.approx(s["overall"]["r2"] - poor)
    assert 0 < d["ci95"][0] < d["r2"] < d["ci95"][1] and d["p_a_better"] == 1.0
    same = r2_difference(f["agb_true"], f["good"], f["good"], f["chip_id"])
    assert same["r2"] == 0 and same["ci95"] == [0, 0] and same["p_a_better"] == 0


def test_random_cv_samples_pixels_from_every_training_chip_as_the_honest_baseline_does(
    demo_config, demo_folds, tmp_path, monkeypatch
):
    import agbcube.train.baseline as baseline
    from agbcube.folds import training_pool
    from agbcube.train import run_cv

    fitted = []  # chips handed to each hgb fit: the honest folds' first, then the random ones
    real_fit = baseline.fit_hgb_pixels

    def fit(x, target, **kw):
        fitted.append(x.shape[0])
        return real_fit(x, target, **kw)

    monkeypatch.setattr(baseline, "fit_hgb_pixels", fit)
    train = demo_config.train.model_copy(
        update={
            "model": "hgb-pixel",
            "baseline": "none",
            "hgb_max_pixels": 500,
            "random_cv": True,
            "label_buffer": "chip",  # the pool: training_pool's chips
        }
    )
    cfg = demo_config.model_copy(update={"train": train})
    run_cv(cfg, output=tmp_path / "run", device="cpu", plots=False)
    n = demo_config.folds.n_folds
    honest, leaky = fitted[:n], fitted[n:]
    assert honest == [training_pool(demo_folds, k).size for k in range(n)]
    # 500 pixels would need 3 chips; each random fold's model still sees all its training chips
    assert sum(leaky) == (n - 1) * len(demo_folds) and len(leaky) == n


def test_random_cv_scores_every_chip_once_from_memory_or_the_cube(
    demo_config, demo_folds, tmp_path
):
    from agbcube.cli import _metrics_table
    from agbcube.train import run_cv

    results = {}
    for path in ("device", "stream"):
        train = demo_config.train.model_copy(
            update={
                "model": "hgb-pixel",
                "baseline": "none",
                # enough for every training chip: in memory the baseline samples pixels from
                # every chip, streaming it samples chips first, then pixels
                "hgb_max_pixels": len(demo_folds) * demo_config.chips.size**2 * 2 // 3,
                "random_cv": True,
                "data_path": path,
                "num_workers": 0,
            }
        )
        cfg = demo_config.model_copy(update={"train": train})
        results[path] = run_cv(cfg, output=tmp_path / path, device="cpu", plots=False)
    leaky, honest = results["device"]["random_cv"], results["device"]["models"]["hgb-pixel"]
    assert leaky["model"] == "hgb-pixel" and leaky["n_folds"] == demo_config.folds.n_folds
    # every chip is a test chip once, and its pixels are the ones the honest folds score
    assert leaky["chip"]["mg_ha"]["overall"]["n"] == len(demo_folds)
    for level in ("chip", "pixel"):
        assert leaky[level]["mg_ha"]["overall"]["n"] == honest[level]["mg_ha"]["overall"]["n"]
        assert set(leaky[level]["mg_ha"]["per_site"]) == {"alpha", "beta", "gamma"}
        assert leaky[level]["mg_ha"]["overall"]["r2_ci95"] is not None
    # the chips read from the cube give the same figures as the chips held in memory
    streamed = results["stream"]["random_cv"]
    for level in ("chip", "pixel"):
        for site, m in leaky[level]["mg_ha"]["per_site"].items():
            assert streamed[level]["mg_ha"]["per_site"][site]["r2"] == pytest.approx(m["r2"])
        honest_streamed = results["stream"]["models"]["hgb-pixel"][level]["mg_ha"]["overall"]
        assert honest_streamed["r2"] == pytest.approx(honest[level]["mg_ha"]["overall"]["r2"])
    caption = str(_metrics_table(results["device"]).caption)
    n = demo_config.folds.n_folds
    assert f"random {n}-fold split (leaky, no buffer)" in caption and "(honest " in caption


def test_run_cv_writes_every_output(demo_config, demo_folds, tmp_path):
    import json

    from agbcube.train import load_ensemble, run_cv

    cfg = demo_config.model_copy(
        update={
            "train": demo_config.train.model_copy(
                update={"epochs": 2, "conv_channels": [8], "fc_units": [8], "hgb_max_pixels": 2000}
            )
        }
    )
    out = tmp_path / "run"
    metrics = run_cv(cfg, output=out, device="cpu")
    for name in (
        "config.yaml",
        "folds.parquet",
        "predictions.parquet",
        "metrics.json",
        "ensemble.pt",
        "plots/predicted_vs_observed.png",
        "plots/training_history.png",
        "plots/residuals.png",
        "plots/site_performance.png",
        "plots/residual_map_alpha.png",
        "fold_0/model.pt",
        "fold_2/checkpoint.pt",
    ):
        assert (out / name).exists(), name
    pred = pd.read_parquet(out / "predictions.parquet")
    assert set(pred.model) == {"cnn-coordinate", "hgb-pixel"}
    assert {"chip_id", "site", "fold", "agb_true", "agb_pred", "log_true", "log_pred"} <= set(
        pred.columns
    )
    cnn = pred[pred.model == "cnn-coordinate"]
    assert sorted(cnn.chip_id) == sorted(demo_folds.chip_id)  # every chip tested once
    on_disk = json.loads((out / "metrics.json").read_text())
    for level in ("chip", "pixel"):
        for scale in ("mg_ha", "log"):
            block = on_disk["models"]["hgb-pixel"][level][scale]
            assert set(block["per_site"]) == {"alpha", "beta", "gamma"}
            assert set(block["overall"]) >= {"rmse", "r2", "mae", "bias", "spearman", "rrmse"}
    assert metrics["models"]["hgb-pixel"]["chip"]["mg_ha"]["overall"]["r2"] > 0.5
    # intervals at both levels (pixels pair with their chips), and the model minus the baseline
    for level in ("chip", "pixel"):
        for site, m in on_disk["models"]["cnn-coordinate"][level]["mg_ha"]["per_site"].items():
            low, high = m["r2_ci95"]
            assert low <= high, (level, site)
            hgb = on_disk["models"]["hgb-pixel"][level]["mg_ha"]["per_site"][site]["r2"]
            diff = on_disk["difference"][level][site]
            assert diff["r2"] == pytest.approx(m["r2"] - hgb)
            assert diff["ci95"][0] <= diff["ci95"][1] and 0 <= diff["p_a_better"] <= 1
    assert on_disk["difference"]["models"] == ["cnn-coordinate", "hgb-pixel"]
    models, spec = load_ensemble(out)
    assert len(models) == 3
    assert spec["size_px"] == demo_config.chips.size + 2 * demo_config.train.context_px
    from agbcube.errors import TrainingError

    with pytest.raises(TrainingError, match="already holds a run"):
        run_cv(cfg, output=out, device="cpu")

    # the run's ensemble maps a site: COGs on the cube's grid, AOA from the run's folds
    from typer.testing import CliRunner

    from agbcube.cli import app
    from agbcube.cube import open_cube

    result = CliRunner().invoke(
        app, ["predict", str(out), "--site", "beta", "--output", str(tmp_path / "maps"), "-q"]
    )
    assert result.exit_code == 0, result.output
    cube = open_cube(demo_config.cube.output, "beta")
    with rasterio.open(tmp_path / "maps" / "agb_mean.tif") as src:
        assert src.crs == cube.rio.crs and src.shape == (cube.sizes["y"], cube.sizes["x"])
        agb = src.read(1)
    with rasterio.open(tmp_path / "maps" / "agb_std.tif") as src:
        spread = src.read(1)
    assert np.isfinite(agb).mean() > 0.9
    assert np.nanmin(spread) >= 0 and np.nanmax(spread) > 0  # three fold models disagree
    with rasterio.open(tmp_path / "maps" / "aoa.tif") as src:
        assert set(np.unique(src.read(1))) <= {0, 1, 255}


def _small(demo_config, **train):
    """The demo config with a small dense model, refit on, and these train settings."""
    settings = {"epochs": 2, "conv_channels": [8], "fc_units": [8], "head": "dense", "refit": True}
    return demo_config.model_copy(
        update={"train": demo_config.train.model_copy(update={**settings, **train})}
    )


@pytest.mark.parametrize("label_buffer", ["chip", "pixel"])
def test_streamed_and_device_resident_runs_give_the_same_results(
    demo_config, demo_folds, tmp_path, label_buffer
):
    from agbcube.train import run_cv

    def cfg(path: str):
        return _small(
            demo_config, baseline="none", data_path=path, num_workers=0, label_buffer=label_buffer
        )

    metrics = run_cv(cfg("device"), output=tmp_path / "d", device="cpu", plots=False)
    run_cv(cfg("stream"), output=tmp_path / "s", device="cpu", plots=False)
    # refit: a second model per fold, trained on every chip beyond the test buffer
    for k, info in metrics["folds"].items():
        assert info["n_refit"] > info["n_train"] + info["n_val"] - 1
        assert info["refit_epochs"] == info["best_epoch"] + 1
        assert (tmp_path / "d" / f"fold_{k}" / "checkpoint_refit.pt").exists()
        role = demo_folds[f"role_{k}"]
        if label_buffer == "pixel":  # buffer-ring chips give the pixels beyond the buffer
            assert info["n_train"] >= (role == "train").sum()
            assert info["n_train_px"] > 0
            assert info["min_label_distance_m"] > min(
                demo_folds.attrs["agbcube"]["buffer_m"].values()
            )
        else:
            assert info["n_train"] == (role == "train").sum()
    a = pd.read_parquet(tmp_path / "d" / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "s" / "predictions.parquet")
    pd.testing.assert_frame_equal(a, b)
    wa = torch.load(tmp_path / "d" / "fold_1" / "model.pt", weights_only=False)
    wb = torch.load(tmp_path / "s" / "fold_1" / "model.pt", weights_only=False)
    for name, t in wa["state_dict"].items():
        assert torch.equal(t, wb["state_dict"][name]), name


@pytest.mark.parametrize(("context_px", "log_target"), [(0, True), (3, False)])
def test_chunked_run_predicts_every_test_chip_in_order(
    demo_config, demo_folds, tmp_path, context_px, log_target
):
    from agbcube.train import run_cv

    def cfg(path: str):
        return _small(
            demo_config,
            data_path=path,
            label_buffer="pixel",
            shuffle_chips=32,
            context_px=context_px,
            log_target=log_target,
        )

    metrics = run_cv(cfg("chunks"), output=tmp_path / "c", device="cpu", plots=False)
    run_cv(cfg("device"), output=tmp_path / "d", device="cpu", plots=False)
    assert metrics["run"]["data_path"] == "chunks"
    a = pd.read_parquet(tmp_path / "c" / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "d" / "predictions.parquet")
    pd.testing.assert_frame_equal(
        a[["chip_id", "site", "fold", "model", "agb_true"]],
        b[["chip_id", "site", "fold", "model", "agb_true"]],
    )
    assert np.isfinite(a["agb_pred"]).all()
    for k, info in metrics["folds"].items():
        assert info["data_path"] == "chunks"
        assert info["n_train"] == metrics_device_n_train(tmp_path / "d", k)
        # the model sees the chip and its context; only the chip's pixels are scored
        model = torch.load(tmp_path / "c" / f"fold_{k}" / "model.pt", weights_only=False)
        assert model["size_px"] == demo_config.chips.size + 2 * context_px
        assert model["context_px"] == context_px
        pixels = pd.read_parquet(tmp_path / "c" / f"fold_{k}" / "pixels.parquet")
        test = demo_folds[f"role_{k}"] == "test"
        n_valid = np.rint(demo_folds.loc[test, "valid_fraction"] * demo_config.chips.size**2)
        assert len(pixels) == 2 * int(n_valid.sum())  # the CNN's and the baseline's
    if context_px:  # the run maps a site like any dense run, its AOA from the chips themselves
        from typer.testing import CliRunner

        from agbcube.cli import app

        maps = tmp_path / "maps"
        result = CliRunner().invoke(
            app, ["predict", str(tmp_path / "c"), "--site", "beta", "--output", str(maps), "-q"]
        )
        assert result.exit_code == 0, result.output
        with rasterio.open(maps / "agb_mean.tif") as src:
            assert np.isfinite(src.read(1)).mean() > 0.9
        with rasterio.open(maps / "aoa.tif") as src:
            assert (src.read(1) == 1).any()


def test_ensemble_averages_its_members(demo_config, demo_folds, demo_chips, tmp_path):
    from agbcube.train import run_cv
    from agbcube.train.loop import predict
    from agbcube.train.run import load_ensemble

    cfg = _small(demo_config, epochs=1, baseline="none", ensemble=2, tta=False, context_px=0)
    train = cfg.train
    metrics = run_cv(cfg, output=tmp_path / "e", device="cpu", plots=False)
    n_folds = len(metrics["folds"])
    assert all(info["ensemble"] == 2 for info in metrics["folds"].values())
    assert (tmp_path / "e" / "fold_0" / "model_1.pt").exists()
    models, _ = load_ensemble(tmp_path / "e")
    assert len(models) == 2 * n_folds
    # fold 0's predictions are the mean of its two members' maps, in Mg/ha
    test = np.flatnonzero(demo_folds["fold"].to_numpy() == 0)
    inputs = model_inputs(demo_chips, coordinates=train.coordinates == "geographic")
    maps = []
    for model, std, target in models[:2]:
        x = torch.from_numpy(std.apply(inputs[test]))
        maps.append(target.decode(predict(model, x).numpy()))
    assert not np.allclose(maps[0], maps[1])  # two different models
    pix = np.where(np.isfinite(demo_chips.agb[test]), np.mean(maps, axis=0), np.nan)
    expect = np.nanmean(pix.reshape(len(test), -1), axis=1)
    got = pd.read_parquet(tmp_path / "e" / "predictions.parquet").query("fold == 0")
    np.testing.assert_allclose(got["agb_pred"].to_numpy(), expect, rtol=1e-5)


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
    epochs=1, conv_channels=[4], fc_units=[4], head="dense", data_path="chunks",
    label_buffer="pixel", coordinates="geographic", baseline="none"))
m = run_cv(cfg.model_copy(update=dict(train=train)), output={str(tmp_path / "run")!r},
           device="cpu", plots=False)
print(json.dumps(m["run"]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"data_path": "chunks"' in done.stdout


def metrics_device_n_train(run, k):
    import json

    return json.loads((run / "metrics.json").read_text())["folds"][str(k)]["n_train"]


def test_out_of_memory_names_the_batch_size(monkeypatch):
    from agbcube.errors import TrainingError

    x, y = _toy()

    def boom(self, inp):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(CNNCoordinateModel, "forward", boom)
    with pytest.raises(TrainingError, match=r"out of cpu memory at train.batch_size=8"):
        _fit(_cfg(epochs=1), x, y)
