"""Faults and messy inputs produced for real: killed processes, odd band sets, odd AGB."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from agbcube.config import CubeConfig, SiteConfig, load_config
from agbcube.cube import build_cube, cube_sites, open_cube
from agbcube.errors import BandError, CubeError, FoldError
from tests.conftest import write_raster


def _big_site(tmp_path: Path, rng, n=700, bands=12) -> Path:
    names = [f"B{i}" for i in (2, 3, 4, 8, 11, 12)] + [f"X{i}" for i in range(bands - 6)]
    write_raster(
        tmp_path / "sat.tif",
        rng.uniform(100, 3000, (bands, n, n)).astype("float32"),
        descriptions=names,
    )
    write_raster(tmp_path / "agb.tif", rng.uniform(10, 300, (n, n)).astype("float32"))
    cfg = {
        "sites": [
            {"name": f"s{i}", "satellite": "sat.tif", "biomass": "agb.tif"} for i in range(3)
        ],
        "cube": {"output": "cube.zarr", "chunks": 64},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start_build(cfg: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        from agbcube.config import load_config
        from agbcube.cube import build_cube
        cfg = load_config({str(cfg)!r})
        build_cube(cfg.sites, cfg.cube, progress=False)
    """)
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=cfg.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _wait_for_writing(store: Path, proc: subprocess.Popen, timeout=60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if store.is_dir() and any(".tmp-" in p.name for p in store.iterdir()):
            time.sleep(0.3)
            return
        if proc.poll() is not None:
            pytest.fail(f"build ended before it was killed: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    pytest.fail("the build never started writing")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_build_cube_resumes_to_a_clean_build(tmp_path, rng, sig):
    cfg_path = _big_site(tmp_path, rng)
    cfg = load_config(cfg_path)
    proc = _start_build(cfg_path)
    _wait_for_writing(cfg.cube.output, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    with pytest.raises(CubeError, match="incomplete"):
        cube_sites(cfg.cube.output)
    # the re-run finishes the job and the result equals a clean build
    build_cube(cfg.sites, cfg.cube, progress=False)
    clean = cfg.cube.model_copy(update={"output": tmp_path / "clean.zarr"})
    build_cube(cfg.sites, clean, progress=False)
    assert cube_sites(cfg.cube.output) == ["s0", "s1", "s2"]
    assert not [p for p in cfg.cube.output.iterdir() if ".tmp-" in p.name]
    for site in ("s0", "s1", "s2"):
        xr.testing.assert_identical(
            open_cube(cfg.cube.output, site).load(), open_cube(clean.output, site).load()
        )


@pytest.mark.slow
def test_a_dask_worker_killed_during_build_cube_changes_nothing(tmp_path, rng):
    """A LocalCluster worker SIGKILLed mid-build: its tasks rerun; the cube is the serial one."""
    import os
    import threading

    import dask
    from distributed import Client, LocalCluster

    cfg = load_config(_big_site(tmp_path, rng))
    serial = cfg.cube.model_copy(update={"output": tmp_path / "serial.zarr"})
    with dask.config.set(scheduler="synchronous"):
        build_cube(cfg.sites, serial, progress=False)

    failures: list[BaseException] = []

    def build(address: str) -> None:
        try:
            build_cube(cfg.sites, cfg.cube, scheduler=address, progress=False)
        except BaseException as err:  # reported below
            failures.append(err)

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)
        thread = threading.Thread(target=build, args=(cluster.scheduler_address,))
        thread.start()
        t0 = time.time()
        store = cfg.cube.output
        while not (store.is_dir() and any(".tmp-" in p.name for p in store.iterdir())):
            assert thread.is_alive() and time.time() - t0 < 120, "the build never started"
            time.sleep(0.05)
        time.sleep(0.3)  # the workers are reading and writing chunks
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        killed_mid_build = thread.is_alive()
        thread.join(timeout=300)
        assert victim not in client.run(os.getpid).values()  # the nanny started a new worker
    assert killed_mid_build, "the build had finished before the worker was killed"
    assert not thread.is_alive() and not failures, failures
    assert cube_sites(cfg.cube.output) == cube_sites(serial.output)
    for site in cube_sites(serial.output):
        xr.testing.assert_identical(
            open_cube(cfg.cube.output, site).load().drop_attrs(),
            open_cube(serial.output, site).load().drop_attrs(),
        )


def test_sites_with_bands_in_another_order_are_aligned_by_name(tmp_path, rng):
    from agbcube.train.readers import MemoryReader, resolve_bands

    stack = rng.uniform(100, 3000, (3, 40, 40)).astype("float32")
    agb = rng.uniform(10, 300, (40, 40)).astype("float32")
    write_raster(tmp_path / "a.tif", stack, descriptions=["B4", "B8", "CH"])
    write_raster(tmp_path / "b.tif", stack[::-1], descriptions=["CH", "B8", "B4"])
    write_raster(tmp_path / "c.tif", stack[:2], descriptions=["B4", "B8"])
    write_raster(tmp_path / "agb.tif", agb)
    sites = [
        SiteConfig(name=n, satellite=tmp_path / f"{n}.tif", biomass=tmp_path / "agb.tif")
        for n in ("a", "b", "c")
    ]
    cube = CubeConfig(output=tmp_path / "cube.zarr", chunks=32, indices="none")
    build_cube(sites, cube, progress=False)
    import pandas as pd

    chips = pd.DataFrame({"site": ["a", "b"], "row": [0, 0], "col": [0, 0]})
    bands = resolve_bands(cube.output, chips["site"], None)
    assert bands == ["B4", "B8", "CH"]
    got = MemoryReader(cube.output, chips, size_px=8, bands=bands)
    np.testing.assert_array_equal(got.x[0], got.x[1])  # same pixels, same band order
    chips = pd.DataFrame({"site": ["a", "c"], "row": [0, 0], "col": [0, 0]})
    with pytest.raises(BandError, match=r"site 'c' lacks band\(s\) \['CH'\]"):
        resolve_bands(cube.output, chips["site"], None)


@pytest.mark.parametrize("value", [0.0, 150.0])
def test_constant_or_empty_agb_site(tmp_path, rng, value):
    """AGB all zero (nothing valid) or constant: a clear error, not a crash in the fit."""
    from agbcube.config import parse_config
    from agbcube.folds import make_folds

    write_raster(
        tmp_path / "s.tif",
        rng.uniform(100, 3000, (2, 60, 60)).astype("float32"),
        descriptions=["B4", "B8"],
    )
    write_raster(tmp_path / "agb.tif", np.full((60, 60), value, "float32"))
    cfg = parse_config(
        {
            "sites": [
                {
                    "name": "flat",
                    "satellite": str(tmp_path / "s.tif"),
                    "biomass": str(tmp_path / "agb.tif"),
                }
            ],
            "cube": {"output": str(tmp_path / "c.zarr"), "chunks": 32},
            "chips": {"size": 8, "overlap": 0.0},
            "folds": {"n_folds": 3, "output": str(tmp_path / "f.parquet")},
        }
    )
    if value == 0.0:
        with pytest.warns(UserWarning, match="site 'flat': no valid AGB pixel"):
            build_cube(cfg.sites, cfg.cube, progress=False)
    else:
        build_cube(cfg.sites, cfg.cube, progress=False)
    if value == 0.0:
        with (
            pytest.raises(
                FoldError, match="no site has a usable chip. site 'flat': its AGB is NaN"
            ),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            make_folds(cfg)
        assert not caught  # the error says it: no warning first
    else:
        with pytest.raises(FoldError, match="site 'flat'.*AGB is constant"):
            make_folds(cfg)


@pytest.mark.slow
def test_training_killed_then_resumed_matches_an_uninterrupted_run(demo_config, tmp_path):
    import torch

    from agbcube.folds import make_folds, write_folds

    raw = demo_config.model_dump(mode="json")
    raw.pop("source", None)
    raw["folds"]["output"] = str(tmp_path / "folds.parquet")
    raw["train"].update(epochs=40, patience=40, baseline="none", conv_channels=[8], fc_units=[8])
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    write_folds(make_folds(cfg), cfg.folds.output, maps=False)

    def train(output: Path, *extra: str) -> subprocess.Popen:
        # Every run in a fresh process, as a user runs it: the reference then has the same
        # thread pools as the killed and the resumed run (the test process's do not).
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agbcube.cli",
                "train",
                str(cfg_path),
                "--device",
                "cpu",
                "--output",
                str(output),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    clean = train(tmp_path / "clean")
    assert clean.wait(timeout=300) == 0, clean.stderr.read().decode()[-2000:]
    out = tmp_path / "killed"
    proc = train(out)
    t0 = time.time()
    while not (out / "fold_1" / "checkpoint_select.pt").exists():
        if proc.poll() is not None or time.time() - t0 > 120:
            pytest.fail(f"training did not reach fold 1: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # fold 1 is mid-training: its checkpoint exists
    proc.wait(timeout=30)
    assert not (out / "fold_1" / "member_0.npz").exists() and not (out / "metrics.json").exists()
    resumed = train(out, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    for k in range(cfg.folds.n_folds):
        a = torch.load(tmp_path / "clean" / f"fold_{k}" / "model_0.pt", weights_only=True)
        b = torch.load(out / f"fold_{k}" / "model_0.pt", weights_only=True)
        for name, t in a["state_dict"].items():
            assert torch.equal(t, b["state_dict"][name]), (k, name)


@pytest.mark.slow
def test_ctrl_c_to_a_local_cluster_run_is_one_line_and_resumable(demo_config, demo_folds, tmp_path):
    """Ctrl-C reaches the whole process group (the client and its LocalCluster's workers):
    the client stops the workers in order and says so in one line, with no worker tracebacks
    or dask warnings, and the run resumes."""
    raw = demo_config.model_dump(mode="json")
    raw.pop("source", None)
    raw["train"].update(epochs=300, patience=300, baseline="none", conv_channels=[8], ensemble=1)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "agbcube.cli", "train", str(cfg_path), "--output", str(out)]
    argv += ["--device", "cpu", "--scheduler", "local", "-q"]
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(argv, stderr=err, start_new_session=True)  # a terminal's group
        t0 = time.time()
        while not list(out.glob("fold_*/checkpoint_*.pt")):  # fits are running on the workers
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.time() - t0 < 120, "no fit started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    text = (tmp_path / "stderr").read_text()
    assert "interrupted: finished work is kept" in text
    assert "Traceback" not in text and "WARNING" not in text and "warn" not in text, text
    assert not list(out.glob("fold_*/.*.tmp-*")) and not (out / "metrics.json").exists()
