"""SequenceReplay: R2D2 windows read by index from steps stored once per lane, with stored states and priorities."""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np

from burnin.sumtree import SumTree, tree_find, tree_rebuild, tree_set, tree_set_many

__all__ = [
    "FORMAT_VERSION",
    "RecurrentState",
    "ReplayConfig",
    "SequenceBatch",
    "SequenceReplay",
    "SequenceSpec",
]

# Same alias as burnin.state.RecurrentState; redefined so this module stays numpy-only.
RecurrentState = tuple[tuple[np.ndarray, ...], ...]

FORMAT_VERSION = 1
"""Checkpoint format written by :meth:`SequenceReplay.save`; :meth:`SequenceReplay.load` reads only this one."""

# Bits of the per-step flags byte.
_TERMINATED = 1  # the action at this step ended the episode by termination
_TRUNCATED = 2  # ... by truncation (time limit, or close_lanes)
_FINAL = 4  # this step is the final observation of its episode (no action)
_FINAL_TERMINATED = 8  # ... and the episode terminated

# Position of an empty state slot: far below any real position, and below every
# virtual position a left-padded window can compute.
_NO_POS = np.int64(-(2**62))
_NEVER = np.int64(2**62)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value: Any, *, minimum: float) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= minimum):
        raise ValueError(f"{name}: expected a finite float >= {minimum}, got {value}")
    return float(value)


