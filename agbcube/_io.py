"""I/O helpers shared by every stage: ownership markers, atomic writes, one-writer locks.

Ownership
---------
agbcube never removes or replaces a file or folder it did not write. It recognises its own
outputs by markers, all read here:

* a folder it owns (a run directory, a maps folder) holds a marker file ``.agbcube`` (JSON:
  ``kind``, agbcube version, creation time), written by `mark_output`;
* a cube store is a Zarr group whose root attributes hold ``agbcube``;
* a folds file is a Parquet file whose schema metadata holds ``agbcube``;
* a PNG carries an ``agbcube`` text chunk (`png_metadata`), a JSON file a top-level
  ``"written_by": "agbcube …"`` (`written_by`);
* anything inside an owned folder or cube store is owned too.

`atomic_path` and `replace_path` refuse anything else with
`OutputExistsError`, and never put a file where a folder is (or the
reverse). `prepare_output_dir` makes (or reuses) a folder for an output and marks it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

from agbcube import __version__
from agbcube.errors import (
    AgbcubeError,
    OutputExistsError,
    OutputLockedError,
    OutputWriteError,
    one_line,
)

__all__ = [
    "MARKER",
    "atomic_path",
    "check_output_dir",
    "check_outside_stores",
    "check_replaceable",
    "digest",
    "json_text",
    "mark_output",
    "output_kind",
    "output_lock",
    "owned",
    "png_metadata",
    "prepare_output_dir",
    "remove_output",
    "remove_path",
    "replace_path",
    "temporary_sibling",
    "url_identity",
    "write_errors",
    "write_json_atomic",
    "written_by",
]

MARKER = ".agbcube"


def digest(obj: object) -> str:
    """A short, stable key of a JSON-able description (what an output depends on)."""
    import hashlib

    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """A short key of a file's bytes (what a run records of the files it reads)."""
    with open(path, "rb") as fh:
        return _stream_digest(fh)


def _stream_digest(stream: Any) -> str:
    """A short key of the bytes a binary stream (a file, an HTTP response) holds, read in
    pieces of 1 MiB."""
    import hashlib

    h = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()[:16]


