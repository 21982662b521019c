"""Atomic, durable writes: one file (temp + fsync + rename + fsync of the directory) or one directory.

Used by the replay's checkpoints and by the agents' checkpoint directories.
Internal to this repository; not part of burnin's public API.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_savez",
    "atomic_write",
    "atomic_write_text",
    "fsync_dir",
    "previous_dir",
    "readable_dir",
    "write_dir_atomically",
]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` with ``write(file)``: into a temp file beside it, fsync, rename over ``path``, fsync the directory.

    If anything fails (KeyboardInterrupt included), whatever was at ``path`` is
    untouched and the temp file is gone.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
