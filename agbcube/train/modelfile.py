"""The model file: one writer, one reader.

A model file holds a trained network and everything needed to use it: its weights, the
standardisation of its inputs, the target transform, the bands it reads (in order), the window
it sees and the training settings that built it. Files are written atomically and read with
``torch.load(weights_only=True)`` (plain tensors and JSON-like values only: a run directory may
come from someone else, and unpickling arbitrary objects would run their code).

``ensemble.pt`` bundles a run's members for ``agbcube predict``: ``{"format": 2, "members":
[member, ...]}``, each member what `save_model` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agbcube._io import atomic_path
from agbcube.chips import ChipGeometry
from agbcube.config import TrainConfig
from agbcube.errors import TrainingError
from agbcube.train.batches import Preparation, Standardiser, TargetTransform
from agbcube.train.loop import build_model, load_tensors, unreadable_because

__all__ = ["LoadedModel", "load_bundle", "load_model", "model_record", "save_bundle", "save_model"]

FORMAT = 2
_KEYS = ("state_dict", "standardiser", "target", "in_channels", "size_px", "bands", "train")


@dataclass
class LoadedModel:
    """A model ready to predict, and how its inputs are made."""

    model: torch.nn.Module
    standardiser: Standardiser
    target: TargetTransform
    train: Any  # the TrainConfig it was trained with
    bands: list[str]
    geometry: ChipGeometry  # the chip it predicts, the window it sees (chip plus its reach)
    fold: int | None
    member: int | None


def model_record(
    model: torch.nn.Module,
    prep: Preparation,
    train: Any,
    *,
    bands: list[str],
    fold: int,
    member: int,
) -> dict[str, Any]:
    """What a model file holds (plain values: loadable with ``weights_only=True``)."""
    return {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "standardiser": prep.standardiser.to_dict(),
        "target": prep.target.to_dict(),
        "in_channels": prep.n_channels,
        "size_px": prep.geometry.window_px,  # the window the model sees: it is built for it
        "geometry": prep.geometry.to_dict(),
        "padding": "valid",
        "bands": list(bands),
        "train": train.model_dump(mode="json"),
        "fold": fold,
        "member": member,
    }


def read_record(path: str | Path) -> dict[str, Any]:
    """A model file's record, validated as `load_model` validates it (readable with
    ``weights_only``, its settings valid, its weights fitting them).

    Raises
    ------
    TrainingError
        Naming the file and what is wrong with it.
    """
    path = Path(path)
    record = _load(path, "cpu")
    _member(record, path, "cpu")
    return record


def save_model(path: str | Path, record: dict[str, Any]) -> None:
    """Write a `model_record` atomically."""
    with atomic_path(path, what="model file") as tmp:  # a failed write is named there
        torch.save(record, tmp)


def _load(path: Path, device: Any) -> Any:
    if not path.exists():
        raise TrainingError(f"model file {path} does not exist: train with `agbcube train` first")
    try:
        return load_tensors(path, device)
    except Exception as err:  # truncated, corrupt, or holding pickled objects
        raise TrainingError(
            f"model file {path} cannot be read ({unreadable_because(err, path)}); retrain "
            "(`agbcube train … --resume` rewrites missing and unreadable members)"
        ) from None


def _member(record: Any, path: Path, device: Any) -> LoadedModel:
    """Validate a record read back, then build its model."""
    from pydantic import ValidationError

    missing = [k for k in _KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise TrainingError(f"{path} is not an agbcube model file: it lacks {missing}")
    try:
        tcfg = TrainConfig.model_validate(record["train"])
    except ValidationError as err:
        raise TrainingError(
            f"{path}: the training settings it records are invalid for this agbcube "
            f"({err.error_count()} error(s), e.g. {err.errors()[0]['loc']}: "
            f"{err.errors()[0]['msg']}); retrain with this version"
        ) from None
    padding = str(record.get("padding", "same"))  # files before format 2 padded
    model = build_model(
        tcfg, int(record["in_channels"]), int(record["size_px"]), padding=padding
    ).to(device)
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as err:
        raise TrainingError(
            f"{path}: its weights do not fit the model its settings describe ({str(err)[:160]})"
        ) from None
    model.eval()
    return LoadedModel(
        model,
        Standardiser.from_dict(record["standardiser"]),
        TargetTransform.from_dict(record["target"]),
        tcfg,
        list(record["bands"]),
        _geometry(record),
        record.get("fold"),
        record.get("member"),
    )


def _geometry(record: dict[str, Any]) -> ChipGeometry:
    """The record's chip geometry; files before it was saved held the model's window
    (``size_px``) and reach (``context_px``) only."""
    if "geometry" in record:
        return ChipGeometry.from_dict(record["geometry"])
    reach = int(record.get("context_px", 0))
    size = int(record["size_px"]) - 2 * reach
    return ChipGeometry(size, size, context_px=reach, reach_px=reach)


def load_model(path: str | Path, device: Any = "cpu") -> LoadedModel:
    """Read a model file written by `save_model`.

    Raises
    ------
    TrainingError
        The file is missing, truncated or corrupt, not a model file, or its settings or
        weights do not describe a model this version builds.
    """
    path = Path(path)
    return _member(_load(path, device), path, device)


def save_bundle(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write a run's members into one file (``ensemble.pt``), atomically."""
    with atomic_path(path, what="ensemble") as tmp:
        torch.save({"format": FORMAT, "members": records}, tmp)


def load_bundle(path: str | Path, device: Any = "cpu") -> list[LoadedModel]:
    """Read the members of an ``ensemble.pt`` (see `load_model` for the errors)."""
    path = Path(path)
    blob = _load(path, device)
    members = blob.get("members") if isinstance(blob, dict) else None
    if not members:
        raise TrainingError(f"{path} is not an agbcube ensemble: it holds no members")
    return [_member(record, path, device) for record in members]
