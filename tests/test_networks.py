"""Tests for the Q-network builder: shapes, options, weight sharing across batch sizes, masking, dtypes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import random_state

import burnin
from agents.r2d2.networks import XLA_LOOP_MAX_UNITS, NetworkConfig, build_q_network, network_inputs

CFG = NetworkConfig(obs_dim=3, num_actions=4, torso_units=(8,), core_units=16, head_units=8)


def inputs(config: NetworkConfig, batch: int, steps: int, rng) -> list[np.ndarray]:
    return network_inputs(
        config,
        rng.standard_normal((batch, steps, config.obs_dim)).astype(np.float32),
        rng.integers(0, config.num_actions, (batch, steps)).astype(np.int32),
        rng.standard_normal((batch, steps)).astype(np.float32),
    )


@pytest.mark.parametrize(
    ("prev_action", "prev_reward", "n_inputs"), [(True, True, 3), (True, False, 2), (False, False, 1)]
)
def test_inputs_and_output_shape(prev_action, prev_reward, n_inputs, rng):
    config = NetworkConfig(**{**CFG.__dict__, "prev_action": prev_action, "prev_reward": prev_reward})
    model = build_q_network(config, batch_size=5)
    assert len(model.inputs) == n_inputs
    q = model(inputs(config, 5, 7, rng))
    assert tuple(q.shape) == (5, 7, 4) and q.dtype == "float32"


def test_dueling_heads_mean_zero_advantage(rng):
    model = build_q_network(CFG, batch_size=2)
    x = inputs(CFG, 2, 3, rng)
    burnin.reset_states(model)
    value = keras.Model(model.inputs, model.get_layer("value").output)(x)
    burnin.reset_states(model)  # the first call advanced the shared LSTM state
    q = model(x)
    np.testing.assert_allclose(np.mean(q, axis=-1, keepdims=True), value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["keras", "hoisted", "unrolled", "fused"])
def test_copies_at_other_batch_sizes_share_weights(impl, rng):
    """Learner (batch 6) and actor (batch 2) copies give the same Q on the same rows."""
    config = NetworkConfig(**{**CFG.__dict__, "lstm_impl": impl})
    learner = build_q_network(config, batch_size=6, seed=1)
    actor = build_q_network(config, batch_size=2, seed=2)
    actor.set_weights(learner.get_weights())
    x = inputs(config, 6, 5, rng)
    start = random_state(learner, rng)
    burnin.set_states(learner, start)
    burnin.set_states(actor, tuple(tuple(a[:2] for a in entry) for entry in start))
    full = keras.ops.convert_to_numpy(learner(x))
    steps = [keras.ops.convert_to_numpy(actor([v[:2, t : t + 1] for v in x])) for t in range(5)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full[:2], rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights():
    a = build_q_network(CFG, batch_size=3, seed=4)
    b = build_q_network(CFG, batch_size=9, seed=4)
    c = build_q_network(CFG, batch_size=3, seed=5)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert any(not np.array_equal(wa, wc) for wa, wc in zip(a.get_weights(), c.get_weights()))


def test_recurrent_model_is_guarded(rng):
    model = build_q_network(CFG, batch_size=4)
    with pytest.raises(ValueError, match="x has 3 rows"):
        model.predict(inputs(CFG, 3, 2, rng), verbose=0)


def test_masks_reach_the_lstm(rng):
    model = build_q_network(CFG, batch_size=4)
    burnin.BurnInRunner(model, burn_in=1).check_masking(inputs(CFG, 4, 3, rng))


def test_dense_core_has_no_state(rng):
    config = NetworkConfig(**{**CFG.__dict__, "core": "dense"})
    model = build_q_network(config, batch_size=4)
    assert not config.recurrent
    with pytest.raises(ValueError, match="no stateful RNN layer"):
        burnin.get_states(model)
    assert tuple(model(inputs(config, 4, 2, rng)).shape) == (4, 2, 4)


def test_mixed_bfloat16_keeps_float32_state_and_output(rng):
    config = NetworkConfig(**{**CFG.__dict__, "dtype_policy": "mixed_bfloat16"})
    model = build_q_network(config, batch_size=4)
    q = model(inputs(config, 4, 3, rng))
    assert q.dtype == "float32"
    assert all(a.dtype == np.float32 for a in burnin.get_states(model)[0])
    assert model.get_layer("lstm").compute_dtype == "bfloat16"


# A value of the wrong type is a TypeError, a wrong value of the right type a ValueError (burnin._checks).
@pytest.mark.parametrize(
    ("field", "value", "error"),
    [("obs_dim", 0, ValueError), ("num_actions", 1.5, TypeError), ("core", "gru", ValueError),
     ("torso_units", (8, -1), ValueError), ("lstm_impl", "cudnn", ValueError), ("dtype_policy", "float16", ValueError),
     ("core_units", True, TypeError), ("core_layers", ("lstm", "rnn"), ValueError)],
)  # fmt: skip
def test_bad_config_names_the_field(field, value, error):
    with pytest.raises(error, match=f"^{field}: "):
        NetworkConfig(**{**CFG.__dict__, field: value})


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        build_q_network(CFG, batch_size=0)


@pytest.mark.parametrize(
    ("units", "policy", "jit"),
    [
        (XLA_LOOP_MAX_UNITS, "float32", True),
        (2 * XLA_LOOP_MAX_UNITS, "float32", False),
        (16, "mixed_bfloat16", False),
    ],
)
def test_fused_lstm_compiles_its_loops_only_where_xla_is_faster(units, policy, jit):
    config = NetworkConfig(
        **{**CFG.__dict__, "lstm_impl": "fused", "core_units": units, "dtype_policy": policy}
    )
    lstm = build_q_network(config, batch_size=2).get_layer("lstm")
    assert lstm.fused_gradient and lstm.jit_loops is jit
