"""R2D2 numerics as pure functions: value rescaling, n-step double-Q targets, TD errors, priorities."""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

__all__ = [
    "LossExtras",
    "double_q_bootstrap",
    "forward_fill",
    "n_step_returns",
    "priority_mixture",
    "r2d2_loss",
    "r2d2_targets",
    "rewards_and_continuations",
    "td_errors",
    "value_rescale",
    "value_rescale_inverse",
]


def value_rescale(x: tf.Tensor, *, eps: float = 1e-3) -> tf.Tensor:
    """h(x) = sign(x) · (sqrt(|x| + 1) − 1) + eps · x   (R2D2, Pohlen et al. 2018). Elementwise; eps >= 0."""
    if not eps >= 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    x = tf.convert_to_tensor(x)
    return tf.sign(x) * (tf.sqrt(tf.abs(x) + 1.0) - 1.0) + eps * x


def value_rescale_inverse(x: tf.Tensor, *, eps: float = 1e-3) -> tf.Tensor:
    """h⁻¹(x) = sign(x) · (((sqrt(1 + 4·eps·(|x| + 1 + eps)) − 1) / (2·eps))² − 1). Elementwise.

    Exact inverse of :func:`value_rescale` for ``eps > 0``.
    """
    if not eps > 0:
        raise ValueError(f"eps: expected > 0 (the inverse divides by eps), got {eps}")
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


def forward_fill(x_t: tf.Tensor, valid_t: tf.Tensor) -> tf.Tensor:
    """y_t = x_{j(t)} with j(t) = max{ j <= t : valid_j }; steps before the first valid one keep x_t.

    Args:
        x_t: ``[B, T]`` values.
        valid_t: ``[B, T]`` bool.
    Returns:
        ``[B, T]``: every invalid step carries the last valid value forward.
    """
    x_t = tf.convert_to_tensor(x_t)
    valid_t = tf.cast(valid_t, tf.bool)
    steps = tf.range(tf.shape(x_t)[1])[None, :]  # [1, T]
    source = tf.where(valid_t, steps, -1)  # [B, T]
    # Running max over j <= t as a masked max over a [T, T] lower triangle: T is a
    # window length (tens to hundreds), and this stays one fused op under XLA.
    length = tf.shape(x_t)[1]
    lower = tf.range(length)[:, None] >= tf.range(length)[None, :]  # [T(t), T(j)]
    source = tf.reduce_max(tf.where(lower[None], source[:, None, :], -1), axis=2)  # [B, T]
    source = tf.where(source < 0, tf.broadcast_to(steps, tf.shape(source)), source)
    return tf.gather(x_t, source, axis=1, batch_dims=1)


