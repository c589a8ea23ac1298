"""The CNN, its losses, and the random draw of batched augmentation (applied inside the batch
gather: `agbcube.train.batches.gather_batch`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Augmentation",
    "CNNCoordinateModel",
    "dihedral",
    "dihedral_inverse",
    "draw_augmentation",
    "make_loss",
    "per_sample_loss",
]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _conv3x3(c_in: int, c_out: int, padding: int, separable: bool) -> list[nn.Module]:
    if not separable:
        return [nn.Conv2d(c_in, c_out, 3, padding=padding)]
    return [nn.Conv2d(c_in, c_in, 3, padding=padding, groups=c_in), nn.Conv2d(c_in, c_out, 1)]


class CNNCoordinateModel(nn.Module):
    """Conv blocks, then fully connected layers (chip head) or a per-pixel map (dense head).

    An optional input bottleneck, Conv2d(1×1) → norm → ReLU, first mixes the input bands into
    ``bottleneck`` channels per pixel, so the first 3×3 block convolves those instead of every
    band. Each conv block is Conv2d(3×3) → norm → ReLU → MaxPool(2) → Dropout; the chip head
    flattens and applies Linear → LayerNorm → ReLU → Dropout layers, then one output. The dense
    head keeps the resolution (no pooling), so it predicts an AGB map per chip and learns from
    every labelled pixel. Coordinate channels, when used, are ordinary input channels holding
    each pixel's geographic position.

    The dense head's convolutions are unpadded (``padding="valid"``, the default): each block
    trims one pixel on every side, so a window of the chip plus `margin` context pixels
    on each side gives exactly the chip's map, and nothing is computed for pixels whose output
    is never used. ``padding="same"`` (zero padding, output the size of the input) is how
    earlier versions built it; their model files still load so.

    Parameters
    ----------
    in_channels : int
        Feature bands plus coordinate channels.
    size_px : int
        Input window side.
    head : {"chip", "dense"}
    conv_channels, fc_units : sequence of int
    norm : {"instance", "batch", "none"}
    dropout : float
    bottleneck : int
        Channels of the 1×1 input bottleneck; 0: none.
    separable : bool
        Each block's 3×3 convolution as a depthwise 3×3 (each channel on its own) followed by a
        pointwise 1×1 (depthwise-separable): the same reach, fewer multiply-adds.
    padding : {"valid", "same"}
        The dense head's convolutions (the chip head's are always "same").
    """

    def __init__(
        self,
        in_channels: int,
        size_px: int,
        *,
        head: str = "chip",
        conv_channels: Sequence[int] = (32, 64, 128),
        fc_units: Sequence[int] = (128, 64),
        norm: str = "instance",
        dropout: float = 0.2,
        bottleneck: int = 0,
        separable: bool = False,
        padding: str = "valid",
    ) -> None:
        super().__init__()
        self.head = head
        valid = head == "dense" and padding == "valid"
        #: context pixels each side of the input that the output does not cover
        self.reach_px = len(conv_channels) if valid else 0
        layers: list[nn.Module] = []
        c_in, side = in_channels, size_px
        if bottleneck:
            layers += [nn.Conv2d(c_in, bottleneck, 1), _norm(norm, bottleneck), nn.ReLU()]
            c_in = bottleneck
        for c_out in conv_channels:
            layers += _conv3x3(c_in, c_out, 0 if valid else 1, separable)
            layers += [_norm(norm, c_out), nn.ReLU()]
            if head == "chip" and side >= 4:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            layers.append(nn.Dropout2d(dropout) if head == "dense" else nn.Dropout(dropout))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        if head == "dense":
            self.out = nn.Conv2d(c_in, 1, 1)
        else:
            fc: list[nn.Module] = [nn.Flatten()]
            f_in = c_in * side * side
            for units in fc_units:
                fc += [nn.Linear(f_in, units), nn.LayerNorm(units), nn.ReLU(), nn.Dropout(dropout)]
                f_in = units
            fc.append(nn.Linear(f_in, 1))
            self.out = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, c, h, w)`` → ``(n,)`` for the chip head, ``(n, h - 2m, w - 2m)`` for the dense
        head (``m``: `margin`)."""
        return self.out(self.features(x))[:, 0]


# --------------------------------------------------------------------------------------------
# augmentation


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th of the 8 dihedral transforms of the last two dims (k < 4: rotations)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Undo `dihedral`."""
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


@dataclass(frozen=True)
class Augmentation:
    """One batch's random augmentation: a dihedral transform and a band gain per sample."""

    transform: torch.Tensor  # (n,) int64 in 0..7, 0 = identity
    gain: torch.Tensor | None  # (n, n_spectral) or None


