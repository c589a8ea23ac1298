"""Training: chips from the cube into a PyTorch loop, cross-validated over honest folds.

torch is imported only by the modules of this subpackage, never by ``import agbcube``.
"""

from __future__ import annotations

from agbcube.train.run import load_ensemble, run_cv

__all__ = ["load_ensemble", "run_cv"]
