"""Stored recurrent states as [rows, width] arrays of unsigned integers: the layout the replay's compiled commits copy."""

from __future__ import annotations

from typing import Any

import numpy as np

from burnin.replay.kernels import WIN_LEFT, WIN_RIGHT, WIN_START, WIN_STATE

__all__ = ["as_bits", "flat_rows", "refresh_rows", "rows_2d", "state_buffers"]


def as_bits(arr: np.ndarray) -> np.ndarray:
    """``arr`` viewed as unsigned integers of its width: the commits copy bits, so float16 states (which
    numba cannot type) are stored as well."""
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}"))


def state_buffers(
    arrays: dict[str, np.ndarray], prefix: str, rows: int, row_state_shapes: Any
) -> tuple[tuple[np.ndarray, ...], ...]:
    """The stored-state arrays ``{prefix}_{layer}_{i}`` of a buffer, per layer, each with ``rows`` rows."""
    return tuple(
        tuple(arrays[f"{prefix}_{i}_{j}"].reshape(rows, *shape) for j, shape in enumerate(layer))
        for i, layer in enumerate(row_state_shapes)
    )


def rows_2d(flat: tuple[tuple[np.ndarray, ...], ...] | None, dtype: Any) -> tuple[np.ndarray, ...]:
    """Views of every buffer of ``flat`` as [rows, width] bits (one empty array when there are none)."""
    arrays = tuple(as_bits(buf.reshape(buf.shape[0], -1)) for buffers in flat or () for buf in buffers)
    return arrays or (as_bits(np.empty((0, 0), dtype=dtype)),)


def flat_rows(tree: Any, m: int, widths: list[int], dtype: Any) -> tuple[np.ndarray, ...]:
    """The arrays of a state tree (``m`` rows each, already in the stored ``dtype``) as [m, width] bits."""
    out = tuple(
        as_bits(np.ascontiguousarray(arr).reshape(m, width))
        for arr, width in zip((a for layer in tree for a in layer), widths)
    )
    return out or (as_bits(np.empty((m, 0), dtype=dtype)),)


def refresh_rows(
    windows: np.ndarray,
    live: np.ndarray,
    lanes: np.ndarray,
    offsets: np.ndarray,
    trees: list[Any],
    state_pos: np.ndarray,
    *,
    period: int,
    state_slots: int,
) -> tuple[np.ndarray, Any, int]:
    """Where a refresh writes and what: for each offset ``offsets[i]`` and each live window (its table row
    in ``windows``, in lane ``lanes``) whose state at that window step is stored, the state row, and its
    new value from ``trees[i]``. A state row named by several (offset, window) pairs takes the last, in
    (offset, window) order. Returns (state rows [m], the new states [m, *shape] per layer and array, the
    pairs written after each offset's own repeats are merged; 0 when nothing is)."""
    start, left, right = windows[:, WIN_START], windows[:, WIN_LEFT], windows[:, WIN_RIGHT]
    snum = windows[:, WIN_STATE]
    targets, picks, written = [], [], 0
    for i, o in enumerate(offsets):
        srow = lanes * state_slots + (snum + o // period) % state_slots
        ok = live & (o >= left) & (o < right) & (state_pos[srow] == start + o)
        if not ok.any():
            continue
        rows = np.flatnonzero(ok)
        # Last row wins: numpy does not promise an order for repeated fancy writes.
        target, last = np.unique(srow[rows][::-1], return_index=True)
        rows = rows[::-1][last]
        targets.append(target)
        picks.append((i, rows))
        written += target.size
    if not written:
        return np.empty(0, np.int64), (), 0
    # Across offsets too the last (offset, row) wins: keep each state row's last write only.
    every = np.concatenate(targets)
    target, last = np.unique(every[::-1], return_index=True)
    keep = every.size - 1 - last
    new_states = tuple(
        tuple(np.concatenate([trees[i][a][j][r] for i, r in picks])[keep] for j in range(len(layer)))
        for a, layer in enumerate(trees[0])
    )
    return target, new_states, written
