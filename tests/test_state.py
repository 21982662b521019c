"""Tests for burnin.state: get/set/reset/broadcast of recurrent state and the batch-size guard."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_states_equal, lstm_model, nested_model, random_state, stacked_model

import burnin

MODES = ["eager", "function"]


def caller(model: keras.Model, mode: str):
    """model(x) run eagerly, or through a tf.function (both advance the state)."""
    if mode == "eager":
        return lambda x: keras.ops.convert_to_numpy(model(x))
    fn = tf.function(lambda x: model(x))
    return lambda x: fn(tf.constant(x)).numpy()


def gru_model(batch: int = 4) -> keras.Model:
    keras.utils.set_random_seed(1)
    inputs = keras.Input(batch_shape=(batch, None, 3))
    x = keras.layers.GRU(5, stateful=True, return_sequences=True, name="gru")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(x), name="gru_model")


MODELS = {"lstm": lstm_model, "gru": gru_model, "stacked": stacked_model, "nested": nested_model}


# ------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("factory", "names", "arrays"),
    [
        ("lstm", ["lstm"], [2]),
        ("gru", ["gru"], [1]),
        ("stacked", ["lstm_a", "gru_b", "lstm_c"], [2, 1, 2]),
        ("nested", ["outer_lstm", "inner_gru", "last_lstm"], [2, 1, 2]),
    ],
)
def test_layers_found_in_model_order(factory, names, arrays):
    model = MODELS[factory]()
    assert [layer.name for layer in burnin.stateful_layers(model)] == names
    states = burnin.get_states(model)
    assert [len(entry) for entry in states] == arrays
    for layer, entry in zip(burnin.stateful_layers(model), states):
        for arr in entry:
            assert arr.shape == (4, layer.units)
            assert arr.dtype == np.float32


def test_single_layer_accepted():
    model = lstm_model()
    layer = model.get_layer("lstm")
    states = burnin.get_states(layer)
    assert len(states) == 1 and len(states[0]) == 2
    burnin.set_states(layer, burnin.get_states(layer))


def test_get_states_returns_copies(rng):
    model = lstm_model()
    before = burnin.get_states(model)
    snapshot = [a.copy() for a in before[0]]
    model(rng.standard_normal((4, 5, 3)).astype(np.float32))
    for a, b in zip(before[0], snapshot):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(burnin.get_states(model)[0][0], before[0][0])


# -------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factory", sorted(MODELS))
def test_restore_reproduces_outputs_bitwise(factory, mode, rng):
    model = MODELS[factory]()
    run = caller(model, mode)
    x = rng.standard_normal((4, 6, 3)).astype(np.float32)
    burnin.set_states(model, random_state(model, rng))
    run(x)  # move to some non-trivial state
    saved = burnin.get_states(model)
    first = run(x)
    after_first = burnin.get_states(model)
    run(x)
    burnin.set_states(model, saved)
    np.testing.assert_array_equal(run(x), first)
    assert_states_equal(burnin.get_states(model), after_first)


@pytest.mark.parametrize("factory", sorted(MODELS))
def test_set_get_round_trip(factory, rng):
    model = MODELS[factory]()
    states = random_state(model, rng)
    burnin.set_states(model, states)
    assert_states_equal(burnin.get_states(model), states)


@pytest.mark.parametrize("factory", sorted(MODELS))
def test_reset_states_zeroes_everything(factory, rng):
    model = MODELS[factory]()
    burnin.set_states(model, random_state(model, rng))
    burnin.reset_states(model)
    for entry in burnin.get_states(model):
        for arr in entry:
            assert not arr.any()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [np.array([1, 3]), np.array([False, True, False, True])])
def test_reset_rows_equals_zero_state_run(rows, mode, rng):
    """Reset rows behave exactly as a zero-state start; the other rows are bit-identical."""
    model = stacked_model()
    run = caller(model, mode)
    x = rng.standard_normal((4, 7, 3)).astype(np.float32)
    start = random_state(model, rng)
    reset = np.zeros(4, bool)
    reset[rows] = True

    burnin.set_states(model, start)
    burnin.reset_rows(model, rows)
    after_reset = burnin.get_states(model)
    for entry_before, entry_after in zip(start, after_reset):
        for b, a in zip(entry_before, entry_after):
            assert not a[reset].any()
            np.testing.assert_array_equal(a[~reset], b[~reset])
    out = run(x)

    burnin.reset_states(model)
    zero_out = run(x)
    burnin.set_states(model, start)
    kept_out = run(x)
    np.testing.assert_array_equal(out[reset], zero_out[reset])
    np.testing.assert_array_equal(out[~reset], kept_out[~reset])


def test_reset_rows_empty_is_noop(rng):
    model = lstm_model()
    start = random_state(model, rng)
    burnin.set_states(model, start)
    burnin.reset_rows(model, np.array([], dtype=int))
    burnin.reset_rows(model, np.zeros(4, bool))
    assert_states_equal(burnin.get_states(model), start)


def test_broadcast_row(rng):
    model = stacked_model()
    states = random_state(model, rng)
    out = burnin.broadcast_row(states, 2)
    for entry_in, entry_out in zip(states, out):
        for a, b in zip(entry_in, entry_out):
            assert b.shape == a.shape
            for r in range(4):
                np.testing.assert_array_equal(b[r], a[2])
            b[0, 0] = 123.0  # the result is writable and independent
            assert a[0, 0] != 123.0 or a[2, 0] == 123.0


@pytest.mark.parametrize("mode", MODES)
def test_broadcast_row_reproduces_that_row(mode, rng):
    model = lstm_model()
    run = caller(model, mode)
    x = np.repeat(rng.standard_normal((1, 5, 3)).astype(np.float32), 4, axis=0)
    states = random_state(model, rng)
    burnin.set_states(model, states)
    reference = run(x)
    burnin.set_states(model, burnin.broadcast_row(states, 1))
    out = run(x)
    for r in range(4):
        np.testing.assert_array_equal(out[r], reference[1])


# ------------------------------------------------------------------- errors


def _states(model, rng, edit):
    states = [list(entry) for entry in random_state(model, rng)]
    edit(states)
    return tuple(tuple(entry) for entry in states)


def _set_nan(s):
    s[1][0] = s[1][0].copy()
    s[1][0][0, 0] = np.nan


def _set_inf(s):
    s[0][1] = s[0][1].copy()
    s[0][1][2, 1] = np.inf


BAD_STATES = {
    "too_few_layers": (lambda s: s.pop(), ValueError, "3 stateful RNN layers"),
    "too_many_layers": (lambda s: s.append(s[0]), ValueError, "has 4 entries"),
    "too_few_arrays": (lambda s: s[0].pop(), ValueError, "'lstm_a': expected 2 arrays"),
    "too_many_arrays": (lambda s: s[1].append(s[1][0]), ValueError, "'gru_b': expected 1 arrays"),
    "wrong_batch": (
        lambda s: s.__setitem__(2, [s[2][0][:3], s[2][1]]),
        ValueError,
        "'lstm_c', array 0: expected shape (4, 3)",
    ),
    "wrong_units": (
        lambda s: s.__setitem__(1, [np.zeros((4, 5), np.float32)]),
        ValueError,
        "'gru_b', array 0: expected shape (4, 4)",
    ),
    "wrong_dtype": (
        lambda s: s.__setitem__(1, [s[1][0].astype(np.float64)]),
        ValueError,
        "expected dtype float32, got float64",
    ),
    "nan": (_set_nan, ValueError, "'gru_b', array 0: contains NaN"),
    "inf": (_set_inf, ValueError, "'lstm_a', array 1: contains NaN or inf"),
    "entry_not_tuple": (
        lambda s: s.__setitem__(0, np.zeros((4, 6), np.float32)),
        ValueError,
        "'lstm_a': expected 2 arrays",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_set_states_rejects_bad_input_and_changes_nothing(case, rng):
    model = stacked_model()
    good = random_state(model, rng)
    burnin.set_states(model, good)
    edit, error, message = BAD_STATES[case]
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        burnin.set_states(model, _states(model, rng, edit))
    assert_states_equal(burnin.get_states(model), good)


def no_state_model():
    inputs = keras.Input(batch_shape=(4, None, 3))
    x = keras.layers.LSTM(3, return_sequences=True)(inputs)  # not stateful
    return keras.Model(inputs, x, name="stateless")


BAD_CALLS = {
    "get_no_stateful_layer": (
        lambda m: burnin.get_states(no_state_model()),
        ValueError,
        "has no stateful RNN layer",
    ),
    "set_no_stateful_layer": (
        lambda m: burnin.set_states(no_state_model(), ()),
        ValueError,
        "has no stateful RNN layer",
    ),
    "reset_no_stateful_layer": (
        lambda m: burnin.reset_states(no_state_model()),
        ValueError,
        "has no stateful RNN layer",
    ),
    "not_a_model": (lambda m: burnin.get_states(np.zeros(3)), TypeError, "expected a keras.Model"),
    "states_not_sequence": (
        lambda m: burnin.set_states(m, 3.0),
        ValueError,  # a StateStructureError, also a TypeError
        "states: expected a RecurrentState",
    ),
    "entry_is_one_array": (
        lambda m: burnin.set_states(m, (np.zeros((2, 4, 8), np.float32),)),
        ValueError,
        "states for layer 'lstm': expected a tuple of 2 arrays, got ndarray",
    ),
    "rows_out_of_range": (
        lambda m: burnin.reset_rows(m, [0, 4]),
        ValueError,
        r"rows: indices must be in \[0, 4\), got \[4\]",
    ),
    "rows_negative": (lambda m: burnin.reset_rows(m, [-1]), ValueError, r"got \[-1\]"),
    "rows_mask_length": (lambda m: burnin.reset_rows(m, np.ones(3, bool)), ValueError, r"shape \(4,\)"),
    "rows_float": (
        lambda m: burnin.reset_rows(m, [0.5]),
        TypeError,
        "rows: expected a bool mask or int indices",
    ),
    "broadcast_row_range": (
        lambda m: burnin.broadcast_row(burnin.get_states(m), 4),
        ValueError,
        "row: 4 is out of range",
    ),
    "broadcast_row_type": (
        lambda m: burnin.broadcast_row(burnin.get_states(m), 1.0),
        TypeError,
        "row: expected an int",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_calls_raise(case):
    model = lstm_model()
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call(model)


def test_structure_errors_are_value_and_type_errors():
    model = lstm_model()
    with pytest.raises(TypeError):
        burnin.set_states(model, 3.0)
    assert issubclass(burnin.state.StateStructureError, ValueError)


def test_unbuilt_layer_is_reported():
    layer = keras.layers.LSTM(3, stateful=True, name="fresh")
    with pytest.raises(ValueError, match="'fresh' has no state variables yet"):
        burnin.get_states(layer)


# -------------------------------------------------------------- batch guard


def guarded_model():
    return burnin.guard_batch_size(lstm_model(batch=6))


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (7, {}, "x has 7 rows"),
        (1, {}, "x has 1 rows"),
        (6, {"batch_size": 1}, "batch_size=1"),
        (12, {"batch_size": 4}, "batch_size=4"),
    ],
)
def test_guard_rejects_broadcasting_predict(rows, kwargs, message, rng):
    model = guarded_model()
    start = random_state(model, rng)
    burnin.set_states(model, start)
    with pytest.raises(ValueError, match=message):
        model.predict(rng.standard_normal((rows, 3, 3)).astype(np.float32), verbose=0, **kwargs)
    assert_states_equal(burnin.get_states(model), start)


def test_unguarded_predict_broadcasts_silently(rng):
    """The Keras behaviour the guard exists for (keras issue 21183)."""
    model = lstm_model(batch=6)
    out = model.predict(rng.standard_normal((7, 3, 3)).astype(np.float32), batch_size=6, verbose=0)
    assert out.shape[0] == 12  # 7 rows in, 12 out: the last row was broadcast over all 6 state rows


def test_guard_defaults_predict_batch_and_matches_call(rng):
    model = guarded_model()
    x = rng.standard_normal((12, 3, 3)).astype(np.float32)
    burnin.reset_states(model)
    out = model.predict(x, verbose=0)  # batch_size defaults to the model's 6, not Keras' 32
    burnin.reset_states(model)
    first = keras.ops.convert_to_numpy(model(x[:6]))
    second = keras.ops.convert_to_numpy(model(x[6:]))
    np.testing.assert_array_equal(out, np.concatenate([first, second]))


def test_guard_train_on_batch(rng):
    model = guarded_model()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="train_on_batch: x has 12 rows"):
        model.train_on_batch(rng.standard_normal((12, 3, 3)), rng.standard_normal((12, 3, 2)))
    model.train_on_batch(rng.standard_normal((6, 3, 3)), rng.standard_normal((6, 3, 2)))


def test_guard_in_graph_for_datasets(rng):
    model = guarded_model()
    data = tf.data.Dataset.from_tensor_slices(rng.standard_normal((7, 3, 3)).astype(np.float32)).batch(6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="fixed batch of 6"):
        model.predict(data, verbose=0)


def test_guard_is_idempotent(rng):
    model = guarded_model()
    assert burnin.guard_batch_size(model) is model
    out = model.predict(rng.standard_normal((6, 3, 3)).astype(np.float32), verbose=0)
    assert out.shape == (6, 3, 2)


def test_broadcast_row_of_no_states_names_the_argument():
    """Issue 11 item 13: broadcast_row(None, 0) raised a raw TypeError that named nothing."""
    with pytest.raises(TypeError, match=r"states: expected a RecurrentState .* got NoneType"):
        burnin.broadcast_row(None, 0)
    with pytest.raises(TypeError, match=r"states\[0\]: expected a tuple of state arrays, got ndarray"):
        burnin.broadcast_row((np.zeros((2, 3)),), 0)
    with pytest.raises(TypeError, match="row: expected an int, got float 1.0"):
        burnin.broadcast_row(((np.zeros((2, 3)),),), 1.0)
