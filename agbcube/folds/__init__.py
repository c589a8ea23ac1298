"""Honest hybrid site-spatial K-fold cross-validation of chips.

Within every site, chips are clustered spatially (KMeans on footprint centres, in metres in the
site's UTM zone) into more clusters than folds, and whole clusters are dealt to folds so that each
fold holds a balanced share of every site's chips. That makes the folds a **true partition**: every
chip is tested exactly once.

For fold ``k``, a chip that is not tested but whose footprint lies within ``buffer_m`` metres of a
test footprint gets the role ``buffer`` and is used for nothing (overlapping chips are always
within the buffer). From the remaining pool, whole clusters are drawn per site as a spatially
separate **validation** set for early stopping, and pool chips within the buffer of a validation
chip are buffered too. Everything left is ``train``.

``buffer_m: auto`` takes each site's AGB autocorrelation range from an empirical variogram (an
exponential model fitted to sampled pixel pairs), the distance beyond which residuals of a model
stop sharing information [Roberts_etal2017]_.

References
----------
.. [Roberts_etal2017] Roberts, D. R. et al. (2017). Cross-validation strategies for data with
   temporal, spatial, hierarchical, or phylogenetic structure. Ecography 40, 913–929.
.. [Mila_etal2022] Milà, C. et al. (2022). Nearest neighbour distance matching Leave-One-Out
   Cross-Validation for map validation. Methods in Ecology and Evolution 13, 1304–1316.

Modules: `~agbcube.folds.variogram` (the autocorrelation range), `~agbcube.folds.splitter` (the
splitter), `~agbcube.folds.geometry` (footprints in metres), `~agbcube.folds.audit` (the leakage
audit), `~agbcube.folds.stage` (cube → folds), `~agbcube.folds.io` (the folds file),
`~agbcube.folds.labels` (training pools and label masks), `~agbcube.folds.plots` (fold maps).
"""

from __future__ import annotations

from agbcube.folds.audit import leakage_audit
from agbcube.folds.io import check_folds_cube, n_folds_of, read_folds, write_folds
from agbcube.folds.labels import label_mask, label_masks, training_pool
from agbcube.folds.plots import plot_fold_map
from agbcube.folds.splitter import ROLES, HybridSiteSpatialKFold
from agbcube.folds.stage import make_folds
from agbcube.folds.variogram import estimate_range_m

__all__ = [
    "ROLES",
    "HybridSiteSpatialKFold",
    "check_folds_cube",
    "estimate_range_m",
    "label_mask",
    "label_masks",
    "leakage_audit",
    "make_folds",
    "n_folds_of",
    "plot_fold_map",
    "read_folds",
    "training_pool",
    "write_folds",
]
