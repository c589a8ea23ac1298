"""From the cube to batches ready for the model.

Chips are cut from each site's cube with **xbatcher** (a ``BatchGenerator`` whose windows are the
chip grid, restricted to the chips asked for). Two paths deliver batches:

* **device-resident** (:class:`DeviceChips`): the fold's chips are read once, standardised,
  and kept on the training device; every batch is a gather plus an on-device augmentation.
* **streaming** (:class:`StreamingChips`): a torch ``Dataset`` reading each chip lazily from the
  Zarr store, batched by a ``DataLoader`` with prefetching workers, for cubes that do not fit.

Both use the same index order, the same standardisation and the same augmentation generator,
so they give the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from agbcube.errors import BandError

__all__ = [
    "ChipSet",
    "ChunkedChips",
    "DeviceChips",
    "Standardiser",
    "StreamSource",
    "StreamingChips",
    "TargetTransform",
    "chip_lonlat",
    "chip_windows",
    "make_target",
    "read_chips",
]


@dataclass
class ChipSet:
    """Raw chips in host memory, in the order of the chips table they were read for.

    Attributes
    ----------
    x : np.ndarray, (n, band, w, w) float32
        Features of each chip's window (the chip and ``margin`` pixels around it, NaN beyond
        the site's edge), NaN where missing.
    agb : np.ndarray, (n, w, w) float32
        AGB in Mg/ha of the chip's own pixels, NaN where missing and in the margin.
    lonlat : np.ndarray, (n, 2, w, w) float32
        Longitude and latitude of every pixel centre of the window.
    bands : list of str
    margin : int
        Context pixels on each side of the chip (``train.context_px``); ``w = size + 2·margin``.
    """

    x: np.ndarray
    agb: np.ndarray
    lonlat: np.ndarray
    bands: list[str]
    margin: int = 0

    def __len__(self) -> int:
        return self.x.shape[0]


def _select_bands(ds: xr.Dataset, bands: Sequence[str] | None, site: str) -> xr.Dataset:
    if bands is None:
        return ds
    have = [str(b) for b in ds["band"].values]
    missing = [b for b in bands if b not in have]
    if missing:
        raise BandError(
            f"site '{site}' lacks band(s) {missing} that the model uses (train.bands, or the "
            f"first site's bands); its bands: {have}. Give every site the same band names, or "
            "list a common set in train.bands"
        )
    return ds.sel(band=list(bands))


def chip_windows(ds: xr.Dataset, *, size_px: int, stride_px: int) -> Any:
    """An xbatcher ``BatchGenerator`` whose patches are the chip grid of a site's cube."""
    import xbatcher

    return xbatcher.BatchGenerator(
        ds,
        input_dims={"y": size_px, "x": size_px},
        input_overlap={"y": size_px - stride_px, "x": size_px - stride_px},
        preload_batch=True,
    )


def with_margin(ds: xr.Dataset, margin: int) -> xr.Dataset:
    """A site's cube with ``margin`` NaN pixels around it, its x/y coordinates extended on the
    grid's own spacing.

    Windows of ``size + 2·margin`` on the chip grid of the padded cube then start at the same
    offsets as the chips of the original one, each holding a chip and its context.
    """
    if not margin:
        return ds
    out = ds.pad(x=margin, y=margin, constant_values=np.nan)
    ramp = np.arange(1, margin + 1)
    for dim in ("x", "y"):
        v = ds[dim].values.astype(np.float64)
        step = v[1] - v[0] if v.size > 1 else 1.0
        out = out.assign_coords(
            {dim: np.concatenate([v[0] - step * ramp[::-1], v, v[-1] + step * ramp])}
        )
    return out


def context_mask(mask: np.ndarray | None, margin: int, size_px: int) -> np.ndarray:
    """Where a window's AGB may be a label: the chip's pixels that ``mask`` (``(..., size,
    size)``, default all) allows, never the margin. Shape ``(..., size + 2m, size + 2m)``."""
    core = np.ones((size_px, size_px), bool) if mask is None else np.asarray(mask, bool)
    pad = [(0, 0)] * (core.ndim - 2) + [(margin, margin), (margin, margin)]
    return np.pad(core, pad, constant_values=False) if margin else core


