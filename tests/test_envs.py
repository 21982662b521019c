"""Tests for masked CartPole: velocities hidden, registered id, NEXT_STEP autoreset in the vector env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

from agents import envs


def test_registered_and_masked():
    env = gym.make(envs.MASKED_CARTPOLE_ID)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2,) and env.observation_space.shape == (2,)
    full = gym.make("CartPole-v1")
    full_obs, _ = full.reset(seed=0)
    np.testing.assert_array_equal(obs, full_obs[[0, 2]])  # x and θ; ẋ and θ̇ hidden
    for _ in range(5):
        o, r, term, trunc, _ = env.step(1)
        fo, fr, fterm, ftrunc, _ = full.step(1)
        np.testing.assert_array_equal(o, fo[[0, 2]])
        assert (r, term, trunc) == (fr, fterm, ftrunc)
    assert env.spec.max_episode_steps == 500


def test_vector_env_matches_full_cartpole_and_autoresets():
    venv = envs.make_vector_env(4, seed=3)
    full = CartPoleVectorEnv(num_envs=4)
    obs, _ = venv.reset(seed=3)
    full_obs, _ = full.reset(seed=3)
    np.testing.assert_array_equal(obs, full_obs[:, [0, 2]])
    ended = np.zeros(4, bool)
    for _ in range(60):  # always pushing right ends every episode within ~10-60 steps
        a = np.ones(4, np.int64)
        o, r, term, trunc, _ = venv.step(a)
        fo, *_ = full.step(a)
        np.testing.assert_array_equal(o, fo[:, [0, 2]])
        # NEXT_STEP autoreset: the step after an ending returns reward 0 and no flags.
        assert not (ended & (term | trunc)).any()
        assert (r[ended] == 0).all()
        ended = term | trunc
    assert venv.single_observation_space.shape == (2,)


def test_make_vector_env_rejects_bad_input():
    with pytest.raises(ValueError, match="num_envs: expected an int >= 1, got 0"):
        envs.make_vector_env(0)
    with pytest.raises(ValueError, match="expected Discrete"):
        envs.make_vector_env(1, env_id="Pendulum-v1")
