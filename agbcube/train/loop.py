"""Training one model: sampling, augmentation, hard-negative mining, early stopping, checkpoints."""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import shutil
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agbcube._io import write_errors
from agbcube.errors import TrainingError, one_line
from agbcube.train.model import (
    Augmentation,
    CNNCoordinateModel,
    dihedral,
    dihedral_inverse,
    draw_augmentation,
    make_loss,
    per_sample_loss,
)

__all__ = ["FitResult", "build_model", "eval_batch", "fit", "predict", "uses_compile"]

log = logging.getLogger(__name__)

#: Fits of fewer chip-steps (training chips × epochs) train eagerly under ``compile: auto``:
#: the compile (10-25 s on a 2-core CPU, once per process) would not be repaid.
COMPILE_MIN_STEPS = 10_000
_compile_failed: list[str] = []  # why torch.compile failed in this process (auto: not again)


def build_model(
    cfg: Any, in_channels: int, size_px: int, *, padding: str = "valid"
) -> CNNCoordinateModel:
    """The model a `TrainConfig` describes (``size_px``: its input
    window; ``padding``: the dense head's convolutions, see the model)."""
    return CNNCoordinateModel(
        in_channels,
        size_px,
        head=cfg.head,
        conv_channels=cfg.conv_channels,
        fc_units=cfg.fc_units,
        norm=cfg.norm,
        dropout=cfg.dropout,
        bottleneck=cfg.bottleneck,
        separable=cfg.separable,
        padding=padding,
    )


def load_tensors(path: str | Path, device: Any = "cpu") -> Any:
    """A file written by ``torch.save``, read with ``weights_only=True``: tensors and plain
    values only, never pickled code (a run directory may come from someone else)."""
    with warnings.catch_warnings():  # torch's advice on pickle protocols is not the user's
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location=device, weights_only=True)


def unreadable_because(err: BaseException, path: str | Path) -> str:
    """Why `load_tensors` failed on ``path``, in one line (torch's own message suggests
    loading the file with ``weights_only=False``, which agbcube never does)."""
    if not zipfile.is_zipfile(path):  # what torch.save writes is a zip archive
        return "it is truncated, or not a file torch.save wrote"
    if isinstance(err, pickle.UnpicklingError):
        return "it holds pickled Python objects, not only tensors: it was not written by agbcube"
    return f"{type(err).__name__}: {one_line(err, 160)}"


