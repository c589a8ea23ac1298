"""Shared fixtures: tiny synthetic rasters written to tmp_path, and the demo sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmark"


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:4326",
    transform=None,
    nodata: float | None = None,
    descriptions: list[str] | None = None,
    dtype: str | None = None,
) -> Path:
    """Write a (band, y, x) array as a tiled GeoTIFF."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    transform = transform or from_origin(80.0, 22.0, 0.0004, 0.0004)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=data.shape[1],
        width=data.shape[2],
        count=data.shape[0],
        dtype=dtype or data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(data.astype(dtype or data.dtype))
        for i, name in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, name)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


@pytest.fixture
def simple_site(tmp_path: Path, rng: np.random.Generator) -> dict:
    """A 4-band stack (B4, B8 for T1; VV, VH) and an AGB map on the same 40x48 grid."""
    shape = (40, 48)
    red = rng.uniform(200, 1200, shape)
    nir = rng.uniform(1500, 4000, shape)
    vv = rng.uniform(-14, -6, shape)
    vh = rng.uniform(-22, -12, shape)
    stack = np.stack([red, nir, vv, vh]).astype("float32")
    agb = rng.uniform(10, 400, shape).astype("float32")
    agb[:3] = 0.0  # outside the footprint
    agb[5, 5] = 1e6  # absurd outlier
    agb[6, 6] = -5.0
    sat = write_raster(
        tmp_path / "sat.tif", stack, descriptions=["B4_T1", "B8_T1", "VV_T1", "VH_T1"]
    )
    bio = write_raster(tmp_path / "agb.tif", agb)
    return {"name": "simple", "satellite": sat, "biomass": bio, "stack": stack, "agb": agb}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo sites (small) and their config, written once per test session."""
    from agbcube.demo import write_demo

    out = tmp_path_factory.mktemp("demo")
    write_demo(out, size_px=96)
    return out


def requires_benchmark(func):
    return pytest.mark.skipif(
        not (SHARED / "raw").is_dir(), reason="../shared/benchmark is not present"
    )(pytest.mark.benchmark_data(func))


@pytest.fixture(scope="session")
def demo_config(demo_dir: Path):
    """The demo config with its cube built (once per session)."""
    from agbcube.config import load_config
    from agbcube.cube import build_cube

    cfg = load_config(demo_dir / "demo.yaml")
    build_cube(cfg.sites, cfg.cube, progress=False)
    return cfg


@pytest.fixture(scope="session")
def demo_folds(demo_config):
    """The demo cube's folds (written to the config's folds.output once per session)."""
    from agbcube.folds import make_folds, read_folds, write_folds

    write_folds(make_folds(demo_config), demo_config.folds.output, maps=False)
    return read_folds(demo_config.folds.output)


@pytest.fixture(scope="session")
def demo_bands(demo_config, demo_folds) -> list[str]:
    from agbcube.train.readers import resolve_bands

    return resolve_bands(demo_config.cube.output, demo_folds["site"], None)


@pytest.fixture(scope="session")
def small_chunk_cube(demo_config, tmp_path_factory):
    """The demo cube again with 20-px chunks: 16-px chips straddle tile edges, edge tiles are
    partial."""
    from agbcube.cube import build_cube

    cube = demo_config.cube.model_copy(
        update={"chunks": 20, "output": tmp_path_factory.mktemp("c20") / "cube.zarr"}
    )
    build_cube(demo_config.sites, cube, progress=False)
    return cube.output


@pytest.fixture(scope="session")
def local_cluster():
    """A LocalCluster like ``--scheduler local`` on two cores (2 worker processes × 1 thread),
    whose workers also offer one ``GPU`` resource each (as GPU workers would)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        resources={"GPU": 1},
    ) as cluster:
        yield cluster


@pytest.fixture
def started_tasks(local_cluster):
    """``[(key, resources)]`` of the tasks :func:`local_cluster` starts during a test, in
    order (a task run again is there twice)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class StartedTasks(SchedulerPlugin):  # the other hooks: the base class's no-ops
        name = "agbcube-test-started-tasks"

        def __init__(self, scheduler):
            self.scheduler, self.seen = scheduler, []

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "processing":
                resources = self.scheduler.tasks[key].resource_restrictions
                self.seen.append((str(key), dict(resources or {})))

    plugin = StartedTasks(local_cluster.scheduler)
    local_cluster.scheduler.add_plugin(plugin, name=plugin.name)
    try:
        yield plugin.seen
    finally:
        local_cluster.scheduler.remove_plugin(plugin.name)


def small_train(config, **train):
    """``config`` with a small, short dense model: the cluster tests' training settings."""
    settings = {"epochs": 2, "conv_channels": [8], "ensemble": 2, "baseline": "none", **train}
    return config.model_copy(update={"train": config.train.model_copy(update=settings)})


@pytest.fixture(scope="session")
def cluster_reference(demo_config, demo_folds, tmp_path_factory):
    """The sequential run the cluster runs must equal: :func:`small_train` settings, with one
    torch thread, as each cluster task has."""
    import torch

    from agbcube.train import run_cv

    cfg = small_train(demo_config)
    out = tmp_path_factory.mktemp("cluster-reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cv(cfg, output=out, device="cpu", plots=False)
    finally:
        torch.set_num_threads(threads)
    return cfg, out
