"""A run's ensemble file, loaded once per process and device and kept for its tiles."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agbcube.errors import InputFileError, TrainingError
from agbcube.train import load_ensemble
from agbcube.train.plan import resolve_device


@dataclass(frozen=True)
class EnsembleFile:
    """A run's ensemble by its file, as the tile tasks carry it: each process loads it once per
    device (`load`) instead of receiving the models through the task graph."""

    path: str
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: str | Path) -> EnsembleFile:
        path = Path(path).resolve()
        st = path.stat()
        return cls(str(path), st.st_mtime_ns, st.st_size)

    def load(self, device: str) -> tuple[list[tuple[Any, ...]], dict[str, Any], Any]:
        """The members on ``device`` (``auto`` resolved here), their spec and the device."""

        dev = resolve_device(device)
        key = (self, str(dev))
        with _MODELS_LOCK:  # one load per process, whatever the threads asking
            if key in _MODELS:
                _MODELS.move_to_end(key)
                return (*_MODELS[key], dev)
            self._check()

            _MODELS[key] = load_ensemble(Path(self.path).parent, device=str(dev))
            _LOADS[key] += 1
            while len(_MODELS) > _KEEP_MODELS:
                _MODELS.popitem(last=False)
            return (*_MODELS[key], dev)

    def _check(self) -> None:
        try:
            st = Path(self.path).stat()
        except OSError as err:
            raise InputFileError(
                f"ensemble {self.path} cannot be read here ({err.strerror or err}); on a "
                "cluster the workers need the run directory and the cube at the same paths as "
                "the client (a shared file system)"
            ) from err
        if (st.st_mtime_ns, st.st_size) != (self.mtime_ns, self.size):
            raise TrainingError(
                f"ensemble {self.path} changed while its maps were being made (the run was "
                "trained again?); run predict again"
            )


_MODELS: OrderedDict[tuple[EnsembleFile, str], tuple[list, dict]] = OrderedDict()
_MODELS_LOCK = threading.Lock()
_LOADS: Counter = Counter()  # loads per (ensemble, device) in this process
_KEEP_MODELS = 2  # ensembles a process keeps (a long-lived worker maps for several runs)


def device_here(device: str) -> str:
    """``device`` when this process has it, else the CPU (a client without the GPUs its
    cluster's workers have)."""

    try:
        return str(resolve_device(device))
    except TrainingError:
        return "cpu"
