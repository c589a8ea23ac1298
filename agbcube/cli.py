"""The ``agbcube`` command line: parse, load the config, call the library, print a summary.

Result tables go to stdout; progress, messages, warnings and errors go to stderr, so
``agbcube folds cfg.yaml > summary.txt`` keeps the summary. The library only logs (module
loggers under ``agbcube``) and warns; this module alone attaches a handler, for the duration
of a command: ``-q`` shows warnings and errors only, ``-v`` debug messages too, and the
traceback of an error.

Exit codes: 0 success; 1 an unexpected error (a bug: ``-v`` shows its traceback); 2 a problem
with the input, the configuration or the environment (one line: what, where, what to do), or
a command-line usage error; 130 interrupted (finished work is kept).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from agbcube import __version__
from agbcube._dask import dask_scheduler
from agbcube._io import WRITE_HINTS, prepare_output_dir, write_failure
from agbcube._progress import console, log_width
from agbcube.config import check_device, config_reference, load_config
from agbcube.errors import AgbcubeError, missing_dependency

EXIT_CODES = (
    "Exit codes: 0 success; 1 unexpected error (a bug: re-run with -v for the traceback); "
    "2 bad input, configuration or environment (one-line message), or bad usage; "
    "130 interrupted."
)

app = typer.Typer(
    help="Above-ground biomass cubes, honest spatial cross-validation, models and maps.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Progress and messages (stderr: one console, so log lines print above a live bar) and results
# (stdout). Each looks its stream up when it prints, so a redirected or captured stream is
# honoured.
results = Console(width=log_width(sys.stdout))
log = logging.getLogger("agbcube")

ConfigArg = Annotated[Path, typer.Argument(help="YAML config (see configs/benchmark.yaml).")]
SchedulerOpt = Annotated[
    str,
    typer.Option(
        "--scheduler",
        help="Dask scheduler: threads, processes, synchronous, local (LocalCluster + dashboard) "
        "or a cluster address tcp://host:port.",
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Warnings and results only: no progress.")
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Debug messages, and the traceback of an error.")
]

_OPTIONS = {"verbose": False, "quiet": False}  # the global -v/-q, before the command name


def _version(value: bool) -> None:
    if value:
        typer.echo(f"agbcube {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Above-ground biomass cubes, honest spatial cross-validation, models and maps."""
    _OPTIONS.update(verbose=verbose, quiet=quiet)


# --------------------------------------------------------------------------------------------
# logging, warnings and errors, for the duration of one command


