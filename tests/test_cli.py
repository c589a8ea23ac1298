"""agbcube/cli.py: streams, log levels, one-line errors with exit codes, --version."""

from __future__ import annotations

import errno
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from agbcube import __version__
from agbcube.cli import app
from tests.conftest import write_raster


def _invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _config(tmp_path: Path, rng, *, sites=("simple",), cube="cube.zarr", name="cfg.yaml") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    entries = []
    for site in sites:
        stack = rng.uniform(100, 3000, (2, 40, 48)).astype("float32")
        sat = write_raster(tmp_path / f"{site}_sat.tif", stack, descriptions=["B4", "B8"])
        agb = write_raster(
            tmp_path / f"{site}_agb.tif", rng.uniform(10, 300, (40, 48)).astype("f4")
        )
        entries.append({"name": site, "satellite": sat.name, "biomass": agb.name})
    cfg = {
        "sites": entries,
        "cube": {"output": cube, "chunks": 16, "indices": "none"},
        "chips": {"size": 8, "overlap": 0.0},
        "folds": {"n_folds": 3, "buffer_m": 0, "output": "folds.parquet"},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_line_error(result, kind: str, code: int = 2) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error ({kind}): "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_version_and_documented_exit_codes():
    result = _invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"agbcube {__version__}"
    result = _invoke("--help")
    assert "Exit codes: 0 success; 1 unexpected error" in " ".join(result.stdout.split())


def test_results_go_to_stdout_and_progress_to_stderr(tmp_path, rng):
    cfg = _config(tmp_path, rng)
    result = _invoke("build-cube", cfg)
    assert result.exit_code == 0, result.output
    assert "valid AGB px" in result.stdout and "site 'simple'" not in result.stdout
    assert "site 'simple': built" in result.stderr and "cube written to" in result.stderr
    again = _invoke("build-cube", cfg)  # every site up to date: nothing is said to be written
    assert "is up to date: nothing written" in again.stderr and "written to" not in again.stderr
    assert _invoke("build-cube", cfg, "-q").stderr == ""
    result = _invoke("folds", cfg)
    assert result.exit_code == 0, result.output
    assert "chips per site" in result.stdout and "leakage audit" in result.stdout
    assert "wrote " in result.stderr and "wrote " not in result.stdout
    # -q: no progress and no messages, but the results, with the per-site drop counts
    for args in (["folds", cfg, "-q"], ["-q", "folds", cfg]):
        result = _invoke(*args)
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        assert "dropped: AGB" in result.stdout and "dropped: NaN features" in result.stdout


def test_warnings_are_log_lines_and_nothing_global_is_left_behind(tmp_path, rng, monkeypatch):
    import agbcube.cube

    def warn(*args, **kwargs):
        warnings.warn("site 'x': something to know", UserWarning, stacklevel=2)
        logging.getLogger("agbcube.cube").info("an info line")
        return {}

    monkeypatch.setattr(agbcube.cube, "build_cube", warn)
    show = warnings.showwarning
    result = _invoke("build-cube", _config(tmp_path, rng), "-q")
    assert result.exit_code == 0
    assert "warning: site 'x': something to know" in result.stderr
    assert "an info line" not in result.stderr
    assert warnings.showwarning is show  # scoped to the command
    assert logging.getLogger("agbcube").handlers == []


@pytest.mark.parametrize(
    ("error", "kind", "code", "match"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/cube.zarr/x/0.0"), "OSError", 2,
         r"cannot write the output at /data/cube.zarr/x/0.0: no space left on the device; free"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/cube.zarr"), "PermissionError", 2,
         r"/ro/cube.zarr: permission denied; write the output to a folder you can write to"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), "OSError", 2,
         r"the file system is read-only"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/in.tif"), "IsADirectoryError", 2,
         r"/data/in.tif: Is a directory; check the path"),
        (RuntimeError("[enforce fail] unexpected pos 76928 vs 76816"), "RuntimeError", 2,
         r"writing a file failed .*disk is probably full or read-only"),
        (MemoryError(), "MemoryError", 2, r"out of memory"),
        (RuntimeError("error during blosc decompression: -1"), "RuntimeError", 2,
         r"a cube chunk cannot be decoded .*build-cube"),
        (TypeError("unsupported operand"), "TypeError", 1,
         r"unsupported operand \(unexpected: this may be a bug in agbcube; re-run with -v"),
    ],
)  # fmt: skip
def test_every_failure_is_one_line_with_its_exit_code(
    tmp_path, rng, monkeypatch, error, kind, code, match
):
    import re

    import agbcube.cube

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(agbcube.cube, "build_cube", fail)
    line = _one_line_error(_invoke("build-cube", _config(tmp_path, rng)), kind, code)
    assert re.search(match, line), line
    verbose = _invoke("build-cube", _config(tmp_path, rng), "-v")
    assert verbose.exit_code == code and "Traceback (most recent call last)" in verbose.stderr


