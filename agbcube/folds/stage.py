"""The folds stage: cube → chips → folds (``agbcube folds``), with ``buffer_m: auto``."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd

from agbcube._log import reporter
from agbcube._store import cube_site_keys, open_cube, site_read_errors
from agbcube.chips import make_chips, no_chip_reason
from agbcube.errors import CubeError, FoldError
from agbcube.folds.audit import leakage_audit
from agbcube.folds.splitter import HybridSiteSpatialKFold
from agbcube.folds.variogram import estimate_range_m

# --------------------------------------------------------------------------------------------
# the stage: cube -> chips -> folds

log = logging.getLogger(__name__)


def make_folds(config: Any, *, echo: Any = None, client: Any = None) -> gpd.GeoDataFrame:
    """Chips of the config's sites in a built cube, with their folds and roles.

    Parameters
    ----------
    config : agbcube.config.Config
        Uses ``sites`` (their names), ``cube.output``, ``chips`` and ``folds``.
    echo : callable, optional
        Deprecated: receives the progress lines instead of the ``agbcube.folds`` logger.
    client : distributed.Client, optional
        Each site's chips, variogram and buffer search run as a task on its workers (which
        read the cube at the same path); the folds are the same as without it.

    Returns
    -------
    gpd.GeoDataFrame
        The chip columns, ``cluster``, ``fold`` and ``role_0`` … ``role_{K-1}``;
        ``attrs["agbcube"]`` holds the per-site chip summary, buffers, fold layouts, variograms,
        the audit and the cube the chips were cut from (its sites' build keys).

    Raises
    ------
    CubeError
        The cube is missing, incomplete, damaged, or lacks a site of the config.
    FoldError
        No site gives a usable chip (the message gives each site's cause), or the chips cannot
        be split.
    """

    say = reporter(log, echo)
    store = config.cube.output
    chips_cfg, folds_cfg = config.chips, config.folds
    keys = _config_site_keys(config)
    parts, summaries, buffers, variograms = [], {}, {}, {}
    layouts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:  # said once below, or in the error
        warnings.simplefilter("always")
        for site, part in _sites(config, list(keys), client, say):
            gdf, summaries[site], variogram, buffer, layout = part
            if gdf is None:
                continue
            if variogram is not None:
                variograms[site] = variogram
            buffers[site], layouts[site] = buffer, layout
            parts.append(gdf)
    if not parts:
        causes = "; ".join(f"site '{s}': {_no_chip(m, config)}" for s, m in summaries.items())
        raise FoldError(f"no site has a usable chip. {causes}")
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    chips = pd.concat(parts, ignore_index=True)
    cv = HybridSiteSpatialKFold(
        folds_cfg.n_folds,
        buffer_m=buffers,
        validation_fraction=folds_cfg.validation_fraction,
        clusters_per_fold=folds_cfg.clusters_per_fold,
        random_state=folds_cfg.seed,
        layout=layouts,
    )
    roles = cv.assign(chips)
    out = gpd.GeoDataFrame(pd.concat([chips, roles], axis=1), geometry="geometry", crs=chips.crs)
    out.attrs["agbcube"] = {
        "n_folds": folds_cfg.n_folds,
        "chips": chips_cfg.model_dump(mode="json"),
        "folds": folds_cfg.model_dump(mode="json"),
        "buffer_m": buffers,
        "layout": layouts,
        "variograms": variograms,
        "chip_summary": summaries,
        "audit": leakage_audit(out, folds_cfg.n_folds),
        "cube": {"store": str(Path(store).resolve()), "sites": {s: keys[s] for s in summaries}},
    }
    return out


def _config_site_keys(config: Any) -> dict[str, str]:
    """The build key of each of the config's sites in its cube; a site not built is an error."""

    keys = cube_site_keys(config.cube.output)
    missing = [site.name for site in config.sites if site.name not in keys]
    if missing:
        raise CubeError(
            f"cube {config.cube.output} has no site {missing} of the config (its sites: "
            f"{list(keys)}); run `agbcube build-cube CONFIG` first"
        )
    return {site.name: keys[site.name] for site in config.sites}


_SiteFolds = tuple[gpd.GeoDataFrame | None, dict, dict | None, float, int]


def _sites(
    config: Any, sites: list[str], client: Any, say: Any
) -> Iterator[tuple[str, _SiteFolds]]:
    """Every site's `_site_folds`, in the config's order: here one after another, or
    as tasks on ``client`` (their warnings raised here, the first site's error raised)."""
    if client is None:
        for site in sites:
            part = _site_folds(config, site)
            _say_site(say, site, part)
            yield site, part
        return
    from uuid import uuid4

    from distributed import as_completed

    token = uuid4().hex[:8]
    futures = {
        client.submit(_site_folds_task, config, site, key=f"folds/{site}-{token}"): site
        for site in sites
    }
    done: dict[str, _SiteFolds] = {}
    failed: dict[str, BaseException] = {}
    for future in as_completed(list(futures)):
        site = futures[future]
        if future.status != "finished":
            failed[site] = future.exception()
            continue
        done[site], caught = future.result()
        for category, message in caught:
            warnings.warn(message, category, stacklevel=3)
        _say_site(say, site, done[site])
    if failed:
        raise failed[next(s for s in sites if s in failed)]
    for site in sites:
        yield site, done[site]


def _say_site(say: Any, site: str, part: _SiteFolds) -> None:
    gdf, summary, _, buffer, _ = part
    if gdf is not None:
        say(
            f"site '{site}': {summary['kept']} chips of {summary['candidates']} "
            f"(dropped {summary['dropped_low_valid_agb']} for AGB, "
            f"{summary['dropped_nan_features']} for NaN features); buffer {buffer:.0f} m"
        )


def _site_folds(config: Any, site: str) -> _SiteFolds:
    """A site's chips, their summary, its variogram (``buffer_m: auto``), buffer and layout;
    no chips: ``(None, summary, None, nan, 0)``."""
    folds_cfg = config.folds
    gdf, summary, variogram = _cut_site(config, site)
    if gdf is None:
        return None, summary, None, float("nan"), 0
    if variogram is not None:
        buffer, layout = _auto_buffer(gdf, variogram["range_m"], folds_cfg)
    else:
        buffer = max(float(folds_cfg.buffer_m), folds_cfg.min_buffer_m)
        # none enough: layout 0, and the splitter's error if a fold keeps nothing at all
        layout = _first_layout(gdf, buffer, folds_cfg) or 0
    return gdf, summary, variogram, buffer, layout


_ONE_SITE = threading.Lock()  # catching warnings is per process: one site task at a time


def _site_folds_task(config: Any, site: str) -> tuple[_SiteFolds, list[tuple[type, str]]]:
    """`_site_folds` on a worker, with its warnings returned to be raised by the client."""
    import dask

    with _ONE_SITE, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the chip statistics run here, not on the cluster from inside one of its tasks
        with dask.config.set(scheduler="synchronous"):
            part = _site_folds(config, site)
    return part, [(w.category, str(w.message)) for w in caught]


def _cut_site(config: Any, site: str) -> tuple[gpd.GeoDataFrame | None, dict, dict | None]:
    """A site's chips (None, with a warning naming the cause, when it has none), their summary
    and, with ``buffer_m: auto``, its variogram; a damaged store is named with the site."""

    store, chips_cfg = config.cube.output, config.chips
    with site_read_errors(store, site):
        ds = open_cube(store, site)
        gdf, summary = make_chips(
            ds,
            size_px=chips_cfg.size,
            overlap=chips_cfg.overlap,
            min_valid_fraction=chips_cfg.min_valid_fraction,
            max_nan_fraction=chips_cfg.max_nan_fraction,
            site=site,
        )
        if summary["kept"] == 0:
            warnings.warn(
                f"site '{site}' has no usable chip and is left out: {_no_chip(summary, config)}",
                UserWarning,
                stacklevel=5,
            )
            return None, summary, None
        if config.folds.buffer_m != "auto":
            return gdf, summary, None
        return gdf, summary, estimate_range_m(ds, random_state=config.folds.seed)


def _no_chip(summary: dict[str, Any], config: Any) -> str:
    return no_chip_reason(
        summary,
        min_valid_fraction=config.chips.min_valid_fraction,
        max_nan_fraction=config.chips.max_nan_fraction,
    )


LAYOUTS = 8  # layouts tried per site before a buffer is judged too wide for it


def _train_share(
    chips: gpd.GeoDataFrame, buffer_m: float, folds_cfg: Any, layout: int = 0
) -> float:
    """Smallest share, over folds, of a site's non-test chips left for training (0 if none)."""
    cv = HybridSiteSpatialKFold(
        folds_cfg.n_folds,
        buffer_m=buffer_m,
        validation_fraction=folds_cfg.validation_fraction,
        clusters_per_fold=folds_cfg.clusters_per_fold,
        random_state=folds_cfg.seed,
        layout=layout,
    )
    try:
        roles = cv.assign(chips)
    except FoldError:
        return 0.0
    shares = [
        (roles[f"role_{k}"] == "train").sum() / max(1, (roles["fold"] != k).sum())
        for k in range(folds_cfg.n_folds)
    ]
    return float(min(shares))


def _first_layout(chips: gpd.GeoDataFrame, buffer_m: float, folds_cfg: Any) -> int | None:
    """The first of a site's layouts whose every fold keeps ``min_train_fraction`` to train on.

    Which fold a region of a small site falls in decides how much of the site its buffer ring
    takes; another layout (another random start) often keeps enough where the first does not.
    None when none of `LAYOUTS` does at this buffer.
    """
    for layout in range(LAYOUTS):
        if _train_share(chips, buffer_m, folds_cfg, layout) >= folds_cfg.min_train_fraction:
            return layout
    return None


def _auto_buffer(chips: gpd.GeoDataFrame, range_m: float, folds_cfg: Any) -> tuple[float, int]:
    """The variogram range, or the largest smaller buffer that keeps enough training chips.

    A range comparable to the site's size would buffer away every training chip; then the
    buffer is shrunk (never below ``min_buffer_m``) until every fold keeps
    ``min_train_fraction`` of the site's non-test chips, with a warning that says so. Each
    buffer is tried with up to `LAYOUTS` layouts of the site's folds.

    Returns
    -------
    buffer_m : float
    layout : int
        The layout to deal the site's folds with.
    """
    site = str(chips["site"].iloc[0])
    floor = folds_cfg.min_buffer_m
    want = max(range_m, floor)
    layout = _first_layout(chips, want, folds_cfg)
    if layout is not None:
        return want, layout
    layout = _first_layout(chips, floor, folds_cfg)
    if layout is None:
        raise FoldError(
            f"site '{site}': even the minimum buffer of {floor:.0f} m leaves a fold with less "
            f"than {folds_cfg.min_train_fraction:.0%} of the site's chips to train on (tried "
            f"{LAYOUTS} fold layouts); lower folds.min_buffer_m or folds.n_folds, or use "
            "smaller chips"
        )
    lo, hi = floor, want
    for _ in range(10):
        mid = 0.5 * (lo + hi)
        if _train_share(chips, mid, folds_cfg, layout) >= folds_cfg.min_train_fraction:
            lo = mid
        else:
            hi = mid
    warnings.warn(
        f"site '{site}': its AGB autocorrelation range ({range_m:.0f} m) would leave a fold "
        f"with less than {folds_cfg.min_train_fraction:.0%} of the chips to train on; the "
        f"buffer is {lo:.0f} m instead. Test chips closer than the range to training chips may "
        "give optimistic estimates at this site.",
        UserWarning,
        stacklevel=5,
    )
    return lo, layout
