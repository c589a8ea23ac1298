"""Accuracy ablations: many `agbcube train` runs of one config's variants, in parallel.

Each variant overrides some of the config's ``train`` settings and runs under several seeds, on
the same cube and folds. Runs are separate processes (``workers`` at a time: on one GPU they
share it, on a CPU give each a few threads), each an ordinary run directory. When all are done,
or at ``--deadline`` seconds (unfinished runs are stopped and listed as such), the per-site
pooled R² and bias of every run, chip and pixel level, CNN and baseline, go to
``ablations.json`` and a Markdown table, with each variant's mean and range over its seeds.

The plan is a YAML file::

    runs:
      - {name: benchmark, seeds: [0, 1, 2]}               # the config as it is
      - {name: context-4, seeds: [0, 1, 2], train: {context_px: 4}}

Usage::

    python bench/ablations.py PLAN.yaml [--config configs/benchmark.yaml] [--cube PATH]
        [--folds PATH] [--output DIR] [--device cuda] [--workers 8] [--threads 2]
        [--deadline SECONDS]

``--cube`` and ``--folds`` point the config at a copied cube and folds table (a GPU machine
that has no GDAL builds neither; see the README). Summaries of the runs in the output folder
can be made again without training: ``--summarise``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _absolute(config: dict, base: Path) -> dict:
    """The config's relative paths resolved against its folder (it is rewritten elsewhere)."""
    for site in config.get("sites", []):
        for key in ("satellite", "biomass"):
            if key in site:
                site[key] = str((base / site[key]).resolve())
    for section, key in (("cube", "output"), ("folds", "output")):
        if key in config.get(section, {}):
            config[section][key] = str((base / config[section][key]).resolve())
    return config


def write_configs(plan: dict, args: argparse.Namespace) -> list[tuple[str, int, Path]]:
    """One config file per run: ``(variant, seed, path)``."""
    source = Path(args.config).resolve()
    base = _absolute(yaml.safe_load(source.read_text()), source.parent)
    if args.cube:
        base["cube"]["output"] = str(Path(args.cube).resolve())
    if args.folds:
        base["folds"]["output"] = str(Path(args.folds).resolve())
    jobs = []
    out = Path(args.output)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for spec in plan["runs"]:
        for seed in spec.get("seeds", [0]):
            config = json.loads(json.dumps(base))
            config["train"] = {
                **config.get("train", {}),
                **spec.get("train", {}),
                "seed": seed,
                "output": str((out / "runs" / f"{spec['name']}-s{seed}").resolve()),
            }
            path = out / "configs" / f"{spec['name']}-s{seed}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            jobs.append((spec["name"], seed, path))
    return jobs


def run_all(jobs: list[tuple[str, int, Path]], args: argparse.Namespace) -> dict[str, str]:
    """Run the jobs, ``workers`` at a time, until done or the deadline; status per run."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    pending = list(jobs)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    status: dict[str, str] = {}
    t0 = time.perf_counter()
    logs = Path(args.output) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        late = args.deadline and time.perf_counter() - t0 > args.deadline
        while pending and len(running) < args.workers and not late:
            name, seed, path = pending.pop(0)
            key = f"{name}-s{seed}"
            log = open(logs / f"{key}.log", "w")  # noqa: SIM115 (closed when the run ends)
            again = "--resume" if args.resume else "--overwrite"
            cmd = [sys.executable, "-m", "agbcube.cli", "train", str(path), "-q", again]
            cmd += ["--device", args.device]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[key] = (proc, time.perf_counter(), log)
            print(f"[{time.perf_counter() - t0:6.0f} s] start {key}", flush=True)
        for key, (proc, start, log) in list(running.items()):
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                status[key] = "stopped at the deadline"
            else:
                status[key] = "done" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
            log.close()
            del running[key]
            print(
                f"[{time.perf_counter() - t0:6.0f} s] {key}: {status[key]} "
                f"after {time.perf_counter() - start:.0f} s",
                flush=True,
            )
        if late:
            for name, seed, _ in pending:
                status[f"{name}-s{seed}"] = "not started (deadline)"
            pending = []
        time.sleep(0.5)
    return status


def summarise(output: Path, status: dict[str, str] | None = None) -> dict:
    """Per-site R² and bias of every finished run, and each variant's mean and range."""
    runs: dict[str, dict] = {}
    for run in sorted((output / "runs").glob("*")):
        metrics = run / "metrics.json"
        if not metrics.exists():
            continue
        m = json.loads(metrics.read_text())
        row: dict = {
            "wall_s": m["run"]["wall_s"],
            "device": m["run"]["device"],
            "primary": m.get("primary_model", "cnn-coordinate"),
        }
        for model, levels in m["models"].items():
            for level in ("chip", "pixel"):
                for site, v in levels[level]["mg_ha"]["per_site"].items():
                    row.setdefault(model, {}).setdefault(level, {})[site] = {
                        "r2": v["r2"],
                        "bias": v["bias"],
                    }
        runs[run.name] = row
    variants: dict[str, dict] = {}
    for name, row in runs.items():
        variant = name.rsplit("-s", 1)[0]
        for model in (k for k in row if isinstance(row[k], dict)):
            for level, sites in row[model].items():
                for site, v in sites.items():
                    variants.setdefault(variant, {}).setdefault(model, {}).setdefault(
                        level, {}
                    ).setdefault(site, []).append(v["r2"])
    table = {
        v: {
            model: {
                level: {
                    site: {"mean": float(np.mean(r)), "min": min(r), "max": max(r), "n": len(r)}
                    for site, r in sites.items()
                }
                for level, sites in levels.items()
            }
            for model, levels in models.items()
        }
        for v, models in variants.items()
    }
    return {"runs": runs, "variants": table, "status": status or {}}


def markdown(summary: dict) -> str:
    lines = [
        "| variant | model | seeds | chip R² (mean [min–max]) per site | pixel R² per site |",
        "|---|---|---|---|---|",
    ]
    for variant, models in summary["variants"].items():
        for model, levels in models.items():
            cells = []
            for level in ("chip", "pixel"):
                sites = levels[level]
                cells.append(
                    " / ".join(
                        f"{s['mean']:.2f} [{s['min']:.2f}–{s['max']:.2f}]" for s in sites.values()
                    )
                )
            n = next(iter(levels["chip"].values()))["n"]
            lines.append(f"| {variant} | {model} | {n} | {cells[0]} | {cells[1]} |")
    sites = next(iter(next(iter(summary["variants"].values())).values()))["chip"]
    lines.append(f"\nSites: {' / '.join(sites)}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("plan")
    parser.add_argument("--config", default=str(ROOT / "configs" / "benchmark.yaml"))
    parser.add_argument("--cube")
    parser.add_argument("--folds")
    parser.add_argument("--output", default="/tmp/agbcube-ablations")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--deadline", type=float, default=0, help="seconds (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue runs already started")
    parser.add_argument("--summarise", action="store_true", help="only summarise the output")
    args = parser.parse_args()
    out = Path(args.output)
    status = None
    if not args.summarise:
        plan = yaml.safe_load(Path(args.plan).read_text())
        jobs = write_configs(plan, args)
        status = run_all(jobs, args)
    summary = summarise(out, status)
    summary["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, device {args.device}"
    summary["date"] = time.strftime("%Y-%m-%d")
    (out / "ablations.json").write_text(json.dumps(summary, indent=2))
    table = markdown(summary) if summary["variants"] else "no finished runs"
    (out / "ablations.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
