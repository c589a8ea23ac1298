"""Training: chips from the cube into a PyTorch loop, cross-validated over honest folds.

torch is imported only by the modules of this subpackage, never by ``import agbcube``;
importing this subpackage without torch installed is a `MissingDependencyError` that names
the extra to install.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as err:  # a cube-building machine (the `cube` extra) has no torch
    from agbcube.errors import MissingDependencyError

    raise MissingDependencyError(
        "training and prediction need PyTorch, which is not installed here: install the train "
        "extra (pip install 'agbcube[train]', or 'agbcube[predict]' to map sites), with a CUDA "
        "build of torch first for a GPU (docs: Getting started, 'PyTorch builds')"
    ) from err

from agbcube.train.dataset import ChipDataset
from agbcube.train.export import export_run
from agbcube.train.run import load_ensemble, run_cv, training_history

__all__ = ["ChipDataset", "export_run", "load_ensemble", "run_cv", "training_history"]
