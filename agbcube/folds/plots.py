"""Fold maps: every chip coloured by its role in one fold."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import geopandas as gpd

from agbcube._io import written_by
from agbcube._plot import label_projected, new_figure

_ROLE_COLOURS = {"train": "#4c72b0", "val": "#dd8452", "test": "#c44e52", "buffer": "#cccccc"}


def plot_fold_map(
    folds: gpd.GeoDataFrame,
    site: str,
    n_folds: int,
    path: str | Path,
    *,
    buffer_m: Mapping[str, float] | None = None,
) -> None:
    """A PNG per site: chips coloured by test fold, then the roles of each fold.

    Chips are drawn in the site's UTM zone, with its coordinates (km) on the axes.
    """
    from matplotlib.patches import Patch

    sub = folds[folds["site"] == site]
    sub = sub.to_crs(sub.estimate_utm_crs())
    n = n_folds + 1
    fig = new_figure((3.4 * n, 4.4))
    axes = fig.subplots(1, n, squeeze=False, sharex=True, sharey=True)[0]
    sub.plot(column="fold", categorical=True, cmap="tab10", ax=axes[0], edgecolor="none")
    axes[0].set_title(f"{site}: test fold", fontsize=9)
    for k in range(n_folds):
        colours = sub[f"role_{k}"].map(_ROLE_COLOURS)
        sub.plot(color=colours, ax=axes[k + 1], edgecolor="none")
        axes[k + 1].set_title(f"fold {k} roles", fontsize=9)
    for i, ax in enumerate(axes):
        ax.set_aspect("equal")
        label_projected(ax, sub.crs)
        if i:
            ax.set_ylabel("")
    handles = [Patch(color=c, label=r) for r, c in _ROLE_COLOURS.items()]
    buf = (buffer_m or {}).get(site)
    title = f"{site}: {len(sub)} chips" + (f", buffer {buf:.0f} m" if buf is not None else "")
    fig.suptitle(title)
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))

    # the caller writes through a temporary path; the metadata marks the PNG as agbcube's
    fig.savefig(path, dpi=90, format="png", metadata={"agbcube": written_by()})
