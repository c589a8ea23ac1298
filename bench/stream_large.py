"""Streaming chips from a cube larger than RAM (issue 8, target 2).

Target: agbcube's out-of-core training path (``train.data_path: chunks``) reads the store at
≥ 80 % of its sequential decompress-and-read rate.

Steps, in one process:

1. ``make`` (skipped when the cube exists): a one-site cube of ``--px``² pixels × 108 bands
   (float32, the cube's own chunking of all bands × 256 × 256 and Blosc lz4), laid out like
   ``build-cube``'s and filled by mirror-tiling the ``betul`` site of the benchmark cube, so it
   compresses like real data. At the default 8192 px its features are 29 GB decompressed, more
   than this machine's 24 GB of RAM.
2. ``sequential``: every chunk tile read and decompressed in storage order by one thread (the
   store's sequential decompress-and-read rate, GB/s of decompressed bytes).
3. ``read stage``: the reads of a streaming pass alone (``ChunkReader.blocks``: the tiles the
   chips touch, each once, in the pass's order), against step 2.
4. ``chunks``: :class:`agbcube.train.batches.StreamBatches` over a
   :class:`agbcube.train.readers.ChunkReader` delivering every chip of the chip grid
   (24 px, stride 22) once, in the training order it produces (its shuffle buffer), as
   standardised and augmented torch batches of 256 ready for the model; the rate at which it
   consumes the store (decompressed tile bytes / s) against step 2, and chips/s.
5. ``xbatcher``: the per-chip random-access path (``data_path: stream``: xbatcher over the lazy
   cube, a chip at a time) for ``--anchor-s`` seconds, as the anchor.

Before steps 2-5 the OS page cache is dropped (``/proc/sys/vm/drop_caches``, needs root) so
every step reads from disk; the JSON says whether that worked. Each step records the process's
peak RSS while it ran (sampled every 20 ms); ``peak_rss_gb`` at the top level is the whole run's.

Usage::

    python bench/stream_large.py [--px 8192] [--workdir /tmp/agbcube-bench] [--keep]

Writes ``bench/results/stream_large.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _harness import rss

ROOT = Path(__file__).resolve().parents[1]
SITE = "large"


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class RssPeak:
    """The process's peak RSS while a block runs (sampled every 20 ms from /proc)."""

    def __enter__(self) -> RssPeak:
        import threading

        self.peak_gb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            self.peak_gb = max(self.peak_gb, rss(pid) / 1e9)
            self._stop.wait(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_cube(src_store: Path, src_site: str, out: Path, px: int) -> None:
    """A one-site cube of ``px``² pixels mirror-tiled from ``src_site``."""
    import dask.array as da
    import xarray as xr
    import zarr
    from numcodecs import Blosc

    from agbcube.cube import open_cube

    src = open_cube(src_store, src_site).load()
    feat, agb = src["features"].values, src["agb"].values
    ny, nx = agb.shape

    def mirror(n_src: int, n: int) -> np.ndarray:
        i = np.arange(n) % (2 * n_src)
        return np.where(i < n_src, i, 2 * n_src - 1 - i)

    ri, ci = mirror(ny, px), mirror(nx, px)
    tile = 256
    chunks = ((feat.shape[0],), tuple(min(tile, px - s) for s in range(0, px, tile)))
    chunks = (chunks[0], chunks[1], chunks[1])

    def features_block(block_info=None):
        (_, _), (r0, r1), (c0, c1) = block_info[None]["array-location"]
        return feat[:, ri[r0:r1]][:, :, ci[c0:c1]]

    def agb_block(block_info=None):
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        return agb[ri[r0:r1]][:, ci[c0:c1]]

    f = da.map_blocks(features_block, chunks=chunks, dtype=np.float32)
    a = da.map_blocks(agb_block, chunks=chunks[1:], dtype=np.float32)
    dx = float(src["x"][1] - src["x"][0])
    dy = float(src["y"][1] - src["y"][0])
    ds = xr.Dataset(
        {"features": (("band", "y", "x"), f), "agb": (("y", "x"), a)},
        coords={
            "band": src["band"].values,
            "y": float(src["y"][0]) + dy * np.arange(px),
            "x": float(src["x"][0]) + dx * np.arange(px),
            "spatial_ref": src["spatial_ref"],
        },
        attrs={**src.attrs, "site": SITE},
    )
    blosc = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)
    key, codec = "compressors", (blosc,)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.to_zarr(
        tmp,
        group=SITE,
        mode="w",
        zarr_format=2,
        consolidated=False,
        encoding={
            "features": {"chunks": (feat.shape[0], tile, tile), key: codec},
            "agb": {"chunks": (tile, tile), key: codec},
        },
    )
    root = zarr.open_group(tmp, mode="a", zarr_format=2)
    root.attrs["agbcube"] = {
        "format": 1,
        "sites": {SITE: "bench"},
        "complete": True,
        "expected_sites": [SITE],
    }
    zarr.consolidate_metadata(tmp)
    tmp.rename(out)


