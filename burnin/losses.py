"""R2D2 numerics as pure functions: value rescaling, n-step double-Q targets, TD errors, priorities."""

from __future__ import annotations

import tensorflow as tf

__all__ = [
    "double_q_bootstrap",
    "n_step_returns",
    "priority_mixture",
    "r2d2_targets",
    "td_errors",
    "value_rescale",
    "value_rescale_inverse",
]


def value_rescale(x: tf.Tensor, eps: float = 1e-3) -> tf.Tensor:
    """h(x) = sign(x) · (sqrt(|x| + 1) − 1) + eps · x   (R2D2, Pohlen et al. 2018). Elementwise."""
    x = tf.convert_to_tensor(x)
    return tf.sign(x) * (tf.sqrt(tf.abs(x) + 1.0) - 1.0) + eps * x


def value_rescale_inverse(x: tf.Tensor, eps: float = 1e-3) -> tf.Tensor:
    """h⁻¹(x) = sign(x) · (((sqrt(1 + 4·eps·(|x| + 1 + eps)) − 1) / (2·eps))² − 1). Elementwise.

    Exact inverse of :func:`value_rescale` for ``eps > 0``.
    """
    x = tf.convert_to_tensor(x)
    root = (tf.sqrt(1.0 + 4.0 * eps * (tf.abs(x) + 1.0 + eps)) - 1.0) / (2.0 * eps)
    return tf.sign(x) * (tf.square(root) - 1.0)


def double_q_bootstrap(q_online_t: tf.Tensor, q_target_t: tf.Tensor) -> tf.Tensor:
    """v_t = q_target_t[argmax_a q_online_t[a]]   (double Q-learning).

    Args:
        q_online_t: ``[B, T, A]`` online-network Q-values, used only to pick the action.
        q_target_t: ``[B, T, A]`` target-network Q-values.
    Returns:
        ``[B, T]`` bootstrap values.
    """
    a_star = tf.argmax(q_online_t, axis=-1, output_type=tf.int32)  # [B, T]
    return tf.gather(q_target_t, a_star, axis=-1, batch_dims=2)  # [B, T]


def n_step_returns(r_t: tf.Tensor, pcont_t: tf.Tensor, v_t: tf.Tensor, *, n: int) -> tf.Tensor:
    """n-step bootstrapped returns with per-step continuation.

    G_t = Σ_{k=0}^{n−1} (Π_{j<k} pcont_{t+j}) · r_{t+k}  +  (Π_{j<n} pcont_{t+j}) · v_{t+n}

    Here ``r_t`` is the reward of the action taken at step t (rewards at
    [t+1 … t+n] in the usual notation) and ``pcont_t = γ · discount_t`` its
    continuation (0 after a termination). An episode that ends inside the
    n steps is handled by the caller with ``r = 0`` and ``pcont = 1`` on the
    final observation and after it, and ``v`` carried forward from the final
    observation: the sum then stops at the end and bootstraps from the final
    observation with the right power of γ.

    Args:
        r_t: ``[B, T + n]`` rewards.
        pcont_t: ``[B, T + n]`` continuations.
        v_t: ``[B, T + n]`` bootstrap values (only steps ``>= n`` are read).
        n: number of steps, ``>= 1``.
    Returns:
        ``[B, T]`` returns ``G_t`` for t in ``[0, T)``.
    """
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    r_t = tf.convert_to_tensor(r_t)
    pcont_t = tf.convert_to_tensor(pcont_t, dtype=r_t.dtype)
    v_t = tf.convert_to_tensor(v_t, dtype=r_t.dtype)
    length = r_t.shape[1] - n  # T
    if length is None or length < 1:
        raise ValueError(f"r_t: expected more than n={n} time steps, got shape {r_t.shape}")
    ret = tf.zeros_like(r_t[:, :length])  # [B, T]
    scale = tf.ones_like(ret)  # Π_{j<k} pcont_{t+j}
    for k in range(n):
        ret += scale * r_t[:, k : k + length]
        scale *= pcont_t[:, k : k + length]
    return ret + scale * v_t[:, n : n + length]


def r2d2_targets(
    r_t: tf.Tensor,
    pcont_t: tf.Tensor,
    q_online_t: tf.Tensor,
    q_target_t: tf.Tensor,
    *,
    n: int,
    rescale_eps: float | None = 1e-3,
) -> tf.Tensor:
    """R2D2 targets: y_t = h( Σ_k (Π pcont) r_{t+k} + (Π pcont) · h⁻¹( q_target(s_{t+n}, argmax q_online(s_{t+n})) ) ).

    Args:
        r_t: ``[B, T + n]`` rewards of the action at step t (see :func:`n_step_returns`).
        pcont_t: ``[B, T + n]`` continuations γ·discount.
        q_online_t: ``[B, T + n, A]`` online Q-values (action selection only; no gradient).
        q_target_t: ``[B, T + n, A]`` target-network Q-values.
        n: bootstrap horizon.
        rescale_eps: ε of the value rescaling h; ``None`` turns rescaling off.
    Returns:
        ``[B, T]`` targets, with gradients stopped.
    """
    v_t = double_q_bootstrap(tf.stop_gradient(q_online_t), tf.stop_gradient(q_target_t))  # [B, T+n]
    if rescale_eps is not None:
        v_t = value_rescale_inverse(v_t, rescale_eps)
    g_t = n_step_returns(r_t, pcont_t, v_t, n=n)  # [B, T]
    if rescale_eps is not None:
        g_t = value_rescale(g_t, rescale_eps)
    return tf.stop_gradient(g_t)


def td_errors(q_t: tf.Tensor, a_t: tf.Tensor, target_t: tf.Tensor) -> tf.Tensor:
    """δ_t = target_t − q_t[a_t].

    Args:
        q_t: ``[B, T, A]`` online Q-values.
        a_t: ``[B, T]`` int actions taken at step t.
        target_t: ``[B, T]`` targets.
    Returns:
        ``[B, T]`` TD errors (differentiable through ``q_t``).
    """
    q_a = tf.gather(q_t, tf.cast(a_t, tf.int32), axis=-1, batch_dims=2)  # [B, T]
    return target_t - q_a


def priority_mixture(td_abs_t: tf.Tensor, mask_t: tf.Tensor, *, eta: float = 0.9) -> tf.Tensor:
    """p = η · max_t |δ_t| + (1 − η) · mean_t |δ_t|, over the steps where ``mask_t`` holds.

    Args:
        td_abs_t: ``[B, T]`` absolute TD errors.
        mask_t: ``[B, T]`` bool or 0/1 learn mask.
        eta: mixture weight η in [0, 1].
    Returns:
        ``[B]`` priorities; 0 for a row with an empty mask.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: expected a value in [0, 1], got {eta}")
    td_abs_t = tf.convert_to_tensor(td_abs_t)
    m = tf.cast(mask_t, td_abs_t.dtype)
    masked = td_abs_t * m
    count = tf.reduce_sum(m, axis=1)
    mean = tf.math.divide_no_nan(tf.reduce_sum(masked, axis=1), count)
    # |δ| >= 0, so masking to 0 cannot raise the max above the true masked max.
    maximum = tf.reduce_max(masked, axis=1)
    return eta * maximum + (1.0 - eta) * mean
