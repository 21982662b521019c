"""Tests for BurnInRunner: exact splitting, stored-state restore, masking, no gradient in burn-in, tracing."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_states_equal, lstm_model, nested_model, random_state, stacked_model

import burnin
from agents.r2d2.networks import NetworkConfig, build_q_network

T = 12
MODES = ["eager", "function"]


def run(runner: burnin.BurnInRunner, mode: str, x, states=None, mask=None) -> burnin.RunnerOutput:
    """The runner's uncompiled pass run eagerly, or its compiled tf.function."""
    if mode == "eager":
        return runner.run(
            tf.nest.map_structure(tf.constant, x), states, mask=None if mask is None else tf.constant(mask)
        )
    return runner(x, states, mask=mask)


def np_states(states):
    return tuple(tuple(np.asarray(a) for a in entry) for entry in states)


def reference(model, x, states):
    """Plain model call over the whole window from `states`; returns (outputs, final states)."""
    burnin.set_states(model, states)
    out = keras.ops.convert_to_numpy(model(x))
    return out, burnin.get_states(model)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factory", [lstm_model, stacked_model, nested_model])
@pytest.mark.parametrize(
    ("burn_in", "offsets"), [(0, ()), (1, (5,)), (4, (4, 8, T)), (7, (0, 3, 11)), (T - 1, (6,))]
)
def test_split_equals_one_call(factory, burn_in, offsets, mode, rng):
    """Cutting the window at burn_in and at every offset changes nothing, bit for bit."""
    model = factory()
    x = rng.standard_normal((4, T, 3)).astype(np.float32)
    start = random_state(model, rng)
    full, final = reference(model, x, start)

    runner = burnin.BurnInRunner(model, burn_in=burn_in, state_offsets=offsets)
    out = run(runner, mode, x, start)
    np.testing.assert_array_equal(out.outputs.numpy(), full[:, burn_in:])
    assert_states_equal(np_states(out.final_state), final)
    assert_states_equal(burnin.get_states(model), final)
    for o, state in zip(offsets, out.offset_states):
        _, expected = reference(model, x[:, :o], start) if o else (None, start)
        assert_states_equal(np_states(state), expected)
    _, expected_burn = reference(model, x[:, :burn_in], start) if burn_in else (None, start)
    assert_states_equal(np_states(out.burn_in_state), expected_burn)


@pytest.mark.parametrize("mode", MODES)
def test_every_split_point_of_a_q_network(mode, rng):
    """The multi-input Q-network: every burn-in length gives the same outputs as one call."""
    config = NetworkConfig(obs_dim=3, num_actions=4, core_units=16, torso_units=(8,), head_units=8)
    model = build_q_network(config, batch_size=4, seed=3)
    x = [
        rng.standard_normal((4, T, 3)).astype(np.float32),
        rng.integers(0, 4, (4, T)).astype(np.int32),
        rng.standard_normal((4, T)).astype(np.float32),
    ]
    start = random_state(model, rng)
    full, final = reference(model, x, start)
    for burn_in in range(T):
        runner = burnin.BurnInRunner(model, burn_in=burn_in)
        out = run(runner, mode, x, start)
        np.testing.assert_array_equal(out.outputs.numpy(), full[:, burn_in:])
        assert_states_equal(np_states(out.final_state), final)


@pytest.mark.parametrize("mode", MODES)
def test_no_states_means_zero_state(mode, rng):
    model = lstm_model()
    x = rng.standard_normal((4, T, 3)).astype(np.float32)
    burnin.set_states(model, random_state(model, rng))  # must be overwritten, not used
    out = run(burnin.BurnInRunner(model, burn_in=3), mode, x, None)
    zeros = tuple(tuple(np.zeros_like(a) for a in entry) for entry in burnin.get_states(model))
    full, _ = reference(model, x, zeros)
    np.testing.assert_array_equal(out.outputs.numpy(), full[:, 3:])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("burn_in", [0, 2, 5])