def sequential(store: Path) -> dict:
    """Every chunk tile read in storage order by one thread: GB/s of decompressed bytes."""
    from agbcube.cube import open_cube

    ds = open_cube(store, SITE, chunks=None)
    th, tw = ds["features"].encoding["chunks"][1:]
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    n_bytes, t0 = 0, time.perf_counter()
    for r in range(0, ny, th):
        for c in range(0, nx, tw):
            t = ds.isel(y=slice(r, r + th), x=slice(c, c + tw))
            n_bytes += t["features"].values.nbytes + t["agb"].values.nbytes
    s = time.perf_counter() - t0
    return {"seconds": s, "decompressed_gb": n_bytes / 1e9, "gb_per_s": n_bytes / 1e9 / s}


def read_stage(store: Path, chips: pd.DataFrame, size: int) -> dict:
    """The streaming pass's reads and cuts alone: ``ChunkReader.blocks`` for every chip."""
    from agbcube.train.readers import ChunkReader, resolve_bands

    src = ChunkReader(store, chips, size_px=size, bands=resolve_bands(store, [SITE], None))
    positions = np.random.default_rng(0).permutation(len(chips))
    n_bytes, t0 = 0, time.perf_counter()
    for block in src.blocks(positions):
        n_bytes += block.x.nbytes + block.agb.nbytes
    s = time.perf_counter() - t0
    return {
        "seconds": s,
        "tiles_read": src.tiles_read,
        "chip_gb_cut": n_bytes / 1e9,
        "gb_per_s": n_bytes / 1e9 / s,
    }


def chip_grid(store: Path, size: int, stride: int) -> pd.DataFrame:
    from agbcube.cube import open_cube

    ds = open_cube(store, SITE, chunks=None)
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    rr, cc = np.meshgrid(np.arange(0, ny - size + 1, stride), np.arange(0, nx - size + 1, stride))
    return pd.DataFrame({"site": SITE, "row": rr.ravel(), "col": cc.ravel()})


def agbcube_chunks(store: Path, chips: pd.DataFrame, size: int, batch: int, seed: int) -> dict:
    from agbcube.chips import ChipGeometry
    from agbcube.train.batches import Preparation, StreamBatches
    from agbcube.train.model import draw_augmentation
    from agbcube.train.readers import ChunkReader, resolve_bands

    bands = resolve_bands(store, [SITE], None)
    src = ChunkReader(store, chips, size_px=size, bands=bands)
    kw = dict(coordinates=False, per_chip=False, log_target=True, geometry=ChipGeometry(size, size))
    prep = Preparation.fit(src.blocks(np.arange(64)), lambda rows: None, **kw)
    source = StreamBatches(src, np.arange(len(chips)), None, prep, "cpu")
    n_bands = len(bands)
    g = torch.Generator().manual_seed(seed)

    def augment(n: int):
        return draw_augmentation(
            n, g, probability=0.7, geometric=True, spectral=True, jitter=0.05, n_spectral=n_bands
        )

    order = torch.randperm(len(chips), generator=torch.Generator().manual_seed(seed))
    n, checksum, t0 = 0, 0.0, time.perf_counter()
    tiles_before = src.tiles_read
    for xb, _yb, idx in source.iterate(order, batch, augment=augment):
        n += idx.numel()
        checksum += float(xb[:, :, 0, 0].sum())  # touch every batch
    src.tiles_read -= tiles_before
    s = time.perf_counter() - t0
    from agbcube.cube import open_cube

    ds = open_cube(store, SITE, chunks=None)
    th, tw = ds["features"].encoding["chunks"][1:]
    tile_bytes = (ds.sizes["band"] + 1) * th * tw * 4  # full tiles; edge tiles are smaller
    return {
        "seconds": s,
        "chips": n,
        "chips_per_s": n / s,
        "tiles_read": src.tiles_read,
        "decompressed_gb": src.tiles_read * tile_bytes / 1e9,
        "gb_per_s": src.tiles_read * tile_bytes / 1e9 / s,
        "chip_gb_delivered": n * n_bands * size * size * 4 / 1e9,
        "checksum": checksum,
    }


