"""The model file: written atomically, read back safely and strictly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agbcube.chips import ChipGeometry
from agbcube.config import TrainConfig
from agbcube.errors import TrainingError
from agbcube.train.batches import Preparation, Standardiser, TargetTransform
from agbcube.train.loop import build_model
from agbcube.train.modelfile import (
    load_bundle,
    load_model,
    model_record,
    save_bundle,
    save_model,
)


def _record(**train):
    cfg = TrainConfig(conv_channels=[4, 8], context_px=2, **train)
    torch.manual_seed(0)
    model = build_model(cfg, 5, 12)
    prep = Preparation(
        Standardiser(np.arange(5, dtype=np.float32), np.ones(5, np.float32)),
        TargetTransform(log=False, mean=100.0, std=20.0),
        coordinates=False,
        per_chip=False,
        # two unpadded 3x3 convolutions: 2 px each side
        geometry=ChipGeometry(8, 8, context_px=2, reach_px=model.reach_px),
    )
    bands = ["a", "b", "c", "d", "e"]
    return model, model_record(model, prep, cfg, bands=bands, fold=1, member=2)


@pytest.mark.parametrize(
    "settings", [{}, {"bottleneck": 3}, {"separable": True}, {"bottleneck": 3, "separable": True}]
)
def test_a_model_file_round_trips(tmp_path, settings):
    model, record = _record(**settings)
    save_model(tmp_path / "m.pt", record)
    back = load_model(tmp_path / "m.pt")
    assert back.bands == ["a", "b", "c", "d", "e"] and (back.fold, back.member) == (1, 2)
    assert back.geometry == ChipGeometry(8, 8, context_px=2, reach_px=2)
    assert back.geometry.window_px == 12 and back.target.mean == 100.0
    x = torch.randn(3, 5, 12, 12)
    model.eval()
    torch.testing.assert_close(back.model(x), model(x))
    save_bundle(tmp_path / "e.pt", [record, record])
    assert len(load_bundle(tmp_path / "e.pt")) == 2


def test_unreadable_model_files_are_named(tmp_path):
    _, record = _record()
    path = tmp_path / "m.pt"
    save_model(path, record)
    path.write_bytes(path.read_bytes()[:2000])  # truncated
    with pytest.raises(TrainingError, match=r"m\.pt cannot be read \(it is truncated.*retrain"):
        load_model(path)
    path.write_text("not a model at all")
    with pytest.raises(TrainingError, match=r"m\.pt cannot be read \(it is truncated.*retrain"):
        load_bundle(path)
    with pytest.raises(TrainingError, match="does not exist"):
        load_model(tmp_path / "none.pt")


def test_model_files_holding_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    for load in (load_model, load_bundle):
        with pytest.raises(TrainingError, match="holds pickled Python objects") as caught:
            load(path)
        message = str(caught.value)
        assert "\n" not in message and "weights_only" not in message  # torch's advice is not ours


def test_model_files_are_validated_like_a_config(tmp_path):
    _, record = _record()
    bad = dict(record, train={**record["train"], "norm": "layer"})
    save_model(tmp_path / "bad.pt", bad)
    with pytest.raises(TrainingError, match="settings it records are invalid"):
        load_model(tmp_path / "bad.pt")
    wrong = dict(record, train={**record["train"], "conv_channels": [4, 16]})
    save_model(tmp_path / "wrong.pt", wrong)
    with pytest.raises(TrainingError, match="weights do not fit"):
        load_model(tmp_path / "wrong.pt")
    lacking = {k: v for k, v in record.items() if k != "bands"}
    save_model(tmp_path / "lacking.pt", lacking)
    with pytest.raises(TrainingError, match=r"lacks \['bands'\]"):
        load_model(tmp_path / "lacking.pt")
