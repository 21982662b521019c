"""Read, write, reset and broadcast the recurrent state of Keras 3 stateful RNN layers."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from burnin._checks import check_int

__all__ = [
    "RecurrentState",
    "StateStructureError",
    "broadcast_row",
    "check_states",
    "get_states",
    "guard_batch_size",
    "reset_rows",
    "reset_states",
    "set_states",
    "state_shapes",
    "state_variables",
    "stateful_layers",
]

RecurrentState = tuple[tuple[np.ndarray, ...], ...]
"""One entry per stateful RNN layer, in ``model.layers`` order (nested models
included), holding that layer's state arrays (``[h, c]`` for LSTM, ``[h]`` for
GRU), each ``[batch, units]``."""


def _children(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    # A Model lists its layers in the documented, user-visible order; other
    # container layers (Bidirectional, custom wrappers) only track `_layers`.
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    return list(getattr(layer, "_layers", []))


def _is_stateful_rnn(layer: Any) -> bool:
    return isinstance(layer, keras.layers.RNN) and bool(layer.stateful)


def stateful_layers(model: keras.layers.Layer) -> list[keras.layers.RNN]:
    """Stateful RNN layers of ``model`` in ``model.layers`` order, depth first.

    ``model`` may be a Model (nested models are searched) or a single stateful
    RNN layer. Raises ``ValueError`` if there is none, ``TypeError`` if
    ``model`` is not a Keras layer.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"model: expected a keras.Model or a stateful keras RNN layer, got {type(model).__name__}"
        )
    found: list[keras.layers.RNN] = []
    seen: set[int] = set()

    def visit(layer: keras.layers.Layer) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if _is_stateful_rnn(layer):
            found.append(layer)
            return
        for child in _children(layer):
            visit(child)

    visit(model)
    if not found:
        raise ValueError(
            f"model {model.name!r} has no stateful RNN layer: build it with "
            "keras.layers.LSTM/GRU(..., stateful=True) and a fixed batch_shape"
        )
    return found


def state_variables(layer: keras.layers.RNN) -> list[Any]:
    """The state variables of one stateful RNN layer, flattened (``[h, c]`` for an LSTM, ``[h]`` for a GRU)."""
    if layer.states is None:
        raise ValueError(
            f"layer {layer.name!r} has no state variables yet: build the model "
            "with a fixed batch_shape (or call it once) first"
        )
    return list(keras.tree.flatten(layer.states))


