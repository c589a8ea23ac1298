"""agbcube: above-ground biomass models and maps from satellite stacks and LiDAR AGB rasters."""

from __future__ import annotations

__version__ = "0.1.0"

# Names are imported on first use (PEP 562), so that ``import agbcube.train`` pulls in only what
# training needs: no rasterio/GDAL or odc-geo on a GPU machine that only trains.
from agbcube import errors as _errors  # light: no third-party imports

_EXPORTS = {
    "agbcube.bands": ("BAND_PRESETS", "resolve_band_names"),
    "agbcube.chips": ("make_chips",),
    "agbcube.config": ("Config", "config_reference", "load_config", "parse_config"),
    "agbcube.cube": ("build_cube", "build_site_cube"),
    "agbcube._store": ("cube_sites", "open_cube", "open_cube_tree"),
    "agbcube.errors": tuple(_errors.__all__),
    "agbcube.folds": (
        "HybridSiteSpatialKFold",
        "check_folds_cube",
        "estimate_range_m",
        "leakage_audit",
        "make_folds",
        "read_folds",
        "write_folds",
    ),
    "agbcube.indices": ("compute_indices", "plan_indices"),
    "agbcube.predict": ("chips_to_dataarray", "predict_run", "predict_site", "write_maps"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> object:
    import importlib

    if name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'agbcube' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


# Training lives in `agbcube.train` (it imports torch; `import agbcube` does not).

__all__ = ["__version__", *sorted(_MODULE_OF)]
