"""A fold's chips as a map-style PyTorch ``Dataset``, for your own model and training loop.

The chips, windows and preparation are training's own: the fold's standardisation fitted on
its training chips, missing inputs imputed, the dense head's context around each chip, the
target encoded as the run's settings say, and NaN where a label may not be used (the test
buffer's pixel ring, with ``train.label_buffer: pixel``). ``dataset.preparation.target.decode``
turns a model's output back into Mg/ha.

    from torch.utils.data import DataLoader

    train = ChipDataset(config, fold=0, role="train")
    for x, y in DataLoader(train, batch_size=64, shuffle=True):
        ...  # x: (64, channels, w, w) float32, y: (64, size, size), NaN where unlabelled
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from agbcube.errors import ConfigError
from agbcube.folds import read_folds
from agbcube.train.data import RunData
from agbcube.train.plan import make_plan

__all__ = ["ROLES", "ChipDataset"]

ROLES = ("train", "val", "test", "pool")  # pool: every chip beyond the test buffer (refits)


class ChipDataset(Dataset):
    """The chips of fold ``fold`` in ``role``, prepared as training prepares them.

    Parameters
    ----------
    config : agbcube.config.Config
        Its ``cube``, ``chips``, ``folds`` and ``train`` sections (the bands, the context,
        the head, the target and the label buffer).
    fold : int
        The fold (0 … n_folds − 1).
    role : {"train", "val", "test", "pool"}
        Which of the fold's chips: ``train`` as the early-stopping fit trains on them (with
        ``train.label_buffer: pixel`` also the buffer ring's chips whose centres lie beyond the
        buffer, their nearer pixels masked), ``pool`` every chip beyond the test buffer (what
        the refits train on), ``val`` and ``test`` unmasked.
    folds : str or Path, optional
        The folds file (default ``config.folds.output``), checked against the cube.

    Attributes
    ----------
    chips : GeoDataFrame
        The dataset's chips, row ``i`` being item ``i``.
    preparation : agbcube.train.batches.Preparation
        The fold's standardisation and target transform.
    bands : list of str
        The cube's feature variables the inputs hold, in order.
    """

    def __init__(
        self, config: Any, *, fold: int, role: str = "train", folds: str | Path | None = None
    ) -> None:
        if role not in ROLES:
            raise ConfigError(f"role {role!r}: use one of {', '.join(ROLES)}")
        table = read_folds(folds or config.folds.output, cube=config.cube.output)
        plan = make_plan(config, table, device="cpu", data_path="device")
        run = RunData(config, None, plan, torch.device("cpu"), folds=table)
        if not 0 <= fold < run.n_folds:
            raise ConfigError(f"fold {fold}: the folds file has folds 0 to {run.n_folds - 1}")
        data = run.fold(fold)
        self.x, self.y, order = _prepared(run, data, *data.chips(role))
        self.chips = table.iloc[order].reset_index(drop=True)
        self.preparation, self.bands = data.prep, list(run.bands)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chip ``i``: its inputs ``(channels, w, w)`` and target (``(size, size)`` for the
        dense head, a scalar for the chip head), float32 tensors."""
        return torch.from_numpy(self.x[i]), torch.from_numpy(self.y[i])


def _prepared(run: Any, data: Any, positions: np.ndarray, mask: Any) -> tuple[Any, Any, Any]:
    """Inputs, targets and the table rows they are of, in the order the reader gives them."""
    mask_of = data.mask_of(positions, mask)
    xs, ys, rows = [], [], []
    for block in run.blocks(positions):
        xs.append(data.prep.inputs(block))
        ys.append(data.prep.targets(block, mask_of(block.positions)))
        rows.append(block.positions)
    x = np.concatenate(xs).astype(np.float32, copy=False)
    return x, np.concatenate(ys).astype(np.float32, copy=False), np.concatenate(rows)