class _ConsoleHandler(logging.Handler):
    """Log records as lines on stderr: warnings and errors with a coloured prefix."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.ERROR:
                console.print("[red]error:[/]", end=" ")
            elif record.levelno >= logging.WARNING:
                console.print("[yellow]warning:[/]", end=" ")
            console.print(text, markup=False, highlight=False, soft_wrap=True)
        except Exception:  # logging's contract: a handler never raises
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if _OPTIONS["verbose"]:
        log.warning("%s (%s, %s:%s)", message, category.__name__, filename, lineno)
    else:
        log.warning("%s", message)


def _verbose() -> bool:
    return _OPTIONS["verbose"]


def _quiet(quiet: bool = False) -> bool:
    return quiet or _OPTIONS["quiet"]


@contextlib.contextmanager
def _session(*, verbose: bool, quiet: bool) -> Iterator[None]:
    """Handler and level on the ``agbcube`` logger, warnings shown as log lines; all undone."""
    verbose = verbose or _OPTIONS["verbose"]
    level = logging.DEBUG if verbose else logging.WARNING if _quiet(quiet) else logging.INFO
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbose else "%(message)s"))
    saved = (log.level, log.propagate, _OPTIONS["verbose"])
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    _OPTIONS["verbose"] = verbose
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning afterwards
            warnings.showwarning = _show_warning
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        _OPTIONS["verbose"] = saved[2]


# torch reports a write that failed for want of space as a RuntimeError, without an errno
_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")
# a codec's own words for a damaged chunk, when no agbcube reader named the site around it
_DAMAGED_DATA = ("blosc decompression", "error during decompression", "while decompressing data")


def _fail(kind: str, message: str, code: int, err: BaseException) -> None:
    if _verbose():
        console.print("".join(traceback.format_exception(err)), markup=False, highlight=False)
    console.print(f"[red]error ({kind}):[/]", end=" ")
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def _os_error_message(err: OSError) -> str:

    if err.errno in WRITE_HINTS:
        return write_failure(Path(err.filename or "."), err, what="output")
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}; check the path and that the file is readable"


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """One line and exit 2 for every error of input or environment; 1 for a bug."""
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except AgbcubeError as err:
        _fail(type(err).__name__, str(err), 2, err)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: finished work is kept; re-run to resume")
        raise typer.Exit(130) from None
    except OSError as err:
        _fail(type(err).__name__, _os_error_message(err), 2, err)
    except MemoryError as err:
        message = "out of memory; use smaller chips, batches or tiles, or a larger machine"
        _fail("MemoryError", message, 2, err)

    except Exception as err:
        missing = missing_dependency(err) if isinstance(err, ModuleNotFoundError) else None
        if missing is not None:  # an extra's package: name the extra
            _fail(type(missing).__name__, str(missing), 2, err)
        if any(s in str(err) for s in _WRITE_FAILURES):
            message = (
                f"writing a file failed ({err}); the disk is probably full or read-only: free "
                "some space or write the output elsewhere"
            )
            _fail(type(err).__name__, message, 2, err)
        if any(s in str(err) for s in _DAMAGED_DATA):
            message = (
                f"a cube chunk cannot be decoded ({err}); the cube is damaged: run `agbcube "
                "build-cube CONFIG`, which rebuilds damaged sites"
            )
            _fail(type(err).__name__, message, 2, err)
        hint = "" if _verbose() else "; re-run with -v for the traceback"
        message = (
            f"{str(err) or repr(err)} (unexpected: this may be a bug in agbcube{hint}, please "
            "report it)"
        )
        _fail(type(err).__name__, message, 1, err)


def _command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command inside a logging session and the error handling (one line, exit code)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose, quiet = kwargs.get("verbose", False), kwargs.get("quiet", False)
        with _session(verbose=verbose, quiet=quiet), _errors():
            return func(*args, **kwargs)

    return wrapper


def _cube_table(built: dict) -> Table:
    table = Table(title="cube")
    cols = ("site", "status", "pixels", "bands", "indices", "empty bands", "valid AGB px")
    for col in (*cols, "AGB mean"):
        table.add_column(col, justify="right" if col not in ("site", "status") else "left")
    for site, r in built.items():
        mean = r.get("agb_mean")
        table.add_row(
            site,
            r["status"],
            f"{r['shape'][0]}×{r['shape'][1]}",
            str(r["bands"]),
            str(r["indices"]),
            str(len(r.get("empty_bands") or [])),
            f"{r.get('n_valid_agb', 0):,}",
            "–" if mean is None else f"{mean:.1f}",
        )
    return table


@app.command("build-cube", epilog=EXIT_CODES)
@_command
def build_cube_cmd(
    config: ConfigArg,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Rebuild sites that are up to date.")
    ] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune", help="Remove the cube's sites the config does not name (kept otherwise)."
        ),
    ] = False,
    scheduler: SchedulerOpt = "threads",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Align each site's satellite stack and AGB map and write the Zarr cube."""
    from agbcube.cube import build_cube

    cfg = load_config(config)
    built = build_cube(
        cfg.sites,
        cfg.cube,
        overwrite=overwrite,
        prune=prune,
        scheduler=scheduler,
        progress=not _quiet(quiet),
    )
    results.print(_cube_table(built))
    changed = [site for site, r in built.items() if r["status"] != "up to date"]
    if changed:
        log.info("cube written to %s (%s)", cfg.cube.output, ", ".join(changed))
    else:
        log.info("cube %s is up to date: nothing written (--overwrite rebuilds)", cfg.cube.output)


