"""HoistedLSTM: a drop-in Keras LSTM whose input projection runs as one matmul over all time steps."""

from __future__ import annotations

import keras
import tensorflow as tf

from burnin._checks import check_bool, check_int
from burnin.host import visible_cores
from burnin.lstm_sequence import lstm_sequence

__all__ = ["HoistedLSTM", "backward_row_blocks"]

MIN_BLOCK_ROWS = 8
"""Fewest rows a backward row block gets (the rule this began with on 2 cores: two blocks from an
even batch of 16 on)."""


def backward_row_blocks(batch_size: int | None, cores: int) -> int:
    """How many row blocks :class:`HoistedLSTM`'s fused backward loop runs as independent loops (the
    executor runs them on separate cores at once): at most one per core, the most that divide
    ``batch_size`` evenly with at least :data:`MIN_BLOCK_ROWS` rows each; 1 for an unknown batch. On
    2 cores: 2 for an even batch of 16 or more, else 1 (measured there; more cores are untimed)."""
    if batch_size is None:
        return 1
    for blocks in range(min(cores, batch_size // MIN_BLOCK_ROWS), 1, -1):
        if batch_size % blocks == 0:
            return blocks
    return 1


class HoistedLSTM(keras.layers.LSTM):
    """``keras.layers.LSTM`` with ``x_t @ W_x`` hoisted out of the time loop (TensorFlow backend).

    Keras computes, per step, ``z_t = (x_t @ W_x + h_{t-1} @ W_h) + b``. Here
    ``x @ W_x`` is one ``[B·T, in] × [in, 4u]`` matmul before the loop, so the
    loop only does the recurrent matmul and the gates; reverse-mode autodiff
    then also computes ``dW_x`` as one large matmul after the loop. The
    arithmetic is the same, in the same order, as Keras' LSTM cell
    (``implementation=2``), so on the CPU the outputs agree bit for bit in
    float32 (tested); only the speed differs. Under a 16-bit policy the gate
    math runs in float32 by default (``float32_gates``), unlike Keras.

    Everything else is ``keras.layers.LSTM``: statefulness (``layer.states``
    holds ``[h, c]``, so ``burnin.state`` works unchanged), masking (a masked
    step keeps ``h`` and ``c`` and repeats the previous output), and the
    weights and their names. Unsupported options raise at construction:
    dropout, recurrent dropout, ``go_backwards``, ``unroll``, and activations
    other than tanh / sigmoid.
    """

    def __init__(
        self,
        units: int,
        *,
        max_unroll: int = 0,
        float32_gates: bool = True,
        fused_gradient: bool = False,
        jit_loops: bool = False,
        **kwargs,
    ) -> None:
        """Args: as ``keras.layers.LSTM``, plus ``max_unroll``: when a call's time
        dimension is static and at most this long, the loop is unrolled into
        straight-line ops (no ``tf.while_loop``); 0 never unrolls. And
        ``float32_gates``: under a 16-bit compute dtype (``mixed_bfloat16``), the
        matmuls stay 16-bit but the gate math and the cell state inside a call
        run in float32, which is faster on CPUs whose 16-bit element-wise ops are
        slow (``benchmarks/lstm_step.py``) and more accurate. No effect in float32.
        And ``fused_gradient``: run the loop through :func:`burnin.lstm_sequence.lstm_sequence`,
        whose hand-written gradient keeps one matmul per step in the backward loop (forward
        outputs unchanged; gradients equal to rounding), and with ``jit_loops`` compile its two
        loops with XLA (faster per step; outputs then equal to rounding, ~1e-7 relative)."""
        for option in ("dropout", "recurrent_dropout"):
            if kwargs.get(option, 0.0):
                raise ValueError(f"{option}: HoistedLSTM supports only 0, got {kwargs[option]!r}")
        for option in ("go_backwards", "unroll"):
            if kwargs.get(option, False):
                raise ValueError(f"{option}: HoistedLSTM supports only False, got {kwargs[option]!r}")
        if kwargs.get("activation", "tanh") != "tanh":
            raise ValueError(f"activation: HoistedLSTM supports only 'tanh', got {kwargs['activation']!r}")
        if kwargs.get("recurrent_activation", "sigmoid") != "sigmoid":
            raise ValueError(
                f"recurrent_activation: HoistedLSTM supports only 'sigmoid', got {kwargs['recurrent_activation']!r}"
            )
        max_unroll = check_int("max_unroll", max_unroll, minimum=0)
        float32_gates = check_bool("float32_gates", float32_gates)
        fused_gradient = check_bool("fused_gradient", fused_gradient)
        jit_loops = check_bool("jit_loops", jit_loops)
        if jit_loops and not fused_gradient:
            raise ValueError("jit_loops: needs fused_gradient=True (it compiles that path's loops)")
        kwargs["use_cudnn"] = False
        super().__init__(units, **kwargs)
        self.max_unroll = max_unroll
        self.float32_gates = float32_gates
        self.fused_gradient = fused_gradient
        self.jit_loops = jit_loops

    def get_config(self):
        return {
            **super().get_config(),
            "max_unroll": self.max_unroll,
            "float32_gates": self.float32_gates,
            "fused_gradient": self.fused_gradient,
            "jit_loops": self.jit_loops,
        }

    def _gate_dtype(self, compute_dtype: tf.DType) -> tf.DType:
        if self.float32_gates and compute_dtype in (tf.bfloat16, tf.float16):
            return tf.float32
        return compute_dtype

    def _step(self, z_x, h, c, prev_out, keep, w_h, bias):
        """One LSTM step from the hoisted input projection ``z_x``, in Keras' order of operations.

        ``w_h`` is the recurrent kernel and ``bias`` the bias already in the gate dtype (or None),
        both read once per call by :meth:`inner_loop`."""
        # In float32 the casts are the identity, so the arithmetic is exactly Keras'.
        gate = c.dtype
        z = tf.cast(z_x, gate) + tf.cast(tf.matmul(h, w_h), gate)
        if bias is not None:
            z = z + bias
        z_i, z_f, z_c, z_o = tf.split(z, 4, axis=1)
        i = tf.sigmoid(z_i)
        f = tf.sigmoid(z_f)
        c_new = f * c + i * tf.tanh(z_c)
        o = tf.sigmoid(z_o)
        h_new = tf.cast(o * tf.tanh(c_new), h.dtype)
        y = h_new
        if keep is not None:
            # As Keras: a masked step keeps the state and repeats the previous
            # output (zeros before the first step).
            keep = keep[:, None]
            y = tf.where(keep, h_new, prev_out)
            h_new = tf.where(keep, h_new, h)
            c_new = tf.where(keep, c_new, c)
        return h_new, c_new, y

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        cell = self.cell
        h0, c_in = initial_state[0], initial_state[1]
        c0 = tf.cast(c_in, self._gate_dtype(c_in.dtype))  # the cell state's dtype sets the gate math's
        static_steps = sequences.shape[1]
        if self.fused_gradient and not (static_steps is not None and static_steps <= self.max_unroll):
            return self._fused_loop(sequences, h0, c_in, c0, mask)
        # [B, T, in] @ [in, 4u] -> [B, T, 4u]: one matmul for every step.
        x_proj = tf.matmul(sequences, tf.convert_to_tensor(cell.kernel))
        w_h = tf.convert_to_tensor(cell.recurrent_kernel)
        bias = tf.cast(tf.convert_to_tensor(cell.bias), c0.dtype) if cell.use_bias else None
        mask = None if mask is None else tf.cast(mask, tf.bool)
        if static_steps is not None and static_steps <= self.max_unroll:
            h, c, y = h0, c0, tf.zeros_like(h0)
            outs = []
            for t in range(static_steps):
                h, c, y = self._step(x_proj[:, t], h, c, y, None if mask is None else mask[:, t], w_h, bias)
                outs.append(y)
            return y, tf.stack(outs, axis=1), [h, tf.cast(c, c_in.dtype)]
        steps = static_steps if static_steps is not None else tf.shape(sequences)[1]
        # Read per step through TensorArrays: slicing a captured tensor inside the loop
        # would make its gradient a dense [T, B, 4u] tensor per step.
        x_ta = tf.TensorArray(x_proj.dtype, size=steps).unstack(tf.transpose(x_proj, [1, 0, 2]))
        mask_ta = None
        if mask is not None:
            mask_ta = tf.TensorArray(tf.bool, size=steps).unstack(tf.transpose(mask, [1, 0]))
        outputs = tf.TensorArray(sequences.dtype, size=steps, element_shape=h0.shape)

        def body(t, h, c, prev_out, out):
            keep = None if mask_ta is None else mask_ta.read(t)
            h_new, c_new, y = self._step(x_ta.read(t), h, c, prev_out, keep, w_h, bias)
            return t + 1, h_new, c_new, y, out.write(t, y)

        _, h_last, c_last, last_out, outputs = tf.while_loop(
            lambda t, *_: t < steps,
            body,
            (tf.constant(0), h0, c0, tf.zeros_like(h0), outputs),
            parallel_iterations=1,
            maximum_iterations=steps,  # XLA needs a bound for the TensorArray and its gradient
        )
        outputs = tf.transpose(outputs.stack(), [1, 0, 2])  # [B, T, u]
        return last_out, outputs, [h_last, tf.cast(c_last, c_in.dtype)]

    def _fused_loop(self, sequences, h0, c_in, c0, mask):
        """The loop of :meth:`inner_loop` through :func:`lstm_sequence` (time-major inside)."""
        cell = self.cell
        x = tf.transpose(sequences, [1, 0, 2])  # [T, B, in]: the narrow tensor moves, not [B, T, 4u]
        steps, batch = tf.shape(x)[0], tf.shape(x)[1]
        kernel = tf.convert_to_tensor(cell.kernel)
        x_proj = tf.reshape(
            tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), kernel), [steps, batch, kernel.shape[-1]]
        )
        bias = tf.cast(tf.convert_to_tensor(cell.bias), c0.dtype) if cell.use_bias else None
        keep = None if mask is None else tf.transpose(tf.cast(mask, tf.bool), [1, 0])
        blocks = backward_row_blocks(h0.shape[0], visible_cores())
        hs, h_last, c_last = lstm_sequence(
            x_proj,
            h0,
            c0,
            tf.convert_to_tensor(cell.recurrent_kernel),
            bias,
            keep,
            backward_blocks=blocks,
            jit_loops=self.jit_loops,
            # A frozen layer (a target network) trains nothing: no activations kept for its gradient.
            saved_for_gradient=self.trainable,
        )
        if keep is not None:
            # Keras' outputs: zeros until a row's first valid step, then h (repeated over masked steps).
            seen = tf.cast(tf.math.cumsum(tf.cast(keep, tf.int32), axis=0) > 0, tf.bool)[:, :, None]
            hs = tf.where(seen, hs, tf.zeros_like(hs))
        last_out = tf.concat([tf.zeros_like(h0)[None], hs], axis=0)[-1]  # zeros when T is 0, as Keras
        return last_out, tf.transpose(hs, [1, 0, 2]), [h_last, tf.cast(c_last, c_in.dtype)]
