"""Issue 21's lever table: accuracy over seeds and the training work of each variant.

Reads the run directories that ``bench/ablations.py`` wrote (``OUTPUT/runs/<variant>-s<seed>``)
and reports, per variant, the per-site chip and pixel R² (mean and range over seeds), the
wall time of each run, and the work it did: *chip-epochs*, the chips the fits trained on
times their epochs (plus one third for each hard-negative-mining pass, a forward pass over the
training chips). Work does not depend on what else the machine was doing, where wall time
does; on a quiet machine wall time follows it.

Usage::

    python bench/levers.py /work/abl/speed2 /work/abl/speed3 ... [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import summarise

from agbcube.config import load_run_config
from agbcube.train.tasks import load_result


def run_work(run: Path) -> dict[str, float]:
    """Chip-epochs trained and forward-only mining passes, over every fit of a run."""
    tcfg = load_run_config(run).train
    trained = mining = 0.0
    for path in run.glob("fold_*/*.npz"):
        summary = load_result(path)[0]
        epochs = len(summary.get("history") or [])
        if not epochs:
            continue
        trained += summary["n_chips"] * epochs
        if tcfg.hard_negative_mining:
            mining += summary["n_chips"] * max(0, epochs - tcfg.hnm_start_epoch)
    return {"chip_epochs": trained, "mining_chip_passes": mining, "work": trained + mining / 3}


def variant_rows(outputs: list[Path]) -> dict[str, dict]:
    """Per variant: its seeds, wall times, work and the primary model's per-site R² lists."""
    rows: dict[str, dict] = {}
    for out in outputs:
        for name, run in summarise(out)["runs"].items():
            if "-s" not in name:
                continue
            variant, seed = name.rsplit("-s", 1)
            row = rows.setdefault(variant, {"seeds": [], "wall_s": [], "work": [], "r2": {}})
            row["seeds"].append(int(seed))
            row["wall_s"].append(run["wall_s"])
            row["work"].append(run_work(out / "runs" / name)["work"])
            for level, sites in run[run["primary"]].items():
                for site, v in sites.items():
                    row["r2"].setdefault(level, {}).setdefault(site, []).append(v["r2"])
    return rows


def markdown(rows: dict[str, dict]) -> str:
    lines = [
        "| variant | seeds | chip R² Acha / Betul / Khaoyai (mean, range) "
        "| pixel R² (mean, range) | work (k chip-epochs) | wall s (mean) |",
        "|---|---|---|---|---|---|",
    ]

    def cells(level: dict[str, list[float]]) -> str:
        return " / ".join(
            f"{np.mean(v):.3f} ({max(v) - min(v):.2f})" for _, v in sorted(level.items())
        )

    for name, row in rows.items():
        lines.append(
            f"| {name} | {len(row['seeds'])} | {cells(row['r2']['chip'])} | "
            f"{cells(row['r2']['pixel'])} | {np.mean(row['work']) / 1e3:.0f} | "
            f"{np.mean(row['wall_s']):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outputs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = variant_rows(args.outputs)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
