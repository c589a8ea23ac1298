"""Interval and area-interval coverage of finished runs, and their spread over seeds.

For each run: the per-pixel and per-chip calibrated intervals (cross-fitted, as metrics.json
has them) and the 95 % intervals of the mean AGB of squares of 0.5 and 1 km² laid over the test
folds, beside the naive ones (independent pixels); then each figure's mean and range over the
runs (seeds). The figures are recomputed from each run's predictions.parquet and pixels.parquet
with the current code, so runs trained before area error models are measured the same way.

    python bench/intervals.py ../runs/fast-s0 ../runs/fast-s1 ../runs/fast-s2 \\
        --output bench/results/intervals.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _harness import machine

from agbcube.config import load_run_config
from agbcube.train.errorfield import area_metrics, site_grids, with_metric_xy
from agbcube.train.intervals import interval_metrics


def run_figures(run_dir: Path) -> dict[str, Any]:
    """The primary model's interval figures of one run, per site."""
    cfg = load_run_config(run_dir)
    model, level = cfg.train.model, cfg.train.interval_level
    chips = pd.read_parquet(run_dir / "predictions.parquet")
    pixels = pd.read_parquet(run_dir / "pixels.parquet")
    chips, pixels = chips[chips["model"] == model], pixels[pixels["model"] == model]
    grids = site_grids(cfg.cube.output, sorted(pixels["site"].unique()))
    pixels = with_metric_xy(pixels, grids)
    start = time.perf_counter()
    pix = interval_metrics(pixels, level)
    area = area_metrics(pixels, pix, grids)
    seconds = time.perf_counter() - start
    chip = interval_metrics(chips, level)
    out: dict[str, Any] = {"seconds_area_and_pixel_intervals": round(seconds, 1)}
    for site in sorted(pix["per_site"]):
        row = {
            "pixel_coverage": pix["per_site"][site]["coverage"],
            "pixel_raw_spread_coverage": pix["per_site"][site]["raw_spread_coverage"],
            "chip_coverage": chip["per_site"][site]["coverage"],
            "chip_raw_spread_coverage": chip["per_site"][site]["raw_spread_coverage"],
            "error_model": {
                k: area["per_site"][site][k]
                for k in ("sill", "nugget", "psill", "constant", "range_m")
            },
        }
        for size in ("0.5", "1"):
            blocks = area["blocks"][size]["per_site"].get(site, {})
            for key in ("n_blocks", "coverage", "naive_coverage", "mean_half_width", "rmse"):
                row[f"blocks_{size}_{key}"] = blocks.get(key)
            row[f"blocks_{size}_naive_half_width"] = blocks.get("naive_mean_half_width")
        out[site] = row
    return out


def spread(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per site and figure: the mean, min and max over the runs."""
    sites = sorted({s for r in runs.values() for s in r if isinstance(r[s], dict)})
    out = {}
    for site in sites:
        keys = [k for k, v in next(iter(runs.values()))[site].items() if isinstance(v, float)]
        out[site] = {
            k: {
                "mean": float(np.mean(vals)),
                "min": float(np.min(vals)),
                "max": float(np.max(vals)),
            }
            for k in keys
            for vals in [[r[site][k] for r in runs.values() if r[site].get(k) is not None]]
            if vals
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, default=Path("bench/results/intervals.json"))
    args = parser.parse_args()
    runs = {str(r): run_figures(r) for r in args.runs}
    result = {"machine": machine(), "runs": runs, "over_runs": spread(runs)}
    args.output.write_text(json.dumps(result, indent=1))
    for site, figs in result["over_runs"].items():
        print(site)
        for k, v in figs.items():
            print(f"  {k:36s} {v['mean']:.3f}  [{v['min']:.3f}, {v['max']:.3f}]")


if __name__ == "__main__":
    main()
