"""The invariants of a SequenceReplay: what its tables, stored values and lane registry must satisfy.

:func:`table_problem` and :func:`data_problem`, with the lane registry's
:func:`burnin.replay.lanes.registry_problem`, say what is inconsistent (``None``
when nothing is). They are production checks, the definition of a valid buffer:
:meth:`SequenceReplay.load` refuses a checkpoint that breaks one, so a crafted
file can never make a kernel index out of bounds, and
:meth:`SequenceReplay.check_invariants` asserts them. Every check is vectorised.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from burnin._checks import fmt
from burnin.replay.kernels import (
    C_CREATED,
    C_EVICTED,
    C_SAMPLEABLE,
    C_STEPS,
    FINAL,
    FINAL_TERMINATED,
    LANE_EP_BASE,
    LANE_EP_START,
    LANE_EVICT_AT,
    LANE_HEAD,
    LANE_NEXT_K,
    LANE_OPEN,
    LANE_PENDING_FINAL,
    LANE_PENDING_TERM,
    LANE_POS,
    LANE_STATES,
    LANE_TAIL,
    NEVER,
    NO_POS,
    TERMINATED,
    TRUNCATED,
    WIN_GEN,
    WIN_LEFT,
    WIN_RIGHT,
    WIN_START,
    WIN_STATE,
    WIN_TOUCH,
    Layout,
    Tables,
)
from burnin.replay.spec import COUNTERS, LANE_COLUMNS
from burnin.sumtree import tree_rebuild

__all__ = [
    "LIMIT",
    "TOTAL_LIMIT",
    "check_tables",
    "data_problem",
    "table_problem",
]

LIMIT = 2**60
"""Bound on every position, number and counter: keys and sums of them stay far inside int64."""
TOTAL_LIMIT = float(np.finfo(np.float64).max) / 2
"""Bound on the sum of all leaves of the priority tree (window slots × the largest leaf), so it stays finite."""

LANE_NAMES = (
    "pos", "episode_start", "episode_base", "next_k", "states", "head", "tail", "evict_at", "open",
    "pending_final", "pending_terminated",
)  # fmt: skip
"""Names of the lane table's columns (LANE_* in burnin.replay.kernels), for messages."""
WINDOW_NAMES = ("start", "left", "right", "touch", "state", "generation")
"""Names of the window table's columns (WIN_* in burnin.replay.kernels), for messages."""
VALID_FLAGS = np.array([0, TERMINATED, TRUNCATED, TERMINATED | TRUNCATED, FINAL, FINAL | FINAL_TERMINATED])
"""Every flags byte a stored step can hold."""
_CHUNK = 1 << 16


def check_tables(t: Tables, lay: Layout, *, alpha: float) -> None:
    """Assert that the bookkeeping is consistent (AssertionError naming the broken invariant)."""
    problem = table_problem(t, lay, alpha=alpha)
    assert problem is None, problem


class _Problem(Exception):
    pass


def _require(ok: Any, message: str, where: str, ids: Any, values: Any = None) -> None:
    """Raise _Problem naming ``ids[~ok]`` (and ``values[~ok]``) unless ``ok`` holds everywhere."""
    ok = np.asarray(ok)
    if ok.all():
        return
    bad = ~ok
    text = f"{message}, at {where} {fmt(np.asarray(ids)[bad])}"
    if values is not None:
        text += f" (values {fmt(np.asarray(values)[bad])})"
    raise _Problem(text)


def table_problem(t: Tables, lay: Layout, *, alpha: float) -> str | None:
    """What is inconsistent in the tables (lanes, windows, stored-state slots, step flags, counters,
    priorities), or None. Each check relies only on those before it, so it never indexes out of bounds."""
    try:
        _check_lanes(t, lay)
        live = _check_windows(t, lay)
        _check_states(t, lay, live)
        _check_steps(t, lay, live)
        _check_counters(t)
        _check_priorities(t, lay, alpha)
    except _Problem as err:
        return str(err)
    return None


