"""Benchmark of ``agbcube predict``: pixels per second and peak RSS as the site grows.

A hand-run benchmark, not a test. Every prediction runs in a fresh subprocess (imports excluded
from the timing) that does what ``agbcube predict RUN --site SITE --output DIR -q`` does on the
threads scheduler: :func:`agbcube.cube.open_cube`, :func:`agbcube.predict.predict_run` on the CPU,
then :func:`agbcube.predict.write_maps` (``maps.zarr``, four COGs, four PNGs).

Sites (``--sizes``, comma-separated, measured in the order given):

a site name, e.g. ``betul``
    A site of the run's own cube (``betul`` is 278 × 287 px).
an integer, e.g. ``768``
    A generated ``N × N`` px site: the real ``achanakmar`` stack and AGB map mirror-tiled by
    ``bench/build_cube.py``'s generator, built into a cube of its own with
    :func:`agbcube.cube.build_cube` (59 raw bands + 49 indices = the run's 108 feature bands)
    under ``--workdir``. A generated site whose wall time, extrapolated per pixel from the largest
    smaller generated site already measured with the same setting, would exceed ``--max-minutes``
    is shrunk (to a multiple of 256 px) or skipped.

Settings (``--settings``): ``default`` is ``predict``'s defaults for the run (chip head: window =
chip size, stride = half a window, TTA from the run's config, every fold model, AOA on); ``fast``
is ``stride_px`` = the window and no AOA. ``--stride N`` and/or ``--no-aoa`` replace both with
one custom setting.

Reported per site and setting: wall time (``predict_run`` + ``write_maps``) split into *setup*
(loading the ensemble, the AOA reference from the training cube, the lazy graph), *compute* (the
Dask computation into ``maps.zarr``: all the model and DI work) and *COG + PNG*; pixels/s (grid
pixels of the site over the wall time); and peak RSS in GB (1e9 bytes). The child resets its
high-water mark after each phase (``/proc/self/clear_refs``) to get a peak per phase; the peak
reported is the highest of those and of the child's ``ru_maxrss`` from ``os.wait4``. The parent
imports nothing heavy, so no peak is inherited across ``fork``. A 1 s RSS trace is kept in the
JSON file.

``--profile SITE`` adds one untimed ``py-spy record`` run (raw format, ``--rate 25``, default
setting) of that site and summarises where the samples fall: by innermost ``agbcube`` source line,
and by stage.

Command line
------------
::

    python bench/predict.py --sizes betul,768,1536 --profile 768

(about 15 minutes of computing on 2 cores, plus any wait for a quiet machine).

Options: ``--sizes``, ``--run`` (default ``runs/bench-default``), ``--settings``, ``--stride``,
``--no-aoa``, ``--workdir`` (generated inputs, cubes and maps, default
``/tmp/agbcube-bench-predict``, deleted at the end unless ``--keep``), ``--keep``,
``--max-minutes``, ``--repeat`` (the fastest run counts, with the highest peak RSS of all),
``--profile``, ``--max-rss-gb`` (a child above it is killed), ``--results`` (default
``bench/results/predict_cpu.json``), and for a shared machine ``--max-wait`` (seconds to wait,
before each run, for other processes to use under 0.25 CPUs), ``--busy-max`` and ``--retries``
(a run during which other processes kept more than ``--busy-max`` CPUs busy on average, from
``/proc/stat`` minus the child's own CPU time, is measured again). Prints a Markdown table; its
last column is that average, so a disturbed run shows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _harness import cpu_busy_s, machine, run_child, versions

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "runs" / "bench-default"
CHUNKS = 256
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DASK_NUM_WORKERS", "GDAL_CACHEMAX")
SETTINGS = {
    "default": {"stride": None, "aoa": True},
    "fast": {"stride": "window", "aoa": False},
}


# --------------------------------------------------------------------------------------------
# child process: prepare a generated site, or predict one site


def _build_cube_module() -> Any:
    """``bench/build_cube.py`` as a module (for its site generator)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_build_cube", REPO / "bench/build_cube.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Generate a ``px`` × ``px`` site and build its cube (reused when already built)."""
    from agbcube.config import parse_config
    from agbcube.cube import build_cube

    workdir, px = Path(spec["workdir"]), spec["px"]
    site = _build_cube_module().generate_site(workdir, f"gen{px}", px, "deflate")
    store = workdir / f"gen{px}.zarr"
    cfg = parse_config({"sites": [site], "cube": {"output": str(store), "chunks": CHUNKS}})
    t0 = time.perf_counter()
    build_cube(cfg.sites, cfg.cube, scheduler="threads", progress=False)
    return {"store": str(store), "site": site["name"], "build_s": time.perf_counter() - t0}


def _hwm(reset: bool) -> int | None:
    """This process's peak RSS in bytes since the last reset (``VmHWM``); optionally reset it."""
    try:
        status = Path("/proc/self/status").read_text()
        peak = int(re.search(r"VmHWM:\s+(\d+)\s+kB", status).group(1)) * 1024
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        return peak
    except (OSError, AttributeError):
        return None