def _patch_index(bgen: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Map chip pixel offsets to the generator's patch numbers (from its window selectors)."""
    lookup = {}
    for i, selectors in bgen._batch_selectors.selectors.items():
        sel = selectors[0]
        lookup[(sel["y"].start, sel["x"].start)] = i
    try:
        return np.array([lookup[(int(r), int(c))] for r, c in zip(rows, cols, strict=True)])
    except KeyError as err:
        raise ValueError(
            f"chip at pixel offset {err.args[0]} is not on the chip grid; were the folds made "
            "with other chips settings than this config's?"
        ) from None


def lonlat_of(x: np.ndarray, y: np.ndarray, crs: Any) -> np.ndarray:
    """(2, len(y), len(x)) longitude/latitude of pixel centres given by their coordinates.

    ``crs`` is anything pyproj accepts (a rasterio CRS, WKT, an EPSG string).
    """
    from pyproj import CRS, Transformer

    crs = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    xx, yy = np.meshgrid(np.asarray(x), np.asarray(y))
    if crs.is_geographic:
        return np.stack([xx, yy]).astype(np.float32)
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(xx, yy)
    return np.stack([lon, lat]).astype(np.float32)


def _lonlat_grid(ds: xr.Dataset, margin: int = 0) -> np.ndarray:
    """(2, y, x) longitude/latitude of every pixel centre of a site's cube, with ``margin``
    NaN pixels around it (beyond the site every input is missing, coordinates too)."""
    from agbcube._store import cube_crs

    grid = lonlat_of(ds["x"].values, ds["y"].values, cube_crs(ds))
    if not margin:
        return grid
    return np.pad(grid, ((0, 0), (margin, margin), (margin, margin)), constant_values=np.nan)


def chip_lonlat(store: str | Path, chips: pd.DataFrame, *, size_px: int) -> np.ndarray:
    """(n, 2, size, size) longitude/latitude of the chips' pixel centres (no data is read)."""
    from agbcube._store import open_cube

    out = np.empty((len(chips), 2, size_px, size_px), np.float32)
    rows, cols = chips["row"].to_numpy(), chips["col"].to_numpy()
    for site in pd.unique(chips["site"]):
        mask = (chips["site"] == site).to_numpy()
        grid = _lonlat_grid(open_cube(store, site))
        for pos in np.flatnonzero(mask):
            r, c = int(rows[pos]), int(cols[pos])
            out[pos] = grid[:, r : r + size_px, c : c + size_px]
    return out


def read_chips(
    store: str | Path,
    chips: pd.DataFrame,
    *,
    size_px: int,
    stride_px: int,
    bands: Sequence[str] | None = None,
    context_px: int = 0,
    load_limit_bytes: float = 4e9,
) -> ChipSet:
    """Read chips from a cube with xbatcher, in the order of ``chips``.

    Parameters
    ----------
    store : str or Path
        The cube.
    chips : pd.DataFrame
        Rows with ``site``, ``row`` and ``col``.
    size_px, stride_px : int
        Chip size and grid stride (from the chips settings the folds were made with).
    bands : list of str, optional
        Feature bands to keep (default all).
    context_px : int
        Features read around every chip on each side (NaN beyond the site's edge); the AGB
        there stays NaN: context is input, never label.
    load_limit_bytes : float
        A site whose cube is smaller is read whole first (one sequential read), so xbatcher
        slices memory instead of issuing a small read per chip.

    Returns
    -------
    ChipSet
    """
    from agbcube._store import open_cube

    n = len(chips)
    window = size_px + 2 * context_px
    core = context_mask(None, context_px, size_px)
    out_x = out_agb = out_ll = None
    names: list[str] = []
    positions = np.arange(n)
    for site in pd.unique(chips["site"]):
        mask = (chips["site"] == site).to_numpy()
        ds = open_cube(store, site)[["features", "agb"]]
        # Sites are aligned by band name: the first site's bands (or train.bands) in that order;
        # a site lacking one of them is an error naming it.
        ds = _select_bands(ds, bands if bands is not None else (names or None), site)
        names = [str(b) for b in ds["band"].values]
        if ds.nbytes <= load_limit_bytes:
            ds = ds.load()
        lonlat = _lonlat_grid(ds, context_px)
        ds = with_margin(ds, context_px)
        bgen = chip_windows(ds, size_px=window, stride_px=stride_px)
        index = _patch_index(bgen, chips["row"].to_numpy()[mask], chips["col"].to_numpy()[mask])
        if out_x is None:
            out_x = np.empty((n, len(names), window, window), np.float32)
            out_agb = np.empty((n, window, window), np.float32)
            out_ll = np.empty((n, 2, window, window), np.float32)
        for pos, i in zip(positions[mask], index, strict=True):
            patch = bgen[int(i)]
            out_x[pos] = patch["features"].values
            out_agb[pos] = np.where(core, patch["agb"].values, np.float32(np.nan))
            sel = bgen._batch_selectors.selectors[int(i)][0]
            out_ll[pos] = lonlat[:, sel["y"], sel["x"]]
    assert out_x is not None and out_agb is not None and out_ll is not None
    return ChipSet(out_x, out_agb, out_ll, names, context_px)


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
    def fit_blocks(cls, blocks: Any) -> Standardiser:
        """Fit on an iterable of ``(n, channel, h, w)`` blocks (streamed chips).

        Float64 sums in block order: the in-memory and the streamed paths, fed the same
        blocks, get bit-identical statistics.
        """
        count = total = squares = None
        for xb in blocks:
            flat = np.moveaxis(np.asarray(xb), 1, 0).reshape(xb.shape[1], -1).astype(np.float64)
            ok = np.isfinite(flat)
            vals = np.where(ok, flat, 0.0)
            if count is None:
                count, total, squares = ok.sum(1), vals.sum(1), (vals**2).sum(1)
            else:
                count, total, squares = (
                    count + ok.sum(1),
                    total + vals.sum(1),
                    squares + (vals**2).sum(1),
                )
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
        import torch

        mean = torch.as_tensor(self.mean, device=x.device)[None, :, None, None]
        std = torch.as_tensor(self.std, device=x.device)[None, :, None, None]
        return torch.nan_to_num((x - mean) / std, nan=0.0, posinf=0.0, neginf=0.0)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> Standardiser:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


def model_inputs(chipset: ChipSet, *, coordinates: bool) -> np.ndarray:
    """Features, plus lon/lat channels when ``coordinates``: ``(n, channel, h, w)``."""
    if not coordinates:
        return chipset.x
    return np.concatenate([chipset.x, chipset.lonlat], axis=1)


class DeviceChips:
    """A fold's chips resident on the training device, standardised once.

    Parameters
    ----------
    inputs : np.ndarray, (n, channel, h, w)
        Raw model inputs (features and, optionally, coordinate channels).
    target : np.ndarray, (n,) or (n, h, w)
        The (possibly log-transformed) target per chip or per pixel, NaN where missing.
    standardiser : Standardiser
    device : torch.device or str
    """

    def __init__(
        self, inputs: np.ndarray, target: np.ndarray, standardiser: Standardiser, device: Any
    ) -> None:
        import torch

        # Stored channels-last (n, h, w, c): a batch with its per-sample dihedral transforms is
        # then one row gather (c contiguous floats per index), and the (n, c, h, w) view the
        # model gets is in torch's channels_last memory format, which convolutions take as is.
        store = torch.from_numpy(standardiser.apply(inputs)).to(device)
        store = store.permute(0, 2, 3, 1).contiguous()
        self._rows = store.view(store.shape[0], -1, store.shape[-1])  # (n, h*w, c)
        self._pixels = store.view(-1, store.shape[-1])  # (n*h*w, c)
        self._hw = store.shape[1:3]
        self.x = store.permute(0, 3, 1, 2)  # (n, c, h, w), channels_last
        self.y = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)).to(device)
        self.device = self.x.device

    def __len__(self) -> int:
        return self.x.shape[0]

    def iterate(
        self, order: Any, batch_size: int, augment: Any = None
    ) -> Iterator[tuple[Any, Any, Any]]:
        """Yield ``(x, y, index)`` batches in ``order`` (a CPU tensor of positions).

        ``augment(n)`` draws an :class:`~agbcube.train.model.Augmentation` per batch; it is
        applied inside the gather (one pass over the batch's memory).
        """
        from agbcube.train.model import _dihedral_index

        order = order.to(self.device)
        h, w = self._hw
        for start in range(0, order.numel(), batch_size):
            idx = order[start : start + batch_size]
            n = idx.numel()
            aug = augment(n) if augment is not None else None
            perm = None
            if aug is not None and h == w and bool((aug.transform > 0).any()):
                perm = _dihedral_index(h, self.device)[aug.transform.to(self.device)]
                flat = (idx[:, None] * (h * w) + perm).reshape(-1)  # row of every output pixel
                rows = self._pixels.index_select(0, flat).view(n, h * w, -1)
            else:
                rows = self._rows.index_select(0, idx)
            y = self.y.index_select(0, idx)
            if perm is not None and y.dim() == 3:
                y = y.reshape(n, h * w).gather(1, perm).view(n, h, w)
            if aug is not None and aug.gain is not None:
                k = aug.gain.shape[1]
                rows[:, :, :k] *= aug.gain.to(self.device, rows.dtype)[:, None, :]
            yield rows.view(n, h, w, -1).permute(0, 3, 1, 2), y, idx