def test_left_padded_window_equals_zero_state_start(burn_in, mode, rng):
    """Rows left-padded by p masked steps equal a zero-state run on their valid steps."""
    model = stacked_model()
    pads = np.array([0, 1, 3, 6])
    x = rng.standard_normal((4, T, 3)).astype(np.float32) * 10  # padding holds garbage on purpose
    mask = np.arange(T)[None, :] >= pads[:, None]
    zeros = tuple(tuple(np.zeros_like(a) for a in entry) for entry in random_state(model, rng))
    runner = burnin.BurnInRunner(model, burn_in=burn_in)
    out = run(runner, mode, x, zeros, mask).outputs.numpy()
    for row, p in enumerate(pads):
        ref, _ = reference(model, x[:, p:], zeros)
        first = max(burn_in, p)
        np.testing.assert_array_equal(out[row, first - burn_in :], ref[row, first - p :])


@pytest.mark.parametrize("mode", MODES)
def test_right_padding_leaves_valid_steps_and_freezes_state(mode, rng):
    model = lstm_model()
    x = rng.standard_normal((4, T, 3)).astype(np.float32)
    mask = np.ones((4, T), bool)
    mask[2, 9:] = False
    start = random_state(model, rng)
    out = run(burnin.BurnInRunner(model, burn_in=2), mode, x, start, mask)
    full, _ = reference(model, x, start)
    np.testing.assert_array_equal(out.outputs.numpy()[:, : 9 - 2], full[:, 2:9])
    _, at_nine = reference(model, x[:, :9], start)
    for arr, want in zip(out.final_state[0], at_nine[0]):
        np.testing.assert_array_equal(arr.numpy()[2], want[2])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("burn_in", [1, 4, 8])
def test_no_gradient_reaches_burn_in(burn_in, mode, rng):
    model = stacked_model()
    x = tf.constant(rng.standard_normal((4, T, 3)).astype(np.float32))
    start = random_state(model, rng)
    runner = burnin.BurnInRunner(model, burn_in=burn_in)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        out = run(runner, mode, x, start)
        loss = tf.reduce_sum(tf.square(out.outputs))
    grad_x = tape.gradient(loss, x).numpy()
    grad_w = tape.gradient(loss, model.trainable_variables)
    assert not grad_x[:, :burn_in].any()
    assert np.abs(grad_x[:, burn_in:]).min(axis=-1).max() > 0

    # The weight gradients are those of the unroll alone, started from the burned-in state.
    burned = np_states(out.burn_in_state)
    burnin.set_states(model, burned)
    with tf.GradientTape() as ref_tape:
        ref_loss = tf.reduce_sum(tf.square(model(x[:, burn_in:])))
    ref_w = ref_tape.gradient(ref_loss, model.trainable_variables)
    np.testing.assert_array_equal(loss.numpy(), ref_loss.numpy())
    for g, r in zip(grad_w, ref_w):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-6, atol=1e-7)


