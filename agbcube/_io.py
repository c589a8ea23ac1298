"""Small I/O helpers shared by every stage: atomic writes and one-writer locks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

from agbcube.errors import OutputLockedError

__all__ = [
    "atomic_path",
    "digest",
    "output_lock",
    "remove_path",
    "temporary_sibling",
    "write_json_atomic",
]


def digest(obj: object) -> str:
    """A short, stable key of a JSON-able description (what an output depends on)."""
    import hashlib

    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden, unique name beside ``path`` (same filesystem, so a rename is atomic)."""
    return path.with_name(f".{path.name}.{tag}-{uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling to write into; rename it onto ``path`` only on success.

    Readers never see a half-written output, and on failure the previous output (if any) is left
    untouched and the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace")
    tmp = temporary_sibling(path)
    try:
        yield tmp
        replace_path(tmp, path)
    finally:
        remove_path(tmp)


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst``; an existing directory at ``dst`` is swapped out, then deleted."""
    if dst.is_dir() and not dst.is_symlink():
        old = temporary_sibling(dst, "old")
        dst.rename(old)
        src.rename(dst)
        remove_path(old)
    else:
        os.replace(src, dst)


def write_json_atomic(path: str | Path, obj: object) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(path: str | Path, *, what: str = "output") -> Iterator[None]:
    """Hold an exclusive lock on an output for one writer.

    The lock is a file ``.<name>.lock`` beside the output holding the writer's host, pid and start
    time. A lock left by a process that no longer exists on this host is taken over; a live holder
    makes this raise :class:`OutputLockedError` naming it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            stale = holder is None or (
                holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1)))
            )
            if stale:
                lock.unlink(missing_ok=True)
                continue
            raise OutputLockedError(
                f"{what} {path} is being written by process {holder.get('pid')} on "
                f"{holder.get('host')} (since {time.ctime(holder.get('started', 0))}). Wait for "
                f"it to finish, or delete {lock} if that process is gone."
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _read_holder(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
