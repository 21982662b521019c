"""Compiled (numba) bookkeeping of SequenceReplay: episodes, windows, evictions and priorities.

The per-step bookkeeping is sequential per lane and touches a few scalars per
lane; as numpy it costs ~100 small array operations per add. These kernels run
it in one compiled call. Observations and states are copied by numpy in the
buffer (windows are read out by :mod:`burnin.replay.gather`). Every kernel takes the buffer's tables as one :class:`Tables` and its
sizes as one :class:`Layout`; the tables are updated in place.

Each mutating method of the buffer checks and prepares everything first and
then makes all its writes in one ``commit_*`` call. Python delivers a
KeyboardInterrupt only between bytecodes, never inside a compiled call, so an
interrupt finds the buffer either before the commit or after it, never half
way (tests/test_faults_replay.py interrupts every bytecode to check this).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from burnin.replay.spec import ReplayConfig
from burnin.sumtree import tree_set, tree_set_many

__all__ = [
    "Layout",
    "Tables",
    "add_steps",
    "close_lanes",
    "commit_add",
    "commit_close",
    "commit_priorities",
    "commit_states",
    "fill",
    "lanes_problem",
    "plan_add",
    "update_priorities",
]

# Bits of the per-step flags byte.
TERMINATED = 1  # the action at this step ended the episode by termination
TRUNCATED = 2  # ... by truncation (time limit, or close_lanes)
FINAL = 4  # this step is the final observation of its episode (no action)
FINAL_TERMINATED = 8  # ... and the episode terminated

# Position of an empty state slot: far below any real position, and below every
# virtual position a left-padded window can compute.
NO_POS = np.int64(-(2**62))
NEVER = np.int64(2**62)

# Columns of the per-lane table (int64 [num_lanes, LANE_COLUMNS]).
LANE_POS = 0  # steps ever written = lane position of the next step
LANE_EP_START = 1  # lane position of the open episode's step 0
LANE_EP_BASE = 2  # state number of the open episode's first state
LANE_NEXT_K = 3  # next window k of the open episode to create
LANE_STATES = 4  # states ever kept = number of the next state
LANE_HEAD = 5  # windows ever created in the lane = number of the next window
LANE_TAIL = 6  # number of the oldest live window
LANE_EVICT_AT = 7  # touch of the oldest live window (NEVER: none)
LANE_OPEN = 8  # 1 while an episode is in progress
LANE_PENDING_FINAL = 9  # 1 when the next add carries the episode's final observation
LANE_PENDING_TERM = 10  # 1 when that episode terminated (rather than was truncated)

# Columns of the window table (int64 [num_lanes * windows_per_lane, WINDOW_COLUMNS]);
# window number w of lane l sits in slot l * windows_per_lane + w % windows_per_lane.
WIN_START = 0  # lane position of window step 0 (before the episode when left-padded)
WIN_LEFT = 1  # left padding steps
WIN_RIGHT = 2  # end of the valid steps, in window steps
WIN_TOUCH = 3  # first lane position the window reads (the step before it, for prev_action)
WIN_STATE = 4  # state number of the state before window step 0 (virtual when padded)
WIN_GEN = 5  # occupant generation of the slot, for keys

# Positions in the counters array (names in burnin.replay.spec.COUNTERS).
C_SAMPLEABLE, C_STEPS, C_EPISODES, C_CREATED, C_EVICTED, C_EARLY = range(6)
C_STALE, C_PRIO, C_STATES, C_SAMPLES = range(6, 10)


class Tables(NamedTuple):
    """The buffer's bookkeeping arrays, as the kernels index them (flat per lane where noted)."""

    lanes: np.ndarray
    """int64 [num_lanes, LANE_COLUMNS]: per-lane pointers (LANE_* columns)."""
    windows: np.ndarray
    """int64 [num_slots, WINDOW_COLUMNS]: per-window-slot layout (WIN_* columns)."""
    alive: np.ndarray
    """bool [num_slots]: the slot holds a sampleable window."""
    action: np.ndarray
    """int32 [num_lanes * capacity]: action of each stored step."""
    reward: np.ndarray
    """float32 [num_lanes * capacity]: reward of each stored step."""
    flags: np.ndarray
    """uint8 [num_lanes * capacity]: TERMINATED | TRUNCATED | FINAL | FINAL_TERMINATED bits."""
    observation: np.ndarray
    """[num_lanes * capacity * obs_size]: every stored observation, flat."""
    state_pos: np.ndarray
    """int64 [num_lanes * state_slots]: lane position of each kept state (NO_POS: empty)."""
    state_owner: np.ndarray
    """int64 [num_lanes * state_slots]: number of the live window whose own state it is (-1: none)."""
    tree: np.ndarray
    """float64: the priority sum-tree's nodes (SumTree.nodes)."""
    tree_offsets: np.ndarray
    """int64: the sum-tree's level offsets (SumTree.offsets)."""
    counters: np.ndarray
    """int64 [len(COUNTERS)]: C_* counters."""
    priority: np.ndarray
    """float64 [2]: the running maximum priority and its priority**alpha, the leaf new windows start with."""