def unroll_gradients(runner, mode, x, start):
    """d loss / d (inputs, weights) for loss = Σ outputs² over the differentiable steps."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = run(runner, mode, x, start)
        steps = runner.gradient_steps or out.outputs.shape[1]
        loss = tf.reduce_sum(tf.square(out.outputs[:, :steps]))
    return out, tape.gradient(loss, [x, *runner.model.trainable_variables])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("offsets", [(5,), (4, 7, 9), (2, 6, T)])
def test_offsets_inside_the_unroll_do_not_cut_the_gradient(offsets, mode, rng):
    """Asking for states inside the unroll changes neither outputs nor gradients, bit for bit."""
    model = stacked_model()
    x = tf.constant(rng.standard_normal((4, T, 3)).astype(np.float32))
    start = random_state(model, rng)
    plain_out, plain = unroll_gradients(burnin.BurnInRunner(model, burn_in=3), mode, x, start)
    runner = burnin.BurnInRunner(model, burn_in=3, state_offsets=offsets)
    out, grads = unroll_gradients(runner, mode, x, start)
    np.testing.assert_array_equal(out.outputs.numpy(), plain_out.outputs.numpy())
    for g, p in zip(grads, plain):
        np.testing.assert_array_equal(g.numpy(), p.numpy())
    # The loss at the last step still reaches inputs before every offset (full BPTT).
    first_inside = min(o for o in offsets if o > 3)
    assert np.abs(grads[0].numpy()[:, 3:first_inside]).max() > 0
    # The offset states are still exact, and the model ends in the final state.
    for o, state in zip(offsets, out.offset_states):
        _, expected = reference(model, x.numpy()[:, :o], start)
        assert_states_equal(np_states(state), expected)
    _, final = reference(model, x.numpy(), start)
    assert_states_equal(np_states(out.final_state), final)
    runner_final = run(runner, mode, x, start).final_state
    assert_states_equal(burnin.get_states(model), np_states(runner_final))


@pytest.mark.parametrize("mode", MODES)
def test_tail_runs_without_gradient(mode, rng):
    model = lstm_model()
    x = tf.constant(rng.standard_normal((4, T, 3)).astype(np.float32))
    start = random_state(model, rng)
    full, final = reference(model, x.numpy(), start)
    runner = burnin.BurnInRunner(model, burn_in=2, gradient_steps=6, state_offsets=(10,))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        out = run(runner, mode, x, start)
        head = tf.reduce_sum(tf.square(out.outputs[:, :6]))
        tail = tf.reduce_sum(tf.square(out.outputs[:, 6:]))
    np.testing.assert_array_equal(out.outputs.numpy(), full[:, 2:])
    assert_states_equal(np_states(out.final_state), final)
    # The tail reaches no weight (zeros, not None: the concatenation links it to the unroll).
    assert all(g is None or not np.any(g.numpy()) for g in tape.gradient(tail, model.trainable_variables))
    grad_x = tape.gradient(head, x).numpy()
    assert not grad_x[:, :2].any() and not grad_x[:, 8:].any() and grad_x[:, 2:8].any()
    # Same weight gradients as a runner without a tail, on the same 6 steps.
    _, plain = unroll_gradients(burnin.BurnInRunner(model, burn_in=2), mode, x[:, :8], start)
    for g, p in zip(tape.gradient(head, model.trainable_variables), plain[1:]):
        np.testing.assert_array_equal(g.numpy(), p.numpy())


def test_trace_count_stays_one(rng):
    model = stacked_model()
    runner = burnin.BurnInRunner(model, burn_in=3, state_offsets=(6,))
    for _ in range(25):
        x = rng.standard_normal((4, T, 3)).astype(np.float32)
        mask = rng.random((4, T)) > 0.2
        runner(x, random_state(model, rng), mask=mask)
    assert runner.trace_count == 1


def test_trace_count_under_an_outer_tape(rng):
    model = lstm_model()
    runner = burnin.BurnInRunner(model, burn_in=3)
    for _ in range(10):
        with tf.GradientTape() as tape:
            out = runner(rng.standard_normal((4, T, 3)).astype(np.float32), random_state(model, rng))
            loss = tf.reduce_sum(out.outputs)
        tape.gradient(loss, model.trainable_variables)
    assert runner.trace_count == 1


class DropMask(keras.layers.Layer):
    """A layer that forgets to declare mask support, as many custom layers do."""

    def call(self, x):
        return x * 1.0


MASK_BREAKERS = [
    # (the layer before the LSTM, the advice the error gives) — issue 24: a Masking layer got the advice
    # for a layer that drops the mask, which does not apply to it.
    (DropMask, r"some layer before it drops the Keras mask \(give custom layers supports_masking = True\)"),
    (
        lambda: keras.layers.Masking(name="pad"),
        r"keras.layers.Masking \['pad'\] computes its own mask from the input values and replaces the mask "
        r"given here; remove it",
    ),
]


@pytest.mark.parametrize(("layer", "advice"), MASK_BREAKERS, ids=["drops the mask", "Masking"])
def test_model_that_breaks_the_mask_is_rejected_with_advice_that_applies(layer, advice, rng):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(batch_shape=(4, None, 3))
    x = keras.layers.LSTM(5, stateful=True, return_sequences=True, name="lstm")(layer()(inputs))
    model = keras.Model(inputs, x)
    runner = burnin.BurnInRunner(model, burn_in=2)
    start = random_state(model, rng)
    burnin.set_states(model, start)
    with pytest.raises(ValueError, match=f"fully masked step changed the state of layer 'lstm'; {advice}"):
        runner(rng.standard_normal((4, T, 3)).astype(np.float32), None, mask=np.ones((4, T), bool))
    assert_states_equal(burnin.get_states(model), start)  # the probe puts the state back


@pytest.mark.parametrize("mode", MODES)
def test_a_window_that_is_all_burn_in_returns_empty_outputs(mode, rng):
    """Issue 24: T == burn_in gave outputs=None; it is [B, 0, A], with the states as for any window."""
    model = lstm_model()
    x = rng.standard_normal((4, T, 3)).astype(np.float32)
    start = random_state(model, rng)
    out = run(burnin.BurnInRunner(model, burn_in=T, state_offsets=(T,)), mode, x, start)
    assert out.outputs.shape == (4, 0, 2) and out.outputs.dtype == tf.float32
    longer = run(burnin.BurnInRunner(model, burn_in=T - 1), mode, x, start)
    assert_states_equal(np_states(out.burn_in_state), np_states(longer.final_state))
    assert_states_equal(np_states(out.offset_states[0]), np_states(out.final_state))


def test_q_network_passes_the_masking_check(rng):
    config = NetworkConfig(obs_dim=3, num_actions=2, core_units=8, torso_units=(8,), head_units=8)
    model = build_q_network(config, batch_size=4)
    runner = burnin.BurnInRunner(model, burn_in=2)
    x = [
        rng.standard_normal((4, T, 3)).astype(np.float32),
        np.zeros((4, T), np.int32),
        np.zeros((4, T), np.float32),
    ]
    runner.check_masking(x)


def test_stateless_model_needs_opt_in(rng):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(batch_shape=(4, None, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="no stateful RNN layer"):
        burnin.BurnInRunner(model, burn_in=2)
    runner = burnin.BurnInRunner(model, burn_in=2, allow_stateless=True)
    x = rng.standard_normal((4, T, 3)).astype(np.float32)
    out = runner(x, None, mask=np.ones((4, T), bool))
    np.testing.assert_array_equal(out.outputs.numpy(), keras.ops.convert_to_numpy(model(x))[:, 2:])
    assert out.final_state == ()


def test_jit_compile_matches_within_tolerance(rng):
    """XLA fuses differently, so it is not bitwise; it stays within float32 rounding."""
    model = stacked_model()
    x = rng.standard_normal((4, T, 3)).astype(np.float32)
    start = random_state(model, rng)
    plain = burnin.BurnInRunner(model, burn_in=4)(x, start).outputs.numpy()
    jitted = burnin.BurnInRunner(model, burn_in=4, jit_compile=True)(x, start).outputs.numpy()
    np.testing.assert_allclose(jitted, plain, rtol=1e-5, atol=1e-6)


BAD_CONSTRUCT = {
    "negative_burn_in": ({"burn_in": -1}, ValueError, "burn_in: expected an int >= 0, got -1"),
    "float_burn_in": ({"burn_in": 2.0}, TypeError, "burn_in: expected an int, got float 2.0"),
    "negative_offset": (
        {"burn_in": 1, "state_offsets": (-2,)},
        ValueError,
        "state_offsets: expected an int >= 0, got -2",
    ),
    "duplicate_offsets": ({"burn_in": 1, "state_offsets": (3, 3)}, ValueError, "expected distinct offsets"),
    "gradient_steps": (
        {"burn_in": 1, "gradient_steps": 0},
        ValueError,
        "gradient_steps: expected an int >= 1, got 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONSTRUCT))
def test_bad_construction(case):
    kwargs, error, message = BAD_CONSTRUCT[case]
    with pytest.raises(error, match=message):
        burnin.BurnInRunner(lstm_model(), **kwargs)


def test_not_a_model():
    with pytest.raises(TypeError, match="model: expected a keras.Model"):
        burnin.BurnInRunner("lstm", burn_in=1)


BAD_CALLS = {
    "wrong_batch": (lambda r, x, m, s: r(x[:3], s), ValueError, "expected batch 4"),
    "too_short": (lambda r, x, m, s: r(x[:, :2], s), ValueError, "shorter than burn_in=3"),
    "rank": (
        lambda r, x, m, s: r(x[:, 0], s),
        ValueError,
        r"inputs\[0\]: expected shape \(4, None, 3\) \(batch, time, ...\), got \(4, 3\)",
    ),
    "features": (lambda r, x, m, s: r(x[..., :2], s), ValueError, r"expected shape \(4, None, 3\)"),
    "mask_dtype": (
        lambda r, x, m, s: r(x, s, mask=m.astype(np.float32)),
        TypeError,
        "mask: expected dtype bool",
    ),
    "mask_shape": (lambda r, x, m, s: r(x, s, mask=m[:, :-1]), ValueError, r"mask: expected shape \(4, 12\)"),
    "state_shape": (
        lambda r, x, m, s: r(x, ((s[0][0][:2], s[0][1]),)),
        ValueError,
        "layer 'lstm', array 0: expected shape",
    ),
    "state_nan": (lambda r, x, m, s: r(x, ((s[0][0] * np.nan, s[0][1]),)), ValueError, "contains NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_calls(case, rng):
    model = lstm_model()
    runner = burnin.BurnInRunner(model, burn_in=3)
    x = rng.standard_normal((4, T, 3)).astype(np.float32)
    mask = np.ones((4, T), bool)
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call(runner, x, mask, random_state(model, rng))


# -- issue 11: a failed call restores the model's state; clear errors ----------------------


def set_raw(model, states):
    """Write states into the model's variables without the checks of set_states (NaN allowed)."""
    for layer, entry in zip(burnin.stateful_layers(model), states):
        for var, value in zip(burnin.state.state_variables(layer), entry):
            var.assign(value)


