"""How well an ensemble's spread tracks its errors, per site, for finished runs.

The maps' ``agb_std`` is the spread of a fold's members, and the intervals scale it: an
ensemble whose members are too alike (e.g. branches of one trajectory) is sharper than its
errors and needs a larger conformal factor, or ranks its pixels' errors worse. For each run
and site, at the chip and the pixel level:

* ``r2``: the run's own figure (metrics.json);
* ``spread``: the mean ``agb_std`` (Mg/ha) and ``rmse_over_spread``, the RMSE over the RMS
  spread (1: the spread is the error's size; above 1: over-confident);
* ``spearman``: the rank correlation of ``agb_std`` with the absolute error (does the spread
  say where the errors are);
* ``coverage``, ``mean_width``, ``raw_spread_coverage``: the calibrated interval's
  cross-fitted coverage and mean width (Mg/ha), and the coverage of ``pred ± z·agb_std`` read
  as a Gaussian s.d. (metrics.json "intervals").

Then each figure's mean, min and max over the runs given together (seeds)::

    python bench/members.py --label refit RUN_s0 RUN_s1 RUN_s2 --label branch RUN_b0 ...
        [--output bench/results/members.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _harness import machine
from scipy.stats import spearmanr

from agbcube.config import load_run_config

TABLES = {"chip": "predictions.parquet", "pixel": "pixels.parquet"}


def run_figures(run_dir: Path) -> dict[str, Any]:
    """Per level and site: R², spread against error, the calibrated intervals."""
    model = load_run_config(run_dir).train.model
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out: dict[str, Any] = {}
    for level, name in TABLES.items():
        table = pd.read_parquet(run_dir / name)
        table = table[(table["model"] == model) & table["agb_true"].notna()]
        scores = metrics["models"][model][level]["mg_ha"]["per_site"]
        cal = metrics["intervals"][model][level]["per_site"]
        for site, rows in table.groupby("site"):
            err = (rows["agb_pred"] - rows["agb_true"]).to_numpy()
            std = rows["agb_std"].to_numpy()
            rms_spread = float(np.sqrt(np.mean(std**2)))
            out.setdefault(str(site), {})[level] = {
                "r2": scores[site]["r2"],
                "spread": float(std.mean()),
                "rmse_over_spread": float(np.sqrt(np.mean(err**2)) / max(rms_spread, 1e-9)),
                "spearman": float(spearmanr(std, np.abs(err)).statistic),
                **{k: cal[site][k] for k in ("coverage", "mean_width", "raw_spread_coverage")},
            }
    return out


def over_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each site's, level's and figure's mean, min and max over ``runs``."""
    sites = sorted(k for k, v in runs[0].items() if isinstance(v, dict))
    return {
        site: {
            level: {
                key: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                for key in runs[0][site][level]
                for v in [[r[site][level][key] for r in runs]]
            }
            for level in TABLES
        }
        for site in sites
    }


def parse_groups(argv: list[str]) -> dict[str, list[Path]]:
    """``--label NAME RUN ... --label NAME RUN ...`` as {name: [runs]}."""
    groups: dict[str, list[Path]] = {}
    label = None
    for arg in argv:
        if arg == "--label":
            label = ""
        elif label == "":
            label = arg
            groups[label] = []
        elif label is None:
            raise SystemExit("name a group first: --label NAME RUN [RUN ...]")
        else:
            groups[label].append(Path(arg))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("bench/results/members.json"))
    args, rest = parser.parse_known_args()
    result: dict[str, Any] = {"machine": machine(), "groups": {}}
    for label, dirs in parse_groups(rest).items():
        runs = [run_figures(d) for d in dirs]
        result["groups"][label] = {
            "runs": {str(d): r for d, r in zip(dirs, runs, strict=True)},
            "over_runs": over_runs(runs),
        }
    args.output.write_text(json.dumps(result, indent=1))
    keys = ("r2", "spread", "rmse_over_spread", "spearman", "coverage", "mean_width")
    print("group    site        level  " + "  ".join(f"{k:>16s}" for k in keys))
    for label, group in result["groups"].items():
        for site, levels in group["over_runs"].items():
            for level, figs in levels.items():
                cells = [
                    f"{figs[k]['mean']:6.3f} [{figs[k]['min']:.2f},{figs[k]['max']:.2f}]"
                    for k in keys
                ]
                print(f"{label:8s} {site:11s} {level:6s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
