"""Wall time of the full 5-fold cross-validation on the benchmark sites, original protocol.

The original pipeline's protocol: 24-px chips with 10 % overlap, batch 16, at most 100 epochs,
patience 20, Huber loss, augmentation, hard-negative mining and test-time augmentation (the
defaults of ``train``, used whatever the config's ``train`` section says). Besides the wall
time it reports the model's pure compute: the forward+backward+step throughput of the same
network on random data at the same batch size, times the number of training samples the run
processed; the gap between the two is everything that is not model compute (data path,
validation, mining passes, checkpoints, I/O).

Anchors (BENCHMARKS.md): the original pipeline took 482 s on this 2-core CPU and 181 s on one
H100; its forward+backward+step ran at 420 samples/s at batch 16 here.

Usage::

    python bench/train_cv.py [--config configs/benchmark.yaml] [--device cpu] [--epochs 100]

Writes ``bench/results/train_cv_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from agbcube.config import TrainConfig, load_config
from agbcube.train import run_cv
from agbcube.train.loop import build_model, resolve_device

ROOT = Path(__file__).resolve().parents[1]


def model_throughput(cfg, in_channels: int, size: int, batch: int, device, seconds: float = 5.0):
    """Samples/s of forward + backward + AdamW step, on random data, after a warm-up."""
    torch.manual_seed(0)
    model = build_model(cfg, in_channels, size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, in_channels, size, size, device=device)
    y = torch.randn(batch, device=device)
    for _ in range(5):
        loss = torch.nn.functional.huber_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loss = torch.nn.functional.huber_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "benchmark.yaml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--output", default="/tmp/agbcube-bench-train")
    args = parser.parse_args()

    cfg = load_config(args.config)
    # The original protocol is train's defaults, whatever the config's own train section says.
    protocol = TrainConfig(baseline="none", output=cfg.train.output)
    cfg = cfg.model_copy(update={"train": protocol})
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    metrics = run_cv(
        cfg, device=args.device, epochs=args.epochs, output=args.output, overwrite=True, plots=False
    )
    wall = time.perf_counter() - t0
    folds = metrics["folds"]
    samples = 0
    for k, info in folds.items():
        hist = json.loads((Path(args.output) / f"fold_{k}" / "DONE").read_text())["history"]
        samples += info["n_train"] * len(hist)
    import pandas as pd

    chips = pd.read_parquet(Path(args.output) / "folds.parquet")
    n_bands = metrics["run"].get("n_bands")
    if n_bands is None:
        member = torch.load(Path(args.output) / "fold_0" / "model.pt", weights_only=False)
        n_bands = member["in_channels"]
    throughput = {
        b: model_throughput(cfg.train, n_bands, cfg.chips.size, b, device) for b in (16, 256)
    }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {device}",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "wall_s": wall,
        "cv_s_in_run": metrics["run"]["wall_s"],
        "training_samples": samples,
        "model_samples_per_s": throughput,
        "pure_compute_s_at_batch": samples / throughput[cfg.train.batch_size]
        if cfg.train.batch_size in throughput
        else None,
        "n_chips": len(chips),
        "epochs_per_fold": {k: v["epochs_run"] for k, v in folds.items()},
        "per_site_chip_r2": {
            s: m["r2"]
            for s, m in metrics["models"]["cnn-coordinate"]["chip"]["mg_ha"]["per_site"].items()
        },
    }
    out = ROOT / "bench" / "results" / f"train_cv_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
