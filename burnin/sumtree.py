"""Batched k-ary sum-tree for proportional prioritised sampling, with numba-compiled kernels."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from burnin._checks import check_int

__all__ = ["SumTree"]


def _level_sizes(capacity: int, fanout: int) -> list[int]:
    """Lengths of the levels, leaves first: each a multiple of ``fanout``, the top exactly ``fanout``."""
    sizes = [max(fanout, -(-capacity // fanout) * fanout)]
    while sizes[-1] > fanout:
        blocks = sizes[-1] // fanout
        sizes.append(max(fanout, -(-blocks // fanout) * fanout))
    return sizes


# The kernels below are shared with burnin.replay.kernels, which update priorities in place on
# SumTree.nodes and SumTree.offsets.
# Every internal node is recomputed as the left-to-right sum of its children, never adjusted by
# a difference: sums do not drift, an all-zero subtree is exactly 0, and a descent that scans
# children left to right reproduces its parent's sum bit for bit.


@numba.njit(cache=True, nogil=True, inline="always")
def _resum(tree: np.ndarray, offsets: np.ndarray, fanout: int, lvl: int, i: int) -> None:
    """Node ``i`` of level ``lvl`` := the left-to-right sum of its children."""
    base = offsets[lvl - 1] + i * fanout
    s = 0.0
    for j in range(fanout):
        s += tree[base + j]
    tree[offsets[lvl] + i] = s


@numba.njit(cache=True, nogil=True)
def tree_set(tree: np.ndarray, offsets: np.ndarray, fanout: int, leaf: int, value: float) -> None:
    """Set one leaf and recompute its ancestors."""
    tree[leaf] = value
    i = leaf
    for lvl in range(1, offsets.size - 1):
        i //= fanout
        _resum(tree, offsets, fanout, lvl, i)


@numba.njit(cache=True, nogil=True)
def tree_set_many(
    tree: np.ndarray, offsets: np.ndarray, fanout: int, leaves: np.ndarray, values: np.ndarray
) -> None:
    """Set leaves in order (a repeated leaf keeps its last value), then recompute each changed ancestor once."""
    if leaves.size == 0:
        return
    for q in range(leaves.size):
        tree[leaves[q]] = values[q]
    nodes = leaves
    for lvl in range(1, offsets.size - 1):
        # Random leaves rarely share a parent, but all share the upper levels: dedupe per level.
        nodes = np.unique(nodes // fanout)
        for i in nodes:
            _resum(tree, offsets, fanout, lvl, i)


@numba.njit(cache=True, nogil=True)
def tree_total(tree: np.ndarray, offsets: np.ndarray, fanout: int) -> float:
    """Sum of all leaves (the top level, summed left to right)."""
    top = offsets[offsets.size - 2]
    s = 0.0
    for j in range(fanout):
        s += tree[top + j]
    return s


@numba.njit(cache=True, nogil=True)
def tree_find(
    tree: np.ndarray, offsets: np.ndarray, fanout: int, targets: np.ndarray, out: np.ndarray
) -> None:
    """For each target u, the leaf with prefix sum <= u < prefix sum + value (always a positive leaf)."""
    levels = offsets.size - 1
    for q in range(targets.size):
        x = targets[q]
        node = 0
        for lvl in range(levels - 1, -1, -1):
            base = offsets[lvl] + node * fanout
            acc = 0.0
            chosen = -1
            last = 0
            last_acc = 0.0
            for j in range(fanout):
                c = tree[base + j]
                if c > 0.0:
                    if x < acc + c:
                        chosen = j
                        break
                    last = j
                    last_acc = acc
                    acc += c
            if chosen < 0:
                # Only when u is at or past the total (r * total rounded up): take the last positive child.
                chosen = last
                acc = last_acc
            x -= acc
            node = node * fanout + chosen
        out[q] = node


@numba.njit(cache=True, nogil=True)
def tree_rebuild(tree: np.ndarray, offsets: np.ndarray, fanout: int) -> None:
    """Recompute every internal node from the leaves."""
    for lvl in range(1, offsets.size - 1):
        below = offsets[lvl - 1]
        for i in range(offsets[lvl + 1] - offsets[lvl]):
            s = 0.0
            if (i + 1) * fanout <= offsets[lvl] - below:
                for j in range(fanout):
                    s += tree[below + i * fanout + j]
            tree[offsets[lvl] + i] = s


class SumTree:
    """Sums of non-negative leaf values in a k-ary tree, updated and searched a batch at a time.

    The levels (leaves first, each above holding the sums of blocks of
    ``fanout`` entries below, the top exactly ``fanout`` entries) live in one
    flat float64 array. A wide fanout keeps the tree shallow (three levels
    above 250 000 leaves at fanout 64), and the compiled kernels make a batch of
    ``B`` updates or searches cost ``O(B · depth · fanout)`` with no Python per
    item.

    ``nodes`` (the flat levels) and ``offsets`` (where each level starts, and
    the end) are public so that compiled kernels elsewhere can update leaves in
    place with :func:`tree_set` and :func:`tree_set_many`; they stay the same
    array objects for the life of the tree.
    """

    def __init__(self, capacity: int, *, fanout: int = 64) -> None:
        self._capacity = check_int("capacity", capacity, minimum=1)
        self._fanout = check_int("fanout", fanout, minimum=2)
        sizes = _level_sizes(self._capacity, self._fanout)
        self.offsets: np.ndarray = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        """int64: start of each level in ``nodes`` (leaves first), then the end."""
        self.nodes: np.ndarray = np.zeros(int(self.offsets[-1]), dtype=np.float64)
        """float64: every level, leaves first, in one flat array."""

    @staticmethod
    def size(capacity: int, fanout: int = 64) -> int:
        """Length of the flat array a tree of this capacity and fanout holds."""
        return sum(_level_sizes(int(capacity), int(fanout)))

    @property
    def capacity(self) -> int:
        """Number of leaves that can hold a value."""
        return self._capacity

    @property
    def fanout(self) -> int:
        """Children per internal node."""
        return self._fanout

    @property
    def nbytes(self) -> int:
        """Bytes held by the tree."""
        return self.nodes.nbytes + self.offsets.nbytes

    def update(self, indices: Any, values: Any) -> None:
        """Set ``leaf[indices] = values`` (finite, >= 0), in order: with repeated indices the last value wins."""
        idx = self._check_indices(indices)
        vals = np.asarray(values)
        if vals.dtype.kind not in "biuf":
            raise TypeError(f"values: expected real numbers, got dtype {vals.dtype}")
        if vals.shape != np.shape(indices):
            raise ValueError(f"values: expected shape {np.shape(indices)} (like indices), got {vals.shape}")
        vals = vals.astype(np.float64).reshape(-1)
        bad = ~np.isfinite(vals) | (vals < 0)
        if bad.any():
            raise ValueError(f"values: expected finite values >= 0, got {vals[bad][:8].tolist()}")
        tree_set_many(self.nodes, self.offsets, self._fanout, idx, vals)

    def values(self, indices: Any = None) -> np.ndarray:
        """Leaf values at ``indices`` (all ``capacity`` leaves when omitted), as a new array."""
        if indices is None:
            return self.nodes[: self._capacity].copy()
        return self.nodes[self._check_indices(indices)]

    def total(self) -> float:
        """Sum of all leaves."""
        return float(tree_total(self.nodes, self.offsets, self._fanout))

    def find(self, targets: Any) -> np.ndarray:
        """For each target ``u`` in ``[0, total)``, the leaf ``i`` with ``sum(leaf[:i]) <= u < sum(leaf[:i+1])``.

        Targets are prefix-sum positions, so ``find(rng.random(n) * total())``
        samples leaves with probability proportional to their values. The found
        leaf always has a positive value.
        """
        u = np.asarray(targets)
        if u.dtype.kind not in "biuf":
            raise TypeError(f"targets: expected real numbers, got dtype {u.dtype}")
        u = u.astype(np.float64).reshape(-1)
        total = self.total()
        if not total > 0:
            raise ValueError("targets: the tree is empty (every leaf is 0), nothing can be found")
        bad = ~np.isfinite(u) | (u < 0) | (u >= total)
        if bad.any():
            raise ValueError(f"targets: expected values in [0, {total}), got {u[bad][:8].tolist()}")
        out = np.empty(u.size, dtype=np.int64)
        tree_find(self.nodes, self.offsets, self._fanout, u, out)
        return out

    def state(self) -> np.ndarray:
        """A copy of the flat tree, for checkpoints; :meth:`set_state` restores it."""
        return self.nodes.copy()

    def set_state(self, tree: Any) -> None:
        """Restore an array from :meth:`state` of a tree with the same capacity and fanout.

        Raises ``ValueError`` if it is not one: wrong length or dtype, negative or
        non-finite values, padding leaves set, or sums that do not match the leaves.
        """
        arr = np.asarray(tree)
        if arr.shape != self.nodes.shape or arr.dtype != np.float64:
            raise ValueError(f"tree: expected float64 {self.nodes.shape}, got {arr.dtype} {arr.shape}")
        if not (np.isfinite(arr).all() and (arr >= 0).all()):
            raise ValueError("tree: expected finite values >= 0")
        if arr[self._capacity : self.offsets[1]].any():
            raise ValueError("tree: padding leaves past capacity must be 0")
        check = np.array(arr, dtype=np.float64, copy=True)
        tree_rebuild(check, self.offsets, self._fanout)
        if not np.array_equal(check, arr):
            raise ValueError("tree: internal sums do not match the leaves")
        self.nodes[:] = check

    def _check_indices(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices: expected integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        bad = (idx < 0) | (idx >= self._capacity)
        if bad.any():
            raise ValueError(
                f"indices: expected values in [0, {self._capacity}), got {idx[bad][:8].tolist()}"
            )
        return idx