def test_nan_in_the_live_state_does_not_break_a_masked_call(rng):
    """Issue 11 item 12: NaN in the model's live state made the first masked call fail with an error
    about states (the masking probe could not put the NaN state back) and left the probe state in."""
    model = lstm_model()
    runner = burnin.BurnInRunner(model, burn_in=3)
    x = rng.standard_normal((4, T, 3)).astype(np.float32)
    start = random_state(model, rng)
    clean = lstm_model()
    expected = burnin.BurnInRunner(clean, burn_in=3)(x, start, mask=np.ones((4, T), bool))
    nan_state = tuple(tuple(np.full_like(a, np.nan) for a in entry) for entry in start)
    set_raw(model, nan_state)
    out = runner(x, start, mask=np.ones((4, T), bool))
    np.testing.assert_array_equal(out.outputs.numpy(), expected.outputs.numpy())
    assert_states_equal(burnin.get_states(model), np_states(expected.final_state))


def test_failed_masking_check_restores_a_nan_state_bit_for_bit(rng):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(batch_shape=(4, None, 3))
    x = keras.layers.LSTM(5, stateful=True, return_sequences=True, name="lstm")(DropMask()(inputs))
    model = keras.Model(inputs, x)
    runner = burnin.BurnInRunner(model, burn_in=2)
    live = random_state(model, rng)
    live[0][0][1, 2] = np.nan
    set_raw(model, live)
    with pytest.raises(ValueError, match="fully masked step changed the state of layer 'lstm'"):
        runner(rng.standard_normal((4, T, 3)).astype(np.float32), None, mask=np.ones((4, T), bool))
    assert_states_equal(burnin.get_states(model), live)