def test_interrupted_exits_130(tmp_path, rng, monkeypatch):
    import agbcube.cube

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(agbcube.cube, "build_cube", interrupt)
    result = _invoke("build-cube", _config(tmp_path, rng))
    assert result.exit_code == 130 and "finished work is kept" in result.stderr


@pytest.mark.parametrize(
    ("content", "kind", "match"),
    [
        (b"sites: [{name: \xe9t\xe9}]\n", "ConfigError", r"not UTF-8 text \(byte 0xe9 on line 1"),
        (b"sites: [{name: a, satellite: s.tif, biomass: b.tif, crs: 'EPSG:123456789'}]\n",
         "ConfigError", r"sites.0.crs: 'EPSG:123456789' is not a CRS"),
        (b"preprocessing: {raster_pairs: [{satellite_path: 3, biomass_path: b}]}\n",
         "ConfigError", r"raster_pairs\[0\].satellite_path must be a file path, got 3"),
    ],
)  # fmt: skip
def test_bad_configs_are_one_line_errors(tmp_path, content, kind, match):
    import re

    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    for command in ("build-cube", "folds", "train"):
        line = _one_line_error(_invoke(command, path), kind)
        assert re.search(match, line), line


def test_train_lines_follow_the_log_level(tmp_path, rng, monkeypatch):
    import agbcube.train

    def logging_run_cv(config, **kwargs):  # training reports through logging, not an echo
        assert "echo" not in kwargs
        logging.getLogger("agbcube.train").info("fold 0 epoch 2: loss 0.9")
        return {"models": {}}

    monkeypatch.setattr(agbcube.train, "run_cv", logging_run_cv)
    cfg = _config(tmp_path, rng)
    result = _invoke("train", cfg)
    assert result.exit_code == 0, result.output
    assert "epoch 2" in result.stderr and "epoch" not in result.stdout
    assert "cross-validated accuracy" in result.stdout
    result = _invoke("train", cfg, "-q")
    assert result.exit_code == 0 and "epoch" not in result.output


def test_train_overwrite_never_empties_a_folder_without_a_run(tmp_path, rng):
    cfg = _config(tmp_path, rng)
    assert _invoke("build-cube", cfg, "-q").exit_code == 0
    mine = tmp_path / "my_analysis"
    mine.mkdir()
    (mine / "plots.R").write_text("plot(x)")
    for extra in ([], ["--overwrite"], ["--resume"]):
        line = _one_line_error(_invoke("train", cfg, "--output", mine, *extra), "OutputExistsError")
        assert f"run directory {mine} holds files but no agbcube run" in line
    assert [p.name for p in mine.iterdir()] == ["plots.R"]
    # a folder that merely looks like a run (a config.yaml and a metrics.json) is not one
    exp = tmp_path / "exp"
    exp.mkdir()
    files = {"config.yaml": "lr: 1\n", "metrics.json": "{}\n", "notes.txt": "n\n"}
    for name, text in files.items():
        (exp / name).write_text(text)
    for extra in ([], ["--overwrite"], ["--resume"]):
        line = _one_line_error(_invoke("train", cfg, "--output", exp, *extra), "OutputExistsError")
        assert f"run directory {exp} holds files but no agbcube run" in line
    assert {p.name: p.read_text() for p in exp.iterdir()} == files


