"""A model's CPU training rate in this process and in Dask worker processes.

Dask's nanny starts each worker with ``MALLOC_TRIM_THRESHOLD_=65536``; any value of it turns
off glibc's adaptive mmap threshold, so every activation tensor above 128 KiB is mapped and
unmapped afresh each step. This measures what that costs a fit (forward + backward + AdamW,
batch 16, random data, :func:`train_cv.model_rate`) and what one-thread workers give against
one process with every core's thread:

* in this process: all threads, then one;
* one LocalCluster worker with one thread, started as dask starts it, then as
  ``agbcube train --scheduler local`` does (:func:`agbcube.train.cluster.untrimmed_workers`);
* two such workers at once (the sum of their rates).

Each measurement starts its cluster in a fresh interpreter (a nanny leaks the variable into
the process that starts it).

Usage::

    python bench/worker_rate.py [--seconds 6] [--results bench/results/worker_rate_cpu.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: the models: configs/fast.yaml's and the defaults'
MODELS = {
    "bn16 32-32-64": {"conv_channels": [32, 32, 64], "bottleneck": 16},
    "32-64-128 (default)": {"conv_channels": [32, 64, 128]},
}
BANDS, WINDOW, BATCH = 108, 30, 16


def rate(settings: dict, seconds: float, threads: int | None = None) -> float:
    """Training chips/s of the model ``settings`` describe, with ``threads`` torch threads."""
    import torch

    sys.path.insert(0, str(HERE))
    from train_cv import model_rate

    from agbcube.config import TrainConfig

    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(**settings)
    return model_rate(cfg, BANDS, WINDOW, BATCH, torch.device("cpu"), seconds)


def on_workers(settings: dict, seconds: float, n_workers: int, untrimmed: bool) -> list[float]:
    """The rate in each of ``n_workers`` one-thread LocalCluster workers, run at once."""
    from distributed import Client, LocalCluster

    from agbcube.train.cluster import untrimmed_workers

    kw = {"n_workers": n_workers, "threads_per_worker": 1, "dashboard_address": ":0"}
    env = untrimmed_workers() if untrimmed else contextlib.nullcontext()
    with env, LocalCluster(processes=True, **kw) as cluster, Client(cluster) as client:
        futures = [client.submit(rate, settings, seconds, 1, pure=False) for _ in range(n_workers)]
        return [round(f.result(), 1) for f in futures]


def _child(args: argparse.Namespace) -> None:
    settings = MODELS[args.model]
    print(json.dumps(on_workers(settings, args.seconds, args.workers, args.untrimmed)))


def _in_fresh_process(model: str, seconds: float, workers: int, untrimmed: bool) -> list[float]:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--seconds", str(seconds)]
    cmd += ["--workers", str(workers)] + (["--untrimmed"] if untrimmed else [])
    from agbcube.train.cluster import TRIM_ENV

    env = {k: v for k, v in os.environ.items() if k != TRIM_ENV}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--results", default="bench/results/worker_rate_cpu.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--untrimmed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    import torch

    threads = torch.get_num_threads()
    rows = []
    for name, settings in MODELS.items():
        row = {
            "model": name,
            f"process_{threads}_threads": round(rate(settings, args.seconds, threads), 1),
            "process_1_thread": round(rate(settings, args.seconds, 1), 1),
        }
        torch.set_num_threads(threads)
        row["worker_dask_default"] = _in_fresh_process(name, args.seconds, 1, False)[0]
        row["worker_untrimmed"] = _in_fresh_process(name, args.seconds, 1, True)[0]
        two = _in_fresh_process(name, args.seconds, 2, True)
        row["two_workers_untrimmed"] = two
        row["two_workers_sum"] = round(sum(two), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cpus, torch {torch.__version__}",
        "batch": BATCH,
        "window": WINDOW,
        "rows": rows,
    }
    Path(args.results).write_text(json.dumps(out, indent=1) + "\n")
    print(f"written {args.results}")


if __name__ == "__main__":
    main()