def _check_lanes(t: Tables, lay: Layout) -> None:
    lt = t.lanes
    nl = lt.shape[0]
    ids = np.arange(nl)
    for c in range(LANE_COLUMNS):
        if c != LANE_EVICT_AT:
            col = lt[:, c]
            _require(
                (col >= 0) & (col < LIMIT),
                f"lane table: {LANE_NAMES[c]} outside [0, 2**60)",
                "lanes",
                ids,
                col,
            )
    pos, ep_start, base, next_k = (
        lt[:, LANE_POS],
        lt[:, LANE_EP_START],
        lt[:, LANE_EP_BASE],
        lt[:, LANE_NEXT_K],
    )
    states, head, tail = lt[:, LANE_STATES], lt[:, LANE_HEAD], lt[:, LANE_TAIL]
    is_open, pending, pending_term = lt[:, LANE_OPEN], lt[:, LANE_PENDING_FINAL], lt[:, LANE_PENDING_TERM]
    for c, col in ((LANE_OPEN, is_open), (LANE_PENDING_FINAL, pending), (LANE_PENDING_TERM, pending_term)):
        _require(col <= 1, f"lane table: {LANE_NAMES[c]} is not 0 or 1", "lanes", ids, col)
    _require(
        pending <= is_open, "lane table: pending_final set on a lane without an open episode", "lanes", ids
    )
    _require(
        pending_term <= pending, "lane table: pending_terminated set without pending_final", "lanes", ids
    )
    _require(ep_start <= pos, "lane table: episode_start past pos", "lanes", ids, ep_start)
    _require(
        (is_open == 0) | (ep_start < pos), "lane table: an open episode without a stored step", "lanes", ids
    )
    _require(base <= states, "lane table: episode_base past states", "lanes", ids, base)
    _require(tail <= head, "lane table: tail past head", "lanes", ids, tail)
    _require(
        head - tail <= lay.windows_per_lane,
        "lane table: more live windows than windows_per_lane",
        "lanes",
        ids,
        head - tail,
    )
    # The open episode's counts follow from its length E: states kept at episode steps e with
    # (e + burn_in) % period == 0, and windows created once their last step arrived.
    P = lay.period
    E = pos - ep_start
    r = (-lay.burn_in) % P
    kept = np.where(E > r, (E - r + P - 1) // P, 0)
    last = lay.unroll + lay.n_step - 1
    created = np.where(E - 1 >= last, (E - 1 - last) // P + 1, 0)
    op = is_open == 1
    _require(
        ~op | (states - base == kept),
        f"lane table: an open episode of E steps keeps ceil((E - {r}) / {P}) states",
        "lanes",
        ids,
        states - base,
    )
    _require(
        ~op | (next_k == created),
        "lane table: next_k does not match the open episode's length",
        "lanes",
        ids,
        next_k,
    )


def _check_windows(t: Tables, lay: Layout) -> np.ndarray:
    """Check the window table; return the live slots."""
    wpl, ns, L = lay.windows_per_lane, lay.num_slots, lay.length
    win, alive, lt = t.windows, t.alive, t.lanes
    slot = np.arange(ns)
    lane_of, j = slot // wpl, slot % wpl
    head, tail = lt[lane_of, LANE_HEAD], lt[lane_of, LANE_TAIL]
    num = tail + (j - tail) % wpl  # the window number slot j holds while it is live
    _require(
        alive == (num < head),
        "window_alive: disagrees with the lane table's tail..head",
        "slots",
        slot,
        alive,
    )
    # Window numbers are handed out in order, so slot j of a lane was filled ceil((head - j) / wpl) times.
    gen = np.where(head > j, (head - j + wpl - 1) // wpl, 0)
    _require(
        win[:, WIN_GEN] == gen,
        "window table: generation is not the number of windows the slot held",
        "slots",
        slot,
        win[:, WIN_GEN],
    )
    live = np.flatnonzero(alive)
    w = win[live]
    for c in (WIN_START, WIN_TOUCH, WIN_STATE):
        _require(
            (w[:, c] > -LIMIT) & (w[:, c] < LIMIT),
            f"window table: {WINDOW_NAMES[c]} outside (-2**60, 2**60)",
            "slots",
            live,
            w[:, c],
        )
    start, left, right, touch = w[:, WIN_START], w[:, WIN_LEFT], w[:, WIN_RIGHT], w[:, WIN_TOUCH]
    _require(
        (left >= 0) & (left <= lay.burn_in),
        f"window table: left outside [0, burn_in={lay.burn_in}]",
        "slots",
        live,
        left,
    )
    _require(
        (right > left) & (right <= L), f"window table: right outside (left, length={L}]", "slots", live, right
    )
    _require(
        (touch == start + left) | ((left == 0) & (touch == start - 1)),
        "window table: touch is neither the episode start nor the step before the window",
        "slots",
        live,
        touch,
    )
    lane = live // wpl
    pos = lt[lane, LANE_POS]
    _require(
        touch >= np.maximum(pos - lay.capacity, 0),
        "window table: a live window reads an overwritten step",
        "slots",
        live,
        touch,
    )
    _require(
        start + right <= pos,
        "window table: a live window reads a step not stored yet",
        "slots",
        live,
        start + right,
    )
    _check_window_order(t, lay, live, num[live])
    return live


def _check_window_order(t: Tables, lay: Layout, live: np.ndarray, n: np.ndarray) -> None:
    """Live windows of a lane are in FIFO order, and each lane's evict_at is its oldest window's touch."""
    wpl, win, lt = lay.windows_per_lane, t.windows, t.lanes
    lane, touch = live // wpl, win[live, WIN_TOUCH]
    order = np.lexsort((n, lane))
    same = lane[order][1:] == lane[order][:-1]
    _require(
        ~same | (np.diff(touch[order]) >= 0),
        "window table: windows out of FIFO order",
        "slots",
        live[order][1:],
    )
    lanes_ids = np.arange(lt.shape[0])
    has = lt[:, LANE_HEAD] > lt[:, LANE_TAIL]
    oldest = lanes_ids * wpl + lt[:, LANE_TAIL] % wpl
    _require(
        lt[:, LANE_EVICT_AT] == np.where(has, win[oldest, WIN_TOUCH], NEVER),
        "lane table: evict_at is not the oldest live window's touch",
        "lanes",
        lanes_ids,
        lt[:, LANE_EVICT_AT],
    )


def _check_states(t: Tables, lay: Layout, live: np.ndarray) -> None:
    wpl, spl = lay.windows_per_lane, lay.state_slots
    lt = t.lanes
    nl = lt.shape[0]
    sp, so = t.state_pos.reshape(nl, spl), t.state_owner.reshape(nl, spl)
    rows = np.arange(nl * spl).reshape(nl, spl)
    pos, head, tail, states = (
        lt[:, LANE_POS, None],
        lt[:, LANE_HEAD, None],
        lt[:, LANE_TAIL, None],
        lt[:, LANE_STATES, None],
    )
    _require(
        (sp == NO_POS) | ((sp >= 0) & (sp < pos)),
        "state_pos: neither empty nor a stored lane position",
        "state rows",
        rows,
        sp,
    )
    # State number n sits in slot n % spl; the last spl numbers are in the ring, at rising positions.
    numbers = states - spl + np.arange(spl)
    by_num = np.take_along_axis(sp, numbers % spl, axis=1)
    _require(
        (numbers >= 0) | (by_num == NO_POS), "state_pos: a slot holds a state never kept", "state rows", rows
    )
    kept = by_num != NO_POS
    before = np.maximum.accumulate(np.where(kept, by_num, NO_POS), axis=1)
    rising = ~kept[:, 1:] | (by_num[:, 1:] > before[:, :-1])
    _require(rising, "state_pos: kept states out of order", "state rows", rows[:, 1:])
    _require(
        (so == -1) | ((so >= 0) & (so < head)),
        "state_owner: neither -1 nor a window number of its lane",
        "state rows",
        rows,
        so,
    )
    # A live owner owns this very slot: it has no left padding and its state is this one.
    owned = so >= tail
    lanes2 = np.broadcast_to(np.arange(nl)[:, None], so.shape)
    owner_slot = lanes2 * wpl + np.where(owned, so, 0) % wpl
    own_row = lanes2 * spl + t.windows[owner_slot, WIN_STATE] % spl
    ok = ~owned | ((t.windows[owner_slot, WIN_LEFT] == 0) & (own_row == rows))
    _require(ok, "state_owner: names a live window whose state is elsewhere", "state rows", rows, so)
    # And every live window without left padding owns its state, which sits at its start.
    w = t.windows[live]
    lane = live // wpl
    own = w[:, WIN_LEFT] == 0
    srow = lane * spl + w[:, WIN_STATE] % spl
    tail1 = lt[lane, LANE_TAIL]
    num = tail1 + (live - lane * wpl - tail1) % wpl
    _require(
        ~own | (t.state_pos[srow] == w[:, WIN_START]),
        "window table: a live window lost its state",
        "slots",
        live,
    )
    _require(
        ~own | (t.state_owner[srow] == num),
        "state_owner: a live window's state names another owner",
        "slots",
        live,
    )
    snum = w[:, WIN_STATE]
    s_lane = lt[lane, LANE_STATES]
    _require(
        ~own | ((snum < s_lane) & (snum >= s_lane - spl)),
        "window table: state number outside the lane's ring",
        "slots",
        live,
        snum,
    )


def _check_steps(t: Tables, lay: Layout, live: np.ndarray) -> None:
    cap, wpl, L = lay.capacity, lay.windows_per_lane, lay.length
    flags = t.flags
    _require(
        np.isin(flags, VALID_FLAGS),
        "step_flags: not a valid flags byte",
        "steps",
        np.arange(flags.size),
        flags,
    )
    final = (flags & FINAL) != 0
    _require(
        ~final | ((t.action == 0) & (t.reward == 0)),
        "steps: a final observation with an action or a reward",
        "steps",
        np.arange(flags.size),
    )
    lt = t.lanes
    nl = lt.shape[0]
    pos, ep_start, is_open = lt[:, LANE_POS], lt[:, LANE_EP_START], lt[:, LANE_OPEN] == 1
    lanes_ids = np.arange(nl)
    last = lanes_ids * cap + (pos - 1) % cap
    last_flags = flags[last]
    ended = ~is_open & (pos > 0)
    _require(
        ~ended | ((last_flags & FINAL) != 0),
        "steps: a lane's episode ended without its final observation",
        "lanes",
        lanes_ids,
    )
    ends = (last_flags & (TERMINATED | TRUNCATED)) != 0
    pend = lt[:, LANE_PENDING_FINAL] == 1
    term = lt[:, LANE_PENDING_TERM] == 1
    _require(~is_open | ((ends == pend) & (((last_flags & TERMINATED) != 0) == term) & ((last_flags & FINAL) == 0)),
             "lane table: pending flags disagree with the open episode's last step", "lanes", lanes_ids)  # fmt: skip
    # The open episode's other stored steps neither end it nor are final observations.
    step = max(1, _CHUNK // cap)
    for at in range(0, nl, step):
        ids = lanes_ids[at : at + step]
        p = pos[ids, None] - cap + np.arange(cap)[None, :]
        inside = is_open[ids, None] & (p >= ep_start[ids, None]) & (p < pos[ids, None] - 1)
        grid = flags[ids[:, None] * cap + p % cap]
        _require(
            ~(inside & (grid != 0)).any(axis=1), "steps: an open episode holds an ended step", "lanes", ids
        )
    # A live window's valid steps are one episode: only its last one may be a final observation,
    # and it is one when the window stops short of its length.
    k = np.arange(L)
    for at in range(0, live.size, max(1, _CHUNK // L)):
        s = live[at : at + max(1, _CHUNK // L)]
        w = t.windows[s]
        start, left, right = w[:, WIN_START, None], w[:, WIN_LEFT, None], w[:, WIN_RIGHT, None]
        f = final[(s // wpl)[:, None] * cap + (start + k) % cap]
        valid = (k >= left) & (k < right)
        _require(
            ~(valid & (k < right - 1) & f).any(axis=1),
            "window table: a live window spans two episodes",
            "slots",
            s,
        )
        last_final = np.take_along_axis(f, right - 1, axis=1)[:, 0]
        _require(
            (right[:, 0] == L) | last_final,
            "window table: a window ending early does not end at a final observation",
            "slots",
            s,
        )
        # The step before it (read for prev_action when the window starts inside its episode) is of it too.
        before = (s // wpl) * cap + (start[:, 0] - 1) % cap
        inner = w[:, WIN_TOUCH] == start[:, 0] - 1
        _require(
            ~inner | ~final[before],
            "window table: a live window's previous step is another episode's final observation",
            "slots",
            s,
        )


def _check_counters(t: Tables) -> None:
    c, lt = t.counters, t.lanes
    _require((c >= 0) & (c < LIMIT), "counters: outside [0, 2**60)", "counters", np.array(COUNTERS), c)
    for index, value, what in (
        (C_SAMPLEABLE, int(t.alive.sum()), "the live windows"),
        (C_STEPS, int(lt[:, LANE_POS].sum()), "the lanes' pos"),
        (C_CREATED, int(lt[:, LANE_HEAD].sum()), "the lanes' head"),
        (C_EVICTED, int(lt[:, LANE_TAIL].sum()), "the lanes' tail"),
    ):
        if c[index] != value:
            raise _Problem(f"counters: {COUNTERS[index]} is {c[index]}, but {what} count {value}")


def _check_priorities(t: Tables, lay: Layout, alpha: float) -> None:
    nodes, offsets, ns = t.tree, t.tree_offsets, lay.num_slots
    top, leaf_max = t.priority
    if not (np.isfinite(top) and top >= 1.0):
        raise _Problem(
            f"max_priority: expected a finite number >= 1 (the running maximum starts at 1), got {top}"
        )
    if not (np.isfinite(leaf_max) and 0 < leaf_max and leaf_max * ns <= TOTAL_LIMIT * (1 + 1e-9)):
        raise _Problem(
            f"max_priority: {top}**alpha (alpha={alpha}) = {leaf_max} times {ns} window slots must stay below "
            f"{TOTAL_LIMIT:.4g}"
        )
    if not np.isclose(leaf_max, top**alpha, rtol=1e-12, atol=0):
        raise _Problem(f"max_priority: its leaf {leaf_max} is not {top}**{alpha}")
    _require(
        np.isfinite(nodes) & (nodes >= 0),
        "tree: expected finite values >= 0",
        "nodes",
        np.arange(nodes.size),
        nodes,
    )
    _require(
        nodes[ns : offsets[1]] == 0,
        "tree: padding leaves past the window slots must be 0",
        "nodes",
        np.arange(ns, offsets[1]),
    )
    check = nodes.copy()
    tree_rebuild(check, offsets, lay.fanout)
    _require(
        check == nodes, "tree: internal sums do not match the leaves", "nodes", np.arange(nodes.size), nodes
    )
    leaves = nodes[:ns]
    _require(
        t.alive | (leaves == 0), "tree: an evicted window keeps a priority", "slots", np.arange(ns), leaves
    )
    _require(
        leaves <= leaf_max * (1 + 1e-12),
        f"tree: a leaf above max_priority**alpha = {leaf_max}",
        "slots",
        np.arange(ns),
        leaves,
    )


def data_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What stored value is not finite (rewards, floating observations, stored states), or None."""
    for name, arr in arrays.items():
        if arr.dtype.kind != "f" or name == "tree":
            continue
        flat = arr.reshape(arr.shape[0], -1)
        for at in range(0, flat.shape[0], max(1, _CHUNK // max(1, flat.shape[1]))):
            part = flat[at : at + max(1, _CHUNK // max(1, flat.shape[1]))]
            finite = np.isfinite(part)
            if not finite.all():
                rows = at + np.flatnonzero(~finite.all(axis=1))
                return f"{name}: expected finite values, got NaN or inf in rows {fmt(rows)}"
    return None
