"""One run directory per run: what an earlier run left there, whether it is writable, and a run's lock.

A run directory (``RUN_DIR/NAME``) holds one run's checkpoint, summary, plot
and TensorBoard logs. :func:`earlier_run` says what an earlier run left there
(the CLI refuses to start afresh over it); :func:`check_writable` says, before
anything runs, whether the directory can be made and written; :func:`locked`
holds an exclusive ``fcntl.flock`` on ``RUN_DIR/NAME/.lock`` for the whole run,
so a second run into the same directory is refused instead of interleaving its
checkpoints and logs with the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "RunDirError", "check_writable", "earlier_run", "locked", "make_run_dir"]

LOCK_NAME = ".lock"
"""The lock file inside a run directory (removed when the run ends)."""

RUN_OUTPUTS = ("checkpoint", ".checkpoint.previous", "summary.json")
"""What a run leaves that a new run must not replace: its checkpoint (or the previous one a crash between
a save's renames left) and its summary."""


class RunDirError(ValueError):
    """A run directory that cannot be used: in use by another run, or not a writable directory."""


def earlier_run(out_dir: str | os.PathLike[str]) -> list[str]:
    """The entries of :data:`RUN_OUTPUTS` that ``out_dir`` holds (empty for a new or an empty directory)."""
    out_dir = Path(out_dir)
    return [name for name in RUN_OUTPUTS if (out_dir / name).exists()]


def check_writable(name: str, path: str | os.PathLike[str]) -> None:
    """ValueError naming ``name`` unless ``path`` is a writable directory or can be made as one: every part
    of it that exists must be a directory, and the deepest existing one writable (a read-only filesystem
    fails this too). Creates nothing."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise ValueError(f"{name}: {str(path)!r} is not a directory (dangling link {str(existing)!r})")
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f" ({str(existing)!r} is a file)"
        raise ValueError(f"{name}: expected a directory, got {str(path)!r}{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name}: {str(existing)!r} is not writable (read-only filesystem or no permission); "
            "expected a directory the run can write"
        )


def make_run_dir(out_dir: Path) -> None:
    """``out_dir`` and its parents; :class:`RunDirError` (one line) if they cannot be made."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"run directory {out_dir}: cannot create it ({err.strerror or err})") from None


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the block; :class:`RunDirError` at once if another run holds it.

    The lock file is removed at the end. A run that opened it just before the
    removal finds, after locking, that the path no longer names its file, and
    tries again on the new one; so two runs never both hold the directory.
    """
    path = out_dir / LOCK_NAME
    for _ in range(100):  # retried only when the holder removed the file between our open and our lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(
                f"run directory {out_dir}: cannot create its lock ({err.strerror or err})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"run directory {out_dir} is in use by another run (pid {holder}); wait for it to end, "
                "or give this run another --name"
            ) from None
        if _same_file(path, fd):
            break
        os.close(fd)
    else:  # pragma: no cover - a lock file replaced a hundred times in a row
        raise RunDirError(f"run directory {out_dir}: its lock file keeps changing")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding the lock: see the docstring
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
