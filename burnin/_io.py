"""Atomic, durable writes: one file (temp + fsync + rename + fsync of the directory) or one directory.

Used by the replay's checkpoints and by the agents' checkpoint directories.
Internal to this repository; not part of burnin's public API.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np

__all__ = [
    "DeferredInterrupt",
    "atomic_savez",
    "atomic_write",
    "atomic_write_text",
    "fsync_dir",
    "previous_dir",
    "readable_dir",
    "remove_stale_temps",
    "write_dir_atomically",
]


class DeferredInterrupt:
    """Hold back SIGINT (KeyboardInterrupt) on the main thread for the duration of a ``with`` block.

    A SIGINT that arrives inside the block is recorded instead of raising;
    :meth:`raise_pending` raises it where the block can still clean up, and
    leaving the block delivers one still pending to the handler that was
    installed before. Python runs signal handlers only on the main thread, so on
    any other thread (and when SIGINT is not handled by Python) this does
    nothing. Entering and leaving cost two ``signal.signal`` calls (~10 µs): for
    saves and cleanups, not for hot paths.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._pending: tuple[int, FrameType | None] | None = None

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            try:
                previous = signal.getsignal(signal.SIGINT)
                if callable(previous):
                    signal.signal(signal.SIGINT, self._record)
                    self._previous = previous
            except ValueError:  # pragma: no cover - not the main interpreter
                pass
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._pending = (signum, frame)

    def raise_pending(self) -> None:
        """Deliver a SIGINT held back so far (the previous handler raises KeyboardInterrupt) now."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._previous(*pending)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self.raise_pending()


class _InterruptibleFile:
    """A file whose every write first delivers a held-back SIGINT, so a long write stops promptly."""

    def __init__(self, f: IO[bytes], guard: DeferredInterrupt) -> None:
        self._f, self._guard = f, guard

    def write(self, data: Any) -> int:
        self._guard.raise_pending()
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


# Temp files of atomic_write: ".<name>.<pid>@<host>.<random>.tmp" beside the target.
_HOST = socket.gethostname().replace(".", "_").replace("@", "_") or "host"
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}@{_HOST}.{uuid.uuid4().hex}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files that earlier :func:`atomic_write` calls to ``path`` left behind when their
    process died (kill -9, power loss); return them. Temps of live writers, or of another host, are kept."""
    path = Path(path)
    prefix, removed = f".{path.name}.", []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        owner = name[len(prefix) : -len(".tmp")].rsplit(".", 1)[0]
        pid, _, host = owner.partition("@")
        if host != _HOST or not pid.isdigit():
            continue
        with _ACTIVE_LOCK:
            mine = int(pid) == os.getpid()
            stale = (mine and entry.path not in _ACTIVE) or (not mine and not _alive(int(pid)))
        if stale:
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` with ``write(file)``: into a temp file beside it, fsync, rename over ``path``, fsync the directory.

    If anything fails, whatever was at ``path`` is untouched and the temp file
    is gone. A KeyboardInterrupt is held back while the temp file exists: it
    stops the write at its next ``file.write`` (or is delivered once the file is
    in place), after the cleanup, so no interrupt leaves a temp file behind.
    Temp files of earlier writes whose process died are removed first.
    """
    path = Path(path)
    remove_stale_temps(path)
    tmp = _temp_path(path)
    with _ACTIVE_LOCK:
        _ACTIVE.add(str(tmp))
    try:
        with DeferredInterrupt() as guard:
            try:
                with open(tmp, "wb") as f:
                    write(_InterruptibleFile(f, guard))
                    f.flush()
                    guard.raise_pending()
                    os.fsync(f.fileno())
                guard.raise_pending()
                os.replace(tmp, path)
            except BaseException:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
                raise
            fsync_dir(path.parent)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(str(tmp))


def atomic_savez(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` of ``arrays`` to ``path``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``text`` (UTF-8) to ``path``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def previous_dir(final: str | os.PathLike[str]) -> Path:
    """Where :func:`write_dir_atomically` keeps the last good directory while it swaps in the new one."""
    final = Path(final)
    return final.with_name(f".{final.name}.previous")


def write_dir_atomically(final: str | os.PathLike[str], fill: Callable[[Path], None]) -> None:
    """Build a directory with ``fill(tmp)`` and swap it in for ``final`` atomically.

    Between the two renames the last good directory is at ``previous_dir(final)``;
    :func:`readable_dir` falls back to it, so a crash there loses nothing. A
    failure inside ``fill`` leaves the last good directory as it was.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    previous = previous_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(final, previous)
        os.replace(tmp, final)
        shutil.rmtree(previous)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def readable_dir(path: str | os.PathLike[str], marker: str) -> Path:
    """``path``, or the previous directory if a :func:`write_dir_atomically` was interrupted between its renames.

    ``marker`` is a file every complete directory holds.
    """
    path = Path(path)
    if not path.exists() and (previous_dir(path) / marker).is_file():
        return previous_dir(path)
    return path
