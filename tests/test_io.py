"""agbcube/_io.py: what agbcube recognises as its own, atomic writes, write errors, locks."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agbcube._io import (
    MARKER,
    atomic_path,
    mark_output,
    output_kind,
    output_lock,
    owned,
    png_metadata,
    prepare_output_dir,
    remove_output,
    write_errors,
    write_json_atomic,
)
from agbcube.errors import OutputExistsError, OutputLockedError, OutputWriteError

# --- ownership ---------------------------------------------------------------------------------


def _agbcube_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"a": [1, 2]}).replace_schema_metadata({b"agbcube": b"{}"})
    pq.write_table(table, path)
    return path


def _png(path: Path, **metadata: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    fig.savefig(path, format="png", metadata=metadata)
    return path


def test_own_outputs_are_recognised_by_their_markers(tmp_path):
    run = tmp_path / "run"
    mark_output(run, "run")
    assert output_kind(run) == "run" and (run / MARKER).is_file()
    (run / "fold_0").mkdir()
    (run / "fold_0" / "model.pt").write_bytes(b"x")
    assert owned(run / "fold_0" / "model.pt")  # inside an owned folder
    cube = tmp_path / "cube.zarr"
    cube.mkdir()
    (cube / ".zattrs").write_text(json.dumps({"agbcube": {"sites": {}}}))
    (cube / "site").mkdir()
    assert output_kind(cube) == "cube" and owned(cube / "site")
    assert output_kind(_agbcube_parquet(tmp_path / "folds.parquet")) == "folds"
    png = _png(tmp_path / "map.png", agbcube="agbcube 0.1.0")
    assert png_metadata(png)["agbcube"] == "agbcube 0.1.0" and owned(png)
    write_json_atomic(tmp_path / "a.json", {"written_by": "agbcube 0.1.0", "x": 1})
    assert output_kind(tmp_path / "a.json") == "json"


def test_a_folds_files_audit_and_maps_from_before_markers_are_recognised(tmp_path):
    """Versions before markers wrote folds_audit.json and folds_map_<site>.png unmarked beside
    a marked folds file: re-running `agbcube folds` must replace them, not refuse."""
    folds = _agbcube_parquet(tmp_path / "folds.parquet")
    (tmp_path / "folds_audit.json").write_text('{"tested_once": true}')
    _png(tmp_path / "folds_map_betul.png")
    assert output_kind(tmp_path / "folds_audit.json") == "json"
    assert output_kind(tmp_path / "folds_map_betul.png") == "png"
    # not beside a marked folds file, or not named after one: the user's
    (tmp_path / "other_audit.json").write_text('{"tested_once": true}')
    folds.rename(tmp_path / "mine.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "folds.parquet")
    for name in ("other_audit.json", "folds_audit.json", "folds_map_betul.png"):
        assert output_kind(tmp_path / name) is None, name


def test_foreign_files_and_folders_are_not_owned(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "theirs.parquet")
    (tmp_path / "notes.json").write_text('{"x": 1}')
    (tmp_path / "notes.txt").write_text("x")
    _png(tmp_path / "theirs.png")
    (tmp_path / "data").mkdir()
    (tmp_path / "fake.zarr").mkdir()
    (tmp_path / "fake.zarr" / ".zattrs").write_text("{not json")
    for name in ("theirs.parquet", "notes.json", "notes.txt", "theirs.png", "data", "fake.zarr"):
        assert output_kind(tmp_path / name) is None and not owned(tmp_path / name), name
    assert output_kind(tmp_path / "absent") is None


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["folds.parquet", "audit.json", "map.png", "x.tif", "run"])
def test_atomic_path_never_replaces_a_foreign_file_or_a_folder(tmp_path, name):
    target = tmp_path / name
    if name == "run":
        target.mkdir()
        (target / "thesis.tex").write_text("five years")
    else:
        target.write_bytes(b"the user's own " + name.encode())
    before = _snapshot(target)
    what = "a folder" if name == "run" else "not written by agbcube"
    with (
        pytest.raises(OutputExistsError, match=f"output {target} .*{what}"),
        atomic_path(target) as tmp,
    ):
        tmp.write_bytes(b"agbcube's")
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    content=st.binary(max_size=300),
    suffix=st.sampled_from([".parquet", ".json", ".png", ".txt", ".csv", ".gpkg", ""]),
)
def test_no_content_of_a_users_file_makes_agbcube_replace_it(tmp_path, content, suffix):
    target = tmp_path / f"out{suffix}"
    target.write_bytes(content)
    with pytest.raises(OutputExistsError), atomic_path(target, what="folds.output") as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == content


def test_atomic_path_replaces_its_own_outputs(tmp_path):
    folds = _agbcube_parquet(tmp_path / "folds.parquet")
    with atomic_path(folds) as tmp:
        _agbcube_parquet(tmp)
        tmp.write_bytes(tmp.read_bytes())
    assert output_kind(folds) == "folds"
    run = tmp_path / "run"
    mark_output(run, "run")
    (run / "metrics.json").write_text("{}")  # written by agbcube: inside its run directory
    write_json_atomic(run / "metrics.json", {"r2": 0.5})
    assert json.loads((run / "metrics.json").read_text()) == {"r2": 0.5}
    with (
        pytest.raises(OutputExistsError, match="exists; pass overwrite=True"),
        atomic_path(run / "metrics.json", overwrite=False),
    ):
        pass


def test_a_folder_output_replaces_only_an_owned_or_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_path(tmp_path / "empty", folder=True) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
    assert (tmp_path / "empty" / "x").read_text() == "1"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    with pytest.raises(OutputExistsError), atomic_path(tmp_path / "full", folder=True) as tmp:
        tmp.mkdir()
    assert (tmp_path / "full" / "keep.txt").read_text() == "keep"


def test_prepare_output_dir(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"maps output .*file is a file; give a folder"):
        prepare_output_dir(tmp_path / "file", kind="maps", what="maps output")
    with pytest.raises(OutputExistsError, match=r"file/sub: .*file is a file"):
        prepare_output_dir(tmp_path / "file" / "sub", kind="maps", what="maps output")
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "paper.pdf").write_bytes(b"%PDF")
    (tmp_path / "dotfiles").mkdir()
    (tmp_path / "dotfiles" / ".git").mkdir()
    for folder in ("docs", "dotfiles"):
        with pytest.raises(OutputExistsError, match="holds files agbcube did not write"):
            prepare_output_dir(tmp_path / folder, kind="maps")
    assert _snapshot(tmp_path / "docs") == {"paper.pdf": b"%PDF"}
    assert not (tmp_path / "docs" / MARKER).exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".maps.zarr.lock").write_text("")  # agbcube's own scratch files
    (tmp_path / "empty" / ".agb.tif.tmp-0123abcd").write_text("")
    for path in (tmp_path / "empty", tmp_path / "new" / "deep"):
        prepare_output_dir(path, kind="maps")
        assert output_kind(path) == "maps"
    prepare_output_dir(tmp_path / "new" / "deep", kind="maps")  # its own: reused


def test_remove_output_removes_only_its_own(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "a.txt").write_text("a")
    with pytest.raises(OutputExistsError, match="will not remove it"):
        remove_output(tmp_path / "theirs")
    assert (tmp_path / "theirs" / "a.txt").exists()
    mark_output(tmp_path / "ours", "run")
    remove_output(tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


# --- write errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cause", "todo"),
    [
        (errno.ENOSPC, "no space left on the device", "free some space"),
        (errno.EDQUOT, "quota", "free some space"),
        (errno.EROFS, "read-only", "folder you can write to"),
        (errno.EACCES, "permission denied", "folder you can write to"),
    ],
)
def test_a_failed_write_names_the_output_and_the_cause(tmp_path, code, cause, todo):
    out = tmp_path / "folds.parquet"
    _agbcube_parquet(out)
    before = out.read_bytes()
    with (
        pytest.raises(OutputWriteError, match=rf"folds.output at .*{cause}.*{todo}"),
        atomic_path(out, what="folds.output") as tmp,
    ):
        tmp.write_bytes(b"half")
        raise OSError(code, os.strerror(code), str(tmp))
    assert out.read_bytes() == before  # the previous output is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folds.parquet"]


def test_a_library_error_on_a_full_disk_is_a_write_error(tmp_path, monkeypatch):
    import agbcube._io as io_mod

    def torch_full_disk():
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] unexpected pos 76928 vs 76816"
        )

    monkeypatch.setattr(io_mod, "_free_bytes", lambda path: 4096)
    with (
        pytest.raises(OutputWriteError, match=r"model at .*model.pt.*no space left"),
        write_errors(tmp_path / "model.pt", what="model"),
    ):
        torch_full_disk()
    monkeypatch.setattr(io_mod, "_free_bytes", lambda path: 10 * 2**30)
    with pytest.raises(RuntimeError, match="unexpected pos"), write_errors(tmp_path / "m.pt"):
        torch_full_disk()  # plenty of space: not ours to explain
    with pytest.raises(FileNotFoundError), write_errors(tmp_path / "x"):
        (tmp_path / "missing-input.txt").read_text()  # a read, not a write: left alone


# --- one writer per output ---------------------------------------------------------------------


def _contend(path, barrier, inside, violations, wins, rounds):
    """Take the lock at the same moment as the other processes, ``rounds`` times."""
    from agbcube._io import output_lock
    from agbcube.errors import OutputLockedError

    for _ in range(rounds):
        barrier.wait()
        try:
            with output_lock(path, what="test output"):
                with inside.get_lock():
                    inside.value += 1
                    if inside.value > 1:
                        violations.value += 1
                    wins.value += 1
                time.sleep(0.05)
                with inside.get_lock():
                    inside.value -= 1
        except OutputLockedError:
            pass
        barrier.wait()


def test_processes_behind_a_barrier_never_hold_the_lock_together(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    n_procs, rounds = 4, 10
    barrier = ctx.Barrier(n_procs)
    inside, violations, wins = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    args = (tmp_path / "cube.zarr", barrier, inside, violations, wins, rounds)
    procs = [ctx.Process(target=_contend, args=args) for _ in range(n_procs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n_procs
    assert violations.value == 0
    assert rounds <= wins.value  # every round someone wrote
    assert not (tmp_path / ".cube.zarr.lock").exists()  # the last holder removed its file


def _hold_lock_in_a_subprocess(path: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from agbcube._io import output_lock
        with output_lock({str(path)!r}, what="cube"):
            print("locked", flush=True)
            time.sleep(120)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"locked"
    return proc


def test_a_killed_holder_frees_the_lock_at_once_and_only_the_holder_removes_it(tmp_path):
    out = tmp_path / "cube.zarr"
    lock = tmp_path / ".cube.zarr.lock"
    proc = _hold_lock_in_a_subprocess(out)
    try:
        inode = lock.stat().st_ino
        for _ in range(2):  # a refused writer neither takes nor removes the holder's lock
            with (
                pytest.raises(OutputLockedError, match=f"by process {proc.pid} on "),
                output_lock(out, what="cube"),
            ):
                pass
            assert lock.stat().st_ino == inode
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert lock.exists()  # left behind by the killed holder, naming a dead process...
    with output_lock(out, what="cube"):  # ...yet free: the OS released it, nothing to guess
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


@pytest.mark.parametrize("content", [b"", b"{", b"\x00\xff garbage", b'{"pid": "x"}', b"[1]"])
def test_whatever_a_lock_file_holds_only_the_os_lock_counts(tmp_path, content):
    lock = tmp_path / ".out.lock"
    lock.write_bytes(content)
    with output_lock(tmp_path / "out"):
        pass
    proc = _hold_lock_in_a_subprocess(tmp_path / "out2")
    try:
        (tmp_path / ".out2.lock").write_bytes(content)  # the holder's details overwritten
        with (
            pytest.raises(OutputLockedError, match="being written by "),
            output_lock(tmp_path / "out2"),
        ):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_outputs_inside_a_zarr_store_are_refused(tmp_path):
    """A folds file, a run or maps given a path inside a cube's store would sit among its
    arrays: refused, naming the store, and nothing is written there."""
    import zarr

    from agbcube._io import check_outside_stores, prepare_output_dir
    from agbcube.errors import OutputExistsError

    store = tmp_path / "cube.zarr"
    zarr.open_group(store, mode="w").attrs["agbcube"] = {"format": 1}
    before = sorted(p.name for p in store.iterdir())
    for target in (store / "folds.parquet", store / "site" / "deeper" / "x.parquet"):
        with pytest.raises(OutputExistsError, match=f"inside the Zarr store {store}"):
            check_outside_stores(target, what="folds.output")
    with pytest.raises(OutputExistsError, match=f"run directory {store}/run is inside"):
        prepare_output_dir(store / "run", kind="run", what="run directory")
    assert sorted(p.name for p in store.iterdir()) == before
    check_outside_stores(tmp_path / "folds.parquet")  # beside it: fine