def _windows(n: int, other: int, window: int, stride: int) -> tuple[int, int]:
    """Windows along one axis: on the global grid, and evaluated summed over the tiles."""
    from agbcube.predict.windows import axis_chunks, default_block, window_starts

    starts = window_starts(n, window, stride)
    evaluated, r0 = 0, 0
    for size in axis_chunks(n, default_block((n, other), window)):  # predict_site's tiles
        evaluated += int(((starts + window > r0) & (starts < r0 + size)).sum())
        r0 += size
    return len(starts), evaluated


def _child_predict(spec: dict[str, Any]) -> dict[str, Any]:
    """``open_cube`` + ``predict_run`` + ``write_maps`` on the threads scheduler, timed by phase."""
    import dask
    import torch
    import yaml

    from agbcube import _dask
    from agbcube.cube import open_cube
    from agbcube.predict import predict_run, tiles, write_maps

    peaks = {"imports": _hwm(reset=True)}
    times: dict[str, float] = {}
    compute = _dask.compute  # write_maps imports it at call time: wrap it to time the compute

    def timed_compute(*objs: Any, **kwargs: Any) -> tuple:
        peaks["graph"] = _hwm(reset=True)
        t = time.perf_counter()
        out = compute(*objs, **kwargs)
        times["compute_s"] = time.perf_counter() - t
        peaks["compute"] = _hwm(reset=True)
        return out

    _dask.compute = timed_compute
    calls = Counter()  # _predict_tile calls: one per tile unless tiles are recomputed
    predict_tile = tiles._predict_tile

    def counted(*a: Any, **k: Any) -> Any:
        calls[k["offset"]] += 1
        return predict_tile(*a, **k)

    tiles._predict_tile = counted
    run = Path(spec["run"])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    size, head = int(cfg["chips"]["size"]), cfg["train"]["head"]
    window = 4 * size if head == "dense" else size  # predict_run's defaults
    stride = spec["stride"]
    stride = window if stride == "window" else stride
    out_dir = Path(spec["output"])
    shutil.rmtree(out_dir, ignore_errors=True)
    with dask.config.set(scheduler="threads"):
        t0 = time.perf_counter()
        ds = open_cube(spec["store"], spec["site"], chunks=None)  # as `agbcube predict`
        maps = predict_run(run, ds, device="cpu", stride_px=stride, aoa=spec["aoa"])
        times["setup_s"] = time.perf_counter() - t0
        peaks["setup"] = _hwm(reset=True)
        n_tasks = len(maps.__dask_graph__())  # not timed
        t1 = time.perf_counter()
        write_maps(maps, out_dir, progress=False)
        times["wall_s"] = times["setup_s"] + time.perf_counter() - t1
        peaks["cog_png"] = _hwm(reset=True)
    times["cog_png_s"] = times["wall_s"] - times["setup_s"] - times["compute_s"]
    stride = stride or max(1, window // (4 if head == "dense" else 2))
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    (gy, ey), (gx, ex) = _windows(ny, nx, window, stride), _windows(nx, ny, window, stride)
    tta = int(cfg["train"]["tta_rotations"]) if cfg["train"]["tta"] else 1
    n_models = len([p for p in run.glob("fold_*") if p.is_dir()])
    import numpy as np
    import xarray as xr

    mean = xr.open_zarr(out_dir / "maps.zarr", zarr_format=2)["agb_mean"].values
    return {
        **times,
        "shape": [ny, nx],
        "pixels": ny * nx,
        "valid_pixels": int(np.isfinite(mean).sum()),
        "bands": int(ds.sizes["band"]),
        "window": window,
        "stride": stride,
        "tta": tta,
        "models": n_models,
        "aoa": spec["aoa"],
        "windows_grid": gy * gx,
        "windows_evaluated": ey * ex,
        "forward_chips": ey * ex * n_models * tta,
        "dask_tasks": n_tasks,
        "blocks": len(calls),
        "block_calls": sum(calls.values()),
        "torch_threads": torch.get_num_threads(),
        "phase_peak_rss": peaks,
    }


def child_main(spec_path: str) -> None:
    """Run one step described by a JSON spec; write its result next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    steps = {"prepare": _child_prepare, "predict": _child_predict}
    out = steps[spec["mode"]](spec)
    Path(spec_path).with_suffix(".out.json").write_text(json.dumps(out, default=str))


# --------------------------------------------------------------------------------------------
# parent: run children, measure them


def wait_quiet(max_wait_s: float, cores: float = 0.25) -> float:
    """Wait (at most ``max_wait_s``) until other processes use under ``cores`` CPUs; seconds waited.

    The machine may be shared: a run that competes for its 2 cores is not a measurement.
    """
    t0 = time.perf_counter()
    said = False
    while True:
        b0 = cpu_busy_s()
        time.sleep(2.0)
        busy = (cpu_busy_s() - b0) / 2.0
        waited = time.perf_counter() - t0
        if busy < cores or waited >= max_wait_s:
            return waited
        if not said:
            print(f"  waiting for a quiet machine ({busy:.1f} CPUs busy elsewhere)", flush=True)
            said = True
        time.sleep(3.0)


def run_step(
    spec: dict[str, Any], workdir: Path, max_rss: float, prefix: list[str] | None = None
) -> dict[str, Any]:
    """Run a step in a fresh interpreter (optionally under ``prefix``, e.g. py-spy).

    Adds the child's ``ru_maxrss``, its process wall time and a 1 s RSS trace (of the direct
    child only, so not meaningful under a prefix); ``peak_rss`` is the highest of ``ru_maxrss``
    and the child's per-phase peaks.
    """
    result = run_child(__file__, spec, workdir, max_rss, prefix)
    phases = [v for v in result.get("phase_peak_rss", {}).values() if v]
    result["peak_rss"] = max([result["ru_maxrss"], *phases])
    return result


def measure(
    spec: dict[str, Any], workdir: Path, max_rss: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Run a step ``--repeat`` times: the fastest run, with the highest peak RSS of all runs.

    A run during which other processes kept more than ``--busy-max`` CPUs busy is retried (at
    most ``--retries`` times per repeat); when no quiet run is had, the least disturbed counts.
    """
    runs = []
    for _ in range(args.repeat):
        tries = []
        for _ in range(args.retries + 1):
            waited = wait_quiet(args.max_wait)
            tries.append({**run_step(spec, workdir, max_rss), "waited_for_quiet_s": waited})
            if tries[-1]["other_cpus_busy"] <= args.busy_max or "error" in tries[-1]:
                break
            busy = tries[-1]["other_cpus_busy"]
            print(f"  disturbed ({busy:.2f} CPUs busy elsewhere): measuring again", flush=True)
        runs.append(min(tries, key=lambda r: r["other_cpus_busy"]))
        runs[-1]["disturbed_tries"] = [
            {"wall_s": r.get("wall_s"), "other_cpus_busy": r["other_cpus_busy"]}
            for r in tries
            if r is not runs[-1]
        ]
    done = [r for r in runs if "wall_s" in r]
    best = dict(min(done, key=lambda r: r["wall_s"]) if done else runs[-1])
    best["peak_rss"] = max(r["peak_rss"] for r in runs)
    best["runs"] = [
        {
            "wall_s": r.get("wall_s"),
            "peak_rss": r["peak_rss"],
            "other_cpus_busy": r["other_cpus_busy"],
            "error": r.get("error"),
        }
        for r in runs
    ]
    if "wall_s" in best:
        best["pixels_s"] = best["pixels"] / best["wall_s"]
        best["compute_pixels_s"] = best["pixels"] / best["compute_s"]
        best["forward_chips_s"] = best["forward_chips"] / best["compute_s"]
    return best


