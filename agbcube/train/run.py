"""``agbcube train``: cross-validated training of every fold, with outputs in a run directory.

Run directory::

    config.yaml            the resolved configuration
    folds.parquet          the folds used (a copy)
    fold_k/model.pt        the fold's model, standardisation and settings
    fold_k/checkpoint.pt   last epoch's full training state (for --resume)
    fold_k/DONE            written last: the fold is complete
    predictions.parquet    chip_id, site, fold, model, agb_true, agb_pred, log_true, log_pred
    metrics.json           chip and pixel level, Mg/ha and log scale, per fold/site/overall
    ensemble.pt            every fold's model, for `agbcube predict`
    plots/*.png
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from agbcube._io import atomic_path, output_lock, remove_path, write_json_atomic
from agbcube.errors import TrainingError

__all__ = ["load_ensemble", "run_cv"]

CNN = "cnn-coordinate"
HGB = "hgb-pixel"


def _stride(chips_cfg: Any) -> int:
    return max(1, round(chips_cfg.size * (1.0 - chips_cfg.overlap)))


def _ensure_folds(config: Any, echo: Callable[[str], None]) -> Any:
    from agbcube.folds import make_folds, read_folds, write_folds

    path = config.folds.output
    if not Path(path).exists():
        echo(f"no folds at {path}: making them first")
        write_folds(make_folds(config, echo=echo), path)
    folds = read_folds(path)
    made_with = folds.attrs.get("agbcube", {}).get("chips")
    if made_with is not None:
        want = config.chips.model_dump(mode="json")
        if any(made_with.get(k) != want[k] for k in ("size", "overlap")):
            raise TrainingError(
                f"folds {path} were made with chips {made_with}, the config says {want}; run "
                "`agbcube folds` again"
            )
    return folds


def _prepare_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise TrainingError(
            f"run directory {out} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or --output for a new one"
        )
    if overwrite and out.exists():
        for child in out.iterdir():
            if not child.name.startswith("."):
                remove_path(child)
    out.mkdir(parents=True, exist_ok=True)


def run_cv(
    config: Any,
    *,
    device: str | None = None,
    epochs: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    output: str | Path | None = None,
    echo: Callable[[str], None] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every fold; write the run directory.

    Parameters
    ----------
    config : agbcube.config.Config
        Reads ``cube.output``, ``chips``, ``folds`` (making the folds when missing) and ``train``.
    device : str, optional
        Overrides ``train.device``: ``"auto"``, ``"cpu"``, ``"cuda"``.
    epochs : int, optional
        Overrides ``train.epochs``.
    resume : bool
        Continue an interrupted run: finished folds are kept, the running one continues from
        its last checkpoint.
    overwrite : bool
        Replace an existing run.
    output : str or Path, optional
        Overrides ``train.output``.
    echo : callable, optional
        Receives progress lines.
    plots : bool
        Write the plots.

    Returns
    -------
    dict
        The content of ``metrics.json``.
    """
    import torch

    from agbcube.train.data import read_chips
    from agbcube.train.loop import resolve_device

    say = echo or (lambda _msg: None)
    tcfg = config.train
    out = Path(output or tcfg.output)
    dev = resolve_device(device or tcfg.device)
    t_start = time.perf_counter()
    with output_lock(out, what="run directory"):
        _prepare_output(out, resume=resume, overwrite=overwrite)
        folds = _ensure_folds(config, say)
        n_folds = sum(1 for c in folds.columns if c.startswith("role_"))
        _write_config(config, out / "config.yaml", device=str(dev), epochs=epochs)
        with atomic_path(out / "folds.parquet") as tmp:
            shutil.copyfile(config.folds.output, tmp)
        t_read = time.perf_counter()
        stream = _use_streaming(tcfg, folds, config, dev)
        chips = None
        if not stream:
            chips = read_chips(
                config.cube.output,
                folds,
                size_px=config.chips.size,
                stride_px=_stride(config.chips),
                bands=tcfg.bands,
            )
            say(
                f"read {len(chips)} chips × {chips.x.shape[1]} bands in "
                f"{time.perf_counter() - t_read:.1f} s; training on {dev}, device-resident"
            )
        else:
            say(f"streaming {len(folds)} chips from the cube; training on {dev}")
        rows, pixel_rows, fold_info = [], [], {}
        deterministic = torch.are_deterministic_algorithms_enabled()
        if dev.type == "cpu":
            torch.use_deterministic_algorithms(True)
        try:
            for k in range(n_folds):
                fold_dir = out / f"fold_{k}"
                fold_dir.mkdir(exist_ok=True)
                if resume and (fold_dir / "DONE").exists():
                    say(f"fold {k}: complete, kept")
                else:
                    remove_path(fold_dir / "DONE")
                    _train_fold(k, folds, chips, config, dev, fold_dir, epochs, resume, say)
                pred = pd.read_parquet(fold_dir / "predictions.parquet")
                rows.append(pred)
                pixel_rows.append(pd.read_parquet(fold_dir / "pixels.parquet"))
                fold_info[k] = json.loads((fold_dir / "DONE").read_text())
        finally:
            torch.use_deterministic_algorithms(deterministic)
        predictions = pd.concat(rows, ignore_index=True)
        pixels = pd.concat(pixel_rows, ignore_index=True)
        with atomic_path(out / "predictions.parquet") as tmp:
            predictions.to_parquet(tmp, index=False)
        metrics = _metrics(predictions, pixels, fold_info, config)
        metrics["run"] = {
            "device": str(dev),
            "wall_s": time.perf_counter() - t_start,
            "n_chips": len(folds),
            "data_path": "stream" if stream else "device",
        }
        write_json_atomic(out / "metrics.json", metrics)
        if tcfg.model == CNN:
            _write_ensemble(out, n_folds)
        if plots:
            from agbcube.train.plots import write_plots

            write_plots(out / "plots", predictions, pixels, fold_info, folds, metrics)
    return metrics


