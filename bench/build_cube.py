"""Benchmark of ``agbcube build-cube``: wall time, peak RSS and throughput against a plain copy.

A hand-run benchmark, not a test. For each size it runs, every step in a fresh subprocess so that
peak RSS is per step (``os.wait4`` reports the child's own ``ru_maxrss``):

1. a *plain copy* baseline: ``rioxarray.open_rasterio(sat, chunks=...)`` →
   ``.to_dataset(name="features").to_zarr(..., zarr_format=2)`` with the cube's chunking (all
   bands × ``chunks`` × ``chunks``) and the cube's Blosc lz4 compression, no alignment and no
   indices;
2. :func:`agbcube.cube.build_cube` (threads scheduler, ``overwrite=True``, no progress bar).

Sizes:

``small``
    ``configs/benchmark.yaml``: the three real benchmark sites (~280 × 280 px, 59 bands); the
    cube is written under ``--workdir``, not to the config's own output.
``medium``, ``large``
    A generated site: a 59-band float32 GeoTIFF laid out like the benchmark stacks (tiled
    256 × 256, pixel interleaved, deflate + predictor 3, band descriptions = band names) built by
    mirror-tiling the real ``achanakmar`` stack block by block with windowed writes (the generator
    never holds the raster in memory), plus an AGB map on the same EPSG:4326 grid (the real
    ``achanakmar`` AGB mirror-tiled and clipped to 1-400 Mg/ha). ``large`` is ``--large-px``
    pixels square (default 4608: 59 raw bands + 49 indices = 9.2 GB of float32 cube features);
    ``medium`` has half its side (a quarter of its pixels).

Throughput is decoded satellite bytes (bands × rows × columns × 4, the AGB map not counted) per
second of wall time of the measured call (imports excluded), in MB/s (1 MB = 1e6 bytes); GB are
1e9 bytes, RSS included. Targets (from the issue): peak RSS < 2 GB for the ≥ 8 GB site and flat in
raster size, build throughput ≥ 50 % of the plain copy's.

Command line
------------
::

    python bench/build_cube.py --sizes small,medium,large --repeat 2

(about 11 minutes on 2 cores; needs ~15 GB free under ``--workdir``, default
``/tmp/agbcube-bench``).

Options: ``--sizes`` (comma-separated subset of small, medium, large), ``--workdir`` (generated
inputs and outputs, deleted at the end unless ``--keep``), ``--keep``, ``--large-px``,
``--compress`` (``deflate`` or ``none`` for the generated stacks), ``--repeat`` (runs per step:
the fastest wall time and the highest peak RSS are reported), ``--results`` (JSON file, default
``bench/results/build_cube.json``) and ``--max-rss-gb`` (a child above it is killed, so a runaway
build cannot take the machine down). Prints a Markdown table.

Environment variables reach the children: ``GDAL_CACHEMAX=64`` shows how much of the peak RSS is
GDAL's block cache (by default 5 % of the machine's RAM).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _harness import machine, run_child, versions

REPO = Path(__file__).resolve().parents[1]
BENCHMARK_CONFIG = REPO / "configs" / "benchmark.yaml"
RAW = REPO.parent / "shared" / "benchmark" / "raw"  # as configs/benchmark.yaml has it
TEMPLATE_SAT = RAW / "satellite" / "achanakmar_satellite.tif"
TEMPLATE_AGB = RAW / "biomass" / "achanakmar_biomass.tif"
CHUNKS = 256
SIZES = ("small", "medium", "large")
ENV_KEYS = ("GDAL_CACHEMAX", "GDAL_NUM_THREADS", "DASK_NUM_WORKERS", "OMP_NUM_THREADS")


# --------------------------------------------------------------------------------------------
# generated sites


def _mirror(index: Any, n: int) -> Any:
    """Map output indices onto ``range(n)`` by reflecting the source back and forth."""
    m = index % (2 * n)
    return (m < n) * m + (m >= n) * (2 * n - 1 - m)


def _write_mirrored(
    template: Path,
    dest: Path,
    px: int,
    profile: dict[str, Any],
    clip: tuple[float, float] | None = None,
) -> None:
    """Write ``template`` mirror-tiled to ``px`` × ``px`` pixels, one 256 × 256 window at a time."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(template) as src:
        data = src.read()  # the small template: 59 × ~280 × ~280 float32, ~18 MB
        descriptions = src.descriptions
        nodata = src.nodata
    if clip is not None:
        data = np.clip(data, *clip)
    _, h, w = data.shape
    tmp = dest.with_name(dest.name + ".part")
    with rasterio.open(tmp, "w", **profile, count=data.shape[0], nodata=nodata) as dst:
        for i, d in enumerate(descriptions, start=1):
            if d:
                dst.set_band_description(i, d)
        for r0 in range(0, px, CHUNKS):
            rows = _mirror(np.arange(r0, min(px, r0 + CHUNKS)), h)
            for c0 in range(0, px, CHUNKS):
                cols = _mirror(np.arange(c0, min(px, c0 + CHUNKS)), w)
                block = data[:, rows[:, None], cols[None, :]]
                dst.write(block, window=Window(c0, r0, block.shape[2], block.shape[1]))
    tmp.rename(dest)


