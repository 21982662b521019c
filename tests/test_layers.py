"""HoistedLSTM against keras.layers.LSTM: same outputs and states bit for bit, same gradients to rounding."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_states_equal, random_state

import burnin
from burnin.layers import HoistedLSTM, backward_row_blocks

B, D, U, T = 4, 5, 8, 15


def pair(options: dict | None = None) -> tuple[keras.Model, keras.Model]:
    """A Keras LSTM model and the same model with HoistedLSTM(**options), sharing weights."""
    models = []
    for cls, kwargs in ((keras.layers.LSTM, {}), (HoistedLSTM, options or {})):
        keras.utils.set_random_seed(7)
        inputs = keras.Input(batch_shape=(B, None, D))
        x = cls(U, stateful=True, return_sequences=True, name="lstm", **kwargs)(inputs)
        models.append(keras.Model(inputs, keras.layers.Dense(3)(x)))
    models[1].set_weights(models[0].get_weights())
    return models[0], models[1]


@pytest.fixture(params=["eager", "function"])
def run(request):
    def call(model, x, mask=None):
        fn = (lambda a, m: model(a, mask=m)) if mask is not None else (lambda a, m: model(a))
        if request.param == "function":
            fn = tf.function(fn)
        return fn(tf.constant(x), None if mask is None else tf.constant(mask)).numpy()

    return call


UNROLL = pytest.mark.parametrize(
    "options",
    [{}, {"max_unroll": 64}, {"fused_gradient": True}, {"fused_gradient": True, "jit_loops": True}],
    ids=["while_loop", "unrolled", "fused_gradient", "fused_xla"],
)


@UNROLL
@pytest.mark.parametrize("masked", [False, True])
def test_bitwise_equal_to_keras_lstm(masked, options, run, rng):
    keras_model, hoisted = pair(options)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    mask = None
    if masked:
        mask = rng.random((B, T)) > 0.3
        mask[:, :3] = False  # left padding, from a non-zero state: output 0, state kept
    start = random_state(keras_model, rng)
    outs, states = [], []
    for model in (keras_model, hoisted):
        burnin.set_states(model, start)
        outs.append(run(model, x, mask))
        states.append(burnin.get_states(model))
    if options.get("jit_loops"):  # XLA fuses each step into one program: equal to rounding
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        for got, want in zip(states[1], states[0]):
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(outs[1], outs[0])
        assert_states_equal(states[1], states[0])


@UNROLL
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_keras_lstm(options, masked, rng):
    keras_model, hoisted = pair(options)
    x = tf.constant(rng.standard_normal((B, T, D)).astype(np.float32))
    mask = None
    if masked:
        mask = rng.random((B, T)) > 0.3
        mask[:, :3] = False  # left padding: no gradient reaches those steps' inputs
        mask = tf.constant(mask)
    start = random_state(keras_model, rng)
    # Weigh every step and unit differently, so a gradient sent to the wrong step or gate shows.
    weights = tf.constant(rng.standard_normal((B, T, 3)).astype(np.float32))
    grads = []
    for model in (keras_model, hoisted):
        burnin.set_states(model, start)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = model(x) if mask is None else model(x, mask=mask)
            loss = tf.reduce_sum(weights * out)
        grads.append(tape.gradient(loss, [x, *model.trainable_variables]))
    # dW_x is summed in one matmul instead of step by step: same terms, another order.
    for g_keras, g_hoisted in zip(*grads):
        np.testing.assert_allclose(g_hoisted.numpy(), g_keras.numpy(), rtol=1e-5, atol=1e-6)


@UNROLL
def test_runner_split_is_exact_with_hoisted_lstm(options, rng):
    _, model = pair(options)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    start = random_state(model, rng)
    burnin.set_states(model, start)
    full = model(x).numpy()
    for burn_in in (1, 6, T - 1):
        out = burnin.BurnInRunner(model, burn_in=burn_in)(x, start)
        np.testing.assert_array_equal(out.outputs.numpy(), full[:, burn_in:])


@UNROLL
def test_xla_within_tolerance(options, rng):
    _, model = pair(options)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    start = random_state(model, rng)
    plain = burnin.BurnInRunner(model, burn_in=4)(x, start).outputs.numpy()
    jitted = burnin.BurnInRunner(model, burn_in=4, jit_compile=True)(x, start).outputs.numpy()
    np.testing.assert_allclose(jitted, plain, rtol=1e-5, atol=1e-6)


@UNROLL
@pytest.mark.parametrize("batch", [4, 16], ids=["b4", "b16_two_blocks"])
def test_state_gradients_match_keras_lstm(options, batch, rng):
    """Gradients into the initial state and out of the final state (a non-stateful layer given
    initial_state), masked; at batch 16 the fused backward runs in two row blocks."""
    layers = []
    for cls, kwargs in ((keras.layers.LSTM, {}), (HoistedLSTM, options)):
        layer = cls(U, return_sequences=True, return_state=True, **kwargs)
        layer.build((batch, T, D))
        layers.append(layer)
    layers[1].set_weights(layers[0].get_weights())
    x = tf.constant(rng.standard_normal((batch, T, D)).astype(np.float32))
    h0, c0 = (tf.constant(rng.standard_normal((batch, U)).astype(np.float32)) for _ in range(2))
    mask = rng.random((batch, T)) > 0.3
    mask[0, :4] = False
    mask = tf.constant(mask)
    w_out, w_h, w_c = (
        tf.constant(rng.standard_normal(shape).astype(np.float32))
        for shape in ((batch, T, U), (batch, U), (batch, U))
    )
    grads = []
    for layer in layers:
        with tf.GradientTape() as tape:
            tape.watch([x, h0, c0])
            out, h_t, c_t = layer(x, initial_state=[h0, c0], mask=mask)
            loss = tf.reduce_sum(w_out * out) + tf.reduce_sum(w_h * h_t) + tf.reduce_sum(w_c * c_t)
        grads.append(tape.gradient(loss, [x, h0, c0, *layer.trainable_variables]))
    for name, g_keras, g_hoisted in zip(("x", "h0", "c0", "kernel", "recurrent", "bias"), *grads):
        np.testing.assert_allclose(g_hoisted.numpy(), g_keras.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


def test_jit_loops_needs_fused_gradient():
    with pytest.raises(ValueError, match="jit_loops: needs fused_gradient=True"):
        HoistedLSTM(4, jit_loops=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dropout": 0.1}, "dropout: HoistedLSTM supports only 0"),
        ({"recurrent_dropout": 0.2}, "recurrent_dropout: HoistedLSTM supports only 0"),
        ({"go_backwards": True}, "go_backwards: HoistedLSTM supports only False"),
        ({"activation": "relu"}, "activation: HoistedLSTM supports only 'tanh'"),
        (
            {"recurrent_activation": "hard_sigmoid"},
            "recurrent_activation: HoistedLSTM supports only 'sigmoid'",
        ),
    ],
)
def test_unsupported_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HoistedLSTM(4, **kwargs)


@UNROLL
def test_float32_gates_under_mixed_bfloat16_are_closer_to_float32(options, rng):
    """bf16 matmuls with the gate math in float32 track the float32 layer better than all-bf16 math."""
    x = rng.standard_normal((B, 40, D)).astype(np.float32)
    layers = {
        "f32": keras.layers.LSTM(U, return_sequences=True, return_state=True),
        "gates32": HoistedLSTM(
            U, **options, return_sequences=True, return_state=True, dtype="mixed_bfloat16"
        ),
        "bf16": HoistedLSTM(
            U,
            **options,
            float32_gates=False,
            return_sequences=True,
            return_state=True,
            dtype="mixed_bfloat16",
        ),
    }
    for layer in layers.values():
        layer.build((B, 40, D))
    weights = layers["f32"].get_weights()
    weights[0] = weights[0] * 3.0  # large pre-activations: bf16 rounding in the gates shows
    for layer in layers.values():
        layer.set_weights(weights)
    out = {k: [np.asarray(v, np.float32) for v in layer(tf.constant(x))] for k, layer in layers.items()}
    # Both outputs are rounded to bf16 at the end; the float32 carry shows in the mean error.
    err = {k: np.abs(out[k][0] - out["f32"][0]).mean() for k in ("gates32", "bf16")}  # [B, T, U]
    assert err["gates32"] < err["bf16"], err
    np.testing.assert_allclose(out["gates32"][0], out["f32"][0], atol=0.05)


def test_float32_gates_must_be_a_bool():
    with pytest.raises(TypeError, match="float32_gates: expected a bool"):
        HoistedLSTM(4, float32_gates=1)


@pytest.mark.parametrize("jit_loops", [False, True], ids=["fused_gradient", "fused_xla"])
def test_a_frozen_fused_layer_gives_the_same_outputs_and_input_gradients(jit_loops, rng):
    """trainable=False (a target network) keeps no activations for the gradient: same outputs bit for bit,
    and the gradient into the inputs, if asked for, equal to the trainable layer's to rounding."""
    _, trained = pair({"fused_gradient": True, "jit_loops": jit_loops})
    _, frozen = pair({"fused_gradient": True, "jit_loops": jit_loops})
    frozen.trainable = False
    x = tf.constant(rng.standard_normal((B, T, D)).astype(np.float32))
    mask = tf.constant(rng.random((B, T)) > 0.3)
    start = random_state(trained, rng)
    results = []
    for model in (trained, frozen):
        burnin.set_states(model, start)

        @tf.function
        def step(x, mask, model=model):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = model(x, mask=mask)
                loss = tf.reduce_sum(y * y)
            return y, tape.gradient(loss, x)

        results.append([t.numpy() for t in step(x, mask)])
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("batch", "cores", "blocks"),
    [
        # On 2 cores, the rule this had before it read the cores: 2 for an even batch of 16 or more.
        (None, 2, 1), (8, 2, 1), (15, 2, 1), (16, 2, 2), (17, 2, 1), (32, 2, 2), (64, 2, 2),
        # One core keeps one loop; more cores split further, at least 8 rows a block, evenly.
        (64, 1, 1), (64, 4, 4), (64, 3, 2), (48, 8, 6), (24, 8, 3), (64, 64, 8), (7, 16, 1),
    ],
)  # fmt: skip
def test_backward_row_blocks_follow_the_visible_cores(batch, cores, blocks):
    assert backward_row_blocks(batch, cores) == blocks