def _use_streaming(tcfg: Any, folds: pd.DataFrame, config: Any, dev: Any) -> bool:
    """``data_path: auto``: device-resident when every chip fits in half the free memory."""
    import os

    if tcfg.data_path != "auto":
        return tcfg.data_path == "stream"
    n_bands = len(tcfg.bands) if tcfg.bands else len(_cube_bands(config))
    need = len(folds) * (n_bands + 3) * config.chips.size**2 * 4 * 2  # host + device copies
    if dev.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(dev)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need > 0.5 * free


def _write_config(config: Any, path: Path, *, device: str, epochs: int | None) -> None:
    data = config.model_dump(mode="json")
    if epochs is not None:
        data["train"]["epochs"] = epochs
    data["train"]["device"] = device
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))


class _FoldData:
    """One fold's chips, device-resident or streamed, behind one interface."""

    def __init__(self, k: int, folds: pd.DataFrame, chips: Any, config: Any, dev: Any) -> None:
        from agbcube.train.data import (
            DeviceChips,
            Standardiser,
            StreamingChips,
            StreamSource,
            TargetTransform,
            make_target,
            model_inputs,
        )

        tcfg = config.train
        role = folds[f"role_{k}"].to_numpy()
        self.train, self.val, self.test = (
            np.flatnonzero(role == r) for r in ("train", "val", "test")
        )
        coords = tcfg.coordinates == "geographic"
        dense = tcfg.head == "dense"
        self.chips, self.folds, self.config = chips, folds, config
        if chips is not None:  # device-resident
            inputs = model_inputs(chips, coordinates=coords)
            target = make_target(chips.agb, log=tcfg.log_target, per_chip=not dense)
            self.target = TargetTransform.fit(target[self.train], log=tcfg.log_target)
            target = self.target.encode(target)
            self.std = Standardiser.fit(inputs[self.train])
            self.source = lambda idx: DeviceChips(inputs[idx], target[idx], self.std, dev)
            self.train_src = self.source(self.train)
            self.val_src = self.source(self.val) if self.val.size else None
            self.in_channels, self.size_px = inputs.shape[1], chips.x.shape[-1]
            self.bands = chips.bands
            test_x, test_agb = inputs[self.test], chips.agb[self.test]
            self.test_blocks = lambda: (
                (test_x[i : i + 256], test_agb[i : i + 256]) for i in range(0, len(test_x), 256)
            )
            return

        def dataset(idx: np.ndarray, std: Any, with_coords: bool = coords) -> StreamingChips:
            return StreamingChips(
                config.cube.output,
                folds.iloc[idx],
                size_px=config.chips.size,
                stride_px=_stride(config.chips),
                standardiser=std,
                coordinates=with_coords,
                log_target=tcfg.log_target,
                chip_target=not dense,
                bands=tcfg.bands,
            )

        self.dataset = dataset
        train_ds = dataset(self.train, None)
        self.std = Standardiser.fit_blocks(x for x, _ in train_ds.raw_blocks())
        train_target = np.concatenate(
            [
                make_target(a, log=tcfg.log_target, per_chip=not dense).ravel()
                for _, a in train_ds.raw_blocks()
            ]
        )
        self.target = TargetTransform.fit(train_target, log=tcfg.log_target)
        train_ds.standardiser, train_ds.target_transform = self.std, self.target
        self.train_src = StreamSource(train_ds, dev, num_workers=tcfg.num_workers)

        def source(idx: np.ndarray) -> StreamSource:
            ds = dataset(idx, self.std)
            ds.target_transform = self.target
            return StreamSource(ds, dev, num_workers=tcfg.num_workers)

        self.source = source
        self.val_src = source(self.val) if self.val.size else None
        first_x, _ = train_ds.raw(0)
        self.in_channels, self.size_px = first_x.shape[0], first_x.shape[-1]
        self.bands = tcfg.bands or _cube_bands(config)
        self.test_blocks = lambda: dataset(self.test, None).raw_blocks()

    def baseline_chips(self, idx: np.ndarray, max_pixels: int, seed: int) -> tuple[Any, Any]:
        """Raw features and AGB of the chips at ``idx`` (a subsample when streaming)."""
        if self.chips is not None:
            return self.chips.x[idx], self.chips.agb[idx]
        per_chip = self.config.chips.size**2
        n = min(idx.size, int(np.ceil(1.5 * max_pixels / per_chip)))
        pick = np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
        blocks = list(self.dataset(pick, None, with_coords=False).raw_blocks())
        return np.concatenate([x for x, _ in blocks]), np.concatenate([a for _, a in blocks])


