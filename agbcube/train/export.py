"""A run's ensemble as one self-contained model file: TorchScript or ONNX.

The exported model maps a window of the cube's features to AGB with nothing of agbcube
installed: standardisation, the imputation of missing values, every fold member, the test-time
augmentation and the target's decoding are inside it. Its input is ``(n, bands, side, side)``
float32, the bands in the order the metadata lists (NaN where missing); its output
``(n, 2, window, window)``: the members' mean and standard deviation of AGB in Mg ha-1 (a
chip head gives ``(n, 2)``, one value per window). ``side`` is the window plus the
convolutions' reach (``margin_px``) on each side; a dense head takes any larger square window
too (the output is the input less the margins). The metadata travels with the file (in a
TorchScript file as the extra file ``agbcube.json``, in an ONNX file as metadata properties)
and beside it, as ``model.json``, in the export folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agbcube._cf import AGB_UNITS
from agbcube._io import atomic_path, output_lock, prepare_output_dir, write_json_atomic, written_by
from agbcube.errors import ConfigError, MissingDependencyError, TrainingError, one_line
from agbcube.train.model import dihedral, dihedral_inverse
from agbcube.train.modelfile import load_bundle

__all__ = ["FORMATS", "ExportedEnsemble", "export_run", "exported_metadata"]

FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx"}  # format: the file it writes
METADATA = "agbcube.json"


class _Member(nn.Module):
    """One fold model with its standardisation, imputation, TTA and target decoding."""

    def __init__(self, member: Any, tta: int) -> None:
        super().__init__()
        self.model = member.model
        std = member.standardiser
        self.register_buffer("mean", torch.as_tensor(std.mean, dtype=torch.float32)[:, None, None])
        self.register_buffer("std", torch.as_tensor(std.std, dtype=torch.float32)[:, None, None])
        target = member.target
        self.t_mean, self.t_std, self.log = float(target.mean), float(target.std), bool(target.log)
        self.tta = int(tta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.nan_to_num((x - self.mean) / self.std, nan=0.0, posinf=0.0, neginf=0.0)
        acc = torch.zeros(0)
        for k in range(self.tta):
            out = self.model(dihedral(z, k)).float()
            if out.dim() == 3:
                out = dihedral_inverse(out, k)
            acc = out if k == 0 else acc + out
        value = (acc / self.tta) * self.t_std + self.t_mean
        if self.log:
            value = torch.expm1(value)
        return torch.clamp(value, min=0.0)


class ExportedEnsemble(nn.Module):
    """Every member of a run: ``(n, bands, side, side)`` → ``(n, 2, window, window)`` (mean
    and standard deviation of AGB, NaN where every input band is missing)."""

    def __init__(self, members: list[Any], tta: int, n_features: int, margin: int) -> None:
        super().__init__()
        self.members = nn.ModuleList([_Member(m, tta) for m in members])
        self.n_features, self.margin = int(n_features), int(margin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for member in self.members:
            outs.append(member(x))
        stack = torch.stack(outs)
        mean = stack.mean(dim=0)
        std = stack.std(dim=0, unbiased=False) if len(outs) > 1 else torch.zeros_like(mean)
        result = torch.stack([mean, std], dim=1)
        if result.dim() == 4:  # dense head: no value where the pixel has no input at all
            m = self.margin
            core = x[:, : self.n_features, m : x.shape[-2] - m, m : x.shape[-1] - m]
            empty = torch.isnan(core).all(dim=1)
            result = result.masked_fill(empty[:, None], float("nan"))
        return result


def export_run(run_dir: str | Path, output: str | Path, *, fmt: str = "torchscript") -> Path:
    """Write a run's ensemble as a self-contained model (see the module's description).

    Parameters
    ----------
    run_dir : str or Path
        A finished training run (its ``ensemble.pt``).
    output : str or Path
        The export folder (agbcube's, or new or empty): ``model.pt`` or ``model.onnx`` and
        ``model.json`` (the metadata) go into it, each written to a temporary file first.
    fmt : {"torchscript", "onnx"}
        ONNX needs the ``export`` extra (onnx, onnxscript).

    Returns
    -------
    Path
        The model file.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not an export format; use {' or '.join(FORMATS)}")
    run_dir, output = Path(run_dir), Path(output)
    members = load_bundle(run_dir / "ensemble.pt", "cpu")
    model, meta = _ensemble(members, run_dir)
    side = meta["input_px"]
    example = torch.zeros(1, len(meta["inputs"]), side, side)
    with output_lock(output, what="export folder"):
        prepare_output_dir(output, kind="export", what="export folder")
        path = output / FORMATS[fmt]
        with atomic_path(path, what="exported model") as tmp:
            if fmt == "torchscript":
                _torchscript(model, meta, tmp)
            else:
                _onnx(model, meta, example, tmp)
        write_json_atomic(output / "model.json", meta)
    return path


def _ensemble(members: list[Any], run_dir: Path) -> tuple[ExportedEnsemble, dict[str, Any]]:
    """The exportable module of a run's members, and its metadata."""
    first = members[0]
    tcfg = first.train
    tta = int(tcfg.tta_rotations) if tcfg.tta else 1
    bands = list(first.bands) + (["lon", "lat"] if tcfg.coordinates == "geographic" else [])
    geometry = first.geometry
    margin = geometry.reach_px
    model = ExportedEnsemble(members, tta, len(first.bands), margin).eval()
    meta = {
        "written_by": written_by(),
        "run": run_dir.resolve().name,
        "inputs": bands,
        "input_px": geometry.window_px,
        "window_px": geometry.size_px,
        "margin_px": margin,
        "outputs": ["agb_mean", "agb_std"],
        "units": AGB_UNITS,
        "head": tcfg.head,
        "members": len(members),
        "tta": tta,
        "missing": "NaN inputs are imputed with the training mean (0 after standardising)",
    }
    return model, meta


def _torchscript(model: nn.Module, meta: dict[str, Any], path: Path) -> None:
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, str(path), _extra_files={METADATA: json.dumps(meta)})


def _onnx(model: nn.Module, meta: dict[str, Any], example: torch.Tensor, path: Path) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's ONNX exporter)
    except ImportError:
        raise MissingDependencyError(
            "exporting to ONNX needs the onnx and onnxscript packages: pip install "
            "'agbcube[export]' (or export --format torchscript)"
        ) from None
    n = torch.export.Dim("n", min=1)
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["features"],
            output_names=["agb"],
            dynamic_shapes={"x": {0: n}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path))
    proto = onnx.load(str(path))
    for key, value in meta.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, json.dumps(value) if not isinstance(value, str) else value
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's ONNX exporter logs what it skips (torchvision's operators) and warns about its
    own internals: nothing a user of the export can act on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def exported_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported TorchScript model (what `export_run` recorded)."""
    extra = {METADATA: ""}
    try:
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra[METADATA])
    except (RuntimeError, ValueError, OSError) as err:
        raise TrainingError(
            f"{path} is not a model `agbcube export` wrote ({type(err).__name__}: "
            f"{one_line(err, 120)}); export the run again"
        ) from None