# --------------------------------------------------------------------------------------------
# profile


def _stage(frames: list[str]) -> str:
    """The stage a py-spy stack (root first) belongs to."""
    text = ";".join(frames)
    rules = (
        ("_nearest", "AOA: DI distances (torch.cdist) per block"),
        ("predict (agbcube/train/loop.py", "model forward passes incl. TTA"),
        ("apply (agbcube/train/data.py", "standardising window stacks"),
        ("_predict_tile", "window gather / taper blending (numpy, Python loop)"),
        ("_labelled_pixels", "setup: AOA reference (training cube read)"),
        ("aoa_reference", "setup: AOA reference (distances)"),
        ("load_ensemble", "setup: loading the ensemble"),
        ("_write_cog", "COGs"),
        ("_quicklook", "PNGs"),
        ("<module> (", "imports (mostly before the clock starts)"),
        ("zarr", "Zarr read/write"),
    )
    for key, label in rules:
        if key in text:
            return label
    return "other (Dask scheduling, graph, imports, ...)"


def summarise_profile(raw: Path, top: int = 12) -> dict[str, Any]:
    """Samples by stage and by innermost ``agbcube`` source line from a py-spy raw profile."""
    import linecache

    stages: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    total = 0
    for row in raw.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        stages[_stage(frames)] += n
        inner = [f for f in frames if "(agbcube/" in f]
        if inner:
            m = re.match(r"(.*) \((agbcube/[^:]+):(\d+)\)", inner[-1])
            if m:
                src = linecache.getline(str(REPO / m.group(2)), int(m.group(3))).strip()
                lines[f"{m.group(2)}:{m.group(3)} {m.group(1)}: {src}"] += n
        else:
            lines["(no agbcube frame)"] += n

    def pct(c: Counter[str]) -> list[list[Any]]:
        return [[k, v, round(100 * v / max(total, 1), 1)] for k, v in c.most_common(top)]

    return {"samples": total, "by_stage": pct(stages), "by_agbcube_line": pct(lines)}