class StreamSource:
    """Batches of a :class:`StreamingChips` dataset through a prefetching ``DataLoader``.

    Same interface and same batches as :class:`DeviceChips`; chips are read per batch.
    """

    def __init__(self, dataset: StreamingChips, device: Any, *, num_workers: int = 2) -> None:
        import torch

        self.dataset, self.device = dataset, torch.device(device)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def iterate(
        self, order: Any, batch_size: int, augment: Any = None
    ) -> Iterator[tuple[Any, Any, Any]]:
        import torch
        from torch.utils.data import DataLoader

        from agbcube.train.model import apply_augmentation

        batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the
            # global RNG, which dropout also uses, and the streamed run would drift from the
            # device-resident one.
            generator=torch.Generator().manual_seed(0),
        )
        for (x, y), idx in zip(loader, batches, strict=True):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if augment is not None:
                x, y = apply_augmentation(x, y, augment(x.shape[0]))
            # the memory format of the device-resident path: the same convolution kernels
            yield (
                x.contiguous(memory_format=torch.channels_last),
                y,
                torch.as_tensor(idx, device=self.device),
            )


class StreamingChips:
    """A torch ``Dataset`` of chips read lazily from the cube with xbatcher (out of core).

    Items are ``(inputs, target)`` numpy arrays, standardised like :class:`DeviceChips`.
    ``label_mask`` (n, size, size), when given, hides the AGB of the pixels it leaves False.
    ``context_px`` widens every window by that many feature pixels on each side (AGB NaN there).
    Each worker opens the store itself; dask runs synchronously inside workers so that
    threads × processes do not oversubscribe the cores.
    """

    def __init__(
        self,
        store: str | Path,
        chips: pd.DataFrame,
        *,
        size_px: int,
        stride_px: int,
        standardiser: Standardiser | None,
        coordinates: bool,
        log_target: bool,
        chip_target: bool = False,
        bands: Sequence[str] | None = None,
        target_transform: TargetTransform | None = None,
        label_mask: np.ndarray | None = None,
        context_px: int = 0,
    ) -> None:
        self.store = str(store)
        self.label_mask = label_mask
        self.sites = chips["site"].to_numpy().astype(str)
        self.rows = chips["row"].to_numpy()
        self.cols = chips["col"].to_numpy()
        self.size_px, self.stride_px = size_px, stride_px
        self.margin = context_px
        self._core = context_mask(None, context_px, size_px)
        self.standardiser = standardiser
        self.coordinates, self.log_target = coordinates, log_target
        self.chip_target = chip_target
        self.target_transform = target_transform
        self.bands = list(bands) if bands is not None else None
        self._open: dict[str, tuple[Any, dict, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.sites)

    def _site(self, site: str) -> tuple[Any, dict, np.ndarray]:
        if site not in self._open:
            from agbcube._store import open_cube

            ds = _select_bands(open_cube(self.store, site)[["features", "agb"]], self.bands, site)
            lonlat = _lonlat_grid(ds, self.margin)
            ds = with_margin(ds, self.margin)
            bgen = chip_windows(
                ds, size_px=self.size_px + 2 * self.margin, stride_px=self.stride_px
            )
            starts = {
                (s[0]["y"].start, s[0]["x"].start): i
                for i, s in bgen._batch_selectors.selectors.items()
            }
            self._open[site] = (bgen, starts, lonlat)
        return self._open[site]

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Chip ``i``'s window unstandardised: inputs ``(channel, w, w)`` and AGB ``(w, w)`` in
        Mg/ha (NaN in the context margin and where ``label_mask`` hides it)."""
        import dask

        bgen, starts, lonlat = self._site(self.sites[i])
        k = starts[(int(self.rows[i]), int(self.cols[i]))]
        with dask.config.set(scheduler="synchronous"):
            patch = bgen[k]
        x = patch["features"].values
        if self.coordinates:
            sel = bgen._batch_selectors.selectors[k][0]
            x = np.concatenate([x, lonlat[:, sel["y"], sel["x"]]], axis=0)
        agb = patch["agb"].values
        keep = (
            self._core
            if self.label_mask is None
            else context_mask(self.label_mask[i], self.margin, self.size_px)
        )
        return x, np.where(keep, agb, np.float32(np.nan))

    def blocks(self, block: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """All chips in order, ``block`` at a time: ``(inputs, agb, positions)`` stacks."""
        for start in range(0, len(self), block):
            stop = min(len(self), start + block)
            items = [self.raw(i) for i in range(start, stop)]
            yield (
                np.stack([x for x, _ in items]),
                np.stack([a for _, a in items]),
                np.arange(start, stop),
            )

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        x, agb = self.raw(i)
        target = make_target(agb[None], log=self.log_target, per_chip=self.chip_target)[0]
        if self.target_transform is not None:
            target = self.target_transform.encode(target)
        return self.standardiser.apply(x[None])[0], target


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
        """Fit on targets already made by :func:`make_target` (NaN ignored)."""
        # float64 over the flattened values: the same numbers in the same order give the same
        # statistics whether they come from memory or from streamed blocks
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


class ChunkedChips:
    """A fold's chips read from the cube chunk by chunk: for cubes larger than memory.

    Each pass reads, site by site and in raster order, the chunk tiles that the chips asked
    for touch, decompressing every tile once (a reader thread reads ahead while the caller
    trains). A chip is cut, with one slice copy per tile it spans, once its last tile (in
    raster order) has arrived, and a tile is released once its last chip is cut: what is held
    is about two tile rows (chips straddling a row wait for the next) plus the shuffle buffer.

    Training batches mix the chips of nearby tiles: each chip gets a random priority within
    ``shuffle_chips`` arrivals and batches take the lowest (sites are visited in a random
    order), rather than shuffling the whole fold, the usual trade of out-of-core training. The
    device-resident path shuffles fully. On 2 cores the reads run at the store's sequential
    rate and the cutting, standardising and augmenting halve it (BENCHMARKS.md).

    Parameters
    ----------
    store : str or Path
        The cube.
    chips : pd.DataFrame
        Rows with ``site``, ``row`` and ``col`` (pixel offsets of the chips' corners).
    size_px : int
        Chip side.
    standardiser : Standardiser or None
        Needed by :meth:`iterate`, not by :meth:`blocks`.
    coordinates : bool
        Append lon/lat channels.
    log_target, chip_target : bool
        As in :func:`make_target`.
    bands : list of str, optional
        Feature bands (default all, in the first site's order).
    target_transform : TargetTransform, optional
    label_mask : np.ndarray of bool, (n, size, size), optional
        AGB is hidden (NaN) where False.
    context_px : int
        Feature pixels cut around every chip on each side (NaN beyond the site's edge; AGB NaN
        in that margin).
    device : torch.device or str
        Where :meth:`iterate` delivers batches.
    shuffle_chips : int
        Size of the shuffle buffer.
    prefetch : int
        Tiles read ahead.
    """

    def __init__(
        self,
        store: str | Path,
        chips: pd.DataFrame,
        *,
        size_px: int,
        standardiser: Standardiser | None,
        coordinates: bool,
        log_target: bool,
        chip_target: bool = False,
        bands: Sequence[str] | None = None,
        target_transform: TargetTransform | None = None,
        label_mask: np.ndarray | None = None,
        context_px: int = 0,
        device: Any = "cpu",
        shuffle_chips: int = 2048,
        prefetch: int = 4,
    ) -> None:
        import torch

        self.store = str(store)
        self.sites = chips["site"].to_numpy().astype(str)
        self.rows = chips["row"].to_numpy().astype(np.int64)
        self.cols = chips["col"].to_numpy().astype(np.int64)
        self.size_px = size_px
        self.standardiser, self.target_transform = standardiser, target_transform
        self.coordinates, self.log_target, self.chip_target = coordinates, log_target, chip_target
        self.bands = list(bands) if bands is not None else None
        self.label_mask = label_mask
        self.margin = context_px
        self.device = torch.device(device)
        self.shuffle_chips, self.prefetch = max(1, shuffle_chips), max(1, prefetch)
        self.tiles_read = 0  # decompressed tiles, over the object's life (for benchmarks)

    def __len__(self) -> int:
        return len(self.sites)

    def _open(self, site: str) -> tuple[xr.Dataset, np.ndarray | None]:
        """The site's lazy cube and the positions of our bands in it (``None``: all, in order).

        Bands are picked from each decompressed tile: a band selection on the lazy array
        would make Zarr gather orthogonally, 2-3x slower than reading the whole chunk.
        """
        from agbcube._store import open_cube

        ds = open_cube(self.store, site, chunks=None)[["features", "agb"]]
        have = [str(b) for b in ds["band"].values]
        if self.bands is None:
            self.bands = have
        _select_bands(ds, self.bands, site)  # names a missing band
        index = np.array([have.index(b) for b in self.bands])
        return ds, None if np.array_equal(index, np.arange(len(have))) else index

    def tiles(
        self, positions: np.ndarray, site_order: Sequence[str] | None = None
    ) -> Iterator[tuple[str, Any]]:
        """What a pass reads, in storage order: ``("site", _SitePlan)`` then its tiles.

        Each tile is ``("tile", (key, features, agb))``, decompressed once, in raster order of
        the tiles the chips touch (bands picked from the tile, lon/lat appended when asked).
        """
        from agbcube._store import cube_crs

        sites = self.sites[positions]
        for site in site_order if site_order is not None else pd.unique(sites):
            ds, band_index = self._open(site)
            plan = _SitePlan.make(ds, self, positions[sites == site])
            yield "site", plan
            crs = cube_crs(ds) if self.coordinates else None
            xs, ys = ds["x"].values, ds["y"].values
            for key in plan.tile_order:
                ti, tj = divmod(int(key), plan.n_tj)
                ys_, xs_ = (
                    slice(ti * plan.th, (ti + 1) * plan.th),
                    slice(tj * plan.tw, (tj + 1) * plan.tw),
                )
                tile = ds.isel(y=ys_, x=xs_)
                fx = np.asarray(tile["features"].values, np.float32)
                if band_index is not None:
                    fx = fx[band_index]
                if self.coordinates:
                    fx = np.concatenate([fx, lonlat_of(xs[xs_], ys[ys_], crs)])
                self.tiles_read += 1
                yield "tile", (int(key), fx, np.asarray(tile["agb"].values, np.float32))

    def _gather(
        self, plan: _SitePlan, tiles: dict, chips: np.ndarray, transform: Any = None
    ) -> tuple[Any, Any, np.ndarray]:
        """Chip windows (rows of ``plan``) cut from the tiles they span, one slice copy per tile.

        Returns inputs ``(n, channel, w, w)`` (``w``: the chip plus its context, NaN beyond the
        site) and AGB ``(n, w, w)`` (torch, CPU; NaN outside ``label_mask`` and in the context)
        and the chips' positions in the table.
        ``transform`` (``(n,)``) applies each chip's dihedral transform within its copy. Tiles
        are released once their last chip is cut.
        """
        import torch

        from agbcube.train.model import dihedral

        s = plan.window
        n_in = next(iter(tiles.values()))[0].shape[0]
        x = torch.empty((len(chips), n_in, s, s))
        agb = torch.empty((len(chips), s, s))
        pos = plan.positions[chips]
        core = None if self.label_mask is None else self.label_mask[pos]
        masks = torch.from_numpy(context_mask(core, self.margin, self.size_px))
        masks = masks.expand(len(chips), s, s)
        nan = torch.tensor(float("nan"))
        turns = np.zeros(len(chips), np.int64) if transform is None else np.asarray(transform)
        for i, j in enumerate(chips):
            r, c = int(plan.rows[j]), int(plan.cols[j])  # the window's corner (may be < 0)
            spans = plan.spans(r, c)
            inside = r >= 0 and c >= 0 and r + s <= plan.n_y and c + s <= plan.n_x
            if len(spans) == 1 and inside:  # inside one tile: a view of it
                ti, tj = spans[0]
                tx, ta = tiles[ti * plan.n_tj + tj]
                y0, x0 = r - ti * plan.th, c - tj * plan.tw
                cx, ca = tx[:, y0 : y0 + s, x0 : x0 + s], ta[y0 : y0 + s, x0 : x0 + s]
            else:  # across tile (or site) edges: assembled, NaN beyond the site
                cx = torch.full((n_in, s, s), float("nan"))
                ca = torch.full((s, s), float("nan"))
                for ti, tj in spans:
                    tx, ta = tiles[ti * plan.n_tj + tj]
                    y0, x0 = ti * plan.th, tj * plan.tw
                    ya, yb = max(y0, r), min(y0 + tx.shape[1], r + s)
                    xa, xb = max(x0, c), min(x0 + tx.shape[2], c + s)
                    cx[:, ya - r : yb - r, xa - c : xb - c] = tx[
                        :, ya - y0 : yb - y0, xa - x0 : xb - x0
                    ]
                    ca[ya - r : yb - r, xa - c : xb - c] = ta[ya - y0 : yb - y0, xa - x0 : xb - x0]
            ca = torch.where(masks[i], ca, nan)
            if turns[i]:
                cx, ca = dihedral(cx, int(turns[i])), dihedral(ca, int(turns[i]))
            x[i].copy_(cx)
            agb[i].copy_(ca)
            for ti, tj in spans:
                self._release(plan, tiles, ti * plan.n_tj + tj, 1)
        return x, agb, pos

    @staticmethod
    def _release(plan: _SitePlan, tiles: dict, key: int, n: int) -> None:
        plan.users[key] -= n
        if plan.users[key] == 0:
            del tiles[key]

    def _ready(
        self, stream: Iterator[tuple[str, Any]]
    ) -> Iterator[tuple[_SitePlan, dict, np.ndarray]]:
        """``(plan, tiles, chips)`` each time a tile completes some chips (their last tile).

        Tiles are kept as they were read (``(channel, h, w)``, shared with torch, no copy).
        """
        import torch

        plan, tiles = None, {}
        for kind, item in stream:
            if kind == "site":
                plan, tiles = item, {}
                continue
            key, fx, fa = item
            tiles[key] = (torch.from_numpy(fx), torch.from_numpy(fa))
            chips = plan.completed_by(key)
            if chips.size:
                yield plan, tiles, chips

    def blocks(
        self, positions: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Raw chips in storage order: ``(inputs, agb Mg/ha, positions)`` per tile read.

        ``positions`` (default every chip, once) may repeat a chip; it is then cut again.
        """
        positions = np.arange(len(self)) if positions is None else np.asarray(positions)
        for plan, tiles, chips in self._ready(self.tiles(positions)):
            x, agb, pos = self._gather(plan, tiles, chips)
            yield x.numpy(), agb.numpy(), pos

    def iterate(
        self, order: Any, batch_size: int, augment: Any = None
    ) -> Iterator[tuple[Any, Any, Any]]:
        """Yield ``(x, y, index)`` batches of the chips in ``order`` (each as often as listed).

        The batches follow storage order within the shuffle buffer, not ``order`` itself: the
        ``index`` of each batch says which chips it holds. A reader thread only reads and
        decompresses tiles, in storage order; this thread cuts, standardises and augments.
        """
        import queue
        import threading

        import torch

        std = self.standardiser
        assert std is not None
        positions = np.asarray(order.cpu() if hasattr(order, "cpu") else order, dtype=np.int64)
        rng = np.random.default_rng(positions[:64].tolist())  # follows the caller's generator
        present = pd.unique(self.sites[positions])
        site_order = [present[i] for i in rng.permutation(len(present))]
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def read() -> None:
            try:
                for item in self.tiles(positions, site_order):
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

        def received() -> Iterator[tuple[str, Any]]:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        mean = torch.from_numpy(std.mean)[:, None, None]
        scale = torch.from_numpy(std.std)[:, None, None]

        def batch(plan: _SitePlan, tiles: dict, chips: np.ndarray) -> tuple[Any, Any, Any]:
            aug = augment(len(chips)) if augment is not None else None
            x, agb, pos = self._gather(plan, tiles, chips, None if aug is None else aug.transform)
            x.sub_(mean).div_(scale).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            if aug is not None and aug.gain is not None:  # x is this batch's own
                x[:, : aug.gain.shape[1]] *= aug.gain[:, :, None, None]
            y = make_target(agb.numpy(), log=self.log_target, per_chip=self.chip_target)
            if self.target_transform is not None:
                y = self.target_transform.encode(y)
            return (
                x.to(self.device, non_blocking=True),
                torch.from_numpy(y).to(self.device, non_blocking=True),
                torch.as_tensor(pos, device=self.device),
            )

        reader = threading.Thread(target=read, name="agbcube-chunk-reader", daemon=True)
        reader.start()
        # The shuffle buffer: chips (rows of the current site's plan) whose tiles are all read,
        # each given a random priority within shuffle_chips of its arrival; batches take the
        # lowest priorities once the buffer holds shuffle_chips. A chip thus leaves within
        # about shuffle_chips arrivals, and so do the tiles it holds: memory stays bounded.
        pool = np.empty(0, np.int64)
        priority = np.empty(0)
        arrived = 0
        current: Any = None
        current_tiles: dict = {}

        def take(n: int) -> np.ndarray:
            nonlocal pool, priority
            first = np.argpartition(priority, n - 1)[:n] if n < pool.size else np.arange(pool.size)
            chosen = pool[first]
            keep = np.ones(pool.size, bool)
            keep[first] = False
            pool, priority = pool[keep], priority[keep]
            return chosen

        try:
            for plan, tiles, chips in self._ready(received()):
                if plan is not current:  # a new site: the last one's chips go first
                    while pool.size:
                        yield batch(current, current_tiles, take(min(batch_size, pool.size)))
                    current, current_tiles = plan, tiles
                pool = np.concatenate([pool, chips])
                priority = np.concatenate(
                    [priority, arrived + self.shuffle_chips * rng.random(chips.size)]
                )
                arrived += chips.size
                while pool.size >= self.shuffle_chips + batch_size:
                    yield batch(plan, tiles, take(batch_size))
            while pool.size:
                yield batch(current, current_tiles, take(min(batch_size, pool.size)))
        finally:
            stop.set()
            reader.join(timeout=5)


@dataclass
class _SitePlan:
    """Which tiles of a site a pass reads, and which chips each tile completes."""

    positions: np.ndarray  # the chips' rows in the ChunkedChips table (repeats allowed)
    rows: np.ndarray
    cols: np.ndarray
    th: int
    tw: int
    n_tj: int  # tiles per tile row
    n_y: int  # the site's rows and columns
    n_x: int
    window: int  # chip plus context on both sides
    tile_order: np.ndarray  # flat tile keys (ti * n_tj + tj), raster order
    users: dict[int, int]  # chips still to cut from each tile
    by_last: dict[int, np.ndarray]  # chips whose last tile (raster order) is the key

    @classmethod
    def make(cls, ds: xr.Dataset, owner: ChunkedChips, positions: np.ndarray) -> _SitePlan:
        chunks = ds["features"].encoding.get("chunks") or (0, 256, 256)
        th, tw = int(chunks[-2]), int(chunks[-1])
        n_y, n_x = ds.sizes["y"], ds.sizes["x"]
        n_tj = -(-n_x // tw)
        s = owner.size_px + 2 * owner.margin
        rows = owner.rows[positions] - owner.margin
        cols = owner.cols[positions] - owner.margin
        ti0, tj0, ti1, tj1 = _tile_range(rows, cols, s, th, tw, n_y, n_x)
        keys = []
        for di in range(int((ti1 - ti0).max()) + 1):
            for dj in range(int((tj1 - tj0).max()) + 1):
                spans = (ti0 + di <= ti1) & (tj0 + dj <= tj1)
                keys.append(((ti0 + di) * n_tj + tj0 + dj)[spans])
        tile_keys, n_users = np.unique(np.concatenate(keys), return_counts=True)
        last = ti1 * n_tj + tj1
        order = np.argsort(last, kind="stable")
        cuts = np.flatnonzero(np.diff(last[order])) + 1
        by_last = {int(last[g[0]]): g for g in np.split(order, cuts)}
        return cls(
            positions,
            rows,
            cols,
            th,
            tw,
            n_tj,
            n_y,
            n_x,
            s,
            tile_keys,
            dict(zip(tile_keys.tolist(), n_users.tolist(), strict=True)),
            by_last,
        )

    def spans(self, r: int, c: int) -> list[tuple[int, int]]:
        """The tiles a window with corner ``(r, c)`` overlaps."""
        ti0, tj0, ti1, tj1 = (
            int(v) for v in _tile_range(r, c, self.window, self.th, self.tw, self.n_y, self.n_x)
        )
        return [(ti, tj) for ti in range(ti0, ti1 + 1) for tj in range(tj0, tj1 + 1)]

    def completed_by(self, key: int) -> np.ndarray:
        return self.by_last.get(key, np.empty(0, np.int64))


def _tile_range(rows: Any, cols: Any, s: int, th: int, tw: int, n_y: int, n_x: int) -> tuple:
    """First and last tile row/column that ``s``-pixel windows at ``(rows, cols)`` overlap,
    clipped to the site (a window's context may reach past its edge)."""
    ti0 = np.clip(rows, 0, n_y - 1) // th
    tj0 = np.clip(cols, 0, n_x - 1) // tw
    ti1 = np.clip(rows + s - 1, 0, n_y - 1) // th
    tj1 = np.clip(cols + s - 1, 0, n_x - 1) // tw
    return ti0, tj0, ti1, tj1
