"""The CNN, its losses and batched augmentation."""

from __future__ import annotations

import pytest
import torch

from agbcube.train.loop import predict
from agbcube.train.model import (
    CNNCoordinateModel,
    dihedral,
    dihedral_inverse,
    draw_augmentation,
    make_loss,
    per_sample_loss,
)


@pytest.mark.parametrize("head", ["chip", "dense"])
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_model_shapes(head, norm):
    model = CNNCoordinateModel(7, 16, head=head, norm=norm, conv_channels=(8, 16), fc_units=(12,))
    out = model(torch.randn(5, 7, 16, 16))
    # the dense head's unpadded convolutions trim one pixel a side per block
    assert model.reach_px == (2 if head == "dense" else 0)
    assert out.shape == ((5,) if head == "chip" else (5, 12, 12))
    assert torch.isfinite(out).all()
    # odd sizes work too
    model = CNNCoordinateModel(3, 24, head=head, norm=norm)
    assert model(torch.randn(2, 3, 24, 24)).shape[0] == 2


def test_unpadded_dense_head_maps_the_chip_as_the_padded_one_maps_its_centre():
    """With the same weights, a window of chip + margin gives the padded model's centre: no
    output pixel saw the padding, and none is computed that is thrown away."""
    torch.manual_seed(0)
    valid = CNNCoordinateModel(4, 14, head="dense", conv_channels=(6, 8, 5), norm="batch")
    same = CNNCoordinateModel(
        4, 14, head="dense", conv_channels=(6, 8, 5), norm="batch", padding="same"
    )
    same.load_state_dict(valid.state_dict())
    valid.eval(), same.eval()
    x = torch.randn(3, 4, 14, 14)
    torch.testing.assert_close(valid(x), same(x)[:, 3:-3, 3:-3])


def test_input_bottleneck_mixes_bands_per_pixel_and_adds_no_reach():
    """The 1×1 bottleneck feeds the first 3×3 block fewer channels; the margin, the output
    size and which outputs one input pixel can move stay those of the blocks alone."""
    torch.manual_seed(0)
    model = CNNCoordinateModel(
        9, 14, head="dense", conv_channels=(6, 5), norm="batch", bottleneck=4
    )
    first, block = model.features[0], model.features[3]
    assert first.kernel_size == (1, 1) and first.out_channels == 4
    assert block.kernel_size == (3, 3) and block.in_channels == 4
    assert model.reach_px == 2
    model.eval()
    x = torch.randn(2, 9, 14, 14)
    out = model(x)
    assert out.shape == (2, 10, 10)
    x[:, :, 7, 7] += 5.0  # one input pixel: only outputs 3..7 (5×5 around it, less 2) move
    moved = (model(x) != out).any(0)
    assert moved[5, 5] and moved.sum() == moved[3:8, 3:8].sum() > 1
    # the chip head takes it too
    chip = CNNCoordinateModel(9, 16, head="chip", conv_channels=(6,), bottleneck=4)
    assert chip(torch.randn(2, 9, 16, 16)).shape == (2,)


@pytest.mark.parametrize("bottleneck", [0, 4])
def test_separable_blocks_keep_the_reach_with_fewer_weights(bottleneck):
    """A depthwise-separable block is a per-channel 3×3 then a 1×1: the margin, the output
    size and which outputs one input pixel can move are those of the full 3×3 blocks."""
    torch.manual_seed(0)
    kw = dict(head="dense", conv_channels=(6, 5), norm="batch", bottleneck=bottleneck)
    full = CNNCoordinateModel(9, 14, **kw)
    model = CNNCoordinateModel(9, 14, separable=True, **kw)
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert [(m.groups, m.kernel_size) for m in depthwise] == [
        (bottleneck or 9, (3, 3)),
        (6, (3, 3)),
    ]
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    assert model.reach_px == full.reach_px == 2
    model.eval()
    x = torch.randn(2, 9, 14, 14)
    out = model(x)
    assert out.shape == (2, 10, 10)
    x[:, :, 7, 7] += 5.0
    moved = (model(x) != out).any(0)
    assert moved[5, 5] and moved.sum() == moved[3:8, 3:8].sum() > 1
    # the padded (chip) head takes it too
    chip = CNNCoordinateModel(9, 16, head="chip", conv_channels=(6,), separable=True)
    assert chip(torch.randn(2, 9, 16, 16)).shape == (2,)


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


def test_augmentation_draws_turns_and_gains_per_sample():
    g = torch.Generator().manual_seed(1)
    kw = dict(geometric=True, spectral=True, jitter=0.1, n_spectral=2)
    aug = draw_augmentation(1000, g, probability=0.7, **kw)
    turned = aug.transform > 0
    assert 0.6 < turned.float().mean() < 0.8 and aug.transform.max() <= 7
    assert aug.gain.shape == (1000, 2)
    # the chosen samples get both a turn (almost surely) and a gain; the others neither
    untouched = (aug.gain == 1).all(dim=1)
    assert not (untouched & turned).any()
    off = draw_augmentation(50, g, probability=0.0, **kw)
    assert (off.transform == 0).all() and (off.gain == 1).all()
    only_gain = draw_augmentation(50, g, probability=1.0, **{**kw, "geometric": False})
    assert (only_gain.transform == 0).all() and not (only_gain.gain == 1).all()
    same = draw_augmentation(5, torch.Generator().manual_seed(3), probability=0.5, **kw)
    again = draw_augmentation(5, torch.Generator().manual_seed(3), probability=0.5, **kw)
    assert torch.equal(same.transform, again.transform) and torch.equal(same.gain, again.gain)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    for k in range(8):
        torch.testing.assert_close(dihedral_inverse(dihedral(x, k), k), x)


def test_tta_averages_dihedral_predictions():
    torch.manual_seed(0)
    model = CNNCoordinateModel(3, 10, head="dense", conv_channels=(4,), norm="none")
    x = torch.randn(3, 3, 10, 10)
    one = predict(model, x, tta=1)
    four = predict(model, x, tta=4)
    manual = sum(dihedral_inverse(model(dihedral(x, k)), k) for k in range(4)) / 4
    torch.testing.assert_close(four, manual.detach())
    assert not torch.allclose(one, four)
    # chip head: a scalar per chip, the mean over the transforms
    chip = CNNCoordinateModel(3, 10, head="chip", conv_channels=(4,), fc_units=(4,))
    want = sum(chip.eval()(dihedral(x, k)) for k in range(4)) / 4
    torch.testing.assert_close(predict(chip, x, tta=4), want.detach())
