"""The ``agbcube`` command line: parse, load the config, call the library, print a summary."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from agbcube.errors import AgbcubeError

app = typer.Typer(
    help="Above-ground biomass cubes, honest spatial cross-validation, models and maps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# A log file (not a terminal, no COLUMNS) gets 120 columns rather than Rich's 80, so that the
# summary table, whose R² cells carry intervals, stays one line per row.
console = Console(
    stderr=True, width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else 120
)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config (see configs/benchmark.yaml).")]
SchedulerOpt = Annotated[
    str,
    typer.Option(
        "--scheduler",
        help="Dask scheduler: threads, processes, synchronous, local (LocalCluster + dashboard) "
        "or a cluster address tcp://host:port.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/] {message}")


def _run(func, *args, **kwargs):
    """Call into the library; turn agbcube errors into a one-line message and exit code 2."""
    warnings.showwarning = _show_warning
    try:
        return func(*args, **kwargs)
    except AgbcubeError as err:
        console.print(f"[red]error ({type(err).__name__}):[/]", end=" ")
        console.print(str(err), markup=False, highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: finished work is kept; re-run to resume")
        raise typer.Exit(130) from None


def _log_progress(quiet: bool) -> None:
    """Training's progress lines (the ``agbcube.train`` logger) on the console."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("agbcube.train")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not logger.handlers:
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def _cube_table(results: dict) -> Table:
    table = Table(title="cube")
    for col in ("site", "status", "pixels", "bands", "indices", "valid AGB px", "AGB mean"):
        table.add_column(col, justify="right" if col not in ("site", "status") else "left")
    for site, r in results.items():
        mean = r.get("agb_mean")
        table.add_row(
            site,
            r["status"],
            f"{r['shape'][0]}×{r['shape'][1]}",
            str(r["bands"]),
            str(r["indices"]),
            f"{r.get('n_valid_agb', 0):,}",
            "–" if mean is None else f"{mean:.1f}",
        )
    return table


@app.command("build-cube")
def build_cube_cmd(
    config: ConfigArg,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Rebuild sites that are up to date.")
    ] = False,
    scheduler: SchedulerOpt = "threads",
    quiet: QuietOpt = False,
) -> None:
    """Align each site's satellite stack and AGB map and write the Zarr cube."""
    from agbcube.config import load_config
    from agbcube.cube import build_cube

    cfg = _run(load_config, config)
    results = _run(
        build_cube,
        cfg.sites,
        cfg.cube,
        overwrite=overwrite,
        scheduler=scheduler,
        progress=not quiet,
        echo=console.print,
    )
    console.print(_cube_table(results))
    console.print(f"cube written to [bold]{cfg.cube.output}[/]")


@app.command("demo")
def demo_cmd(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the demo data and outputs.")
    ] = Path("demo-output"),
    size: Annotated[int, typer.Option(help="AGB map side of each site, pixels.")] = 160,
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
) -> None:
    """Generate three synthetic sites and run the pipeline on them end to end."""
    from agbcube.config import load_config
    from agbcube.cube import build_cube
    from agbcube.demo import write_demo
    from agbcube.folds import make_folds, write_folds
    from agbcube.train import run_cv

    writer = write_demo
    if stac:
        from agbcube.stac_demo import write_stac_demo as writer
    path = _run(writer, output, size_px=size)
    console.print(f"demo sites and config written to [bold]{path}[/]")
    cfg = _run(load_config, path)
    results = _run(
        build_cube,
        cfg.sites,
        cfg.cube,
        overwrite=True,
        scheduler=scheduler,
        progress=not quiet,
        echo=console.print,
    )
    console.print(_cube_table(results))
    folds = _run(make_folds, cfg, echo=console.print)
    _run(write_folds, folds, cfg.folds.output)
    console.print(_folds_table(folds))
    _log_progress(quiet)
    metrics = _run(run_cv, cfg, overwrite=True)
    console.print(_metrics_table(metrics))
    from agbcube.cube import cube_sites
    from agbcube.train.loop import resolve_device

    run_dir = cfg.train.output
    _predict_sites(
        run_dir,
        cfg.cube.output,
        _run(cube_sites, cfg.cube.output),
        output=None,
        device=str(resolve_device("auto")),
        scheduler=scheduler,
        quiet=quiet,
    )
    console.print(
        f"demo outputs under [bold]{output}[/]: cube, folds, run (plots, metrics), "
        f"maps in {run_dir / 'maps'}"
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


@app.command("folds")
def folds_cmd(
    config: ConfigArg,
    maps: Annotated[bool, typer.Option(help="Write a PNG map per site.")] = True,
    scheduler: SchedulerOpt = "threads",
    quiet: QuietOpt = False,
) -> None:
    """Cut the cube into chips, split them into honest spatial folds, audit for leakage."""
    from agbcube._dask import dask_scheduler
    from agbcube.config import load_config
    from agbcube.folds import make_folds, write_folds

    cfg = _run(load_config, config)
    with dask_scheduler(scheduler):  # the chip statistics run on it (dashboard under "local")
        folds = _run(make_folds, cfg, echo=None if quiet else console.print)
    paths = _run(write_folds, folds, cfg.folds.output, maps=maps)
    console.print(_folds_table(folds))
    for path in paths:
        console.print(f"wrote {path}")


@app.command("train")
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
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No per-epoch lines; the summary only.")
    ] = False,
) -> None:
    """Cross-validate the model over the folds (making them if missing); write the run."""
    from agbcube.config import load_config
    from agbcube.train import run_cv

    cfg = _run(load_config, config)
    _log_progress(quiet)
    metrics = _run(
        run_cv, cfg, device=device, epochs=epochs, resume=resume, overwrite=overwrite, output=output
    )
    console.print(_metrics_table(metrics))
    console.print(f"run written to [bold]{output or cfg.train.output}[/]")


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