def profile(site: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One untimed py-spy run of ``site`` with the default setting."""
    raw = args.workdir / f"profile-{site['label']}.txt"
    py_spy = Path(sys.executable).parent / "py-spy"
    prefix = [str(py_spy if py_spy.exists() else "py-spy"), "record", "--rate", "25"]
    prefix += ["--format", "raw", "-o", str(raw), "--"]
    spec = _predict_spec(site, "default", SETTINGS["default"], args)
    print(f"[{site['label']}] py-spy record (default setting)", flush=True)
    res = run_step(spec, args.workdir, args.max_rss_gb * 1e9, prefix=prefix)
    if not raw.exists():
        return {"error": res.get("error", "no profile written")}
    out = summarise_profile(raw)
    out["wall_s_under_py_spy"] = res.get("wall_s")
    if args.keep:
        out["raw"] = str(raw)
    return out


# --------------------------------------------------------------------------------------------
# driver


def _predict_spec(
    site: dict[str, Any], name: str, setting: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    return {
        "mode": "predict",
        "run": str(args.run),
        "store": site["store"],
        "site": site["site"],
        "stride": setting["stride"],
        "aoa": setting["aoa"],
        "output": str(args.workdir / "maps" / f"{site['label']}-{name}"),
    }


def prepare(size: str, px: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """The store and site name for ``size`` (building a generated site's cube)."""
    import yaml

    if px is None:
        store = yaml.safe_load((args.run / "config.yaml").read_text())["cube"]["output"]
        return {"label": size, "store": store, "site": size, "generated": False}
    print(f"[{px}] generating a {px} x {px} px site and building its cube", flush=True)
    res = run_step(
        {"mode": "prepare", "workdir": str(args.workdir), "px": px},
        args.workdir,
        args.max_rss_gb * 1e9,
    )
    if "error" in res:
        raise RuntimeError(f"[{px}] preparing the site {res['error']}")
    return {"label": f"gen{px}", **res, "generated": True, "px": px}


def _shrink(px: int, name: str, done: list[dict[str, Any]], limit_s: float) -> int | None:
    """``px``, or a smaller side whose extrapolated wall time fits ``limit_s`` (None: skip)."""
    prior = [
        r
        for r in done
        if r.get("generated") and r["setting"] == name and "wall_s" in r and r["pixels"] < px * px
    ]
    if not prior:
        return px
    ref = max(prior, key=lambda r: r["pixels"])
    per_px = ref["wall_s"] / ref["pixels"]
    if per_px * px * px <= limit_s:
        return px
    side = int(math.sqrt(limit_s / per_px)) // CHUNKS * CHUNKS
    return side if side > math.isqrt(ref["pixels"]) else None


def bench(args: argparse.Namespace, settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Measure every site with every setting."""
    rows: list[dict[str, Any]] = []
    max_rss = args.max_rss_gb * 1e9
    for size in args.sizes:
        want = int(size) if size.isdigit() else None
        todo = dict(settings)
        px = want
        if want is not None:
            fits = {n: _shrink(want, n, rows, args.max_minutes * 60) for n in settings}
            for name in [n for n, side in fits.items() if side is None]:
                print(f"[{size}] {name}: skipped (estimated over --max-minutes)", flush=True)
                rows.append({"label": f"gen{want}", "setting": name, "skipped": True})
                del todo[name]
            px = min((side for side in fits.values() if side is not None), default=None)
        if not todo:
            continue
        site = prepare(size, px, args)
        for name, setting in todo.items():
            print(f"[{site['label']}] predict, {name} setting", flush=True)
            spec = _predict_spec(site, name, setting, args)
            res = measure(spec, args.workdir, max_rss, args)
            row = {
                "label": site["label"],
                "generated": site["generated"],
                "requested_px": want,
                "setting": name,
                "setting_args": setting,
                **res,
            }
            rows.append(row)
            print(f"[{site['label']}] " + json.dumps(_table_row(row)), flush=True)
            shutil.rmtree(args.workdir / "maps", ignore_errors=True)
        if args.profile == size:
            rows[-1]["profile"] = profile(site, args)
            shutil.rmtree(args.workdir / "maps", ignore_errors=True)
        if site["generated"] and not args.keep:
            shutil.rmtree(site["store"], ignore_errors=True)
    return rows


def _table_row(row: dict[str, Any]) -> dict[str, str]:
    if row.get("skipped"):
        return {"site": row["label"], "setting": row["setting"], "wall s": "skipped"}
    ok = "wall_s" in row

    def num(key: str, fmt: str) -> str:
        return format(row[key], fmt) if ok and key in row else row.get("error", "n/a")

    shape = row.get("shape", [0, 0])
    return {
        "site": row["label"] + (" (generated)" if row["generated"] else ""),
        "px": f"{shape[0]} × {shape[1]}" if ok else "-",
        "setting": row["setting"],
        "windows × models × TTA": (
            f"{row['windows_evaluated']} × {row['models']} × {row['tta']}" if ok else "-"
        ),
        "wall s": num("wall_s", ".1f"),
        "setup s": num("setup_s", ".1f"),
        "compute s": num("compute_s", ".1f"),
        "COG+PNG s": num("cog_png_s", ".1f"),
        "pixels/s": num("pixels_s", ",.0f"),
        "peak RSS GB": f"{row['peak_rss'] / 1e9:.2f}",
        "other CPUs busy": num("other_cpus_busy", ".2f"),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    cells = [_table_row(r) for r in rows]
    head = list(max(cells, key=len))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.get(h, "") for h in head) + " |" for c in cells]
    return "\n".join(lines)


def _git() -> dict[str, Any]:
    """The checkout measured: HEAD and whether ``agbcube/`` differs from it."""

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "agbcube_dirty": bool(git("status", "--short", "agbcube")),
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="betul,768,1536", help="site names and/or sides in px")
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="training run directory")
    parser.add_argument("--settings", default="default,fast", help="subset of default,fast")
    parser.add_argument("--stride", type=int, help="one custom setting: this window stride")
    parser.add_argument("--no-aoa", action="store_true", help="one custom setting: AOA off")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/agbcube-bench-predict"))
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="per-run estimate cap")
    parser.add_argument("--repeat", type=int, default=1, help="runs per step; the fastest counts")
    parser.add_argument(
        "--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine"
    )
    parser.add_argument(
        "--busy-max", type=float, default=0.25, help="CPUs busy elsewhere that void a run"
    )
    parser.add_argument("--retries", type=int, default=2, help="re-runs of a disturbed run")
    parser.add_argument("--profile", help="a site of --sizes to profile with py-spy")
    parser.add_argument("--max-rss-gb", type=float, default=16.0)
    parser.add_argument("--results", type=Path, default=REPO / "bench/results/predict_cpu.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if args.profile is not None and args.profile not in args.sizes:
        parser.error("--profile must name one of --sizes")
    if args.stride is not None or args.no_aoa:
        name = f"stride {args.stride or 'default'}, AOA {'off' if args.no_aoa else 'on'}"
        settings = {name: {"stride": args.stride, "aoa": not args.no_aoa}}
    else:
        names = [s.strip() for s in args.settings.split(",") if s.strip()]
        unknown = sorted(set(names) - set(SETTINGS))
        if unknown:
            parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
        settings = {n: SETTINGS[n] for n in names}
    args.run = args.run.resolve()
    if not (args.run / "ensemble.pt").exists():
        parser.error(
            f"{args.run} is not a trained run; create it with `agbcube train "
            "configs/benchmark.yaml --output runs/bench-default --epochs 5 --overwrite`"
        )
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    git_state = _git()
    try:
        rows = bench(args, settings)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    table = markdown_table(rows)
    print("\n" + table)
    for row in rows:
        if "profile" in row:
            prof = row["profile"]
            print(f"\npy-spy, {row['label']} ({prof.get('samples')} samples), by stage:")
            for label, _, pct in prof.get("by_stage", []):
                print(f"  {pct:5.1f} %  {label}")
            print("by innermost agbcube line:")
            for label, _, pct in prof.get("by_agbcube_line", []):
                print(f"  {pct:5.1f} %  {label}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/predict.py", *(argv or sys.argv[1:])]),
        "run": str(args.run),
        "machine": machine(device="cpu"),
        "versions": versions(
            ("agbcube", "torch", "dask", "xarray", "zarr", "numpy", "rioxarray", "rasterio")
        ),
        "git": git_state,
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "parent_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": rows,
        "table": table,
    }
    args.results.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    print(f"\nresults: {args.results}")


if __name__ == "__main__":
    main()
