"""Where one fit's time goes: torch.profiler over the training loop, eager and compiled.

One fit of the default configuration's model (or ``--config``'s) on synthetic chips of the
benchmark's shape (110 input channels, 24-px chips with the context the convolutions reach,
``--chips`` training and a sixth as many validation chips), for ``--epochs`` epochs with
hard-negative mining from the second epoch, as ``agbcube train``'s loop runs it: sampling,
augmentation, steps, the mining pass, validation. Each variant fits once unprofiled first (so
a compile is not in the profile: its time is reported apart), then once under the profiler.
Prints and writes the top operators by self CPU time and the fit's wall time.

Usage::

    python bench/profile_fit.py [--config configs/fast.yaml] [--chips 200] [--epochs 4]
        [--top 12] [--results bench/results/profile_fit.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine

from agbcube.config import TrainConfig, load_config, with_overrides
from agbcube.train.batches import DeviceBatches
from agbcube.train.loop import build_model, fit

BANDS, CHIP = 110, 24


def _data(cfg: TrainConfig, n: int, seed: int) -> DeviceBatches:
    """``n`` chips of random inputs and a target that depends on them (dense or per chip)."""
    rng = np.random.default_rng(seed)
    size = CHIP + 2 * cfg.reach_px
    x = rng.normal(size=(n, BANDS, size, size)).astype(np.float32)
    m = cfg.reach_px
    signal = x[:, :8, m : size - m, m : size - m].mean(axis=1)
    y = signal if cfg.head == "dense" else signal.mean(axis=(1, 2))
    return DeviceBatches(x, y.astype(np.float32), "cpu")


def _fit(cfg: TrainConfig, train: DeviceBatches, val: DeviceBatches) -> float:
    torch.manual_seed(0)
    model = build_model(cfg, BANDS, CHIP + 2 * cfg.reach_px)
    t0 = time.perf_counter()
    fit(model, train, val, cfg, n_spectral=BANDS - 2, seed=0)
    return time.perf_counter() - t0


def profile_variant(cfg: TrainConfig, args: Any) -> dict[str, Any]:
    """The fit's wall time (first, with any compile; then profiled) and its top operators."""
    train, val = _data(cfg, args.chips, 0), _data(cfg, max(args.chips // 6, 2), 1)
    first = _fit(cfg, train, val)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        again = _fit(cfg, train, val)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = [
        {
            "operator": e.key,
            "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3),
            "share": round(e.self_cpu_time_total / total, 3),
            "calls": e.count,
        }
        for e in events[: args.top]
    ]
    return {"first_fit_s": round(first, 2), "profiled_fit_s": round(again, 2), "top": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--chips", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--results", type=Path, default=Path("bench/results/profile_fit.json"))
    args = parser.parse_args()
    base = load_config(args.config).train if args.config else TrainConfig()
    base = with_overrides(base, "train", epochs=args.epochs, hnm_start_epoch=1, patience=100)
    results = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        cfg = with_overrides(base, "train", compile=compiled)
        results[name] = profile_variant(cfg, args)
        print(f"\n{name}: first fit {results[name]['first_fit_s']} s, "
              f"profiled fit {results[name]['profiled_fit_s']} s")  # fmt: skip
        for row in results[name]["top"]:
            print(f"  {row['share']:6.1%}  {row['self_cpu_s']:8.3f} s  {row['operator']}")
    out = {
        "machine": machine(device="cpu", torch=torch.__version__),
        "config": str(args.config) if args.config else "defaults",
        "chips": args.chips,
        "epochs": args.epochs,
        "results": results,
    }
    args.results.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
