"""Figures built without pyplot: no global state, no backend switch in the user's session.

``matplotlib.figure.Figure`` renders PNGs through its own Agg canvas, so library code never
calls ``matplotlib.use`` or ``pyplot`` (which would change a notebook's backend, or keep every
figure alive in pyplot's registry until closed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agbcube._io import atomic_path


def new_figure(figsize: tuple[float, float]) -> Any:
    """An empty ``Figure`` that belongs to no pyplot figure manager."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig: Any, path: str | Path, *, dpi: int = 90, tight: bool = False) -> Path:
    """Write ``fig`` as a PNG atomically (a temporary sibling, then a rename)."""

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight" if tight else None)
    return path


def axis_units(crs: Any) -> str:
    """The unit of a CRS's axes, for axis labels: 'm', '°' or the CRS's own name."""
    from pyproj import CRS

    name = CRS.from_user_input(crs).axis_info[0].unit_name
    return {"metre": "m", "meter": "m", "degree": "°"}.get(name, name)


def label_projected(ax: Any, crs: Any, *, km: bool = True) -> None:
    """Label an axis holding projected coordinates with the CRS and its unit.

    Metres are shown as kilometres (``km=True``), which keeps tick labels short.
    """
    from matplotlib.ticker import FuncFormatter
    from pyproj import CRS

    crs = CRS.from_user_input(crs)
    unit = axis_units(crs)
    code = crs.to_epsg()
    name = f"EPSG:{code}" if code else crs.name
    if unit == "m" and km:
        unit = "km"
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / 1000:g}"))
    ax.set_xlabel(f"easting ({unit}, {name})" if unit != "°" else "longitude (°)", fontsize=8)
    ax.set_ylabel(f"northing ({unit})" if unit != "°" else "latitude (°)", fontsize=8)
    ax.tick_params(labelsize=7)


def raster_extent(transform: Any, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(left, right, bottom, top)`` of a north-up grid, for ``imshow(extent=...)``."""
    ny, nx = shape
    x0, y0 = transform.c, transform.f
    x1, y1 = x0 + transform.a * nx, y0 + transform.e * ny
    return (min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1))


def finite_limit(values: Any, *, default: float = 1.0) -> float:
    """The largest finite absolute value (``default`` when there is none)."""
    values = np.abs(np.asarray(values, dtype=float))
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size and values.max() > 0 else default
