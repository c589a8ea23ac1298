"""Run plots, fold maps and quick looks: Figures without pyplot state, units, coordinates."""

from __future__ import annotations

import geopandas as gpd
import matplotlib
import numpy as np
import pandas as pd
import pytest
import shapely

from agbcube.folds import plot_fold_map
from agbcube.predict import quicklook
from agbcube.train.plots import plot_residual_map, write_plots
from tests.test_chips import synthetic_cube


@pytest.fixture
def no_global_state(monkeypatch):
    """Fail if library code switches the backend; check it leaves no figure in pyplot."""
    import matplotlib.pyplot as plt

    def refuse(*args, **kwargs):
        raise AssertionError("library code called matplotlib.use()")

    monkeypatch.setattr(matplotlib, "use", refuse)
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


def _run_tables(n_side=6, sites=("alpha", "beta")):
    rng = np.random.default_rng(0)
    rows, geoms = [], []
    for s, site in enumerate(sites):
        for i in range(n_side * n_side):
            r, c = divmod(i, n_side)
            x0, y0 = 80.0 + s + c * 0.01, 22.0 + r * 0.01
            geoms.append(shapely.box(x0, y0, x0 + 0.009, y0 + 0.009))
            rows.append({"chip_id": f"{site}_{i}", "site": site, "fold": i % 3})
    folds = gpd.GeoDataFrame(rows, geometry=geoms, crs="EPSG:4326")
    for k in range(3):
        folds[f"role_{k}"] = np.where(folds.fold == k, "test", "train")
    preds = []
    for model in ("cnn-coordinate", "hgb-pixel"):
        p = folds[["chip_id", "site", "fold"]].copy()
        p["model"] = model
        p["agb_true"] = rng.uniform(50, 300, len(p))
        p["agb_pred"] = p["agb_true"] + rng.normal(0, 30, len(p))
        preds.append(p)
    per_site = {s: {"r2": 0.5, "r2_ci95": [0.3, 0.7]} for s in sites}
    level = {"mg_ha": {"per_site": per_site}}
    metrics = {
        "models": {m: {"chip": level, "pixel": level} for m in ("cnn-coordinate", "hgb-pixel")}
    }
    history = [
        {"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "lr": 1e-3}
        for e in range(5)
    ]
    fold_info = {k: {"history": history} for k in range(3)}
    return folds, pd.concat(preds, ignore_index=True), metrics, fold_info


def _colorbar_labels(fig):
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_write_plots_uses_no_pyplot_state_and_names_the_run(tmp_path, no_global_state):
    folds, preds, metrics, fold_info = _run_tables()
    paths = write_plots(
        tmp_path / "my-run" / "plots", preds, pd.DataFrame(), fold_info, folds, metrics
    )
    names = sorted(p.name for p in paths)
    assert names == [
        "predicted_vs_observed.png",
        "residual_map_alpha.png",
        "residual_map_beta.png",
        "residuals.png",
        "site_performance.png",
        "training_history.png",
    ]
    for p in paths:
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_residual_map_has_units_coordinates_site_and_run(no_global_state):
    folds, preds, _, _ = _run_tables()
    fig = plot_residual_map(preds, folds, "beta", run="cv-1")
    assert _colorbar_labels(fig) == ["residual (Mg/ha)"] * 2
    assert "beta" in fig._suptitle.get_text() and "cv-1" in fig._suptitle.get_text()
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert all(ax.get_xlabel().startswith("easting (km, EPSG:326") for ax in panels)
    assert all(ax.axison for ax in panels)


def test_quicklook_labels_units_and_projected_coordinates(no_global_state):
    ds = synthetic_cube(40, 50)
    fig = quicklook(
        ds["agb"], "agb_std", site="syn", run="r1", transform=ds.rio.transform(), crs=ds.rio.crs
    )
    assert _colorbar_labels(fig) == ["AGB, ensemble standard deviation (Mg/ha)"]
    (ax,) = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert ax.get_xlabel() == "easting (km, EPSG:32643)"
    assert "syn" in ax.get_title() and "r1" in ax.get_title()
    left, right = ax.get_xlim()
    assert (left, right) == (500000.0, 500000.0 + 50 * 40.0)
    fig = quicklook(ds["agb"], "di", site="syn")
    assert _colorbar_labels(fig) == ["dissimilarity index (unitless)"]


def test_fold_map_is_drawn_in_metres(tmp_path, no_global_state):
    folds, *_ = _run_tables()
    plot_fold_map(folds, "alpha", 3, tmp_path / "map.png", buffer_m={"alpha": 500.0})
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


def test_predicted_vs_observed_has_a_legend_of_the_folds(no_global_state):
    """The colours are the test folds: one legend names each."""
    from agbcube.train.plots import plot_predicted_vs_observed

    _, preds, metrics, _ = _run_tables()
    fig = plot_predicted_vs_observed(preds, metrics, run="r")
    (legend,) = fig.legends
    assert legend.get_title().get_text() == "test fold"
    assert [t.get_text() for t in legend.get_texts()] == ["fold 0", "fold 1", "fold 2"]
    panel = fig.axes[0].collections[0]  # a panel's points take their fold's legend colour
    fold_of = preds[(preds.model == "cnn-coordinate") & (preds.site == "alpha")].fold.to_numpy()
    hex_ = matplotlib.colors.to_hex
    colours = {k: hex_(h.get_color()) for k, h in enumerate(legend.legend_handles)}
    got = [hex_(c) for c in panel.get_facecolors()[:6]]
    want = [colours[k] for k in fold_of[:6]]
    assert got == want