def generate_site(workdir: Path, name: str, px: int, compress: str) -> dict[str, str]:
    """Generate (or reuse) a ``px`` × ``px`` site; returns its config entry."""
    import rasterio

    folder = workdir / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    sat = folder / f"{name}_satellite.tif"
    agb = folder / f"{name}_biomass.tif"
    with rasterio.open(TEMPLATE_SAT) as src:
        crs, transform = src.crs, src.transform
    profile = {
        "driver": "GTiff",
        "dtype": "float32",
        "width": px,
        "height": px,
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": CHUNKS,
        "blockysize": CHUNKS,
        "BIGTIFF": "YES",
        "NUM_THREADS": "ALL_CPUS",
    }
    if compress != "none":
        profile.update(compress=compress, predictor=3)
    for template, dest, interleave, clip in (
        (TEMPLATE_SAT, sat, "pixel", None),
        (TEMPLATE_AGB, agb, "band", (1.0, 400.0)),
    ):
        if dest.exists():
            with rasterio.open(dest) as ds:
                if ds.shape == (px, px):
                    continue
        t0 = time.perf_counter()
        _write_mirrored(template, dest, px, {**profile, "interleave": interleave}, clip)
        size = dest.stat().st_size / 1e9
        print(f"  generated {dest} ({size:.2f} GB on disk) in {time.perf_counter() - t0:.0f} s")
    return {"name": name, "satellite": str(sat), "biomass": str(agb)}


def satellite_bytes(paths: list[str]) -> int:
    """Decoded bytes of the satellite stacks (bands × rows × columns × itemsize)."""
    import numpy as np
    import rasterio

    total = 0
    for path in paths:
        with rasterio.open(path) as src:
            total += src.count * src.height * src.width * np.dtype(src.dtypes[0]).itemsize
    return total


# --------------------------------------------------------------------------------------------
# the measured steps (run in a child process)


def _child_build(spec: dict[str, Any]) -> dict[str, Any]:
    from agbcube.config import load_config, parse_config
    from agbcube.cube import build_cube

    if "config_path" in spec:
        cfg = load_config(spec["config_path"])
    else:
        cfg = parse_config(spec["config"], base_dir=spec["workdir"])
    cube = cfg.cube.model_copy(update={"output": Path(spec["output"])})
    t0 = time.perf_counter()
    results = build_cube(cfg.sites, cube, overwrite=True, scheduler="threads", progress=False)
    return {"wall_s": time.perf_counter() - t0, "sites": results}


