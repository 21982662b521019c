"""Stored recurrent states as [rows, width] arrays of unsigned integers: the layout the replay's compiled commits copy."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_bits", "flat_rows", "rows_2d", "state_buffers"]


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