def _check_shape(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(_is_int(d) and d >= 1 for d in value):
        raise ValueError(f"{name}: expected a tuple of ints >= 1, got {value!r}")
    return tuple(int(d) for d in value)


def _int_vector(name: str, value: Any, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer {what}, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of {what}, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _fmt(values: np.ndarray, limit: int = 8) -> str:
    flat = np.asarray(values).reshape(-1)
    text = str(flat[:limit].tolist())
    return text if flat.size <= limit else f"{text[:-1]}, ... ({flat.size} in all)]"


@dataclass(frozen=True)
class SequenceSpec:
    """How each episode is cut into overlapping windows (R2D2: burn_in 40, unroll 80, period 40, n_step 5)."""

    burn_in: int
    """Steps before the trained part, run without gradient (>= 0)."""
    unroll: int
    """Trained steps per window (>= 1)."""
    period: int
    """Distance between the trained starts of consecutive windows of an episode (1 <= period <= unroll)."""
    n_step: int
    """Lookahead steps after the trained part, for n-step targets (>= 1)."""

    def __post_init__(self) -> None:
        for name, minimum in (("burn_in", 0), ("unroll", 1), ("period", 1), ("n_step", 1)):
            object.__setattr__(self, name, _check_int(name, getattr(self, name), minimum=minimum))
        if self.period > self.unroll:
            raise ValueError(
                f"period: expected <= unroll={self.unroll} (a larger period would leave steps "
                f"that no window trains on), got {self.period}"
            )

    @property
    def length(self) -> int:
        """Steps per window: ``burn_in + unroll + n_step``."""
        return self.burn_in + self.unroll + self.n_step


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    """Everything that fixes the layout of a :class:`SequenceReplay` (saved in its checkpoints)."""

    spec: SequenceSpec
    """How episodes are cut into windows."""
    num_lanes: int
    """Number of writers, one per environment row (>= 1)."""
    lane_capacity: int
    """Steps kept per lane, FIFO (>= spec.length + 1: a window also reads the step before it)."""
    obs_shape: tuple[int, ...]
    """Shape of one observation, without batch."""
    obs_dtype: np.dtype
    """Dtype observations are stored in."""
    state_shapes: tuple[tuple[tuple[int, ...], ...], ...]
    """Per stateful layer, per state array, its shape without batch; () for a network without state."""
    state_dtype: np.dtype
    """Dtype stored states are kept in (floating)."""
    alpha: float
    """Priority exponent: windows are sampled with probability proportional to priority**alpha."""
    beta: float
    """Importance-sampling exponent of the weights (N·P)**-beta."""
    windows_per_lane: int | None = None
    """Window slots per lane; ``None`` at construction means 2·ceil(C/period) + ceil(burn_in/period) + 2."""
    keep_actor_states: bool = False
    """Also keep the actor's original states, which :meth:`SequenceReplay.update_states` never overwrites
    (for ΔQ against the actor's state when states are refreshed); doubles the state memory."""

    def __post_init__(self) -> None:
        if not isinstance(self.spec, SequenceSpec):
            raise TypeError(f"spec: expected a SequenceSpec, got {type(self.spec).__name__}")
        spec = self.spec
        _check_int("num_lanes", self.num_lanes, minimum=1)
        _check_int("lane_capacity", self.lane_capacity, minimum=1)
        if self.lane_capacity < spec.length + 1:
            raise ValueError(
                f"lane_capacity: expected >= spec.length + 1 = {spec.length + 1} (a whole window and the "
                f"step before it), got {self.lane_capacity}"
            )
        object.__setattr__(self, "num_lanes", int(self.num_lanes))
        object.__setattr__(self, "lane_capacity", int(self.lane_capacity))
        object.__setattr__(self, "obs_shape", _check_shape("obs_shape", self.obs_shape))
        try:
            obs_dtype = np.dtype(self.obs_dtype)
            state_dtype = np.dtype(self.state_dtype)
        except TypeError as err:
            raise TypeError(f"obs_dtype/state_dtype: expected numpy dtypes ({err})") from None
        if obs_dtype.kind not in "biuf":
            raise TypeError(f"obs_dtype: expected a bool, integer or floating dtype, got {obs_dtype}")
        if state_dtype.kind != "f":
            raise TypeError(f"state_dtype: expected a floating dtype, got {state_dtype}")
        object.__setattr__(self, "obs_dtype", obs_dtype)
        object.__setattr__(self, "state_dtype", state_dtype)
        shapes = self.state_shapes
        if not isinstance(shapes, (tuple, list)) or not all(
            isinstance(layer, (tuple, list)) and len(layer) >= 1 for layer in shapes
        ):
            raise ValueError(
                "state_shapes: expected a tuple with, per stateful layer, a non-empty tuple of array "
                f"shapes without batch, e.g. (((512,), (512,)),) for one LSTM; got {shapes!r}"
            )
        object.__setattr__(
            self,
            "state_shapes",
            tuple(
                tuple(_check_shape(f"state_shapes[{i}][{j}]", s) for j, s in enumerate(layer))
                for i, layer in enumerate(shapes)
            ),
        )
        if not isinstance(self.keep_actor_states, (bool, np.bool_)):
            raise TypeError(
                f"keep_actor_states: expected a bool, got {type(self.keep_actor_states).__name__}"
            )
        object.__setattr__(self, "keep_actor_states", bool(self.keep_actor_states))
        object.__setattr__(self, "alpha", _check_float("alpha", self.alpha, minimum=0.0))
        object.__setattr__(self, "beta", _check_float("beta", self.beta, minimum=0.0))
        least = -(-(spec.unroll + spec.n_step) // spec.period) + 1
        if self.windows_per_lane is None:
            cap, per = self.lane_capacity, spec.period
            object.__setattr__(self, "windows_per_lane", 2 * -(-cap // per) + -(-spec.burn_in // per) + 2)
        else:
            _check_int("windows_per_lane", self.windows_per_lane, minimum=least)
            object.__setattr__(self, "windows_per_lane", int(self.windows_per_lane))

    @property
    def state_slots_per_lane(self) -> int:
        """Stored-state slots per lane: ceil(C/period) + 2 with a burn-in, else one per window slot.

        With ``burn_in >= 1`` the states of one episode sit ``period`` steps apart,
        none in its last ``burn_in`` steps, and states of windows that never came
        to exist are released when the episode ends; so the states that windows
        with stored steps can still need are at most ceil(C/period) + 2 (one more
        for each of the oldest and the open episode). With ``burn_in == 0``
        every window, even one of a 1-step episode, has its own state.
        """
        if self.spec.burn_in == 0:
            return self.windows_per_lane
        return -(-self.lane_capacity // self.spec.period) + 2

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form, for checkpoints."""
        return {
            "spec": [self.spec.burn_in, self.spec.unroll, self.spec.period, self.spec.n_step],
            "num_lanes": self.num_lanes,
            "lane_capacity": self.lane_capacity,
            "obs_shape": list(self.obs_shape),
            "obs_dtype": self.obs_dtype.str,
            "state_shapes": [[list(s) for s in layer] for layer in self.state_shapes],
            "state_dtype": self.state_dtype.str,
            "alpha": self.alpha,
            "beta": self.beta,
            "windows_per_lane": self.windows_per_lane,
            "keep_actor_states": self.keep_actor_states,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplayConfig:
        """Inverse of :meth:`to_json` (validated again)."""
        return cls(
            spec=SequenceSpec(*data["spec"]),
            num_lanes=data["num_lanes"],
            lane_capacity=data["lane_capacity"],
            obs_shape=tuple(data["obs_shape"]),
            obs_dtype=np.dtype(data["obs_dtype"]),
            state_shapes=tuple(tuple(tuple(s) for s in layer) for layer in data["state_shapes"]),
            state_dtype=np.dtype(data["state_dtype"]),
            alpha=data["alpha"],
            beta=data["beta"],
            windows_per_lane=data["windows_per_lane"],
            keep_actor_states=data.get("keep_actor_states", False),
        )


class SequenceBatch(NamedTuple):
    """A batch of ``B`` windows of ``L = spec.length`` steps each, gathered from the stored steps."""

    observation: np.ndarray
    """[B, L, *obs_shape] obs_dtype: observation at step t; 0 where invalid."""
    action: np.ndarray
    """[B, L] int32: action taken at step t (0 where none: the final observation and invalid steps)."""
    reward: np.ndarray
    """[B, L] float32: reward of the action at t (0 where none)."""
    discount: np.ndarray
    """[B, L] float32: 0 if the action at t terminated the episode, else 1 (truncation: 1); 0 where no action."""
    prev_action: np.ndarray
    """[B, L] int32: action at t-1 in the same episode (0 at the episode's first step and where invalid)."""
    prev_reward: np.ndarray
    """[B, L] float32: reward of the action at t-1 (0 at the episode's first step and where invalid)."""
    state: RecurrentState
    """Stored state before window step 0, arrays [B, *shape]; zeros where step 0 is left padding."""
    mask: np.ndarray
    """[B, L] bool: step t exists in the episode (the final observation included)."""
    learn_mask: np.ndarray
    """[B, L] bool: t in [burn_in, burn_in + unroll) and step t has an action."""
    final: np.ndarray
    """[B, L] bool: step t is the final observation of its episode (terminated or truncated): it has no action."""
    terminal: np.ndarray
    """[B, L] bool: step t is the final observation of a terminated episode."""
    keys: np.ndarray
    """[B] int64: window keys, for update_priorities and update_states."""
    probabilities: np.ndarray
    """[B] float64: probability with which each window was drawn."""
    weights: np.ndarray
    """[B] float32: importance weights (N·P)**-beta divided by their maximum over the batch."""
    extra_states: tuple[RecurrentState, ...]
    """Per requested extra offset, the stored state before that window step; zeros where unavailable."""
    extra_state_mask: np.ndarray
    """[B, K] bool: the stored state at extra offset k exists."""
    actor_state: RecurrentState
    """Like ``state``, but the actor's original state even after a refresh (the same arrays
    as ``state`` unless the replay keeps actor states)."""
    extra_actor_states: tuple[RecurrentState, ...]
    """Like ``extra_states``, but the actor's original states even after a refresh."""


def _encode_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, dict):
        return {k: _encode_json(v) for k, v in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _decode_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
        return {k: _decode_json(v) for k, v in value.items()}
    return value


@functools.cache
def _iinfo(dtype: np.dtype) -> np.iinfo:
    return np.iinfo(dtype)


_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")


# --- compiled kernels ------------------------------------------------------------------------
# The per-step bookkeeping (episodes, windows, evictions, priorities) is sequential per lane
# and touches a few scalars per lane; as numpy it costs ~100 small array operations per add.
# These kernels run it in one compiled call. Observations and states are copied by numpy.

# Columns of the per-lane table (int64 [num_lanes, _LANE_COLS]).
_L_POS = 0  # steps ever written = lane position of the next step
_L_EP_START = 1  # lane position of the open episode's step 0
_L_EP_BASE = 2  # state number of the open episode's first state
_L_NEXT_K = 3  # next window k of the open episode to create
_L_SCOUNT = 4  # states ever kept = number of the next state
_L_HEAD = 5  # windows ever created in the lane = number of the next window
_L_TAIL = 6  # number of the oldest live window
_L_EVICT_AT = 7  # touch of the oldest live window (_NEVER: none)
_L_OPEN = 8  # 1 while an episode is in progress
_L_PFINAL = 9  # 1 when the next add carries the episode's final observation
_L_PTERM = 10  # 1 when that episode terminated (rather than was truncated)
_LANE_COLS = 11

# Columns of the window table (int64 [num_lanes * windows_per_lane, _WIN_COLS]);
# window number w of lane lane sits in slot lane * windows_per_lane + w % windows_per_lane.
_W_START = 0  # lane position of window step 0 (before the episode when left-padded)
_W_LEFT = 1  # left padding steps
_W_RIGHT = 2  # end of the valid steps, in window steps
_W_TOUCH = 3  # first lane position the window reads (the step before it, for prev_action)
_W_STATE = 4  # state number of the state before window step 0 (virtual when padded)
_W_GEN = 5  # occupant generation of the slot, for keys
_WIN_COLS = 6

_COUNTERS = (
    "num_sampleable",
    "steps_added",
    "episodes_completed",
    "windows_created",
    "windows_evicted",
    "early_evictions",
    "stale_updates",
    "priority_updates",
    "state_updates",
    "samples",
)
_C_SAMPLEABLE, _C_STEPS, _C_EPISODES, _C_CREATED, _C_EVICTED, _C_EARLY = range(6)
_C_STALE, _C_PRIO, _C_STATES, _C_SAMPLES = range(6, 10)

# Sizes the kernels read (int64 array).
_P_CAP, _P_WPL, _P_SPL, _P_BURN_IN, _P_PERIOD, _P_UNROLL, _P_NSTEP, _P_LENGTH, _P_K0, _P_FANOUT = range(10)


@numba.njit(cache=True, nogil=True)
def _evict_oldest(lane, early, lt, win, alive, tree, toffs, prm, counters):
    wpl = prm[_P_WPL]
    tail = lt[lane, _L_TAIL]
    slot = lane * wpl + tail % wpl
    alive[slot] = False
    tree_set(tree, toffs, prm[_P_FANOUT], slot, 0.0)
    tail += 1
    lt[lane, _L_TAIL] = tail
    lt[lane, _L_EVICT_AT] = win[lane * wpl + tail % wpl, _W_TOUCH] if tail < lt[lane, _L_HEAD] else _NEVER
    counters[_C_SAMPLEABLE] -= 1
    counters[_C_EVICTED] += 1
    if early:
        counters[_C_EARLY] += 1


@numba.njit(cache=True, nogil=True)
def _create_window(lane, k, right, lt, win, alive, spos, sown, tree, toffs, prm, leaf, counters):
    wpl, spl = prm[_P_WPL], prm[_P_SPL]
    sp = k * prm[_P_PERIOD] - prm[_P_BURN_IN]  # episode step of window step 0
    ep_start = lt[lane, _L_EP_START]
    start = ep_start + sp
    snum = lt[lane, _L_EP_BASE] + k - prm[_P_K0]
    sslot = lane * spl + snum % spl
    if sp >= 0 and spos[sslot] != start:
        # Its state was overwritten before the window was complete: the state ring is too small.
        counters[_C_EARLY] += 1
        return
    if lt[lane, _L_HEAD] - lt[lane, _L_TAIL] >= wpl:
        _evict_oldest(lane, True, lt, win, alive, tree, toffs, prm, counters)
    num = lt[lane, _L_HEAD]
    slot = lane * wpl + num % wpl
    touch = start - 1 if sp > 0 else ep_start
    win[slot, _W_START] = start
    win[slot, _W_LEFT] = max(-sp, 0)
    win[slot, _W_RIGHT] = right
    win[slot, _W_TOUCH] = touch
    win[slot, _W_STATE] = snum
    win[slot, _W_GEN] += 1
    alive[slot] = True
    if sp >= 0:
        sown[sslot] = num
    tree_set(tree, toffs, prm[_P_FANOUT], slot, leaf)
    if lt[lane, _L_TAIL] == num:
        lt[lane, _L_EVICT_AT] = touch
    lt[lane, _L_HEAD] = num + 1
    counters[_C_SAMPLEABLE] += 1
    counters[_C_CREATED] += 1


@numba.njit(cache=True, nogil=True)
def _keep_state(lane, pos, lt, win, alive, spos, sown, tree, toffs, prm, counters):
    spl = prm[_P_SPL]
    num = lt[lane, _L_SCOUNT]
    slot = lane * spl + num % spl
    owner = sown[slot]
    # A live window still reads the state about to be overwritten: the state ring filled
    # before the step ring. Evict up to that window, oldest first.
    while owner >= 0 and lt[lane, _L_TAIL] <= owner:
        _evict_oldest(lane, True, lt, win, alive, tree, toffs, prm, counters)
    spos[slot] = pos
    sown[slot] = -1
    lt[lane, _L_SCOUNT] = num + 1
    return slot


@numba.njit(cache=True, nogil=True)
def _end_episode(lane, T, lt, win, alive, spos, sown, tree, toffs, prm, leaf, counters):
    """The final observation of lane the lane's open episode is at episode step T: create its last windows, close it."""
    P, b, L, spl = prm[_P_PERIOD], prm[_P_BURN_IN], prm[_P_LENGTH], prm[_P_SPL]
    K = (T - 1) // P if T >= 1 else -1  # last window of the episode
    for k in range(lt[lane, _L_NEXT_K], K + 1):
        right = min(T - (k * P - b) + 1, L)
        _create_window(lane, k, right, lt, win, alive, spos, sown, tree, toffs, prm, leaf, counters)
    # States kept for windows that never came to exist (their trained start is past T-1) are released.
    keep_to = lt[lane, _L_EP_BASE] + max(K - prm[_P_K0] + 1, 0)
    for num in range(keep_to, lt[lane, _L_SCOUNT]):
        slot = lane * spl + num % spl
        spos[slot] = _NO_POS
        sown[slot] = -1
    lt[lane, _L_SCOUNT] = min(lt[lane, _L_SCOUNT], keep_to)
    lt[lane, _L_OPEN] = 0
    lt[lane, _L_PFINAL] = 0
    lt[lane, _L_PTERM] = 0
    counters[_C_EPISODES] += 1


@numba.njit(cache=True, nogil=True)
def _lanes_problem(lanes, seen):
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
def _plan_add(lanes, ends, lt, prm, rows_out):
    """Without writing: count rows that wrongly end an episode at its final observation, list rows that keep a state."""
    b, P = prm[_P_BURN_IN], prm[_P_PERIOD]
    bad = 0
    m = 0
    for i in range(lanes.size):
        lane = lanes[i]
        if lt[lane, _L_PFINAL] != 0:
            if ends[i]:
                bad += 1
            continue
        e = lt[lane, _L_POS] - lt[lane, _L_EP_START] if lt[lane, _L_OPEN] != 0 else 0
        if (e + b) % P == 0:
            rows_out[m] = i
            m += 1
    return bad, m


@numba.njit(cache=True, nogil=True)
def _add_steps(
    lanes,
    act_in,
    rew_in,
    term_in,
    trunc_in,
    lt,
    win,
    alive,
    act,
    rew,
    flags,
    spos,
    sown,
    tree,
    toffs,
    prm,
    leaf,
    counters,
    flat_out,
    sslot_out,
):
    cap, b, P = prm[_P_CAP], prm[_P_BURN_IN], prm[_P_PERIOD]
    last_step = prm[_P_UNROLL] + prm[_P_NSTEP] - 1  # window k is complete when step k·P - b + L - 1 arrives
    m = 0
    for i in range(lanes.size):
        lane = lanes[i]
        pos = lt[lane, _L_POS]
        if lt[lane, _L_OPEN] == 0:
            lt[lane, _L_OPEN] = 1
            lt[lane, _L_EP_START] = pos
            lt[lane, _L_EP_BASE] = lt[lane, _L_SCOUNT]
            lt[lane, _L_NEXT_K] = 0
        e = pos - lt[lane, _L_EP_START]
        # Windows reading the step about to be overwritten die first (FIFO).
        while lt[lane, _L_EVICT_AT] <= pos - cap:
            _evict_oldest(lane, False, lt, win, alive, tree, toffs, prm, counters)
        f = lane * cap + pos % cap
        flat_out[i] = f
        final = lt[lane, _L_PFINAL] != 0
        if final:
            act[f] = 0
            rew[f] = 0.0
            flags[f] = _FINAL | (_FINAL_TERMINATED if lt[lane, _L_PTERM] != 0 else 0)
        else:
            act[f] = act_in[i]
            rew[f] = rew_in[i]
            flags[f] = (_TERMINATED if term_in[i] else 0) | (_TRUNCATED if trunc_in[i] else 0)
        lt[lane, _L_POS] = pos + 1
        lt[lane, _L_PFINAL] = 1 if (term_in[i] or trunc_in[i]) else 0
        lt[lane, _L_PTERM] = 1 if term_in[i] else 0
        if final:
            _end_episode(lane, e, lt, win, alive, spos, sown, tree, toffs, prm, leaf, counters)
            continue
        if (e + b) % P == 0:
            sslot_out[m] = _keep_state(lane, pos, lt, win, alive, spos, sown, tree, toffs, prm, counters)
            m += 1
        c = e - last_step
        if c >= 0 and c % P == 0:
            lt[lane, _L_NEXT_K] = c // P + 1
            _create_window(
                lane, c // P, prm[_P_LENGTH], lt, win, alive, spos, sown, tree, toffs, prm, leaf, counters
            )
    counters[_C_STEPS] += lanes.size
    return m


@numba.njit(cache=True, nogil=True)
def _close_lanes(lanes, lt, win, alive, act, rew, flags, spos, sown, tree, toffs, prm, leaf, counters):
    cap = prm[_P_CAP]
    for i in range(lanes.size):
        lane = lanes[i]
        if lt[lane, _L_OPEN] == 0:
            continue
        last = lt[lane, _L_POS] - 1
        T = last - lt[lane, _L_EP_START]
        f = lane * cap + last % cap
        act[f] = 0
        rew[f] = 0.0
        flags[f] = _FINAL
        if T >= 1:
            pf = lane * cap + (last - 1) % cap
            flags[pf] = (flags[pf] & ~_TERMINATED & 0xFF) | _TRUNCATED
        _end_episode(lane, T, lt, win, alive, spos, sown, tree, toffs, prm, leaf, counters)


@numba.njit(cache=True, nogil=True)
def _update_priorities(keys, prio, leaves, win, alive, tree, toffs, fanout, num_slots):
    """Apply in order (a repeated key keeps its last priority); return (stale count, largest applied)."""
    slots = np.empty(keys.size, dtype=np.int64)
    values = np.empty(keys.size, dtype=np.float64)
    m = 0
    largest = 0.0
    for i in range(keys.size):
        slot = keys[i] % num_slots
        if alive[slot] and win[slot, _W_GEN] == keys[i] // num_slots:
            slots[m] = slot
            values[m] = leaves[i]
            m += 1
            largest = max(largest, prio[i])
    tree_set_many(tree, toffs, fanout, slots[:m], values[:m])
    return keys.size - m, largest


@numba.njit(cache=True, nogil=True)
def _zero_steps(obs, act, rew, disc, pact, prew, mask, learn, term, width, lo, hi):
    """Fill window steps [lo, hi) of one row with the values of an invalid step."""
    o = obs[lo * width : hi * width]
    for x in range(o.size):
        o[x] = 0
    for arr in (act, pact):
        v = arr[lo:hi]
        for y in range(v.size):
            v[y] = 0
    v = term[lo:hi]
    for y in range(v.size):
        v[y] = 0
    for arr in (rew, disc, prew):
        v = arr[lo:hi]
        for y in range(v.size):
            v[y] = 0.0
    for arr in (mask, learn):
        v = arr[lo:hi]
        for y in range(v.size):
            v[y] = False


@numba.njit(cache=True, nogil=True)
def _gather(
    slots,
    extra,
    win,
    act,
    rew,
    flags,
    obs,
    spos,
    prm,
    num_slots,
    obs_out,
    act_out,
    rew_out,
    disc_out,
    pact_out,
    prew_out,
    mask_out,
    learn_out,
    term_out,
    keys_out,
    srow_out,
    spad_out,
    xrow_out,
    xok_out,
):
    cap, wpl, spl = prm[_P_CAP], prm[_P_WPL], prm[_P_SPL]
    b, u, P, L = prm[_P_BURN_IN], prm[_P_UNROLL], prm[_P_PERIOD], prm[_P_LENGTH]
    width = obs.size // flags.size  # observation values per step
    # Indices are kept to plain loop counters over slice views: numba then drops its
    # negative-index wrap-around check and the copies vectorise (about 4x faster).
    for i in range(slots.size):
        s = slots[i]
        lane = s // wpl
        start, left, right = win[s, _W_START], win[s, _W_LEFT], win[s, _W_RIGHT]
        snum = win[s, _W_STATE]
        keys_out[i] = win[s, _W_GEN] * num_slots + s
        _zero_steps(obs_out[i], act_out[i], rew_out[i], disc_out[i], pact_out[i], prew_out[i],
                    mask_out[i], learn_out[i], term_out[i], width, 0, left)  # fmt: skip
        _zero_steps(obs_out[i], act_out[i], rew_out[i], disc_out[i], pact_out[i], prew_out[i],
                    mask_out[i], learn_out[i], term_out[i], width, right, L)  # fmt: skip
        # The valid steps are contiguous in the lane ring: copy them in at most two runs.
        t = left
        ring = (start + left) % cap
        while t < right:
            run = min(right - t, cap - ring)
            f = lane * cap + ring
            d_obs = obs_out[i, t * width : (t + run) * width]
            s_obs = obs[f * width : (f + run) * width]
            for x in range(d_obs.size):
                d_obs[x] = s_obs[x]
            d_act, d_rew, d_disc = act_out[i, t : t + run], rew_out[i, t : t + run], disc_out[i, t : t + run]
            d_mask, d_learn, d_term = (
                mask_out[i, t : t + run],
                learn_out[i, t : t + run],
                term_out[i, t : t + run],
            )
            s_act, s_rew, s_flags = act[f : f + run], rew[f : f + run], flags[f : f + run]
            learn_lo, learn_hi = b - t, b + u - t
            for y in range(run):
                fl = s_flags[y]
                acts = (fl & _FINAL) == 0
                d_act[y] = s_act[y]
                d_rew[y] = s_rew[y]
                d_disc[y] = 1.0 if acts and (fl & _TERMINATED) == 0 else 0.0
                d_mask[y] = True
                d_learn[y] = acts and learn_lo <= y < learn_hi
                # 0: not a final observation, 1: final of a truncated episode, 2: of a terminated one.
                d_term[y] = ((fl & _FINAL) != 0) + ((fl & _FINAL_TERMINATED) != 0)
            t += run
            ring = 0
        if left < right:
            # prev_action/prev_reward: the step before, when it is in the episode (the first valid
            # step has one only if the window starts after the episode's first step).
            if left == 0 and win[s, _W_TOUCH] < start:
                pf = lane * cap + (start - 1) % cap
                pact_out[i, 0] = act[pf]
                prew_out[i, 0] = rew[pf]
            else:
                pact_out[i, left] = 0
                prew_out[i, left] = 0.0
            d_pact, d_prew = pact_out[i, left + 1 : right], prew_out[i, left + 1 : right]
            s_act, s_rew = act_out[i, left : right - 1], rew_out[i, left : right - 1]
            for y in range(d_pact.size):
                d_pact[y] = s_act[y]
                d_prew[y] = s_rew[y]
        srow_out[i] = lane * spl + snum % spl
        spad_out[i] = left > 0
        for c in range(extra.size):
            o = extra[c]
            row = lane * spl + (snum + o // P) % spl
            xrow_out[i, c] = row
            xok_out[i, c] = left <= o < right and spos[row] == start + o


class SequenceReplay:
    """Prioritised replay of overlapping R2D2 windows over steps stored once, in lanes.

    **Lanes.** One lane per environment row (a vector env of B envs writes lanes
    ``0..B-1``; a remote writer gets its own from :meth:`register_lanes`). Each
    lane is a FIFO ring of ``lane_capacity`` steps. A window is a contiguous run
    of one lane, read by index at :meth:`sample`; overlapping windows share the
    stored steps and are never copied.

    **Step convention** (dm_env style, matched to gymnasium >= 1.0 vector envs with
    the default NEXT_STEP autoreset). The actor calls :meth:`add` once per
    ``env.step``, for every lane it steps, with the observation the action was
    chosen on and the recurrent state *before* the network processed that
    observation::

        obs, _ = envs.reset(seed=0)
        h = zero_state
        while True:
            q, h_next = net(obs, h)                  # h: the state before obs
            a = policy(q)
            next_obs, r, term, trunc, _ = envs.step(a)
            replay.add(lanes, observation=obs, action=a, reward=r,
                       terminated=term, truncated=trunc, states=h)
            obs, h = next_obs, h_next                # reset rows after an autoreset step

    - A normal call stores step t of the lane's episode: ``obs_t``, ``a_t``, the
      reward ``r_t`` of ``a_t``, discount 0 if ``terminated`` else 1, and ``h_t``.
    - When a call has ``terminated`` or ``truncated`` True for a lane, that
      lane's episode is ending. Its **next** call carries the episode's final
      observation: gymnasium returns it from the terminating step, and the
      following ``step()`` is the autoreset step, whose action is ignored and
      whose reward is 0. The replay stores that call's observation as the final
      observation (step T) and ignores its action and reward (stored as 0); its
      ``terminated`` and ``truncated`` must be False (else ``ValueError``). The
      call after that starts a new episode at step 0.
    - Truncation (time limit) still bootstraps from the final observation
      (discount 1); termination sets discount 0.
    - Only the state rows of steps where a window starts its burn-in are kept
      (and checked for NaN); the others are not read.

    **Windows** (``b, u, P, n = burn_in, unroll, period, n_step``, ``L = b+u+n``).
    An episode with actionable steps ``0..T-1`` and final observation ``T`` has
    window ``k`` for each ``k >= 0`` with ``k·P <= T-1``. It covers episode steps
    ``[k·P - b, k·P + u + n)``: steps ``< 0`` are left padding and steps ``> T``
    right padding (``mask`` False, zeros). Its trained part is ``[k·P, k·P + u)``
    (``learn_mask``: those of its steps that have an action), so every
    actionable step is trained on at least once. Its stored state is the actor's
    state at step ``k·P - b``, or zeros when that step is padding. A window never
    mixes episodes. It becomes sampleable as soon as all its L steps are stored
    or its episode's final observation is, whichever comes first, with the
    running maximum priority (1.0 at first).

    **Eviction.** FIFO per lane. A window stops being sampleable as soon as a
    step it reads (including the step before its first one, for ``prev_action``)
    or its stored state is overwritten. Stored states live in a per-lane ring of
    ``config.state_slots_per_lane`` slots and windows in one of
    ``config.windows_per_lane`` slots (by default ``2·ceil(C/P) + ceil(b/P) + 2``
    for ``C = lane_capacity``). If either fills before the step ring does
    (episodes averaging under about ``period / 2`` steps), the oldest window of
    the lane is evicted early and counted in ``stats()["early_evictions"]``.

    **Keys.** ``key = generation · (num_lanes · windows_per_lane) + slot``: a key
    names one occupant of one slot, so updates for a window that has since been
    evicted or replaced are recognised, ignored and counted (``stale_updates``).

    **Threads.** :meth:`add`, :meth:`sample`, :meth:`update_priorities`,
    :meth:`update_states`, :meth:`close_lanes`, :meth:`register_lanes` and
    :meth:`save` may be called from several threads. One lock guards the buffer;
    argument checks run before it is taken. Bad input raises before anything
    is written, so the buffer is unchanged.

    The bookkeeping runs in numba kernels, compiled on first use (a few seconds
    once; cached on disk next to this module afterwards).
    """

    def __init__(
        self,
        spec: SequenceSpec,
        *,
        num_lanes: int,
        lane_capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype: Any = np.float32,
        state_shapes: tuple[tuple[tuple[int, ...], ...], ...],
        state_dtype: Any = np.float32,
        alpha: float = 0.9,
        beta: float = 0.6,
        windows_per_lane: int | None = None,
        keep_actor_states: bool = False,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        config = ReplayConfig(
            spec=spec,
            num_lanes=num_lanes,
            lane_capacity=lane_capacity,
            obs_shape=obs_shape,
            obs_dtype=obs_dtype,
            state_shapes=state_shapes,
            state_dtype=state_dtype,
            alpha=alpha,
            beta=beta,
            windows_per_lane=windows_per_lane,
            keep_actor_states=keep_actor_states,
        )
        if seed is not None and rng is not None:
            raise ValueError("seed, rng: expected at most one of them, got both")
        if rng is not None:
            if not isinstance(rng, np.random.Generator):
                raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
            generator = rng
        else:
            if seed is not None:
                _check_int("seed", seed, minimum=0)
            generator = np.random.default_rng(seed)
        self._setup(config, generator)
        arrays = {name: np.zeros(shape, dtype=dtype) for name, (shape, dtype) in self._array_specs().items()}
        arrays["state_pos"][:] = _NO_POS
        arrays["state_owner"][:] = -1
        arrays["lanes"][:, _L_EVICT_AT] = _NEVER
        self._bind(arrays, max_priority=1.0)

    # -- layout ---------------------------------------------------------------------------

    def _setup(self, config: ReplayConfig, rng: np.random.Generator) -> None:
        spec = config.spec
        self._config = config
        self._spec = spec
        self._rng = rng
        self._lock = threading.Lock()
        self._cap = config.lane_capacity
        self._wpl = config.windows_per_lane
        self._spl = config.state_slots_per_lane
        self._num_slots = config.num_lanes * self._wpl
        self._obs_size = math.prod(config.obs_shape)
        self._tree = SumTree(self._num_slots)
        self._params = np.array(
            [
                self._cap,
                self._wpl,
                self._spl,
                spec.burn_in,
                spec.period,
                spec.unroll,
                spec.n_step,
                spec.length,
                -(-spec.burn_in // spec.period),  # first window whose burn-in starts inside the episode
                self._tree.fanout,
            ],
            dtype=np.int64,
        )
        self._registry: dict[str, list[int]] = {}
        # Scratch for add, reused under the lock: lanes are distinct, so n <= num_lanes.
        self._rows_buf = np.empty(config.num_lanes, dtype=np.int64)
        self._flat_buf = np.empty(config.num_lanes, dtype=np.int64)
        self._sslot_buf = np.empty(config.num_lanes, dtype=np.int64)

    def _array_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Name -> (shape, dtype) of every array the buffer holds (also the checkpoint's contents)."""
        cfg = self._config
        nl, cap, spl = cfg.num_lanes, self._cap, self._spl
        i64 = np.dtype(np.int64)
        specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            "step_observation": ((nl, cap, *cfg.obs_shape), cfg.obs_dtype),
            "step_action": ((nl, cap), np.dtype(np.int32)),
            "step_reward": ((nl, cap), np.dtype(np.float32)),
            "step_flags": ((nl, cap), np.dtype(np.uint8)),
            # Lane position of each kept state (_NO_POS: empty) and the number of the live
            # window that has it as its own state (-1: none yet).
            "state_pos": ((nl, spl), i64),
            "state_owner": ((nl, spl), i64),
            "windows": ((self._num_slots, _WIN_COLS), i64),
            "window_alive": ((self._num_slots,), np.dtype(np.bool_)),
            "lanes": ((nl, _LANE_COLS), i64),
            "counters": ((len(_COUNTERS),), i64),
            "tree": ((SumTree.size(self._num_slots, self._tree.fanout),), np.dtype(np.float64)),
        }
        for i, layer in enumerate(cfg.state_shapes):
            for j, shape in enumerate(layer):
                specs[f"state_{i}_{j}"] = ((nl, spl, *shape), cfg.state_dtype)
                if cfg.keep_actor_states:
                    specs[f"actor_state_{i}_{j}"] = ((nl, spl, *shape), cfg.state_dtype)
        return specs

    def _bind(self, arrays: dict[str, np.ndarray], *, max_priority: float) -> None:
        """Attach the arrays and the flat views the kernels index."""
        cfg = self._config
        nl, cap, spl = cfg.num_lanes, self._cap, self._spl
        self._tree.set_state(arrays.pop("tree"))
        self._arrays = arrays
        self._obs_flat = arrays["step_observation"].reshape(nl * cap, *cfg.obs_shape)
        self._obs1d = arrays["step_observation"].reshape(-1)
        self._act = arrays["step_action"].reshape(-1)
        self._rew = arrays["step_reward"].reshape(-1)
        self._flags = arrays["step_flags"].reshape(-1)
        self._spos = arrays["state_pos"].reshape(-1)
        self._sown = arrays["state_owner"].reshape(-1)
        self._win = arrays["windows"]
        self._alive = arrays["window_alive"]
        self._lt = arrays["lanes"]
        self._counters = arrays["counters"]
        self._states_flat = tuple(
            tuple(arrays[f"state_{i}_{j}"].reshape(nl * spl, *shape) for j, shape in enumerate(layer))
            for i, layer in enumerate(cfg.state_shapes)
        )
        self._actor_states_flat = (
            tuple(
                tuple(
                    arrays[f"actor_state_{i}_{j}"].reshape(nl * spl, *shape) for j, shape in enumerate(layer)
                )
                for i, layer in enumerate(cfg.state_shapes)
            )
            if cfg.keep_actor_states
            else None
        )
        self._set_max_priority(max_priority)

    def _set_max_priority(self, value: float) -> None:
        self._max_priority = float(value)
        self._new_leaf = self._max_priority**self._config.alpha

    # -- properties -----------------------------------------------------------------------

    @property
    def spec(self) -> SequenceSpec:
        """How episodes are cut into windows."""
        return self._spec

    @property
    def config(self) -> ReplayConfig:
        """The full layout: spec, sizes, dtypes, exponents."""
        return self._config

    @property
    def num_lanes(self) -> int:
        """Number of lanes."""
        return self._config.num_lanes

    @property
    def lane_capacity(self) -> int:
        """Steps kept per lane."""
        return self._cap

    @property
    def num_sampleable(self) -> int:
        """Windows that :meth:`sample` can return now."""
        return int(self._counters[_C_SAMPLEABLE])

    @property
    def num_steps(self) -> int:
        """Steps stored now, over all lanes (final observations included)."""
        return int(np.minimum(self._lt[:, _L_POS], self._cap).sum())

    @property
    def stale_updates(self) -> int:
        """Priority updates ignored because their window had been evicted or replaced."""
        return int(self._counters[_C_STALE])

    @property
    def registered_lanes(self) -> dict[str, np.ndarray]:
        """Owner -> lane ids handed out by :meth:`register_lanes`."""
        with self._lock:
            return {k: np.asarray(v, dtype=np.int64) for k, v in self._registry.items()}

    def nbytes(self) -> int:
        """Total bytes of all arrays the buffer holds: steps, states, window and lane tables, sum-tree."""
        return sum(a.nbytes for a in self._arrays.values()) + self._tree.nbytes

    def stats(self) -> dict[str, Any]:
        """Counters and sizes, as plain Python numbers."""
        with self._lock:
            out: dict[str, Any] = {name: int(v) for name, v in zip(_COUNTERS, self._counters)}
            out.update(
                num_steps=self.num_steps,
                num_lanes=self.num_lanes,
                lane_capacity=self._cap,
                windows_per_lane=self._wpl,
                state_slots_per_lane=self._spl,
                open_episodes=int(self._lt[:, _L_OPEN].sum()),
                registered_lanes=sum(len(v) for v in self._registry.values()),
                max_priority=self._max_priority,
                total_priority=self._tree.total(),
                nbytes=self.nbytes(),
            )
        return out

    # -- argument checks (they read no buffer state) ---------------------------------------

    def _check_lanes(self, lanes: Any) -> np.ndarray:
        arr = _int_vector("lanes", lanes, "lane ids")
        problem = _lanes_problem(arr, np.zeros(self.num_lanes, dtype=np.bool_))
        if problem == 1:
            bad = arr[(arr < 0) | (arr >= self.num_lanes)]
            raise ValueError(f"lanes: expected ids in [0, {self.num_lanes}), got {_fmt(bad)}")
        if problem == 2:
            srt = np.sort(arr)
            dup = np.unique(srt[1:][srt[1:] == srt[:-1]])
            raise ValueError(f"lanes: expected each lane at most once, got repeated {_fmt(dup)}")
        return arr

    @staticmethod
    def _check_array(name: str, value: Any, shape: tuple[int, ...], target: np.dtype) -> np.ndarray:
        arr = np.asarray(value)
        kinds = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}[target.kind]
        if arr.dtype.kind not in kinds:
            raise TypeError(f"{name}: expected dtype castable to {target}, got {arr.dtype}")
        if arr.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
        if arr.dtype.kind == "f":
            finite = np.isfinite(arr)
            if not finite.all():
                rows = np.flatnonzero(~finite.reshape(shape[0], -1).all(axis=1))
                raise ValueError(f"{name}: expected finite values, got NaN or inf in rows {_fmt(rows)}")
        elif target.kind in "iu" and arr.dtype != target and arr.size:
            info = _iinfo(target)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise ValueError(
                    f"{name}: expected values in [{info.min}, {info.max}] for {target}, got {lo}..{hi}"
                )
        return arr

    def _check_state_tree(self, name: str, states: Any, batch: int) -> tuple[tuple[np.ndarray, ...], ...]:
        shapes = self._config.state_shapes
        if not shapes:
            if states is None or (isinstance(states, (tuple, list)) and len(states) == 0):
                return ()
            raise ValueError(
                f"{name}: the replay keeps no state (state_shapes=()), got {type(states).__name__}"
            )
        if not isinstance(states, (tuple, list)) or len(states) != len(shapes):
            got = f"{len(states)} entries" if isinstance(states, (tuple, list)) else type(states).__name__
            raise ValueError(
                f"{name}: expected a RecurrentState of {len(shapes)} layer(s) with arrays "
                f"{shapes} (without batch), got {got}"
            )
        out = []
        for i, (layer, entry) in enumerate(zip(shapes, states)):
            if not isinstance(entry, (tuple, list)) or len(entry) != len(layer):
                raise ValueError(
                    f"{name}[{i}]: expected a tuple of {len(layer)} arrays, got {type(entry).__name__}"
                )
            arrays = []
            for j, (shape, value) in enumerate(zip(layer, entry)):
                arr = np.asarray(value)
                if arr.dtype.kind not in "biuf":
                    raise TypeError(f"{name}[{i}][{j}]: expected a floating array, got dtype {arr.dtype}")
                if arr.shape != (batch, *shape):
                    raise ValueError(f"{name}[{i}][{j}]: expected shape {(batch, *shape)}, got {arr.shape}")
                arrays.append(arr)
            out.append(tuple(arrays))
        return tuple(out)

    def _check_offsets(self, name: str, offsets: Any, *, minimum: int) -> np.ndarray:
        if isinstance(offsets, (str, bytes)) or not isinstance(offsets, (Sequence, np.ndarray)):
            raise TypeError(f"{name}: expected a sequence of ints, got {type(offsets).__name__}")
        spec = self._spec
        out = []
        for o in offsets:
            if not _is_int(o):
                raise TypeError(f"{name}: expected ints, got {type(o).__name__} {o!r}")
            if not (minimum <= o < spec.length and o % spec.period == 0):
                raise ValueError(
                    f"{name}: expected multiples of period={spec.period} in [{minimum}, {spec.length}), got {o}"
                )
            out.append(int(o))
        return np.array(out, dtype=np.int64)

    @staticmethod
    def _check_keys(name: str, keys: Any) -> np.ndarray:
        arr = _int_vector(name, keys, "window keys")
        if arr.size and arr.min() < 0:
            raise ValueError(f"{name}: expected keys >= 0, got {_fmt(arr[arr < 0])}")
        return arr

    # -- writing --------------------------------------------------------------------------

    def add(
        self,
        lanes: Any,
        *,
        observation: Any,
        action: Any,
        reward: Any,
        terminated: Any,
        truncated: Any,
        states: RecurrentState | None = None,
    ) -> None:
        """Store one environment step for each of ``lanes`` (convention: see the class docstring).

        Args:
            lanes: int ``[n]``, distinct lane ids.
            observation: ``[n, *obs_shape]``, the observation the action was chosen on.
            action: int ``[n]``, the action taken on it.
            reward: ``[n]``, the reward of that action.
            terminated: bool ``[n]``: the action ended the episode by termination.
            truncated: bool ``[n]``: the action ended the episode by truncation.
            states: the recurrent state before ``observation``, arrays ``[n, *shape]``
                per layer and array; ``None`` when ``state_shapes=()``.
        """
        cfg = self._config
        lanes = self._check_lanes(lanes)
        n = lanes.size
        obs = self._check_array("observation", observation, (n, *cfg.obs_shape), cfg.obs_dtype)
        act = self._check_array("action", action, (n,), np.dtype(np.int32)).astype(np.int32, copy=False)
        rew = self._check_array("reward", reward, (n,), np.dtype(np.float32)).astype(np.float32, copy=False)
        term = self._check_array("terminated", terminated, (n,), np.dtype(np.bool_))
        trunc = self._check_array("truncated", truncated, (n,), np.dtype(np.bool_))
        st = self._check_state_tree("states", states, n)
        if n == 0:
            return
        with self._lock:
            bad, m = _plan_add(lanes, term | trunc, self._lt, self._params, self._rows_buf)
            if bad:
                ending = self._lt[lanes, _L_PFINAL].astype(bool) & (term | trunc)
                raise ValueError(
                    f"terminated/truncated: lanes {_fmt(lanes[ending])} are storing the final observation "
                    "of their episode (their previous add ended it), so both flags must be False there"
                )
            rows = self._rows_buf[:m].copy()
            for i, layer in enumerate(st):
                for j, arr in enumerate(layer):
                    if m and arr.dtype.kind == "f" and not np.isfinite(arr[rows]).all():
                        raise ValueError(
                            f"states[{i}][{j}]: expected finite values in the rows kept now "
                            f"(lanes {_fmt(lanes[rows])}), got NaN or inf"
                        )
            # Nothing raises from here on.
            kept = _add_steps(
                lanes, act, rew, term, trunc,
                self._lt, self._win, self._alive, self._act, self._rew, self._flags, self._spos, self._sown,
                self._tree._tree, self._tree._offsets, self._params, self._new_leaf, self._counters,
                self._flat_buf, self._sslot_buf,
            )  # fmt: skip
            assert kept == m
            self._obs_flat[self._flat_buf[:n]] = obs
            if m:
                slots = self._sslot_buf[:m]
                for buffers, layer in zip(self._states_flat, st):
                    for buf, arr in zip(buffers, layer):
                        buf[slots] = arr[rows]
                for buffers, layer in zip(self._actor_states_flat or (), st):
                    for buf, arr in zip(buffers, layer):
                        buf[slots] = arr[rows]

    def close_lanes(self, lanes: Any) -> None:
        """End the open episode of each lane cleanly, e.g. when its writer goes away.

        If the lane's last step terminated the episode (its final observation not
        yet stored), a zero final observation is stored: a terminated episode
        never bootstraps from it, so the terminating transition is kept whole.
        Otherwise the last stored step becomes the final observation of a
        truncated episode (its action and reward are dropped; the step before it
        now bootstraps with discount 1). Either way the episode's remaining
        windows become sampleable, and the next :meth:`add` for the lane starts a
        new episode, so no window ever spans the gap. Lanes without an open
        episode are left alone.
        """
        lanes = self._check_lanes(lanes)
        with self._lock:
            self._close(lanes)

    def _close(self, lanes: np.ndarray) -> None:
        lt = self._lt
        pending_term = (lt[lanes, _L_OPEN] != 0) & (lt[lanes, _L_PFINAL] != 0) & (lt[lanes, _L_PTERM] != 0)
        if pending_term.any():
            # A terminated episode never bootstraps from its final observation (discount 0):
            # store a zero one, so that the terminating transition and its reward are kept.
            ends = lanes[pending_term]
            n = ends.size
            no = np.zeros(n, np.bool_)
            kept = _add_steps(
                ends, np.zeros(n, np.int32), np.zeros(n, np.float32), no, no,
                lt, self._win, self._alive, self._act, self._rew, self._flags, self._spos, self._sown,
                self._tree._tree, self._tree._offsets, self._params, self._new_leaf, self._counters,
                self._flat_buf, self._sslot_buf,
            )  # fmt: skip
            assert kept == 0  # a final observation never starts a window, so it keeps no state
            self._obs_flat[self._flat_buf[:n]] = 0
        _close_lanes(
            lanes, self._lt, self._win, self._alive, self._act, self._rew, self._flags, self._spos, self._sown,
            self._tree._tree, self._tree._offsets, self._params, self._new_leaf, self._counters,
        )  # fmt: skip

    def register_lanes(self, owner: str, count: int) -> np.ndarray:
        """Lane ids for a writer named ``owner``: ``count`` lanes never written to nor registered before.

        Registering the same owner again (e.g. a restarted remote actor) returns
        the same lanes and closes their open episodes (see :meth:`close_lanes`),
        so the new writer starts clean. Returns int64 ``[count]``.
        """
        if not isinstance(owner, str) or not owner:
            raise TypeError(f"owner: expected a non-empty str, got {type(owner).__name__} {owner!r}")
        count = _check_int("count", count, minimum=1)
        with self._lock:
            if owner in self._registry:
                lanes = np.asarray(self._registry[owner], dtype=np.int64)
                if lanes.size != count:
                    raise ValueError(
                        f"count: owner {owner!r} already holds {lanes.size} lanes {_fmt(lanes)}, got count={count}"
                    )
                self._close(lanes)
                return lanes
            taken = np.zeros(self.num_lanes, dtype=bool)
            for held in self._registry.values():
                taken[held] = True
            free = np.flatnonzero(~taken & (self._lt[:, _L_POS] == 0))
            if free.size < count:
                raise ValueError(
                    f"count: owner {owner!r} asked for {count} lanes, but only {free.size} of "
                    f"num_lanes={self.num_lanes} are neither registered nor written to"
                )
            lanes = free[:count].astype(np.int64)
            self._registry[owner] = lanes.tolist()
            return lanes

    # -- sampling and updates --------------------------------------------------------------

    def sample(self, batch_size: int, *, extra_state_offsets: Sequence[int] = ()) -> SequenceBatch:
        """Draw ``batch_size`` windows with probability ∝ priority**alpha, with replacement.

        ``extra_state_offsets``: window steps (multiples of ``period`` in ``[0,
        length)``) at which to also return the stored state, e.g. to measure ΔQ
        against a recomputed state; each is the burn-in start of a later window
        of the same episode. Where that state is not stored (padding, past the
        episode end, or evicted) it is zeros and ``extra_state_mask`` is False.
        Raises ``ValueError`` when nothing is sampleable yet.
        """
        batch = _check_int("batch_size", batch_size, minimum=1)
        offsets = self._check_offsets("extra_state_offsets", extra_state_offsets, minimum=0)
        with self._lock:
            if self._counters[_C_SAMPLEABLE] == 0:
                raise ValueError("sample: no window is sampleable yet (add more steps, or end an episode)")
            total = self._tree.total()
            if not total > 0:
                raise ValueError("sample: every sampleable window has priority 0")
            slots = np.empty(batch, dtype=np.int64)
            tree_find(
                self._tree._tree,
                self._tree._offsets,
                self._tree.fanout,
                self._rng.random(batch) * total,
                slots,
            )
            prob = self._tree._tree[slots] / total
            n_windows = int(self._counters[_C_SAMPLEABLE])
            parts = self._gather(slots, offsets)
            self._counters[_C_SAMPLES] += 1
        weights = (n_windows * prob) ** -self._config.beta
        weights = (weights / weights.max()).astype(np.float32)
        return SequenceBatch(probabilities=prob, weights=weights, **parts)

    def _gather(self, slots: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
        """Materialise the live windows in ``slots``: every field of a SequenceBatch but the draw's."""
        cfg = self._config
        B, L, K = slots.size, self._spec.length, offsets.size
        obs = np.empty((B, L * self._obs_size), dtype=cfg.obs_dtype)
        action = np.empty((B, L), dtype=np.int32)
        reward = np.empty((B, L), dtype=np.float32)
        discount = np.empty((B, L), dtype=np.float32)
        prev_action = np.empty((B, L), dtype=np.int32)
        prev_reward = np.empty((B, L), dtype=np.float32)
        mask = np.empty((B, L), dtype=np.bool_)
        learn_mask = np.empty((B, L), dtype=np.bool_)
        final_code = np.empty((B, L), dtype=np.uint8)
        keys = np.empty(B, dtype=np.int64)
        srow = np.empty(B, dtype=np.int64)
        spad = np.empty(B, dtype=np.bool_)
        xrow = np.empty((B, K), dtype=np.int64)
        xok = np.empty((B, K), dtype=np.bool_)
        _gather(
            slots, offsets, self._win, self._act, self._rew, self._flags, self._obs1d, self._spos,
            self._params, self._num_slots,
            obs, action, reward, discount, prev_action, prev_reward, mask, learn_mask, final_code,
            keys, srow, spad, xrow, xok,
        )  # fmt: skip
        state = self._read_states(srow, spad)
        extra = tuple(self._read_states(xrow[:, c], ~xok[:, c]) for c in range(K))
        return {
            "observation": obs.reshape(B, L, *cfg.obs_shape),
            "action": action,
            "reward": reward,
            "discount": discount,
            "prev_action": prev_action,
            "prev_reward": prev_reward,
            "state": state,
            "mask": mask,
            "learn_mask": learn_mask,
            "final": final_code >= 1,
            "terminal": final_code == 2,
            "keys": keys,
            "extra_states": extra,
            "extra_state_mask": xok,
            "actor_state": self._read_states(srow, spad, actor=True) if self._actor_states_flat else state,
            "extra_actor_states": (
                tuple(self._read_states(xrow[:, c], ~xok[:, c], actor=True) for c in range(K))
                if self._actor_states_flat
                else extra
            ),
        }

    def _read_states(self, rows: np.ndarray, zero: np.ndarray, *, actor: bool = False) -> RecurrentState:
        any_zero = bool(zero.any())
        out = []
        for buffers in self._actor_states_flat if actor else self._states_flat:
            arrays = []
            for buf in buffers:
                arr = buf[rows]
                if any_zero:
                    arr[zero] = 0
                arrays.append(arr)
            out.append(tuple(arrays))
        return tuple(out)

    def _live(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of ``keys`` and whether each key still names the window in its slot."""
        slots = keys % self._num_slots
        live = self._alive[slots] & (self._win[slots, _W_GEN] == keys // self._num_slots)
        return slots, live

    def update_priorities(self, keys: Any, priorities: Any) -> None:
        """Set the priorities of sampled windows by key (finite, >= 0; for a repeated key the last wins).

        Keys whose window has since been evicted or replaced are ignored and
        counted in :attr:`stale_updates`. The running maximum, which new windows
        start with, follows the largest priority applied.
        """
        keys = self._check_keys("keys", keys)
        pr = np.asarray(priorities)
        if pr.dtype.kind not in "biuf":
            raise TypeError(f"priorities: expected real numbers, got dtype {pr.dtype}")
        if pr.shape != keys.shape:
            raise ValueError(f"priorities: expected shape {keys.shape} (like keys), got {pr.shape}")
        pr = pr.astype(np.float64)
        bad = ~np.isfinite(pr) | (pr < 0)
        if bad.any():
            raise ValueError(f"priorities: expected finite values >= 0, got {_fmt(pr[bad])}")
        leaves = pr**self._config.alpha
        with self._lock:
            stale, largest = _update_priorities(
                keys, pr, leaves, self._win, self._alive, self._tree._tree, self._tree._offsets,
                self._tree.fanout, self._num_slots,
            )  # fmt: skip
            self._counters[_C_STALE] += stale
            self._counters[_C_PRIO] += keys.size - stale
            if largest > self._max_priority:
                self._set_max_priority(largest)

    def update_states(self, keys: Any, offsets: Sequence[int], states: Sequence[RecurrentState]) -> int:
        """Refresh stored states with ones the learner recomputed; returns how many stored states were written.

        For each offset ``o`` (a multiple of ``period`` in ``(0, length)``) and
        each live key, the stored state at window step ``o`` — the burn-in start
        of a later window of the same episode — is overwritten with the key's row
        of ``states[i]`` (``states`` is aligned with ``offsets``; arrays
        ``[B, *shape]``). Stale keys and offsets without a stored state are
        skipped. When several (key, offset) pairs name one stored state, the last
        in (offset, row) order wins.
        """
        keys = self._check_keys("keys", keys)
        offs = self._check_offsets("offsets", offsets, minimum=1)
        if isinstance(states, (str, bytes)) or not isinstance(states, Sequence) or len(states) != offs.size:
            got = f"{len(states)} entries" if isinstance(states, Sequence) else type(states).__name__
            raise ValueError(
                f"states: expected a sequence of {offs.size} RecurrentStates aligned with offsets, got {got}"
            )
        trees = [self._check_state_tree(f"states[{i}]", s, keys.size) for i, s in enumerate(states)]
        for i, tree in enumerate(trees):
            for a, layer in enumerate(tree):
                for j, arr in enumerate(layer):
                    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                        raise ValueError(f"states[{i}][{a}][{j}]: expected finite values, got NaN or inf")
        period, spl = self._spec.period, self._spl
        written = 0
        with self._lock:
            slots, live = self._live(keys)
            lane = slots // self._wpl
            win = self._win[slots]
            start, left, right, snum = win[:, _W_START], win[:, _W_LEFT], win[:, _W_RIGHT], win[:, _W_STATE]
            for o, tree in zip(offs, trees):
                srow = lane * spl + (snum + o // period) % spl
                ok = live & (o >= left) & (o < right) & (self._spos[srow] == start + o)
                if not ok.any():
                    continue
                rows = np.flatnonzero(ok)
                # Last row wins: numpy does not promise an order for repeated fancy writes.
                target, last = np.unique(srow[rows][::-1], return_index=True)
                rows = rows[::-1][last]
                for buffers, layer in zip(self._states_flat, tree):
                    for buf, arr in zip(buffers, layer):
                        buf[target] = arr[rows]
                written += target.size
            self._counters[_C_STATES] += written
        return written

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole buffer to ``path`` atomically: temp file in the same directory, fsync, rename, fsync dir.

        One ``.npz``-format file (no pickle) with steps, stored states, the
        sum-tree of priorities, the maximum priority, pointers, window and lane
        tables, lane registrations, counters and the RNG state. If writing fails,
        whatever was at ``path`` is untouched. The lock is held while writing, so
        the file is one consistent snapshot.
        """
        path = Path(path)
        directory = path.parent
        tmp = directory / f".{path.name}.{uuid.uuid4().hex}.tmp"
        with self._lock:
            meta = {
                "format_version": FORMAT_VERSION,
                "config": self._config.to_json(),
                "max_priority": self._max_priority,
                "registry": self._registry,
                "rng": _encode_json(self._rng.bit_generator.state),
            }
            try:
                with open(tmp, "wb") as f:
                    np.savez(f, meta=np.array(json.dumps(meta)), tree=self._tree.state(), **self._arrays)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SequenceReplay:
        """Read a checkpoint written by :meth:`save`, without pickle.

        A truncated, corrupt or wrong-version file raises ``ValueError`` saying
        so; a missing file raises ``FileNotFoundError``.
        """
        path = Path(path)
        where = f"checkpoint {path}"
        try:
            loaded = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{where} is truncated or corrupt: {err}") from err
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"{where} is not a SequenceReplay checkpoint (it holds a single .npy array)")
        try:
            with loaded as data:
                if "meta" not in data.files:
                    raise _Corrupt("no 'meta' entry: not a SequenceReplay checkpoint")
                meta = json.loads(str(data["meta"][()]))
                version = meta.get("format_version") if isinstance(meta, dict) else None
                if version != FORMAT_VERSION:
                    raise _Corrupt(
                        f"format version {version!r}, but this burnin reads version {FORMAT_VERSION}"
                    )
                config = ReplayConfig.from_json(meta["config"])
                self = cls.__new__(cls)
                self._setup(config, cls._rng_from_state(_decode_json(meta["rng"])))
                arrays = {}
                for name, (shape, dtype) in self._array_specs().items():
                    if name not in data.files:
                        raise _Corrupt(f"array {name!r} is missing")
                    arr = data[name]
                    if arr.shape != shape or arr.dtype != dtype:
                        raise _Corrupt(f"array {name!r} is {arr.dtype} {arr.shape}, expected {dtype} {shape}")
                    arrays[name] = arr
                self._bind(arrays, max_priority=float(meta["max_priority"]))
                self._registry = {str(k): [int(x) for x in v] for k, v in meta["registry"].items()}
        except _Corrupt as err:
            raise ValueError(f"{where}: {err}") from None
        except (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{where} is truncated or corrupt: {type(err).__name__}: {err}") from err
        leaves = self._tree.values()
        if self._counters[_C_SAMPLEABLE] != self._alive.sum() or leaves[~self._alive].any():
            raise ValueError(f"{where} is corrupt: window table and priorities disagree")
        return self

    @staticmethod
    def _rng_from_state(state: Any) -> np.random.Generator:
        name = state.get("bit_generator") if isinstance(state, dict) else None
        if name not in _BIT_GENERATORS:
            raise _Corrupt(
                f"unknown bit generator {name!r} in the RNG state, expected one of {_BIT_GENERATORS}"
            )
        bit_generator = getattr(np.random, name)()
        bit_generator.state = state
        return np.random.Generator(bit_generator)

    # -- for tests and debugging ----------------------------------------------------------

    def _live_keys(self) -> np.ndarray:
        """Keys of every sampleable window, lane by lane, oldest first."""
        with self._lock:
            slots = np.flatnonzero(self._alive)
            lane = slots // self._wpl
            tail = self._lt[lane, _L_TAIL]
            num = tail + (slots - lane * self._wpl - tail) % self._wpl
            slots = slots[np.lexsort((num, lane))]
            return self._win[slots, _W_GEN] * self._num_slots + slots

    def _windows(self, keys: Any, *, extra_state_offsets: Sequence[int] = ()) -> SequenceBatch:
        """The windows of live ``keys`` as a batch (probabilities from current priorities, weights 1)."""
        keys = self._check_keys("keys", keys)
        offsets = self._check_offsets("extra_state_offsets", extra_state_offsets, minimum=0)
        with self._lock:
            slots, live = self._live(keys)
            if not live.all():
                raise ValueError(f"keys: expected live window keys, got stale {_fmt(keys[~live])}")
            prob = self._tree._tree[slots] / self._tree.total()
            parts = self._gather(slots, offsets)
        return SequenceBatch(probabilities=prob, weights=np.ones(keys.size, np.float32), **parts)

    def _check_invariants(self) -> None:
        """Assert that the bookkeeping is consistent (tests call this after every operation)."""
        with self._lock:
            wpl, cap, spl = self._wpl, self._cap, self._spl
            leaves = self._tree.values()
            check = self._tree.state()
            tree_rebuild(check, self._tree._offsets, self._tree.fanout)
            assert np.array_equal(check, self._tree._tree), "sum-tree sums do not match its leaves"
            assert self._counters[_C_SAMPLEABLE] == self._alive.sum()
            assert not leaves[~self._alive].any(), "an evicted window keeps a priority"
            for lane in range(self.num_lanes):
                row = self._lt[lane]
                tail, head = int(row[_L_TAIL]), int(row[_L_HEAD])
                assert 0 <= head - tail <= wpl
                slots = lane * wpl + np.arange(tail, head) % wpl
                assert self._alive[slots].all()
                assert self._alive[lane * wpl : (lane + 1) * wpl].sum() == head - tail
                touch = self._win[slots, _W_TOUCH]
                assert (np.diff(touch) >= 0).all(), "windows out of FIFO order"
                assert (touch >= max(int(row[_L_POS]) - cap, 0)).all(), (
                    "a live window reads an overwritten step"
                )
                assert row[_L_EVICT_AT] == (touch[0] if head > tail else _NEVER)
                own = self._win[slots, _W_LEFT] == 0
                srow = lane * spl + self._win[slots, _W_STATE][own] % spl
                assert (self._spos[srow] == self._win[slots, _W_START][own]).all(), (
                    "a live window lost its state"
                )
                kept = self._spos[lane * spl : (lane + 1) * spl]
                assert (kept[kept != _NO_POS] < row[_L_POS]).all()


class _Corrupt(Exception):
    """A checkpoint that reads but does not describe a valid buffer."""
