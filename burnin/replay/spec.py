"""What a SequenceReplay stores and returns: the window layout, the buffer's configuration, the batch type,
the arrays the buffer holds, and the checks of the arguments its methods take."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from burnin._checks import check_bool, check_float, check_int, check_shape, fmt, int_vector, is_int

__all__ = [
    "LANE_COLUMNS",
    "WINDOW_COLUMNS",
    "RecurrentState",
    "ReplayConfig",
    "SequenceBatch",
    "SequenceSpec",
    "cast_states",
    "check_array",
    "check_finite",
    "check_keys",
    "check_offsets",
    "check_priorities",
    "check_refresh",
    "check_state_tree",
    "renamed_state_shapes",
]

# Same alias as burnin.state.RecurrentState; redefined so the replay stays numpy-only.
RecurrentState = tuple[tuple[np.ndarray, ...], ...]

LANE_COLUMNS = 11
"""Columns of the per-lane table (see :class:`burnin.replay.kernels.Lane`)."""
WINDOW_COLUMNS = 6
"""Columns of the window table (see :class:`burnin.replay.kernels.Win`)."""
COUNTERS = (
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
"""Names of the buffer's counters, in the order of its ``counters`` array."""


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
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=minimum))
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
    row_state_shapes: tuple[tuple[tuple[int, ...], ...], ...]
    """Per stateful layer, per state array, the shape of one stored row: :func:`burnin.state_shapes` of the
    network without the batch; () for a network without state."""
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
        check_int("num_lanes", self.num_lanes, minimum=1)
        check_int("lane_capacity", self.lane_capacity, minimum=1)
        if self.lane_capacity < spec.length + 1:
            raise ValueError(
                f"lane_capacity: expected >= spec.length + 1 = {spec.length + 1} (a whole window and the "
                f"step before it), got {self.lane_capacity}"
            )
        object.__setattr__(self, "num_lanes", int(self.num_lanes))
        object.__setattr__(self, "lane_capacity", int(self.lane_capacity))
        object.__setattr__(self, "obs_shape", check_shape("obs_shape", self.obs_shape))
        try:
            obs_dtype = np.dtype(self.obs_dtype)
            state_dtype = np.dtype(self.state_dtype)
        except TypeError as err:
            raise TypeError(f"obs_dtype/state_dtype: expected numpy dtypes ({err})") from None
        if obs_dtype.kind not in "biuf":
            raise TypeError(f"obs_dtype: expected a bool, integer or floating dtype, got {obs_dtype}")
        if state_dtype.kind != "f" or state_dtype.itemsize > 8:
            raise TypeError(f"state_dtype: expected float16, float32 or float64, got {state_dtype}")
        if obs_dtype.kind == "f" and obs_dtype.itemsize not in (4, 8):
            # The compiled kernels copy observations by type; numba has no float16 nor longdouble.
            raise TypeError(
                f"obs_dtype: expected float32 or float64 for floating observations, got {obs_dtype}"
            )
        # Stored in native byte order (the kernels take no other; '>f4' and '<f4' hold the same values).
        obs_dtype, state_dtype = obs_dtype.newbyteorder("="), state_dtype.newbyteorder("=")
        object.__setattr__(self, "obs_dtype", obs_dtype)
        object.__setattr__(self, "state_dtype", state_dtype)
        shapes = self.row_state_shapes
        if not isinstance(shapes, (tuple, list)) or not all(
            isinstance(layer, (tuple, list)) and len(layer) >= 1 for layer in shapes
        ):
            raise ValueError(
                "row_state_shapes: expected a tuple with, per stateful layer, a non-empty tuple of array "
                f"shapes without batch, e.g. (((512,), (512,)),) for one LSTM; got {shapes!r}"
            )
        object.__setattr__(
            self,
            "row_state_shapes",
            tuple(
                tuple(check_shape(f"row_state_shapes[{i}][{j}]", s) for j, s in enumerate(layer))
                for i, layer in enumerate(shapes)
            ),
        )
        object.__setattr__(self, "keep_actor_states", check_bool("keep_actor_states", self.keep_actor_states))
        object.__setattr__(self, "alpha", check_float("alpha", self.alpha, low=0.0, what="float"))
        object.__setattr__(self, "beta", check_float("beta", self.beta, low=0.0, what="float"))
        least = -(-(spec.unroll + spec.n_step) // spec.period) + 1
        if self.windows_per_lane is None:
            cap, per = self.lane_capacity, spec.period
            object.__setattr__(self, "windows_per_lane", 2 * -(-cap // per) + -(-spec.burn_in // per) + 2)
        else:
            check_int("windows_per_lane", self.windows_per_lane, minimum=least)
            object.__setattr__(self, "windows_per_lane", int(self.windows_per_lane))

    @property
    def state_shapes(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """Deprecated: the old name of :attr:`row_state_shapes` (``burnin.state_shapes`` includes the batch)."""
        warnings.warn(
            "ReplayConfig.state_shapes is deprecated, use ReplayConfig.row_state_shapes",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.row_state_shapes

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
            # The file's key keeps its first name: the checkpoint format is unchanged.
            "state_shapes": [[list(s) for s in layer] for layer in self.row_state_shapes],
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
            row_state_shapes=tuple(tuple(tuple(s) for s in layer) for layer in data["state_shapes"]),
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
    """[B, L] float32: 0 if the action at t terminated the episode, else 1 (truncation: 1); 0 where no action
    (the final observation, padding). The n-step sum wants continuation 1 there instead:
    :func:`burnin.losses.rewards_and_continuations` converts."""
    prev_action: np.ndarray
    """[B, L] int32: action at t-1 in the same episode (0 at the episode's first step and where invalid)."""
    prev_reward: np.ndarray
    """[B, L] float32: reward of the action at t-1 (0 at the episode's first step and where invalid)."""
    state: RecurrentState
    """Stored state before window step 0, arrays [B, *shape]; zeros where step 0 is left padding."""
    valid_t: np.ndarray
    """[B, L] bool: step t exists in the episode (the final observation included); False on padding."""
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

    @property
    def mask(self) -> np.ndarray:
        """Deprecated: the old name of :attr:`valid_t`, kept for code written against it."""
        warnings.warn(
            "SequenceBatch.mask is deprecated, use SequenceBatch.valid_t", DeprecationWarning, stacklevel=2
        )
        return self.valid_t


# -- argument checks (they read no buffer state) ---------------------------------------------


@functools.cache
def _iinfo(dtype: np.dtype) -> np.iinfo:
    return np.iinfo(dtype)


def check_array(name: str, value: Any, shape: tuple[int, ...], target: np.dtype) -> np.ndarray:
    """``value`` as an array of ``shape`` cast to ``target``, refused unless the cast loses nothing:
    integers in range, and floats finite as stored (a float64 1e39 is inf in float32)."""
    arr = np.asarray(value)
    kinds = {"b": "b", "i": "biu", "u": "biu", "f": "biuf"}[target.kind]
    if arr.dtype.kind not in kinds:
        raise TypeError(f"{name}: expected dtype castable to {target}, got {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    if target.kind in "iu" and arr.dtype != target and arr.size:
        info = _iinfo(target)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise ValueError(
                f"{name}: expected values in [{info.min}, {info.max}] for {target}, got {lo}..{hi}"
            )
    out = _cast(arr, target)
    if target.kind == "f":
        check_finite(name, arr, out, target)
    return out


def _cast(arr: np.ndarray, target: np.dtype) -> np.ndarray:
    """``arr`` as ``target``; a value beyond a narrower float's range becomes inf (quietly: the callers refuse it)."""
    if arr.dtype == target:
        return arr
    narrowing = target.kind == "f" and (
        (arr.dtype.kind == "f" and arr.dtype.itemsize > target.itemsize) or target.itemsize <= 2
    )
    if not narrowing:  # np.errstate costs microseconds: only where an overflow can happen
        return arr.astype(target)
    with np.errstate(over="ignore"):
        return arr.astype(target)


def check_finite(
    name: str, given: np.ndarray, stored: np.ndarray, dtype: np.dtype, *, rows: str = "rows", ids: Any = None
) -> None:
    """ValueError unless ``stored`` (``given`` cast to ``dtype``) is finite, naming the bad rows (axis 0)
    as ``rows`` with ids ``ids`` (default: their indices)."""
    finite = np.isfinite(stored)
    if finite.all():
        return
    bad = np.flatnonzero(~finite.reshape(finite.shape[0], -1).all(axis=1))
    where = f"in {rows} {fmt(bad if ids is None else np.asarray(ids)[bad])}"
    values = given[~finite]
    if given.dtype.kind != "f" or np.isfinite(values).all():
        raise ValueError(
            f"{name}: expected values within {dtype}'s range (|x| <= {float(np.finfo(dtype).max):.8g}), "
            f"got {fmt(values)} {where}"
        )
    raise ValueError(f"{name}: expected finite values, got NaN or inf {where}")


def cast_states(name: str, states: RecurrentState, dtype: np.dtype, **where: Any) -> RecurrentState:
    """``states`` cast to the stored ``dtype``; ValueError naming the array if a value is not finite as stored
    (``where``: see :func:`check_finite`)."""
    out = []
    for i, layer in enumerate(states):
        arrays = []
        for j, arr in enumerate(layer):
            stored = _cast(arr, dtype)
            check_finite(f"{name}[{i}][{j}]", arr, stored, dtype, **where)
            arrays.append(stored)
        out.append(tuple(arrays))
    return tuple(out)


def check_state_tree(config: ReplayConfig, name: str, states: Any, batch: int) -> RecurrentState:
    """``states`` as a RecurrentState of ``batch`` rows shaped like ``config.row_state_shapes``."""
    shapes = config.row_state_shapes
    if not shapes:
        if states is None or (isinstance(states, (tuple, list)) and len(states) == 0):
            return ()
        raise ValueError(
            f"{name}: the replay keeps no state (row_state_shapes=()), got {type(states).__name__}"
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
            if arr.dtype.kind != "f":
                raise TypeError(f"{name}[{i}][{j}]: expected a floating array, got dtype {arr.dtype}")
            if arr.shape != (batch, *shape):
                raise ValueError(f"{name}[{i}][{j}]: expected shape {(batch, *shape)}, got {arr.shape}")
            arrays.append(arr)
        out.append(tuple(arrays))
    return tuple(out)


def check_refresh(
    config: ReplayConfig, offsets: Any, states: Any, batch: int
) -> tuple[np.ndarray, list[RecurrentState]]:
    """The arguments of ``update_states``: its ``offsets`` (multiples of ``period`` in ``[period, length)``)
    and, aligned with them, ``states`` of ``batch`` rows each, cast to the stored dtype (finite as stored)."""
    offs = check_offsets(config.spec, "offsets", offsets, minimum=1)
    if isinstance(states, (str, bytes)) or not isinstance(states, Sequence) or len(states) != offs.size:
        got = f"{len(states)} entries" if isinstance(states, Sequence) else type(states).__name__
        raise ValueError(
            f"states: expected a sequence of {offs.size} RecurrentStates aligned with offsets, got {got}"
        )
    trees = [
        cast_states(f"states[{i}]", check_state_tree(config, f"states[{i}]", s, batch), config.state_dtype)
        for i, s in enumerate(states)
    ]
    return offs, trees


def check_offsets(spec: SequenceSpec, name: str, offsets: Any, *, minimum: int) -> np.ndarray:
    """Window steps: multiples of ``period`` in ``[minimum, length)``, as int64."""
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, (Sequence, np.ndarray)):
        raise TypeError(f"{name}: expected a sequence of ints, got {type(offsets).__name__}")
    out = []
    for o in offsets:
        if not is_int(o):
            raise TypeError(f"{name}: expected ints, got {type(o).__name__} {o!r}")
        if not (minimum <= o < spec.length and o % spec.period == 0):
            raise ValueError(
                f"{name}: expected multiples of period={spec.period} in [{minimum}, {spec.length}), got {o}"
            )
        out.append(int(o))
    return np.array(out, dtype=np.int64)


def check_priorities(
    priorities: Any, keys: np.ndarray, *, alpha: float, total_limit: float, num_slots: int
) -> tuple[np.ndarray, np.ndarray]:
    """``priorities`` (one per key) as float64, and their sum-tree leaves ``priority**alpha``: finite and
    >= 0, a positive one with a positive leaf (it stays sampleable), and no leaf above
    ``total_limit / num_slots``, since every window may come to hold the largest one (new windows start at
    the running maximum) and the sum of them all must stay finite."""
    pr = np.asarray(priorities)
    if pr.dtype.kind not in "biuf":
        raise TypeError(f"priorities: expected real numbers, got dtype {pr.dtype}")
    if pr.shape != keys.shape:
        raise ValueError(f"priorities: expected shape {keys.shape} (like keys), got {pr.shape}")
    pr = pr.astype(np.float64)
    bad = ~np.isfinite(pr) | (pr < 0)
    if bad.any():
        raise ValueError(f"priorities: expected finite values >= 0, got {fmt(pr[bad])}")
    with np.errstate(over="ignore", under="ignore"):
        leaves = pr**alpha
    limit = total_limit / num_slots
    bad = ~(leaves <= limit) | ((pr > 0) & (leaves <= 0))
    if bad.any():
        raise ValueError(
            f"priorities: expected priority**alpha (alpha={alpha}) > 0 and <= {limit:.4g} (the sum over "
            f"{num_slots} window slots must stay finite), got priorities {fmt(pr[bad])} "
            f"(priority**alpha {fmt(leaves[bad])})"
        )
    return pr, leaves


def check_keys(name: str, keys: Any) -> np.ndarray:
    """Window keys: a 1-D int array of values >= 0, as int64."""
    arr = int_vector(name, keys, "window keys")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name}: expected keys >= 0, got {fmt(arr[arr < 0])}")
    return arr


def renamed_state_shapes(row_state_shapes: Any, state_shapes: Any) -> Any:
    """``SequenceReplay``'s ``row_state_shapes``, or the same given by its deprecated name ``state_shapes``."""
    if state_shapes is None:
        if row_state_shapes is None:
            raise TypeError("SequenceReplay() missing required keyword argument: 'row_state_shapes'")
        return row_state_shapes
    if row_state_shapes is not None:
        raise TypeError("SequenceReplay(): state_shapes is the deprecated name of row_state_shapes, give one")
    warnings.warn(
        "SequenceReplay(state_shapes=...) is deprecated, use row_state_shapes=...",
        DeprecationWarning,
        stacklevel=3,
    )
    return state_shapes