def url_identity(url: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """What identifies the content at ``url`` now: the server's ETag (what object stores give),
    else a digest of the bytes themselves (a plain web server's Last-Modified can be set back).
    A URL that cannot be read gives ``{"error": ...}`` and no ``digest``."""
    import urllib.request

    try:
        head = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(head, timeout=timeout) as response:
            etag = response.headers.get("ETag")
            length = response.headers.get("Content-Length")
        if etag:
            return {"etag": etag, "length": length, "digest": f"etag:{etag}"}
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return {"length": length, "digest": _stream_digest(response)}
    except (OSError, ValueError) as err:  # urllib's URLError and HTTPError are OSErrors
        return {"error": one_line(err, 200)}


def written_by() -> str:
    """The ``written_by`` value that marks a file as agbcube's."""
    return f"agbcube {__version__}"


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden, unique name beside ``path`` (same filesystem, so a rename is atomic)."""
    return path.with_name(f".{path.name}.{tag}-{uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree if it exists (agbcube's own temporaries)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# ownership


def mark_output(path: str | Path, kind: str) -> None:
    """Record that agbcube owns the folder ``path`` (created if missing), an output of ``kind``."""
    path = Path(path)
    with write_errors(path, what=kind):
        path.mkdir(parents=True, exist_ok=True)
        if _marker_kind(path) == kind:
            return
        marker = path / MARKER
        tmp = temporary_sibling(marker)
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        tmp.write_text(json.dumps({"kind": kind, "written_by": written_by(), "created": stamp}))
        os.replace(tmp, marker)


def output_kind(path: str | Path) -> str | None:
    """The kind of agbcube output at ``path`` (``"run"``, ``"cube"``, ``"folds"`` …).

    None when nothing is there or what is there carries no agbcube marker.
    """
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        return _marker_kind(path) or _zarr_kind(path) or _legacy_kind(path)
    return _file_kind(path)


def owned(path: str | Path) -> bool:
    """Whether what stands at ``path`` is agbcube's: it, or a folder above it, is marked."""
    path = Path(os.path.abspath(path))
    if output_kind(path) is not None:
        return True
    return any(_marker_kind(p) or _zarr_kind(p) for p in path.parents)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker_kind(folder: Path) -> str | None:
    data = _read_json(folder / MARKER)
    return str(data.get("kind", "output")) if data is not None else None


def _zarr_kind(folder: Path) -> str | None:
    attrs = _read_json(folder / ".zattrs")
    if attrs is None:  # Zarr format 3 keeps attributes in zarr.json
        attrs = (_read_json(folder / "zarr.json") or {}).get("attributes")
    if not isinstance(attrs, dict):
        return None
    if "agbcube" in attrs:
        return "cube"
    # maps being written carry their resume key; finished maps, who wrote them
    return "maps" if {"agbcube_partial_key", "agbcube_maps"} & set(attrs) else None


def _legacy_kind(folder: Path) -> str | None:
    """Maps folders written before agbcube marked its folders, proven by their store's own
    attributes. Nothing is guessed from file names: a folder of a user's that happens to hold
    a ``config.yaml`` and a ``metrics.json`` is the user's."""
    return "maps" if _zarr_kind(folder / "maps.zarr") else None


ESTIMATE_COLUMNS = ("agb_total_mg", "agb_total_mg_lower", "agb_total_mg_upper", "error_model")
"""Columns every area-estimate table has (how agbcube knows a table it may replace)."""


def _file_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv", ".gpkg") and _is_estimate_table(path):
        return "estimate"
    if suffix == ".parquet":
        return "folds" if _parquet_marked(path) else None
    if suffix == ".png":
        return "png" if "agbcube" in png_metadata(path) or _folds_sidecar(path) else None
    if suffix == ".json":
        mark = (_read_json(path) or {}).get("written_by")
        agbcube = isinstance(mark, str) and mark.startswith("agbcube")
        return "json" if agbcube or _folds_sidecar(path) else None
    return None


def _is_estimate_table(path: Path) -> bool:
    """Whether a table file holds `ESTIMATE_COLUMNS` (an estimate agbcube wrote)."""
    try:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8", errors="replace") as fh:
                columns = fh.readline().strip().split(",")
        elif path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            columns = pq.read_schema(path).names
        else:
            import pyogrio

            columns = list(pyogrio.read_info(path)["fields"])
    except Exception:  # unreadable: not a table agbcube wrote
        return False
    return set(ESTIMATE_COLUMNS) <= set(columns)


_SIDECAR = re.compile(r"^(?P<stem>.+)_(audit|map_.+)$")


def _folds_sidecar(path: Path) -> bool:
    """A folds file's audit or map as versions before markers wrote them: named after the
    marked folds file beside it (``folds.parquet`` → ``folds_audit.json``,
    ``folds_map_<site>.png``)."""
    match = _SIDECAR.match(path.stem)
    return match is not None and _parquet_marked(path.with_name(f"{match['stem']}.parquet"))


def _parquet_marked(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return False
    return b"agbcube" in meta


def png_metadata(path: str | Path) -> dict[str, str]:
    """The ``tEXt`` chunks of a PNG (matplotlib's ``savefig(metadata=...)`` writes them)."""
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return out
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return out
                size, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND"):
                    return out
                data = fh.read(size)
                fh.seek(4, os.SEEK_CUR)  # the chunk's CRC
                if kind == b"tEXt" and b"\0" in data:
                    key, value = data.split(b"\0", 1)
                    out[key.decode("latin-1")] = value.decode("latin-1")
    except OSError:
        return out


_SCRATCH = re.compile(r"^\..+(\.lock|\.(tmp|old|plain)-[0-9a-f]{8})$")


def _holds_files(folder: Path) -> bool:
    """Whether a folder holds anything besides agbcube's own lock files and temporaries."""
    return any(not _SCRATCH.match(child.name) for child in folder.iterdir())


def check_replaceable(path: str | Path, *, what: str = "output", folder: bool = False) -> None:
    """Raise `OutputExistsError` unless agbcube may put its output at ``path``.

    It may when nothing is there, or when what is there is agbcube's own (`owned`) and of
    the same type (a folder for a folder, a file for a file); an empty folder may be replaced
    by a folder.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() != folder:
        have, want = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
        raise OutputExistsError(
            f"{what} {path} is {have}, where agbcube writes {want}; give another path (agbcube "
            f"never replaces {have} with {want})"
        )
    if owned(path) or (folder and not _holds_files(path)):
        return
    raise OutputExistsError(
        f"{what} {path} exists and was not written by agbcube (it carries no agbcube marker); "
        f"agbcube never replaces what it did not write: choose another path, or move {path} "
        "away yourself"
    )


def prepare_output_dir(path: str | Path, *, kind: str, what: str = "output") -> Path:
    """Create the folder ``path`` for an output of ``kind`` and mark it as agbcube's.

    An existing folder is used when it is itself agbcube's (marked as an output) or is empty
    (but for agbcube's own lock files and temporaries). Being inside an agbcube folder is not
    enough: a folder of the user's own inside the demo folder or a run is the user's.

    Raises
    ------
    OutputExistsError
        ``path`` is a file, or a folder holding files agbcube did not write.
    """
    path = Path(path)
    check_output_dir(path, what=what)
    mark_output(path, kind)
    return path


def check_outside_stores(path: str | Path, *, what: str = "output") -> None:
    """Raise `OutputExistsError` when ``path`` lies inside a Zarr store (a cube, a map's
    store): a store holds its own arrays, and a file put into one is lost or in the way."""
    path = Path(os.path.abspath(path))
    store = next((p for p in path.parents if _zarr_kind(p) or (p / "zarr.json").is_file()), None)
    if store is not None:
        raise OutputExistsError(
            f"{what} {path} is inside the Zarr store {store}; agbcube writes nothing into a "
            "store but its arrays: give a path outside it"
        )


def check_output_dir(path: str | Path, *, what: str = "output") -> None:
    """Raise `OutputExistsError` unless `prepare_output_dir` may use ``path``; it creates
    nothing, so a command checks every output before it starts any work."""
    path = Path(path)
    check_outside_stores(path, what=what)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        where = f"{what} {path}" + ("" if existing == path else f": {existing}")
        raise OutputExistsError(
            f"{where} is a file; give a folder (agbcube writes several files into it)"
        )
    if path.is_dir() and output_kind(path) is None and _holds_files(path):
        raise OutputExistsError(
            f"{what} {path} holds files agbcube did not write (it has no {MARKER} marker); "
            "agbcube never mixes its outputs with other files or deletes them: choose a new or "
            "empty folder"
        )


def remove_output(path: str | Path, *, what: str = "output") -> None:
    """Remove an output of agbcube's; anything else raises `OutputExistsError`."""
    path = Path(path)
    if not owned(path):
        raise OutputExistsError(
            f"{what} {path} was not written by agbcube (no agbcube marker), so agbcube will not "
            "remove it; move it away yourself"
        )
    remove_path(path)


# --------------------------------------------------------------------------------------------
# writing


WRITE_HINTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def write_failure(path: Path, err: BaseException, *, what: str = "output") -> str:
    """A one-line account of a failed write: the path, the cause, and what to do."""
    code = getattr(err, "errno", None)
    cause = WRITE_HINTS.get(code) or getattr(err, "strerror", None) or str(err)
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        left = "" if free is None else f" ({free / 2**20:.0f} MiB free)"
        todo = f"free some space{left} or write the {what} to another disk"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        todo = f"write the {what} to a folder you can write to"
    else:
        todo = "check the path and the disk"
    where = getattr(err, "filename", None) or path
    return f"cannot write the {what} at {where}: {cause}; {todo}"


@contextlib.contextmanager
def write_errors(path: str | Path, *, what: str = "output") -> Iterator[None]:
    """Turn a failed write under ``path`` into an `OutputWriteError` naming it.

    Covers the OSErrors of a full disk, a read-only file system or missing permissions, and a
    library's own error on a disk that is now full (torch: "unexpected pos …").
    """
    path = Path(path)
    try:
        yield
    except AgbcubeError:
        raise
    except OSError as err:
        if err.errno not in WRITE_HINTS:  # not a write failure (a missing input, say)
            raise
        raise OutputWriteError(write_failure(path, err, what=what)) from err
    except (RuntimeError, ValueError) as err:
        free = _free_bytes(path)
        if free is None or free >= 2**20:
            raise
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        raise OutputWriteError(write_failure(path, full, what=what)) from err


@contextlib.contextmanager
def atomic_path(
    path: str | Path, *, overwrite: bool = True, what: str = "output", folder: bool = False
) -> Iterator[Path]:
    """Yield a temporary sibling to write into; rename it onto ``path`` only on success.

    Readers never see a half-written output, and on failure the previous output (if any) is left
    untouched and the temporary is removed. What stands at ``path`` must be agbcube's own
    output of the same type (`check_replaceable`); that is checked before the write.

    Parameters
    ----------
    path : str or Path
        The output.
    overwrite : bool
        Replace an existing output (else `OutputExistsError`).
    what : str
        Names the output in messages, e.g. ``"folds.output"``.
    folder : bool
        The caller writes a folder (e.g. a Zarr store) rather than a file.
    """
    path = Path(path)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise OutputExistsError(
            f"{what} {path} exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    check_replaceable(path, what=what, folder=folder)
    tmp = temporary_sibling(path)
    try:
        with write_errors(path, what=what):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            replace_path(tmp, path, what=what)
    finally:
        remove_path(tmp)


def replace_path(src: Path, dst: Path, *, what: str = "output") -> None:
    """Move ``src`` onto ``dst``, which must be absent or agbcube's own output of the same type.

    An existing folder at ``dst`` is swapped out, then deleted.
    """
    check_replaceable(dst, what=what, folder=src.is_dir())
    if dst.is_dir() and not dst.is_symlink():
        old = temporary_sibling(dst, "old")
        dst.rename(old)
        src.rename(dst)
        remove_path(old)
    else:
        os.replace(src, dst)


def write_json_atomic(path: str | Path, obj: object, *, what: str = "output") -> None:
    """Write JSON through a temporary file and an atomic rename."""
    with atomic_path(path, what=what) as tmp:
        tmp.write_text(json_text(obj))


def json_text(obj: object) -> str:
    """The text of agbcube's JSON files (indented, one trailing newline)."""
    return json.dumps(obj, indent=2, default=str) + "\n"


# --------------------------------------------------------------------------------------------
# one writer per output


def _try_lock(fd: int) -> bool:
    """Take an exclusive OS lock on ``fd`` without waiting; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        data = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (OSError, ValueError):  # not written yet, or not ours to parse: name nobody
        return {}
    return data if isinstance(data, dict) else {}


def _locked_message(what: str, path: Path, holder: dict) -> str:
    who = (
        f"process {holder['pid']} on {holder.get('host', '?')} (since "
        f"{time.ctime(float(holder.get('started', 0)))})"
        if "pid" in holder
        else "another process"
    )
    return (
        f"{what} {path} is being written by {who}. Wait for it to finish: the lock is the "
        "operating system's and is freed the moment that process ends, however it ends."
    )


@contextlib.contextmanager
def output_lock(path: str | Path, *, what: str = "output", wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on an output for one writer.

    A second writer is refused at once (`OutputLockedError`), or, with ``wait_s``, waits up to
    that long for the lock: how files several commands update (a run's maps collection) are
    read, changed and written by one at a time.

    The lock is an operating-system lock (``flock``) on the file ``.<name>.lock`` beside the
    output. The kernel releases it when the holder exits, however it exits, so there is no
    stale lock to guess about; the file's content (the holder's host, pid and start time) only
    names the holder in the message a second writer gets (`OutputLockedError`). Only the
    holder removes the file, while it still holds the lock.

    Network file systems: ``flock`` locks hold across hosts on NFSv4 and on Linux NFS clients
    (which emulate them with byte-range locks), but some shared file systems (NFS without a
    lock daemon, SMB, some FUSE or Lustre mounts without the ``flock`` option) keep locks local
    to one host or ignore them. There two hosts can both take the lock: run one writer per
    output on such storage.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    with write_errors(lock, what="lock file"):
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, path, what, wait_s)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, lock):
                lock.unlink()  # still ours: nobody else can hold this file's lock
        os.close(fd)


def writer_of(path: str | Path, *, what: str = "output") -> str | None:
    """Who holds `output_lock` on ``path`` now, in words (`None`: nobody). How a reader tells
    an output being written from one whose writer was interrupted."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # no lock file: no writer
        return None
    try:
        if _try_lock(fd):
            return None  # closing the file frees the lock we just took
        return _locked_message(what, path, _holder(fd))
    finally:
        os.close(fd)


def _acquire(lock: Path, path: Path, what: str, wait_s: float = 0.0) -> int:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = _holder(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise OutputLockedError(_locked_message(what, path, holder))
        if _same_file(fd, lock):
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            return fd
        # the previous holder removed this file between our open and our lock: take the new one
        os.close(fd)