def rewards_and_continuations(
    reward_t: tf.Tensor,
    discount_t: tf.Tensor,
    has_action_t: tf.Tensor,
    *,
    gamma: float,
    reward_scale: float = 1.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """r_t = reward_scale · reward_t and pcont_t = γ · discount_t where step t has an action; r_t = 0 and
    pcont_t = 1 where it has none.

    The one place where the two conventions for a step without an action (the
    final observation of an episode, padding) meet. A batch
    (:class:`burnin.SequenceBatch`) stores ``discount`` 0 there, as it stores
    ``reward`` and ``action`` 0; :func:`n_step_returns` needs continuation 1
    there, so that a return reaching the episode's end adds no more reward and
    bootstraps from the final observation's value (carried forward by
    :func:`r2d2_targets`) with the right power of γ. A termination is the
    discount 0 of the last action itself.

    Args:
        reward_t: ``[B, T]`` rewards of the action at step t.
        discount_t: ``[B, T]`` 0 where the action at t terminated the episode (or t has no action), else 1.
        has_action_t: ``[B, T]`` bool: step t exists and is not a final observation.
        gamma: discount γ in [0, 1].
        reward_scale: factor on the rewards.
    Returns:
        ``(r_t, pcont_t)``, each ``[B, T]``: the inputs of :func:`n_step_returns`.
    """
    # No multiply at scale 1: the graph then stays the one before reward_scale existed (its rewrites
    # changed the masked-CartPole demo's run, though x · 1 is exact).
    scaled = reward_t if reward_scale == 1.0 else reward_scale * reward_t
    r_t = tf.where(has_action_t, scaled, 0.0)
    pcont_t = tf.where(has_action_t, gamma * discount_t, 1.0)
    return r_t, pcont_t


def n_step_returns(r_t: tf.Tensor, pcont_t: tf.Tensor, v_t: tf.Tensor, *, n: int) -> tf.Tensor:
    """n-step bootstrapped returns with per-step continuation.

    G_t = Σ_{k=0}^{n−1} (Π_{j<k} pcont_{t+j}) · r_{t+k}  +  (Π_{j<n} pcont_{t+j}) · v_{t+n}

    Here ``r_t`` is the reward of the action taken at step t (rewards at
    [t+1 … t+n] in the usual notation) and ``pcont_t = γ · discount_t`` its
    continuation (0 after a termination). An episode that ends inside the
    n steps is handled with ``r = 0`` and ``pcont = 1`` on the final
    observation and after it (:func:`rewards_and_continuations` converts a
    batch's rewards and discounts so), and ``v`` carried forward from the final
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
    valid_t: tf.Tensor | None = None,
) -> tf.Tensor:
    """R2D2 targets: y_t = h( Σ_k (Π pcont) r_{t+k} + (Π pcont) · h⁻¹( q_target(s_{t+n}, argmax q_online(s_{t+n})) ) ).

    Args:
        r_t: ``[B, T + n]`` rewards of the action at step t (see :func:`n_step_returns`).
        pcont_t: ``[B, T + n]`` continuations γ·discount.
        q_online_t: ``[B, T + n, A]`` online Q-values (action selection only; no gradient).
        q_target_t: ``[B, T + n, A]`` target-network Q-values.
        n: bootstrap horizon.
        rescale_eps: ε of the value rescaling h; ``None`` turns rescaling off.
        valid_t: optional ``[B, T + n]`` bool; bootstrap values of invalid (right-padded)
            steps are replaced by the last valid step's, so an episode that ends
            inside the n steps bootstraps from its final observation.
    Returns:
        ``[B, T]`` targets, with gradients stopped.
    """
    v_t = double_q_bootstrap(tf.stop_gradient(q_online_t), tf.stop_gradient(q_target_t))  # [B, T+n]
    if valid_t is not None:
        v_t = forward_fill(v_t, valid_t)
    if rescale_eps is not None:
        v_t = value_rescale_inverse(v_t, eps=rescale_eps)
    g_t = n_step_returns(r_t, pcont_t, v_t, n=n)  # [B, T]
    if rescale_eps is not None:
        g_t = value_rescale(g_t, eps=rescale_eps)
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


class LossExtras(NamedTuple):
    """What :func:`r2d2_loss` returns beside the scalar loss."""

    td_errors: tf.Tensor
    """``[B, U]`` TD errors on the trained steps (0 where not learned)."""
    targets: tf.Tensor
    """``[B, U]`` rescaled n-step double-Q targets."""
    priorities: tf.Tensor
    """``[B]`` R2D2 priorities η·max|δ| + (1−η)·mean|δ| over the learn mask."""


def r2d2_loss(
    q_online_t: tf.Tensor,
    q_target_t: tf.Tensor,
    a_t: tf.Tensor,
    r_t: tf.Tensor,
    pcont_t: tf.Tensor,
    valid_t: tf.Tensor,
    learn_mask_t: tf.Tensor,
    weights: tf.Tensor,
    *,
    n: int,
    rescale_eps: float | None = 1e-3,
    priority_eta: float = 0.9,
) -> tuple[tf.Tensor, LossExtras]:
    """Importance-weighted, masked squared TD loss of one batch of windows, with priorities.

    Over the unrolled part of a window of ``U + n`` steps (trained steps first):

        y_t   = r2d2_targets(r, pcont, q_online, q_target)_t            t in [0, U)
        δ_t   = y_t − q_online_t[a_t]
        loss  = mean_b  w_b · Σ_t m_bt · ½ δ_bt² / Σ_t m_bt

    Args:
        q_online_t: ``[B, U + n, A]`` online Q-values (gradients flow through the first U steps).
        q_target_t: ``[B, U + n, A]`` target-network Q-values.
        a_t: ``[B, U + n]`` actions taken at step t.
        r_t: ``[B, U + n]`` rewards of those actions (0 where there is no action).
        pcont_t: ``[B, U + n]`` γ·discount (1 where there is no action; see
            :func:`rewards_and_continuations`).
        valid_t: ``[B, U + n]`` step exists (final observation included).
        learn_mask_t: ``[B, U]`` trained steps.
        weights: ``[B]`` importance-sampling weights.
        n: bootstrap horizon; ``U`` is inferred as ``T − n``.
        rescale_eps: ε of the value rescaling, or None.
        priority_eta: η of the priority mixture.
    Returns:
        ``(loss, LossExtras)``.
    """
    targets = r2d2_targets(
        r_t, pcont_t, q_online_t, q_target_t, n=n, rescale_eps=rescale_eps, valid_t=valid_t
    )  # [B, U]
    unroll = targets.shape[1]
    m = tf.cast(learn_mask_t, q_online_t.dtype)  # [B, U]
    td = td_errors(q_online_t[:, :unroll], a_t[:, :unroll], targets) * m  # [B, U]
    per_row = tf.math.divide_no_nan(tf.reduce_sum(0.5 * tf.square(td), axis=1), tf.reduce_sum(m, axis=1))
    loss = tf.reduce_mean(tf.cast(weights, per_row.dtype) * per_row)
    priorities = priority_mixture(tf.abs(tf.stop_gradient(td)), learn_mask_t, eta=priority_eta)
    return loss, LossExtras(td_errors=tf.stop_gradient(td), targets=targets, priorities=priorities)
