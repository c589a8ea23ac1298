"""Compare two run directories: chip predictions, scored pixels, members' weights, R².

Used to check that a change of the training code keeps a run's results (issue 19): run the
same config with the old and the new code, then::

    python bench/compare_runs.py OLD_RUN NEW_RUN

Runs of agbcube before the reshaped training (``fold_k/model.pt``, ``fold_k/pixels.parquet``)
compare with runs after it (``fold_k/model_m.pt``, ``pixels.parquet``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def pixels(run: Path) -> pd.DataFrame:
    if (run / "pixels.parquet").exists():
        return pd.read_parquet(run / "pixels.parquet")
    parts = sorted(run.glob("fold_*/pixels.parquet"), key=lambda p: int(p.parent.name[5:]))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def members(run: Path) -> dict[tuple[int, int], dict]:
    out = {}
    for path in run.glob("fold_*/model*.pt"):
        k = int(path.parent.name[5:])
        m = 0 if path.stem == "model" else int(path.stem.split("_")[1])
        out[(k, m)] = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    return out


def main() -> None:
    old, new = Path(sys.argv[1]), Path(sys.argv[2])
    a, b = (
        pd.read_parquet(old / "predictions.parquet"),
        pd.read_parquet(new / "predictions.parquet"),
    )
    print(f"chip rows {len(a)} / {len(b)}; identical: {a.equals(b)}")
    for col in a.columns:
        if not a[col].equals(b[col]) and a[col].dtype.kind == "f":
            print(f"  {col}: max abs difference {np.nanmax(np.abs(a[col] - b[col])):.3g}")
    pa, pb = pixels(old), pixels(new)
    print(f"pixels {len(pa)} / {len(pb)}; identical: {pa.equals(pb)}")
    wa, wb = members(old), members(new)
    same = [k for k in wa if k in wb and all(torch.equal(wa[k][n], wb[k][n]) for n in wa[k])]
    print(f"members with identical weights: {len(same)} of {len(wa)}")
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (old, new))
    for model in ma["models"]:
        for level in ("chip", "pixel"):
            ra, rb = (
                {s: v["r2"] for s, v in m["models"][model][level]["mg_ha"]["per_site"].items()}
                for m in (ma, mb)
            )
            print(f"{model} {level} R²: {'identical' if ra == rb else f'{ra} vs {rb}'}")
    if "random_cv" in ma:
        print(
            "random_cv identical:", ma["random_cv"]["chip"] == mb.get("random_cv", {}).get("chip")
        )


if __name__ == "__main__":
    main()