def draw_augmentation(
    n: int,
    generator: torch.Generator,
    *,
    probability: float,
    geometric: bool,
    spectral: bool,
    jitter: float,
    n_spectral: int,
) -> Augmentation:
    """Draw a batch's augmentation from ``generator`` (on the CPU: device-independent).

    Each sample, with probability ``probability``, gets one of the 7 non-identity dihedral
    transforms and a multiplicative jitter of its first ``n_spectral`` channels (the spectral
    bands; coordinate channels are left alone).
    """
    chosen = torch.rand(n, generator=generator) < probability
    which = torch.randint(1, 8, (n,), generator=generator)
    gain = 1.0 + jitter * torch.randn(n, n_spectral, generator=generator)
    transform = torch.where(chosen & geometric, which, torch.zeros_like(which))
    scale = torch.where(chosen[:, None], gain, torch.ones_like(gain)) if spectral else None
    return Augmentation(transform, scale)


@functools.lru_cache(maxsize=16)
def dihedral_index(size: int, device: torch.device) -> torch.Tensor:
    """``(8, size²)`` flat source index of every pixel under each dihedral transform."""
    grid = torch.arange(size * size).view(size, size)
    return torch.stack([dihedral(grid, k).reshape(-1) for k in range(8)]).to(device)


# --------------------------------------------------------------------------------------------
# losses


def _elementwise(pred: torch.Tensor, target: torch.Tensor, kind: str, delta: float) -> torch.Tensor:
    if kind == "mse":
        return (pred - target) ** 2
    return F.huber_loss(pred, target, reduction="none", delta=delta)


def per_sample_loss(
    pred: torch.Tensor, target: torch.Tensor, *, kind: str = "huber", delta: float = 1.0
) -> torch.Tensor:
    """Loss per sample: ``(n,)``.

    For the chip head ``pred`` and ``target`` are ``(n,)``; for the dense head they are
    ``(n, h, w)`` and the loss is the mean over each chip's valid (finite) target pixels.
    """
    base = "huber" if kind == "spatial" else kind
    if target.dim() == 1:  # chip head: one target per chip
        return _elementwise(pred, target, base, delta)
    valid = torch.isfinite(target)
    t = torch.where(valid, target, torch.zeros_like(target))
    count = valid.sum(dim=(-2, -1)).clamp(min=1)
    el = _elementwise(pred, t, base, delta)
    return (el * valid).sum(dim=(-2, -1)) / count


def _moran_dense(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Moran's I of residual maps with rook neighbours, over the batch (vectorised)."""
    valid = torch.isfinite(target)
    r = torch.where(valid, pred - torch.where(valid, target, pred), torch.zeros_like(pred))
    count = valid.sum(dim=(-2, -1)).clamp(min=1)
    mean = r.sum(dim=(-2, -1)) / count
    z = torch.where(valid, r - mean[:, None, None], torch.zeros_like(r))
    both_h = valid[:, :, 1:] & valid[:, :, :-1]
    both_v = valid[:, 1:, :] & valid[:, :-1, :]
    cross = (z[:, :, 1:] * z[:, :, :-1] * both_h).sum(dim=(-2, -1)) + (
        z[:, 1:, :] * z[:, :-1, :] * both_v
    ).sum(dim=(-2, -1))
    pairs = (both_h.sum(dim=(-2, -1)) + both_v.sum(dim=(-2, -1))).clamp(min=1)
    var = (z**2).sum(dim=(-2, -1)) / count
    return ((cross / pairs) / var.clamp(min=1e-8)).mean()


def _moran_chips(pred: torch.Tensor, target: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Moran's I of chip residuals across the batch, inverse-distance weights (vectorised)."""
    r = pred - target
    z = r - r.mean()
    d = torch.cdist(centres, centres)
    w = torch.where(d > 0, 1.0 / d.clamp(min=1e-6), torch.zeros_like(d))
    num = (w * z[:, None] * z[None, :]).sum()
    return (len(z) / w.sum().clamp(min=1e-8)) * num / (z**2).sum().clamp(min=1e-8)


def make_loss(kind: str, *, delta: float = 1.0, spatial_weight: float = 0.2):
    """A loss ``f(pred, target, centres=None) -> scalar`` over valid targets.

    ``"spatial"`` is the Huber loss plus ``spatial_weight`` × the positive part of the Moran's I
    of the residuals (within each chip for the dense head; across the batch's chips, from their
    ``centres``, for the chip head), which penalises spatially autocorrelated errors.
    """

    def loss(pred: torch.Tensor, target: torch.Tensor, centres: torch.Tensor | None = None):
        base = per_sample_loss(pred, target, kind=kind, delta=delta).mean()
        if kind != "spatial":
            return base
        if pred.dim() == 3:
            moran = _moran_dense(pred, target)
        elif centres is not None and pred.shape[0] > 2:
            moran = _moran_chips(pred, target, centres)
        else:
            return base
        return base + spatial_weight * torch.relu(moran)

    return loss
