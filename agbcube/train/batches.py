"""From raw chips to batches ready for the model: one preparation, two batch sources.

`Preparation` is the fold's one preparation step, the same for every reader: lon/lat
channels when the model takes them, standardisation with statistics of the fold's training
chips (NaN imputed with the training mean, i.e. 0 after standardising), the target (per chip
or per pixel, optional ``log1p``, standardised) and the label mask (AGB hidden where a fold
may not train on it). Augmentation is drawn per batch (`draw_augmentation`) and applied by
`gather_batch`, the one function that cuts every batch, inside its gather.

What the training loop consumes is a `BatchSource`:

* `DeviceBatches`: the prepared chips held on the training device, every batch a
  gather (the fast path);
* `StreamBatches`: chips prepared as a reader delivers them (a reader thread reads
  ahead), shuffled within a buffer of ``shuffle_chips`` (cubes larger than memory).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from agbcube.chips import ChipGeometry
from agbcube.train.model import Augmentation, dihedral_index
from agbcube.train.readers import ChipReader, RawBlock

__all__ = [
    "BatchSource",
    "DeviceBatches",
    "Preparation",
    "Standardiser",
    "StreamBatches",
    "TargetTransform",
    "context_mask",
    "gather_batch",
    "make_target",
]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets, chip indices


class BatchSource(Protocol):
    """What the training loop consumes: a fold role's chips, prepared, in batches."""

    device: torch.device

    def __len__(self) -> int:
        """Chips of the source; ``iterate``'s ``order`` indexes them."""
        ...

    def iterate(
        self, order: torch.Tensor, batch_size: int, augment: Callable[[int], Any] | None = None
    ) -> Iterator[Batch]:
        """Batches ``(x (n, c, h, w), y, index)`` of the chips in ``order`` (each as often as
        listed); ``index`` says which chips a batch holds. ``augment(n)`` draws a batch's
        `Augmentation`."""
        ...


# --------------------------------------------------------------------------------------------
# standardisation and the target