@app.command("predict")
def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `agbcube train`.")],
    site: Annotated[
        list[str] | None, typer.Option("--site", help="Site(s) of the run's cube (default all).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Predict a new area: its config's sites are built first."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output folder (default RUN_DIR/maps/<site>).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    window: Annotated[int | None, typer.Option(help="Window side in pixels.")] = None,
    stride: Annotated[int | None, typer.Option(help="Window stride in pixels.")] = None,
    aoa: Annotated[bool, typer.Option(help="Compute the DI and AOA layers.")] = True,
    scheduler: SchedulerOpt = "threads",
    quiet: QuietOpt = False,
) -> None:
    """Map AGB (ensemble mean and s.d.) and its area of applicability, as COGs, Zarr and PNGs."""

    from agbcube.config import load_config
    from agbcube.cube import build_cube, cube_sites
    from agbcube.train.loop import resolve_device

    dev = str(_run(resolve_device, device))
    if config is not None:
        cfg = _run(load_config, config)
        _run(
            build_cube,
            cfg.sites,
            cfg.cube,
            scheduler=scheduler,
            progress=not quiet,
            echo=console.print,
        )
        store = cfg.cube.output
    else:
        from agbcube.config import load_run_config

        store = _run(load_run_config, run_dir).cube.output
    _predict_sites(
        run_dir,
        store,
        site or _run(cube_sites, store),
        output=output,
        device=dev,
        window=window,
        stride=stride,
        aoa=aoa,
        scheduler=scheduler,
        quiet=quiet,
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
    from agbcube._dask import dask_scheduler
    from agbcube.catalog import update_map_collection
    from agbcube.cube import open_cube
    from agbcube.predict import predict_run, write_maps

    items = []
    with dask_scheduler(scheduler) as client:
        for name in sites:
            ds = _run(open_cube, store, name, chunks=None)  # each tile task reads its window
            maps = _run(
                predict_run,
                run_dir,
                ds,
                device=device,
                window_px=window,
                stride_px=stride,
                aoa=aoa,
            )
            out = (
                output
                if (output is not None and len(sites) == 1)
                else ((output or run_dir / "maps") / name)
            )
            _run(write_maps, maps, out, client=client, progress=not quiet, echo=console.print)
            console.print(f"site '{name}': maps written to [bold]{out}[/]")
            items.append(out / "item.json")
    root = output if (output is not None and len(sites) == 1) else (output or run_dir / "maps")
    collection = _run(update_map_collection, root / "collection.json", items, run_dir=run_dir)
    console.print(f"STAC collection of the maps: [bold]{collection}[/]")


@app.command("config-reference")
def config_reference_cmd() -> None:
    """Print the reference of every configuration key (Markdown)."""
    from agbcube.config import config_reference

    sys.stdout.write(config_reference())


if __name__ == "__main__":  # pragma: no cover
    app()
