"""Reading windows out of a SequenceReplay's tables: the compiled gather, and the batch fields it fills."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numba
import numpy as np

from burnin.replay.kernels import (
    FINAL,
    FINAL_TERMINATED,
    TERMINATED,
    WIN_GEN,
    WIN_LEFT,
    WIN_RIGHT,
    WIN_START,
    WIN_STATE,
    WIN_TOUCH,
    Layout,
    Tables,
    fill,
)
from burnin.replay.spec import RecurrentState, ReplayConfig

__all__ = ["Gathered", "gather", "gather_windows", "read_states"]


def gather_windows(
    slots: np.ndarray,
    offsets: np.ndarray,
    *,
    tables: Tables,
    layout: Layout,
    config: ReplayConfig,
    states: tuple[tuple[np.ndarray, ...], ...],
    actor_states: tuple[tuple[np.ndarray, ...], ...] | None,
) -> dict[str, Any]:
    """Materialise the live windows in ``slots``: every field of a SequenceBatch but the draw's.

    ``states`` (and ``actor_states``, the actor's originals when the buffer keeps them) are the stored
    states per layer and array, ``[state rows, *shape]``; ``offsets`` are the extra state offsets."""
    B, L, K = slots.size, config.spec.length, offsets.size
    out = Gathered.allocate(B, L, K, math.prod(config.obs_shape), config.obs_dtype)
    gather(slots, offsets, tables, layout, out)
    srow, spad, xrow, xok = out.state_row, out.state_pad, out.extra_row, out.extra_ok
    state = read_states(states, srow, spad)
    extra = tuple(read_states(states, xrow[:, c], ~xok[:, c]) for c in range(K))
    return {
        "observation": out.observation.reshape(B, L, *config.obs_shape),
        "action": out.action,
        "reward": out.reward,
        "discount": out.discount,
        "prev_action": out.prev_action,
        "prev_reward": out.prev_reward,
        "state": state,
        "valid_t": out.valid_t,
        "learn_mask": out.learn_mask,
        "final": out.final_code >= 1,
        "terminal": out.final_code == 2,
        "keys": out.keys,
        "extra_states": extra,
        "extra_state_mask": xok,
        "actor_state": state if actor_states is None else read_states(actor_states, srow, spad),
        "extra_actor_states": (
            extra
            if actor_states is None
            else tuple(read_states(actor_states, xrow[:, c], ~xok[:, c]) for c in range(K))
        ),
    }


def read_states(
    buffers: tuple[tuple[np.ndarray, ...], ...], rows: np.ndarray, zero: np.ndarray
) -> RecurrentState:
    """The stored states at state ``rows`` of ``buffers`` (per layer and array), zeros where ``zero``."""
    any_zero = bool(zero.any())
    out = []
    for layer in buffers:
        arrays = []
        for buf in layer:
            arr = buf[rows]
            if any_zero:
                arr[zero] = 0
            arrays.append(arr)
        out.append(tuple(arrays))
    return tuple(out)


class Gathered(NamedTuple):
    """What :func:`gather` fills for ``B`` windows of ``L`` steps (``K`` extra state offsets)."""

    observation: np.ndarray  # [B, L * obs_size]
    action: np.ndarray  # [B, L] int32
    reward: np.ndarray  # [B, L] float32
    discount: np.ndarray  # [B, L] float32
    prev_action: np.ndarray  # [B, L] int32
    prev_reward: np.ndarray  # [B, L] float32
    valid_t: np.ndarray  # [B, L] bool
    learn_mask: np.ndarray  # [B, L] bool
    final_code: np.ndarray  # [B, L] uint8: 0 not final, 1 final of a truncated, 2 of a terminated episode
    keys: np.ndarray  # [B] int64
    state_row: np.ndarray  # [B] int64: flat state slot of the state before window step 0
    state_pad: np.ndarray  # [B] bool: window step 0 is left padding (state reads as zeros)
    extra_row: np.ndarray  # [B, K] int64: flat state slot at each extra offset
    extra_ok: np.ndarray  # [B, K] bool: that state exists

    @classmethod
    def allocate(cls, batch: int, length: int, extra: int, obs_size: int, obs_dtype: np.dtype) -> Gathered:
        """Uninitialised outputs for ``batch`` windows of ``length`` steps and ``extra`` state offsets."""
        B, L = batch, length
        return cls(
            observation=np.empty((B, L * obs_size), dtype=obs_dtype),
            action=np.empty((B, L), dtype=np.int32),
            reward=np.empty((B, L), dtype=np.float32),
            discount=np.empty((B, L), dtype=np.float32),
            prev_action=np.empty((B, L), dtype=np.int32),
            prev_reward=np.empty((B, L), dtype=np.float32),
            valid_t=np.empty((B, L), dtype=np.bool_),
            learn_mask=np.empty((B, L), dtype=np.bool_),
            final_code=np.empty((B, L), dtype=np.uint8),
            keys=np.empty(B, dtype=np.int64),
            state_row=np.empty(B, dtype=np.int64),
            state_pad=np.empty(B, dtype=np.bool_),
            extra_row=np.empty((B, extra), dtype=np.int64),
            extra_ok=np.empty((B, extra), dtype=np.bool_),
        )


@numba.njit(cache=True, nogil=True)
def _invalid_steps(out, i, width, lo, hi):
    """Fill window steps [lo, hi) of row i with the values of an invalid step."""
    fill(out.observation[i, lo * width : hi * width], 0)
    fill(out.action[i, lo:hi], 0)
    fill(out.prev_action[i, lo:hi], 0)
    fill(out.final_code[i, lo:hi], 0)
    fill(out.reward[i, lo:hi], 0.0)
    fill(out.discount[i, lo:hi], 0.0)
    fill(out.prev_reward[i, lo:hi], 0.0)
    fill(out.valid_t[i, lo:hi], False)
    fill(out.learn_mask[i, lo:hi], False)


@numba.njit(cache=True, nogil=True)
def _copy_run(out, i, t, lay, width, f, at, run):
    """Copy ``run`` stored steps from flat step ``f`` into window steps ``[at, at + run)`` of row i."""
    d_obs = out.observation[i, at * width : (at + run) * width]
    s_obs = t.observation[f * width : (f + run) * width]
    for x in range(d_obs.size):
        d_obs[x] = s_obs[x]
    d_act, d_rew, d_disc = (
        out.action[i, at : at + run],
        out.reward[i, at : at + run],
        out.discount[i, at : at + run],
    )
    d_valid, d_learn = out.valid_t[i, at : at + run], out.learn_mask[i, at : at + run]
    d_final = out.final_code[i, at : at + run]
    s_act, s_rew, s_flags = t.action[f : f + run], t.reward[f : f + run], t.flags[f : f + run]
    learn_lo, learn_hi = lay.burn_in - at, lay.burn_in + lay.unroll - at
    for y in range(run):
        fl = s_flags[y]
        acts = (fl & FINAL) == 0
        d_act[y] = s_act[y]
        d_rew[y] = s_rew[y]
        d_disc[y] = 1.0 if acts and (fl & TERMINATED) == 0 else 0.0
        d_valid[y] = True
        d_learn[y] = acts and learn_lo <= y < learn_hi
        # 0: not a final observation, 1: final of a truncated episode, 2: of a terminated one.
        d_final[y] = ((fl & FINAL) != 0) + ((fl & FINAL_TERMINATED) != 0)


@numba.njit(cache=True, nogil=True)
def _previous_steps(out, i, t, lay, slot, left, right):
    """prev_action/prev_reward: the step before, when it is in the episode (the first valid step
    has one only if the window starts after the episode's first step)."""
    start = t.windows[slot, WIN_START]
    if left == 0 and t.windows[slot, WIN_TOUCH] < start:
        pf = (slot // lay.windows_per_lane) * lay.capacity + (start - 1) % lay.capacity
        out.prev_action[i, 0] = t.action[pf]
        out.prev_reward[i, 0] = t.reward[pf]
    else:
        out.prev_action[i, left] = 0
        out.prev_reward[i, left] = 0.0
    d_pact, d_prew = out.prev_action[i, left + 1 : right], out.prev_reward[i, left + 1 : right]
    s_act, s_rew = out.action[i, left : right - 1], out.reward[i, left : right - 1]
    for y in range(d_pact.size):
        d_pact[y] = s_act[y]
        d_prew[y] = s_rew[y]


@numba.njit(cache=True, nogil=True)
def gather(slots, extra, t, lay, out):
    """Fill ``out`` with the windows in ``slots`` and the state rows at the ``extra`` window offsets."""
    cap, wpl, spl, P, L = lay.capacity, lay.windows_per_lane, lay.state_slots, lay.period, lay.length
    width = t.observation.size // t.flags.size  # observation values per step
    # Indices are kept to plain loop counters over slice views: numba then drops its
    # negative-index wrap-around check and the copies vectorise (about 4x faster).
    for i in range(slots.size):
        s = slots[i]
        lane = s // wpl
        start, left, right = t.windows[s, WIN_START], t.windows[s, WIN_LEFT], t.windows[s, WIN_RIGHT]
        snum = t.windows[s, WIN_STATE]
        out.keys[i] = t.windows[s, WIN_GEN] * lay.num_slots + s
        _invalid_steps(out, i, width, 0, left)
        _invalid_steps(out, i, width, right, L)
        # The valid steps are contiguous in the lane ring: copy them in at most two runs.
        at = left
        ring = (start + left) % cap
        while at < right:
            run = min(right - at, cap - ring)
            _copy_run(out, i, t, lay, width, lane * cap + ring, at, run)
            at += run
            ring = 0
        if left < right:
            _previous_steps(out, i, t, lay, s, left, right)
        out.state_row[i] = lane * spl + snum % spl
        out.state_pad[i] = left > 0
        for c in range(extra.size):
            o = extra[c]
            row = lane * spl + (snum + o // P) % spl
            out.extra_row[i, c] = row
            out.extra_ok[i, c] = left <= o < right and t.state_pos[row] == start + o
