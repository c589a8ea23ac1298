"""The lock: every package ``make`` installs, pinned, so that no release can break a fresh install.

    python tools/lock.py            # regenerate requirements.lock (`make lock`; uv + the index)
    python tools/lock.py --upgrade  # the same, every package at its newest (`make lock-upgrade`)
    python tools/lock.py --check    # does requirements.lock still match pyproject.toml? (offline)

The lock is resolved by uv (``uv pip compile --universal``) from pyproject.toml's core
dependencies and the extras ``make`` installs, for every platform and Python >= 3.11, with the
CPU build of PyTorch. pip installs it (``pip install -r requirements.lock``), so no tool beyond
pip is needed to set up; only regenerating it needs uv.

The lock records a digest of pyproject.toml's dependency tables: ``--check`` (and
tests/test_lock.py, part of ``make test``) fails when they changed and the lock was not
regenerated, or when a pinned version no longer meets a bound.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
#: The extras `make` installs: every role, the tests and the documentation.
EXTRAS = ("all", "test", "docs")
#: PyTorch as the lock resolves it: the CPU build, whose dependencies (unlike the CUDA build's)
#: hold no multi-GB nvidia-* libraries. The lock writes it without the local label (torch==X),
#: which any build of that release satisfies: the CPU wheel where pip finds one (a find-links
#: folder, PyTorch's CPU index), a CUDA build a user installed first (docs, "PyTorch builds").
TORCH_CPU = "torch==2.13.0+cpu"
#: Beside the dependencies, the lock pins pip and the build-system's requirements (setuptools):
#: `make` installs agbcube without build isolation, so nothing unpinned enters a fresh install.
#: The oldest Python the lock resolves for (requires-python's floor).
PYTHON = "3.11"
DIGEST_LINE = "# pyproject-digest: "


def dependency_digest(pyproject: Path = PYPROJECT) -> str:
    """A digest of what the lock is resolved from: the dependency tables and the torch build."""
    toml = tomllib.loads(pyproject.read_text())
    project = toml["project"]
    inputs = {
        "build-system": toml["build-system"].get("requires", []),
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "extras": EXTRAS,
        "torch": TORCH_CPU,
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def requirements(extras: tuple[str, ...] | list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The core's requirements plus those of ``extras``, self-references (agbcube[...]) expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        for line in project["optional-dependencies"][extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == "agbcube":
                reqs += [r for r in requirements(sorted(req.extras), pyproject) if r not in reqs]
            else:
                reqs.append(line)
    return reqs


def read_lock(lock: Path = LOCK) -> tuple[str | None, list[Requirement]]:
    """The digest a lock records and its pins (``name==version ; marker``)."""
    digest, pins = None, []
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            digest = line.removeprefix(DIGEST_LINE).strip()
        elif line and not line.startswith((" ", "#", "-")):
            pins.append(Requirement(line.split(" #", 1)[0].strip()))
    return digest, pins


def check(lock: Path = LOCK, pyproject: Path = PYPROJECT) -> list[str]:
    """What is wrong with the lock against pyproject.toml; an empty list when it matches."""
    if not lock.exists():
        return [f"{lock.name} is missing: run `make lock`"]
    digest, pins = read_lock(lock)
    problems = []
    if digest != dependency_digest(pyproject):
        problems.append(
            f"pyproject.toml's dependencies changed since {lock.name} was written: run `make lock`"
        )
    pinned: dict[str, list[Requirement]] = {}
    for pin in pins:
        pinned.setdefault(canonicalize_name(pin.name), []).append(pin)
    for line in requirements(EXTRAS, pyproject):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        here = [p for p in pinned.get(canonicalize_name(req.name), []) if _applies(p)]
        if not here:
            problems.append(f"{req.name} ({line!r} in pyproject.toml) is not in {lock.name}")
        for pin in here:
            version = next(iter(pin.specifier)).version
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{lock.name} pins {req.name}=={version}, outside {line!r}")
    return problems


def _applies(pin: Requirement) -> bool:
    return pin.marker is None or pin.marker.evaluate()


def compile_lock(lock: Path = LOCK, uv: str = "uv", *, upgrade: bool = False) -> None:
    """Resolve the lock with uv against the package index and write it (temporary, then rename).

    The current lock's pins are kept where pyproject.toml still allows them (uv prefers the
    versions already in its output file), so a changed dependency moves only what it must;
    ``upgrade`` takes every package to the newest release the bounds allow.
    """
    with tempfile.TemporaryDirectory() as tmp:
        torch_in = Path(tmp) / "torch.in"
        build = tomllib.loads(PYPROJECT.read_text())["build-system"].get("requires", [])
        torch_in.write_text("\n".join([TORCH_CPU, "pip", *build]) + "\n")
        raw = Path(tmp) / "raw.txt"
        if lock.exists() and not upgrade:
            raw.write_text(lock.read_text())  # uv's preferences
        extras = [arg for extra in EXTRAS for arg in ("--extra", extra)]
        links = os.environ.get("UV_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS", "")
        find_links = [arg for link in links.split() for arg in ("--find-links", link)]
        command = [uv, "pip", "compile", "--quiet", "--universal", "--python-version", PYTHON]
        command += [str(PYPROJECT), str(torch_in), *extras, *find_links]
        command += ["--no-header", "--annotation-style", "line", "-o", str(raw)]
        command += ["--upgrade"] if upgrade else []
        subprocess.run(command, check=True, cwd=ROOT)
        body = _without_local_torch(raw.read_text(), torch_in)
    header = (
        "# Every package `make` installs (.[" + ",".join(EXTRAS) + "] and PyTorch), pinned for\n"
        f"# Python >= {PYTHON} on every platform. Written by `make lock` (tools/lock.py, which uv\n"
        "# resolves); never edit by hand: docs/development.md says how to change a dependency.\n"
        f"# torch is resolved as its CPU build ({TORCH_CPU}) and pinned without the local label.\n"
        f"{DIGEST_LINE}{dependency_digest()}\n"
    )
    partial = lock.with_name(f".{lock.name}.partial")
    partial.write_text(header + body)
    partial.replace(lock)


def _without_local_torch(text: str, torch_in: Path) -> str:
    name, version = TORCH_CPU.split("==")
    plain = version.split("+")[0]
    text = re.sub(rf"^{name}=={re.escape(version)}", f"{name}=={plain}", text, flags=re.M)
    text = text.replace(f"-r {torch_in}, ", "").replace(f", -r {torch_in}", "")
    return text.replace(f"# via -r {torch_in}", "# via tools/lock.py (torch, pip, build)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write (offline)")
    parser.add_argument("--upgrade", action="store_true", help="every package at its newest")
    parser.add_argument("--uv", default="uv", help="the uv executable (default: uv on PATH)")
    args = parser.parse_args(argv)
    if not args.check:
        compile_lock(uv=args.uv, upgrade=args.upgrade)
    problems = check()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
