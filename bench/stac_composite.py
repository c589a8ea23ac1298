"""Benchmark of STAC compositing: time and peak RSS to build a benchmark-sized site's cube.

A hand-run benchmark, not a test. It writes a local static STAC catalogue of synthetic scenes
(``agbcube.stac.demo``) over an AGB map the size of the benchmark sites (``--rows`` × ``--cols``
pixels of ~40 m on EPSG:4326, default 280 × 290), then runs :func:`agbcube.cube.build_cube` on
it in a fresh interpreter (``_harness.run_child``: peak RSS is the child's own ``ru_maxrss``).

The catalogue: per season (3) ``--scenes`` Sentinel-2 L2A scenes (20 m UTM, 10 bands + SCL,
clouds, shadows, a third of them with the 04.00 offset and a third missing a corner), as many
Landsat-8 C2 L2 scenes (30 m, 6 bands + QA_PIXEL) and Sentinel-1 scenes (20 m, VV + VH linear,
converted to dB), plus a GLO-30-like DEM, a canopy-height map and two PALSAR-2 yearly mosaics:
the whole 59-band layout. The cube adds the 49 indices, as a file-based build does.

Command line
------------
::

    python bench/stac_composite.py --scenes 10 --repeat 2

Options: ``--rows``, ``--cols``, ``--scenes``, ``--chunks`` (cube chunk side), ``--scheduler``,
``--repeat`` (fastest wall time and highest peak RSS reported), ``--workdir`` (default
``/tmp/agbcube-bench-stac``, deleted at the end unless ``--keep``), ``--results`` (JSON, default
``bench/results/stac_composite.json``), ``--max-rss-gb``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from _harness import machine, run_child, versions

_PIXEL_DEG = 0.000359326  # ~40 m, as the benchmark maps
_SEASONS = {"T1": ["2020-01-01", "2020-05-01"], "T2": ["2020-05-02", "2020-09-01"]}
_SEASONS["T3"] = ["2020-09-02", "2020-12-31"]


def write_inputs(workdir: Path, rows: int, cols: int, scenes: int) -> dict:
    """The AGB map and the catalogue; returns what they hold."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from agbcube.demo import Field, Landscape
    from agbcube.stac.demo import synthetic_scenes, write_catalogue

    rng = np.random.default_rng(0)
    lon0, lat0 = 80.10, 22.30
    land = Landscape(
        lon0,
        lat0,
        Field.random(rng),
        Field.random(rng, min_m=600, max_m=3000),
        Field.random(rng, min_m=800, max_m=6000),
        140.0,
    )
    cc, rr = np.meshgrid(np.arange(cols) + 0.5, np.arange(rows) + 0.5)
    agb, _ = land.agb(lon0 + cc * _PIXEL_DEG, lat0 - rr * _PIXEL_DEG)
    transform = from_origin(lon0, lat0, _PIXEL_DEG, _PIXEL_DEG)
    with rasterio.open(
        workdir / "biomass.tif", "w", driver="GTiff", height=rows, width=cols, count=1,
        dtype="float32", crs="EPSG:4326", transform=transform,
    ) as dst:  # fmt: skip
        dst.write(agb.astype("float32"), 1)
    size_m = max(rows, cols) * 40.0
    items = synthetic_scenes("bench", land, size_m, rng, per_season=(scenes, scenes, scenes))
    t0 = time.perf_counter()
    write_catalogue(workdir / "catalogue", items)
    files = list((workdir / "catalogue").rglob("*.tif"))
    return {
        "items": len(items),
        "cogs": len(files),
        "catalogue_gb": sum(f.stat().st_size for f in files) / 1e9,
        "write_s": time.perf_counter() - t0,
    }


def child(spec_file: Path) -> None:
    """Build the site's cube from the catalogue; write the figures beside the spec."""
    spec = json.loads(spec_file.read_text())
    from agbcube.config import CubeConfig, SiteConfig
    from agbcube.cube import build_cube

    workdir = Path(spec["workdir"])
    site = SiteConfig(
        name="bench",
        biomass=workdir / "biomass.tif",
        satellite={
            "stac": str(workdir / "catalogue" / "catalog.json"),
            "seasons": _SEASONS,
            "max_cloud_cover": 100,
            "sentinel1_db": True,
        },
    )
    cube = CubeConfig(output=workdir / f"cube-{spec['run']}.zarr", chunks=spec["chunks"])
    t0 = time.perf_counter()
    result = build_cube([site], cube, scheduler=spec["scheduler"], progress=False)["bench"]
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "shape": result["shape"], "bands": result["bands"]}
    spec_file.with_suffix(".out.json").write_text(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=280)
    parser.add_argument("--cols", type=int, default=290)
    parser.add_argument("--scenes", type=int, default=10, help="scenes per season and sensor")
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/agbcube-bench-stac"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--results", type=Path, default=Path("bench/results/stac_composite.json"))
    parser.add_argument("--max-rss-gb", type=float, default=12.0)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    try:
        inputs = write_inputs(args.workdir, args.rows, args.cols, args.scenes)
        runs = []
        for run in range(args.repeat):
            spec = {
                "workdir": str(args.workdir),
                "chunks": args.chunks,
                "scheduler": args.scheduler,
                "run": run,
            }
            res = run_child(__file__, spec, args.workdir, args.max_rss_gb * 1e9)
            if "error" in res:
                sys.exit(f"run {run}: {res['error']}")
            runs.append(res)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "versions": versions(["agbcube", "odc-stac", "odc-loader", "pystac", "dask", "rasterio"]),
        "site_px": [args.rows, args.cols],
        "scenes_per_season": args.scenes,
        **inputs,
        "wall_s": min(r["wall_s"] for r in runs),
        "peak_rss_gb": max(r["ru_maxrss"] for r in runs) / 1e9,
        "process_wall_s": min(r["process_wall_s"] for r in runs),
        "other_cpus_busy": max(r["other_cpus_busy"] for r in runs),
        "shape": runs[0]["shape"],
        "bands": runs[0]["bands"],
        "runs": runs,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(summary, indent=1))
    print(
        "| site px | items | COGs | catalogue GB | cube bands | build wall s | peak RSS GB |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {args.rows} x {args.cols} | {inputs['items']} | {inputs['cogs']} | "
        f"{inputs['catalogue_gb']:.2f} | {summary['bands']} | {summary['wall_s']:.1f} | "
        f"{summary['peak_rss_gb']:.2f} |"
    )


if __name__ == "__main__":
    main()
