"""Interrupts: SIGTERM as Ctrl-C, and blocks that a Ctrl-C or SIGTERM cannot cut in half.

A commit (the learner's update with its write-back, a checkpoint load swapping
in what it read) runs inside :func:`deferred_interrupts`: a SIGINT or SIGTERM
that arrives meanwhile is delivered when the block ends, so the operation is
applied entirely or not at all. A second signal inside the block is
delivered at once, so a stuck block can still be interrupted.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["EXIT_INTERRUPTED", "deferred_interrupts", "quiet_interrupt", "sigterm_as_interrupt"]

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C or SIGTERM (128 + SIGINT, the shell's convention)."""

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM (a scheduler's stop) raises KeyboardInterrupt as Ctrl-C does; the
    previous handler comes back after. Main thread only (elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def quiet_interrupt(prog: str, *, enabled: bool = True) -> Iterator[None]:
    """Ctrl-C inside the block prints ``PROG: interrupted`` and exits 130, not a traceback.

    For a script's own imports (TensorFlow takes seconds), before
    :func:`agents.cli.run_script` is in charge; ``enabled=False`` (the module
    imported, not run) lets the KeyboardInterrupt through.
    """
    try:
        yield
    except KeyboardInterrupt:
        if not enabled:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first one that came.

    Main thread only (Python runs signal handlers there; elsewhere a no-op).
    Signals whose handler is ``SIG_IGN`` are left alone. A second signal
    during the block is delivered at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: Any) -> None:
        if pending:  # the second one: stop deferring and deliver it now
            pending.clear()
            _restore(previous)
            signal.raise_signal(signum)
            return
        pending.append(signum)

    for signum in _SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN and handler is not None:
            previous[signum] = signal.signal(signum, hold)
    try:
        yield
    finally:
        _restore(previous)
        if pending:
            signal.raise_signal(pending[0])


def _restore(previous: dict[int, Any]) -> None:
    while previous:
        signum, handler = previous.popitem()
        signal.signal(signum, handler)
