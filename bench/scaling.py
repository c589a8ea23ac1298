"""Benchmark of how agbcube's stages scale with the number of sites (issue 8, item 5).

A hand-run benchmark, not a test. For each factor ``k`` (``--factors``, default 1,2,4,8,16) it
writes a config with ``k`` copies of the three benchmark sites (``3 k`` sites, every copy reading
the same rasters under its own name, so the cube, the chips and the training set grow ``k``-fold
while each site stays the same) and runs the three CLI stages on it, each in a fresh process:

1. ``agbcube build-cube CFG -q`` (threads scheduler),
2. ``agbcube folds CFG --no-maps -q``, with ``min_train_fraction: 0.05`` (the copies' folds
   are seeded by their names, and a renamed khaoyai finds no layout keeping the default 10 %
   at a 1 km buffer),
3. ``agbcube train CFG --device cpu --epochs E -q`` with ``patience`` = E, so every fold trains
   exactly E epochs (default E = 3) whatever its validation curve, and the ``hgb-pixel``
   baseline on (its pixel sample is capped, so its cost is flat in k).

Reported per stage: wall time of the process (including Python start-up and imports, ~3 s), peak
RSS (``ru_maxrss`` from ``os.wait4``), and the number of chips. The cubes are written
under ``--workdir`` (default ``/tmp/agbcube-bench-scaling``, deleted unless ``--keep``; 16× needs
about 1.5 GB).

Command line
------------
::

    python bench/scaling.py --factors 1,2,4,8,16 --epochs 3

``--stages build`` runs build-cube only; ``--plot PNG`` draws each stage's time against the
chips beside proportional growth. Results go to ``--results`` (default
``bench/results/scaling.json``) and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SITES = ("achanakmar", "betul", "khaoyai")
SHARED = REPO.parent / "shared" / "benchmark" / "raw"


def write_config(workdir: Path, k: int, epochs: int) -> Path:
    """A config with ``k`` copies of the benchmark sites, outputs under ``workdir/x{k}``."""
    import yaml

    base = yaml.safe_load((REPO / "configs" / "benchmark.yaml").read_text())
    out = workdir / f"x{k}"
    out.mkdir(parents=True, exist_ok=True)
    sites = [
        {
            "name": f"{name}_{c}",
            "satellite": str(SHARED / "satellite" / f"{name}_satellite.tif"),
            "biomass": str(SHARED / "biomass" / f"{name}_biomass.tif"),
        }
        for c in range(k)
        for name in SITES
    ]
    cfg = {
        **base,
        "sites": sites,
        "cube": {**base["cube"], "output": str(out / "cube.zarr")},
        # min_train_fraction 0.05: a renamed khaoyai (its folds are seeded by its name) finds
        # no layout keeping 10 % at 1 km; this benchmark times the stages, not accuracy
        "folds": {
            **base["folds"],
            "min_train_fraction": 0.05,
            "output": str(out / "folds.parquet"),
        },
        "train": {**base.get("train", {}), "patience": epochs, "output": str(out / "run")},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(cmd: list[str]) -> dict[str, Any]:
    """Run a command; its wall time and peak RSS (GB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    result = {
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
        "returncode": code,
    }
    if code != 0:
        result["tail"] = out.decode(errors="replace")[-2000:]
    return result


def bench_factor(k: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = write_config(args.workdir, k, args.epochs)
    agb = [sys.executable, "-m", "agbcube.cli"]
    row: dict[str, Any] = {"factor": k, "sites": 3 * k}
    row["build_cube"] = run([*agb, "build-cube", str(cfg), "-q", "--overwrite"])
    if args.stages == "build":
        return {**row, "cube_gb": _du(cfg.parent / "cube.zarr")}
    row["folds"] = run([*agb, "folds", str(cfg), "--no-maps", "-q"])
    row["train"] = run(
        [
            *agb,
            "train",
            str(cfg),
            "--device",
            "cpu",
            "--epochs",
            str(args.epochs),
            "-q",
            "--overwrite",
        ]
    )
    out = cfg.parent
    import pandas as pd

    if (out / "folds.parquet").exists():
        folds = pd.read_parquet(out / "folds.parquet", columns=["chip_id"])
        row["chips"] = len(folds)
    row["cube_gb"] = _du(out / "cube.zarr")
    return row


def _du(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9, 3)


def _cell(stage: dict[str, Any] | None) -> str:
    if stage is None:
        return "– | –"
    if stage["returncode"] != 0:
        return f"failed ({stage['returncode']}) | –"
    return f"{stage['wall_s']:.1f} | {stage['peak_rss_gb']:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| × benchmark | sites | chips | cube GB | build-cube s | peak GB | folds s | peak GB "
        "| train s | peak GB |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['factor']}× | {r['sites']} | {r.get('chips', '–')} | {r['cube_gb']:.2f} | "
            f"{_cell(r['build_cube'])} | {_cell(r.get('folds'))} | {_cell(r.get('train'))} |"
        )
    return "\n".join(lines)


def run_factors(bench: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``bench(k, args)`` for each of ``args.factors``; the rows, also written to
    ``args.results`` with the date, machine and command line."""
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this benchmark needs ../shared/benchmark")
    rows = []
    try:
        for k in (int(f) for f in args.factors.split(",")):
            print(f"[{k}x] {3 * k} sites", file=sys.stderr, flush=True)
            rows.append(bench(k, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.node()} {os.cpu_count()} CPUs",
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "epochs": args.epochs,
                "rows": rows,
            },
            indent=2,
        )
    )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Each stage's wall time against the chips, beside the line through the smallest run
    and the origin (proportional growth: a stage under its line grows less than linearly)."""
    from agbcube._plot import new_figure, save_figure

    rows = [r for r in rows if "chips" in r]
    chips = np.array([r["chips"] for r in rows], dtype=float)
    fig = new_figure((5.5, 4))
    ax = fig.add_subplot()
    for stage, colour in (("build_cube", "C0"), ("folds", "C1"), ("train", "C2")):
        secs = np.array([r[stage]["wall_s"] for r in rows], dtype=float)
        ax.plot(chips, secs, "o-", color=colour, label=stage.replace("_", "-"))
        line = np.array([0.0, chips.max()])
        ax.plot(line, line * secs[0] / chips[0], ":", color=colour, lw=1)
    ax.set(xlabel="chips", ylabel="wall time (s)", xlim=(0, None), ylim=(0, None))
    ax.set_title("Stage time against chips (dotted: proportional)", fontsize=10)
    ax.legend(frameon=False)
    return save_figure(fig, path, tight=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--factors", default="1,2,4,8,16")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--stages", choices=["all", "build"], default="all")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/agbcube-bench-scaling"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "scaling.json")
    p.add_argument("--plot", type=Path, default=None, help="a PNG of time against chips")
    args = p.parse_args(argv)
    rows = run_factors(bench_factor, args)
    print(table(rows))
    if args.plot and args.stages == "all":
        print(f"plot: {plot(rows, args.plot)}")
    print(f"\nresults: {args.results}")


if __name__ == "__main__":
    main()
