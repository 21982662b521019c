"""Recurrent-state staleness diagnostics: the R2D2 paper's ΔQ, and ΔQ against the spread of the Q-values."""

from __future__ import annotations

import tensorflow as tf

__all__ = ["delta_q", "delta_q_spread"]


def delta_q(q_hat_t: tf.Tensor, q_t: tf.Tensor, q_hat_seq: tf.Tensor, seq_mask: tf.Tensor) -> tf.Tensor:
    """ΔQ = ‖q(ĥ_t; θ) − q(h_t; θ)‖₂ / |max_{a,j} q(ĥ_j; θ)_a|   (Kapturowski et al. 2019, eq. 1).

    ``h_t`` is the state the actor stored at step t, ``ĥ_t`` the state the
    learner recomputed for the same step (zero or stored start, plus burn-in,
    with the current parameters θ). Both Q-vectors use the same θ, so ΔQ
    isolates the difference in recurrent state.

    Args:
        q_hat_t: ``[B, A]`` Q-values at step t from the recomputed state ĥ_t.
        q_t: ``[B, A]`` Q-values at step t from the stored state h_t.
        q_hat_seq: ``[B, T, A]`` Q-values from the recomputed states over the sequence (the j of the max).
        seq_mask: ``[B, T]`` bool, the steps j that take part in the max.
    Returns:
        ``[B]`` ΔQ per sequence; NaN for a row whose max is 0 or whose mask is empty.
    """
    q_hat_t = tf.convert_to_tensor(q_hat_t)
    q_t = tf.convert_to_tensor(q_t, dtype=q_hat_t.dtype)
    q_hat_seq = tf.convert_to_tensor(q_hat_seq, dtype=q_hat_t.dtype)
    diff = tf.norm(q_hat_t - q_t, ord="euclidean", axis=-1)  # [B]
    neg_inf = tf.constant(float("-inf"), dtype=q_hat_seq.dtype)
    masked = tf.where(tf.cast(seq_mask, tf.bool)[..., None], q_hat_seq, neg_inf)  # [B, T, A]
    scale = tf.abs(tf.reduce_max(masked, axis=[1, 2]))  # [B]
    nan = tf.constant(float("nan"), dtype=q_hat_t.dtype)
    return tf.where((scale > 0) & tf.math.is_finite(scale), diff / scale, nan)


def delta_q_spread(
    q_hat_t: tf.Tensor, q_t: tf.Tensor, q_hat_seq: tf.Tensor, seq_mask: tf.Tensor
) -> tf.Tensor:
    """ΔQ_spread = ‖q(ĥ_t; θ) − q(h_t; θ)‖₂ / (max_{a,j} q(ĥ_j; θ)_a − min_{a,j} q(ĥ_j; θ)_a).

    The paper's ΔQ (:func:`delta_q`) divides by |max_{a,j} q|, a stand-in for the
    Q scale that holds where the Q-values lie far from 0 (Atari's positive
    returns). Where returns straddle 0, as on POPGym (±1/L per step), that max
    can sit near 0 and the reading runs to tens or hundreds. This divides by the
    spread of the Q-values over the sequence instead: unchanged when every Q
    shifts by a constant (which changes no greedy action), and equal to the
    paper's ΔQ when the smallest Q of the sequence is 0. Same arguments and
    shapes as :func:`delta_q`; ``[B]`` per sequence, NaN for a row whose spread
    is 0 or whose mask is empty.
    """
    q_hat_t = tf.convert_to_tensor(q_hat_t)
    q_t = tf.convert_to_tensor(q_t, dtype=q_hat_t.dtype)
    q_hat_seq = tf.convert_to_tensor(q_hat_seq, dtype=q_hat_t.dtype)
    diff = tf.norm(q_hat_t - q_t, ord="euclidean", axis=-1)  # [B]
    mask = tf.cast(seq_mask, tf.bool)[..., None]  # [B, T, 1]
    inf = tf.constant(float("inf"), dtype=q_hat_seq.dtype)
    spread = tf.reduce_max(tf.where(mask, q_hat_seq, -inf), axis=[1, 2]) - tf.reduce_min(
        tf.where(mask, q_hat_seq, inf), axis=[1, 2]
    )  # [B]
    nan = tf.constant(float("nan"), dtype=q_hat_t.dtype)
    return tf.where((spread > 0) & tf.math.is_finite(spread), diff / spread, nan)
