"""Training one model: learning, early stopping, mining, resume, divergence."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from agbcube.config import TrainConfig
from agbcube.errors import TrainingError
from agbcube.train.batches import DeviceBatches, Standardiser
from agbcube.train.loop import build_model, fit
from agbcube.train.model import CNNCoordinateModel, per_sample_loss


def _toy(n=48, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, size, size)).astype("float32")
    y = (2.0 * x[:, 0].mean(axis=(1, 2)) + 5.0).astype("float32")
    return x, y


def _cfg(**kw) -> TrainConfig:
    base = dict(
        head="chip",
        norm="instance",
        conv_channels=[8, 16],
        fc_units=[16],
        epochs=6,
        batch_size=8,
        patience=50,
        hnm_start_epoch=2,
        aug_probability=0.5,
        dropout=0.1,
        context_px=0,
    )
    return TrainConfig(**{**base, **kw})


def _fit(cfg, x, y, checkpoint=None, resume=False, seed=3):
    std = Standardiser.fit(x[:32])
    train = DeviceBatches(std.apply(x[:32]), y[:32], "cpu")
    val = DeviceBatches(std.apply(x[32:]), y[32:], "cpu")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(cfg, 3, x.shape[-1])
        result = fit(
            model, train, val, cfg, n_spectral=3, seed=seed, checkpoint=checkpoint, resume=resume
        )
    return model, result, val


def test_training_learns_and_restores_best_weights():
    x, y = _toy()
    model, result, val = _fit(_cfg(epochs=15, learning_rate=3e-3), x, y)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    best = min(h["val_loss"] for h in result.history)
    assert result.history[result.best_epoch]["val_loss"] == best
    model.eval()
    with torch.no_grad():
        now = per_sample_loss(model(val.x.contiguous()), val.y, kind="huber").mean().item()
    assert now == pytest.approx(best, rel=1e-5)


def test_early_stopping():
    x, y = _toy()
    _, result, _ = _fit(_cfg(epochs=40, patience=2, learning_rate=0.5), x, y)
    assert result.stopped.startswith("early stop") and len(result.history) < 40


def test_early_stopping_follows_the_trailing_mean_of_the_validation_loss(monkeypatch):
    import agbcube.train.loop as loop

    # scripted validation losses: epoch 1 is the lowest single epoch, a lucky one; the trailing
    # mean of 3 is lowest at epoch 7, where the loss has come down for good
    losses = [5.0, 1.0, 6.0, 6.0, 2.0, 2.0, 2.0, 1.5, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]
    script = iter(losses)
    monkeypatch.setattr(
        loop, "_per_sample", lambda model, data, *a: torch.full((len(data),), next(script))
    )
    x, y = _toy()
    cfg = dict(epochs=15, patience=6, hard_negative_mining=False)
    _, raw, _ = _fit(_cfg(**cfg, val_window=1), x, y)
    assert (raw.best_epoch, len(raw.history)) == (1, 8)  # stopped 6 epochs after the lucky one
    script = iter(losses)
    _, smooth, _ = _fit(_cfg(**cfg, val_window=3), x, y)
    assert smooth.best_epoch == 7
    assert smooth.stopped.startswith("early stop") and len(smooth.history) == 14
    assert [h["val_loss"] for h in smooth.history] == losses[:14]  # the raw losses


def test_hnm_weights_follow_per_sample_loss(monkeypatch):
    import agbcube.train.loop as loop

    seen = {}
    real = torch.multinomial

    def spy(weights, n, **kw):
        seen["w"] = weights.clone()
        return real(weights, n, **kw)

    monkeypatch.setattr(loop.torch, "multinomial", spy)
    x, y = _toy()
    y[:4] += 50.0  # four very hard chips
    _fit(_cfg(epochs=3, hnm_start_epoch=1, oversampling_factor=3.0), x, y)
    w = seen["w"]
    assert w.shape == (32,)
    assert w.max().item() == pytest.approx(3.0) and w.min().item() >= 1.0
    assert set(torch.topk(w, 4).indices.tolist()) == {0, 1, 2, 3}


class _Stop(Exception):
    pass


class _StopAtEpoch(logging.Handler):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def emit(self, record: logging.LogRecord) -> None:
        if f"epoch {self.epoch:3d}/" in record.getMessage():
            raise _Stop


def test_resume_is_bit_identical(tmp_path):
    x, y = _toy()
    cfg = _cfg(epochs=6)
    full, _, _ = _fit(cfg, x, y, checkpoint=tmp_path / "a.pt")
    logger = logging.getLogger("agbcube.train.loop")
    handler, level = _StopAtEpoch(3), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(_Stop):
            _fit(cfg, x, y, checkpoint=tmp_path / "b.pt")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    resumed, result, _ = _fit(cfg, x, y, checkpoint=tmp_path / "b.pt", resume=True)
    assert len(result.history) == 6
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_nan_losses_are_skipped_then_stop():
    x, y = _toy()
    y[:] = np.nan
    with pytest.raises(TrainingError, match="not finite for 3 consecutive steps"):
        _fit(_cfg(epochs=3, max_bad_steps=3, loss="mse"), x, y)


def test_out_of_memory_names_the_batch_size(monkeypatch):
    x, y = _toy()

    def boom(self, inp):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(CNNCoordinateModel, "forward", boom)
    with pytest.raises(TrainingError, match=r"out of cpu memory at train.batch_size=8"):
        _fit(_cfg(epochs=1), x, y)


def test_epoch_lines_show_validation_only_where_there_is_one(caplog):
    """An early-stopping fit's lines give its validation loss and star its best epoch; a
    refit has no validation set, so its lines give neither (they showed val == train and
    starred every epoch)."""
    x, y = _toy()
    cfg = _cfg(epochs=3)
    std = Standardiser.fit(x[:32])
    train = DeviceBatches(std.apply(x[:32]), y[:32], "cpu")
    val = DeviceBatches(std.apply(x[32:]), y[32:], "cpu")
    lines = {}
    for name, source, best in (("select", val, True), ("refit", None, False)):
        caplog.clear()
        with caplog.at_level("INFO", logger="agbcube.train"):
            fit(build_model(cfg, 3, x.shape[-1]), train, source, cfg, n_spectral=3, seed=1,
                label=name, restore_best=best)  # fmt: skip
        lines[name] = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert len(lines["select"]) == len(lines["refit"]) == 3
    assert all(" val " in line for line in lines["select"])
    assert sum(line.endswith("*") for line in lines["select"]) >= 1
    assert not any(" val " in line or line.endswith("*") for line in lines["refit"])


def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path):
    x, y = _toy()
    cfg = _cfg(epochs=2)
    _fit(cfg, x, y, checkpoint=tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(TrainingError, match=r"checkpoint .*a.pt cannot be resumed from .*delete"):
        _fit(cfg, x, y, checkpoint=tmp_path / "a.pt", resume=True)
    other = _cfg(epochs=2, conv_channels=[4])  # another model's checkpoint
    _fit(other, x, y, checkpoint=tmp_path / "b.pt")
    with pytest.raises(TrainingError, match=r"b.pt cannot be resumed from \(RuntimeError"):
        _fit(cfg, x, y, checkpoint=tmp_path / "b.pt", resume=True)


def _stop_at_epoch(cfg, x, y, checkpoint, epoch):
    logger = logging.getLogger("agbcube.train.loop")
    handler, level = _StopAtEpoch(epoch), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(_Stop):
            _fit(cfg, x, y, checkpoint=checkpoint)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_compiled_fit_trains_compiled_learns_as_eager_and_resumes_bit_for_bit(
    tmp_path, monkeypatch
):
    """`compile: true` runs the full batches through torch.compile (the smaller last batch
    eagerly, so one shape compiles once); its losses follow the eager fit's (dropout draws
    and sums round differently), and a
    compiled fit stopped and resumed ends with the weights of one that was not. Without
    dropout (which draws from inductor's own stream when compiled) the compiled fit follows
    the eager one up to rounding."""
    import agbcube.train.loop as loop

    calls = {"compiled": 0}
    real = torch.compile

    def counting(model):
        compiled = real(model)

        def forward(x):
            calls["compiled"] += 1
            return compiled(x)

        return forward

    monkeypatch.setattr(loop.torch, "compile", counting)
    x, y = _toy(n=46)  # 32 training chips in batches of 10: 3 full, one of 2
    cfg = _cfg(epochs=4, batch_size=10, compile=True)
    full, _, _ = _fit(cfg, x, y, checkpoint=tmp_path / "a.pt")
    assert calls["compiled"] == 4 * 3
    plain = dict(epochs=4, batch_size=10, dropout=0.0)
    _, compiled, _ = _fit(_cfg(**plain, compile=True), x, y)
    _, eager, _ = _fit(_cfg(**plain, compile=False), x, y)
    assert calls["compiled"] == 2 * 4 * 3
    for a, b in zip(compiled.history, eager.history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    _stop_at_epoch(cfg, x, y, tmp_path / "b.pt", 2)
    resumed, result, _ = _fit(cfg, x, y, checkpoint=tmp_path / "b.pt", resume=True)
    assert len(result.history) == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_compile_auto_compiles_long_cpu_fits_where_a_compiler_is(monkeypatch):
    import agbcube.train.loop as loop

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loop, "_has_cxx", lambda: True)
    big, small = loop.COMPILE_MIN_STEPS, loop.COMPILE_MIN_STEPS - 1
    assert loop.uses_compile("auto", cpu, big) is (sys.platform != "win32")
    assert not loop.uses_compile("auto", cpu, small)
    assert not loop.uses_compile("auto", gpu, big)  # unmeasured there: only when asked
    assert loop.uses_compile(True, gpu, 1) and not loop.uses_compile(False, cpu, big)
    monkeypatch.setattr(loop, "_has_cxx", lambda: False)
    assert not loop.uses_compile("auto", cpu, big)


def test_a_failing_compile_trains_eagerly_under_auto_and_stops_under_true(monkeypatch, caplog):
    import agbcube.train.loop as loop

    def broken(model):
        def forward(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return forward

    monkeypatch.setattr(loop.torch, "compile", broken)
    monkeypatch.setattr(loop, "_compile_failed", [])
    monkeypatch.setattr(loop, "COMPILE_MIN_STEPS", 0)
    monkeypatch.setattr(loop, "_has_cxx", lambda: True)
    x, y = _toy()
    with caplog.at_level("WARNING", logger="agbcube.train.loop"):
        auto, _, _ = _fit(_cfg(epochs=2, compile="auto"), x, y)
        _fit(_cfg(epochs=2, compile="auto"), x, y)  # the process's next fit: not tried again
    failed = "torch.compile failed (RuntimeError: Invalid"
    assert sum(failed in r.getMessage() for r in caplog.records) == 1
    eager, _, _ = _fit(_cfg(epochs=2, compile=False), x, y)
    for (name, a), b in zip(auto.state_dict().items(), eager.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(TrainingError, match=r"train.compile: true, but torch.compile failed"):
        _fit(_cfg(epochs=2, compile=True), x, y)