@dataclass
class Standardiser:
    """Per-channel mean and scale fitted on training chips only.

    NaN features are imputed with the training mean (0 after standardisation).
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, *, block: int = 256) -> Standardiser:
        """Fit on ``(n, channel, h, w)`` chips, ignoring NaN."""
        return cls.fit_blocks(x[i : i + block] for i in range(0, max(len(x), 1), block))

    @classmethod
    def fit_blocks(cls, blocks: Iterable[np.ndarray]) -> Standardiser:
        """Fit on an iterable of ``(n, channel, h, w)`` blocks.

        Float64 sums in block order: readers that deliver the same blocks give bit-identical
        statistics.
        """
        count = total = squares = None
        for xb in blocks:
            flat = np.moveaxis(np.asarray(xb), 1, 0).reshape(xb.shape[1], -1).astype(np.float64)
            ok = np.isfinite(flat)
            vals = np.where(ok, flat, 0.0)
            sums = (ok.sum(1), vals.sum(1), (vals**2).sum(1))
            if count is None:
                count, total, squares = sums
            else:
                count, total, squares = count + sums[0], total + sums[1], squares + sums[2]
        if count is None:
            raise ValueError("no training chips to fit the standardisation on")
        n = np.maximum(count, 1)
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
        mean = np.where((count > 0) & np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def apply(self, x: Any) -> Any:
        """Standardise a numpy array or torch tensor ``(n, channel, h, w)``; NaN → 0."""
        if isinstance(x, np.ndarray):
            out = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
            return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        mean = torch.as_tensor(self.mean, device=x.device)[None, :, None, None]
        std = torch.as_tensor(self.std, device=x.device)[None, :, None, None]
        return torch.nan_to_num((x - mean) / std, nan=0.0, posinf=0.0, neginf=0.0)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> Standardiser:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


@dataclass
class TargetTransform:
    """AGB (Mg/ha) ↔ the network's target: optional ``log1p``, then standardised.

    Standardising the target with the training chips' mean and s.d. lets the output layer start
    at the right scale: on a few hundred optimiser steps (what a fold of a small site gives),
    an output bias that must climb from 0 to ``log1p(AGB) ≈ 5`` at a learning rate of 1e-3
    never gets there.
    """

    log: bool
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, target: np.ndarray, *, log: bool) -> TargetTransform:
        """Fit on targets already made by `make_target` (NaN ignored)."""
        # float64 over the flattened values: the same numbers in the same order give the same
        # statistics whichever reader delivered them
        flat = np.asarray(target, dtype=np.float64).ravel()
        flat = flat[np.isfinite(flat)]
        mean = float(flat.mean()) if flat.size else 0.0
        std = float(flat.std()) if flat.size else 1.0
        return cls(log, mean, std if std > 1e-12 else 1.0)

    def encode(self, target: np.ndarray) -> np.ndarray:
        """``make_target`` output → network target."""
        return ((target - self.mean) / self.std).astype(np.float32)

    def decode(self, output: np.ndarray) -> np.ndarray:
        """Network output → AGB in Mg/ha, never below 0.

        A linear target's output can go below 0 Mg/ha, and so can ``expm1`` of a log one (down
        to −1); AGB cannot, so metrics and maps get 0 there.
        """
        value = np.asarray(output, dtype=np.float64) * self.std + self.mean
        return np.maximum(np.expm1(value) if self.log else value, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"log": self.log, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetTransform:
        return cls(bool(d["log"]), float(d["mean"]), float(d["std"]))


def make_target(agb: np.ndarray, *, log: bool, per_chip: bool) -> np.ndarray:
    """Training target from AGB maps ``(n, h, w)`` in Mg/ha.

    ``per_chip``: the chip's mean valid AGB, ``(n,)``; else the map. ``log``: ``log1p`` (robust
    to the near-zero values some AGB maps hold, unlike ``log``).
    """
    if per_chip:
        valid = np.isfinite(agb)
        total = np.where(valid, agb, 0.0).sum(axis=(1, 2), dtype=np.float64)
        agb = (total / np.maximum(valid.sum(axis=(1, 2)), 1)).astype(np.float32)
    out = np.log1p(agb) if log else agb
    return np.ascontiguousarray(out, dtype=np.float32)


def context_mask(mask: np.ndarray | None, margin: int, size_px: int) -> np.ndarray:
    """Where a window's AGB may be a label: the chip's pixels that ``mask`` (``(..., size,
    size)``, default all) allows, never the margin. Shape ``(..., size + 2m, size + 2m)``."""
    core = np.ones((size_px, size_px), bool) if mask is None else np.asarray(mask, bool)
    pad = [(0, 0)] * (core.ndim - 2) + [(margin, margin), (margin, margin)]
    return np.pad(core, pad, constant_values=False) if margin else core


# --------------------------------------------------------------------------------------------
# the fold's one preparation step


@dataclass
class Preparation:
    """How a fold turns raw chips into model inputs and targets.

    Attributes
    ----------
    standardiser : Standardiser
        Of the model inputs (features, then lon/lat when ``coordinates``).
    target : TargetTransform
    coordinates : bool
        Append each pixel's longitude and latitude as two input channels.
    per_chip : bool
        One target per chip (its mean AGB: the chip head), else a map of the chip's pixels.
    geometry : agbcube.chips.ChipGeometry
        The chips' side, the context read around them (``context_px``) and the context the
        model takes on each side (``reach_px``: a dense model's output is the chip). Inputs
        read with more context are cropped, with less padded with 0 (the imputed mean, as
        beyond a site's edge).
    """

    standardiser: Standardiser
    target: TargetTransform
    coordinates: bool
    per_chip: bool
    geometry: ChipGeometry

    @classmethod
    def fit(
        cls,
        blocks: Iterable[RawBlock],
        mask_of: Callable[[np.ndarray], np.ndarray | None],
        *,
        coordinates: bool,
        per_chip: bool,
        log_target: bool,
        geometry: ChipGeometry,
    ) -> Preparation:
        """Fit the standardisation and the target transform in one pass over the training
        chips' ``blocks``; ``mask_of(positions)`` gives their label masks."""
        targets: list[np.ndarray] = []

        def inputs() -> Iterator[np.ndarray]:
            for block in blocks:
                agb = masked_labels(block.agb, mask_of(block.positions), geometry)
                targets.append(make_target(agb, log=log_target, per_chip=per_chip))
                yield _with_coordinates(block, coordinates)

        std = Standardiser.fit_blocks(inputs())
        target = TargetTransform.fit(np.concatenate(targets), log=log_target)
        return cls(std, target, coordinates, per_chip, geometry)

    def inputs(self, block: RawBlock) -> np.ndarray:
        """Standardised, imputed model inputs ``(n, channel, w, w)`` float32, ``w`` the chip
        plus the model's reach on each side."""
        x = self.standardiser.apply(_with_coordinates(block, self.coordinates))
        return _fit_margin(x, self.geometry.context_px, self.geometry.reach_px)

    def targets(self, block: RawBlock, mask: np.ndarray | None) -> np.ndarray:
        """Network targets: ``(n,)``, or the chips' maps ``(n, size, size)``; NaN where no
        label may be used."""
        agb = self.core(masked_labels(block.agb, mask, self.geometry))
        return self.target.encode(make_target(agb, log=self.target.log, per_chip=self.per_chip))

    def core(self, windows: np.ndarray) -> np.ndarray:
        """The chips' own pixels of ``(..., w, w)`` windows read with the context."""
        m, s = self.geometry.context_px, self.geometry.size_px
        return windows[..., m : m + s, m : m + s]

    @property
    def n_channels(self) -> int:
        return int(self.standardiser.mean.shape[0])


def _fit_margin(x: np.ndarray, have: int, want: int) -> np.ndarray:
    """Windows ``(n, c, w, w)`` with ``have`` context pixels a side cropped or zero-padded to
    ``want``."""
    if have > want:
        d = have - want
        return np.ascontiguousarray(x[..., d:-d, d:-d])
    if have < want:
        d = want - have
        return np.pad(x, ((0, 0), (0, 0), (d, d), (d, d)))
    return x


def _with_coordinates(block: RawBlock, coordinates: bool) -> np.ndarray:
    if not coordinates:
        return block.x
    if block.lonlat is None:
        raise ValueError("coordinate channels need a reader made with lonlat=True")
    return np.concatenate([block.x, block.lonlat], axis=1)


def masked_labels(agb: np.ndarray, mask: np.ndarray | None, geometry: ChipGeometry) -> np.ndarray:
    """AGB windows with the labels ``mask`` (``(n, size, size)``) hides set to NaN."""
    if mask is None:
        return agb
    where = context_mask(mask, geometry.context_px, geometry.size_px)
    return np.where(where, agb, np.float32(np.nan))


# --------------------------------------------------------------------------------------------
# batches


def gather_batch(
    rows: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, hw: tuple[int, int], aug: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one batch from prepared chips stored channels-last, augmenting inside the gather.

    ``rows`` is ``(n_chips, h · w, c)`` (every chip's pixels, channels last) and ``y`` the
    chips' targets; ``idx`` the batch's chips. A dihedral transform is a permutation of a
    chip's pixels, so the batch with each sample's transform is one row gather (``c``
    contiguous floats per index); the spectral gain then scales the first channels. Returns
    ``x`` ``(n, c, h, w)`` (a channels-last view) and ``y``.
    """

    h, w = hw
    n = idx.numel()
    turned = aug is not None and h == w and bool((aug.transform > 0).any())
    if turned:
        transform = aug.transform.to(rows.device)
        perm = dihedral_index(h, rows.device)[transform]
        flat = (idx[:, None] * (h * w) + perm).reshape(-1)  # the row of every output pixel
        batch = rows.view(-1, rows.shape[-1]).index_select(0, flat).view(n, h * w, -1)
    else:
        batch = rows.index_select(0, idx)
    yb = y.index_select(0, idx)
    if turned and yb.dim() == 3:  # the chip's map: the same turn about the same centre
        s = yb.shape[-1]
        yb = yb.reshape(n, s * s).gather(1, dihedral_index(s, rows.device)[transform])
        yb = yb.view(n, s, s)
    if aug is not None and aug.gain is not None:
        k = aug.gain.shape[1]
        batch[:, :, :k] *= aug.gain.to(rows.device, batch.dtype)[:, None, :]
    return batch.view(n, h, w, -1).permute(0, 3, 1, 2), yb


def _rows_of(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(n, c, h, w)`` → ``(n, h · w, c)`` on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return t.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]).contiguous()


class DeviceBatches:
    """A fold role's chips, prepared once and held on the training device.

    Parameters
    ----------
    x : np.ndarray, (n, channel, h, w)
        Prepared inputs (`Preparation.inputs`).
    y : np.ndarray, (n,) or (n, h, w)
        Prepared targets (`Preparation.targets`).
    device : torch.device or str
    """

    gather_bytes: float = 1e9  # the largest pass cut in one gather

    def __init__(self, x: np.ndarray, y: np.ndarray, device: Any) -> None:
        self.device = torch.device(device)
        self._rows = _rows_of(x, self.device)
        self._hw = (int(x.shape[2]), int(x.shape[3]))
        self.y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(self.device)
        self._n = int(x.shape[0])

    @classmethod
    def prepare(
        cls,
        blocks: Iterable[RawBlock],
        prep: Preparation,
        mask_of: Callable[[np.ndarray], np.ndarray | None],
        device: Any,
    ) -> DeviceBatches:
        """Prepare ``blocks`` (in order) and hold them on ``device``."""
        xs, ys = [], []
        for block in blocks:
            xs.append(prep.inputs(block))
            ys.append(prep.targets(block, mask_of(block.positions)))
        return cls(np.concatenate(xs), np.concatenate(ys), device)

    def __len__(self) -> int:
        return self._n

    @property
    def x(self) -> torch.Tensor:
        """Every chip's inputs ``(n, c, h, w)`` (a channels-last view)."""
        h, w = self._hw
        return self._rows.view(self._n, h, w, -1).permute(0, 3, 1, 2)

    def iterate(
        self, order: torch.Tensor, batch_size: int, augment: Callable[[int], Any] | None = None
    ) -> Iterator[Batch]:
        """Batches of ``order``. A pass that fits in ``gather_bytes`` is cut in one gather (the
        batches' augmentations drawn first, in the same order as one by one: the same numbers),
        and its batches are views of it: on a GPU one gather per pass runs at the device's copy
        rate, where one per batch is bound by launching kernels."""
        order = order.to(self.device)
        starts = range(0, order.numel(), batch_size)
        sizes = [min(batch_size, order.numel() - s) for s in starts]
        augs = [augment(n) for n in sizes] if augment is not None else None
        per_chip = self._rows[0].numel() * self._rows.element_size()
        if order.numel() * per_chip <= self.gather_bytes and sizes:
            x, y = gather_batch(self._rows, self.y, order, self._hw, _joined(augs))
            for start, n in zip(starts, sizes, strict=True):
                yield x[start : start + n], y[start : start + n], order[start : start + n]
            return
        for i, start in enumerate(starts):
            idx = order[start : start + batch_size]
            x, y = gather_batch(self._rows, self.y, idx, self._hw, augs[i] if augs else None)
            yield x, y, idx


def _joined(augs: list[Any] | None) -> Any:
    """Per-batch augmentations as one, for a whole pass's gather."""
    if not augs:
        return None

    gains = [a.gain for a in augs]
    gain = None if gains[0] is None else torch.cat(gains)
    return Augmentation(torch.cat([a.transform for a in augs]), gain)


class StreamBatches:
    """A fold role's chips read through a reader as each batch pass needs them.

    A reader thread reads and cuts the chips in the reader's own order (storage order for
    `ChunkReader`); this thread prepares them and keeps them in
    a shuffle buffer: each chip gets a random priority within ``shuffle_chips`` arrivals and
    batches take the lowest, the usual trade of out-of-core training (the device path
    shuffles fully). Memory: the buffer, ``shuffle_chips`` prepared chips.

    Parameters
    ----------
    reader : ChipReader
    positions : np.ndarray
        The role's chips, rows of the reader's table (unique).
    mask : np.ndarray of bool, (len(positions), size, size), optional
        Their label masks.
    prep : Preparation
    device : torch.device or str
    shuffle_chips : int
    prefetch : int
        Raw blocks read ahead.
    """

    def __init__(
        self,
        reader: ChipReader,
        positions: np.ndarray,
        mask: np.ndarray | None,
        prep: Preparation,
        device: Any,
        *,
        shuffle_chips: int = 2048,
        prefetch: int = 4,
    ) -> None:
        self.reader, self.positions, self.mask, self.prep = reader, positions, mask, prep
        self.device = torch.device(device)
        self.shuffle_chips, self.prefetch = max(1, shuffle_chips), max(1, prefetch)
        self._index = {int(p): i for i, p in enumerate(positions)}

    def __len__(self) -> int:
        return len(self.positions)

    def _local(self, table_rows: np.ndarray) -> np.ndarray:
        return np.fromiter((self._index[int(p)] for p in table_rows), np.int64, table_rows.size)

    def prepared(self, order: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(x, y, index)`` prepared blocks of the chips in ``order``, as the reader yields
        them (read ahead by a thread)."""
        for block in _read_ahead(self.reader.blocks(self.positions[order]), self.prefetch):
            local = self._local(block.positions)
            mask = None if self.mask is None else self.mask[local]
            yield self.prep.inputs(block), self.prep.targets(block, mask), local

    def iterate(
        self, order: torch.Tensor, batch_size: int, augment: Callable[[int], Any] | None = None
    ) -> Iterator[Batch]:
        order_np = np.asarray(order.cpu(), dtype=np.int64)
        rng = np.random.default_rng(order_np[:64].tolist())  # follows the caller's generator
        buffer = _ShuffleBuffer(self.device, self.shuffle_chips, rng)
        for x, y, local in self.prepared(order_np):
            buffer.add(x, y, local)
            while buffer.size >= self.shuffle_chips + batch_size:
                yield buffer.take(batch_size, augment)
        while buffer.size:
            yield buffer.take(min(batch_size, buffer.size), augment)


class _ShuffleBuffer:
    """Prepared chips in slots of one growing tensor; batches take the lowest priorities."""

    def __init__(self, device: torch.device, window: int, rng: np.random.Generator) -> None:
        self.device, self.window, self.rng = device, window, rng
        self.rows: torch.Tensor | None = None  # (slots, h · w, c)
        self.y: torch.Tensor | None = None
        self.hw = (0, 0)
        self.slots = np.empty(0, np.int64)  # occupied slot of each held chip
        self.index = np.empty(0, np.int64)  # its chip index in the source
        self.priority = np.empty(0)
        self.free: list[int] = []
        self.arrived = 0

    @property
    def size(self) -> int:
        return int(self.slots.size)

    def _grow(self, x: np.ndarray, y: np.ndarray, need: int) -> None:
        have = 0 if self.y is None else int(self.y.shape[0])
        if need <= have:
            return
        new = max(need, 2 * have, 64)
        c, h, w = x.shape[1:]
        rows = torch.empty((new, h * w, c), device=self.device)
        ys = torch.empty((new, *y.shape[1:]), device=self.device)
        if self.rows is not None:
            rows[: self.rows.shape[0]] = self.rows
            ys[:have] = self.y
        self.rows, self.y, self.hw = rows, ys, (h, w)
        self.free.extend(range(have, new))

    def add(self, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> None:
        n = x.shape[0]
        self._grow(x, y, self.size + n)
        slots = np.array([self.free.pop() for _ in range(n)], np.int64)
        at = torch.from_numpy(slots).to(self.device)
        self.rows[at] = _rows_of(x, self.device)
        self.y[at] = torch.from_numpy(y).to(self.device)
        self.slots = np.concatenate([self.slots, slots])
        self.index = np.concatenate([self.index, index])
        self.priority = np.concatenate(
            [self.priority, self.arrived + self.window * self.rng.random(n)]
        )
        self.arrived += n

    def take(self, n: int, augment: Callable[[int], Any] | None) -> Batch:
        first = np.argpartition(self.priority, n - 1)[:n] if n < self.size else np.arange(self.size)
        slots, index = self.slots[first], self.index[first]
        keep = np.ones(self.size, bool)
        keep[first] = False
        self.slots, self.index, self.priority = (
            self.slots[keep],
            self.index[keep],
            self.priority[keep],
        )
        aug = augment(n) if augment is not None else None
        x, y = gather_batch(
            self.rows, self.y, torch.from_numpy(slots).to(self.device), self.hw, aug
        )
        self.free.extend(slots.tolist())
        return x, y, torch.from_numpy(index).to(self.device)


def _read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items``, produced by a thread up to ``depth`` ahead (errors re-raised here)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as err:  # surfaced in the consumer
            ready.put(err)

    thread = threading.Thread(target=produce, name="agbcube-chip-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
