"""The learner's batch as its compiled update reads it, in one place: checked, packed into seven arrays, unpacked by name."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from agents.r2d2.config import WindowOffsets
from burnin._checks import fmt
from burnin.replay import RecurrentState, SequenceBatch

__all__ = [
    "STEP_FIELDS",
    "Feed",
    "FeedLayout",
    "StepField",
    "UpdateFeed",
    "check_field",
    "make_feed",
    "unpack_feed",
]

_KINDS = {"f": "floats", "fiu": "numbers", "iu": "integers", "b": "bools"}


class StepField(NamedTuple):
    """How the update reads one ``[B, L]`` field of a :class:`SequenceBatch`."""

    dtype: type
    """Its dtype in the update (float32, int32 or bool), which is also the packed array that carries it.
    Integer fields are actions: in ``[0, num_actions)``."""
    low: float | None = None
    high: float | None = None


STEP_FIELDS: dict[str, StepField] = {
    "valid_t": StepField(np.bool_),
    "learn_mask": StepField(np.bool_),
    "final": StepField(np.bool_),
    "action": StepField(np.int32),
    "prev_action": StepField(np.int32),
    "reward": StepField(np.float32),
    "prev_reward": StepField(np.float32),
    "discount": StepField(np.float32, low=0, high=1),
}
"""The ``[B, L]`` fields of a SequenceBatch the update reads. Another is one row here and one field of
:class:`Feed` (by the same name); checking, packing and unpacking follow from this table."""

_STEP_KINDS = {np.bool_: "b", np.int32: "iu", np.float32: "f"}


class FeedLayout(NamedTuple):
    """What the update expects of a batch: its sizes, the stored observation, the states and their offsets."""

    batch_size: int
    length: int
    """Window steps: ``SequenceSpec.length``."""
    num_actions: int
    observation_shape: tuple[int, ...]
    observation_dtype: np.dtype
    row_state_shapes: tuple[tuple[tuple[int, ...], ...], ...]
    """Per stateful layer and array, the shape of one row; ``()`` for a feed-forward network (no states)."""
    offsets: WindowOffsets


class UpdateFeed(NamedTuple):
    """The compiled update's inputs as seven arrays: each argument of a ``tf.function`` call costs a
    conversion and a signature check (21 separate arrays took 1.1 ms per call, measured; these 0.6)."""

    observation: np.ndarray
    """[B, L, *observation shape], in its stored dtype."""
    floats: np.ndarray
    """[F, B, L] float32: the float32 fields of :data:`STEP_FIELDS`, in its order."""
    ints: np.ndarray
    """[I, B, L] int32: the int32 fields."""
    bools: np.ndarray
    """[K, B, L] bool: the bool fields."""
    weights: np.ndarray
    """[B] float32 importance weights."""
    states: np.ndarray
    """[B, S] float32: the start state, then each ΔQ state, every array flattened per row."""
    delta_q_state_mask: np.ndarray
    """[len(offsets.delta_q), B] bool: which rows have the actor's state at the ΔQ offset."""


class Feed(NamedTuple):
    """The update's inputs as tensors, named as in the batch. ``[B, L]`` unless said."""

    observation: tf.Tensor
    """[B, L, *observation shape], in its stored dtype."""
    valid_t: tf.Tensor
    learn_mask: tf.Tensor
    final: tf.Tensor
    action: tf.Tensor
    prev_action: tf.Tensor
    reward: tf.Tensor
    prev_reward: tf.Tensor
    discount: tf.Tensor
    has_action: tf.Tensor
    """``valid_t & ~final``: step t exists and is not a final observation."""
    weights: tf.Tensor
    """[B] importance weights."""
    state: Any
    """The start state (the batch's ``state``, refreshed or not), arrays [B, *row shape]; () without states."""
    delta_q_states: tuple[Any, ...]
    """Per ΔQ offset, the *actor's* state there (ΔQ compares with it, even where a refresh replaced it)."""
    delta_q_state_mask: tuple[tf.Tensor, ...]
    """Per ΔQ offset, [B] bool: the row has that state."""


