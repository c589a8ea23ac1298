"""What the hand-run benchmarks share: measuring one step in a fresh interpreter.

A benchmark script runs each measured step as ``python SCRIPT --child SPEC.json``: the child reads
the spec, does the step and writes its own figures to ``SPEC.out.json``. :func:`run_child` starts
it, samples its RSS every second (killing it above a limit, so a runaway step cannot take the
machine down), and returns what ``os.wait4`` says of the child alone (its peak RSS and CPU time)
merged with the child's figures. Imported as ``_harness`` by the scripts beside it (``python
bench/x.py`` puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int) -> int | None:
    """Resident set size of process ``pid`` in bytes, or None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


def cpu_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_child(
    script: str | Path,
    spec: dict[str, Any],
    workdir: Path,
    max_rss: float,
    prefix: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run ``script --child SPEC`` in a fresh interpreter and measure it.

    Parameters
    ----------
    script : str or Path
        The benchmark script; its ``--child`` mode runs the step ``spec`` describes.
    spec : dict
        JSON-serialisable description of the step, written to a temporary file in ``workdir``.
    workdir : Path
        Where the spec and the child's ``.out.json`` live (both removed afterwards).
    max_rss : float
        Bytes of RSS above which the child is killed and the step reported as failed.
    prefix : sequence of str, optional
        A command to run the interpreter under (e.g. py-spy); its output is discarded, and the
        RSS trace then follows the prefix's process, not the interpreter's.

    Returns
    -------
    dict
        ``returncode``, ``process_wall_s``, ``process_cpu_s``, ``ru_maxrss`` (bytes, the child
        alone), ``other_cpus_busy`` (CPUs kept busy by everything else meanwhile; 0 on a quiet
        machine), ``rss_trace_gb`` (``(seconds, GB)`` every second) and then either the child's
        own figures or ``error``.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=workdir, delete=False) as f:
        json.dump(spec, f)
    spec_file = Path(f.name)
    busy0 = cpu_busy_s()
    t0 = time.perf_counter()
    cmd = [*(prefix or []), sys.executable, str(script), "--child", str(spec_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if prefix else None)
    trace: list[tuple[float, float]] = []
    killed = threading.Event()

    def sample() -> None:
        while proc.returncode is None:
            now = rss(proc.pid)
            if now is None:
                return
            trace.append((round(time.perf_counter() - t0, 1), round(now / 1e9, 3)))
            if now > max_rss and not killed.is_set():
                killed.set()
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    wall = time.perf_counter() - t0
    cpu = usage.ru_utime + usage.ru_stime
    result: dict[str, Any] = {
        "returncode": proc.returncode,
        "process_wall_s": wall,
        "process_cpu_s": cpu,
        "other_cpus_busy": max(0.0, cpu_busy_s() - busy0 - cpu) / wall,
        "ru_maxrss": usage.ru_maxrss * 1024,
        "rss_trace_gb": trace,
    }
    out_file = spec_file.with_suffix(".out.json")
    if proc.returncode == 0 and out_file.exists():
        result.update(json.loads(out_file.read_text()))
    else:
        why = "killed: RSS above --max-rss-gb" if killed.is_set() else "failed"
        result["error"] = f"{why} (exit code {proc.returncode})"
    spec_file.unlink(missing_ok=True)
    out_file.unlink(missing_ok=True)
    return result


def versions(packages: Sequence[str]) -> dict[str, str]:
    """Installed versions of those of ``packages`` that are installed."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def machine(**extra: Any) -> dict[str, Any]:
    """This machine as a results file records it: cores, memory, platform, Python (+ ``extra``)."""
    return {
        "cpus": os.cpu_count(),
        "memory_gb": os.sysconf("SC_PHYS_PAGES") * PAGE / 1e9,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **extra,
    }
