"""The predict stage: a run and a site of its cube → the site's maps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from agbcube._io import digest
from agbcube.config import load_run_config
from agbcube.errors import TrainingError
from agbcube.predict.aoa import run_aoa
from agbcube.predict.models import EnsembleFile, device_here
from agbcube.predict.tiles import predict_site
from agbcube.predict.windows import check_window

# --------------------------------------------------------------------------------------------
# the stage


def predict_run(
    run_dir: str | Path,
    ds: xr.Dataset,
    *,
    device: str = "cpu",
    window_px: int | None = None,
    stride_px: int | None = None,
    aoa: bool = True,
    block_px: int | None = None,
) -> xr.Dataset:
    """Predict a site's cube with the fold ensemble of a training run (lazily).

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by ``agbcube train``.
    ds : xr.Dataset
        A site's cube, from the training cube or built the same way for a new area.
    device : str
        Torch device; ``auto`` is resolved by each process that computes tiles (on a cluster,
        each worker loads the ensemble once, on its own device).
    window_px : int, optional
        Window side; default the chip size (chip head) or 4 chips (dense head).
    stride_px : int, optional
        Window stride; default half a window (chip head: each pixel blends ~4 chip values) or
        a quarter window (dense head).
    aoa : bool
        Compute the dissimilarity index and the AOA mask.
    block_px : int, optional
        Tile side (see `predict_site`).

    Returns
    -------
    xr.Dataset
        As `predict_site`, with ``attrs["key"]``: a digest of the ensemble, the site's
        cube and the settings, with which `write_maps` resumes an interrupted write.
    """
    run_dir = Path(run_dir)
    store = run_cube(run_dir)
    ensemble_file = run_dir / "ensemble.pt"
    if not ensemble_file.is_file():
        raise TrainingError(
            f"{ensemble_file} does not exist: the run did not finish; run `agbcube train CONFIG "
            f"--output {run_dir} --resume` to finish it"
        )
    # the settings and the margin, from the models as this process loads them (the tiles of a
    # threaded run share them; a cluster's workers load their own)
    _, spec, _ = EnsembleFile.of(ensemble_file).load(device_here(device))
    tcfg, geometry = spec["train"], spec["geometry"]
    size = geometry.size_px  # the chips, not windows
    dense = tcfg["head"] == "dense"
    default = 4 * size if dense else size
    window = window_px or default
    stride = stride_px or max(1, window // (4 if dense else 2))
    check_window(window, stride, (ds.sizes["y"], ds.sizes["x"]), default)
    reference = run_aoa(run_dir, store, spec["bands"], size) if aoa else None
    maps = predict_site(
        ds,
        ensemble_file,
        window_px=window,
        stride_px=stride,
        coordinates=tcfg["coordinates"] == "geographic",
        log_target=bool(tcfg["log_target"]),
        tta=int(tcfg["tta_rotations"]) if tcfg["tta"] else 1,
        device=device,
        aoa=reference,
        bands=spec["bands"],
        block_px=block_px,
        reach_px=geometry.reach_px,
        member_folds=spec.get("folds"),
    )
    site = str(ds.attrs.get("site", ""))
    maps = with_interval(maps, calibrated_interval(run_dir, tcfg["model"], site))
    maps.attrs["key"] = _maps_key(run_dir, ds, maps, window=window, stride=stride, aoa=aoa)
    maps.attrs["run"] = run_dir.resolve().name
    maps.attrs.update(window_px=window, stride_px=stride)
    return maps


def calibrated_interval(run_dir: Path, model: str, site: str) -> dict[str, Any] | None:
    """The pixel-level interval the run calibrated on its test folds for ``model``
    (``level``, ``q``, ``beta``; see `agbcube.train.intervals`): the site's own where the run
    tested it (sites differ: on the benchmark the pooled one covered 74 % at one site and
    97 % at another), else the one pooled over the run's sites (a new area). None for a run
    from before intervals or one whose folds held too few pixels for its level."""
    path = run_dir / "metrics.json"
    try:
        found = json.loads(path.read_text())["intervals"][model]["pixel"]
        own = found.get("per_site", {}).get(site)
        chosen, source = (own, f"site '{site}'") if own else (found, "pooled over the run's sites")
        interval = {k: float(chosen[k]) for k in ("level", "q", "beta")}
        # one width when the CV had no spread to scale (one member per fold, the baseline)
        interval["scaled"] = chosen.get("scaled_by", "ensemble spread") == "ensemble spread"
    except KeyError:  # a run from before intervals
        return None
    except (OSError, ValueError, TypeError, AttributeError) as err:
        warnings.warn(
            f"{path} cannot be read ({type(err).__name__}): the maps get no calibrated "
            "interval (agb_lower, agb_upper); restore it, or train the run again",
            UserWarning,
            stacklevel=2,
        )
        return None
    return {**interval, "calibrated_on": source} if np.isfinite(interval["q"]) else None


def with_interval(maps: xr.Dataset, interval: dict[str, Any] | None) -> xr.Dataset:
    """``maps`` with ``agb_lower`` and ``agb_upper`` (lazily) from a calibrated interval: the
    mean ± q (spread + beta), with the fold ensemble's spread (``agb_spread``) that the run
    calibrated, the lower bound not below 0; ``attrs["interval"]`` records it."""
    if interval is None:
        return maps
    if interval.get("scaled", True):
        half = interval["q"] * (maps["agb_spread"] + interval["beta"])
    else:  # calibrated without a spread: one width, q
        half = xr.full_like(maps["agb_spread"], interval["q"]).where(maps["agb_mean"].notnull())
    lower = np.maximum(maps["agb_mean"] - half, 0).astype(np.float32)
    upper = (maps["agb_mean"] + half).astype(np.float32)
    out = maps.assign(agb_lower=lower, agb_upper=upper)
    for name in ("agb_lower", "agb_upper"):
        out[name].attrs = {**maps["agb_mean"].attrs, "interval_level": interval["level"]}
    out.attrs["interval"] = json.dumps(interval)
    return out


def _maps_key(
    run_dir: Path, ds: xr.Dataset, maps: xr.Dataset, *, window: int, stride: int, aoa: bool
) -> str:
    """What the maps depend on: an interrupted write resumes only into maps made the same way."""
    ensemble = (run_dir / "ensemble.pt").stat()
    return digest(
        {
            "ensemble": [str((run_dir / "ensemble.pt").resolve()), ensemble.st_size],
            "ensemble_mtime_ns": ensemble.st_mtime_ns,
            "site": ds.attrs.get("site"),
            "cube": ds.attrs.get("provenance"),
            "shape": [ds.sizes["y"], ds.sizes["x"]],
            "window": window,
            "stride": stride,
            "tiles": [list(c) for c in maps["agb_mean"].chunks],
            "aoa": aoa,
        }
    )


def run_cube(run_dir: str | Path) -> Path:
    """The cube a training run was trained on, from its config.yaml (read back through the
    same validation as a fresh config).

    Raises
    ------
    ConfigError
        ``run_dir`` holds no readable, valid config.yaml.
    """

    return load_run_config(run_dir).cube.output