@app.command("demo", epilog=EXIT_CODES)
@_command
def demo_cmd(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the demo data and outputs.")
    ] = Path("demo-output"),
    size: Annotated[
        int, typer.Option(min=48, max=2048, help="AGB map side of each site, pixels.")
    ] = 160,
    stac: Annotated[
        bool,
        typer.Option(
            "--stac",
            help="Build the sites' bands from a local STAC catalogue of synthetic scenes with "
            "clouds (seasonal composites), not from ready-made stacks.",
        ),
    ] = False,
    scheduler: SchedulerOpt = "threads",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Generate three synthetic sites and run the pipeline on them end to end."""
    from agbcube.cube import build_cube, cube_sites
    from agbcube.demo import write_demo
    from agbcube.folds import make_folds, write_folds
    from agbcube.train.plan import resolve_device

    prepare_output_dir(output, kind="demo", what="demo --output")
    writer = write_demo
    if stac:
        from agbcube.stac.demo import write_stac_demo as writer
    path = writer(output, size_px=size)
    log.info("demo sites and config written to %s", path)
    cfg = load_config(path)
    built = build_cube(
        cfg.sites, cfg.cube, overwrite=True, scheduler=scheduler, progress=not _quiet(quiet)
    )
    results.print(_cube_table(built))
    folds = make_folds(cfg)
    write_folds(folds, cfg.folds.output)
    results.print(_folds_table(folds))
    results.print(_metrics_table(_train(cfg, overwrite=True, progress=not _quiet(quiet))))
    run_dir = cfg.train.output
    _predict_sites(
        run_dir,
        cfg.cube.output,
        cube_sites(cfg.cube.output),
        output=None,
        device=str(resolve_device("auto")),
        scheduler=scheduler,
        quiet=_quiet(quiet),
    )
    log.info(
        "demo outputs under %s: cube, folds, run (plots, metrics), maps in %s",
        output,
        run_dir / "maps",
    )


def _folds_table(folds) -> Table:
    import pandas as pd

    audit = folds.attrs["agbcube"]["audit"]
    table = Table(title="leakage audit (chips per role; distances in m)")
    cols = ["fold", "site", "train", "val", "test", "buffer", "min train–test", "median test→train"]
    for col in cols:
        table.add_column(col, justify="left" if col == "site" else "right")
    for r in audit["folds"]:
        q = r["test_nn_train_m"]
        table.add_row(
            str(r["fold"]),
            r["site"],
            *(str(r[f"n_{role}"]) for role in ("train", "val", "test", "buffer")),
            "–" if r["min_train_test_m"] is None else f"{r['min_train_test_m']:.0f}",
            "–" if q is None else f"{q[len(q) // 2]:.0f}",
        )
    per_site = pd.Series(folds["site"]).value_counts()
    table.caption = (
        f"every chip tested exactly once: {audit['tested_once']}; chips per site: "
        + ", ".join(f"{s} {n}" for s, n in per_site.items())
    )
    return table


def _chips_table(folds) -> Table:
    """Chips kept and dropped per site (also the sites left out), with each site's buffer."""
    meta = folds.attrs["agbcube"]
    table = Table(title="chips per site")
    cols = ["site", "candidates", "kept", "dropped: AGB", "dropped: NaN features", "buffer m"]
    for col in cols:
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, m in meta["chip_summary"].items():
        buffer = meta.get("buffer_m", {}).get(site)
        table.add_row(
            site,
            str(m["candidates"]),
            str(m["kept"]),
            str(m["dropped_low_valid_agb"]),
            str(m["dropped_nan_features"]),
            "left out" if buffer is None else f"{buffer:.0f}",
        )
    return table


