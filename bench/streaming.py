"""Chip streaming: agbcube's training data path against xbatcher and the memcpy limit.

Measures chips/s of 24×24 chips from one site's Zarr cube (all its chip-grid windows, i.e. the
chips a fold trains on), side by side in one run:

* xbatcher ``BatchGenerator`` over the lazy Zarr cube;
* the same generator over the cube loaded in RAM;
* xbatcher's torch ``MapDataset`` through a ``DataLoader``;
* a numpy fancy-index gather from RAM;
* ``memcpy`` of pre-cut chips (the limit);
* **agbcube**: the device-resident path (``DeviceBatches.iterate`` + on-device augmentation,
  batches ready for the model), on CPU here, on the GPU when one is present.

Anchors (issue 8, this 2-core machine kind, 59-band chips): 77 / 6 500 / 900 / 24 000 /
115 000 chips/s. Target: agbcube ≥ 50 000 chips/s on CPU (≥ 45 % of memcpy, ≥ 10× the in-RAM
generator). Usage::

    python bench/streaming.py [--cube cubes/benchmark.zarr] [--site betul] [--bands 59]

Writes ``bench/results/streaming_<device>.json`` (or ``--results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from agbcube._store import open_cube
from agbcube.train.batches import DeviceBatches, Standardiser
from agbcube.train.model import draw_augmentation

ROOT = Path(__file__).resolve().parents[1]


def rate(n_chips: int, seconds: float) -> float:
    return n_chips / seconds


def timed(func, *, min_s: float = 2.0) -> tuple[float, int]:
    """Run ``func`` (returning chips delivered) until ``min_s`` passed; (seconds, chips)."""
    func()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        n += func()
    return time.perf_counter() - t0, n


def chip_windows(ds, *, size_px: int, stride_px: int):
    """An xbatcher ``BatchGenerator`` whose patches are the chip grid of a site's cube."""
    import xbatcher

    overlap = size_px - stride_px
    return xbatcher.BatchGenerator(
        ds,
        input_dims={"y": size_px, "x": size_px},
        input_overlap={"y": overlap, "x": overlap},
        preload_batch=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cube", default=str(ROOT / "cubes" / "benchmark.zarr"))
    parser.add_argument("--site", default="betul")
    parser.add_argument("--bands", type=int, default=59, help="first N bands (59: raw stack)")
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--results", default=None, help="default: bench/results/streaming_<device>.json"
    )
    args = parser.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    size = args.size
    ds = open_cube(args.cube, args.site)[["features"]].isel(band=slice(0, args.bands))
    results: dict[str, float] = {}

    # xbatcher over the lazy Zarr cube (every window once would take minutes: time a few)
    lazy = chip_windows(ds, size_px=size, stride_px=size)
    n_windows = len(lazy)
    t0 = time.perf_counter()
    k = min(60, n_windows)
    for i in range(k):
        lazy[i]["features"].values  # noqa: B018
    results["xbatcher BatchGenerator, lazy Zarr"] = rate(k, time.perf_counter() - t0)

    mem = ds.load()
    gen = chip_windows(mem, size_px=size, stride_px=size)
    sec, n = timed(lambda: sum(1 for i in range(n_windows) if gen[i]["features"].values.size))
    results["xbatcher BatchGenerator, in RAM"] = rate(n, sec)

    from xbatcher.loaders.torch import MapDataset

    dataset = MapDataset(chip_windows(mem["features"], size_px=size, stride_px=size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=0)
    sec, n = timed(lambda: sum(b.shape[0] for b in loader))
    results["xbatcher MapDataset + DataLoader"] = rate(n, sec)

    arr = mem["features"].values
    rows = np.arange(0, arr.shape[1] - size + 1, size)
    cols = np.arange(0, arr.shape[2] - size + 1, size)
    rr, cc = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
    chips = np.stack([arr[:, r : r + size, c : c + size] for r, c in zip(rr, cc, strict=True)])
    n_chips = len(chips)
    rng = np.random.default_rng(0)
    # Fancy-index gather of random chip windows straight from the site array.
    iy = rr[:, None, None] + np.arange(size)[None, :, None]
    ix = cc[:, None, None] + np.arange(size)[None, None, :]

    def gather() -> int:
        pick = rng.integers(0, n_chips, args.batch)
        out = arr[:, iy[pick], ix[pick]]
        return out.shape[1]

    sec, n = timed(gather)
    results["numpy fancy-index gather from RAM"] = rate(n, sec)

    many = np.concatenate([chips] * max(1, 4096 // n_chips))
    dst = np.empty_like(many)
    sec, n = timed(lambda: (np.copyto(dst, many), len(many))[1])
    results["memcpy of pre-cut chips (limit)"] = rate(n, sec)
    bytes_per_chip = chips[0].nbytes

    std = Standardiser.fit(chips)
    target = np.zeros((n_chips,), np.float32)
    resident = DeviceBatches(std.apply(chips), target, device)
    g = torch.Generator().manual_seed(0)

    def draw(size: int):
        return draw_augmentation(
            size,
            g,
            probability=0.7,
            geometric=True,
            spectral=True,
            jitter=0.05,
            n_spectral=args.bands,
        )

    def agbcube_epoch(augment: bool) -> int:
        order = torch.randperm(n_chips, generator=g)
        reps = max(1, 4096 // n_chips)
        total = 0
        for _ in range(reps):
            for x, _y, _ in resident.iterate(order, args.batch, augment=draw if augment else None):
                total += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return total

    sec, n = timed(lambda: agbcube_epoch(False))
    results[f"agbcube device-resident gather ({device.type})"] = rate(n, sec)
    sec, n = timed(lambda: agbcube_epoch(True))
    results[f"agbcube gather + augmentation ({device.type})"] = rate(n, sec)

    if device.type == "cuda":  # the GPU's own limit: device-to-device copy of pre-cut chips
        src = torch.from_numpy(many).to(device)
        dst_gpu = torch.empty_like(src)

        def d2d() -> int:
            dst_gpu.copy_(src)
            torch.cuda.synchronize()
            return len(src)

        sec, n = timed(d2d)
        results["device-to-device copy of pre-cut chips (GPU limit)"] = rate(n, sec)
        gpu_limit = results["device-to-device copy of pre-cut chips (GPU limit)"]
        gpu_share = {k: v / gpu_limit for k, v in results.items() if k.startswith("agbcube")}
    limit = results["memcpy of pre-cut chips (limit)"]
    in_ram = results["xbatcher BatchGenerator, in RAM"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "chip": f"{args.bands}x{size}x{size} float32 ({bytes_per_chip} bytes)",
        "site": args.site,
        "n_chips": n_chips,
        "chips_per_s": results,
        "share_of_memcpy": {k: v / limit for k, v in results.items()},
        "times_xbatcher_in_ram": {k: v / in_ram for k, v in results.items()},
    }
    if device.type == "cuda":
        report["share_of_gpu_copy"] = gpu_share
        report["gpu_copy_GB_per_s"] = 2 * gpu_limit * bytes_per_chip / 1e9  # read + write
    out = Path(args.results or ROOT / "bench" / "results" / f"streaming_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("| path | chips/s | % of memcpy | × xbatcher in RAM |\n|---|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v:,.0f} | {100 * v / limit:.0f} % | {v / in_ram:.1f}× |")


if __name__ == "__main__":
    main()
