"""Pages generated from the code when the site is built (mkdocs-gen-files), so they never drift.

- ``reference/config.md``: the config reference, from the pydantic models;
- ``reference/cli.md``: every command and option, from the typer app;
- ``reference/api/<module>.md``: mkdocstrings pages of the public modules;
- ``benchmarks.md``: ``BENCHMARKS.md`` as it is;
- ``generated/folds_map_<site>.png``: the demo sites' fold maps, made by running the cube and
  folds stages on small demo data.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

API_MODULES = {
    "agbcube": "The package: what `import agbcube` exports.",
    "agbcube.config": "Loading and validating configs.",
    "agbcube.cube": "Building cubes.",
    "agbcube.chips": "Cutting cubes into chips.",
    "agbcube.folds": "Honest spatial folds and the leakage audit.",
    "agbcube.train": "Cross-validated training.",
    "agbcube.train.plan": "A run's plan: its settings resolved once, and its tasks.",
    "agbcube.train.execute": "Running a run's tasks, here or on a Dask cluster.",
    "agbcube.train.cluster": "Training on a Dask cluster: fits as tasks, GPU workers, faults.",
    "agbcube.train.intervals": "Prediction intervals calibrated on the test folds.",
    "agbcube.train.errorfield": "The CV's errors in space: the error model of area means.",
    "agbcube.predict": "Maps, uncertainty and the area of applicability.",
    "agbcube.estimate": "Area totals of AGB, carbon and CO₂e with confidence intervals.",
    "agbcube.stac.composites": "STAC in: seasonal multi-sensor composites from a catalogue.",
    "agbcube.stac.items": "STAC out: Items and Collections of cubes and maps.",
    "agbcube.indices": "Spectral indices by band name.",
    "agbcube.bands": "Band names and presets.",
    "agbcube.errors": "The exceptions agbcube raises.",
}

CONFIG_INTRO = """# Configuration

One YAML file, one section per stage; relative paths resolve against the file's folder. Unknown
keys are errors with a "did you mean" hint; wrong types name the key's path.

```yaml
sites:
  - name: achanakmar
    satellite: ../../shared/benchmark/raw/satellite/achanakmar_satellite.tif
    biomass: ../../shared/benchmark/raw/biomass/achanakmar_biomass.tif
    bands: null            # list of names, a preset ('multisensor-59'), or null: file descriptions
    satellite_nodata: null # override the file's nodata (e.g. -9999)
    biomass_nodata: null
cube:
  output: cubes/benchmark.zarr
  grid: biomass            # or satellite, or {crs: EPSG:32643, resolution: 30}
  agb_range: [0, 600]
  indices: auto            # or none, or a list: [NDVI, S1_RVI_T1]
  chunks: 256
```

Configs of the original pipeline (`preprocessing.raster_pairs` with `satellite_path`,
`biomass_path`, `site_name`, plus its chip and fold settings) load as they are; settings with no
equivalent are listed in a warning. Its `spatial_buffer` is ignored with a warning: it was in
degrees on EPSG:4326 and never took effect.

## Reference

Generated from the pydantic models when this site was built (`agbcube config-reference`
prints the same tables).

"""


def config_page() -> str:
    from agbcube.config import config_reference

    # the reference's own headings are ###, under this page's "Reference"
    return CONFIG_INTRO + config_reference()


def _cell(text: object) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _option_row(param) -> str:
    # duck-typed: typer builds its commands on a click of its own
    if type(param).__name__.endswith("Argument"):
        names = f"`{param.name.upper()}`"
        shown = "required" if param.required else f"`{param.default}`"
    else:
        names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
        default = param.default
        shown = "" if default is None or callable(default) or default == () else f"`{default}`"
    return f"| {names} | {shown} | {_cell(getattr(param, 'help', '') or '')} |"


def cli_page() -> str:
    import typer

    from agbcube.cli import app

    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="agbcube")
    header = ["| argument / option | default | description |", "|---|---|---|"]
    lines = [
        "# Command line",
        "",
        "Generated from the typer app when this site was built; `agbcube COMMAND --help` prints",
        "the same.",
        "",
        _cell(group.help or ""),
        "",
    ]
    top = [p for p in group.params if p.name != "help"]
    if top:
        lines += [*header, *(_option_row(p) for p in top), ""]
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        sub = cmd.context_class(cmd, info_name=name, parent=ctx)
        usage = " ".join(cmd.collect_usage_pieces(sub)).replace("{", "").replace("}", "").upper()
        lines += [f"## `agbcube {name}`", "", _cell(cmd.help or ""), ""]
        lines += ["```text", f"agbcube {name} {usage}", "```", ""]
        params = [p for p in cmd.params if p.name != "help"]
        if params:
            lines += [*header, *(_option_row(p) for p in params), ""]
    return "\n".join(lines)


def fold_maps(directory: Path) -> list[Path]:
    """Run the demo's cube and folds stages (small) and return the fold maps."""
    from agbcube.config import load_config
    from agbcube.cube import build_cube
    from agbcube.demo import write_demo
    from agbcube.folds import make_folds, write_folds

    cfg = load_config(write_demo(directory, size_px=96))
    with warnings.catch_warnings():  # the small demo's shrunk buffers are no news here
        warnings.simplefilter("ignore")
        build_cube(cfg.sites, cfg.cube, progress=False)
        paths = write_folds(make_folds(cfg), cfg.folds.output, maps=True)
    return [p for p in paths if p.suffix == ".png"]


def package_page() -> str:
    """What ``import agbcube`` exports: its names are imported on first use (PEP 562), which
    mkdocstrings cannot see, so the page lists each with a link to where it is documented (or
    documents it here, when its module has no page)."""
    import agbcube

    rows, here = ["| name | documented in |", "|---|---|"], []
    for name in agbcube.__all__:
        if name == "__version__":
            continue
        module = agbcube._MODULE_OF[name]
        if module in API_MODULES:
            rows.append(f"| `{name}` | [`{module}`]({module}.md#{module}.{name}) |")
        else:
            rows.append(f"| `{name}` | [below](#{module}.{name}) |")
            here.append(f"::: {module}.{name}\n    options:\n      show_root_heading: true\n")
    version = f"`agbcube.__version__` is the installed version ({agbcube.__version__}).\n\n"
    return version + "\n".join(rows) + "\n\n" + "\n".join(here)


def main() -> None:
    import mkdocs_gen_files

    with mkdocs_gen_files.open("reference/config.md", "w") as f:
        f.write(config_page())
    with mkdocs_gen_files.open("reference/cli.md", "w") as f:
        f.write(cli_page())
    for module, summary in API_MODULES.items():
        with mkdocs_gen_files.open(f"reference/api/{module}.md", "w") as f:
            body = package_page() if module == "agbcube" else f"::: {module}\n"
            f.write(f"# `{module}`\n\n{summary}\n\n{body}")
    with mkdocs_gen_files.open("benchmarks.md", "w") as f:
        f.write((ROOT / "BENCHMARKS.md").read_text())
    with tempfile.TemporaryDirectory(prefix="agbcube-docs-") as tmp:
        for png in fold_maps(Path(tmp)):
            with mkdocs_gen_files.open(f"generated/{png.name}", "wb") as f:
                f.write(png.read_bytes())


if __name__ in ("__main__", "<run_path>"):  # run by mkdocs-gen-files, not when imported
    main()
