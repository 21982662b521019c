"""Masked CartPole (cart position and pole angle only) as a gymnasium env id, and vector-env helpers."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.classic_control.cartpole import CartPoleEnv, CartPoleVectorEnv
from gymnasium.vector import AutoresetMode

from burnin._checks import check_int

__all__ = [
    "MASKED_CARTPOLE_ID",
    "MASKED_CARTPOLE_SOLVED",
    "VISIBLE",
    "MaskedCartPoleEnv",
    "MaskedCartPoleVectorEnv",
    "make_vector_env",
]

MASKED_CARTPOLE_ID = "MaskedCartPole-v1"
MASKED_CARTPOLE_SOLVED = 475.0
"""Mean return that counts as solved (CartPole-v1's threshold; the env's ``reward_threshold``)."""
VISIBLE = np.array([0, 2])
"""Indices of CartPole's observation that stay visible: cart position x and pole angle θ.
The velocities ẋ and θ̇ (indices 1 and 3) are hidden, so a policy must infer them from
the history: without memory the task cannot be solved."""


def _masked_space(space: spaces.Box) -> spaces.Box:
    return spaces.Box(space.low[..., VISIBLE], space.high[..., VISIBLE], dtype=np.float32)


class MaskedCartPoleEnv(CartPoleEnv):
    """CartPole-v1 whose observation is ``[x, θ]``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.observation_space = _masked_space(self.observation_space)

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs[VISIBLE], reward, terminated, truncated, info

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = super().reset(seed=seed, options=options)
        return obs[VISIBLE], info


class MaskedCartPoleVectorEnv(CartPoleVectorEnv):
    """Gymnasium's numpy-vectorised CartPole, observation ``[num_envs, 2]``, NEXT_STEP autoreset."""

    def __init__(self, num_envs: int = 1, **kwargs: Any) -> None:
        super().__init__(num_envs=num_envs, **kwargs)
        self.single_observation_space = _masked_space(self.single_observation_space)
        self.observation_space = _masked_space(self.observation_space)

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs[:, VISIBLE], reward, terminated, truncated, info

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = super().reset(seed=seed, options=options)
        return obs[:, VISIBLE], info


if MASKED_CARTPOLE_ID not in gym.registry:
    gym.register(
        id=MASKED_CARTPOLE_ID,
        entry_point="agents.envs:MaskedCartPoleEnv",
        vector_entry_point="agents.envs:MaskedCartPoleVectorEnv",
        max_episode_steps=500,
        reward_threshold=MASKED_CARTPOLE_SOLVED,
    )


def make_vector_env(
    num_envs: int, *, env_id: str = MASKED_CARTPOLE_ID, seed: int | None = None
) -> gym.vector.VectorEnv:
    """A gymnasium vector env of ``num_envs`` copies of ``env_id``, with NEXT_STEP autoreset.

    CartPole ids use gymnasium's numpy-vectorised implementation; other ids a
    ``SyncVectorEnv``. The env is reset once with ``seed`` before returning
    (call ``env.reset`` yourself to get the first observation again).
    """
    check_int("num_envs", num_envs, minimum=1)
    spec = gym.spec(env_id)
    mode = "vector_entry_point" if spec.vector_entry_point is not None else "sync"
    env = gym.make_vec(env_id, num_envs=int(num_envs), vectorization_mode=mode)
    autoreset = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if autoreset != AutoresetMode.NEXT_STEP:
        env.close()
        raise ValueError(f"env_id: {env_id!r} uses autoreset mode {autoreset}, expected NEXT_STEP")
    if not isinstance(env.single_action_space, spaces.Discrete):
        env.close()
        raise ValueError(f"env_id: {env_id!r} has action space {env.single_action_space}, expected Discrete")
    obs_space = env.single_observation_space
    if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
        env.close()
        raise ValueError(f"env_id: {env_id!r} has observation space {obs_space}, expected a 1-D Box")
    env.reset(seed=seed)
    return env
