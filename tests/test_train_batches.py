"""The one preparation step and the batch sources the training loop consumes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from agbcube.chips import ChipGeometry
from agbcube.train.batches import (
    DeviceBatches,
    Preparation,
    Standardiser,
    StreamBatches,
    TargetTransform,
    context_mask,
    make_target,
)
from agbcube.train.model import draw_augmentation
from agbcube.train.readers import ChunkReader, MemoryReader, RawBlock


def test_standardiser_uses_training_chips_and_imputes(rng):
    x = rng.normal(5, 2, (10, 3, 4, 4)).astype("float32")
    x[0, 1, 0, 0] = np.nan
    std = Standardiser.fit(x[:6])
    flat = np.moveaxis(x[:6], 1, 0).reshape(3, -1)
    np.testing.assert_allclose(std.mean, np.nanmean(flat, axis=1), rtol=1e-5)
    np.testing.assert_allclose(std.std, np.nanstd(flat, axis=1), rtol=1e-4)
    out = std.apply(x)
    assert out[0, 1, 0, 0] == 0.0 and np.isfinite(out).all()
    t = std.apply(torch.from_numpy(x))
    np.testing.assert_allclose(t.numpy(), out, rtol=1e-6, atol=1e-6)
    assert Standardiser.from_dict(std.to_dict()).mean.tolist() == std.mean.tolist()


@pytest.mark.parametrize("log", [False, True])
def test_target_transform_round_trips_and_never_decodes_below_zero(log):
    agb = np.array([0.0, 5.0, 80.0, 300.0, np.nan], dtype=np.float32)
    target = TargetTransform.fit(make_target(agb[None, None], log=log, per_chip=False), log=log)
    encoded = target.encode(make_target(agb, log=log, per_chip=False))
    assert abs(np.nanmean(encoded)) < 1e-5 and np.nanstd(encoded) == pytest.approx(1, rel=1e-4)
    np.testing.assert_allclose(target.decode(encoded), agb, rtol=1e-4, atol=1e-3)
    assert target.decode(np.array([-50.0]))[0] == 0.0  # never negative AGB
    assert TargetTransform.from_dict(target.to_dict()) == target


def test_chip_target_is_the_mean_of_valid_pixels():
    agb = np.array([[[1.0, 3.0], [np.nan, 5.0]]], np.float32)
    assert make_target(agb, log=False, per_chip=True)[0] == pytest.approx(3.0)
    assert make_target(agb, log=True, per_chip=True)[0] == pytest.approx(np.log1p(3.0))


def test_context_mask_never_labels_the_margin():
    m = context_mask(np.ones((2, 3, 3), bool), 2, 3)
    assert m.shape == (2, 7, 7) and m.sum() == 18 and m[:, 2:5, 2:5].all()


def _blocks(x, agb, lonlat=None, block=5):
    n = len(x)
    for s in range(0, n, block):
        at = np.arange(s, min(n, s + block))
        yield RawBlock(x[at], agb[at], None if lonlat is None else lonlat[at], at)


def test_preparation_fits_on_training_chips_masks_labels_and_adds_coordinates(rng):
    x = rng.normal(10, 3, (12, 4, 8, 8)).astype(np.float32)
    lonlat = rng.normal(0, 1, (12, 2, 8, 8)).astype(np.float32)
    agb = rng.uniform(50, 150, (12, 8, 8)).astype(np.float32)
    agb[:, :1] = np.nan  # a margin of 1: never a label
    mask = rng.random((12, 6, 6)) > 0.5
    prep = Preparation.fit(
        _blocks(x, agb, lonlat),
        lambda rows: mask[rows],
        coordinates=True,
        per_chip=False,
        log_target=False,
        geometry=ChipGeometry(6, 6, context_px=1, reach_px=1),
    )
    assert prep.n_channels == 6
    inputs = np.concatenate([x, lonlat], axis=1)
    np.testing.assert_array_equal(prep.standardiser.mean, Standardiser.fit(inputs).mean)
    labels = np.where(context_mask(mask, 1, 6), agb, np.nan)
    assert prep.target.mean == pytest.approx(float(np.nanmean(labels.astype(np.float64))))
    block = next(_blocks(x, agb, lonlat))
    y = prep.targets(block, mask[:5])  # the chips' own pixels
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(labels[:5, 1:7, 1:7]))
    np.testing.assert_array_equal(prep.inputs(block), prep.standardiser.apply(inputs[:5]))


def test_device_batches_augment_inside_the_gather(rng):
    """Each sample turned by its own dihedral transform, inputs and target map together, and
    only the spectral channels scaled."""
    from agbcube.train.model import dihedral

    x = rng.normal(size=(10, 3, 6, 6)).astype(np.float32)
    y = rng.normal(size=(10, 6, 6)).astype(np.float32)
    source = DeviceBatches(x, y, "cpu")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    kw = dict(probability=0.8, geometric=True, spectral=True, jitter=0.1, n_spectral=2)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    seen = []
    for xb, yb, idx in source.iterate(order, 4, lambda n: draw_augmentation(n, g1, **kw)):
        aug = draw_augmentation(idx.numel(), g2, **kw)
        for j, i in enumerate(idx.tolist()):
            k = int(aug.transform[j])
            want = dihedral(torch.from_numpy(x[i]), k).clone()
            want[:2] *= aug.gain[j][:, None, None]
            torch.testing.assert_close(xb[j], want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(yb[j], dihedral(torch.from_numpy(y[i]), k))
        seen.append(idx)
    assert torch.equal(torch.cat(seen), order)
    torch.testing.assert_close(source.x, torch.from_numpy(x))
    # a pass cut in one gather (the default) or batch by batch: the same batches
    passes = []
    for budget in (1e9, 0):
        source.gather_bytes = budget
        g = torch.Generator().manual_seed(7)
        draw = functools.partial(draw_augmentation, generator=g, **kw)
        passes.append(list(source.iterate(order, 3, draw)))
    for (xa, ya, ia), (xb, yb, ib) in zip(*passes, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


def test_inputs_carry_the_models_margin_and_targets_the_chip(rng):
    x = rng.normal(size=(4, 2, 10, 10)).astype(np.float32)
    agb = rng.uniform(50, 150, (4, 10, 10)).astype(np.float32)
    block = RawBlock(x, agb, None, np.arange(4))
    std = Standardiser(np.zeros(2, np.float32), np.ones(2, np.float32))
    target = TargetTransform(log=False)
    for model_margin, side in ((3, 12), (2, 10), (1, 8)):  # padded, as read, cropped
        prep = Preparation(std, target, False, False, ChipGeometry(6, 6, 2, model_margin))
        xi = prep.inputs(block)
        assert xi.shape == (4, 2, side, side)
        d = abs(model_margin - 2)
        if model_margin > 2:
            assert (xi[..., :d, :] == 0).all()  # the padding is the imputed mean
            np.testing.assert_array_equal(xi[..., d:-d, d:-d], x)
        elif model_margin < 2:
            np.testing.assert_array_equal(xi, x[..., d:-d, d:-d])
        np.testing.assert_array_equal(prep.targets(block, None), agb[:, 2:8, 2:8])


def test_a_turned_batch_turns_window_and_chip_map_about_one_centre(rng):
    """Inputs hold the chip and its margin, targets the chip: the same dihedral transform."""
    from agbcube.train.model import Augmentation, dihedral

    x = rng.normal(size=(3, 2, 8, 8)).astype(np.float32)
    y = x[:, 0, 2:6, 2:6].copy()  # the centre of channel 0
    source = DeviceBatches(x, y, "cpu")
    aug = Augmentation(torch.tensor([1, 5, 6]), None)
    xb, yb, _ = next(source.iterate(torch.arange(3), 3, lambda n: aug))
    torch.testing.assert_close(xb[:, 0, 2:6, 2:6], yb)
    for i, k in enumerate((1, 5, 6)):
        torch.testing.assert_close(xb[i], dihedral(torch.from_numpy(x[i]), k))


def test_readers_give_identical_preparations_and_batches(
    demo_config, demo_folds, demo_bands, small_chunk_cube
):
    size = demo_config.chips.size
    train = np.arange(0, len(demo_folds), 2)
    mask = np.random.default_rng(1).random((train.size, size, size)) > 0.3
    local = {int(p): i for i, p in enumerate(train)}

    def mask_of(rows):
        return mask[[local[int(r)] for r in rows]]

    common = dict(size_px=size, bands=demo_bands, context_px=2, lonlat=True)
    memory = MemoryReader(demo_config.cube.output, demo_folds, **common)
    chunks = ChunkReader(small_chunk_cube, demo_folds, **common)
    geometry = ChipGeometry(size, size, context_px=2)
    kw = dict(coordinates=True, per_chip=False, log_target=True, geometry=geometry)
    prep = Preparation.fit(memory.blocks(train), mask_of, **kw)
    # the chunk reader delivers the chips in storage order: the same statistics to float32
    other = Preparation.fit(chunks.blocks(train), mask_of, **kw)
    np.testing.assert_allclose(other.standardiser.mean, prep.standardiser.mean, rtol=1e-6)
    assert other.target.mean == pytest.approx(prep.target.mean, rel=1e-9)
    device = DeviceBatches.prepare(memory.blocks(train), prep, mask_of, "cpu")
    stream = StreamBatches(chunks, train, mask, prep, "cpu", shuffle_chips=16)
    order = torch.multinomial(
        torch.ones(train.size), 60, replacement=True, generator=torch.Generator().manual_seed(2)
    )
    seen, sizes = [], []
    for xb, yb, ib in stream.iterate(order, 8):
        want_x, want_y = next(device.iterate(ib, ib.numel()))[:2]
        torch.testing.assert_close(xb, want_x, rtol=0, atol=0)
        torch.testing.assert_close(yb, want_y, rtol=0, atol=0, equal_nan=True)
        seen.append(ib.numpy())
        sizes.append(ib.numel())
    # every chip as often as the order lists it, in full batches but the last few
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.sort(order.numpy()))
    assert sum(n != 8 for n in sizes) <= 1
    assert not (np.diff(np.concatenate(seen)) >= 0).all()  # the shuffle buffer mixes chips
    it = stream.iterate(order, 8)  # an abandoned pass stops its reader thread
    next(it)
    it.close()


def test_stream_batches_surface_reader_errors(demo_config, demo_folds, demo_bands):
    class Broken(MemoryReader):
        def blocks(self, positions=None, block=256):
            yield from super().blocks(positions[:4], block)
            raise OSError("disk gone")

    reader = Broken(demo_config.cube.output, demo_folds, size_px=16, bands=demo_bands)
    prep = Preparation.fit(
        MemoryReader.blocks(reader, np.arange(8)),
        lambda rows: None,
        coordinates=False,
        per_chip=True,
        log_target=False,
        geometry=ChipGeometry(16, 16),
    )
    stream = StreamBatches(reader, np.arange(8), None, prep, "cpu", shuffle_chips=2)
    with pytest.raises(OSError, match="disk gone"):
        list(stream.iterate(torch.arange(8), 2))