def _train_run(tmp_path: Path, cfg: Path) -> Path:
    """A run directory as far as `predict` reads it before the models: its config, which
    is validated as strictly as a fresh one."""
    run = tmp_path / "run"
    run.mkdir()
    config = yaml.safe_load(Path(cfg).read_text())
    config["cube"]["output"] = str(tmp_path / "cube.zarr")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_predict_for_a_new_area_never_touches_the_training_sites(tmp_path, rng, monkeypatch):
    import agbcube.cli
    from agbcube.cube import cube_sites, open_cube

    train_cfg = _config(tmp_path, rng, sites=("betul", "khaoyai"))
    assert _invoke("build-cube", train_cfg, "-q").exit_code == 0
    before = {s: open_cube(tmp_path / "cube.zarr", s).load() for s in ("betul", "khaoyai")}
    mapped = []
    monkeypatch.setattr(
        agbcube.cli, "_predict_sites", lambda run, store, sites, **kw: mapped.append(sites)
    )
    run = _train_run(tmp_path, train_cfg)
    area = _config(tmp_path / "area", rng, sites=("new",), cube=str(tmp_path / "cube.zarr"))
    result = _invoke("predict", run, "--config", area, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert mapped == [["new"]]  # the new area's sites, not the cube's
    assert cube_sites(tmp_path / "cube.zarr") == ["new", "betul", "khaoyai"]  # config first
    clash = _config(tmp_path / "clash", rng, sites=("betul",), cube=str(tmp_path / "cube.zarr"))
    line = _one_line_error(
        _invoke("predict", run, "--config", clash, "--device", "cpu"), "CubeError"
    )
    assert "site 'betul' is already in cube" in line and "never replaced" in line
    for site, ds in before.items():
        np.testing.assert_array_equal(
            ds["agb"].values, open_cube(tmp_path / "cube.zarr", site)["agb"].values
        )


def test_predict_output_that_is_a_file_is_one_line(tmp_path, rng, monkeypatch):
    import agbcube.predict
    from tests.test_predict import Dense, _identity

    cfg = _config(tmp_path, rng)
    assert _invoke("build-cube", cfg, "-q").exit_code == 0
    run = _train_run(tmp_path, cfg)

    def fake_predict_run(run_dir, ds, **kwargs):
        return agbcube.predict.predict_site(ds, [(Dense(2, 1), _identity(2))], window_px=8)

    monkeypatch.setattr(agbcube.predict, "predict_run", fake_predict_run)
    target = tmp_path / "map.tif"
    target.write_bytes(b"II*\x00 someone's GeoTIFF")
    args = ("predict", run, "--output", target, "--device", "cpu", "-q")
    line = _one_line_error(_invoke(*args), "OutputExistsError")
    assert f"maps output {target} is a file; give a folder" in line
    assert target.read_bytes() == b"II*\x00 someone's GeoTIFF"
    # a folder of the user's whose files merely share agbcube's names is not agbcube's
    web = tmp_path / "web"
    web.mkdir()
    files = {"maps.json": '{"mine": 1}', "collection.json": '{"mine": 2}'}
    for name, text in files.items():
        (web / name).write_text(text)
    line = _one_line_error(_invoke("predict", run, "--output", web, "-q"), "OutputExistsError")
    assert "holds files agbcube did not write" in line
    assert {p.name: p.read_text() for p in web.iterdir()} == files
    # nor is a folder of the user's inside one of agbcube's (the demo folder, a run)
    from agbcube._io import mark_output

    mark_output(tmp_path / "demo", "demo")
    shutil.copytree(web, tmp_path / "demo" / "web")
    args = ("predict", run, "--output", tmp_path / "demo" / "web", "-q")
    assert "holds files agbcube did not write" in _one_line_error(
        _invoke(*args), "OutputExistsError"
    )
    assert {p.name: p.read_text() for p in (tmp_path / "demo" / "web").iterdir()} == files
    ok = _invoke("predict", run, "--output", tmp_path / "maps", "--device", "cpu", "-q")
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "maps" / "agb_mean.tif").is_file()