class Layout(NamedTuple):
    """The sizes the kernels read."""

    capacity: int
    windows_per_lane: int
    state_slots: int
    burn_in: int
    period: int
    unroll: int
    n_step: int
    length: int
    first_own_window: int
    """First window k of an episode whose burn-in starts inside the episode: ceil(burn_in / period)."""
    fanout: int
    num_slots: int

    @classmethod
    def of(cls, config: ReplayConfig, *, fanout: int) -> Layout:
        """The sizes of a buffer with ``config`` whose sum-tree has ``fanout``."""
        spec = config.spec
        return cls(
            capacity=config.lane_capacity,
            windows_per_lane=config.windows_per_lane,
            state_slots=config.state_slots_per_lane,
            burn_in=spec.burn_in,
            period=spec.period,
            unroll=spec.unroll,
            n_step=spec.n_step,
            length=spec.length,
            first_own_window=-(-spec.burn_in // spec.period),
            fanout=fanout,
            num_slots=config.num_lanes * config.windows_per_lane,
        )


@numba.njit(cache=True, nogil=True)
def fill(view, value):
    """view[:] = value, inside compiled code."""
    for y in range(view.size):
        view[y] = value


@numba.njit(cache=True, nogil=True)
def _evict_oldest(lane, early, t, lay):
    wpl = lay.windows_per_lane
    tail = t.lanes[lane, LANE_TAIL]
    slot = lane * wpl + tail % wpl
    t.alive[slot] = False
    tree_set(t.tree, t.tree_offsets, lay.fanout, slot, 0.0)
    tail += 1
    t.lanes[lane, LANE_TAIL] = tail
    if tail < t.lanes[lane, LANE_HEAD]:
        t.lanes[lane, LANE_EVICT_AT] = t.windows[lane * wpl + tail % wpl, WIN_TOUCH]
    else:
        t.lanes[lane, LANE_EVICT_AT] = NEVER
    t.counters[C_SAMPLEABLE] -= 1
    t.counters[C_EVICTED] += 1
    if early:
        t.counters[C_EARLY] += 1


@numba.njit(cache=True, nogil=True)
def _create_window(lane, k, right, t, lay, leaf):
    wpl, spl = lay.windows_per_lane, lay.state_slots
    lanes, win = t.lanes, t.windows
    sp = k * lay.period - lay.burn_in  # episode step of window step 0
    ep_start = lanes[lane, LANE_EP_START]
    start = ep_start + sp
    snum = lanes[lane, LANE_EP_BASE] + k - lay.first_own_window
    sslot = lane * spl + snum % spl
    if sp >= 0 and t.state_pos[sslot] != start:
        # Its state was overwritten before the window was complete: the state ring is too small.
        t.counters[C_EARLY] += 1
        return
    if lanes[lane, LANE_HEAD] - lanes[lane, LANE_TAIL] >= wpl:
        _evict_oldest(lane, True, t, lay)
    num = lanes[lane, LANE_HEAD]
    slot = lane * wpl + num % wpl
    touch = start - 1 if sp > 0 else ep_start
    win[slot, WIN_START] = start
    win[slot, WIN_LEFT] = max(-sp, 0)
    win[slot, WIN_RIGHT] = right
    win[slot, WIN_TOUCH] = touch
    win[slot, WIN_STATE] = snum
    win[slot, WIN_GEN] += 1
    t.alive[slot] = True
    if sp >= 0:
        t.state_owner[sslot] = num
    tree_set(t.tree, t.tree_offsets, lay.fanout, slot, leaf)
    if lanes[lane, LANE_TAIL] == num:
        lanes[lane, LANE_EVICT_AT] = touch
    lanes[lane, LANE_HEAD] = num + 1
    t.counters[C_SAMPLEABLE] += 1
    t.counters[C_CREATED] += 1


@numba.njit(cache=True, nogil=True)
def _keep_state(lane, pos, t, lay):
    spl = lay.state_slots
    num = t.lanes[lane, LANE_STATES]
    slot = lane * spl + num % spl
    owner = t.state_owner[slot]
    # A live window still reads the state about to be overwritten: the state ring filled
    # before the step ring. Evict up to that window, oldest first.
    while owner >= 0 and t.lanes[lane, LANE_TAIL] <= owner:
        _evict_oldest(lane, True, t, lay)
    t.state_pos[slot] = pos
    t.state_owner[slot] = -1
    t.lanes[lane, LANE_STATES] = num + 1
    return slot


@numba.njit(cache=True, nogil=True)
def _end_episode(lane, T, t, lay, leaf):
    """The final observation of the lane's open episode is at episode step T: create its last windows, close it."""
    P, b, L, spl = lay.period, lay.burn_in, lay.length, lay.state_slots
    lanes = t.lanes
    K = (T - 1) // P if T >= 1 else -1  # last window of the episode
    for k in range(lanes[lane, LANE_NEXT_K], K + 1):
        right = min(T - (k * P - b) + 1, L)
        _create_window(lane, k, right, t, lay, leaf)
    # States kept for windows that never came to exist (their trained start is past T-1) are released.
    keep_to = lanes[lane, LANE_EP_BASE] + max(K - lay.first_own_window + 1, 0)
    for num in range(keep_to, lanes[lane, LANE_STATES]):
        slot = lane * spl + num % spl
        t.state_pos[slot] = NO_POS
        t.state_owner[slot] = -1
    lanes[lane, LANE_STATES] = min(lanes[lane, LANE_STATES], keep_to)
    lanes[lane, LANE_OPEN] = 0
    lanes[lane, LANE_PENDING_FINAL] = 0
    lanes[lane, LANE_PENDING_TERM] = 0
    t.counters[C_EPISODES] += 1


@numba.njit(cache=True, nogil=True)
def lanes_problem(lanes, seen):
    """0 if every lane id is in range and distinct, 1 if one is out of range, 2 if one repeats."""
    for i in range(lanes.size):
        if lanes[i] < 0 or lanes[i] >= seen.size:
            return 1
    for i in range(lanes.size):
        if seen[lanes[i]]:
            return 2
        seen[lanes[i]] = True
    return 0


@numba.njit(cache=True, nogil=True)
def plan_add(lanes, ends, lane_table, lay, rows_out):
    """Without writing: count rows that wrongly end an episode at its final observation, list rows that keep a state."""
    b, P = lay.burn_in, lay.period
    bad = 0
    m = 0
    for i in range(lanes.size):
        lane = lanes[i]
        if lane_table[lane, LANE_PENDING_FINAL] != 0:
            if ends[i]:
                bad += 1
            continue
        e = (
            lane_table[lane, LANE_POS] - lane_table[lane, LANE_EP_START]
            if lane_table[lane, LANE_OPEN] != 0
            else 0
        )
        if (e + b) % P == 0:
            rows_out[m] = i
            m += 1
    return bad, m


@numba.njit(cache=True, nogil=True)
def add_steps(lanes, action, reward, terminated, truncated, t, lay, leaf, flat_out, state_slot_out):
    """Store one step per lane (all but the observation and states, which the caller copies at
    ``flat_out`` and ``state_slot_out``); returns how many rows keep a state."""
    cap, b, P = lay.capacity, lay.burn_in, lay.period
    last_step = lay.unroll + lay.n_step - 1  # window k is complete when step k·P - b + L - 1 arrives
    lt = t.lanes
    m = 0
    for i in range(lanes.size):
        lane = lanes[i]
        pos = lt[lane, LANE_POS]
        if lt[lane, LANE_OPEN] == 0:
            lt[lane, LANE_OPEN] = 1
            lt[lane, LANE_EP_START] = pos
            lt[lane, LANE_EP_BASE] = lt[lane, LANE_STATES]
            lt[lane, LANE_NEXT_K] = 0
        e = pos - lt[lane, LANE_EP_START]
        # Windows reading the step about to be overwritten die first (FIFO).
        while lt[lane, LANE_EVICT_AT] <= pos - cap:
            _evict_oldest(lane, False, t, lay)
        f = lane * cap + pos % cap
        flat_out[i] = f
        final = lt[lane, LANE_PENDING_FINAL] != 0
        if final:
            t.action[f] = 0
            t.reward[f] = 0.0
            t.flags[f] = FINAL | (FINAL_TERMINATED if lt[lane, LANE_PENDING_TERM] != 0 else 0)
        else:
            t.action[f] = action[i]
            t.reward[f] = reward[i]
            t.flags[f] = (TERMINATED if terminated[i] else 0) | (TRUNCATED if truncated[i] else 0)
        lt[lane, LANE_POS] = pos + 1
        lt[lane, LANE_PENDING_FINAL] = 1 if (terminated[i] or truncated[i]) else 0
        lt[lane, LANE_PENDING_TERM] = 1 if terminated[i] else 0
        if final:
            _end_episode(lane, e, t, lay, leaf)
            continue
        if (e + b) % P == 0:
            state_slot_out[m] = _keep_state(lane, pos, t, lay)
            m += 1
        c = e - last_step
        if c >= 0 and c % P == 0:
            lt[lane, LANE_NEXT_K] = c // P + 1
            _create_window(lane, c // P, lay.length, t, lay, leaf)
    t.counters[C_STEPS] += lanes.size
    return m


@numba.njit(cache=True, nogil=True)
def close_lanes(lanes, t, lay, leaf):
    """End each lane's open episode at its last stored step, which becomes a truncated final observation."""
    cap = lay.capacity
    lt = t.lanes
    for i in range(lanes.size):
        lane = lanes[i]
        if lt[lane, LANE_OPEN] == 0:
            continue
        last = lt[lane, LANE_POS] - 1
        T = last - lt[lane, LANE_EP_START]
        f = lane * cap + last % cap
        t.action[f] = 0
        t.reward[f] = 0.0
        t.flags[f] = FINAL
        if T >= 1:
            pf = lane * cap + (last - 1) % cap
            t.flags[pf] = (t.flags[pf] & ~TERMINATED & 0xFF) | TRUNCATED
        _end_episode(lane, T, t, lay, leaf)


@numba.njit(cache=True, nogil=True)
def _copy_rows(dst, targets, src):
    """``dst[k][targets[r]] = src[k][r]`` for every array pair ``k`` of two equally long tuples of 2-D arrays."""
    for k in range(len(dst)):
        d = dst[k]
        s = src[k]
        for r in range(targets.size):
            # Plain counters over row views: numba drops the wrap-around checks and vectorises.
            out, row = d[targets[r]], s[r]
            for x in range(row.size):
                out[x] = row[x]


@numba.njit(cache=True, nogil=True)
def commit_add(
    lanes, action, reward, terminated, truncated, t, lay, flat_out, state_slot_out,
    observation, states, actor_states, keep_actor, kept,
):  # fmt: skip
    """Every write of one ``SequenceReplay.add``: the bookkeeping (:func:`add_steps`), the observations
    (``observation`` [n, obs_size]) and the state rows kept now (``kept``: per state array [m, width], in the
    order :func:`plan_add` listed them) into ``states`` (and ``actor_states`` if ``keep_actor``)."""
    m = add_steps(
        lanes, action, reward, terminated, truncated, t, lay, t.priority[1], flat_out, state_slot_out
    )
    width = observation.shape[1]
    for i in range(lanes.size):
        out, row = t.observation[flat_out[i] * width : (flat_out[i] + 1) * width], observation[i]
        for x in range(width):
            out[x] = row[x]
    slots = state_slot_out[: min(m, kept[0].shape[0])]
    _copy_rows(states, slots, kept)
    if keep_actor:
        _copy_rows(actor_states, slots, kept)
    return m


@numba.njit(cache=True, nogil=True)
def commit_close(lanes, t, lay, flat_out, state_slot_out):
    """Every write of ``SequenceReplay.close_lanes``: a zero final observation for each lane whose last add
    terminated its episode, then :func:`close_lanes`."""
    leaf = t.priority[1]
    lt = t.lanes
    ends = np.empty(lanes.size, dtype=np.int64)
    n = 0
    for i in range(lanes.size):
        lane = lanes[i]
        if (
            lt[lane, LANE_OPEN] != 0
            and lt[lane, LANE_PENDING_FINAL] != 0
            and lt[lane, LANE_PENDING_TERM] != 0
        ):
            ends[n] = lane
            n += 1
    if n > 0:
        no = np.zeros(n, dtype=np.bool_)
        add_steps(
            ends[:n], np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.float32), no, no, t, lay, leaf,
            flat_out, state_slot_out,
        )  # fmt: skip
        width = t.observation.size // t.flags.size
        for i in range(n):
            fill(t.observation[flat_out[i] * width : (flat_out[i] + 1) * width], 0)
    close_lanes(lanes, t, lay, leaf)


@numba.njit(cache=True, nogil=True)
def commit_priorities(keys, priorities, leaves, alpha, t, lay):
    """Every write of ``SequenceReplay.update_priorities``: the leaves (:func:`update_priorities`), the
    counters and the running maximum; returns the stale count."""
    stale, largest = update_priorities(keys, priorities, leaves, t, lay)
    t.counters[C_STALE] += stale
    t.counters[C_PRIO] += keys.size - stale
    if largest > t.priority[0]:
        t.priority[0] = largest
        t.priority[1] = largest**alpha
    return stale


@numba.njit(cache=True, nogil=True)
def commit_states(states, targets, rows, counters, written):
    """Every write of ``SequenceReplay.update_states``: ``states[k][targets[r]] = rows[k][r]``, and the counter."""
    _copy_rows(states, targets, rows)
    counters[C_STATES] += written


@numba.njit(cache=True, nogil=True)
def update_priorities(keys, priorities, leaves, t, lay):
    """Apply in order (a repeated key keeps its last priority); return (stale count, largest applied)."""
    num_slots = lay.num_slots
    slots = np.empty(keys.size, dtype=np.int64)
    values = np.empty(keys.size, dtype=np.float64)
    m = 0
    largest = 0.0
    for i in range(keys.size):
        slot = keys[i] % num_slots
        if t.alive[slot] and t.windows[slot, WIN_GEN] == keys[i] // num_slots:
            slots[m] = slot
            values[m] = leaves[i]
            m += 1
            largest = max(largest, priorities[i])
    tree_set_many(t.tree, t.tree_offsets, lay.fanout, slots[:m], values[:m])
    return keys.size - m, largest