def _cube_bands(config: Any) -> list[str]:
    from agbcube.cube import cube_sites, open_cube

    site = cube_sites(config.cube.output)[0]
    return [str(b) for b in open_cube(config.cube.output, site)["band"].values]


def _train_fold(
    k: int,
    folds: pd.DataFrame,
    chips: Any,
    config: Any,
    dev: Any,
    fold_dir: Path,
    epochs: int | None,
    resume: bool,
    say: Callable[[str], None],
) -> None:
    """Train fold ``k`` (the CNN and/or the baseline) and write its predictions and model."""
    import torch

    from agbcube.folds import training_pool
    from agbcube.train.data import make_target
    from agbcube.train.loop import build_model, chip_centres_km, fit_fold, predict

    tcfg = config.train
    data = _FoldData(k, folds, chips, config, dev)
    train, val, test = data.train, data.val, data.test
    # every chip beyond the test buffer: what a refit and the baseline (no validation) train on
    with_hgb = HGB in (tcfg.model, tcfg.baseline)
    pool = training_pool(folds, k) if (tcfg.refit and tcfg.model == CNN) or with_hgb else None
    meta = folds[["chip_id", "site"]].iloc[test].reset_index(drop=True)
    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # model -> (chip Mg/ha, pixel Mg/ha)
    info: dict[str, Any] = {
        "fold": k,
        "n_train": int(train.size),
        "n_val": int(val.size),
        "n_test": int(test.size),
        "data_path": "device" if chips is not None else "stream",
    }
    agb_test = None
    t0 = time.perf_counter()
    if tcfg.model == CNN:
        coords = tcfg.coordinates == "geographic"
        centres = torch.from_numpy(chip_centres_km(folds.iloc[train])).to(dev)
        seed = tcfg.seed * 1000 + k
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            model = build_model(tcfg, data.in_channels, data.size_px).to(dev)
            fit = fit_fold(
                model,
                data.train_src,
                data.val_src,
                tcfg,
                n_spectral=data.in_channels - (2 if coords else 0),
                seed=seed,
                epochs=epochs,
                checkpoint=fold_dir / "checkpoint.pt",
                resume=resume,
                centres=centres,
                echo=say,
                label=f"fold {k}",
            )
            if tcfg.refit:
                info.update(n_refit=int(pool.size), refit_epochs=fit.best_epoch + 1)
                torch.manual_seed(seed + 500_000)
                model = build_model(tcfg, data.in_channels, data.size_px).to(dev)
                fit_fold(
                    model,
                    data.source(pool),
                    None,
                    tcfg,
                    n_spectral=data.in_channels - (2 if coords else 0),
                    seed=seed + 500_000,
                    epochs=fit.best_epoch + 1,
                    checkpoint=fold_dir / "checkpoint_refit.pt",
                    resume=resume,
                    centres=torch.from_numpy(chip_centres_km(folds.iloc[pool])).to(dev),
                    echo=say,
                    label=f"fold {k} refit on {pool.size} chips",
                    restore_best=False,
                )
        outs, agbs = [], []
        for xb, agb_b in data.test_blocks():
            x = torch.from_numpy(data.std.apply(xb)).to(dev)
            outs.append(predict(model, x, tta=tcfg.tta_rotations if tcfg.tta else 1).cpu().numpy())
            agbs.append(agb_b)
        raw, agb_test = np.concatenate(outs), np.concatenate(agbs)
        mg = data.target.decode(raw)
        if tcfg.head == "dense":
            pix = np.where(np.isfinite(agb_test), mg, np.nan)
            chip_pred = np.nanmean(pix.reshape(len(pix), -1), axis=1)
        else:
            chip_pred = mg
            pix = np.broadcast_to(mg[:, None, None], agb_test.shape)
        preds[CNN] = (chip_pred, pix)
        torch.save(
            {
                "state_dict": model.state_dict(),
                "standardiser": data.std.to_dict(),
                "target": data.target.to_dict(),
                "in_channels": int(data.in_channels),
                "size_px": int(data.size_px),
                "bands": list(data.bands),
                "train": tcfg.model_dump(mode="json"),
                "fold": k,
            },
            fold_dir / "model.pt",
        )
        info.update(
            best_epoch=fit.best_epoch,
            epochs_run=len(fit.history),
            stopped=fit.stopped,
            bad_steps=fit.bad_steps,
            history=fit.history,
        )
    info["cnn_s"] = time.perf_counter() - t0
    if with_hgb:
        from agbcube.train.baseline import fit_hgb_pixels, predict_hgb_pixels

        t1 = time.perf_counter()
        fit_x, fit_agb = data.baseline_chips(pool, tcfg.hgb_max_pixels, tcfg.seed + k)
        target = make_target(fit_agb, log=tcfg.log_target, per_chip=False)
        hgb = fit_hgb_pixels(
            fit_x, target, max_pixels=tcfg.hgb_max_pixels, random_state=tcfg.seed + k
        )
        outs, agbs = [], []
        n_feat = len(data.bands)
        for xb, agb_b in data.test_blocks():
            outs.append(predict_hgb_pixels(hgb, xb[:, :n_feat]))
            agbs.append(agb_b)
        raw, agb_test = np.concatenate(outs), np.concatenate(agbs)
        mg = np.expm1(raw) if tcfg.log_target else raw
        pix = np.where(np.isfinite(agb_test), mg, np.nan)
        preds[HGB] = (np.nanmean(pix.reshape(len(pix), -1), axis=1), pix)
        info["hgb_s"] = time.perf_counter() - t1
        say(f"fold {k}: {HGB} baseline fitted in {info['hgb_s']:.1f} s")
    assert agb_test is not None
    true_chip = make_target(agb_test, log=False, per_chip=True)
    frames, pixel_frames = [], []
    valid = np.isfinite(agb_test)
    for name, (chip_pred, pix) in preds.items():
        frames.append(
            meta.assign(
                fold=k,
                model=name,
                agb_true=true_chip.astype(np.float64),
                agb_pred=chip_pred.astype(np.float64),
                log_true=np.log1p(true_chip.astype(np.float64)),
                log_pred=np.log1p(np.clip(chip_pred.astype(np.float64), 0, None)),
            )
        )
        site_px = np.broadcast_to(meta["site"].to_numpy()[:, None, None], agb_test.shape)
        pixel_frames.append(
            pd.DataFrame(
                {
                    "site": site_px[valid],
                    "fold": k,
                    "model": name,
                    "agb_true": agb_test[valid].astype(np.float32),
                    "agb_pred": np.asarray(pix)[valid].astype(np.float32),
                }
            )
        )
    pd.concat(frames, ignore_index=True).to_parquet(fold_dir / "predictions.parquet", index=False)
    pd.concat(pixel_frames, ignore_index=True).to_parquet(fold_dir / "pixels.parquet", index=False)
    (fold_dir / "DONE").write_text(json.dumps(info, default=float))  # written last


