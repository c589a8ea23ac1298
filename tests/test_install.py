"""Each role runs with only its extra installed (pyproject.toml's optional dependencies).

A role's subprocess makes every package it would not get unimportable: the packages of the
other extras and everything they pull in, less what the core and the role's own extra pull in.
So a module that imports a package outside its role's extra fails here, before a user finds
out on a GPU node without GDAL, or a cube machine without torch.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from lock import requirements  # tools/lock.py: the extras, self-references expanded

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ROLES = ("cube", "train", "predict", "cluster")


def _closure(requirements: list[str]) -> set[str]:
    """Every installed distribution these requirements pull in, transitively."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            env = [{"extra": e} for e in (req.extras or {""})]
            if r.marker is None or any(r.marker.evaluate(e) for e in env):
                todo.append(r)
    return {k.split("[")[0] for k in seen}


@functools.cache
def _modules_by_distribution() -> dict[str, frozenset[str]]:
    by_dist: dict[str, set[str]] = {}
    for module, names in metadata.packages_distributions().items():
        for name in names:
            by_dist.setdefault(name.lower().replace("_", "-"), set()).add(module)
    return {d: frozenset(m) for d, m in by_dist.items()}


def _modules_of(dists: set[str]) -> set[str]:
    by_dist = _modules_by_distribution()
    return {m for d in dists for m in by_dist.get(d, ()) if m.isidentifier()}


@functools.cache
def blocked_modules(role: str | None) -> frozenset[str]:
    """Top-level modules a machine with only the core (and ``role``'s extra) lacks."""
    everything = _closure(requirements(["all"]))
    allowed = _closure(requirements([role] if role else []))
    return frozenset(_modules_of(everything - allowed) - _modules_of(allowed))


_BLOCKER = """
import importlib.abc, sys

class _NotInstalled(importlib.abc.MetaPathFinder):
    # importing a blocked package fails as if it were not installed (a None in sys.modules
    # would not do: libraries look there to see whether, say, torch is in use)
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


def run_without(blocked: frozenset[str], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which the ``blocked`` packages are missing."""
    script = f"BLOCKED = {sorted(blocked)!r}\n" + _BLOCKER + code
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def test_the_roles_split_the_heavy_dependencies():
    assert {"torch", "xbatcher"} <= blocked_modules("cube")
    assert {"rasterio", "rioxarray", "pystac", "distributed"} <= blocked_modules("train")
    assert "odc" in blocked_modules("train")  # odc-geo
    assert {"torch", "rasterio", "geopandas", "matplotlib"} <= blocked_modules(None)
    assert not {"torch", "rasterio"} & blocked_modules("predict")
    assert set(PYPROJECT["optional-dependencies"]) >= {*ROLES, "all", "test", "docs"}


def test_core_reads_configs_and_prints_the_reference():
    done = run_without(
        blocked_modules(None),
        "import agbcube, agbcube.config, agbcube._store, agbcube.cli\n"
        "from agbcube.config import config_reference\n"
        "assert '| `agb_range` |' in config_reference()\n",
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_cube_role_builds_the_demo_cube_and_folds_without_torch(tmp_path):
    done = run_without(
        blocked_modules("cube"),
        f"""
from agbcube.config import load_config
from agbcube.cube import build_cube
from agbcube.demo import write_demo
from agbcube.folds import make_folds, write_folds
import agbcube.stac, agbcube.cli
cfg = load_config(write_demo({str(tmp_path)!r}, size_px=48))
build_cube(cfg.sites, cfg.cube, progress=False)
write_folds(make_folds(cfg), cfg.folds.output)
assert 'torch' not in sys.modules
print('ok')
""",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_train_role_imports_without_gdal():
    # test_train.py::test_training_needs_no_gdal trains with GDAL blocked; here, every module
    # the train role uses imports without anything outside its extra.
    done = run_without(
        blocked_modules("train"),
        "import agbcube.train, agbcube.train.run, agbcube.train.readers, agbcube.train.batches\n"
        "import agbcube.train.tasks, agbcube.train.evaluate, agbcube.train.plots\n"
        "import agbcube.folds, agbcube.chips, agbcube._store, agbcube.cli\n"
        "assert 'rasterio' not in sys.modules and 'pystac' not in sys.modules\n",
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_training_without_torch_names_the_extra():
    done = run_without(
        blocked_modules("cube"),
        "from typer.testing import CliRunner\n"
        "from agbcube.cli import app\n"
        "result = CliRunner().invoke(app, ['train', 'configs/benchmark.yaml'])\n"
        "print(result.exit_code, result.output)\n",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("2 ") and "pip install 'agbcube[train]'" in done.stdout


def test_predict_role_imports_its_modules():
    done = run_without(
        blocked_modules("predict"),
        "import agbcube.predict, agbcube.stac, agbcube.train, agbcube.cube\n",
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_cluster_scheduler_without_its_extra_names_it():
    done = run_without(
        blocked_modules("cube"),
        "from agbcube._dask import dask_scheduler\n"
        "from agbcube.errors import MissingDependencyError\n"
        "try:\n"
        "    with dask_scheduler('local'):\n"
        "        pass\n"
        "except MissingDependencyError as err:\n"
        "    assert isinstance(err, ImportError)\n"
        "    print(err)\n",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pip install 'agbcube[cluster]'" in done.stdout
