"""Benchmark: `folds` and `train` on a LocalCluster against the sequential run (issue 20).

A hand-run benchmark, not a test. For each factor ``k`` (``--factors``, default 1,16) it
writes the scaling benchmark's config with ``k`` copies of the three benchmark sites
(``bench/scaling.py``: ``3 k`` sites, each copy reading the same rasters under its own name),
builds its cube (not timed), then times, each in a fresh CLI process:

1. ``agbcube folds CFG --no-maps -q`` (in process, the threads scheduler), then again with
   ``--scheduler local`` (a LocalCluster: one task per site); the two folds files must be
   equal;
2. ``agbcube train CFG --device cpu --epochs E -q`` (``patience`` = E: every early-stopped fit
   trains E epochs), then again with ``--scheduler local`` (one worker process per core × 1
   thread, 1 torch thread per task) into another run directory.

The sequential train uses torch's default thread count (one per core), as a user's run would:
the two runs are not bit-identical (that needs equal thread counts; the tests check it), so
the script reports how far their metrics differ. Each run's task result files give the
per-task ``seconds``, summed per kind (select / member / baseline / random), which the
BENCHMARKS paper estimate scales.

Before each timed command the script waits (up to ``--wait-max`` s, checking every 60 s)
until ``uptime``'s 1-minute load average is below ``--max-load``: the machine is shared. It
records the load seen at each start.

Command line
------------
::

    python bench/cluster.py --factors 1,16 --epochs 2     # bench/results/cluster.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from scaling import run, run_factors, write_config  # noqa: E402


def wait_for_quiet(max_load: float, wait_max: float) -> dict[str, Any]:
    """Wait until the 1-minute load average is below ``max_load`` (or ``wait_max`` s)."""
    t0 = time.time()
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.time() - t0 >= wait_max:
            return {"load_1min": round(load, 2), "waited_s": round(time.time() - t0)}
        print(f"  load {load:.2f} >= {max_load}: waiting", file=sys.stderr, flush=True)
        time.sleep(60)


def timed(cmd: list[str], args: argparse.Namespace) -> dict[str, Any]:
    quiet = wait_for_quiet(args.max_load, args.wait_max)
    print("  $ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    return {**run(cmd), **quiet}


def task_seconds(run_dir: Path) -> dict[str, Any]:
    """Per-task seconds from a run's result files, summed and counted per kind."""
    import numpy as np

    out: dict[str, Any] = {}
    for path in sorted(run_dir.glob("*/*.npz")):
        with np.load(path) as npz:
            summary = json.loads(str(npz["summary"]))
        kind = "random" if path.parent.name == "random_cv" else summary.get("kind", "?")
        agg = out.setdefault(kind, {"n": 0, "seconds": 0.0, "max_s": 0.0})
        agg["n"] += 1
        agg["seconds"] = round(agg["seconds"] + summary["seconds"], 2)
        agg["max_s"] = round(max(agg["max_s"], summary["seconds"]), 2)
    return out


def metric_gap(a: Path, b: Path) -> float | None:
    """Largest difference in per-site chip R² (every model) between two runs."""
    try:
        ma = json.loads((a / "metrics.json").read_text())["models"]
        mb = json.loads((b / "metrics.json").read_text())["models"]
    except (OSError, KeyError):
        return None

    def r2(models: dict, m: str, s: str) -> float:
        return models[m]["chip"]["mg_ha"]["per_site"][s]["r2"]

    gaps = [
        abs(r2(ma, m, s) - r2(mb, m, s)) for m in ma for s in ma[m]["chip"]["mg_ha"]["per_site"]
    ]
    return round(max(gaps), 4)


def same_folds(a: Path, b: Path) -> bool:
    import pandas as pd

    return pd.read_parquet(a).equals(pd.read_parquet(b))


def bench_factor(k: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = write_config(args.workdir, k, args.epochs)
    out = cfg.parent
    agb = [sys.executable, "-m", "agbcube.cli"]
    row: dict[str, Any] = {"factor": k, "sites": 3 * k}
    if not (out / "cube.zarr").exists():
        row["build_cube"] = run([*agb, "build-cube", str(cfg), "-q"])
    local = ["--scheduler", "local"]
    if "folds" in args.stages:
        row["folds_seq"] = timed([*agb, "folds", str(cfg), "--no-maps", "-q"], args)
        shutil.copyfile(out / "folds.parquet", out / "folds_seq.parquet")
        row["folds_cluster"] = timed([*agb, "folds", str(cfg), "--no-maps", "-q", *local], args)
        row["folds_equal"] = same_folds(out / "folds_seq.parquet", out / "folds.parquet")
    if "train" in args.stages:
        train = [*agb, "train", str(cfg), "--device", "cpu", "--epochs", str(args.epochs)]
        train += ["-q", "--overwrite"]
        row["train_seq"] = timed([*train, "--output", str(out / "run_seq")], args)
        row["train_cluster"] = timed(
            [*train, "--output", str(out / "run_cluster"), *local, "--threads-per-task", "1"],
            args,
        )
        row["tasks_seq"] = task_seconds(out / "run_seq")
        row["tasks_cluster"] = task_seconds(out / "run_cluster")
        row["chip_r2_max_gap"] = metric_gap(out / "run_seq", out / "run_cluster")
        import pandas as pd

        row["chips"] = len(pd.read_parquet(out / "folds.parquet", columns=["chip_id"]))
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--factors", default="1,16")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--stages", default="folds,train")
    p.add_argument("--max-load", type=float, default=1.2)
    p.add_argument("--wait-max", type=float, default=45 * 60)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/agbcube-bench-cluster"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "cluster.json")
    args = p.parse_args(argv)
    rows = run_factors(bench_factor, args)
    print(json.dumps(rows, indent=2))
    print(f"\nresults: {args.results}")


if __name__ == "__main__":
    main()