def _metrics(
    predictions: pd.DataFrame, pixels: pd.DataFrame, fold_info: dict, config: Any
) -> dict[str, Any]:
    from agbcube.train.metrics import summarise

    out: dict[str, Any] = {"models": {}}
    for name, chip in predictions.groupby("model"):
        pix = pixels[pixels["model"] == name].assign(
            log_true=lambda d: np.log1p(d["agb_true"].astype(np.float64)),
            log_pred=lambda d: np.log1p(np.clip(d["agb_pred"].astype(np.float64), 0, None)),
        )
        out["models"][name] = {
            "chip": {
                "mg_ha": summarise(chip, true="agb_true", pred="agb_pred"),
                "log": summarise(chip, true="log_true", pred="log_pred"),
            },
            "pixel": {
                "mg_ha": summarise(pix, true="agb_true", pred="agb_pred"),
                "log": summarise(pix, true="log_true", pred="log_pred"),
            },
        }
    out["folds"] = {
        int(k): {key: v for key, v in info.items() if key != "history"}
        for k, info in fold_info.items()
    }
    out["primary_model"] = config.train.model
    return out


def _write_ensemble(out: Path, n_folds: int) -> None:
    import torch

    members = [
        torch.load(out / f"fold_{k}" / "model.pt", weights_only=False) for k in range(n_folds)
    ]
    with atomic_path(out / "ensemble.pt") as tmp:
        torch.save({"format": 1, "members": members}, tmp)


