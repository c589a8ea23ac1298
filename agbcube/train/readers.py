"""Chips from the cube, as raw blocks: what every training data path starts from.

A reader knows a table of chips (``site``, ``row``, ``col``: the pixel offset of each chip's
corner in its site's cube) and yields them as `RawBlock` s: unstandardised features of
each chip's *window* (the chip and ``context_px`` pixels of context on each side, NaN beyond the
site's edge), its AGB in Mg/ha (NaN where missing and in the margin: context is input, never
label) and, when asked, the longitude and latitude of every window pixel.

Three readers implement `ChipReader`:

* `MemoryReader` reads the sites' windows once into host memory (the fast path, from
  which `DeviceBatches` stage a fold on the device);
* `ChunkReader` reads the cube chunk by chunk in storage order, each chunk decompressed
  once per pass, so cubes larger than memory train (with
  `StreamBatches`);
* `XbatcherReader` cuts one chip at a time with an xbatcher ``BatchGenerator`` over the
  chip grid: slow, the reference the others are tested against (``train.data_path: stream``).

What happens next (standardising, imputing, the target, the label mask, augmentation) is the
same for every reader: `agbcube.train.batches`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import pandas as pd
import xarray as xr

from agbcube._store import cube_crs, open_cube, site_read_errors
from agbcube.errors import BandError

__all__ = [
    "ChipReader",
    "ChunkReader",
    "MemoryReader",
    "RawBlock",
    "XbatcherReader",
    "chip_lonlat",
    "lonlat_of",
    "make_reader",
    "resolve_bands",
]


class RawBlock(NamedTuple):
    """Chips as read from the cube, before any preparation.

    Attributes
    ----------
    x : np.ndarray, (n, band, w, w) float32
        Features of each chip's window, NaN where missing and beyond the site's edge.
    agb : np.ndarray, (n, w, w) float32
        AGB in Mg/ha of the chip's own pixels; NaN where missing and in the margin.
    lonlat : np.ndarray, (n, 2, w, w) float32, or None
        Longitude and latitude of every window pixel (NaN beyond the site), when the reader
        was asked for them.
    positions : np.ndarray, (n,) int
        Rows of the reader's chips table.
    """

    x: np.ndarray
    agb: np.ndarray
    lonlat: np.ndarray | None
    positions: np.ndarray


class ChipReader(Protocol):
    """What a training data path reads chips through."""

    bands: list[str]
    size_px: int
    context_px: int

    def __len__(self) -> int:
        """Chips in the reader's table."""
        ...

    def blocks(self, positions: np.ndarray | None = None) -> Iterator[RawBlock]:
        """Raw chips at ``positions`` (default all, once; repeats are cut again), in the
        reader's own order: the ``positions`` field of each block says which they are."""
        ...


@dataclass(frozen=True)
class _Table:
    """The chips table as arrays."""

    sites: np.ndarray
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def of(cls, chips: pd.DataFrame) -> _Table:
        return cls(
            chips["site"].to_numpy().astype(str),
            chips["row"].to_numpy().astype(np.int64),
            chips["col"].to_numpy().astype(np.int64),
        )


def resolve_bands(
    store: str | Path, sites: Sequence[str], bands: Sequence[str] | None
) -> list[str]:
    """The feature bands a model uses: ``bands`` (``train.bands``), else the first site's.

    Sites are aligned by band name; a site lacking one of them is an error naming it.
    """

    want = list(bands) if bands is not None else None
    for site in pd.unique(np.asarray(sites)):
        have = [str(b) for b in open_cube(store, site, chunks=None)["band"].values]
        if want is None:
            want = have
        missing = [b for b in want if b not in have]
        if missing:
            raise BandError(
                f"site '{site}' lacks band(s) {missing} that the model uses (train.bands, or "
                f"the first site's bands); its bands: {have}. Give every site the same band "
                "names, or list a common set in train.bands"
            )
    if want is None:
        raise ValueError("no chips to read")
    return want


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


def _site_lonlat(ds: xr.Dataset) -> np.ndarray:
    """(2, y, x) longitude/latitude of every pixel centre of a site's cube."""

    return lonlat_of(ds["x"].values, ds["y"].values, cube_crs(ds))