@dataclass
class FitResult:
    """What training a model produced (its weights are in the model itself)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    stopped: str = ""
    bad_steps: int = 0


def eval_batch(device: torch.device) -> int:
    """Chips per forward pass without gradients: 512 on a GPU; 16 on the CPU, where larger
    batches fall out of the caches (the default model's validation pass ran 1.9x as fast in
    batches of 16 as of 512, 1.3x as of 64: BENCHMARKS.md "Faster steps for the same model")."""
    return 512 if device.type == "cuda" else 16


@torch.inference_mode()
def predict(
    model: torch.nn.Module, x: torch.Tensor, *, tta: int = 1, batch_size: int | None = None
) -> torch.Tensor:
    """Predictions for standardised inputs, averaged over ``tta`` dihedral transforms.

    Returns ``(n,)`` for the chip head and ``(n, h, w)`` for the dense head; ``batch_size``
    defaults to `eval_batch`.
    """
    model.eval()
    batch_size = batch_size or eval_batch(x.device)
    outs = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        acc = None
        for k in range(tta):
            out = model(dihedral(xb, k)).float()
            if out.dim() == 3:
                out = dihedral_inverse(out, k)
            acc = out if acc is None else acc + out
        outs.append(acc / tta)
    return torch.cat(outs)


def _autocast(device: torch.device, amp: bool):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def _per_sample(model: torch.nn.Module, data: Any, kind: str, delta: float, amp: bool):
    """Loss of every chip in one batched pass (for hard-negative mining and validation)."""
    model.eval()
    losses = torch.full((len(data),), float("nan"), device=data.device)
    order = torch.arange(len(data))
    for x, y, idx in data.iterate(order, eval_batch(data.device)):  # idx says which
        with _autocast(x.device, amp):
            pred = model(x.contiguous()).float()
        losses[idx] = per_sample_loss(pred, y, kind=kind, delta=delta)
    return losses


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def uses_compile(setting: str | bool, device: torch.device, steps: int) -> bool:
    """Whether a fit of ``steps`` chip-steps on ``device`` trains compiled under
    ``train.compile`` = ``setting`` (see `TrainConfig`; ``"auto"``: on a CPU with a C++
    compiler, not on Windows, from `COMPILE_MIN_STEPS`, and not again in a process where
    it failed)."""
    if setting != "auto":
        return bool(setting)
    return (
        not _compile_failed
        and device.type == "cpu"
        and sys.platform != "win32"
        and steps >= COMPILE_MIN_STEPS
        and _has_cxx()
    )


class _Forward:
    """The training forward: ``torch.compile``'d for full batches where `uses_compile` says
    so, eager for a pass's last, smaller batch (one batch shape, one compile; the compiled and
    the eager module share their weights). Where compiling fails, ``compile: auto`` warns once
    and trains eagerly (this fit and the process's next ones); ``compile: true`` stops with
    the reason."""

    def __init__(self, model: torch.nn.Module, cfg: Any, device: torch.device, steps: int):
        self.model, self.batch, self.setting = model, cfg.batch_size, cfg.compile
        compiled = uses_compile(cfg.compile, device, steps)
        self.compiled = torch.compile(model) if compiled else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None or x.shape[0] != self.batch:
            return self.model(x)
        try:
            return self.compiled(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # a compiler missing or failing: not the model's fault
            why = f"{type(err).__name__}: {one_line(err, 240)}"
            if self.setting is True:
                raise TrainingError(
                    f"train.compile: true, but torch.compile failed ({why}); install a C++ "
                    "compiler (CPU) or set train.compile: auto or false"
                ) from err
            log.warning("torch.compile failed (%s); training eagerly (train.compile)", why)
            _compile_failed.append(why)
            self.compiled = None
            return self.model(x)


class _Fit:
    """One model's training state: optimiser, schedule, generators and early stopping."""

    def __init__(
        self, model: torch.nn.Module, cfg: Any, n_epochs: int, seed: int, train: Any
    ) -> None:
        self.model, self.cfg, self.n_epochs = model, cfg, n_epochs
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=n_epochs)
        self.g_sample = torch.Generator().manual_seed(seed)
        self.g_aug = torch.Generator().manual_seed(seed + 1)
        self.best_state = copy.deepcopy(model.state_dict())
        self.result = FitResult()
        self.best, self.wait, self.start = math.inf, 0, 0
        self.bad_run = 0  # consecutive non-finite losses, across epochs
        self.forward = _Forward(model, cfg, train.device, len(train) * n_epochs)

    def state(self, epoch: int, device: torch.device) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "g_sample": self.g_sample.get_state(),
            "g_aug": self.g_aug.get_state(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "best_state": self.best_state,
            "history": self.result.history,
            "best_epoch": self.result.best_epoch,
            "best": self.best,
            "wait": self.wait,
            "epoch": epoch,
            "stopped": self.result.stopped,
            "bad_steps": self.result.bad_steps,
        }

    def restore(self, path: Path, device: torch.device) -> None:
        """Continue from a checkpoint; one that cannot be read, or is not this fit's, is named
        (`TrainingError`) with what to do."""
        try:
            self._apply(load_tensors(path, device), device)
        except Exception as err:  # truncated, foreign, or another model's: never a traceback
            raise TrainingError(
                f"checkpoint {path} cannot be resumed from ({unreadable_because(err, path)}); "
                "delete it and run again with --resume: that fit starts over, the finished ones "
                "are kept"
            ) from None

    def _apply(self, state: Any, device: torch.device) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.g_sample.set_state(state["g_sample"])
        self.g_aug.set_state(state["g_aug"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        self.best_state, self.result.history = state["best_state"], state["history"]
        self.result.best_epoch, self.best, self.wait = (
            state["best_epoch"],
            state["best"],
            state["wait"],
        )
        self.result.stopped = state.get("stopped", "")
        self.result.bad_steps = state.get("bad_steps", 0)
        self.start = state["epoch"] + 1

    def order(self, train: Any, epoch: int) -> torch.Tensor:
        """This epoch's chips: a permutation, or with hard-negative mining a sample weighted
        by every chip's loss from one batched pass."""
        cfg, n = self.cfg, len(train)
        if cfg.hard_negative_mining and epoch >= cfg.hnm_start_epoch:
            losses = _per_sample(self.model, train, cfg.loss, cfg.huber_delta, cfg.amp).cpu()
            losses = torch.nan_to_num(losses, nan=0.0, posinf=0.0)
            top = losses.max().clamp(min=1e-12)
            weights = 1.0 + (cfg.oversampling_factor - 1.0) * losses / top
            return torch.multinomial(weights.double(), n, replacement=True, generator=self.g_sample)
        return torch.randperm(n, generator=self.g_sample)

    def augmenter(self, n_spectral: int) -> Any:
        cfg = self.cfg
        if not (cfg.augment or cfg.spectral_augment):
            return None

        def augment(size: int) -> Augmentation:
            return draw_augmentation(
                size,
                self.g_aug,
                probability=cfg.aug_probability,
                geometric=cfg.augment,
                spectral=cfg.spectral_augment,
                jitter=cfg.spectral_jitter,
                n_spectral=n_spectral,
            )

        return augment

    def observe(self, epoch: int, record: dict[str, float], restore_best: bool) -> None:
        """Record an epoch; early stopping watches a trailing mean of the validation loss: one
        epoch's loss on a few validation chips is noisy enough to stop a still-improving run
        (BENCHMARKS.md, "train.val_window")."""
        result = self.result
        result.history.append(record)
        window = [h["val_loss"] for h in result.history[-self.cfg.val_window :]]
        score = float(np.mean(window))
        if not restore_best or (math.isfinite(score) and score < self.best - 1e-7):
            self.best, self.wait, result.best_epoch = score, 0, epoch
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.wait += 1
        if self.wait >= self.cfg.patience:
            result.stopped = f"early stop at epoch {epoch + 1} (best {result.best_epoch + 1})"


def _train_epoch(
    fit_: _Fit, train: Any, order: torch.Tensor, augment: Any, centres: Any, label: str
) -> float:
    """One pass over ``order``; the mean loss of its good steps."""
    cfg, model, opt = fit_.cfg, fit_.model, fit_.opt
    loss_fn = make_loss(cfg.loss, delta=cfg.huber_delta, spatial_weight=cfg.spatial_loss_weight)
    device = train.device
    model.train()
    total = torch.zeros((), device=device)
    steps = 0
    n = len(train)
    for xb, yb, idx in train.iterate(order, cfg.batch_size, augment=augment):
        if idx.numel() < 2 <= n:
            continue  # a 1-chip batch makes norm layers degenerate
        # Standard layout for the model: channels_last convolutions on the CPU (oneDNN)
        # were not reproducible across processes, and bit-identical resume needs that.
        xb = xb.contiguous()
        try:
            with _autocast(device, cfg.amp):
                pred = fit_.forward(xb).float()
        except torch.OutOfMemoryError as err:
            raise TrainingError(
                f"{label}: out of {device.type} memory at train.batch_size={cfg.batch_size} "
                f"({xb.shape[1]} channels of {xb.shape[-1]}² px); lower train.batch_size, use "
                "fewer train.conv_channels, or set train.data_path: chunks"
            ) from err
        loss = loss_fn(pred, yb, centres.index_select(0, idx) if centres is not None else None)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):  # skip the step; a run of them means divergence
            fit_.result.bad_steps += 1
            fit_.bad_run += 1
            if fit_.bad_run >= cfg.max_bad_steps:
                break
            continue
        fit_.bad_run = 0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        total += loss.detach()
        steps += 1
    return (total / max(steps, 1)).item()


def fit(
    model: torch.nn.Module,
    train: Any,
    val: Any | None,
    cfg: Any,
    *,
    n_spectral: int,
    seed: int,
    epochs: int | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    centres: torch.Tensor | None = None,
    label: str = "",
    restore_best: bool = True,
) -> FitResult:
    """Train ``model`` on a fold's chips.

    AdamW with cosine annealing; early stopping on the mean validation loss of the last
    ``cfg.val_window`` epochs (the training loss without a validation set), the best epoch's
    weights restored; hard-negative mining from ``cfg.hnm_start_epoch`` (sampling weights from
    every chip's loss in one batched pass); bfloat16 autocast on GPU. Random numbers come from
    generators seeded with ``seed`` and, for dropout, the global generator the caller seeds;
    all are saved in checkpoints, so a resumed fit continues bit for bit on the CPU. Each
    epoch is logged at INFO on ``agbcube.train.loop``.

    Parameters
    ----------
    model : torch.nn.Module
        Freshly built (initialised under ``seed``) model on the chips' device.
    train, val : BatchSource
        The training chips and the validation chips (or ``None``).
    cfg : TrainConfig
    n_spectral : int
        Leading input channels that spectral jitter applies to (not coordinates).
    seed : int
    epochs : int, optional
        Override of ``cfg.epochs``.
    checkpoint : Path, optional
        Written atomically after every epoch.
    resume : bool
        Continue from ``checkpoint`` when it exists.
    centres : torch.Tensor, optional
        ``(n_train, 2)`` chip centres in km, for the chip head's spatial loss.
    label : str
        Prefix of the log lines and errors (e.g. ``"fold 2"``).
    restore_best : bool
        Early stopping with the best epoch's weights restored (default); ``False`` trains
        every epoch and keeps the last weights (a refit for a known number of epochs).

    Returns
    -------
    FitResult

    Raises
    ------
    TrainingError
        ``cfg.max_bad_steps`` consecutive non-finite losses before any good epoch.
    """
    device = train.device
    fit_ = _Fit(model, cfg, int(epochs if epochs is not None else cfg.epochs), seed, train)
    if resume and checkpoint is not None and checkpoint.exists():
        fit_.restore(checkpoint, device)
    augment = fit_.augmenter(n_spectral)
    for epoch in range(fit_.start, fit_.n_epochs):
        if fit_.result.stopped:
            break
        t0 = time.perf_counter()
        order = fit_.order(train, epoch)
        train_loss = _train_epoch(fit_, train, order, augment, centres, label)
        fit_.sched.step()
        if fit_.bad_run >= cfg.max_bad_steps:
            _diverged(fit_, fit_.bad_run, epoch, label)
            break
        record = _epoch_record(fit_, val, epoch, train_loss, len(train), t0)
        fit_.observe(epoch, record, restore_best)
        _log_epoch(fit_, record, label, validated=val is not None and len(val) > 0)
        if checkpoint is not None:
            _save_atomic(fit_.state(epoch, device), checkpoint)
    model.load_state_dict(fit_.best_state)
    return fit_.result


def _diverged(fit_: _Fit, bad_run: int, epoch: int, label: str) -> None:
    fit_.result.stopped = f"{bad_run} consecutive non-finite losses at epoch {epoch}"
    if fit_.result.best_epoch < 0:
        raise TrainingError(
            f"{label}: the loss was not finite for {bad_run} consecutive steps before any good "
            "epoch; lower train.learning_rate or check the cube for extreme values"
        )


def _epoch_record(
    fit_: _Fit, val: Any, epoch: int, train_loss: float, n: int, t0: float
) -> dict[str, float]:
    cfg = fit_.cfg
    if val is not None and len(val):
        val_loss = _per_sample(fit_.model, val, cfg.loss, cfg.huber_delta, cfg.amp).mean().item()
    else:
        val_loss = train_loss
    seconds = time.perf_counter() - t0
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "lr": fit_.opt.param_groups[0]["lr"],
        "chips_per_s": n / max(seconds, 1e-9),
        "seconds": seconds,
    }


