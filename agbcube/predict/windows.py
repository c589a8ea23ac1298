"""Sliding windows on one global grid and their cosine-tapered blending."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agbcube.errors import ConfigError
from agbcube.train.loop import predict


@dataclass(frozen=True)
class TileSpec:
    """What a tile task needs besides the models and its input window."""

    shape: tuple[int, int]  # the site's (y, x) size
    window: int
    stride: int
    tta: int
    device: str
    n_features: int
    crs: str | None  # WKT, when the models take lon/lat channels
    reach_px: int = 0  # context pixels a model reads around each window (unpadded convolutions)
    member_folds: tuple[int | None, ...] | None = None  # each member's fold (None: one fold)


def cosine_weights(size: int) -> np.ndarray:
    """2-D cosine (Hann) taper of ``size × size``, sampled at pixel centres.

    Sampling at centres keeps every weight strictly positive (so every pixel counts) while the
    rim's weight stays tiny relative to the inside, whatever the corner; a floor would not.
    """
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.outer(w, w).astype(np.float32)


def window_starts(n: int, window: int, stride: int) -> np.ndarray:
    """Window offsets along an axis: a regular grid plus one flush with the far edge."""
    if n <= window:
        return np.array([0])
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] != n - window:
        starts.append(n - window)
    return np.array(starts)


def windows_touching(n: int, window: int, stride: int, start: int, size: int) -> np.ndarray:
    """Global window offsets along an axis whose windows overlap ``[start, start + size)``."""
    s = window_starts(n, window, stride)
    return s[(s + window > start) & (s < start + size)]


def window_batch(n_channels: int, window: int, budget_bytes: float = 64e6) -> int:
    return int(max(1, min(256, budget_bytes // (n_channels * window * window * 4))))


def canvas(
    feats: np.ndarray, at: tuple[int, int], ys: np.ndarray, xs: np.ndarray, spec: TileSpec
) -> np.ndarray:
    """``feats`` (read from global pixel ``at``) placed on the region every window of ``ys``
    × ``xs`` reads with its margin, NaN beyond the site (also a site smaller than a window)."""
    m, window = spec.reach_px, spec.window
    oy, ox = int(ys[0]) - m, int(xs[0]) - m
    need = (int(ys[-1]) + window + m - oy, int(xs[-1]) + window + m - ox)
    if (oy, ox) == at and need == feats.shape[1:]:
        return feats
    canvas = np.full((feats.shape[0], *need), np.nan, np.float32)
    ya, xa = at[0] - oy, at[1] - ox
    part = feats[:, : need[0] - ya, : need[1] - xa]
    canvas[:, ya : ya + part.shape[1], xa : xa + part.shape[2]] = part
    return canvas


def blend(
    member: tuple[Any, ...],
    canvas: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    offset: tuple[int, int],
    core: tuple[int, int],
    spec: TileSpec,
) -> np.ndarray:
    """One member's map of the tile core: the cosine-tapered mean of every window over it."""

    model, std, *rest = member
    target = rest[0] if rest else None
    (r0, c0), (ny, nx), window = offset, core, spec.window
    side = window + 2 * spec.reach_px  # each window's input: the window and its margin
    taper = cosine_weights(window)
    acc = np.zeros((ny, nx), np.float64)
    wsum = np.zeros((ny, nx), np.float64)
    windows = [(y, x) for y in ys for x in xs]
    batch_size = window_batch(canvas.shape[0], side)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        stack = np.stack(
            [
                canvas[:, y - ys[0] : y - ys[0] + side, x - xs[0] : x - xs[0] + side]
                for y, x in batch
            ]
        )
        x_t = torch.from_numpy(std.apply(stack)).to(spec.device)
        out = predict(model, x_t, tta=spec.tta).cpu().numpy().astype(np.float64)
        if target is not None:
            out = target.decode(out)
        for (y, x), value in zip(batch, out, strict=True):
            ya, yb = max(y, r0), min(y + window, r0 + ny)
            xa, xb = max(x, c0), min(x + window, c0 + nx)
            w = taper[ya - y : yb - y, xa - x : xb - x]
            v = value if np.ndim(value) == 0 else value[ya - y : yb - y, xa - x : xb - x]
            acc[ya - r0 : yb - r0, xa - c0 : xb - c0] += w * v
            wsum[ya - r0 : yb - r0, xa - c0 : xb - c0] += w
    return acc / np.maximum(wsum, 1e-12)


def default_block(shape: tuple[int, int], window: int, largest: int = 512) -> int:
    """Tile side: ``largest``, or half the site's longer side (at least 4 windows) if smaller."""
    half = -(-max(shape) // 2)
    return int(min(largest, max(half, 4 * window)))


def chunk_offsets(chunks: Sequence[int]) -> np.ndarray:
    """Start of each chunk along an axis."""
    return np.cumsum((0, *chunks[:-1]))


def axis_chunks(n: int, block: int) -> tuple[int, ...]:
    """Regular chunk lengths of ``block`` along an axis of ``n`` (the last one shorter)."""
    block = max(1, block)
    return tuple(min(block, n - s) for s in range(0, n, block)) or (n,)


def check_window(window: int, stride: int, shape: tuple[int, int], default: int) -> None:
    """Refuse window settings that cannot work or would read far more than the site.

    A window may exceed the site up to the run's default (a chip model's window is its chip).
    """
    if window < 2 or stride < 1:
        raise ConfigError(f"window ({window} px) must be >= 2 and stride ({stride} px) >= 1")
    largest = max(*shape, default)
    if window > largest:
        raise ConfigError(
            f"window {window} px is larger than the site ({shape[0]}×{shape[1]} px) and the "
            f"run's default window ({default} px); give --window {largest} or less"
        )
