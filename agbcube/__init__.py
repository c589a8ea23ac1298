"""agbcube: above-ground biomass models and maps from satellite stacks and LiDAR AGB rasters."""

from __future__ import annotations

__version__ = "0.1.0"

from agbcube.bands import BAND_PRESETS, resolve_band_names
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
from agbcube.indices import compute_indices, plan_indices

__all__ = [
    "BAND_PRESETS",
    "AgbcubeError",
    "BandError",
    "Config",
    "ConfigError",
    "CubeError",
    "FoldError",
    "GridError",
    "InputFileError",
    "MissingCRSError",
    "NoOverlapError",
    "OutputLockedError",
    "TrainingError",
    "__version__",
    "build_cube",
    "build_site_cube",
    "compute_indices",
    "config_reference",
    "cube_sites",
    "load_config",
    "open_cube",
    "open_cube_tree",
    "parse_config",
    "plan_indices",
    "resolve_band_names",
]