def check_field(
    name: str,
    value: Any,
    kinds: str,
    shape: tuple[int, ...],
    *,
    dtype: Any = None,
    low: float | None = None,
    high: float | None = None,
) -> np.ndarray:
    """``value`` as an array (as ``dtype``): TypeError for a dtype not of ``kinds``; ValueError for another
    shape, a non-finite float, or a value outside [low, high]. Floats are checked as cast (1e300 is no
    finite float32); integers before (no wrap-around hides a bad action)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in kinds:
        raise TypeError(f"{name}: expected {_KINDS[kinds]}, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    if dtype is not None and np.dtype(dtype).kind == "f":
        arr = arr.astype(dtype, copy=False)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite values, got {fmt(np.asarray(value)[~np.isfinite(arr)])}")
    if arr.size and ((low is not None and arr.min() < low) or (high is not None and arr.max() > high)):
        bad = (arr < (-np.inf if low is None else low)) | (arr > (np.inf if high is None else high))
        raise ValueError(
            f"{name}: expected values in [{low}, {'inf' if high is None else high}], got {fmt(arr[bad])}"
        )
    return arr if dtype is None else arr.astype(dtype, copy=False)


def make_feed(batch: SequenceBatch, layout: FeedLayout) -> UpdateFeed:
    """The compiled update's arrays from ``batch``, every field it reads checked first (dtype, shape, range,
    finite values: TypeError or ValueError naming the field); reads nothing else, changes nothing."""
    b = layout.batch_size
    steps = {
        name: check_field(
            f"batch.{name}",
            getattr(batch, name),
            _STEP_KINDS[field.dtype],
            (b, layout.length),
            dtype=field.dtype,
            low=0 if field.dtype is np.int32 else field.low,
            high=layout.num_actions - 1 if field.dtype is np.int32 else field.high,
        )
        for name, field in STEP_FIELDS.items()
    }
    observation = check_field(
        "batch.observation",
        batch.observation,
        "fiu",
        (b, layout.length, *layout.observation_shape),
        dtype=np.dtype(layout.observation_dtype),
    )
    weights = check_field("batch.weights", batch.weights, "f", (b,), dtype=np.float32, low=0)
    check_field("batch.keys", batch.keys, "iu", (b,))
    start, delta_q_states, delta_q_state_mask = _states(batch, layout, steps["valid_t"])
    leaves = tf.nest.flatten((start, delta_q_states))
    return UpdateFeed(
        observation=observation,
        floats=np.stack([steps[n] for n in _names(np.float32)]),
        ints=np.stack([steps[n] for n in _names(np.int32)]),
        bools=np.stack([steps[n] for n in _names(np.bool_)]),
        weights=weights,
        states=np.concatenate([a.reshape(b, -1) for a in leaves], axis=1)
        if leaves
        else np.zeros((b, 0), np.float32),
        delta_q_state_mask=np.stack(delta_q_state_mask) if delta_q_state_mask else np.zeros((0, b), bool),
    )


def unpack_feed(packed: UpdateFeed, layout: FeedLayout) -> Feed:
    """The update's named inputs, as tensors, from :func:`make_feed`'s arrays (inside the compiled update)."""
    steps: dict[str, tf.Tensor] = {}
    for dtype, stacked in ((np.float32, packed.floats), (np.int32, packed.ints), (np.bool_, packed.bools)):
        steps.update(zip(_names(dtype), tf.unstack(stacked)))
    # The states' arrays in make_feed's order: the start state's, then each ΔQ state's, layer by layer.
    b, k, shapes = layout.batch_size, len(layout.offsets.delta_q), layout.row_state_shapes
    flat = [shape for entry in shapes for shape in entry] * (1 + k)
    parts = tf.split(packed.states, [int(np.prod(shape)) for shape in flat], axis=1) if flat else []
    arrays = iter([tf.reshape(p, (b, *shape)) for p, shape in zip(parts, flat)])

    def one_state() -> tuple:
        return tuple(tuple(next(arrays) for _ in entry) for entry in shapes)

    state = one_state()
    return Feed(
        observation=packed.observation,
        **steps,
        has_action=steps["valid_t"] & ~steps["final"],
        weights=packed.weights,
        state=state,
        delta_q_states=tuple(one_state() for _ in range(k)),
        delta_q_state_mask=tuple(tf.unstack(packed.delta_q_state_mask, num=k)),
    )


def _names(dtype: type) -> list[str]:
    """The fields of :data:`STEP_FIELDS` of ``dtype``, in the table's order (their rows of the packed array)."""
    return [name for name, field in STEP_FIELDS.items() if field.dtype is dtype]


def _states(
    batch: SequenceBatch, layout: FeedLayout, valid_t: np.ndarray
) -> tuple[RecurrentState, tuple[RecurrentState, ...], list[np.ndarray]]:
    """The start state, the actor's state at each ΔQ offset and their row masks [B], checked; nothing
    without states."""
    if not layout.row_state_shapes:
        return (), (), []
    b, extra = layout.batch_size, layout.offsets.extra
    start = _check_state("batch.state", batch.state, layout)
    actor_state = _check_state("batch.actor_state", batch.actor_state, layout)
    extra_mask = check_field("batch.extra_state_mask", batch.extra_state_mask, "b", (b, len(extra)))
    extras = batch.extra_actor_states
    if not isinstance(extras, (tuple, list)) or len(extras) != len(extra):
        raise ValueError(
            f"batch.extra_actor_states: expected {len(extra)} states (offsets {extra}), got {extras!r:.60}"
        )
    actor_extras = tuple(
        _check_state(f"batch.extra_actor_states[{i}]", e, layout) for i, e in enumerate(extras)
    )
    # ΔQ compares with the actor's own states, even where a refresh replaced them.
    states, masks = [], []
    for o in layout.offsets.delta_q:
        if o == 0:
            states.append(actor_state)
            masks.append(valid_t[:, 0])
        else:
            states.append(actor_extras[extra.index(o)])
            masks.append(extra_mask[:, extra.index(o)])
    return start, tuple(states), masks


def _check_state(name: str, state: Any, layout: FeedLayout) -> RecurrentState:
    """A RecurrentState of the batch: the layers and arrays of ``row_state_shapes``, each [B, *shape], finite."""
    shapes = layout.row_state_shapes
    if not isinstance(state, (tuple, list)) or len(state) != len(shapes):
        raise ValueError(f"{name}: expected {len(shapes)} layers of states, got {type(state).__name__}")
    out = []
    for i, (entry, entry_shapes) in enumerate(zip(state, shapes)):
        if not isinstance(entry, (tuple, list)) or len(entry) != len(entry_shapes):
            raise ValueError(f"{name}[{i}]: expected {len(entry_shapes)} state arrays")
        out.append(
            tuple(
                check_field(f"{name}[{i}][{j}]", a, "f", (layout.batch_size, *shape), dtype=np.float32)
                for j, (a, shape) in enumerate(zip(entry, entry_shapes))
            )
        )
    return tuple(out)
