"""The folds file: GeoParquet with the audit and fold maps beside it, read back and checked."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from agbcube._io import (
    atomic_path,
    check_outside_stores,
    check_replaceable,
    json_text,
    output_lock,
    owned,
    written_by,
)
from agbcube._store import cube_site_keys
from agbcube.errors import FoldError
from agbcube.folds.plots import plot_fold_map
from agbcube.folds.splitter import ROLES


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}_{suffix}")


def write_folds(folds: gpd.GeoDataFrame, path: str | Path, *, maps: bool = True) -> list[Path]:
    """Write the folds GeoParquet, its leakage audit (JSON) and a PNG map per site, atomically.

    Every path is checked before anything is written: a folder, or a file agbcube did not
    write, at any of them raises `OutputExistsError` and nothing is written. Everything is
    written to temporaries first and the table is renamed into place last, so an interrupted
    write leaves the previous folds and their maps as they were; maps agbcube wrote for an
    earlier folds file at this path of sites these folds do not map (or all of them, with
    ``maps=False``) are removed. Returns the paths written.
    """

    path = Path(path)
    meta = folds.attrs.get("agbcube", {})
    audit_path = _sidecar(path, "audit.json")
    sites = pd.unique(folds["site"]) if maps else []
    pngs = {site: _sidecar(path, f"map_{site}.png") for site in sites}
    check_outside_stores(path, what="folds.output")
    for target, what in [(path, "folds.output"), (audit_path, "folds audit")] + [
        (png, "folds map") for png in pngs.values()
    ]:
        check_replaceable(target, what=what)
    n_folds = int(meta.get("n_folds", n_folds_of(folds)))
    stale = [  # an earlier folds' maps of sites these folds do not map
        p for p in path.parent.glob(f"{path.stem}_map_*.png") if p not in pngs.values() and owned(p)
    ]
    with output_lock(path, what="folds"):
        with contextlib.ExitStack() as renames:
            # all written to temporaries, then renamed in reverse order, the table last: an
            # interrupted `folds` leaves the previous folds and their maps as they were
            tmp = renames.enter_context(atomic_path(path, what="folds.output"))
            table = folds.copy()
            table.attrs = {}
            table.to_parquet(tmp, index=False, schema_version="1.0.0", write_covering_bbox=False)
            _add_parquet_metadata(tmp, {"agbcube": json.dumps(meta, default=str)})
            tmp = renames.enter_context(atomic_path(audit_path, what="folds audit"))
            tmp.write_text(json_text({"written_by": written_by(), **meta}))
            for site, png in pngs.items():
                tmp = renames.enter_context(atomic_path(png, what="folds map"))
                plot_fold_map(folds, site, n_folds, tmp, buffer_m=meta.get("buffer_m", {}))
        for old in stale:
            old.unlink(missing_ok=True)
    return [path, audit_path, *pngs.values()]


def _add_parquet_metadata(path: Path, extra: dict[str, str]) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = dict(table.schema.metadata or {})
    meta.update({k.encode(): v.encode() for k, v in extra.items()})
    pq.write_table(table.replace_schema_metadata(meta), path)


def n_folds_of(folds: pd.DataFrame) -> int:
    """The number of folds of a folds table (its ``role_k`` columns)."""
    return sum(1 for c in folds.columns if c.startswith("role_"))


def read_folds(path: str | Path, *, cube: str | Path | None = None) -> gpd.GeoDataFrame:
    """Read a folds GeoParquet written by `write_folds` (metadata in ``attrs``).

    The file is validated as strictly as a fresh config: geometry with a CRS, the chip
    columns, ``fold`` and ``role_0`` … ``role_{K-1}`` with roles among `ROLES`, every
    chip once, each fold testing its own chips and training on some. The folds are then
    checked against the cube they were cut from (`check_folds_cube`).

    Parameters
    ----------
    path : str or Path
        The folds file.
    cube : str or Path, optional
        The cube the folds will be used with; default the cube they record, when it exists.

    Raises
    ------
    FoldError
        Missing or unreadable file, a malformed table, or folds cut from an earlier build of
        the cube.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    again = "run `agbcube folds CONFIG` to make them again"
    if not path.exists():
        raise FoldError(f"folds file {path} does not exist; run `agbcube folds <config>` first")
    if path.is_dir():
        raise FoldError(f"folds file {path} is a folder; folds.output must name a GeoParquet file")
    try:
        meta = pq.read_schema(path).metadata or {}
        gdf = gpd.read_parquet(path)
    except (OSError, ValueError, TypeError, KeyError) as err:  # ArrowInvalid is a ValueError
        raise FoldError(
            f"folds file {path} is not a GeoParquet table of chips ({type(err).__name__}: "
            f"{err}); {again}"
        ) from err
    if b"agbcube" in meta:
        try:
            gdf.attrs["agbcube"] = json.loads(meta[b"agbcube"])
        except ValueError as err:
            raise FoldError(
                f"folds file {path}: its 'agbcube' metadata is not JSON; {again}"
            ) from err
    _validate_folds(gdf, f"folds file {path}", again)
    if problem := _metadata_problem(gdf):
        raise FoldError(f"folds file {path}: its 'agbcube' metadata {problem}; {again}")
    record = gdf.attrs.get("agbcube", {}).get("cube") or {}
    store = cube if cube is not None else record.get("store")
    if store is not None and (cube is not None or Path(store).exists()):
        check_folds_cube(gdf, store, source=f"folds {path}")
    return gdf


