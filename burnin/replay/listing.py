"""Read-only views of a SequenceReplay's tables, for tests and diagnostics: its live keys and a fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from burnin.replay.kernels import LANE_TAIL, WIN_GEN, Layout, Tables

__all__ = ["fingerprint", "live_keys"]


def live_keys(t: Tables, lay: Layout) -> np.ndarray:
    """Keys of every sampleable window, lane by lane, oldest first."""
    wpl = lay.windows_per_lane
    slots = np.flatnonzero(t.alive)
    lane = slots // wpl
    tail = t.lanes[lane, LANE_TAIL]
    num = tail + (slots - lane * wpl - tail) % wpl
    slots = slots[np.lexsort((num, lane))]
    return t.windows[slots, WIN_GEN] * lay.num_slots + slots


def fingerprint(
    arrays: dict[str, np.ndarray], nodes: np.ndarray, prio: np.ndarray, meta: dict[str, Any]
) -> str:
    """A SHA-256 of a buffer's arrays (by name, with dtype and shape), its sum-tree nodes, its running
    maximum priority and ``meta`` (configuration, registry, RNG state, as JSON)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = arrays[name]
        h.update(f"{name} {arr.dtype.str} {arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).view(np.uint8).reshape(-1))
    h.update(nodes.view(np.uint8))
    h.update(prio.view(np.uint8))
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()
