"""Training one fold: sampling, augmentation, hard-negative mining, early stopping, checkpoints."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agbcube.errors import TrainingError
from agbcube.train.model import (
    Augmentation,
    CNNCoordinateModel,
    dihedral,
    dihedral_inverse,
    draw_augmentation,
    make_loss,
    per_sample_loss,
)

__all__ = ["FoldFit", "build_model", "fit_fold", "predict", "resolve_device"]


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device when present, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            f"device {spec!r} was requested but CUDA is not available; use --device cpu or "
            "install a CUDA build of torch (README, 'Installing torch')"
        )
    return device


def build_model(cfg: Any, in_channels: int, size_px: int) -> CNNCoordinateModel:
    """The model a :class:`~agbcube.config.TrainConfig` describes."""
    return CNNCoordinateModel(
        in_channels,
        size_px,
        head=cfg.head,
        conv_channels=cfg.conv_channels,
        fc_units=cfg.fc_units,
        norm=cfg.norm,
        dropout=cfg.dropout,
    )


@dataclass
class FoldFit:
    """What training a fold produced."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    stopped: str = ""
    bad_steps: int = 0


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.inference_mode()
def predict(
    model: torch.nn.Module, x: torch.Tensor, *, tta: int = 1, batch_size: int = 512
) -> torch.Tensor:
    """Predictions for standardised inputs, averaged over ``tta`` dihedral transforms.

    Returns ``(n,)`` for the chip head and ``(n, h, w)`` for the dense head.
    """
    model.eval()
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


@torch.no_grad()
def _per_sample(
    model: torch.nn.Module, data: Any, kind: str, delta: float, amp: bool
) -> torch.Tensor:
    """Loss of every chip in one batched pass (for hard-negative mining and validation)."""
    model.eval()
    losses = torch.full((len(data),), float("nan"), device=data.device)
    for x, y, idx in data.iterate(torch.arange(len(data)), 512):  # any order: idx says which
        with _autocast(x.device, amp):
            pred = model(x.contiguous()).float()
        losses[idx] = per_sample_loss(pred, y, kind=kind, delta=delta)
    return losses