def load_ensemble(run_dir: str | Path, device: str = "cpu") -> tuple[list[Any], dict[str, Any]]:
    """The fold models of a run, ready for prediction, and their shared settings.

    Returns
    -------
    models : list of (torch.nn.Module, Standardiser, TargetTransform)
    spec : dict
        ``bands``, ``size_px``, ``train`` (the training settings).
    """
    import torch

    from agbcube.config import TrainConfig
    from agbcube.train.data import Standardiser, TargetTransform
    from agbcube.train.loop import build_model

    path = Path(run_dir) / "ensemble.pt"
    if not path.exists():
        raise TrainingError(f"{path} does not exist: train with `agbcube train` first")
    blob = torch.load(path, map_location=device, weights_only=False)
    models = []
    for member in blob["members"]:
        tcfg = TrainConfig.model_validate(member["train"])
        model = build_model(tcfg, member["in_channels"], member["size_px"]).to(device)
        model.load_state_dict(member["state_dict"])
        model.eval()
        target = (
            TargetTransform.from_dict(member["target"])
            if "target" in member  # runs from before target standardisation
            else TargetTransform(log=bool(tcfg.log_target))
        )
        models.append((model, Standardiser.from_dict(member["standardiser"]), target))
    first = blob["members"][0]
    return models, {"bands": first["bands"], "size_px": first["size_px"], "train": first["train"]}