def test_a_failed_call_restores_the_models_state(rng, monkeypatch):
    """The pass writes the state variables as it goes; a call that fails half way puts them back."""
    model = lstm_model()
    runner = burnin.BurnInRunner(model, burn_in=3)
    x = rng.standard_normal((4, T, 3)).astype(np.float32)
    runner(x, random_state(model, rng))  # traced once
    live = random_state(model, rng)
    burnin.set_states(model, live)

    def failing(inputs, states, mask):
        runner._write(random_state(model, rng))
        raise tf.errors.ResourceExhaustedError(None, None, "out of memory half way")

    monkeypatch.setattr(runner, "_compiled", failing)
    with pytest.raises(tf.errors.ResourceExhaustedError):
        runner(x, random_state(model, rng))
    assert_states_equal(burnin.get_states(model), live)


def test_none_arguments_raise_type_errors_naming_them():
    """Issue 11 item 13: raw TypeErrors that named no argument."""
    model = lstm_model()
    with pytest.raises(TypeError, match="state_offsets: expected a sequence of ints >= 0, got NoneType None"):
        burnin.BurnInRunner(model, burn_in=1, state_offsets=None)
    runner = burnin.BurnInRunner(model, burn_in=1)
    with pytest.raises(TypeError, match=r"inputs: expected an array or tensor \[batch, time, ...\]"):
        runner(None)
    with pytest.raises(TypeError, match=r"inputs\[1\]: expected an array or tensor"):
        runner([np.zeros((4, T, 3), np.float32), None])
