"""Plots of a cross-validation run (PNG, written atomically).

Each plot is built as a ``matplotlib.figure.Figure`` by its own function (no pyplot, so no
backend switch or global figure registry in a notebook user's session), and
`write_plots` saves them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agbcube._plot import finite_limit, label_projected, new_figure, save_figure

__all__ = [
    "plot_predicted_vs_observed",
    "plot_reliability",
    "plot_residual_map",
    "plot_residuals",
    "plot_site_performance",
    "plot_training_history",
    "write_plots",
]

MG_HA = "Mg/ha"


def _models_and_sites(predictions: pd.DataFrame) -> tuple[list[str], list[str]]:
    return list(pd.unique(predictions["model"])), sorted(pd.unique(predictions["site"]))


def plot_predicted_vs_observed(
    predictions: pd.DataFrame, metrics: dict[str, Any], *, run: str = ""
) -> Any:
    """Predicted against observed chip AGB, one panel per model and site, with its R²; the
    colours are the test folds (one legend for the figure)."""
    models, sites = _models_and_sites(predictions)
    folds = sorted(pd.unique(predictions["fold"]))
    colour = {k: f"C{i % 10}" for i, k in enumerate(folds)}
    fig = new_figure((3.6 * len(sites) + 0.9, 3.4 * len(models) + 0.4))
    axes = fig.subplots(len(models), len(sites), squeeze=False)
    for i, model in enumerate(models):
        for j, site in enumerate(sites):
            ax = axes[i, j]
            d = predictions[(predictions.model == model) & (predictions.site == site)]
            ax.scatter(d.agb_true, d.agb_pred, s=8, c=d.fold.map(colour), alpha=0.8)
            hi = float(np.nanmax([d.agb_true.max(), d.agb_pred.max(), 1.0]))
            ax.plot([0, hi], [0, hi], "k--", lw=0.8)
            r2 = metrics["models"][model]["chip"]["mg_ha"]["per_site"].get(site, {}).get("r2")
            ax.set_title(f"{site} · {model}" + (f"\nR² {r2:.2f}" if r2 is not None else ""))
            ax.set_xlabel(f"observed AGB ({MG_HA})")
            ax.set_ylabel(f"predicted AGB ({MG_HA})")
    from matplotlib.lines import Line2D

    right = 1 - 0.9 / (3.6 * len(sites) + 0.9)  # room for the legend
    fig.suptitle(
        f"chip AGB, test folds · run '{run}'" if run else "chip AGB, test folds", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, right, 1))
    handles = [
        Line2D([], [], ls="", marker="o", ms=5, color=colour[k], label=f"fold {k}") for k in folds
    ]
    fig.legend(handles=handles, title="test fold", loc="center right", frameon=False)
    return fig


def plot_training_history(fold_info: dict[int, dict[str, Any]], *, run: str = "") -> Any | None:
    """Training and validation loss and the learning rate per epoch; None without history."""
    histories = {k: v.get("history") for k, v in fold_info.items() if v.get("history")}
    if not histories:
        return None
    fig = new_figure((10, 4))
    axes = fig.subplots(1, 2)
    for k, hist in histories.items():
        h = pd.DataFrame(hist)
        axes[0].plot(h.epoch + 1, h.train_loss, lw=1, label=f"fold {k} train")
        axes[0].plot(h.epoch + 1, h.val_loss, lw=1, ls="--", label=f"fold {k} val")
        axes[1].plot(h.epoch + 1, h.lr, lw=1, label=f"fold {k}")
    axes[0].set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    axes[1].set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    axes[0].legend(fontsize=6, ncol=2)
    _suptitle(fig, "training history", run)
    return fig


def plot_residuals(predictions: pd.DataFrame, *, run: str = "") -> Any:
    """Residuals against the prediction, and their histogram, per model."""
    models, _ = _models_and_sites(predictions)
    fig = new_figure((9, 3.3 * len(models) + 0.4))
    axes = fig.subplots(len(models), 2, squeeze=False)
    for i, model in enumerate(models):
        d = predictions[predictions.model == model]
        res = d.agb_pred - d.agb_true
        axes[i, 0].scatter(d.agb_pred, res, s=6, alpha=0.6)
        axes[i, 0].axhline(0, color="k", lw=0.8)
        axes[i, 0].set(xlabel=f"predicted ({MG_HA})", ylabel=f"residual ({MG_HA})", title=model)
        axes[i, 1].hist(res.dropna(), bins=40)
        axes[i, 1].set(xlabel=f"residual ({MG_HA})", ylabel="chips", title=f"{model}: residuals")
    _suptitle(fig, "residuals (predicted − observed)", run)
    return fig


def plot_site_performance(
    predictions: pd.DataFrame, metrics: dict[str, Any], *, run: str = ""
) -> Any:
    """Per-site R² with its 95 % interval, chip and pixel level, one bar per model."""
    models, sites = _models_and_sites(predictions)
    fig = new_figure((10, 4))
    axes = fig.subplots(1, 2)
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        for ax, level in zip(axes, ("chip", "pixel"), strict=True):
            per_site = metrics["models"][model][level]["mg_ha"]["per_site"]
            values = np.array([per_site.get(s, {}).get("r2") or 0.0 for s in sites])
            ci = [
                per_site.get(s, {}).get("r2_ci95") or [v, v]
                for s, v in zip(sites, values, strict=True)
            ]
            err = np.clip(
                np.array([[v - c[0], c[1] - v] for v, c in zip(values, ci, strict=True)]).T, 0, None
            )
            x = np.arange(len(sites)) + i * width
            ax.bar(x, values, width, label=model)
            ax.errorbar(x, values, err, fmt="none", color="k", lw=0.8)
    for ax, level in zip(axes, ("chip", "pixel"), strict=True):
        ax.set_xticks(np.arange(len(sites)) + width * (len(models) - 1) / 2, sites)
        ax.set(
            ylabel="R² (pooled over folds, 95 % interval)",
            title=f"{level} level",
            ylim=(min(0, ax.get_ylim()[0]), 1),
        )
        ax.legend(fontsize=8)
    _suptitle(fig, "per-site accuracy", run)
    return fig


def plot_reliability(metrics: dict[str, Any], model: str, *, run: str = "") -> Any | None:
    """Nominal against observed coverage of ``model``'s calibrated intervals on the test
    folds (cross-fitted), per site, at chip and pixel level: on the diagonal, an interval of
    90 % covers 90 % of held-out chips or pixels."""
    found = metrics.get("intervals", {}).get(model)
    if not found:
        return None
    fig = new_figure((10, 4))
    axes = fig.subplots(1, 2)
    for ax, level in zip(axes, ("chip", "pixel"), strict=True):
        for site, curve in sorted(found[level]["reliability"].items()):
            nominal = [float(k) for k in curve]
            ax.plot(nominal, list(curve.values()), marker="o", label=site)
        ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls="--")
        ax.set(
            xlabel="nominal coverage",
            ylabel="observed coverage (held-out folds)",
            title=f"{level} level ({found[level]['scaled_by']})",
            xlim=(0.4, 1),
            ylim=(0.4, 1),
        )
        ax.legend(fontsize=8)
    _suptitle(fig, f"calibrated intervals of {model}", run)
    return fig


def plot_residual_map(predictions: pd.DataFrame, folds: Any, site: str, *, run: str = "") -> Any:
    """Chip footprints of a site coloured by residual, one panel per model, in UTM metres."""
    models, _ = _models_and_sites(predictions)
    geo = folds[["chip_id", "geometry"]]
    fig = new_figure((4.6 * len(models), 4.4))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        d = predictions[(predictions.model == model) & (predictions.site == site)]
        g = geo.merge(d, on="chip_id").set_geometry("geometry")
        g = g.to_crs(g.estimate_utm_crs())
        residual = g.agb_pred - g.agb_true
        lim = finite_limit(residual)
        g.assign(residual=residual).plot(
            column="residual",
            cmap="RdBu_r",
            vmin=-lim,
            vmax=lim,
            legend=True,
            legend_kwds={"label": f"residual ({MG_HA})", "shrink": 0.8},
            ax=ax,
        )
        ax.set_title(model, fontsize=9)
        ax.set_aspect("equal")
        label_projected(ax, g.crs)
    _suptitle(fig, f"{site}: residual per chip (predicted − observed)", run)
    return fig


def _suptitle(fig: Any, what: str, run: str) -> None:
    fig.suptitle(f"{what} · run '{run}'" if run else what, fontsize=10)
    fig.tight_layout()


def write_plots(
    directory: Path,
    predictions: pd.DataFrame,
    pixels: pd.DataFrame,
    fold_info: dict[int, dict[str, Any]],
    folds: Any,
    metrics: dict[str, Any],
    *,
    run: str | None = None,
) -> list[Path]:
    """Predicted vs observed, training history, residuals, per-site scores, residual maps.

    Parameters
    ----------
    directory : Path
        Folder of the PNGs (created).
    predictions : pd.DataFrame
        The run's chip predictions (``chip_id, site, fold, model, agb_true, agb_pred``).
    pixels : pd.DataFrame
        Pixel-level predictions (not plotted yet; kept for the caller's signature).
    fold_info : dict
        Per fold, its record (with ``history``: per epoch ``train_loss, val_loss, lr``).
    folds : GeoDataFrame
        The chips and their geometry.
    metrics : dict
        The run's metrics (per-site R² and intervals).
    run : str, optional
        The run's name for the titles; default the name of ``directory``'s parent.

    Returns
    -------
    list of Path
        The PNGs written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    run = run if run is not None else directory.resolve().parent.name
    _, sites = _models_and_sites(predictions)
    figures = {
        "predicted_vs_observed": plot_predicted_vs_observed(predictions, metrics, run=run),
        "training_history": plot_training_history(fold_info, run=run),
        "residuals": plot_residuals(predictions, run=run),
        "site_performance": plot_site_performance(predictions, metrics, run=run),
    }
    models, _ = _models_and_sites(predictions)
    for model in models:
        figures[f"reliability_{model}"] = plot_reliability(metrics, model, run=run)
    for site in sites:
        figures[f"residual_map_{site}"] = plot_residual_map(predictions, folds, site, run=run)
    return [
        save_figure(fig, directory / f"{name}.png")
        for name, fig in figures.items()
        if fig is not None
    ]
