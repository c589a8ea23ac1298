"""ChipDataset: a fold's chips for your own loop, exactly as training prepares them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from agbcube.errors import ConfigError
from agbcube.train import ChipDataset


def test_the_dataset_holds_what_training_trains_on(demo_config, demo_folds):
    from agbcube.train.data import RunData
    from agbcube.train.plan import make_plan

    ds = ChipDataset(demo_config, fold=1, role="train")
    plan = make_plan(demo_config, demo_folds, device="cpu", data_path="device")
    run = RunData(demo_config, None, plan, torch.device("cpu"), folds=demo_folds)
    source = run.fold(1).source("train")  # what the training loop draws its batches from
    np.testing.assert_array_equal(ds.x, source.x.contiguous().numpy())
    np.testing.assert_array_equal(ds.y, source.y.numpy())
    # the training chips, and (label_buffer: pixel) the buffer ring's beyond the buffer
    assert sorted(ds.chips.chip_id) == sorted(demo_folds.iloc[run.fold(1).roles.train].chip_id)
    assert set(demo_folds[demo_folds.role_1 == "train"].chip_id) <= set(ds.chips.chip_id)
    assert ds.bands == run.bands and len(ds) == len(ds.chips)


def test_a_dataloader_batches_it(demo_config):
    ds = ChipDataset(demo_config, fold=0, role="test")
    x, y = next(iter(DataLoader(ds, batch_size=5, shuffle=True)))
    size, context = demo_config.chips.size, demo_config.train.context_px
    assert x.shape == (5, ds.x.shape[1], size + 2 * context, size + 2 * context)
    assert y.shape == (5, size, size) and x.dtype == y.dtype == torch.float32
    assert torch.isfinite(x).all()  # missing inputs imputed
    # the test chips' targets carry no label mask: only missing AGB is NaN
    agb = ds.preparation.target.decode(ds.y[np.isfinite(ds.y)])
    assert (agb >= 0).all() and np.isfinite(ds.y).mean() > 0.5


def test_roles_and_folds_are_checked(demo_config):
    with pytest.raises(ConfigError, match="role 'tests': use one of train, val, test, pool"):
        ChipDataset(demo_config, fold=0, role="tests")
    n = demo_config.folds.n_folds
    with pytest.raises(ConfigError, match=f"fold {n}: the folds file has folds 0 to {n - 1}"):
        ChipDataset(demo_config, fold=n)