def _log_epoch(fit_: _Fit, record: dict[str, float], label: str, *, validated: bool) -> None:
    """One line an epoch; the validation loss and the best epoch's ``*`` only where there is a
    validation set (a refit has none: it trains for the epochs the selection picked)."""
    if not log.isEnabledFor(logging.INFO):
        return
    val = f"  val {record['val_loss']:.4f}" if validated else ""
    best = validated and fit_.result.best_epoch == record["epoch"]
    log.info(
        "%s epoch %3d/%d  train %.4f%s  lr %.2e  %s chips/s%s",
        label,
        record["epoch"] + 1,
        fit_.n_epochs,
        record["train_loss"],
        val,
        record["lr"],
        f"{record['chips_per_s']:,.0f}",
        "  *" if best else "",
    )


def _save_atomic(obj: Any, path: Path) -> None:

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with write_errors(path, what="training checkpoint"):
            torch.save(obj, tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def chip_centres_km(chips: Any) -> np.ndarray:
    """``(n, 2)`` chip centres in km (local equirectangular) from the chips' footprints."""
    b = chips.geometry.to_crs(4326).bounds  # box centres: chips are small, no centroid needed
    lon = 0.5 * (b["minx"] + b["maxx"]).to_numpy()
    lat = 0.5 * (b["miny"] + b["maxy"]).to_numpy()
    return np.column_stack([lon * 111.32 * np.cos(np.radians(lat)), lat * 110.54]).astype(
        np.float32
    )