def xbatcher_anchor(
    store: Path, chips: pd.DataFrame, size: int, stride: int, seconds: float
) -> dict:
    from agbcube.train.readers import XbatcherReader, resolve_bands

    reader = XbatcherReader(
        store, chips, size_px=size, stride_px=stride, bands=resolve_bands(store, [SITE], None)
    )
    order = np.random.default_rng(0).permutation(len(chips))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        reader.chip(int(order[n]))
        n += 1
    s = time.perf_counter() - t0
    return {"seconds": s, "chips": n, "chips_per_s": n / s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--px", type=int, default=8192)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/agbcube-bench"))
    parser.add_argument("--source", type=Path, default=ROOT / "cubes" / "benchmark.zarr")
    parser.add_argument("--source-site", default="betul")
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--stride", type=int, default=22)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--anchor-s", type=float, default=20.0)
    parser.add_argument("--keep", action="store_true", help="keep the generated cube")
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/stream_large.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    store = args.workdir / f"large_{args.px}.zarr"
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not store.exists():
        make_cube(args.source, args.source_site, store, args.px)
    made_s = time.perf_counter() - t0
    store_gb = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 1e9
    chips = chip_grid(store, args.size, args.stride)
    out: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} cpus "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9:.0f} GB RAM",
        "px": args.px,
        "cube_features_gb": 108 * args.px**2 * 4 / 1e9,
        "store_on_disk_gb": store_gb,
        "make_s": made_s,
        "n_chips": len(chips),
    }
    out["caches_dropped"] = drop_caches()
    with RssPeak() as rss:
        out["sequential"] = sequential(store)
    out["sequential"]["peak_rss_gb"] = rss.peak_gb
    print("sequential", out["sequential"], flush=True)
    drop_caches()
    with RssPeak() as rss:
        out["read_stage"] = read_stage(store, chips, args.size)
    out["read_stage"]["peak_rss_gb"] = rss.peak_gb
    out["read_stage"]["vs_sequential"] = (
        out["read_stage"]["gb_per_s"] / out["sequential"]["gb_per_s"]
    )
    print("read stage", out["read_stage"], flush=True)
    drop_caches()
    with RssPeak() as rss:
        out["chunks"] = agbcube_chunks(store, chips, args.size, args.batch, seed=0)
    out["chunks"]["peak_rss_gb"] = rss.peak_gb
    out["chunks"]["vs_sequential"] = out["chunks"]["gb_per_s"] / out["sequential"]["gb_per_s"]
    print("chunks", out["chunks"], flush=True)
    drop_caches()
    with RssPeak() as rss:
        out["xbatcher_stream"] = xbatcher_anchor(
            store, chips, args.size, args.stride, args.anchor_s
        )
    out["xbatcher_stream"]["peak_rss_gb"] = rss.peak_gb
    print("xbatcher", out["xbatcher_stream"], flush=True)
    out["peak_rss_gb"] = peak_rss_gb()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    if not args.keep:
        shutil.rmtree(store)


if __name__ == "__main__":
    main()
