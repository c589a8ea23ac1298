"""requirements.lock matches pyproject.toml: a changed dependency without `make lock` fails here."""

from __future__ import annotations

import shutil
from pathlib import Path

import lock  # tools/lock.py (pytest's pythonpath)
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of pyproject.toml and requirements.lock to edit."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(ROOT / "requirements.lock", tmp_path / "requirements.lock")
    return tmp_path / "pyproject.toml", tmp_path / "requirements.lock"


def test_committed_lock_matches_pyproject():
    assert lock.check() == []


def test_lock_pins_every_requirement_once_per_environment():
    _, pins = lock.read_lock()
    here = [p.name.lower() for p in pins if p.marker is None or p.marker.evaluate()]
    assert len(here) == len(set(here))
    names = set(here)
    for line in lock.requirements(lock.EXTRAS):
        name = lock.Requirement(line).name.lower().replace("_", "-")
        assert name in names, line
    assert {"torch", "dask", "distributed", "pip", "setuptools"} <= names


def test_lock_pins_distributed_with_its_own_dask():
    """Each distributed release pins its dask; a lock with another dask could not install."""
    _, pins = lock.read_lock()
    version = {
        p.name: next(iter(p.specifier)).version for p in pins if p.name in ("dask", "distributed")
    }
    assert version["dask"] == version["distributed"]


def test_torch_pinned_without_local_label():
    """Any build of the locked release (CPU here, CUDA on a GPU machine) satisfies the pin."""
    _, pins = lock.read_lock()
    (torch,) = [p for p in pins if p.name == "torch"]
    assert str(torch.specifier) == "==" + lock.TORCH_CPU.split("==")[1].split("+")[0]
    assert torch.specifier.contains("2.13.0+cu128") and torch.specifier.contains("2.13.0+cpu")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"rich>=13",', '"rich>=13",\n    "tqdm>=4",'),  # a dependency added
        ('"rich>=13",', '"rich>=99",'),  # a bound the pin no longer meets
        ('"rich>=13",', '"rich>=13.1",'),  # a bound the pin still meets: the digest tells
        ('"bokeh>=3.1"', '"bokeh>=3.1", "tqdm>=4"'),  # an extra's dependency added
    ],
)
def test_changed_dependencies_without_relock_fail(project, old, new):
    pyproject, lockfile = project
    assert lock.check(lockfile, pyproject) == []
    text = pyproject.read_text()
    assert old in text
    pyproject.write_text(text.replace(old, new, 1))
    problems = lock.check(lockfile, pyproject)
    assert any("make lock" in p for p in problems)


def test_pin_outside_a_bound_is_named(project):
    pyproject, lockfile = project
    pyproject.write_text(pyproject.read_text().replace('"rich>=13",', '"rich>=99",', 1))
    problems = lock.check(lockfile, pyproject)
    assert any("pins rich==" in p and "rich>=99" in p for p in problems)


def test_requirement_missing_from_lock_is_named(project):
    pyproject, lockfile = project
    pyproject.write_text(pyproject.read_text().replace('"rich>=13",', '"rich>=13",\n "tqdm",', 1))
    assert any(p.startswith("tqdm ") and "not in" in p for p in lock.check(lockfile, pyproject))


def test_comments_in_pyproject_do_not_count(project):
    pyproject, lockfile = project
    pyproject.write_text(pyproject.read_text().replace('"rich>=13",', '"rich>=13",  # why', 1))
    assert lock.check(lockfile, pyproject) == []


def test_missing_lock_is_named(project):
    pyproject, lockfile = project
    lockfile.unlink()
    assert lock.check(lockfile, pyproject) == ["requirements.lock is missing: run `make lock`"]


def test_self_referencing_extras_expand():
    reqs = {lock.Requirement(r).name for r in lock.requirements(["all"])}
    assert {"torch", "rasterio", "distributed", "xarray"} <= reqs
    assert "agbcube" not in reqs
