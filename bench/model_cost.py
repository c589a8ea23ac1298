"""Issue 21: what a dense head's width costs per training chip, and bf16 autocast on the CPU.

For each candidate ``conv_channels`` this builds the model exactly as ``agbcube train`` does
(the default head, 108 bands, a 24-px chip plus the context its convolutions reach), counts
its multiply-adds per window, and measures its training rate (forward + backward + AdamW
step, batch 16, random data; best of ``--repeats``), in float32 and under bfloat16 autocast.
The original pipeline's CNN is measured beside it, the rate that scales its 482 s anchor
(``bench/train_cv.py``).

Usage::

    python bench/model_cost.py [--device cpu] [--repeats 3] [--no-bf16] [--only 0 6 8]
        [--results PATH.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_cv import model_rate, original_rate

from agbcube.config import TrainConfig
from agbcube.train.loop import build_model
from agbcube.train.plan import resolve_device

#: train settings of each candidate: the conv blocks' widths, the 1×1 input bottleneck and
#: depthwise-separable blocks
CANDIDATES = (
    {"conv_channels": [32, 64, 128]},
    {"conv_channels": [32, 48, 64]},
    {"conv_channels": [32, 32, 64]},
    {"conv_channels": [16, 32, 64]},
    {"conv_channels": [32, 32]},
    {"conv_channels": [32, 32, 64], "bottleneck": 32},
    {"conv_channels": [32, 32, 64], "bottleneck": 16},
    {"conv_channels": [32, 64, 128], "bottleneck": 16},
    {"conv_channels": [32, 32, 64], "bottleneck": 16, "separable": True},
    {"conv_channels": [32, 64, 128], "bottleneck": 16, "separable": True},
    {"conv_channels": [32, 64, 128], "separable": True},
)
BANDS, CHIP = 108, 24


def multiply_adds(model: torch.nn.Module, size: int) -> int:
    """Multiply-adds of one forward pass of one ``size``² window (convolutions only)."""
    total = 0

    def count(module, _inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += k * output.shape[1] * output.shape[2] * output.shape[3]

    hooks = [
        m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, BANDS, size, size))
    for h in hooks:
        h.remove()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--results", default=None)
    parser.add_argument("--no-bf16", action="store_true", help="fp32 only")
    parser.add_argument(
        "--only", type=int, nargs="+", default=None, help="these candidates (0-based) only"
    )
    args = parser.parse_args()
    precisions = (("fp32", False),) if args.no_bf16 else (("fp32", False), ("bf16", True))
    device = resolve_device(args.device)
    rows = []
    chosen = CANDIDATES if args.only is None else [CANDIDATES[i] for i in args.only]
    for settings in chosen:
        cfg = TrainConfig(**settings)
        size = CHIP + 2 * len(cfg.conv_channels)  # the default context: what the blocks reach
        rates = {
            name: max(
                model_rate(cfg, BANDS, size, 16, device, args.seconds, bf16=bf16)
                for _ in range(args.repeats)
            )
            for name, bf16 in precisions
        }
        macs = multiply_adds(build_model(cfg, BANDS, size), size)
        rows.append({**settings, "window": size, "mmac": macs / 1e6, **rates})
        name = f"{cfg.conv_channels}" + (f" bn{cfg.bottleneck}" if cfg.bottleneck else "")
        name += " sep" if cfg.separable else ""
        bf16_note = f"  bf16 {rates['bf16']:6.0f} chips/s" if "bf16" in rates else ""
        print(
            f"{name:20} {macs / 1e6:6.1f} M MAC  fp32 {rates['fp32']:6.0f} chips/s{bf16_note}",
            flush=True,
        )
    original = max(original_rate(device) for _ in range(args.repeats))
    print(f"original CNN     fp32 {original:6.0f} samples/s", flush=True)
    bf16_native = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    out = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {device}",
        "cpu_bf16_native": bf16_native,
        "rows": rows,
        "original_cnn_samples_per_s": original,
    }
    path = Path(args.results or f"bench/results/model_cost_{device.type}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
