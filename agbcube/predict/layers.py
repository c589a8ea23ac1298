"""The map layers: what each one is, for COG band metadata, quick looks and STAC Items."""

from __future__ import annotations

from typing import Any

from agbcube._cf import AGB_UNITS

LAYERS = ("agb_mean", "agb_std", "di", "aoa", "agb_spread")
# What each map layer is, for the COGs' band metadata, the quick looks and the STAC Item.
LAYER_INFO: dict[str, dict[str, Any]] = {
    "agb_mean": {
        "title": "AGB, ensemble mean",
        "description": "Above-ground biomass: mean of the run's fold models.",
        "unit": AGB_UNITS,
        "dtype": "float32",
        "nodata": float("nan"),
        "cmap": "YlGn",
    },
    "agb_std": {
        "title": "AGB, ensemble standard deviation",
        "description": "Standard deviation of the fold models' AGB (their disagreement).",
        "unit": AGB_UNITS,
        "dtype": "float32",
        "nodata": float("nan"),
        "cmap": "magma",
    },
    "agb_spread": {
        "title": "AGB, fold ensemble spread",
        "description": "Standard deviation of each fold's members, averaged over the folds: "
        "the spread the run's intervals were calibrated on (agb_std, over every member, "
        "also holds how the folds differ).",
        "unit": AGB_UNITS,
        "dtype": "float32",
        "nodata": float("nan"),
        "cmap": "magma",
    },
    "agb_lower": {
        "title": "AGB, lower bound of the calibrated interval",
        "description": "Lower bound of the prediction interval calibrated on the run's test "
        "folds (metrics.json 'intervals': level, q, beta): agb_mean - q (agb_spread + beta), "
        "not below 0. Outside the area of applicability it is extrapolation: the calibration "
        "holds for pixels like the test folds'.",
        "unit": AGB_UNITS,
        "dtype": "float32",
        "nodata": float("nan"),
        "cmap": "YlGn",
    },
    "agb_upper": {
        "title": "AGB, upper bound of the calibrated interval",
        "description": "Upper bound of the prediction interval calibrated on the run's test "
        "folds: agb_mean + q (agb_spread + beta). Outside the area of applicability it is "
        "extrapolation.",
        "unit": AGB_UNITS,
        "dtype": "float32",
        "nodata": float("nan"),
        "cmap": "YlGn",
    },
    "di": {
        "title": "dissimilarity index",
        "description": "Distance to the nearest training pixel in standardised feature space, "
        "over the mean distance between training pixels (Meyer & Pebesma 2021); unitless.",
        "unit": "1",
        "dtype": "float32",
        "nodata": float("nan"),
        "cmap": "viridis",
    },
    "aoa": {
        "title": "area of applicability",
        "description": "1 where the dissimilarity index is within the training data's "
        "threshold (inside the area of applicability), 0 outside, 255 no data.",
        "unit": None,
        "dtype": "uint8",
        "nodata": 255,
        "cmap": "RdYlGn",
        # a palette in the COG (GIS tools draw the classes), and the classes' names in its tags
        "colormap": {0: (215, 48, 39, 255), 1: (26, 152, 80, 255), 255: (0, 0, 0, 0)},
        "classes": {0: "outside", 1: "inside"},
    },
}
