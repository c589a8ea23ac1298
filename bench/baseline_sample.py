"""The ``hgb-pixel`` baseline's cost and accuracy against the size of its pixel sample.

Refits every fold's baseline of a finished run (its cube, folds and settings) with
``train.hgb_max_pixels`` = each of ``--pixels``, each with ``--seeds`` sample seeds (the
sample's and the model's ``random_state``), and reports per size the baseline's total fit
and prediction time over the folds and its chip and pixel R² per site, mean and range over the
seeds. A smaller sample is as good as the default when its R² stay within the default's
range over the seeds (which is the sample's own noise).

Usage::

    python bench/baseline_sample.py RUN_DIR [--pixels 60000 30000 15000] [--seeds 0 1 2]
        [--results bench/results/baseline_sample.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine

from agbcube.config import load_run_config, with_overrides
from agbcube.train.baseline import baseline_fold
from agbcube.train.data import RunData
from agbcube.train.metrics import regression_metrics
from agbcube.train.plan import RunPlan
from agbcube.train.tasks import test_agb


def _truth(run: RunData) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each fold's test AGB (Mg/ha per pixel) and its chips' sites."""
    sites = run.folds["site"].astype(str).to_numpy()
    return {k: (test_agb(run.fold(k)), sites[run.fold(k).roles.test]) for k in range(run.n_folds)}


def _r2(truth: dict, preds: dict) -> dict[str, dict[str, float]]:
    """Per site, chip-level (chip means) and pixel-level R² of the folds' predictions."""
    agb = np.concatenate([truth[k][0] for k in truth])
    site = np.concatenate([truth[k][1] for k in truth])
    pred = np.concatenate([preds[k] for k in truth])
    out: dict[str, dict[str, float]] = {"chip": {}, "pixel": {}}
    for s in sorted(set(site)):
        a, p = agb[site == s], pred[site == s]
        p = np.where(np.isnan(a), np.nan, p)  # a chip's mean over its labelled pixels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a chip without labels: NaN
            chip_a, chip_p = np.nanmean(a, axis=(1, 2)), np.nanmean(p, axis=(1, 2))
        out["chip"][s] = regression_metrics(chip_a, chip_p)["r2"]
        out["pixel"][s] = regression_metrics(a.ravel(), p.ravel())["r2"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pixels", nargs="+", type=int, default=[60000, 30000, 15000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--results", type=Path, default=Path("bench/results/baseline_sample.json"))
    args = parser.parse_args()
    config = load_run_config(args.run_dir)
    plan = RunPlan.read(args.run_dir)
    run = RunData(config, args.run_dir, plan, torch.device("cpu"))
    truth, rows = _truth(run), []
    for pixels in args.pixels:
        for seed in args.seeds:
            # the baseline reads only these two settings from the run's train section: the
            # chips, read once, serve every variant
            run.tcfg = with_overrides(config.train, "train", hgb_max_pixels=pixels, seed=seed)
            preds, t0 = {}, time.perf_counter()
            for k in range(run.n_folds):
                preds[k] = baseline_fold(run, k)[0]["pred"]
            seconds = time.perf_counter() - t0
            rows.append({"pixels": pixels, "seed": seed, "seconds": round(seconds, 1),
                         "r2": _r2(truth, preds)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    out = {"machine": machine(device="cpu"), "run": str(args.run_dir), "rows": rows}
    args.results.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