def state_shapes(model: keras.layers.Layer) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Shapes of the state arrays, batch first (``[batch, units]`` for an LSTM's h and c), structured like a
    ``RecurrentState``. A replay stores rows: its ``row_state_shapes`` are these without the batch."""
    return tuple(
        tuple(tuple(int(d) for d in v.shape) for v in state_variables(layer))
        for layer in stateful_layers(model)
    )


def get_states(model: keras.layers.Layer) -> RecurrentState:
    """Copy the current recurrent state of every stateful RNN layer to numpy.

    The arrays are copies: later calls of the model do not change them.
    """
    return tuple(
        tuple(np.array(v.numpy(), copy=True) for v in state_variables(layer))
        for layer in stateful_layers(model)
    )


class StateStructureError(ValueError, TypeError):
    """``states`` is not structured like a RecurrentState. A ValueError (the state
    API's contract: a mismatch is a ValueError) that is also a TypeError."""


def _require_sequence(value: Any, where: str, expected: str) -> None:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise StateStructureError(f"{where}: expected {expected}, got {type(value).__name__}")


def check_states(model: keras.layers.Layer, states: Any) -> list[tuple[list[Any], list[np.ndarray]]]:
    """Check ``states`` against the layers of ``model`` without writing; return (variables, arrays) pairs.

    Raises what :func:`set_states` raises for a bad ``states``.
    """
    layers = stateful_layers(model)
    _require_sequence(
        states, "states", "a RecurrentState (a tuple with one tuple of arrays per stateful layer)"
    )
    if len(states) != len(layers):
        names = [layer.name for layer in layers]
        raise ValueError(
            f"states: model has {len(layers)} stateful RNN layers {names}, "
            f"but states has {len(states)} entries"
        )
    pairs = []
    for layer, entry in zip(layers, states):
        variables = state_variables(layer)
        _require_sequence(entry, f"states for layer {layer.name!r}", f"a tuple of {len(variables)} arrays")
        if len(entry) != len(variables):
            raise ValueError(
                f"states for layer {layer.name!r}: expected {len(variables)} arrays "
                f"({type(layer).__name__}), got {len(entry)}"
            )
        arrays = []
        for i, (var, value) in enumerate(zip(variables, entry)):
            arr = np.asarray(value)
            want_shape = tuple(int(d) for d in var.shape)
            want_dtype = np.dtype(keras.backend.standardize_dtype(var.dtype))
            where = f"states for layer {layer.name!r}, array {i}"
            if arr.shape != want_shape:
                raise ValueError(f"{where}: expected shape {want_shape}, got {arr.shape}")
            if arr.dtype != want_dtype:
                raise ValueError(
                    f"{where}: expected dtype {want_dtype}, got {arr.dtype} "
                    "(cast explicitly; a silent cast would break bitwise restore)"
                )
            if not np.isfinite(arr).all():
                raise ValueError(f"{where}: contains NaN or inf")
            arrays.append(arr)
        pairs.append((variables, arrays))
    return pairs


def set_states(model: keras.layers.Layer, states: RecurrentState) -> None:
    """Restore ``states`` into the stateful RNN layers of ``model``, bit for bit.

    Everything is validated before anything is written, so a bad ``states``
    leaves the model's state unchanged.
    """
    for variables, arrays in check_states(model, states):
        for var, arr in zip(variables, arrays):
            var.assign(arr)


def reset_states(model: keras.layers.Layer) -> None:
    """Set every state array of every stateful RNN layer of ``model`` to zeros."""
    for layer in stateful_layers(model):
        for var in state_variables(layer):
            var.assign(np.zeros(var.shape, dtype=keras.backend.standardize_dtype(var.dtype)))


def _row_indices(rows: Any, batch: int) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.dtype == np.bool_:
        if arr.shape != (batch,):
            raise ValueError(f"rows: a bool mask must have shape ({batch},), got {arr.shape}")
        return np.flatnonzero(arr)
    if arr.size == 0:
        return np.zeros((0,), dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"rows: expected a bool mask or int indices, got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    bad = arr[(arr < 0) | (arr >= batch)]
    if bad.size:
        raise ValueError(f"rows: indices must be in [0, {batch}), got {bad.tolist()}")
    return arr


def reset_rows(model: keras.layers.Layer, rows: Any) -> None:
    """Zero the state of the given batch rows; every other row is untouched bit for bit.

    ``rows`` is a bool mask ``[batch]`` or an array of int indices.
    """
    layers = stateful_layers(model)
    variables = [v for layer in layers for v in state_variables(layer)]
    batches = {int(v.shape[0]) for v in variables}
    if len(batches) != 1:
        raise ValueError(f"model: stateful layers have different batch sizes {sorted(batches)}")
    idx = _row_indices(rows, batches.pop())
    if idx.size == 0:
        return
    for var in variables:
        arr = np.array(var.numpy(), copy=True)
        arr[idx] = 0
        var.assign(arr)


def broadcast_row(states: RecurrentState, row: int) -> RecurrentState:
    """Return a copy of ``states`` where every row equals row ``row`` (article case 5)."""
    check_int("row", row)
    if not isinstance(states, Sequence) or isinstance(states, (str, bytes)):
        raise TypeError(
            "states: expected a RecurrentState (a tuple with one tuple of arrays per stateful layer), "
            f"got {type(states).__name__}"
        )
    out = []
    for i, entry in enumerate(states):
        if not isinstance(entry, Sequence) or isinstance(entry, (str, bytes)):
            raise TypeError(f"states[{i}]: expected a tuple of state arrays, got {type(entry).__name__}")
        arrays = []
        for j, value in enumerate(entry):
            arr = np.asarray(value)
            if arr.ndim < 1 or not 0 <= row < arr.shape[0]:
                raise ValueError(f"row: {row} is out of range for states[{i}][{j}] of shape {arr.shape}")
            arrays.append(np.broadcast_to(arr[row : row + 1], arr.shape).copy())
        out.append(tuple(arrays))
    return tuple(out)


_BATCH_SIZE_POSITION = {"predict": 1, "evaluate": 2, "fit": 2}
_GUARDED_METHODS = ("predict", "predict_on_batch", "train_on_batch", "test_on_batch", "evaluate", "fit")


def _leading_sizes(x: Any) -> set[int]:
    sizes = set()
    for leaf in keras.tree.flatten(x):
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape) > 0 and shape[0] is not None:
            sizes.add(int(shape[0]))
    return sizes


def guard_batch_size(model: keras.Model) -> keras.Model:
    """Make ``model`` raise on a batch size other than its stateful layers' fixed batch.

    Keras broadcasts a batch of 1 (or a ragged last batch in ``predict``) over
    all state rows without a word (keras issue 21183). After this call:

    * ``predict``, ``predict_on_batch``, ``train_on_batch``, ``test_on_batch``,
      ``evaluate`` and ``fit`` check array inputs before running anything and
      raise ``ValueError``: the number of rows must be a multiple of the fixed
      batch, and ``batch_size`` (if given) must equal it;
    * every stateful RNN layer checks its input batch in the graph as well, so
      datasets and generators fail with ``tf.errors.InvalidArgumentError``
      instead of broadcasting.

    Returns ``model`` itself; calling it twice is harmless.
    """
    layers = stateful_layers(model)
    batches = {int(state_variables(layer)[0].shape[0]) for layer in layers}
    if len(batches) != 1:
        raise ValueError(f"model: stateful layers have different batch sizes {sorted(batches)}")
    batch = batches.pop()
    if getattr(model, "_burnin_batch_guard", None) == batch:
        return model

    for layer in layers:
        _guard_layer(layer, batch)

    for name in _GUARDED_METHODS:
        method = getattr(model, name, None)
        if method is not None:
            setattr(model, name, _guard_method(method, name, batch, model.name))
    model._burnin_batch_guard = batch
    return model


def _guard_layer(layer: keras.layers.RNN, batch: int) -> None:
    original = layer.call

    @functools.wraps(original)
    def call(sequences, *args, **kwargs):
        static = sequences.shape[0]
        if static is None:
            tf.debugging.assert_equal(
                tf.shape(sequences)[0],
                batch,
                message=(
                    f"layer {layer.name!r} is stateful with a fixed batch of {batch}; "
                    "a different batch size would be broadcast over the state rows"
                ),
            )
        return original(sequences, *args, **kwargs)

    layer.call = call


def _guard_method(method: Any, name: str, batch: int, model_name: str) -> Any:
    @functools.wraps(method)
    def guarded(*args, **kwargs):
        x = args[0] if args else kwargs.get("x")
        pos = _BATCH_SIZE_POSITION.get(name)
        batch_size = args[pos] if pos is not None and len(args) > pos else kwargs.get("batch_size")
        if batch_size is not None and batch_size != batch:
            raise ValueError(
                f"{name}: batch_size={batch_size}, but model {model_name!r} is stateful "
                f"with a fixed batch of {batch}"
            )
        sizes = _leading_sizes(x)
        for size in sizes:
            bad = size != batch if name.endswith("_on_batch") else size % batch != 0
            if bad:
                raise ValueError(
                    f"{name}: x has {size} rows, but model {model_name!r} is stateful with a "
                    f"fixed batch of {batch}; Keras would broadcast the state rows silently"
                )
        if pos is not None and batch_size is None and sizes and not (len(args) > pos):
            # Keras would default to 32 rows per batch; the only valid choice is ours.
            kwargs["batch_size"] = batch
        return method(*args, **kwargs)

    return guarded