def _autocast(device: torch.device, amp: bool):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def fit_fold(
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
    echo: Callable[[str], None] | None = None,
    label: str = "",
    restore_best: bool = True,
) -> FoldFit:
    """Train ``model`` on one fold's chips.

    AdamW with cosine annealing; early stopping on the mean validation loss of the last
    ``cfg.val_window`` epochs (the training loss when there is no validation set) with the best
    epoch's weights restored; hard-negative mining from ``cfg.hnm_start_epoch`` (sampling
    weights from every chip's loss in one batched pass); batched on-device augmentation;
    bfloat16 autocast on GPU. Random numbers come from generators seeded with ``seed``; dropout
    uses the global generator, which is forked and seeded here and saved in checkpoints, so a
    resumed run continues bit for bit on the CPU.

    Parameters
    ----------
    model : torch.nn.Module
        Freshly built (initialised under ``seed``) model on the chips' device.
    train, val : DeviceChips or StreamSource
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
    echo : callable, optional
        Receives one line per epoch.
    label : str
        Prefix of those lines (e.g. ``"fold 2"``).
    restore_best : bool
        Early stopping with the best epoch's weights restored (default); ``False`` trains
        every epoch and keeps the last weights (a refit for a known number of epochs).

    Returns
    -------
    FoldFit

    Raises
    ------
    TrainingError
        ``cfg.max_bad_steps`` consecutive non-finite losses before any good epoch.
    """
    device = train.device
    n_epochs = int(epochs if epochs is not None else cfg.epochs)
    loss_fn = make_loss(cfg.loss, delta=cfg.huber_delta, spatial_weight=cfg.spatial_loss_weight)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_epochs)
    g_sample = torch.Generator().manual_seed(seed)
    g_aug = torch.Generator().manual_seed(seed + 1)
    fit = FoldFit(state_dict=copy.deepcopy(model.state_dict()))
    best, wait, start = math.inf, 0, 0
    if resume and checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        g_sample.set_state(state["g_sample"])
        g_aug.set_state(state["g_aug"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        fit.state_dict, fit.history = state["best_state"], state["history"]
        fit.best_epoch, best, wait, start = (
            state["best_epoch"],
            state["best"],
            state["wait"],
            (state["epoch"] + 1),
        )
        if state.get("stopped"):
            fit.stopped = state["stopped"]
            model.load_state_dict(fit.state_dict)
            return fit
    n = len(train)
    bad_run = 0
    augment = None
    if cfg.augment or cfg.spectral_augment:

        def augment(size: int) -> Augmentation:
            return draw_augmentation(
                size,
                g_aug,
                probability=cfg.aug_probability,
                geometric=cfg.augment,
                spectral=cfg.spectral_augment,
                jitter=cfg.spectral_jitter,
                n_spectral=n_spectral,
            )

    for epoch in range(start, n_epochs):
        t0 = time.perf_counter()
        if cfg.hard_negative_mining and epoch >= cfg.hnm_start_epoch:
            losses = _per_sample(model, train, cfg.loss, cfg.huber_delta, cfg.amp).cpu()
            losses = torch.nan_to_num(losses, nan=0.0, posinf=0.0)
            top = losses.max().clamp(min=1e-12)
            weights = 1.0 + (cfg.oversampling_factor - 1.0) * losses / top
            order = torch.multinomial(weights.double(), n, replacement=True, generator=g_sample)
        else:
            order = torch.randperm(n, generator=g_sample)
        model.train()
        total = torch.zeros((), device=device)
        steps = 0
        for xb, yb, idx in train.iterate(order, cfg.batch_size, augment=augment):
            if idx.numel() < 2 <= n:
                continue  # a 1-chip batch makes norm layers degenerate
            # Standard layout for the model: channels_last convolutions on the CPU (oneDNN)
            # were not reproducible across processes, and bit-identical resume needs that.
            xb = xb.contiguous()
            try:
                with _autocast(device, cfg.amp):
                    pred = model(xb).float()
            except torch.OutOfMemoryError as err:
                raise TrainingError(
                    f"{label}: out of {device.type} memory at train.batch_size="
                    f"{cfg.batch_size} ({xb.shape[1]} channels of {xb.shape[-1]}² px); lower "
                    "train.batch_size, use fewer train.conv_channels, or set "
                    "train.data_path: stream"
                ) from err
            cb = centres.index_select(0, idx) if centres is not None else None
            loss = loss_fn(pred, yb, cb)
            if not torch.isfinite(loss):
                # Skip the step; a run of them means training has diverged.
                fit.bad_steps += 1
                bad_run += 1
                opt.zero_grad(set_to_none=True)
                if bad_run >= cfg.max_bad_steps:
                    break
                continue
            bad_run = 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += loss.detach()
            steps += 1
        sched.step()
        if bad_run >= cfg.max_bad_steps:
            fit.stopped = f"{bad_run} consecutive non-finite losses at epoch {epoch}"
            if fit.best_epoch < 0:
                raise TrainingError(
                    f"{label}: the loss was not finite for {bad_run} consecutive steps before "
                    "any good epoch; lower train.learning_rate or check the cube for extreme "
                    "values"
                )
            break
        train_loss = (total / max(steps, 1)).item()
        if val is not None and len(val):
            val_loss = _per_sample(model, val, cfg.loss, cfg.huber_delta, cfg.amp).mean().item()
        else:
            val_loss = train_loss
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "lr": opt.param_groups[0]["lr"],
            "chips_per_s": n / max(seconds, 1e-9),
            "seconds": seconds,
        }
        fit.history.append(record)
        # early stopping watches a trailing mean: one epoch's loss on a few validation chips
        # is noisy enough to stop a still-improving run (BENCHMARKS.md, "train.val_window")
        window = [h["val_loss"] for h in fit.history[-cfg.val_window :]]
        score = float(np.mean(window))
        if not restore_best or (math.isfinite(score) and score < best - 1e-7):
            best, wait, fit.best_epoch = score, 0, epoch
            fit.state_dict = copy.deepcopy(model.state_dict())
        else:
            wait += 1
        if echo is not None:
            echo(
                f"{label} epoch {epoch + 1:3d}/{n_epochs}  train {train_loss:.4f}  "
                f"val {val_loss:.4f}  lr {record['lr']:.2e}  {record['chips_per_s']:,.0f} chips/s"
                + ("  *" if fit.best_epoch == epoch else "")
            )
        if wait >= cfg.patience:
            fit.stopped = f"early stop at epoch {epoch + 1} (best {fit.best_epoch + 1})"
        if checkpoint is not None:
            _save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "g_sample": g_sample.get_state(),
                    "g_aug": g_aug.get_state(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "best_state": fit.state_dict,
                    "history": fit.history,
                    "best_epoch": fit.best_epoch,
                    "best": best,
                    "wait": wait,
                    "epoch": epoch,
                    "stopped": fit.stopped,
                },
                checkpoint,
            )
        if fit.stopped:
            break
    model.load_state_dict(fit.state_dict)
    return fit


def chip_centres_km(chips: Any) -> np.ndarray:
    """``(n, 2)`` chip centres in km (local equirectangular) from the chips' footprints."""
    b = chips.geometry.to_crs(4326).bounds  # box centres: chips are small, no centroid needed
    lon = 0.5 * (b["minx"] + b["maxx"]).to_numpy()
    lat = 0.5 * (b["miny"] + b["maxy"]).to_numpy()
    return np.column_stack([lon * 111.32 * np.cos(np.radians(lat)), lat * 110.54]).astype(
        np.float32
    )