def _child_copy(spec: dict[str, Any]) -> dict[str, Any]:
    import rioxarray
    from numcodecs import Blosc

    # The cube's codec (agbcube.cube._encoding): Blosc lz4, level 5, byte shuffle.
    codec = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)
    key = {"compressors": (codec,)}
    t0 = time.perf_counter()
    for i, sat in enumerate(spec["satellites"]):
        da = rioxarray.open_rasterio(sat, chunks={"band": -1, "y": CHUNKS, "x": CHUNKS})
        ds = da.to_dataset(name="features")
        encoding = {"features": {**key, "chunks": ds["features"].data.chunksize}}
        store = Path(spec["output"]) / f"site{i}.zarr"
        ds.to_zarr(store, mode="w", zarr_format=2, consolidated=True, encoding=encoding)
    return {"wall_s": time.perf_counter() - t0}


def child_main(spec_path: str) -> None:
    """Run one measured step described by a JSON spec; write its result next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    import dask  # noqa: F401  (imports are not part of the measured time)
    import rioxarray  # noqa: F401
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = {"prepare": _child_prepare, "build": _child_build, "copy": _child_copy}
    out = steps[spec["mode"]](spec)
    out["rss_after_imports"] = rss_imports
    Path(spec_path).with_suffix(".out.json").write_text(json.dumps(out, default=str))


def run_step(spec: dict[str, Any], workdir: Path, max_rss: float) -> dict[str, Any]:
    """Run a step in a fresh interpreter; add its peak RSS and an RSS trace (1 s samples)."""
    result = run_child(__file__, spec, workdir, max_rss)
    result["peak_rss"] = result["ru_maxrss"]
    return result


def measure(spec: dict[str, Any], workdir: Path, max_rss: float, repeat: int) -> dict[str, Any]:
    """Run a step ``repeat`` times: the fastest run, with the highest peak RSS of all runs."""
    runs = [run_step(spec, workdir, max_rss) for _ in range(repeat)]
    done = [r for r in runs if "wall_s" in r]
    best = dict(min(done, key=lambda r: r["wall_s"]) if done else runs[-1])
    best["peak_rss"] = max(r["peak_rss"] for r in runs)
    best["runs"] = [
        {"wall_s": r.get("wall_s"), "peak_rss": r["peak_rss"], "error": r.get("error")}
        for r in runs
    ]
    return best


# --------------------------------------------------------------------------------------------
# driver


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """The sites of a size (generating them if needed), their chunking and input bytes."""
    from agbcube.config import load_config

    if spec["size"] == "small":
        cfg = load_config(BENCHMARK_CONFIG)
        sites = [
            {"name": s.name, "satellite": str(s.satellite), "biomass": str(s.biomass)}
            for s in cfg.sites
        ]
        chunks = cfg.cube.chunks
    else:
        workdir, px = Path(spec["workdir"]), spec["px"]
        sites = [generate_site(workdir, f"gen{px}", px, spec["compress"])]
        chunks = CHUNKS
    return {
        "sites": sites,
        "chunks": chunks,
        "input_bytes": satellite_bytes([s["satellite"] for s in sites]),
    }


def bench_size(size: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure the plain copy, then build-cube, for one size."""
    workdir: Path = args.workdir
    prep_spec: dict[str, Any] = {"mode": "prepare", "size": size, "workdir": str(workdir)}
    if size == "small":
        build_spec: dict[str, Any] = {"config_path": str(BENCHMARK_CONFIG)}
        label = f"small ({BENCHMARK_CONFIG.relative_to(REPO)}, 3 sites)"
    else:
        px = args.large_px if size == "large" else args.large_px // 2
        print(f"[{size}] generating a {px} x {px} px site", flush=True)
        prep_spec.update(px=px, compress=args.compress)
        label = f"{size} (generated {px} x {px} px)"
    # Everything that imports numpy, rasterio or agbcube runs in a child: a child's ru_maxrss
    # starts at its parent's peak RSS (Linux carries it over exec), so the parent stays small.
    prep = run_step(prep_spec, workdir, args.max_rss_gb * 1e9)
    if "error" in prep:
        raise RuntimeError(f"[{size}] preparing the inputs {prep['error']}")
    sites, in_bytes = prep["sites"], prep["input_bytes"]
    assert prep["chunks"] == CHUNKS, "the copy baseline uses the cube's chunking"
    if size != "small":
        build_spec = {"config": {"sites": sites, "cube": {"output": "unused", "chunks": CHUNKS}}}
    sats = [s["satellite"] for s in sites]
    out_dir = workdir / "outputs" / size
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    max_rss = args.max_rss_gb * 1e9

    print(f"[{size}] plain copy of {in_bytes / 1e9:.2f} GB", flush=True)
    copy_spec = {"mode": "copy", "satellites": sats, "output": str(out_dir / "copy")}
    copy = measure(copy_spec, workdir, max_rss, args.repeat)
    copy["store_bytes"] = _du(out_dir / "copy")
    shutil.rmtree(out_dir / "copy", ignore_errors=True)

    print(f"[{size}] build_cube", flush=True)
    spec = {"mode": "build", "workdir": str(workdir), "output": str(out_dir / "cube.zarr")}
    build = measure({**spec, **build_spec}, workdir, max_rss, args.repeat)
    build["store_bytes"] = _du(out_dir / "cube.zarr")
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)

    cube_bytes = sum(
        s["bands"] * s["shape"][0] * s["shape"][1] * 4 for s in build.get("sites", {}).values()
    )
    row: dict[str, Any] = {
        "size": size,
        "label": label,
        "sites": sites,
        "input_bytes": in_bytes,
        "cube_feature_bytes": cube_bytes,
        "build": build,
        "copy": copy,
    }
    for step in (build, copy):
        if "wall_s" in step:
            step["mb_s"] = in_bytes / 1e6 / step["wall_s"]
    if "mb_s" in build and "mb_s" in copy:
        row["pct_of_copy"] = 100 * build["mb_s"] / copy["mb_s"]
    print(f"[{size}] " + json.dumps(_table_row(row)), flush=True)
    return row


