"""What this process may run on: the cores it can use, read when asked (nothing is cached or set)."""

from __future__ import annotations

import os

__all__ = ["visible_cores"]


def visible_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, a container's cpuset), else
    ``os.cpu_count()`` where the platform has no affinity call (macOS, Windows), else 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