def _validate_folds(gdf: gpd.GeoDataFrame, where: str, again: str) -> None:
    """Raise FoldError for anything `make_folds` would never have written."""
    if not isinstance(gdf, gpd.GeoDataFrame) or gdf.geometry.name not in gdf or gdf.crs is None:
        raise FoldError(f"{where} has no chip footprints (a geometry column with a CRS); {again}")
    roles = {str(c) for c in gdf.columns if str(c).startswith("role_")}
    n_folds = len(roles)
    missing = [c for c in ("chip_id", "site", "row", "col", "fold") if c not in gdf]
    if missing or n_folds < 2 or roles != {f"role_{k}" for k in range(n_folds)}:
        raise FoldError(
            f"{where} lacks columns: needs chip_id, site, row, col, fold and role_0 … "
            f"role_{{K-1}} (K >= 2), has {list(gdf.columns)}; {again}"
        )
    for col in ("chip_id", "site"):
        if not all(isinstance(v, str) and v for v in gdf[col]):
            raise FoldError(f"{where}: column {col} must be non-empty text in every row; {again}")
    for col in roles:
        bad = sorted(set(gdf[col].astype(str)) - set(ROLES))
        if bad:
            raise FoldError(f"{where}: column {col} holds {bad}, not one of {list(ROLES)}; {again}")
    _validate_chips(gdf, n_folds, where, again)


def _metadata_problem(gdf: gpd.GeoDataFrame) -> str | None:
    """What is wrong with the metadata `write_folds` recorded (the parts agbcube reads back:
    the cube, the chip settings, the buffers, the fold count), or None."""
    meta = gdf.attrs.get("agbcube", {})
    if not isinstance(meta, dict):
        return f"is {type(meta).__name__}, not a mapping"
    cube, chips = meta.get("cube"), meta.get("chips")
    if cube and not (
        isinstance(cube, dict)
        and isinstance(cube.get("store"), str)
        and isinstance(cube.get("sites", {}), dict)
        and all(isinstance(v, str) for v in cube.get("sites", {}).values())
    ):
        return "'cube' must map 'store' to a path and 'sites' to their build keys"
    if chips is not None and not (
        isinstance(chips, dict) and _number(chips.get("size")) and _number(chips.get("overlap"))
    ):
        return "'chips' must hold the chip settings (size, overlap)"
    buffers = meta.get("buffer_m")
    sites = set(gdf["site"].astype(str))
    if buffers and not (
        isinstance(buffers, dict)
        and sites <= set(buffers)
        and all(_number(buffers[s]) and buffers[s] >= 0 for s in sites)
    ):
        return f"'buffer_m' must give each site ({sorted(sites)}) its buffer in metres"
    n_folds = meta.get("n_folds", n_folds_of(gdf))
    if not (isinstance(n_folds, int) and n_folds == n_folds_of(gdf)):
        return f"'n_folds' ({n_folds!r}) must be the table's {n_folds_of(gdf)} folds"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _validate_chips(gdf: gpd.GeoDataFrame, n_folds: int, where: str, again: str) -> None:
    fold = pd.to_numeric(gdf["fold"], errors="coerce").to_numpy()
    pos = pd.to_numeric(pd.concat([gdf["row"], gdf["col"]]), errors="coerce").to_numpy()
    if not (np.isin(fold, np.arange(n_folds)).all() and (pos >= 0).all()):
        raise FoldError(
            f"{where}: 'fold' must hold 0…{n_folds - 1} and row/col non-negative pixel offsets "
            f"(found fold {sorted(set(map(str, gdf['fold'])))[:8]}); {again}"
        )
    ids = gdf["chip_id"].astype(str)
    cells = gdf["site"].astype(str) + ":" + gdf["row"].astype(str) + ":" + gdf["col"].astype(str)
    dupes = sorted(set(ids[ids.duplicated()]) | set(cells[cells.duplicated()]))
    if dupes:
        raise FoldError(f"{where} lists chips more than once: {dupes[:5]}; {again}")
    roles = np.stack([gdf[f"role_{k}"].astype(str).to_numpy() for k in range(n_folds)], axis=1)
    tested = roles == "test"
    if not (tested.sum(1) == 1).all() or not tested[np.arange(len(gdf)), fold.astype(int)].all():
        raise FoldError(
            f"{where}: a chip must be 'test' in exactly its own fold (column 'fold'); {again}"
        )
    empty = [k for k in range(n_folds) if not (roles[:, k] == "train").any()]
    if empty:
        raise FoldError(f"{where}: fold(s) {empty} have no training chip; {again}")


def check_folds_cube(
    folds: gpd.GeoDataFrame, store: str | Path, *, source: str = "the folds"
) -> None:
    """Refuse folds cut from another build of the cube than the one at ``store``.

    `make_folds` records each site's build key (a digest of its inputs and settings);
    a site rebuilt since from other rasters or settings, or gone, has another. Folds from an
    older agbcube record nothing and are not checked.

    Raises
    ------
    FoldError
        Naming the sites that changed and what to run.
    CubeError
        ``store`` is not a complete cube.
    """

    record = folds.attrs.get("agbcube", {}).get("cube")
    if not record:
        return
    keys = cube_site_keys(store)
    used = set(pd.unique(folds["site"].astype(str)))
    changed = sorted(
        s for s, k in record.get("sites", {}).items() if s in used and keys.get(s) != k
    )
    if changed:
        raise FoldError(
            f"{source} were cut from an earlier build of cube {store}: site(s) {changed} have "
            "been rebuilt from other rasters or settings (or removed) since, so the chips' "
            "windows no longer match the cube; run `agbcube folds CONFIG` again"
        )
