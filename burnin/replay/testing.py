"""Consistency checks of a SequenceReplay's tables and the listing of its live windows.

:meth:`SequenceReplay.check_invariants` and :meth:`SequenceReplay.live_keys`
call these with the buffer's tables, under its lock; tests call the methods
after every operation.
"""

from __future__ import annotations

import numpy as np

from burnin.replay.kernels import (
    C_SAMPLEABLE,
    LANE_EVICT_AT,
    LANE_HEAD,
    LANE_POS,
    LANE_TAIL,
    NEVER,
    NO_POS,
    WIN_GEN,
    WIN_LEFT,
    WIN_START,
    WIN_STATE,
    WIN_TOUCH,
    Layout,
    Tables,
)
from burnin.sumtree import tree_rebuild

__all__ = ["check_tables", "live_keys"]


def live_keys(t: Tables, lay: Layout) -> np.ndarray:
    """Keys of every sampleable window, lane by lane, oldest first."""
    wpl = lay.windows_per_lane
    slots = np.flatnonzero(t.alive)
    lane = slots // wpl
    tail = t.lanes[lane, LANE_TAIL]
    num = tail + (slots - lane * wpl - tail) % wpl
    slots = slots[np.lexsort((num, lane))]
    return t.windows[slots, WIN_GEN] * lay.num_slots + slots


def check_tables(t: Tables, lay: Layout) -> None:
    """Assert that the bookkeeping is consistent (AssertionError naming the broken invariant)."""
    check = t.tree.copy()
    tree_rebuild(check, t.tree_offsets, lay.fanout)
    assert np.array_equal(check, t.tree), "sum-tree sums do not match its leaves"
    leaves = t.tree[: lay.num_slots]
    assert t.counters[C_SAMPLEABLE] == t.alive.sum()
    assert not leaves[~t.alive].any(), "an evicted window keeps a priority"
    for lane in range(t.lanes.shape[0]):
        _check_lane(t, lay, lane)


def _check_lane(t: Tables, lay: Layout, lane: int) -> None:
    wpl, cap, spl = lay.windows_per_lane, lay.capacity, lay.state_slots
    row = t.lanes[lane]
    tail, head = int(row[LANE_TAIL]), int(row[LANE_HEAD])
    assert 0 <= head - tail <= wpl
    slots = lane * wpl + np.arange(tail, head) % wpl
    assert t.alive[slots].all()
    assert t.alive[lane * wpl : (lane + 1) * wpl].sum() == head - tail
    touch = t.windows[slots, WIN_TOUCH]
    assert (np.diff(touch) >= 0).all(), "windows out of FIFO order"
    assert (touch >= max(int(row[LANE_POS]) - cap, 0)).all(), "a live window reads an overwritten step"
    assert row[LANE_EVICT_AT] == (touch[0] if head > tail else NEVER)
    own = t.windows[slots, WIN_LEFT] == 0
    srow = lane * spl + t.windows[slots, WIN_STATE][own] % spl
    assert (t.state_pos[srow] == t.windows[slots, WIN_START][own]).all(), "a live window lost its state"
    kept = t.state_pos[lane * spl : (lane + 1) * spl]
    assert (kept[kept != NO_POS] < row[LANE_POS]).all()
