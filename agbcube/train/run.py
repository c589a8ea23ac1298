"""``agbcube train``: cross-validated training of every fold, with outputs in a run directory.

Run directory::

    config.yaml            the resolved configuration
    folds.parquet          the folds used (a copy)
    fold_k/model.pt        the fold's model, standardisation and settings
    fold_k/model_m.pt      further members of the fold's ensemble (train.ensemble > 1)
    fold_k/checkpoint.pt   last epoch's full training state (for --resume)
    fold_k/DONE            written last: the fold is complete
    predictions.parquet    chip_id, site, fold, model, agb_true, agb_pred, log_true, log_pred
    metrics.json           chip and pixel level, Mg/ha and log scale, per fold/site/overall,
                           R² intervals; "difference": the model minus the baseline per site;
                           "random_cv" (train.random_cv): the baseline under a random split
    ensemble.pt            every fold's model, for `agbcube predict`
    plots/*.png
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
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
    """Make ``out`` a run directory; only an agbcube run (its marker) is continued or replaced."""
    from agbcube._io import MARKER, output_kind, prepare_output_dir
    from agbcube.errors import OutputExistsError

    is_run = output_kind(out) == "run"
    if out.is_dir() and not is_run and any(not c.name.startswith(".") for c in out.iterdir()):
        raise OutputExistsError(
            f"run directory {out} holds files but no agbcube run (no {MARKER} marker); agbcube "
            "never deletes or mixes with files it did not write, with or without --overwrite: "
            "give a new or empty folder (--output or train.output)"
        )
    if is_run and not (resume or overwrite):
        raise TrainingError(
            f"run directory {out} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or --output for a new one"
        )
    if overwrite and is_run:
        for child in out.iterdir():
            if not child.name.startswith("."):
                remove_path(child)
    prepare_output_dir(out, kind="run", what="run directory")


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
        path = _data_path(tcfg, folds, config, dev)
        chips = None
        if path == "device":
            chips = read_chips(
                config.cube.output,
                folds,
                size_px=config.chips.size,
                stride_px=_stride(config.chips),
                bands=tcfg.bands,
                context_px=tcfg.context_px,
            )
            say(
                f"read {len(chips)} chips × {chips.x.shape[1]} bands in "
                f"{time.perf_counter() - t_read:.1f} s; training on {dev}, device-resident"
            )
        else:
            say(f"reading {len(folds)} chips from the cube ({path}); training on {dev}")
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
                    _train_fold(k, folds, chips, config, dev, fold_dir, epochs, resume, say, path)
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
        if tcfg.random_cv:
            t_leaky = time.perf_counter()
            metrics["random_cv"] = _random_cv(config, folds, chips, n_folds)
            say(
                f"{HGB} under a random {n_folds}-fold split (leaky) scored in "
                f"{time.perf_counter() - t_leaky:.1f} s"
            )
        metrics["run"] = {
            "device": str(dev),
            "wall_s": time.perf_counter() - t_start,
            "n_chips": len(folds),
            "data_path": path,
        }
        write_json_atomic(out / "metrics.json", metrics)
        if tcfg.model == CNN:
            _write_ensemble(out, n_folds)
        if plots:
            from agbcube.train.plots import write_plots

            write_plots(out / "plots", predictions, pixels, fold_info, folds, metrics)
    return metrics


def _data_path(tcfg: Any, folds: pd.DataFrame, config: Any, dev: Any) -> str:
    """``data_path: auto``: device-resident when every chip fits in half the free memory."""
    import os

    if tcfg.data_path != "auto":
        return tcfg.data_path
    n_bands = len(tcfg.bands) if tcfg.bands else len(_cube_bands(config))
    window = config.chips.size + 2 * tcfg.context_px
    need = len(folds) * (n_bands + 3) * window**2 * 4 * 2  # host + device copies
    if dev.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(dev)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return "chunks" if need > 0.5 * free else "device"


def _write_config(config: Any, path: Path, *, device: str, epochs: int | None) -> None:
    data = config.model_dump(mode="json")
    if epochs is not None:
        data["train"]["epochs"] = epochs
    data["train"]["device"] = device
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))


class _FoldData:
    """One fold's chips, device-resident or streamed, behind one interface.

    ``train`` (and ``pool``, the chips of a refit or of the baseline) are chip positions in
    ``folds``; with ``train.label_buffer: pixel`` each comes with a mask of the pixels whose
    labels may be trained on (``train_mask``, ``pool_mask``), else the masks are ``None``.
    """

    def __init__(
        self,
        k: int,
        folds: pd.DataFrame,
        chips: Any,
        config: Any,
        dev: Any,
        path: str = "device",
    ) -> None:
        from agbcube.train.data import (
            ChunkedChips,
            DeviceChips,
            Standardiser,
            StreamingChips,
            StreamSource,
            TargetTransform,
            chip_lonlat,
            make_target,
            model_inputs,
        )

        tcfg = config.train
        role = folds[f"role_{k}"].to_numpy()
        self.k = k
        self.train, self.val, self.test = (
            np.flatnonzero(role == r) for r in ("train", "val", "test")
        )
        self.train_mask: np.ndarray | None = None
        self.label_distance_m = np.inf
        self._lonlat = None
        if tcfg.label_buffer == "pixel":
            from agbcube.folds import label_mask

            m, size = tcfg.context_px, config.chips.size
            self._lonlat = (
                chips.lonlat[:, :, m : m + size, m : m + size]  # the chips', not their context's
                if chips is not None
                else chip_lonlat(config.cube.output, folds, size_px=size)
            )
            self.train, self.train_mask, self.label_distance_m = label_mask(
                folds, k, self._lonlat, validation=True
            )
        coords = tcfg.coordinates == "geographic"
        dense = tcfg.head == "dense"
        self.chips, self.folds, self.config = chips, folds, config
        if chips is not None:  # device-resident
            inputs = model_inputs(chips, coordinates=coords)

            def target_of(idx: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
                agb = self._labels(idx, mask)
                return make_target(agb, log=tcfg.log_target, per_chip=not dense)

            self.target = TargetTransform.fit(
                target_of(self.train, self.train_mask), log=tcfg.log_target
            )
            self.std = Standardiser.fit(inputs[self.train])
            self.source = lambda idx, mask=None: DeviceChips(
                inputs[idx], self.target.encode(target_of(idx, mask)), self.std, dev
            )
            self.train_src = self.source(self.train, self.train_mask)
            self.val_src = self.source(self.val) if self.val.size else None
            self.in_channels, self.size_px = inputs.shape[1], chips.x.shape[-1]
            self.bands = chips.bands
            test_x, test_agb = inputs[self.test], chips.agb[self.test]
            self.test_blocks = lambda: (
                (
                    test_x[i : i + 256],
                    test_agb[i : i + 256],
                    np.arange(i, min(i + 256, len(test_x))),
                )
                for i in range(0, len(test_x), 256)
            )
            return

        def dataset(
            idx: np.ndarray,
            std: Any,
            with_coords: bool = coords,
            mask: np.ndarray | None = None,
        ) -> Any:
            common = {
                "size_px": config.chips.size,
                "standardiser": std,
                "coordinates": with_coords,
                "log_target": tcfg.log_target,
                "chip_target": not dense,
                "bands": tcfg.bands,
                "label_mask": mask,
                "context_px": tcfg.context_px,
            }
            if path == "chunks":
                return ChunkedChips(
                    config.cube.output,
                    folds.iloc[idx],
                    device=dev,
                    shuffle_chips=tcfg.shuffle_chips,
                    **common,
                )
            return StreamingChips(
                config.cube.output, folds.iloc[idx], stride_px=_stride(config.chips), **common
            )

        def source(idx: np.ndarray, mask: np.ndarray | None = None) -> Any:
            ds = dataset(idx, self.std, mask=mask)
            ds.target_transform = self.target
            if path == "chunks":
                return ds  # it batches itself
            return StreamSource(ds, dev, num_workers=tcfg.num_workers)

        self.dataset = dataset
        # one pass over the training chips fits the standardisation and the target transform
        train_ds = dataset(self.train, None, mask=self.train_mask)
        targets: list[np.ndarray] = []

        def features() -> Iterator[np.ndarray]:
            for x, agb, _ in train_ds.blocks():
                targets.append(make_target(agb, log=tcfg.log_target, per_chip=not dense).ravel())
                yield x

        self.std = Standardiser.fit_blocks(features())
        self.target = TargetTransform.fit(np.concatenate(targets), log=tcfg.log_target)
        self.source = source
        self.train_src = source(self.train, self.train_mask)
        self.val_src = source(self.val) if self.val.size else None
        self.in_channels = int(self.std.mean.shape[0])
        self.size_px = config.chips.size + 2 * tcfg.context_px  # the window the model sees
        self.bands = tcfg.bands or _cube_bands(config)
        self.test_blocks = lambda: dataset(self.test, None).blocks()

    def pool(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every chip (and pixel) beyond the test buffer: what a refit and the baseline use."""
        from agbcube.folds import label_mask, training_pool

        if self._lonlat is None:
            return training_pool(self.folds, self.k), None
        pos, mask, distance = label_mask(self.folds, self.k, self._lonlat, validation=False)
        self.label_distance_m = min(self.label_distance_m, distance)
        return pos, mask

    def _labels(self, idx: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """AGB of the in-memory chips at ``idx``, NaN where ``mask`` hides the label."""
        from agbcube.train.data import context_mask

        agb = self.chips.agb[idx]  # NaN in the context margin already
        if mask is None:
            return agb
        return np.where(context_mask(mask, self.chips.margin, self.config.chips.size), agb, np.nan)

    def baseline_chips(
        self, idx: np.ndarray, mask: np.ndarray | None, max_pixels: int, seed: int
    ) -> tuple[Any, Any]:
        """Raw features and AGB of the chips at ``idx`` (a subsample when streaming)."""
        rng = np.random.default_rng(seed)
        in_memory = self.chips is not None
        pick = _baseline_sample(idx.size, self.config.chips.size, max_pixels, rng, in_memory)
        idx, mask = idx[pick], None if mask is None else mask[pick]
        if in_memory:
            return self.chips.x[idx], self._labels(idx, mask)
        ds = self.dataset(idx, None, with_coords=False, mask=mask)
        blocks = list(ds.blocks())
        return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def _cube_bands(config: Any) -> list[str]:
    from agbcube._store import cube_sites, open_cube

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
    path: str = "device",
) -> None:
    """Train fold ``k`` (the CNN and/or the baseline) and write its predictions and model."""
    import torch

    from agbcube.train.data import TargetTransform, make_target
    from agbcube.train.loop import build_model, chip_centres_km, fit_fold, predict

    tcfg = config.train
    data = _FoldData(k, folds, chips, config, dev, path)
    train, val, test = data.train, data.val, data.test
    # every chip beyond the test buffer: what a refit and the baseline (no validation) train on
    with_hgb = HGB in (tcfg.model, tcfg.baseline)
    pool, pool_mask = (None, None)
    if (tcfg.refit and tcfg.model == CNN) or with_hgb:
        pool, pool_mask = data.pool()
    meta = folds[["chip_id", "site"]].iloc[test].reset_index(drop=True)
    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # model -> (chip Mg/ha, pixel Mg/ha)
    info: dict[str, Any] = {
        "fold": k,
        "n_train": int(train.size),
        "n_val": int(val.size),
        "n_test": int(test.size),
        "data_path": path,
    }
    if data.train_mask is not None:
        info["label_buffer"] = "pixel"
        info["n_train_px"] = int(data.train_mask.sum())
    agb_test = None
    t0 = time.perf_counter()
    if tcfg.model == CNN:
        coords = tcfg.coordinates == "geographic"
        centres = torch.from_numpy(chip_centres_km(folds.iloc[train])).to(dev)
        seed = tcfg.seed * 1000 + k
        n_spectral = data.in_channels - (2 if coords else 0)
        members = []

        def train_model(m_seed: int, src: Any, val: Any, n_epochs: int | None, **kw: Any) -> Any:
            """A fresh model initialised under ``m_seed`` and fitted: ``(model, fit)``."""
            torch.manual_seed(m_seed)
            model = build_model(tcfg, data.in_channels, data.size_px).to(dev)
            fitted = fit_fold(
                model,
                src,
                val,
                tcfg,
                n_spectral=n_spectral,
                seed=m_seed,
                epochs=n_epochs,
                resume=resume,
                echo=say,
                **kw,
            )
            return model, fitted

        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            model, fit = train_model(
                seed,
                data.train_src,
                data.val_src,
                epochs,
                checkpoint=fold_dir / "checkpoint.pt",
                centres=centres,
                label=f"fold {k}",
            )
            if tcfg.refit:
                info.update(n_refit=int(pool.size), refit_epochs=fit.best_epoch + 1)
                pool_src = data.source(pool, pool_mask)
                pool_centres = torch.from_numpy(chip_centres_km(folds.iloc[pool])).to(dev)
            else:
                members.append(model)
            for m in range(tcfg.ensemble):
                suffix = f"_{m}" if m else ""
                if tcfg.refit:  # a fresh model, the chosen number of epochs, on the pool
                    member, _ = train_model(
                        seed + 500_000 + 100_000 * m,
                        pool_src,
                        None,
                        fit.best_epoch + 1,
                        checkpoint=fold_dir / f"checkpoint_refit{suffix}.pt",
                        centres=pool_centres,
                        label=f"fold {k} refit{suffix} on {pool.size} chips",
                        restore_best=False,
                    )
                    members.append(member)
                elif m:  # another early-stopped model from another seed
                    member, _ = train_model(
                        seed + 100_000 * m,
                        data.train_src,
                        data.val_src,
                        epochs,
                        checkpoint=fold_dir / f"checkpoint{suffix}.pt",
                        centres=centres,
                        label=f"fold {k} member {m}",
                    )
                    members.append(member)
        tta = tcfg.tta_rotations if tcfg.tta else 1

        def cnn(xb: np.ndarray) -> np.ndarray:  # the members' mean, in Mg/ha
            x = torch.from_numpy(data.std.apply(xb)).to(dev)
            outs = [data.target.decode(predict(m, x, tta=tta).cpu().numpy()) for m in members]
            return np.mean(outs, axis=0)

        mg, agb_test = _in_test_order(data.test_blocks(), cnn)
        if tcfg.head == "dense":
            chip_pred, pix = _scored_pixels(mg, agb_test)
        else:
            chip_pred = mg
            pix = np.broadcast_to(mg[:, None, None], agb_test.shape)
        preds[CNN] = (chip_pred, pix)
        for stale in fold_dir.glob("model_*.pt"):  # of an earlier, larger ensemble
            stale.unlink()
        info["ensemble"] = len(members)
        for m, member in enumerate(members):
            torch.save(
                {
                    "state_dict": member.state_dict(),
                    "standardiser": data.std.to_dict(),
                    "target": data.target.to_dict(),
                    "in_channels": int(data.in_channels),
                    "size_px": int(data.size_px),
                    "context_px": int(tcfg.context_px),
                    "bands": list(data.bands),
                    "train": tcfg.model_dump(mode="json"),
                    "fold": k,
                    "member": m,
                },
                fold_dir / (f"model_{m}.pt" if m else "model.pt"),
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
        fit_x, fit_agb = data.baseline_chips(pool, pool_mask, tcfg.hgb_max_pixels, tcfg.seed + k)
        target = make_target(fit_agb, log=tcfg.log_target, per_chip=False)
        hgb = fit_hgb_pixels(
            fit_x, target, max_pixels=tcfg.hgb_max_pixels, random_state=tcfg.seed + k
        )
        n_feat = len(data.bands)
        raw, agb_test = _in_test_order(
            data.test_blocks(), lambda xb: predict_hgb_pixels(hgb, xb[:, :n_feat])
        )
        mg = TargetTransform(log=tcfg.log_target).decode(raw)  # its unstandardised target
        preds[HGB] = _scored_pixels(mg, agb_test)
        info["hgb_s"] = time.perf_counter() - t1
        say(f"fold {k}: {HGB} baseline fitted in {info['hgb_s']:.1f} s")
    assert agb_test is not None
    true_chip = make_target(agb_test, log=False, per_chip=True)
    frames, pixel_frames = [], []
    agb32 = agb_test.astype(np.float32)
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
        pix32 = np.asarray(pix, dtype=np.float32)
        pixel_frames.append(_pixel_frame(meta, agb32, pix32, fold=k, model=name))
    pd.concat(frames, ignore_index=True).to_parquet(fold_dir / "predictions.parquet", index=False)
    pd.concat(pixel_frames, ignore_index=True).to_parquet(fold_dir / "pixels.parquet", index=False)
    if data.train_mask is not None:
        info["min_label_distance_m"] = data.label_distance_m
    (fold_dir / "DONE").write_text(json.dumps(info, default=float))  # written last


def _scored_pixels(pred: np.ndarray, agb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel predictions ``(n, h, w)`` kept where the AGB is known, and each chip's mean of
    them: what the chip-level and pixel-level metrics compare with the AGB."""
    pix = np.where(np.isfinite(agb), pred, np.nan)
    return np.nanmean(pix.reshape(len(pix), -1), axis=1), pix


def _pixel_frame(
    meta: pd.DataFrame, agb: np.ndarray, pred: np.ndarray, **columns: Any
) -> pd.DataFrame:
    """One row per pixel with known AGB of the chips ``meta`` (``chip_id``, ``site``), in
    order: its chip, site, ``columns``, AGB and prediction."""
    valid = np.isfinite(agb)

    def per_pixel(values: np.ndarray) -> np.ndarray:
        return np.broadcast_to(values[:, None, None], agb.shape)[valid]

    return pd.DataFrame(
        {
            "chip_id": per_pixel(meta["chip_id"].to_numpy()),
            "site": per_pixel(meta["site"].to_numpy()),
            **columns,
            "agb_true": agb[valid],
            "agb_pred": np.asarray(pred)[valid],
        }
    )


def _baseline_sample(
    n_chips: int, size_px: int, max_pixels: int, rng: Any, in_memory: bool
) -> np.ndarray:
    """Sorted positions of the chips, of ``n_chips``, that the ``hgb-pixel`` model draws its
    ``max_pixels`` training pixels from. In memory, every chip; streamed, enough chips for that
    many labelled pixels (1.5× for missing ones), so the baseline reads no more than that. The
    honest baseline and ``random_cv`` both sample through here, so only their splits differ."""
    if in_memory:
        return np.arange(n_chips)
    n = min(n_chips, int(np.ceil(1.5 * max_pixels / size_px**2)))
    return np.sort(rng.choice(n_chips, size=n, replace=False))


def _in_test_order(blocks: Any, fn: Callable[[np.ndarray], np.ndarray]) -> tuple[Any, Any]:
    """``fn`` of each ``(inputs, agb, positions)`` block, outputs and AGB in test-chip order."""
    outs, agbs, where = [], [], []
    for xb, agb_b, pos in blocks:
        outs.append(fn(xb))
        agbs.append(agb_b)
        where.append(pos)
    order = np.argsort(np.concatenate(where), kind="stable")
    return np.concatenate(outs)[order], np.concatenate(agbs)[order]


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
    others = [name for name in out["models"] if name != config.train.model]
    if config.train.model in out["models"] and others:
        out["difference"] = _difference(predictions, pixels, config.train.model, others[0])
    out["folds"] = {
        int(k): {key: v for key, v in info.items() if key != "history"}
        for k, info in fold_info.items()
    }
    out["primary_model"] = config.train.model
    return out


def _random_cv(config: Any, folds: pd.DataFrame, chips: Any, n_folds: int) -> dict[str, Any]:
    """The ``hgb-pixel`` model under a random K-fold of the same chips: the leaky figure.

    No buffer and no validation: every chip not in the test fold may train, its neighbours
    included, which is how a random split flatters a map. The model and the target transform
    are those of the honest baseline, and so is the sampling of its training pixels (from every
    training chip in memory; from enough chips, then pixels, when streaming), so the split is
    the only difference between the two figures.
    """
    from sklearn.model_selection import KFold

    from agbcube.train.baseline import fit_hgb_pixels, predict_hgb_pixels
    from agbcube.train.data import StreamingChips, TargetTransform, make_target
    from agbcube.train.metrics import summarise

    tcfg, size = config.train, config.chips.size

    def blocks(idx: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Raw features and AGB of the chips at ``idx`` (their own pixels), 256 at a time."""
        if chips is None:
            yield from StreamingChips(
                config.cube.output,
                folds.iloc[idx],
                size_px=size,
                stride_px=_stride(config.chips),
                standardiser=None,
                coordinates=False,
                log_target=False,
                bands=tcfg.bands,
            ).blocks()
            return
        core = slice(chips.margin, chips.margin + size)
        for start in range(0, idx.size, 256):
            part = idx[start : start + 256]
            pos = np.arange(start, start + part.size)
            yield chips.x[part][:, :, core, core], chips.agb[part][:, core, core], pos

    decode = TargetTransform(log=tcfg.log_target)
    rng = np.random.default_rng(tcfg.seed)
    in_memory = chips is not None
    frames, pixel_frames = [], []
    split = KFold(n_folds, shuffle=True, random_state=tcfg.seed).split(np.arange(len(folds)))
    for k, (train, test) in enumerate(split):
        pick = train[_baseline_sample(train.size, size, tcfg.hgb_max_pixels, rng, in_memory)]
        parts = list(blocks(pick))
        x = np.concatenate([p[0] for p in parts])
        agb = np.concatenate([p[1] for p in parts])
        model = fit_hgb_pixels(
            x,
            make_target(agb, log=tcfg.log_target, per_chip=False),
            max_pixels=tcfg.hgb_max_pixels,
            random_state=tcfg.seed + k,
        )
        for xb, agb_b, pos in blocks(test):
            agb_b = agb_b.astype(np.float64)
            chip_pred, pix = _scored_pixels(decode.decode(predict_hgb_pixels(model, xb)), agb_b)
            meta = folds[["chip_id", "site"]].iloc[test[pos]]
            frames.append(
                meta.assign(
                    fold=k,
                    agb_true=make_target(agb_b, log=False, per_chip=True).astype(np.float64),
                    agb_pred=chip_pred,
                )
            )
            pixel_frames.append(_pixel_frame(meta, agb_b, pix, fold=k))
    chip, pix = pd.concat(frames, ignore_index=True), pd.concat(pixel_frames, ignore_index=True)
    return {
        "model": HGB,
        "n_folds": n_folds,
        "seed": tcfg.seed,
        "chip": {"mg_ha": summarise(chip, true="agb_true", pred="agb_pred")},
        "pixel": {"mg_ha": summarise(pix, true="agb_true", pred="agb_pred")},
    }


def _difference(predictions: pd.DataFrame, pixels: pd.DataFrame, a: str, b: str) -> dict:
    """Per-site R² of model ``a`` minus model ``b``, chip and pixel level, paired intervals."""
    from agbcube.train.metrics import r2_difference

    out: dict[str, Any] = {"models": [a, b]}
    for level, frame in (("chip", predictions), ("pixel", pixels)):
        fa = frame[frame["model"] == a].reset_index(drop=True)
        fb = frame[frame["model"] == b].reset_index(drop=True)
        keys = ["chip_id", "agb_true"]
        # both models scored the same values in the same order (runs from before pixels had
        # chip ids, resumed, have none to pair them by)
        if (
            "chip_id" not in frame
            or fa.empty
            or len(fa) != len(fb)
            or not fa[keys].equals(fb[keys])
        ):
            out[level] = None
            continue
        out[level] = {
            str(site): r2_difference(
                g["agb_true"].to_numpy(),
                g["agb_pred"].to_numpy(),
                fb.loc[g.index, "agb_pred"].to_numpy(),
                g["chip_id"].to_numpy(),
            )
            for site, g in fa.groupby("site")
        }
    return out


def _write_ensemble(out: Path, n_folds: int) -> None:
    import torch

    members = []
    for k in range(n_folds):
        fold_dir = out / f"fold_{k}"
        extra = sorted(fold_dir.glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        for path in [fold_dir / "model.pt", *extra]:
            members.append(torch.load(path, weights_only=False))
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
