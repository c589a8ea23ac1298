"""A CV run's training work and rate: chip-epochs per second of its fits, from its task files.

Two CVs of the same configuration stop early at different epochs (seeds, rounding), so their
wall times differ with the work as much as with the speed; the rate (every fit's chips ×
epochs run, over the fits' seconds) compares speed alone. Also the median time of an epoch
per training chip (ms) over the fits, before and from the first hard-negative-mining epoch
(the first epoch, which holds any compile, left out), and the share of the run's task time
each kind of task took.

Usage::

    python bench/cv_rate.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml


def rate(run_dir: Path) -> dict:
    """Chip-epochs, seconds and their rate over the run's fits; seconds per task kind."""
    work = seconds = 0.0
    kinds: dict[str, float] = defaultdict(float)
    train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    hnm = train["hnm_start_epoch"] if train["hard_negative_mining"] else None
    per_chip: dict[str, list[float]] = {"before_mining": [], "mining": []}
    for path in sorted(run_dir.glob("fold_*/*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            if "summary" not in npz.files:
                continue
            summary = json.loads(str(npz["summary"]))
        kinds[summary["kind"]] += summary["seconds"]
        if summary["kind"] in ("select", "member"):
            work += summary["n_chips"] * summary["epochs_run"]
            seconds += summary["seconds"]
            for record in summary["history"][1:]:
                mining = hnm is not None and record["epoch"] >= hnm
                ms = 1e3 * record["seconds"] / summary["n_chips"]
                per_chip["mining" if mining else "before_mining"].append(ms)
    total = sum(kinds.values()) or 1.0
    return {
        "run": str(run_dir),
        "chip_epochs": int(work),
        "fit_seconds": round(seconds, 1),
        "chip_epochs_per_s": round(work / max(seconds, 1e-9), 1),
        "epoch_ms_per_chip": {k: round(float(np.median(v)), 3) for k, v in per_chip.items() if v},
        "task_share": {k: round(v / total, 3) for k, v in sorted(kinds.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    for run in parser.parse_args().runs:
        print(json.dumps(rate(run)))


if __name__ == "__main__":
    main()
