"""Training on a Dask cluster: placement, identical results, faults survived."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from agbcube.errors import ConfigError, TrainingError
from agbcube.train import cluster as cluster_mod
from agbcube.train import data as data_mod
from agbcube.train import execute as execute_mod
from agbcube.train import run_cv
from agbcube.train.cluster import default_threads, gpu_worker_specs, placement
from agbcube.train.data import run_data
from agbcube.train.execute import describe
from agbcube.train.plan import Task

distributed = pytest.importorskip("distributed")


def _with(cfg, **train):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def _worker(cuda=0, host="a", cpus=2, gpu=None, torch="2.13.0"):
    return {
        "torch": torch,
        "cuda": cuda,
        "host": host,
        "cpus": cpus,
        "nthreads": 1,
        "resources": {} if gpu is None else {"GPU": gpu},
    }


# --------------------------------------------------------------------------------------------
# where the tasks go


def test_cpu_runs_anywhere_and_auto_follows_the_workers():
    cpu_only = {"w1": _worker(), "w2": _worker()}
    assert placement(cpu_only, "auto") == (torch.device("cpu"), None)
    assert placement(cpu_only, "cpu") == (torch.device("cpu"), None)
    gpus = {"w1": _worker(cuda=1), "w2": _worker(cuda=1)}
    assert placement(gpus, "auto") == (torch.device("cuda"), None)  # dask-cuda: every worker
    assert placement(gpus, "cuda:1") == (torch.device("cuda:1"), None)
    assert placement(gpus, "cpu") == (torch.device("cpu"), None)


def test_gpu_tasks_ask_for_a_gpu_where_workers_offer_one():
    mixed = {"cpu": _worker(), "gpu": _worker(cuda=1, gpu=1)}
    assert placement(mixed, "auto") == (torch.device("cuda"), {"GPU": 1})
    assert placement(mixed, "cuda") == (torch.device("cuda"), {"GPU": 1})
    # without the resource, a fit could land on the CPU-only worker: refused, with the fix
    untagged = {"cpu": _worker(), "gpu": _worker(cuda=1)}
    with pytest.raises(ConfigError, match=r"\['cpu'\] have no GPU.*--resources GPU=1"):
        placement(untagged, "auto")
    with pytest.raises(TrainingError, match="none of the cluster's 2 workers has CUDA"):
        placement({"a": _worker(), "b": _worker()}, "cuda")


def test_workers_without_torch_are_refused_only_where_fits_could_land():
    from agbcube.errors import MissingDependencyError

    cube_only = _worker(torch=None)
    with pytest.raises(MissingDependencyError, match=r"\['cube'\] cannot import torch"):
        cluster_mod._check_torch({"cube": cube_only, "w": _worker()}, None)
    # GPU tasks go to the workers offering a GPU: a CPU-only worker for cubes may stay
    cluster_mod._check_torch({"cube": cube_only, "gpu": _worker(cuda=1, gpu=1)}, {"GPU": 1})


def test_torch_threads_are_a_machines_share_per_worker_process():
    # two machines: 16 cores under 4 workers, 8 cores under 1; the smaller share for all
    workers = {f"a{i}": _worker(host="a", cpus=16) for i in range(4)}
    workers["b0"] = _worker(host="b", cpus=8)
    assert default_threads(workers) == 4
    assert default_threads({"a": _worker(cpus=2), "b": _worker(cpus=2)}) == 1
    assert default_threads({"a": _worker(cpus=1), "b": _worker(cpus=1)}) == 1


def test_a_local_gpu_cluster_has_one_single_threaded_worker_per_gpu():
    specs = gpu_worker_specs(3)
    assert len(specs) == 3
    for i, spec in enumerate(specs.values()):
        assert spec["cls"] is distributed.Nanny
        assert spec["options"]["env"] == {"CUDA_VISIBLE_DEVICES": str(i)}
        assert spec["options"]["nthreads"] == 1
        assert spec["options"]["resources"] == {"GPU": 1}


@pytest.mark.slow
def test_the_gpu_worker_specs_start_workers_that_see_their_own_gpu():
    from distributed import Client, Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with (
        SpecCluster(workers=gpu_worker_specs(2), scheduler=scheduler) as cluster,
        Client(cluster) as client,
    ):
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        info = client.scheduler_info()["workers"]
    assert sorted(seen.values()) == ["0", "1"]
    assert all(w["resources"] == {"GPU": 1} and w["nthreads"] == 1 for w in info.values())


def _worker_trim(client):
    return set(client.run(lambda: os.environ.get(cluster_mod.TRIM_ENV)).values())


@pytest.mark.slow
def test_training_workers_start_without_dasks_malloc_trim_threshold(monkeypatch):
    """dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, where torch then trains on
    the CPU at 0.35-0.65x its speed; the clusters a run starts leave it out, also when an
    earlier nanny leaked it into this process, and put the process's environment back
    afterwards."""
    from distributed import Client, LocalCluster

    monkeypatch.delenv(cluster_mod.TRIM_ENV, raising=False)
    kw = {"n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"}
    with LocalCluster(**kw) as cluster, Client(cluster) as client:
        assert _worker_trim(client) == {"65536"}  # dask's default: what the fix removes
    assert os.environ[cluster_mod.TRIM_ENV] == "65536"  # leaked into this process
    with cluster_mod.untrimmed_workers():
        assert cluster_mod.TRIM_ENV not in os.environ
        with LocalCluster(**kw) as cluster, Client(cluster) as client:
            assert _worker_trim(client) == {None}
    assert os.environ[cluster_mod.TRIM_ENV] == "65536"
    monkeypatch.setenv(cluster_mod.TRIM_ENV, "1000000")  # the user's own value is kept
    with cluster_mod.untrimmed_workers():
        assert os.environ[cluster_mod.TRIM_ENV] == "1000000"


def test_cpu_fits_on_workers_with_malloc_trim_warn_with_the_remedy(caplog):
    workers = {"w1": {**_worker(), "trim": "65536"}, "w2": {**_worker(), "trim": None}}
    with caplog.at_level("WARNING", logger="agbcube.train.cluster"):
        cluster_mod._warn_trimmed(workers, torch.device("cuda"))
        assert not caplog.records  # GPU fits allocate little on the host
        cluster_mod._warn_trimmed(workers, torch.device("cpu"))
    (record,) = caplog.records
    assert "['w1']" in record.getMessage() and "MALLOC_TRIM_THRESHOLD_: null" in record.getMessage()


def test_failures_name_fold_and_member_and_say_what_was_not_run():
    tcfg = small_train_settings()
    failures = {
        Task(1, "select"): TrainingError("fold 1: the loss was not finite for 20 steps"),
        Task(1, "member", 0): TrainingError("fold 1: the loss was not finite for 20 steps"),
        Task(2, "member", 1): cluster_mod._killed(
            distributed.KilledWorker("fold_2/member_1-x", "tcp://w", 3)
        ),
    }
    err = execute_mod._failure(failures, tcfg, Path("/runs/r"), 12)
    assert isinstance(err, TrainingError)
    text = str(err)
    assert text.startswith("3 of 12 tasks failed; the other tasks' results are kept in /runs/r")
    assert "fold 1 select: fold 1: the loss was not finite" in text
    assert "fold 1 member 0: not run, fold 1 select failed" in text
    assert "fold 2 member 1: its worker died each time it ran it" in text
    assert "--resume" in text
    bug = execute_mod._failure({Task(0, "baseline"): ZeroDivisionError("x")}, tcfg, Path("r"), 4)
    assert type(bug) is RuntimeError and "fold 0 baseline: ZeroDivisionError: x" in str(bug)
    assert describe(Task(3, "random")) == "random-CV fold 3"


def small_train_settings():
    from agbcube.config import TrainConfig

    return TrainConfig(epochs=2, conv_channels=[8], ensemble=2, refit=True)


@pytest.mark.slow
def test_a_worker_rebuilds_its_run_data_only_for_another_run(cluster_reference, tmp_path):
    _, ref = cluster_reference
    run_dir = tmp_path / "r"
    shutil.copytree(ref, run_dir)
    cpu = torch.device("cpu")
    first = run_data(run_dir, cpu)
    assert run_data(run_dir, cpu) is first
    assert (
        first.plan.data_path == json.loads((run_dir / "run.json").read_text())["plan"]["data_path"]
    )
    (run_dir / "run.json").write_text((run_dir / "run.json").read_text() + "\n")  # a new run
    again = run_data(run_dir, cpu)
    assert again.folds is not first.folds and run_data(run_dir, cpu) is again
    with pytest.raises(TrainingError, match="cannot read the run directory .*shared file system"):
        run_data(tmp_path / "elsewhere", cpu)
    assert data_mod.release_run(str(run_dir)) == 1  # the run's end frees its chips
    assert run_data(run_dir, cpu) is not again


# --------------------------------------------------------------------------------------------
# whole runs on a LocalCluster


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _same_predictions(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(
        pd.read_parquet(a / "predictions.parquet"), pd.read_parquet(b / "predictions.parquet")
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(a / "pixels.parquet"), pd.read_parquet(b / "pixels.parquet")
    )


def _kill_a_worker_mid_fit(client, out: Path, run: threading.Thread) -> tuple[int, str]:
    """SIGKILL the worker of a task that has a checkpoint (it is fitting) and no result."""
    t0 = time.time()
    while True:
        assert run.is_alive() and time.time() - t0 < 300, "no fit was caught running"
        for address, keys in client.processing().items():
            for key in keys:
                name = str(key).rsplit("-", 1)[0]
                if not name.startswith("fold_"):
                    continue
                fold, stem = name.split("/")
                ckpt = out / fold / f"checkpoint_{stem}.pt"
                if ckpt.exists() and not (out / f"{name}.npz").exists():
                    pid = client.run(os.getpid, workers=[address])[address]
                    os.kill(pid, signal.SIGKILL)
                    return pid, name
        time.sleep(0.02)


@pytest.mark.slow
def test_gpu_tasks_on_a_cluster_survive_a_killed_worker_and_equal_the_sequential_run(
    cluster_reference, local_cluster, started_tasks, tmp_path, monkeypatch
):
    """Workers offering a GPU resource, as GPU workers: every task asks for one; `auto` is
    resolved on each worker (its CPU here). A worker SIGKILLed mid-fit: the task runs again
    from its checkpoint, and the run equals the sequential one bit for bit."""
    cfg = _with(cluster_reference[0], epochs=30, patience=30, ensemble=1)  # fits long enough
    with _torch_threads(1):
        run_cv(cfg, output=tmp_path / "ref", device="cpu", plots=False)
    real = cluster_mod._workers  # the workers say they have CUDA
    monkeypatch.setattr(
        cluster_mod, "_workers", lambda c: {a: {**w, "cuda": 1} for a, w in real(c).items()}
    )
    failures: list[BaseException] = []
    out = tmp_path / "run"

    def train() -> None:
        try:
            run_cv(cfg, output=out, device="auto", plots=False, scheduler=address)
        except BaseException as err:  # reported below
            failures.append(err)

    address = local_cluster.scheduler_address
    with distributed.Client(local_cluster) as client:
        run = threading.Thread(target=train)
        run.start()
        victim, task = _kill_a_worker_mid_fit(client, out, run)
        run.join(timeout=600)
        assert victim not in client.run(os.getpid).values()  # the nanny started another
    assert not run.is_alive() and not failures, failures
    _same_predictions(tmp_path / "ref", out)
    trained = [(k, r) for k, r in started_tasks if k.startswith(("fold_", "train/"))]
    assert sum(k.startswith(f"{task}-") for k, _ in trained) == 2  # killed, then again
    assert trained and all(r == {"GPU": 1} for _, r in trained), trained
    assert not list(out.glob("fold_*/.*.tmp-*"))  # nothing half-written is left


@pytest.mark.slow
def test_a_killed_client_resumes_with_only_the_missing_tasks(
    cluster_reference, local_cluster, tmp_path, caplog
):
    cfg, ref = cluster_reference
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "run"
    address = local_cluster.scheduler_address
    argv = [sys.executable, "-m", "agbcube.cli", "train", str(config), "--output", str(out)]
    argv += ["--device", "cpu", "--scheduler", address, "--threads-per-task", "1", "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(tmp_path / "client.log", "wb") as log:
        client_proc = subprocess.Popen(argv, env=env, stderr=log)
        t0 = time.time()
        while len(list(out.glob("fold_*/*.npz"))) < 2:
            assert client_proc.poll() is None, (tmp_path / "client.log").read_text()
            assert time.time() - t0 < 300, "no task finished"
            time.sleep(0.05)
        client_proc.send_signal(signal.SIGKILL)
        client_proc.wait()
    with distributed.Client(local_cluster) as client:  # the fits it had started end
        while any(client.run(lambda: data_mod.ONE_FIT.locked()).values()):
            time.sleep(0.1)
    done = {p: p.stat().st_mtime_ns for p in out.glob("fold_*/*.npz")}
    n_tasks = 3 * 3  # select and two members per fold
    assert 2 <= len(done) < n_tasks
    caplog.set_level("INFO", logger="agbcube.train")
    run_cv(cfg, output=out, device="cpu", plots=False, resume=True, scheduler=address)
    ran = [r.getMessage() for r in caplog.records if ": done in " in r.getMessage()]
    assert len(ran) == n_tasks - len(done), ran
    assert f"{len(done)} of {n_tasks} tasks done and kept; {len(ran)} to run" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in done} == done  # never run again
    _same_predictions(ref, out)


@pytest.mark.slow
def test_a_failing_task_is_named_and_the_others_are_kept(
    cluster_reference, local_cluster, tmp_path
):
    cfg, ref = cluster_reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    for path in [*out.glob("fold_*/member_*.npz"), out / "predictions.parquet"]:
        path.unlink()
    good = (out / "fold_1" / "select.npz").read_bytes()
    (out / "fold_1" / "select.npz").write_bytes(b"damaged")  # fold 1's refits cannot start
    address = local_cluster.scheduler_address
    with pytest.raises(TrainingError) as caught:
        run_cv(cfg, output=out, device="cpu", plots=False, resume=True, scheduler=address)
    text = str(caught.value)
    assert text.startswith("2 of 9 tasks failed; the other tasks' results are kept")
    for m in (0, 1):
        assert f"fold 1 member {m}: task result {out}/fold_1/select.npz cannot be read" in text
    kept = sorted(p.relative_to(out).as_posix() for p in out.glob("fold_*/member_*.npz"))
    assert kept == [f"fold_{k}/member_{m}.npz" for k in (0, 2) for m in (0, 1)]
    (out / "fold_1" / "select.npz").write_bytes(good)
    run_cv(cfg, output=out, device="cpu", plots=False, resume=True, scheduler=address)
    _same_predictions(ref, out)


@pytest.mark.slow
def test_the_train_command_takes_a_scheduler(cluster_reference, tmp_path):
    from typer.testing import CliRunner

    from agbcube.cli import app

    cfg, _ = cluster_reference
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(config), "--scheduler", "gpu"])
    assert result.exit_code == 2 and "unknown scheduler 'gpu'" in result.output
    result = CliRunner().invoke(app, ["train", str(config), "--threads-per-task", "0"])
    assert result.exit_code == 2