@app.command("folds", epilog=EXIT_CODES)
@_command
def folds_cmd(
    config: ConfigArg,
    maps: Annotated[bool, typer.Option(help="Write a PNG map per site.")] = True,
    scheduler: SchedulerOpt = "threads",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Cut the cube into chips, split them into honest spatial folds, audit for leakage."""
    from agbcube.folds import make_folds, write_folds

    cfg = load_config(config)
    # on a cluster each site is a task (dashboard under "local"); else its chip statistics run
    # on the scheduler
    with dask_scheduler(scheduler) as client:
        folds = make_folds(cfg, client=client)
    paths = write_folds(folds, cfg.folds.output, maps=maps)
    results.print(_chips_table(folds))
    results.print(_folds_table(folds))
    for path in paths:
        log.info("wrote %s", path)


def _train(cfg: Any, **kwargs: Any) -> dict:
    """``run_cv``: its lines go to the ``agbcube.train`` logger (INFO: -q hides them), its bar
    of tasks to stderr (not with -q)."""
    from agbcube.train import run_cv

    return run_cv(cfg, **kwargs)


@app.command("train", epilog=EXIT_CODES)
@_command
def train_cmd(
    config: ConfigArg,
    device: Annotated[
        str | None,
        typer.Option(help="auto (GPU when present), cpu, cuda or cuda:N (default: train.device)."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Maximum epochs (overrides train.epochs).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option(help="Run directory (overrides train.output).")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            help="Where the fits run: in this process one after another (default; also "
            "threads, synchronous), a LocalCluster (local or processes: one worker per core, "
            "or per GPU; prints the dashboard link) or a cluster address tcp://host:port. "
            "The workers need the cube and the run directory at the same paths.",
        ),
    ] = None,
    threads_per_task: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="On a cluster: torch threads of each fit (default: each worker process's "
            "share of its machine's cores).",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No per-epoch lines; the summary only.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Cross-validate the model over the folds (making them if missing); write the run."""

    device = None if device is None else check_device(device, "--device")
    cfg = load_config(config)
    metrics = _train(
        cfg,
        device=device,
        epochs=epochs,
        resume=resume,
        overwrite=overwrite,
        output=output,
        scheduler=scheduler,
        threads_per_task=threads_per_task,
        progress=not _quiet(quiet),
    )
    results.print(_metrics_table(metrics))
    log.info("run written to %s", output or cfg.train.output)


def _metrics_table(metrics: dict) -> Table:
    table = Table(title="cross-validated accuracy (pooled over test folds)")
    for col in ("model", "site", "chip R²", "chip RMSE", "pixel R²", "pixel RMSE", "bias"):
        table.add_column(col, justify="left" if col in ("model", "site") else "right")

    def fmt(value, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    def r2(m: dict) -> str:
        ci = m.get("r2_ci95")
        return fmt(m["r2"], ".3f") + ("" if not ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]")

    for model, m in metrics["models"].items():
        chip, pix = m["chip"]["mg_ha"], m["pixel"]["mg_ha"]
        for site in [*chip["per_site"], "overall"]:
            c = chip["overall"] if site == "overall" else chip["per_site"][site]
            p = pix["overall"] if site == "overall" else pix["per_site"][site]
            table.add_row(
                model,
                site,
                r2(c),
                fmt(c["rmse"], ".1f"),
                r2(p),
                fmt(p["rmse"], ".1f"),
                fmt(c["bias"], "+.1f"),
            )
    lines = []
    if any(
        m[level]["mg_ha"]["overall"].get("r2_ci95")
        for m in metrics["models"].values()
        for level in ("chip", "pixel")
    ):
        lines.append("R² [95 % interval, resampling the test chips]")
    diff = metrics.get("difference")
    if diff and diff.get("chip"):
        a, b = diff["models"]
        cells = []
        for site, d in diff["chip"].items():
            ci = d["ci95"]
            cells.append(
                f"{site} {fmt(d['r2'], '+.3f')}"
                + ("" if not ci else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]")
            )
        lines.append(f"Chip R² of {a} minus {b}: " + "; ".join(cells))
    leaky = metrics.get("random_cv")
    if leaky:
        honest = metrics["models"].get(leaky["model"], {}).get("chip", {}).get("mg_ha", {})
        cells = [
            f"{site} {fmt(m['r2'], '.3f')}"
            + (
                f" (honest {fmt(honest['per_site'][site]['r2'], '.3f')})"
                if site in honest.get("per_site", {})
                else ""
            )
            for site, m in leaky["chip"]["mg_ha"]["per_site"].items()
        ]
        lines.append(
            f"Chip R² of {leaky['model']} under a random {leaky['n_folds']}-fold split "
            "(leaky, no buffer): " + "; ".join(cells)
        )
    table.caption = "\n".join(lines) or None
    return table


@app.command("predict", epilog=EXIT_CODES)
@_command
def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `agbcube train`.")],
    site: Annotated[
        list[str] | None, typer.Option("--site", help="Site(s) of the run's cube (default all).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Predict a new area: its config's sites are built first (never replacing a "
            "site already in its cube).",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output folder (default RUN_DIR/maps/<site>).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    window: Annotated[int | None, typer.Option(min=2, help="Window side in pixels.")] = None,
    stride: Annotated[int | None, typer.Option(min=1, help="Window stride in pixels.")] = None,
    aoa: Annotated[bool, typer.Option(help="Compute the DI and AOA layers.")] = True,
    scheduler: SchedulerOpt = "threads",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Map AGB (ensemble mean and s.d.) and its area of applicability, as COGs, Zarr and PNGs."""
    from agbcube.cube import build_cube, cube_sites
    from agbcube.predict import run_cube
    from agbcube.train.plan import resolve_device

    device = check_device(device, "--device")
    # on a cluster each worker resolves the device itself (a CPU client may drive GPU workers)
    on_cluster = scheduler == "local" or "://" in scheduler
    dev = device if on_cluster else str(resolve_device(device))
    if config is not None:
        cfg = load_config(config)
        build_cube(
            cfg.sites,
            cfg.cube,
            replace_changed=False,
            scheduler=scheduler,
            progress=not _quiet(quiet),
        )
        store = cfg.cube.output
        sites = site or [s.name for s in cfg.sites]
    else:
        store = run_cube(run_dir)
        sites = site or cube_sites(store)
    _predict_sites(
        run_dir,
        store,
        sites,
        output=output,
        device=dev,
        window=window,
        stride=stride,
        aoa=aoa,
        scheduler=scheduler,
        quiet=_quiet(quiet),
    )


def _predict_sites(
    run_dir: Path,
    store: Path,
    sites: list[str],
    *,
    output: Path | None,
    device: str,
    window: int | None = None,
    stride: int | None = None,
    aoa: bool = True,
    scheduler: str = "threads",
    quiet: bool = False,
) -> None:
    from agbcube.cube import open_cube
    from agbcube.predict import predict_run, write_maps
    from agbcube.stac.items import update_map_collection

    one = output is not None and len(sites) == 1  # its maps straight into --output
    root = output if one else (output or run_dir / "maps")
    _prepare_map_outputs(root, [root] if one else [root / name for name in sites], run_dir)
    items = []
    with dask_scheduler(scheduler) as client:
        for name in sites:
            ds = open_cube(store, name, chunks=None)  # each tile task reads its window
            maps = predict_run(
                run_dir,
                ds,
                device=device,
                window_px=window,
                stride_px=stride,
                aoa=aoa,
            )
            out = root if one else root / name
            write_maps(maps, out, client=client, progress=not quiet)
            log.info("site '%s': maps written to %s", name, out)
            items.append(out / "item.json")
    collection = update_map_collection(root / "collection.json", items, run_dir=run_dir)
    log.info("STAC collection of the maps: %s", collection)


def _prepare_map_outputs(root: Path, folders: list[Path], run_dir: Path) -> None:
    """Refuse, before any work, map folders and a collection that are not agbcube's to write;
    mark the maps' root (of several sites) as agbcube's. The root is the run's own ``maps``
    folder, or must be agbcube's or new."""
    from agbcube._io import check_output_dir, check_replaceable, mark_output, output_kind

    for folder in folders:
        check_output_dir(folder, what="maps output")
    check_replaceable(root / "collection.json", what="maps collection")
    if root not in folders and output_kind(root) is None:
        if root != run_dir / "maps":  # the run's own: agbcube's, marked or not
            check_output_dir(root, what="maps output")
        mark_output(root, "maps")


@app.command("estimate", epilog=EXIT_CODES)
@_command
def estimate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `agbcube train`.")],
    areas: Annotated[
        Path,
        typer.Option(
            "--areas", help="Polygons (GeoPackage, GeoJSON, Shapefile or GeoParquet), any CRS."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(help="Write the table: .parquet (GeoParquet), .gpkg or .csv."),
    ] = None,
    maps: Annotated[
        Path | None,
        typer.Option(help="The maps (default RUN_DIR/maps): a folder of sites or one site's."),
    ] = None,
    carbon_fraction: Annotated[
        float, typer.Option(help="Carbon per unit dry biomass (IPCC default 0.47).")
    ] = 0.47,
    level: Annotated[float, typer.Option(help="Confidence level of the intervals.")] = 0.95,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Total AGB, carbon and CO₂e of each polygon from the maps, with confidence intervals
    that account for the spatial correlation of the map's errors."""
    from agbcube.estimate import estimate_areas, table_format, write_table

    if output is not None:
        table_format(output)  # before the work
    table = estimate_areas(run_dir, areas, maps=maps, carbon_fraction=carbon_fraction, level=level)
    if output is not None:
        write_table(table, output)
        log.info("estimates of %d areas written to %s", len(table), output)
    Console().print(_estimate_table(table, level))


def _estimate_table(table: Any, level: float) -> Table:
    out = Table(title=f"area estimates ({level:.0%} confidence intervals)")
    for col in ("area", "ha", "mapped", "in AOA", "AGB Mg/ha", "AGB total Mg", "CO₂e Mg"):
        out.add_column(col, justify="left" if col == "area" else "right")
    label = next((c for c in ("name", "id", "NAME", "ID") if c in table.columns), None)
    for i, r in table.iterrows():
        out.add_row(
            str(r[label] if label else i),
            f"{r['area_ha']:,.1f}",
            f"{r['mapped_fraction']:.0%}",
            f"{r['aoa_fraction']:.0%}",
            f"{r['agb_mean_mg_ha']:.1f} [{r['agb_mean_lower']:.1f}, {r['agb_mean_upper']:.1f}]",
            f"{r['agb_total_mg']:,.0f} [{r['agb_total_mg_lower']:,.0f}, "
            f"{r['agb_total_mg_upper']:,.0f}]",
            f"{r['co2e_mg']:,.0f}",
        )
    if (table["mapped_fraction"] < 0.99).any():  # pixel centres: ~0.5 % either way
        out.caption = "Totals are of the mapped part of each area (see mapped, outside_maps_ha)."
    return out


@app.command("export", epilog=EXIT_CODES)
@_command
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `agbcube train`.")],
    fmt: Annotated[
        str, typer.Option("--format", help="torchscript (plain torch) or onnx (onnxruntime).")
    ] = "torchscript",
    output: Annotated[
        Path | None, typer.Option(help="Export folder (default RUN_DIR/export).")
    ] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write the run's ensemble as one self-contained model file that maps a window of the
    cube's features to AGB (mean and s.d.) with nothing of agbcube installed."""
    from agbcube.train.export import export_run

    path = export_run(run_dir, output or run_dir / "export", fmt=fmt)
    results.print(str(path))
    log.info("metadata (inputs in order, window, units): %s", path.with_name("model.json"))


@app.command("config-reference")
@_command
def config_reference_cmd() -> None:
    """Print the reference of every configuration key (Markdown)."""

    sys.stdout.write(config_reference())


if __name__ == "__main__":  # pragma: no cover
    app()