def test_predict_refuses_a_collection_not_its_own_before_any_map(tmp_path, rng, monkeypatch):
    import agbcube.predict
    from tests.test_predict import Dense, _identity

    cfg = _config(tmp_path, rng, sites=("a", "b"))
    assert _invoke("build-cube", cfg, "-q").exit_code == 0
    run = _train_run(tmp_path, cfg)
    calls = []

    def fake_predict_run(run_dir, ds, **kwargs):
        calls.append(ds.attrs["site"])
        return agbcube.predict.predict_site(ds, [(Dense(2, 1), _identity(2))], window_px=8)

    monkeypatch.setattr(agbcube.predict, "predict_run", fake_predict_run)
    web = tmp_path / "web"
    web.mkdir()
    (web / "collection.json").write_text('{"mine": 1}')
    line = _one_line_error(_invoke("predict", run, "--output", web, "-q"), "OutputExistsError")
    assert f"{web}" in line and "not written by agbcube" in line
    assert not calls and [p.name for p in web.iterdir()] == ["collection.json"]  # no work done
    for _ in range(2):  # a new folder for several sites' maps is agbcube's from then on
        ok = _invoke("predict", run, "--output", tmp_path / "maps", "--device", "cpu", "-q")
        assert ok.exit_code == 0, ok.output
    assert {p.name for p in (tmp_path / "maps").iterdir()} >= {"a", "b", "collection.json"}


@pytest.mark.parametrize("command", ["train", "predict"])
def test_an_unknown_device_is_one_line_listing_the_accepted_ones(tmp_path, rng, command):
    """Checked before any work: no cube, folds or run is made."""
    cfg = _config(tmp_path, rng)
    target = cfg if command == "train" else tmp_path / "no-run"
    line = _one_line_error(_invoke(command, target, "--device", "tpu"), "ConfigError")
    assert "--device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N" in line
    assert not (tmp_path / "cube.zarr").exists()


def test_gpu_is_read_as_cuda(tmp_path, rng, monkeypatch):
    """--device gpu means cuda: where torch has no CUDA it is the one-line CUDA error."""
    import torch

    from agbcube.config import TrainConfig, check_device, parse_config
    from agbcube.errors import ConfigError

    assert check_device("GPU:1") == "cuda:1" and TrainConfig(device="gpu").device == "cuda"
    with pytest.raises(ConfigError, match=r"train.device: 'tpu' is not a device; use auto"):
        parse_config({"sites": [], "train": {"device": "tpu"}}, base_dir=tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _one_line_error(
        _invoke("train", _config(tmp_path, rng), "--device", "gpu"), "TrainingError"
    )
    assert "device 'cuda' was requested but CUDA is not available" in line


@pytest.mark.parametrize(
    ("module", "extra"),
    [("rasterio", "agbcube[cube]"), ("torch", "agbcube[train]"), ("sklearn", "agbcube[cube]")],
)
def test_a_missing_extra_is_named(tmp_path, rng, monkeypatch, module, extra):
    """A package of an extra that is not installed: one line naming the extra, exit 2."""
    import agbcube.cube

    def missing(*args, **kwargs):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setattr(agbcube.cube, "build_cube", missing)
    line = _one_line_error(_invoke("build-cube", _config(tmp_path, rng)), "MissingDependencyError")
    assert f"{module} is not installed" in line and f"pip install '{extra}'" in line


def test_a_missing_module_of_no_extra_is_a_bug_line(tmp_path, rng, monkeypatch):
    import agbcube.cube

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'nowhere'", name="nowhere")

    monkeypatch.setattr(agbcube.cube, "build_cube", missing)
    line = _one_line_error(
        _invoke("build-cube", _config(tmp_path, rng)), "ModuleNotFoundError", code=1
    )
    assert "may be a bug in agbcube" in line


def test_help_reads_cleanly():
    """Usage lines name arguments in capitals and flags carry no type (typer 0.27+ printed
    `{config}` and `<bool>` after every flag)."""
    for command in ("build-cube", "folds", "train", "predict"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "120"})
        assert result.exit_code == 0
        usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
        assert "{" not in usage and ("CONFIG" in usage or "RUN_DIR" in usage), usage
        assert "<bool>" not in result.stdout and "--quiet" in result.stdout