def _table_row(row: dict[str, Any]) -> dict[str, str]:
    b, c = row["build"], row["copy"]

    def num(step: dict[str, Any], key: str, fmt: str) -> str:
        return format(step[key], fmt) if key in step else step.get("error", "n/a")

    return {
        "site": row["label"],
        "input GB": f"{row['input_bytes'] / 1e9:.2f}",
        "cube GB": f"{row['cube_feature_bytes'] / 1e9:.2f}" if row["cube_feature_bytes"] else "-",
        "wall s": num(b, "wall_s", ".1f"),
        "MB/s": num(b, "mb_s", ".0f"),
        "peak RSS GB": f"{b['peak_rss'] / 1e9:.2f}",
        "copy wall s": num(c, "wall_s", ".1f"),
        "copy MB/s": num(c, "mb_s", ".0f"),
        "copy peak RSS GB": f"{c['peak_rss'] / 1e9:.2f}",
        "% of copy": f"{row['pct_of_copy']:.0f} %" if "pct_of_copy" in row else "-",
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    cells = [_table_row(r) for r in rows]
    head = list(cells[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c[h] for h in head) + " |" for c in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,medium,large", help="comma-separated sizes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/agbcube-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the workdir and the outputs")
    parser.add_argument("--large-px", type=int, default=4608, help="side of the large site")
    parser.add_argument("--compress", choices=("deflate", "none"), default="deflate")
    parser.add_argument("--repeat", type=int, default=1, help="runs per step; the fastest counts")
    parser.add_argument("--max-rss-gb", type=float, default=16.0)
    parser.add_argument("--results", type=Path, default=REPO / "bench/results/build_cube.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    try:
        rows = [bench_size(size, args) for size in sizes]
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    table = markdown_table(rows)
    print("\n" + table)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/build_cube.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "versions": versions(
            ("agbcube", "dask", "xarray", "zarr", "numcodecs", "rioxarray", "rasterio", "numpy")
        ),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "parent_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": rows,
        "table": table,
    }
    args.results.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    print(f"\nresults: {args.results}")


if __name__ == "__main__":
    main()
