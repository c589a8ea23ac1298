"""Cross-validation wall time, side by side with the original pipeline's, in one run.

The original pipeline's 5-fold CV took 482 s on a 2-core CPU where its CNN trained at 420
samples/s (forward + backward + step, batch 16), and 181 s on one H100. To compare on another
machine without rerunning it, this script measures that CNN's training rate here (the
original protocol's model: chip head, instance norm, lon/lat channels, the benchmark's 108
bands) and scales the 482 s by it: ``anchor_s = 482 × 420 / rate``. Then it times
``agbcube train`` on the benchmark sites, each configuration in turn, and reports each CV's
wall time against the anchor, with its per-site R².

Usage::

    python bench/train_cv.py [--configs configs/benchmark.yaml configs/original.yaml]
        [--device cpu] [--seeds 0] [--output /tmp/agbcube-bench-train] [--rate-only]
        [--scheduler local --threads-per-task 1] [--train compile=false ...]

``--train KEY=VALUE``: a ``train`` setting for every configuration (the value read as YAML),
e.g. ``--train compile=true`` to time the compiled steps on a GPU.

Writes ``bench/results/train_cv_<device>.json`` (or ``--results``), again after each CV, so a
benchmark stopped part-way keeps the CVs it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import yaml

from agbcube.config import TrainConfig, load_config, with_overrides
from agbcube.train import run_cv
from agbcube.train.loop import build_model
from agbcube.train.plan import resolve_device

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_CPU_S, ORIGINAL_RATE = 482.0, 420.0  # its CV and its CNN's samples/s, same machine
ORIGINAL_H100_S = 181.0


def model_rate(
    cfg: TrainConfig,
    in_channels: int,
    size: int,
    batch: int,
    device,
    seconds: float = 5.0,
    bf16: bool = False,
) -> float:
    """Training samples/s of the model ``cfg`` describes, on random data (fwd+bwd+step);
    ``bf16``: the forward pass under bfloat16 autocast."""
    torch.manual_seed(0)
    model = build_model(cfg, in_channels, size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, in_channels, size, size, device=device)
    n, t0 = 0, None
    while t0 is None or time.perf_counter() - t0 < seconds:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t0 is None:  # the first step warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            continue
        n += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def original_rate(device) -> float:
    """The original protocol's CNN (``configs/original.yaml``'s train settings) at batch 16."""
    cfg = load_config(ROOT / "configs" / "original.yaml").train
    return model_rate(cfg, 108 + 2, 24, 16, device)


def time_config(
    path: str,
    device: str,
    seed: int,
    output: Path,
    epochs: int | None = None,
    scheduler: str | None = None,
    threads_per_task: int | None = None,
    train: dict | None = None,
) -> dict:
    cfg = load_config(path)
    tcfg = with_overrides(cfg.train, "train", **{**(train or {}), "seed": seed})
    cfg = cfg.model_copy(update={"train": tcfg})
    t0 = time.perf_counter()
    metrics = run_cv(
        cfg,
        device=device,
        epochs=epochs,
        output=output,
        overwrite=True,
        plots=False,
        scheduler=scheduler,
        threads_per_task=threads_per_task,
    )
    wall = time.perf_counter() - t0
    primary = metrics["primary_model"]
    per_site = {
        level: {
            s: round(m["r2"], 4)
            for s, m in metrics["models"][primary][level]["mg_ha"]["per_site"].items()
        }
        for level in ("chip", "pixel")
    }
    tasks = sorted(output.glob("fold_*/*.npz"))
    return {
        "config": str(path),
        "train": train or {},
        "seed": seed,
        "scheduler": scheduler or "sequential",
        "wall_s": round(wall, 1),
        "r2": per_site,
        "n_tasks": len(tasks),
        "epochs": {
            k: v.get("refit_epochs", v.get("epochs_run")) for k, v in metrics["folds"].items()
        },
    }


def write_results(path: Path, result: dict) -> None:
    """Write the results through a temporary file and a rename: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[str(ROOT / "configs" / "benchmark.yaml"), str(ROOT / "configs" / "original.yaml")],
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="cap (a quick smoke test)")
    parser.add_argument("--output", type=Path, default=Path("/tmp/agbcube-bench-train"))
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--rate-only", action="store_true", help="only the original's rate")
    parser.add_argument("--scheduler", default=None, help="agbcube train --scheduler")
    parser.add_argument("--threads-per-task", type=int, default=None)
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    train = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.train)}
    device = resolve_device(args.device)
    rate = original_rate(device)
    anchor = ORIGINAL_CPU_S * ORIGINAL_RATE / rate
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {device}",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "original_cnn_samples_per_s": round(rate, 1),
        "original_cv_anchor_s": round(anchor, 1),
        "runs": [],
    }
    print(f"original CNN here: {rate:.0f} samples/s at batch 16 → its CV ≈ {anchor:.0f} s")
    results = args.results or ROOT / "bench" / "results" / f"train_cv_{device.type}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    write_results(results, result)  # the anchor, then again after each CV: a stopped run keeps them
    for path in [] if args.rate_only else args.configs:
        for seed in args.seeds:
            out = args.output / f"{Path(path).stem}-{seed}"
            run = time_config(
                path,
                args.device,
                seed,
                out,
                args.epochs,
                args.scheduler,
                args.threads_per_task,
                train,
            )
            run["vs_original"] = round(run["wall_s"] / anchor, 2)
            if device.type == "cuda":
                run["vs_original_h100"] = round(run["wall_s"] / ORIGINAL_H100_S, 3)
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            write_results(results, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
