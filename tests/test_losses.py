"""Hand-computed tests for burnin.losses and burnin.diagnostics, run eagerly and inside tf.function."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from burnin import losses
from burnin.diagnostics import delta_q, delta_q_spread

GAMMA = 0.9


@pytest.fixture(params=["eager", "function"])
def call(request):
    """Run a numeric function eagerly, or traced inside a tf.function."""

    def run(fn, *args, **kwargs):
        if request.param == "eager":
            out = fn(*args, **kwargs)
        else:
            out = tf.function(lambda: fn(*args, **kwargs))()
        return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)

    return run


def h_np(x, eps=1e-3):
    return np.sign(x) * (np.sqrt(np.abs(x) + 1) - 1) + eps * x


# ------------------------------------------------------------- rescaling


def test_value_rescale_by_hand(call):
    x = np.array([0.0, 3.0, -8.0, 15.0])
    want = np.array([0.0, 1.0 + 3e-3, -2.0 - 8e-3, 3.0 + 15e-3])
    np.testing.assert_allclose(call(losses.value_rescale, x), want, rtol=1e-12)


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 0.5])
def test_value_rescale_round_trip(eps, call):
    x = np.concatenate([-np.logspace(-6, 5, 200), [0.0], np.logspace(-6, 5, 200)])
    back = call(lambda v: losses.value_rescale_inverse(losses.value_rescale(v, eps=eps), eps=eps), x)
    np.testing.assert_allclose(back, x, rtol=1e-9, atol=1e-9)
    y = call(losses.value_rescale, x, eps=eps)
    np.testing.assert_allclose(
        call(lambda v: losses.value_rescale(losses.value_rescale_inverse(v, eps=eps), eps=eps), y),
        y,
        rtol=1e-9,
        atol=1e-12,
    )


# --------------------------------------------------------------- targets


def test_double_q_bootstrap_picks_online_argmax(call):
    q_online = np.array([[[1.0, 5.0, 2.0], [9.0, 0.0, 1.0]]])  # argmax 1, then 0
    q_target = np.array([[[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]])
    np.testing.assert_allclose(call(losses.double_q_bootstrap, q_online, q_target), [[20.0, 40.0]])


def test_n_step_returns_by_hand(call):
    r = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    pcont = np.array([[0.9, 0.9, 0.0, 0.9, 0.9]])
    v = np.array([[10.0, 20.0, 30.0, 40.0, 50.0]])
    # G_0 = 1 + .9·2 + .81·30;  G_1 = 2 + .9·3 + .9·0·40;  G_2 = 3 + 0·4 + 0·.9·50
    want = [[1 + 0.9 * 2 + 0.81 * 30, 2 + 0.9 * 3, 3.0]]
    np.testing.assert_allclose(call(losses.n_step_returns, r, pcont, v, n=2), want, rtol=1e-12)


def test_n_step_of_one_is_one_step_td(call):
    r = np.array([[1.0, 2.0, 3.0]])
    pcont = np.array([[0.5, 0.25, 1.0]])
    v = np.array([[0.0, 8.0, 16.0]])
    np.testing.assert_allclose(call(losses.n_step_returns, r, pcont, v, n=1), [[1 + 0.5 * 8, 2 + 0.25 * 16]])


# The two conventions for a step without an action: the batch's discount 0 there, the n-step sum's pcont 1.
NO_ACTION_CASES = {
    # name: (reward, discount, has_action, reward_scale) -> (r, pcont) with γ = GAMMA
    "acting": (([2.0], [1.0], [True], 1.0), ([2.0], [GAMMA])),
    "terminating action": (([2.0], [0.0], [True], 1.0), ([2.0], [0.0])),
    "final observation": (([0.0], [0.0], [False], 1.0), ([0.0], [1.0])),
    "padding with garbage": (([5.0], [0.5], [False], 3.0), ([0.0], [1.0])),
    "scaled reward": (([2.0], [1.0], [True], 3.0), ([6.0], [GAMMA])),
}


@pytest.mark.parametrize("case", sorted(NO_ACTION_CASES))
def test_rewards_and_continuations(case, call):
    (reward, discount, has_action, scale), want = NO_ACTION_CASES[case]
    got = call(
        losses.rewards_and_continuations,
        np.array([reward], np.float32),
        np.array([discount], np.float32),
        np.array([has_action]),
        gamma=GAMMA,
        reward_scale=scale,
    )
    np.testing.assert_allclose(got, np.array([[want[0]], [want[1]]], np.float32), rtol=1e-6)


# An episode with actionable steps 0 and 1 and its final observation at step 2, then 2
# steps of right padding, in the batch's convention (discount 0 where there is no action).
V_FINAL = 7.0
EPISODE_END_CASES = {
    # name: (discount of the last action, expected [G_0, G_1] with n = 3)
    "truncated": (1.0, [1 + GAMMA + GAMMA**2 * V_FINAL, 1 + GAMMA * V_FINAL]),
    "terminated": (0.0, [1 + GAMMA, 1.0]),
}


@pytest.mark.parametrize("case", sorted(EPISODE_END_CASES))
def test_targets_at_episode_end(case, call):
    last_discount, want = EPISODE_END_CASES[case]
    reward = np.array([[1.0, 1.0, 0.0, 0.0, 0.0]])
    discount = np.array([[1.0, last_discount, 0.0, 0.0, 0.0]])
    has_action = np.array([[True, True, False, False, False]])
    r, pcont = losses.rewards_and_continuations(reward, discount, has_action, gamma=GAMMA)
    valid = np.array([[True, True, True, False, False]])
    q_online = np.zeros((1, 5, 2))
    q_online[..., 1] = 1.0  # online argmax is action 1 everywhere
    q_target = np.full((1, 5, 2), -100.0)  # padding holds garbage
    q_target[0, :3, 1] = [3.0, 5.0, V_FINAL]
    got = call(losses.r2d2_targets, r, pcont, q_online, q_target, n=3, rescale_eps=None, valid_t=valid)
    np.testing.assert_allclose(got, [want], rtol=1e-12)


def test_targets_with_value_rescaling_by_hand(call):
    eps = 1e-3
    r = np.array([[1.0, 1.0, 0.0, 0.0]])
    pcont = np.array([[GAMMA, GAMMA, 1.0, 1.0]])
    valid = np.array([[True, True, True, False]])
    q = np.zeros((1, 4, 1))
    q[0, :, 0] = [2.0, 3.0, V_FINAL, -50.0]
    h_inv_v = losses.value_rescale_inverse(np.array(V_FINAL), eps=eps).numpy()
    want = h_np(np.array([1 + GAMMA + GAMMA**2 * h_inv_v]), eps)  # G_0 with n = 2 reaching the final obs
    got = call(losses.r2d2_targets, r, pcont, q, q, n=2, rescale_eps=eps, valid_t=valid)
    np.testing.assert_allclose(got[0, 0], want[0], rtol=1e-12)


def test_forward_fill(call):
    x = np.arange(12.0).reshape(2, 6)
    valid = np.array([[1, 1, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0]], bool)
    want = [[0, 1, 2, 2, 2, 5], [6, 7, 7, 7, 10, 10]]  # nothing before the first valid step to carry
    np.testing.assert_allclose(call(losses.forward_fill, x, valid), want)


def test_td_errors(call):
    q = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    a = np.array([[1, 0]])
    np.testing.assert_allclose(call(losses.td_errors, q, a, np.array([[5.0, 5.0]])), [[3.0, 2.0]])


def test_priority_mixture_by_hand(call):
    td = np.array([[1.0, 3.0, 2.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    want = [0.9 * 3 + 0.1 * 2, 4.0, 0.0]  # the unmasked 2 and 9s do not count
    np.testing.assert_allclose(call(losses.priority_mixture, td, mask, eta=0.9), want, rtol=1e-12)


def test_priority_eta_range():
    with pytest.raises(ValueError, match="eta: expected a value in \\[0, 1\\], got 1.5"):
        losses.priority_mixture(np.ones((1, 2)), np.ones((1, 2), bool), eta=1.5)


def test_n_step_rejects_short_window():
    with pytest.raises(ValueError, match="r_t: expected more than n=3 time steps"):
        losses.n_step_returns(np.ones((1, 3)), np.ones((1, 3)), np.ones((1, 3)), n=3)


def test_r2d2_loss_by_hand(call):
    # B = 2, U = 1, n = 1, A = 2, no rescaling; row 1 has an empty learn mask.
    q_online = np.array([[[1.0, 2.0], [0.0, 4.0]], [[5.0, 0.0], [1.0, 0.0]]])
    q_target = np.array([[[0.0, 0.0], [0.0, 10.0]], [[0.0, 0.0], [6.0, 0.0]]])
    a = np.array([[0, 0], [0, 0]])
    r = np.array([[1.0, 0.0], [2.0, 0.0]])
    pcont = np.array([[0.5, 1.0], [0.5, 1.0]])
    valid = np.ones((2, 2), bool)
    learn = np.array([[True], [False]])
    weights = np.array([0.5, 1.0])
    loss, extras = call(
        losses.r2d2_loss,
        q_online,
        q_target,
        a,
        r,
        pcont,
        valid,
        learn,
        weights,
        n=1,
        rescale_eps=None,
        priority_eta=0.9,
    )
    # row 0: y = 1 + .5·q_target[1, argmax q_online[1] = 1] = 1 + 5 = 6; δ = 6 − q[0, a=0] = 5
    np.testing.assert_allclose(extras.targets[0], [6.0])
    np.testing.assert_allclose(extras.td_errors, [[5.0], [0.0]])
    np.testing.assert_allclose(loss, (0.5 * 0.5 * 25 + 1.0 * 0.0) / 2)
    np.testing.assert_allclose(extras.priorities, [5.0, 0.0])


def test_r2d2_loss_gradient_only_through_trained_q():
    q = tf.Variable(np.random.default_rng(0).standard_normal((1, 3, 2)))
    with tf.GradientTape() as tape:
        loss, _ = losses.r2d2_loss(
            q, q, np.zeros((1, 3), np.int32), np.ones((1, 3)), np.full((1, 3), 0.9), np.ones((1, 3), bool),
            np.ones((1, 2), bool), np.ones(1), n=1,
        )  # fmt: skip
    grad = tape.gradient(loss, q).numpy()
    assert grad[0, :2, 0].all()  # the taken action at the trained steps
    assert not grad[0, :, 1].any() and not grad[0, 2].any()  # bootstrap side is stopped


# ------------------------------------------------------------ diagnostics


def test_delta_q_by_hand(call):
    q_hat_t = np.array([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]])
    q_t = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    q_hat_seq = np.array(
        [
            [[1.0, 2.0], [4.0, 0.0], [100.0, 0.0]],  # the 100 is masked out: max = 4
            [[-2.0, -3.0], [-5.0, -4.0], [0.0, 0.0]],  # all negative: |max| = |−2| = 2
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # max 0: undefined
        ]
    )
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 1]], bool)
    got = call(delta_q, q_hat_t, q_t, q_hat_seq, mask)
    np.testing.assert_allclose(got[:2], [2.0 / 4.0, 5.0 / 2.0])
    assert np.isnan(got[2])


def test_delta_q_spread_by_hand(call):
    """The same rows as test_delta_q_by_hand, divided by max − min of the masked Q-values instead."""
    q_hat_t = np.array([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    q_t = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0], [0.0, 0.0]])
    q_hat_seq = np.array(
        [
            [[1.0, 2.0], [4.0, 0.0], [100.0, 0.0]],  # masked 100 left out: spread 4 − 0 = 4
            [[-2.0, -3.0], [-5.0, -4.0], [0.0, 0.0]],  # spread −2 − (−5) = 3
            [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],  # spread 0: undefined
            [[10.0, 11.0], [10.5, 10.0], [9.0, 0.0]],  # near 10, spread 1 (the paper's ΔQ would read 1/11)
        ]
    )
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]], bool)
    got = call(delta_q_spread, q_hat_t, q_t, q_hat_seq, mask)
    np.testing.assert_allclose(got[[0, 1, 3]], [2.0 / 4.0, 5.0 / 3.0, 1.0 / 1.0])
    assert np.isnan(got[2])


def test_delta_q_spread_ignores_a_shift_and_equals_the_papers_when_the_smallest_q_is_0(call):
    rng = np.random.default_rng(3)
    q_hat_seq = rng.uniform(0, 1, (4, 6, 3))
    q_hat_seq[:, 0, 0] = 0.0  # min 0 in every row
    q_hat_t, q_t, mask = q_hat_seq[:, 2], rng.uniform(0, 1, (4, 3)), np.ones((4, 6), bool)
    spread = call(delta_q_spread, q_hat_t, q_t, q_hat_seq, mask)
    np.testing.assert_allclose(spread, call(delta_q, q_hat_t, q_t, q_hat_seq, mask), rtol=1e-6)
    shifted = call(delta_q_spread, q_hat_t - 7.0, q_t - 7.0, q_hat_seq - 7.0, mask)
    np.testing.assert_allclose(shifted, spread, rtol=1e-5)


def test_delta_q_is_zero_for_equal_states(call):
    q = np.random.default_rng(1).standard_normal((4, 3)) + 5
    seq = np.random.default_rng(2).standard_normal((4, 6, 3)) + 5
    np.testing.assert_array_equal(call(delta_q, q, q, seq, np.ones((4, 6), bool)), np.zeros(4))


def test_rewards_at_scale_one_add_no_multiply_to_the_graph():
    """At reward_scale 1 the targets' graph is the one from before the scale existed: a multiply by 1,
    exact as it is, let TensorFlow's graph rewrites change the masked-CartPole demo's run (seed 0 solved
    at 90,001 env steps instead of 85,010)."""

    def muls(scale: float) -> int:
        fn = tf.function(
            lambda r, d, a: losses.rewards_and_continuations(r, d, a, gamma=0.9, reward_scale=scale)
        )
        spec = tf.TensorSpec([2, 3], tf.float32)
        graph = fn.get_concrete_function(spec, spec, tf.TensorSpec([2, 3], tf.bool)).graph
        return sum(op.type == "Mul" for op in graph.get_operations())

    assert muls(1.0) == 1  # γ · discount only
    assert muls(50.0) == 2
