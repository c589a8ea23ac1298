"""Same model, faster steps: the training step's rate under accuracy-neutral levers.

The default configuration's model (108 bands + 2 coordinate channels, a 24-px chip with the
context its convolutions reach, the default batch) trains on random data (forward + backward +
gradient clipping + AdamW step, as ``agbcube train``'s loop does) under each variant, best of
``--repeats`` timings of ``--seconds`` each after a warm-up (which holds a compile's cost,
reported apart):

* ``eager``: the loop as it is (AdamW's default implementation on this device);
* ``foreach`` / ``fused``: AdamW's multi-tensor and fused kernels;
* ``compile``: ``torch.compile`` of the model (inductor; C++/OpenMP on the CPU), with fused AdamW;
* ``eval no_grad`` / ``eval inference_mode``: a validation pass (batch 512) under each mode;
* ``eval inference_mode, batch N``: the same pass in batches of N (``--eval-batches``);
* ``tta loop`` / ``tta stacked``: test-time augmentation over 4 dihedral transforms of 512
  chips, as `agbcube.train.loop.predict` runs it (a forward pass per transform, batches of
  64) or with the transforms stacked into one forward pass (batches of 16 chips × 4).

Usage::

    python bench/step_levers.py [--config configs/fast.yaml] [--device cpu] [--seconds 8]
        [--repeats 2] [--only eager fused] [--results bench/results/step_levers.json]

``--config``: the model of a config's ``train`` section (default: the defaults').
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine

from agbcube.config import TrainConfig, load_config
from agbcube.train.loop import build_model
from agbcube.train.model import dihedral
from agbcube.train.plan import resolve_device

BANDS, CHIP = 108 + 2, 24
TRAIN_VARIANTS = {
    "eager": {"optim": {}, "compile": False},
    "foreach": {"optim": {"foreach": True}, "compile": False},
    "fused": {"optim": {"fused": True}, "compile": False},
    "compile": {"optim": {"fused": True}, "compile": True},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step: Any, device: torch.device, seconds: float, repeats: int) -> float:
    """Best rate (calls/s) of ``step`` over ``repeats`` windows of ``seconds``."""
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()
            n += 1
        _sync(device)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def train_rate(variant: dict, cfg: TrainConfig, device: torch.device, args: Any) -> dict:
    """Chips/s of training steps under ``variant``, and its warm-up (compile) time."""
    torch.manual_seed(0)
    size = CHIP + 2 * cfg.reach_px
    model = build_model(cfg, BANDS, size).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **variant["optim"])
    forward = torch.compile(model) if variant["compile"] else model
    x = torch.randn(cfg.batch_size, BANDS, size, size, device=device)

    def step() -> None:
        loss = forward(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    _sync(device)
    warmup = time.perf_counter() - t0
    rate = _timed(step, device, args.seconds, args.repeats) * cfg.batch_size
    return {"chips_per_s": round(rate, 1), "warmup_s": round(warmup, 2)}


def eval_rate(
    mode: str, cfg: TrainConfig, device: torch.device, args: Any, batch: int = 512
) -> dict:
    """Chips/s of a validation pass over 512 chips in batches of ``batch``, under
    ``torch.no_grad`` or ``inference_mode``."""
    torch.manual_seed(0)
    size = CHIP + 2 * cfg.reach_px
    model = build_model(cfg, BANDS, size).to(device).eval()
    x = torch.randn(512, BANDS, size, size, device=device)
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad

    def step() -> None:
        with context():
            for start in range(0, 512, batch):
                model(x[start : start + batch])

    step()
    return {"chips_per_s": round(_timed(step, device, args.seconds, args.repeats) * 512, 1)}


def tta_rate(stacked: bool, cfg: TrainConfig, device: torch.device, args: Any) -> dict:
    """Chips/s of 4-transform test-time augmentation over 512 chips (see the module doc)."""
    torch.manual_seed(0)
    size = CHIP + 2 * cfg.reach_px
    model = build_model(cfg, BANDS, size).to(device).eval()
    x = torch.randn(512, BANDS, size, size, device=device)
    batch = 16 if stacked else 64

    def step() -> None:
        with torch.inference_mode():
            for start in range(0, 512, batch):
                xb = x[start : start + batch]
                if stacked:
                    model(torch.cat([dihedral(xb, k) for k in range(4)]))
                else:
                    for k in range(4):
                        model(dihedral(xb, k))

    step()
    return {"chips_per_s": round(_timed(step, device, args.seconds, args.repeats) * 512, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--eval-batches", nargs="*", type=int, default=[16, 64, 128])
    parser.add_argument("--results", type=Path, default=Path("bench/results/step_levers.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = load_config(args.config).train if args.config else TrainConfig()
    results: dict[str, Any] = {}
    for name, variant in TRAIN_VARIANTS.items():
        if args.only is None or name in args.only:
            results[name] = train_rate(variant, cfg, device, args)
            print(name, results[name], flush=True)
    for mode in ("no_grad", "inference_mode"):
        if args.only is None or f"eval_{mode}" in args.only:
            results[f"eval {mode}"] = eval_rate(mode, cfg, device, args)
            print(f"eval {mode}", results[f"eval {mode}"], flush=True)
    for batch in args.eval_batches:
        name = f"eval inference_mode, batch {batch}"
        if args.only is None or "eval_batch" in args.only:
            results[name] = eval_rate("inference_mode", cfg, device, args, batch)
            print(name, results[name], flush=True)
    for stacked in (False, True):
        name = "tta stacked" if stacked else "tta loop"
        if args.only is None or "tta" in args.only:
            results[name] = tta_rate(stacked, cfg, device, args)
            print(name, results[name], flush=True)
    out = {
        "machine": machine(device=str(device), torch=torch.__version__),
        "config": str(args.config) if args.config else "defaults",
        "results": results,
    }
    args.results.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
