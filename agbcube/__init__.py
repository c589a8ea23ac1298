"""agbcube: above-ground biomass models and maps from satellite stacks and LiDAR AGB rasters."""

from __future__ import annotations

__version__ = "0.1.0"

from agbcube.bands import BAND_PRESETS, resolve_band_names
from agbcube.chips import make_chips
from agbcube.config import Config, config_reference, load_config, parse_config
from agbcube.cube import (
    build_cube,
    build_site_cube,
    cube_sites,
    open_cube,
    open_cube_tree,
)
from agbcube.errors import (
    AgbcubeError,
    BandError,
    ConfigError,
    CubeError,
    FoldError,
    GridError,
    InputFileError,
    MissingCRSError,
    NoOverlapError,
    OutputLockedError,
    TrainingError,
)
from agbcube.folds import (
    HybridSiteSpatialKFold,
    estimate_range_m,
    leakage_audit,
    make_folds,
    read_folds,
    write_folds,
)
from agbcube.indices import compute_indices, plan_indices
from agbcube.predict import chips_to_dataarray, predict_run, predict_site, write_maps

# Training lives in `agbcube.train` (it imports torch; `import agbcube` does not).

__all__ = [
    "BAND_PRESETS",
    "AgbcubeError",
    "BandError",
    "Config",
    "ConfigError",
    "CubeError",
    "FoldError",
    "GridError",
    "HybridSiteSpatialKFold",
    "InputFileError",
    "MissingCRSError",
    "NoOverlapError",
    "OutputLockedError",
    "TrainingError",
    "__version__",
    "build_cube",
    "build_site_cube",
    "chips_to_dataarray",
    "compute_indices",
    "config_reference",
    "cube_sites",
    "estimate_range_m",
    "leakage_audit",
    "load_config",
    "make_chips",
    "make_folds",
    "open_cube",
    "open_cube_tree",
    "parse_config",
    "plan_indices",
    "predict_run",
    "predict_site",
    "read_folds",
    "resolve_band_names",
    "write_folds",
    "write_maps",
]
