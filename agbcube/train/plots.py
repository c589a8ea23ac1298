"""Plots of a cross-validation run (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["write_plots"]


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    from agbcube._io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def write_plots(
    directory: Path,
    predictions: pd.DataFrame,
    pixels: pd.DataFrame,
    fold_info: dict[int, dict[str, Any]],
    folds: Any,
    metrics: dict[str, Any],
) -> list[Path]:
    """Predicted vs observed, training history, residuals, per-site scores, residual maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    models = list(pd.unique(predictions["model"]))
    sites = sorted(pd.unique(predictions["site"]))

    # predicted vs observed, one panel per site and model
    fig, axes = plt.subplots(
        len(models), len(sites), figsize=(3.6 * len(sites), 3.4 * len(models)), squeeze=False
    )
    for i, model in enumerate(models):
        for j, site in enumerate(sites):
            ax = axes[i, j]
            d = predictions[(predictions.model == model) & (predictions.site == site)]
            ax.scatter(d.agb_true, d.agb_pred, s=8, c=d.fold, cmap="tab10", alpha=0.8)
            hi = float(np.nanmax([d.agb_true.max(), d.agb_pred.max(), 1.0]))
            ax.plot([0, hi], [0, hi], "k--", lw=0.8)
            m = metrics["models"][model]["chip"]["mg_ha"]["per_site"].get(site, {})
            r2 = m.get("r2")
            ax.set_title(f"{site} · {model}\nR² {r2:.2f}" if r2 is not None else site, fontsize=9)
            ax.set_xlabel("observed AGB (Mg/ha)")
            ax.set_ylabel("predicted AGB (Mg/ha)")
    fig.tight_layout()
    path = directory / "predicted_vs_observed.png"
    _save(fig, path)
    written.append(path)

    # training history
    histories = {k: v.get("history") for k, v in fold_info.items() if v.get("history")}
    if histories:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for k, hist in histories.items():
            h = pd.DataFrame(hist)
            axes[0].plot(h.epoch + 1, h.train_loss, lw=1, label=f"fold {k} train")
            axes[0].plot(h.epoch + 1, h.val_loss, lw=1, ls="--", label=f"fold {k} val")
            axes[1].plot(h.epoch + 1, h.lr, lw=1, label=f"fold {k}")
        axes[0].set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
        axes[1].set(xlabel="epoch", ylabel="learning rate", title="learning rate")
        axes[0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = directory / "training_history.png"
        _save(fig, path)
        written.append(path)

    # residuals
    fig, axes = plt.subplots(len(models), 2, figsize=(9, 3.3 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        d = predictions[predictions.model == model]
        res = d.agb_pred - d.agb_true
        axes[i, 0].scatter(d.agb_pred, res, s=6, alpha=0.6)
        axes[i, 0].axhline(0, color="k", lw=0.8)
        axes[i, 0].set(xlabel="predicted (Mg/ha)", ylabel="residual (Mg/ha)", title=model)
        axes[i, 1].hist(res.dropna(), bins=40)
        axes[i, 1].set(xlabel="residual (Mg/ha)", title=f"{model}: residuals")
    fig.tight_layout()
    path = directory / "residuals.png"
    _save(fig, path)
    written.append(path)

    # per-site performance, chip and pixel level
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
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
            ax.bar(np.arange(len(sites)) + i * width, values, width, label=model)
            ax.errorbar(
                np.arange(len(sites)) + i * width, values, err, fmt="none", color="k", lw=0.8
            )
    for ax, level in zip(axes, ("chip", "pixel"), strict=True):
        ax.set_xticks(np.arange(len(sites)) + width * (len(models) - 1) / 2, sites)
        ax.set(
            ylabel="R² (pooled over folds, 95 % interval)",
            title=f"{level} level",
            ylim=(min(0, ax.get_ylim()[0]), 1),
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = directory / "site_performance.png"
    _save(fig, path)
    written.append(path)

    # residual map per site (chip footprints coloured by residual)
    geo = folds[["chip_id", "geometry"]]
    for site in sites:
        fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4), squeeze=False)
        for i, model in enumerate(models):
            d = predictions[(predictions.model == model) & (predictions.site == site)]
            g = geo.merge(d, on="chip_id")
            g = g.set_geometry("geometry").to_crs(g.estimate_utm_crs())
            lim = float(np.nanmax(np.abs(g.agb_pred - g.agb_true))) or 1.0
            g.assign(residual=g.agb_pred - g.agb_true).plot(
                column="residual", cmap="RdBu_r", vmin=-lim, vmax=lim, legend=True, ax=axes[0, i]
            )
            axes[0, i].set_title(f"{site} · {model}: residual (Mg/ha)", fontsize=9)
            axes[0, i].set_axis_off()
        fig.tight_layout()
        path = directory / f"residual_map_{site}.png"
        _save(fig, path)
        written.append(path)
    return written
