"""lstm_sequence's hand-written gradient against autodiff of a plain step loop, masked and not, blocked, compiled."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from burnin.lstm_sequence import lstm_sequence

T, B, U = 9, 4, 3


def reference(zx, h0, c0, w_h, bias, keep):
    """The same recurrence step by step in Python, differentiated by TensorFlow (Keras' masking)."""
    h, c, hs = h0, c0, []
    for t in range(zx.shape[0]):
        z = (zx[t] + tf.matmul(h, w_h)) + bias
        z_i, z_f, z_g, z_o = tf.split(z, 4, axis=1)
        c_new = tf.sigmoid(z_f) * c + tf.sigmoid(z_i) * tf.tanh(z_g)
        h_new = tf.sigmoid(z_o) * tf.tanh(c_new)
        if keep is not None:
            k = keep[t][:, None]
            h_new, c_new = tf.where(k, h_new, h), tf.where(k, c_new, c)
        h, c = h_new, c_new
        hs.append(h)
    return tf.stack(hs), h, c


def problem(rng, masked):
    arrays = {
        "zx": rng.standard_normal((T, B, 4 * U)),
        "h0": rng.standard_normal((B, U)),
        "c0": rng.standard_normal((B, U)),
        "w_h": rng.standard_normal((U, 4 * U)) * 0.6,
        "bias": rng.standard_normal(4 * U),
    }
    tensors = {k: tf.constant(v.astype(np.float32)) for k, v in arrays.items()}
    keep = None
    if masked:
        mask = rng.random((T, B)) > 0.35
        mask[:3, 0] = False  # a row that starts masked
        mask[4:, 1] = False  # a row that ends early
        keep = tf.constant(mask)
    # Loss weights on every output, on the final h and on the final c, so each gradient path shows.
    weights = [tf.constant(rng.standard_normal(s).astype(np.float32)) for s in ((T, B, U), (B, U), (B, U))]
    return tensors, keep, weights


def gradients(fn, tensors, keep, weights, compiled):
    def run(zx, h0, c0, w_h, bias):
        with tf.GradientTape() as tape:
            tape.watch([zx, h0, c0, w_h, bias])
            outs = fn(zx, h0, c0, w_h, bias, keep)
            loss = sum(tf.reduce_sum(w * o) for w, o in zip(weights, outs))
        return outs, tape.gradient(loss, [zx, h0, c0, w_h, bias])

    if compiled:
        run = tf.function(run)
    outs, grads = run(**tensors)
    return [o.numpy() for o in outs], [None if g is None else g.numpy() for g in grads]


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("jit_loops", [False, True], ids=["plain", "xla"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "function"])
def test_outputs_and_gradients_match_autodiff(masked, blocks, jit_loops, compiled, rng):
    tensors, keep, weights = problem(rng, masked)
    want_outs, want_grads = gradients(reference, tensors, keep, weights, compiled)

    def fused(zx, h0, c0, w_h, bias, keep):
        return lstm_sequence(zx, h0, c0, w_h, bias, keep, backward_blocks=blocks, jit_loops=jit_loops)

    outs, grads = gradients(fused, tensors, keep, weights, compiled)
    for got, want in zip(outs, want_outs):
        if jit_loops:  # XLA fuses the step into one program: rounding differs
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        else:  # the same ops in the same order
            np.testing.assert_array_equal(got, want)
    names = ("zx", "h0", "c0", "w_h", "bias")
    for name, got, want in zip(names, grads, want_grads):
        # dW_h and the bias are summed over steps in another order: equal to rounding.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_masked_steps_pass_gradient_through_unchanged(rng):
    """A row masked at every step is the identity from (h0, c0) to (h_T, c_T): its gradient arrives intact."""
    tensors, _, weights = problem(rng, masked=False)
    keep = tf.constant(np.ones((T, B), bool) & (np.arange(B) != 2)[None, :])
    _, grads = gradients(lambda *a: lstm_sequence(*a[:5], a[5]), tensors, keep, weights, compiled=False)
    d_h0, d_c0 = grads[1][2], grads[2][2]
    np.testing.assert_allclose(d_h0, weights[0].numpy()[:, 2].sum(0) + weights[1].numpy()[2], rtol=1e-6)
    np.testing.assert_allclose(d_c0, weights[2].numpy()[2], rtol=1e-6)
    assert not grads[0][:, 2].any(), "a masked step's input gets no gradient"


def test_no_bias_equals_a_zero_bias(rng):
    tensors, keep, weights = problem(rng, masked=True)
    zero = {**tensors, "bias": tf.zeros_like(tensors["bias"])}
    with_zero = gradients(lambda *a: lstm_sequence(*a[:5], a[5]), zero, keep, weights, compiled=False)
    no_bias = gradients(
        lambda zx, h0, c0, w_h, bias, keep: lstm_sequence(zx, h0, c0, w_h, None, keep),
        zero,
        keep,
        weights,
        False,
    )
    for a, b in zip(with_zero[0] + with_zero[1][:4], no_bias[0] + no_bias[1][:4]):
        np.testing.assert_array_equal(a, b)


def test_second_order_gradient_raises(rng):
    """The written-out gradient is not differentiated: asking for it fails instead of being silently wrong."""
    tensors, keep, _ = problem(rng, masked=False)
    w_h = tensors["w_h"]
    with pytest.raises(LookupError, match="first-order gradients only"):
        with tf.GradientTape() as outer:
            outer.watch(w_h)
            with tf.GradientTape() as inner:
                inner.watch(w_h)
                hs, _, _ = lstm_sequence(
                    tensors["zx"], tensors["h0"], tensors["c0"], w_h, tensors["bias"], keep
                )
                loss = tf.reduce_sum(hs)
            g = inner.gradient(loss, w_h)
            outer.gradient(tf.reduce_sum(g * g), w_h)


@pytest.mark.parametrize(
    ("blocks", "error", "message"),
    [
        (3, ValueError, "backward_blocks: expected a divisor of the batch 4, got 3"),
        (0, ValueError, "backward_blocks: expected"),
        (2.0, TypeError, "backward_blocks: expected an int"),
    ],
)
def test_bad_backward_blocks_rejected_before_running(blocks, error, message, rng):
    tensors, keep, _ = problem(rng, masked=False)
    with pytest.raises(error, match=message):
        lstm_sequence(*tensors.values(), keep, backward_blocks=blocks)


def test_zero_steps_under_xla_is_a_clear_error(rng):
    tensors, _, _ = problem(rng, masked=False)
    empty = tf.zeros([0, B, 4 * U])
    with pytest.raises(ValueError, match="jit_loops needs at least one time step"):
        lstm_sequence(
            empty, tensors["h0"], tensors["c0"], tensors["w_h"], tensors["bias"], None, jit_loops=True
        )


def test_zero_steps_return_the_initial_state(rng):
    """A dynamic time dimension of length 0 (inside tf.function): no outputs, the state passes through."""
    tensors, _, _ = problem(rng, masked=False)

    @tf.function(input_signature=[tf.TensorSpec([None, B, 4 * U], tf.float32)])
    def run(zx):
        with tf.GradientTape() as tape:
            tape.watch(tensors["h0"])
            hs, h_t, c_t = lstm_sequence(
                zx, tensors["h0"], tensors["c0"], tensors["w_h"], tensors["bias"], None
            )
            loss = tf.reduce_sum(h_t)
        return hs, h_t, c_t, tape.gradient(loss, tensors["h0"])

    hs, h_t, c_t, d_h0 = run(tf.zeros([0, B, 4 * U]))
    assert hs.shape == (0, B, U)
    np.testing.assert_array_equal(h_t.numpy(), tensors["h0"].numpy())
    np.testing.assert_array_equal(c_t.numpy(), tensors["c0"].numpy())
    np.testing.assert_array_equal(d_h0.numpy(), np.ones((B, U), np.float32))


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("jit_loops", [False, True], ids=["plain", "xla"])
def test_without_saved_activations_same_outputs_and_autodiff_gradients(masked, jit_loops, rng):
    """saved_for_gradient=False (a frozen layer): the same outputs bit for bit; a gradient, if asked for,
    is autodiff's through the loop, equal to the written-out one to rounding."""
    tensors, keep, weights = problem(rng, masked)

    def run(saved):
        def fn(zx, h0, c0, w_h, bias, keep):
            return lstm_sequence(zx, h0, c0, w_h, bias, keep, jit_loops=jit_loops, saved_for_gradient=saved)

        return gradients(fn, tensors, keep, weights, compiled=True)

    (want_outs, want_grads), (outs, grads) = run(True), run(False)
    for got, want in zip(outs, want_outs):
        np.testing.assert_array_equal(got, want)
    for name, got, want in zip(("zx", "h0", "c0", "w_h", "bias"), grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")
