"""Pack what a GPU machine needs to run ``bench/device/run.sh``: a compact copy of the cube,
the folds, configs pointing at them, and the wheels of the packages its image lacks.

The device tool carries at most 64 MiB; the benchmark cube is 65 MB. Its features are stored
again with 12 mantissa bits kept (numcodecs ``BitRound``: relative rounding ≤ 1.2e-4, far below
the sensors' noise) and zstd, ~32 MB; dtypes, names and attributes are unchanged, so agbcube
reads it as it reads the original. Usage (from the repository root, after ``build-cube`` and
``folds`` on ``configs/benchmark.yaml``)::

    python bench/device/pack.py [--cube cubes/benchmark.zarr] [--folds runs/benchmark/folds.parquet]

writes ``.device/`` (cube, folds, configs) and ``.whl/`` (wheels for Python 3.12, manylinux
x86-64). Both are ignored by git; name them in the device tool's ``carry``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# What agbcube's training path imports that the device image does not have (checked against
# /work/.library/device/KINDS.md): pinned to the versions this machine tests with.
WHEELS = [
    "zarr",
    "numcodecs",
    "donfig",
    "google-crc32c",
    "dask",
    "partd",
    "locket",
    "xbatcher",
    "geopandas",
    "shapely",
    "pyproj",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
]

CARRY_LIMIT = 64 * 2**20  # bytes the device tool carries in one call


def pack_cube(src: Path, dst: Path) -> None:
    import numcodecs
    import zarr

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    root = zarr.open_group(dst, mode="r+", zarr_format=2)
    compressor = numcodecs.Blosc(cname="zstd", clevel=9, shuffle=numcodecs.Blosc.BITSHUFFLE)
    for site in root.group_keys():
        old = root[site]["features"]
        data = old[...]
        attrs = dict(old.attrs)
        del root[site]["features"]
        new = root[site].create_array(
            "features",
            shape=data.shape,
            dtype=data.dtype,
            chunks=old.chunks,
            compressor=compressor,
            filters=[numcodecs.BitRound(keepbits=12)],
            fill_value=old.fill_value,
        )
        new[...] = data
        new.attrs.update(attrs)
    zarr.consolidate_metadata(dst, zarr_format=2)


def write_configs(out: Path) -> None:
    """The benchmark's default and original-protocol configs, on the packed cube and folds."""
    for name in ("benchmark", "original"):
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        cfg["cube"]["output"] = "cube.zarr"
        cfg["folds"]["output"] = "folds.parquet"
        cfg["train"]["output"] = f"runs/{name}-cv"
        cfg["train"].pop("random_cv", None)
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def download_wheels(dest: Path) -> None:
    from importlib.metadata import version

    dest.mkdir(exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = []
    for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014"):
        platforms += ["--platform", f"{tag}_x86_64"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(dest),
            *pins,
        ],
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cube", type=Path, default=ROOT / "cubes" / "benchmark.zarr")
    parser.add_argument("--folds", type=Path, default=ROOT / "runs/benchmark/folds.parquet")
    parser.add_argument("--no-wheels", action="store_true")
    args = parser.parse_args()
    out = ROOT / ".device"
    if out.exists():  # a fresh pack: nothing an earlier dry run left adds to the carry
        shutil.rmtree(out)
    out.mkdir()
    pack_cube(args.cube, out / "cube.zarr")
    shutil.copyfile(args.folds, out / "folds.parquet")
    write_configs(out)
    if not args.no_wheels:
        download_wheels(ROOT / ".whl")
    size = sum(p.stat().st_size for d in (out, ROOT / ".whl") for p in d.rglob("*") if p.is_file())
    print(f"packed {size / 2**20:.1f} MiB into .device/ and .whl/")
    if size > CARRY_LIMIT:
        limit = CARRY_LIMIT // 2**20
        raise SystemExit(f"that is over the {limit} MiB the device tool carries in one call")


if __name__ == "__main__":
    main()