def chip_lonlat(store: str | Path, chips: pd.DataFrame, *, size_px: int) -> np.ndarray:
    """(n, 2, size, size) longitude/latitude of the chips' pixel centres (no data is read)."""

    table = _Table.of(chips)
    out = np.empty((len(chips), 2, size_px, size_px), np.float32)
    for site in pd.unique(table.sites):
        at = np.flatnonzero(table.sites == site)
        grid = _site_lonlat(open_cube(store, site, chunks=None))
        out[at] = _windows(grid, table.rows[at], table.cols[at], size_px)
    return out


def _windows(a: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """``(n, ..., size, size)`` windows of ``a`` (``(..., y, x)``) with corners at
    ``(rows, cols)``, which must lie inside ``a``."""
    view = np.lib.stride_tricks.sliding_window_view(a, (size, size), axis=(-2, -1))
    return np.moveaxis(view[..., rows, cols, :, :], -3, 0)


def _padded(a: np.ndarray, context_px: int) -> np.ndarray:
    if not context_px:
        return a
    pad = [(0, 0)] * (a.ndim - 2) + [(context_px, context_px), (context_px, context_px)]
    return np.pad(a, pad, constant_values=np.nan)


def _rows(a: xr.DataArray | np.ndarray, top: int, bottom: int, context_px: int) -> np.ndarray:
    """Rows ``top - context_px`` to ``bottom + context_px`` and every column of ``a``
    (``(..., y, x)``), ``context_px`` columns more on each side, as float32: NaN where that
    leaves the site."""
    n_y = a.shape[-2]
    y0, y1 = max(0, top - context_px), min(n_y, bottom + context_px)
    part = a.isel(y=slice(y0, y1)).values if isinstance(a, xr.DataArray) else a[..., y0:y1, :]
    values = np.asarray(part, dtype=np.float32)
    if not context_px:
        return values
    pad = [(0, 0)] * (values.ndim - 2)
    pad += [(y0 - (top - context_px), (bottom + context_px) - y1), (context_px, context_px)]
    return np.pad(values, pad, constant_values=np.nan)


def _label_core(agb: np.ndarray, context_px: int) -> np.ndarray:
    """``agb`` windows ``(n, w, w)`` with the margin set to NaN (context is never a label)."""
    if context_px:
        agb[:, :context_px] = agb[:, -context_px:] = np.nan
        agb[:, :, :context_px] = agb[:, :, -context_px:] = np.nan
    return agb


class _TableReader:
    """What every reader holds: the cube, the chips table, the bands and the windows' shape."""

    def __init__(
        self,
        store: str | Path,
        chips: pd.DataFrame,
        *,
        size_px: int,
        bands: Sequence[str],
        context_px: int = 0,
        lonlat: bool = False,
    ) -> None:
        self.store, self.bands = str(store), list(bands)
        self.size_px, self.context_px = size_px, context_px
        self.table = _Table.of(chips)
        self.with_lonlat = lonlat

    def __len__(self) -> int:
        return len(self.table.sites)


class MemoryReader(_TableReader):
    """Every chip's window read once into host memory.

    Each site is read in horizontal strips of at most ``load_limit_bytes`` (one sequential
    read each, with the margin around them), and the windows are cut from memory.

    Parameters
    ----------
    store : str or Path
        The cube.
    chips : pd.DataFrame
        Rows with ``site``, ``row`` and ``col``.
    size_px : int
        Chip side.
    bands : list of str
        Feature bands, in order (see `resolve_bands`).
    context_px : int
        Context pixels read around every chip on each side.
    lonlat : bool
        Also hold every window pixel's longitude and latitude.
    load_limit_bytes : float
        Largest strip of a site read at once.
    """

    def __init__(
        self,
        store: str | Path,
        chips: pd.DataFrame,
        *,
        size_px: int,
        bands: Sequence[str],
        context_px: int = 0,
        lonlat: bool = False,
        load_limit_bytes: float = 2e9,
    ) -> None:
        super().__init__(
            store, chips, size_px=size_px, bands=bands, context_px=context_px, lonlat=lonlat
        )
        table = self.table
        w = size_px + 2 * context_px
        n = len(table.sites)
        self.x = np.empty((n, len(self.bands), w, w), np.float32)
        self.agb = np.empty((n, w, w), np.float32)
        self.lonlat = np.empty((n, 2, w, w), np.float32) if lonlat else None

        for site in pd.unique(table.sites):
            at = np.flatnonzero(table.sites == site)
            with site_read_errors(store, site):
                self._read_site(store, site, at, table, load_limit_bytes)
        _label_core(self.agb, context_px)

    def _read_site(
        self, store: str | Path, site: str, at: np.ndarray, table: _Table, limit: float
    ) -> None:

        ds = open_cube(store, site, chunks=None)[["features", "agb"]].sel(band=self.bands)
        grid = _site_lonlat(ds) if self.lonlat is not None else None
        size, w = self.size_px, self.size_px + 2 * self.context_px
        row_bytes = ds.sizes["x"] * (len(self.bands) + 1) * 4
        strip_rows = max(w, int(limit // max(row_bytes, 1)))
        order = at[np.argsort(table.rows[at], kind="stable")]
        while order.size:
            top = int(table.rows[order[0]])
            take = order[table.rows[order] + size <= top + strip_rows]
            order = order[take.size :]
            bottom = int(table.rows[take].max()) + size
            fx, fa = (_rows(ds[v], top, bottom, self.context_px) for v in ("features", "agb"))
            r, c = table.rows[take] - top, table.cols[take]
            self.x[take] = _windows(fx, r, c, w)
            self.agb[take] = _windows(fa, r, c, w)
            if grid is not None:
                self.lonlat[take] = _windows(_rows(grid, top, bottom, self.context_px), r, c, w)

    def blocks(self, positions: np.ndarray | None = None, block: int = 256) -> Iterator[RawBlock]:
        """The chips at ``positions`` (default all), in that order, ``block`` at a time."""
        positions = np.arange(len(self)) if positions is None else np.asarray(positions)
        for start in range(0, positions.size, block):
            at = positions[start : start + block]
            ll = self.lonlat[at] if self.lonlat is not None else None
            yield RawBlock(self.x[at], self.agb[at], ll, at)


class XbatcherReader(_TableReader):
    """One chip at a time through an xbatcher ``BatchGenerator`` over the chip grid.

    The generator's windows are the chip grid of each site's cube padded by ``margin`` NaN
    pixels (so a window holds a chip and its context); a chip at ``(row, col)`` is patch
    ``(row // stride) · n_cols + col // stride`` of it, in xbatcher's row-major order.
    Reads are lazy and per chip: slow, a reference for the other readers (the tests check
    that all three yield the same chips) and the ``train.data_path: stream`` path.
    """

    def __init__(
        self,
        store: str | Path,
        chips: pd.DataFrame,
        *,
        size_px: int,
        stride_px: int,
        bands: Sequence[str],
        context_px: int = 0,
        lonlat: bool = False,
    ) -> None:
        super().__init__(
            store, chips, size_px=size_px, bands=bands, context_px=context_px, lonlat=lonlat
        )
        self.stride_px = stride_px
        self._sites: dict[str, tuple[Any, int, np.ndarray | None]] = {}

    def _site(self, site: str) -> tuple[Any, int, np.ndarray | None]:
        """The site's generator, its patches per row, and its padded lon/lat grid."""
        if site not in self._sites:
            import xbatcher

            ds = open_cube(self.store, site)[["features", "agb"]].sel(band=self.bands)
            grid = _padded(_site_lonlat(ds), self.context_px) if self.with_lonlat else None
            ds = _with_margin(ds, self.context_px)
            w = self.size_px + 2 * self.context_px
            gen = xbatcher.BatchGenerator(
                ds,
                input_dims={"y": w, "x": w},
                input_overlap={"y": w - self.stride_px, "x": w - self.stride_px},
                preload_batch=True,
            )
            per_row = (ds.sizes["x"] - w) // self.stride_px + 1
            self._sites[site] = (gen, per_row, grid)
        return self._sites[site]

    def chip(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Chip ``i``'s window: features, AGB (margin NaN) and lon/lat (or None)."""
        import dask

        gen, per_row, grid = self._site(self.table.sites[i])
        r, c = int(self.table.rows[i]), int(self.table.cols[i])
        if r % self.stride_px or c % self.stride_px:
            raise ValueError(
                f"chip at pixel offset {(r, c)} is not on the chip grid; were the folds made "
                "with other chips settings than this config's?"
            )

        site = self.table.sites[i]
        with dask.config.set(scheduler="synchronous"), site_read_errors(self.store, site):
            patch = gen[(r // self.stride_px) * per_row + c // self.stride_px]
        w = self.size_px + 2 * self.context_px
        ll = grid[:, r : r + w, c : c + w] if grid is not None else None
        agb = _label_core(np.asarray(patch["agb"].values, np.float32)[None], self.context_px)[0]
        return np.asarray(patch["features"].values, np.float32), agb, ll

    def blocks(self, positions: np.ndarray | None = None, block: int = 64) -> Iterator[RawBlock]:
        """The chips at ``positions`` (default all), in that order, ``block`` at a time."""
        positions = np.arange(len(self)) if positions is None else np.asarray(positions)
        for start in range(0, positions.size, block):
            at = positions[start : start + block]
            parts = [self.chip(int(i)) for i in at]
            ll = np.stack([p[2] for p in parts]) if self.with_lonlat else None
            yield RawBlock(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), ll, at)


def _with_margin(ds: xr.Dataset, context_px: int) -> xr.Dataset:
    """A site's cube with ``margin`` NaN pixels around it, its x/y coordinates extended on the
    grid's own spacing (windows of the padded cube then start where the chips do)."""
    if not context_px:
        return ds
    out = ds.pad(x=context_px, y=context_px, constant_values=np.nan)
    ramp = np.arange(1, context_px + 1)
    for dim in ("x", "y"):
        v = ds[dim].values.astype(np.float64)
        step = v[1] - v[0] if v.size > 1 else 1.0
        out = out.assign_coords(
            {dim: np.concatenate([v[0] - step * ramp[::-1], v, v[-1] + step * ramp])}
        )
    return out


class ChunkReader(_TableReader):
    """Chips cut from the cube chunk by chunk: for cubes larger than memory.

    A pass reads, site by site and in raster order, the chunk tiles that the chips asked for
    touch, decompressing every tile once. A chip is cut (one slice copy per tile it spans)
    once its last tile in raster order has arrived, and a tile is released once its last
    chip is cut: what is held is about two tile rows plus the block being yielded.

    Parameters are those of `MemoryReader` (without ``load_limit_bytes``).
    """

    tiles_read = 0  # decompressed tiles, over the reader's life (for benchmarks)

    def _open(self, site: str) -> tuple[xr.Dataset, np.ndarray | None]:
        """The site's lazy cube and the positions of our bands in it (``None``: all, in order).

        Bands are picked from each decompressed tile: a band selection on the lazy array
        would make Zarr gather orthogonally, 2-3x slower than reading the whole chunk.
        """

        ds = open_cube(self.store, site, chunks=None)[["features", "agb"]]
        have = [str(b) for b in ds["band"].values]
        index = np.array([have.index(b) for b in self.bands])
        return ds, None if np.array_equal(index, np.arange(len(have))) else index

    def blocks(self, positions: np.ndarray | None = None) -> Iterator[RawBlock]:
        """The chips at ``positions`` (default all), in storage order: one block per tile
        read that completes some chips. Sites come in the order they first appear."""
        positions = np.arange(len(self)) if positions is None else np.asarray(positions)
        sites = self.table.sites[positions]
        for site in pd.unique(sites):
            yield from self._site_blocks(site, positions[sites == site])

    def _site_blocks(self, site: str, positions: np.ndarray) -> Iterator[RawBlock]:

        ds, band_index = self._open(site)
        plan = _SitePlan.make(ds, self, positions)
        crs = cube_crs(ds) if self.with_lonlat else None
        xs, ys = ds["x"].values, ds["y"].values
        tiles: dict[int, tuple[np.ndarray, ...]] = {}
        for key in plan.tile_order:
            ti, tj = divmod(int(key), plan.n_tj)
            y_sl = slice(ti * plan.th, (ti + 1) * plan.th)
            x_sl = slice(tj * plan.tw, (tj + 1) * plan.tw)
            tile = ds.isel(y=y_sl, x=x_sl)
            with site_read_errors(self.store, site):
                fx = np.asarray(tile["features"].values, np.float32)
                fa = np.asarray(tile["agb"].values, np.float32)
            parts = [fx if band_index is None else fx[band_index], fa]
            if crs is not None:
                parts.append(lonlat_of(xs[x_sl], ys[y_sl], crs))
            tiles[int(key)] = tuple(parts)
            self.tiles_read += 1
            done = plan.completed_by(int(key))
            if done.size:
                yield self._cut(plan, tiles, done)

    def _cut(self, plan: _SitePlan, tiles: dict, chips: np.ndarray) -> RawBlock:
        """The windows of ``chips`` (rows of ``plan``) from the tiles they span; tiles are
        released once their last chip is cut."""
        s = plan.window
        parts = next(iter(tiles.values()))
        out = [np.full((chips.size, *p.shape[:-2], s, s), np.nan, np.float32) for p in parts]
        for i, j in enumerate(chips):
            r, c = int(plan.rows[j]), int(plan.cols[j])  # the window's corner (may be < 0)
            for ti, tj in plan.spans(r, c):
                key = ti * plan.n_tj + tj
                y0, x0 = ti * plan.th, tj * plan.tw
                tile = tiles[key]
                ya, yb = max(y0, r), min(y0 + tile[1].shape[0], r + s)
                xa, xb = max(x0, c), min(x0 + tile[1].shape[1], c + s)
                for o, t in zip(out, tile, strict=True):
                    o[i, ..., ya - r : yb - r, xa - c : xb - c] = t[
                        ..., ya - y0 : yb - y0, xa - x0 : xb - x0
                    ]
                plan.users[key] -= 1
                if plan.users[key] == 0:
                    del tiles[key]
        _label_core(out[1], self.context_px)
        return RawBlock(out[0], out[1], out[2] if len(out) > 2 else None, plan.positions[chips])


@dataclass
class _SitePlan:
    """Which tiles of a site a pass reads, and which chips each tile completes."""

    positions: np.ndarray  # the chips' rows in the reader's table (repeats allowed)
    rows: np.ndarray  # window corners (chip corner minus the margin)
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
    def make(cls, ds: xr.Dataset, reader: ChunkReader, positions: np.ndarray) -> _SitePlan:
        chunks = ds["features"].encoding.get("chunks") or (0, 256, 256)
        th, tw = int(chunks[-2]), int(chunks[-1])
        n_y, n_x = ds.sizes["y"], ds.sizes["x"]
        n_tj = -(-n_x // tw)
        s = reader.size_px + 2 * reader.context_px
        rows = reader.table.rows[positions] - reader.context_px
        cols = reader.table.cols[positions] - reader.context_px
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
        users = dict(zip(tile_keys.tolist(), n_users.tolist(), strict=True))
        return cls(positions, rows, cols, th, tw, n_tj, n_y, n_x, s, tile_keys, users, by_last)

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


def make_reader(
    kind: str,
    store: str | Path,
    chips: pd.DataFrame,
    *,
    size_px: int,
    stride_px: int,
    bands: Sequence[str],
    context_px: int = 0,
    lonlat: bool = False,
) -> MemoryReader | ChunkReader | XbatcherReader:
    """The reader of a ``train.data_path`` (``device``, ``chunks`` or ``stream``)."""
    common = {"size_px": size_px, "bands": bands, "context_px": context_px, "lonlat": lonlat}
    if kind == "device":
        return MemoryReader(store, chips, **common)
    if kind == "chunks":
        return ChunkReader(store, chips, **common)
    if kind == "stream":
        return XbatcherReader(store, chips, stride_px=stride_px, **common)
    raise ValueError(f"unknown data path {kind!r}: device, chunks or stream")
