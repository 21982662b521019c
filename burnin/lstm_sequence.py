"""An LSTM recurrence over a whole sequence with a hand-written gradient: only h·Wᵀ stays in the time loop."""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf

from burnin._checks import check_bool, check_int

__all__ = ["lstm_sequence"]


class _Steps(NamedTuple):
    """The forward loop's results: per step ``[T, B, u]``, then the final state ``[B, u]``."""

    gates: Any
    """``(σ(z_i), σ(z_f), tanh(z_g), σ(z_o))`` per step; None when not saved for the gradient."""
    tau: Any
    """``tanh(c_t)`` before masking; None when not saved."""
    hs: tf.Tensor
    """``h_t`` after masking (the layer's outputs)."""
    cs: Any
    """``c_t`` after masking; None when not saved."""
    h_last: tf.Tensor
    c_last: tf.Tensor


def lstm_sequence(
    zx: tf.Tensor,
    h0: tf.Tensor,
    c0: tf.Tensor,
    w_h: tf.Tensor,
    bias: tf.Tensor | None,
    keep: tf.Tensor | None,
    *,
    backward_blocks: int = 1,
    jit_loops: bool = False,
    saved_for_gradient: bool = True,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Run ``z_t = (zx_t + h_{t-1} W_h) + b``, gates ``i, f, g, o`` (Keras order), over ``T`` steps.

    ``c_t = f ⊙ c_{t-1} + i ⊙ tanh(z_g)``, ``h_t = o ⊙ tanh(c_t)``; where ``keep_t`` is False the
    row keeps ``h_{t-1}, c_{t-1}`` (Keras masking). The forward arithmetic is Keras' LSTM cell's,
    in its order. The gradient is written out: the backward loop carries only ``(dh, dc)`` and does
    one matmul per step, ``dz_t W_hᵀ``; ``dW_h = Σ_t h_{t-1}ᵀ dz_t`` and ``d zx = dz`` are formed
    once, after it, as large matmuls. Rounding differs from autodiff's (sums in another order).

    Args:
        zx: ``[T, B, 4u]`` input projections ``x_t W_x`` (time-major), in the matmul dtype.
        h0: ``[B, u]`` initial output, in the matmul dtype; c0: ``[B, u]`` initial cell, in the gate dtype.
        w_h: ``[u, 4u]`` recurrent kernel; bias: ``[4u]`` in the gate dtype, or None.
        keep: ``[T, B]`` bool, or None for every step valid.
        backward_blocks: run the backward loop as this many independent loops over blocks of
            rows (``B`` must divide), which the executor runs on separate cores at once.
        jit_loops: compile the forward and backward loops with XLA (each as one fused program:
            about 40 % less time per step on the CPU; results then differ from the uncompiled
            loop by rounding, ~1e-7 relative).
        saved_for_gradient: keep each step's gate activations and cells for the written-out
            gradient. False (a frozen layer, e.g. a target network): the loop writes only ``h_t``;
            a gradient, if one is asked for, first reruns the forward loop to get them.

    Returns:
        ``H [T, B, u]`` (``h_t`` after masking), ``h_T``, ``c_T``. First-order gradients only: a
        gradient of the gradient raises ``LookupError`` (the written-out gradient is not itself
        differentiated).
    """
    blocks = check_int("backward_blocks", backward_blocks, minimum=1)
    jit_loops = check_bool("jit_loops", jit_loops)
    saved_for_gradient = check_bool("saved_for_gradient", saved_for_gradient)
    batch = h0.shape[0]
    if batch is not None and batch % blocks:
        raise ValueError(f"backward_blocks: expected a divisor of the batch {batch}, got {blocks}")

    @tf.custom_gradient
    def run(zx, h0, c0, w_h, bias):
        # No tape may record inside (eagerly, it would export the loop's TensorLists out of XLA):
        # this function's gradient is `grad` below.
        args = tf.nest.map_structure(tf.stop_gradient, (zx, h0, c0, w_h, bias))
        check = _assert_steps(zx) if jit_loops else None  # XLA cannot slice an empty time axis
        if check is not None:
            with tf.control_dependencies([check]):
                args = (tf.identity(args[0]), *args[1:])
        forward = _forward_xla if jit_loops else _forward
        out = forward(*args, keep, save=saved_for_gradient)

        def grad(d_hs, d_h_last, d_c_last):
            # Without saved activations (a frozen layer, rarely differentiated) they are recomputed.
            saved = out if saved_for_gradient else forward(*args, keep)
            d_z, d_h0, d_c0 = _blocked_backward(
                blocks, jit_loops, saved.gates, saved.tau, saved.cs, c0, w_h, keep, d_hs, d_h_last, d_c_last
            )
            d_w_h, d_bias = _kernel_and_bias_gradients(h0, out.hs, d_z, w_h)
            grads = (tf.cast(d_z, zx.dtype), tf.cast(d_h0, h0.dtype), d_c0, d_w_h, d_bias)
            message = "lstm_sequence has first-order gradients only"
            return tuple(tf.raw_ops.PreventGradient(input=g, message=message) for g in grads)

        return (out.hs, out.h_last, out.c_last), grad

    # Read a stateful layer's state variables now: its backward pass runs after the layer has
    # written its final state into them.
    h0, c0 = tf.convert_to_tensor(h0), tf.convert_to_tensor(c0)
    if bias is None:
        # custom_gradient needs tensors; a zero bias adds exact zeros.
        bias = tf.zeros([w_h.shape[-1]], c0.dtype)
    return run(zx, h0, c0, w_h, bias)


def _kernel_and_bias_gradients(h0, hs, d_z, w_h):
    """``dW_h = Σ_t h_{t-1}ᵀ dz_t`` as one ``[u, T·B] × [T·B, 4u]`` matmul, and ``db = Σ_t (Σ_rows dz_t)``."""
    units = h0.shape[-1]
    d_w_h = tf.matmul(
        tf.reshape(_previous(h0, hs), [-1, units]),
        tf.reshape(tf.cast(d_z, w_h.dtype), [-1, 4 * units]),
        transpose_a=True,
    )
    # Rows first, then steps: 2.8x faster than one reduction over both axes (Eigen's is slow
    # there, measured at [85, 64, 2048]), and its partial sums are shorter.
    return d_w_h, tf.reduce_sum(tf.reduce_sum(d_z, axis=1), axis=0)


def _forward(zx, h0, c0, w_h, bias, keep, *, save=True):
    """The recurrence, as :class:`_Steps`. The gradient reads the gate activations as the forward
    computed them (recomputing them from ``z_t`` took ~0.6 ms of the ~30 ms of thread time of a
    demo-scale update, in a profile). With ``save`` False only ``h_t`` is kept per step."""
    steps = zx.shape[0] if zx.shape[0] is not None else tf.shape(zx)[0]
    gate = c0.dtype
    shape = lambda x: tf.TensorArray(x.dtype, size=steps, element_shape=x.shape)
    # Per step: the four gates, tanh(c) before masking, h, c.
    tas = (*(shape(c0) for _ in range(5)), shape(h0), shape(c0)) if save else (shape(h0),)

    def body(t, h, c, tas):
        # Indexing a captured tensor is cheap here: no autodiff runs through this loop.
        z = (tf.cast(zx[t], gate) + tf.cast(tf.matmul(h, w_h), gate)) + bias
        z_i, z_f, z_g, z_o = tf.split(z, 4, axis=1)
        gates = (tf.sigmoid(z_i), tf.sigmoid(z_f), tf.tanh(z_g), tf.sigmoid(z_o))
        c_new = gates[1] * c + gates[0] * gates[2]
        tau = tf.tanh(c_new)
        h_new = tf.cast(gates[3] * tau, h.dtype)
        if keep is not None:
            k = keep[t][:, None]
            h_new, c_kept = tf.where(k, h_new, h), tf.where(k, c_new, c)
        else:
            c_kept = c_new
        if not save:
            return t + 1, h_new, c_kept, (tas[0].write(t, h_new),)
        return t + 1, h_new, c_kept, tuple(ta.write(t, v) for ta, v in zip(tas, (*gates, tau, h_new, c_kept)))

    _, h_last, c_last, tas = tf.while_loop(
        lambda t, *_: t < steps,
        body,
        (tf.constant(0), h0, c0, tas),
        parallel_iterations=1,
        maximum_iterations=steps,
    )
    if not save:
        return _Steps(None, None, tas[0].stack(), None, h_last, c_last)
    stacked = [ta.stack() for ta in tas]
    return _Steps(tuple(stacked[:4]), *stacked[4:], h_last, c_last)


def _assert_steps(zx):
    """None when the time axis is known non-empty; ValueError when known empty; else a run-time check."""
    message = "zx: jit_loops needs at least one time step (got 0)"
    if zx.shape[0] is not None:
        if zx.shape[0] == 0:
            raise ValueError(message)
        return None
    return tf.debugging.assert_greater(tf.shape(zx)[0], 0, message=message)


def _previous(first, seq):
    """``[first, seq_0, …, seq_{T-2}]``: each step's previous value (empty when ``T`` is 0)."""
    return tf.concat([first[None], seq], axis=0)[: tf.shape(seq)[0]]


def _backward(gates, tau, cs, c0, w_h, keep, d_hs, d_h_last, d_c_last, *, jit=False):
    """``dz_t`` for every step and the gradients into ``h0``, ``c0``, by the loop over ``t = T-1 … 0``.

    With ``gates = (σ_i, σ_f, g, σ_o)`` and ``tau = tanh(c_t)`` before masking, as the forward saved
    them: ``dc ← dc + dh ⊙ σ_o(1-τ²)``;
    ``dz = [dc ⊙ g σ_i(1-σ_i), dc ⊙ c_{t-1} σ_f(1-σ_f), dc ⊙ σ_i(1-g²), dh ⊙ τ σ_o(1-σ_o)]``;
    then ``dh ← dz W_hᵀ``, ``dc ← dc ⊙ σ_f``. A masked step passes ``(dh, dc)`` through, dz = 0.
    The factors are computed for all steps at once, before the loop, outside XLA: a compiled
    program that starts with them continues on TensorFlow's one intra-op thread, where two row
    blocks' loops would then run one after the other (seen in a profile)."""
    gate = tau.dtype
    s_i, s_f, g, s_o = gates
    c_prev = _previous(c0, cs)
    into_c = s_o * (1 - tau * tau)  # ∂h/∂c
    factors = tf.concat(
        [g * s_i * (1 - s_i), c_prev * s_f * (1 - s_f), s_i * (1 - g * g), tau * s_o * (1 - s_o)], axis=2
    )
    w_t = tf.transpose(w_h)  # once, so the loop's matmul reads a plain row-major matrix
    loop = _backward_loop_xla if jit else _backward_loop
    return loop(
        tf.cast(d_hs, gate), into_c, factors, s_f, w_t, keep, tf.cast(d_h_last, gate), tf.cast(d_c_last, gate)
    )


def _backward_loop(d_hs, into_c, factors, s_f, w_t, keep, d_h_last, d_c_last):
    """The loop of :func:`_backward` over ``t = T-1 … 0``, from the per-step factors."""
    gate = into_c.dtype
    steps = factors.shape[0] if factors.shape[0] is not None else tf.shape(factors)[0]
    reads = (d_hs, into_c, factors, s_f)
    d_z_ta = tf.TensorArray(gate, size=steps, element_shape=factors.shape[1:])

    def body(t, dh, dc, d_z_ta):
        d_hs_t, into_c_t, factors_t, s_f_t = (r[t] for r in reads)
        dh_t = d_hs_t + dh
        dc_t = dc + dh_t * into_c_t
        dz = tf.concat([dc_t, dc_t, dc_t, dh_t], axis=1) * factors_t
        dh_prev = tf.cast(tf.matmul(tf.cast(dz, w_t.dtype), w_t), gate)
        dc_prev = dc_t * s_f_t
        if keep is not None:
            k = keep[t][:, None]
            dz = tf.where(k, dz, tf.zeros_like(dz))
            dh_prev, dc_prev = tf.where(k, dh_prev, dh_t), tf.where(k, dc_prev, dc)
        return t - 1, dh_prev, dc_prev, d_z_ta.write(t, dz)

    _, d_h0, d_c0, d_z_ta = tf.while_loop(
        lambda t, *_: t >= 0,
        body,
        (steps - 1, d_h_last, d_c_last, d_z_ta),
        parallel_iterations=1,
        maximum_iterations=steps,
    )
    return d_z_ta.stack(), d_h0, d_c0


def _blocked_backward(k, jit, gates, tau, cs, c0, w_h, keep, d_hs, d_h_last, d_c_last):
    """:func:`_backward` on ``k`` blocks of rows, as independent loops; results joined back by row."""
    if k == 1:
        return _backward(gates, tau, cs, c0, w_h, keep, d_hs, d_h_last, d_c_last, jit=jit)
    time_major = [tf.split(x, k, axis=1) for x in (*gates, tau, cs, d_hs)]
    rows = [tf.split(x, k, axis=0) for x in (c0, d_h_last, d_c_last)]
    keeps = [None] * k if keep is None else tf.split(keep, k, axis=1)
    outs = []
    for i in range(k):
        *gi, taui, csi, dhsi = (x[i] for x in time_major)
        c0i, dhi, dci = (x[i] for x in rows)
        outs.append(_backward(tuple(gi), taui, csi, c0i, w_h, keeps[i], dhsi, dhi, dci, jit=jit))
    return (
        tf.concat([o[0] for o in outs], axis=1),
        tf.concat([o[1] for o in outs], 0),
        tf.concat([o[2] for o in outs], 0),
    )


# The same loops as single XLA programs (traced per shape and dtype on first use).
_forward_xla = tf.function(_forward, jit_compile=True, reduce_retracing=False)
_backward_loop_xla = tf.function(_backward_loop, jit_compile=True, reduce_retracing=False)
