"""Masked CartPole (cart position and pole angle only) as a gymnasium env id, and vector envs for any
gymnasium id: ids a package registers on import (``popgym-…``, ``ALE/…``, or ``module:id``) work, and
Atari ids get gymnasium's usual preprocessing."""

from __future__ import annotations

import functools
import importlib
import re
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.classic_control.cartpole import CartPoleEnv, CartPoleVectorEnv
from gymnasium.envs.registration import parse_env_id
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers import AtariPreprocessing

from agents.spaces import action_encoding, observation_encoding
from burnin._checks import check_int, check_str

__all__ = [
    "MASKED_CARTPOLE_ID",
    "MASKED_CARTPOLE_SOLVED",
    "VISIBLE",
    "MaskedCartPoleEnv",
    "MaskedCartPoleVectorEnv",
    "atari_preprocessing",
    "ensure_registered",
    "make_vector_env",
    "solve_threshold",
]

PACKAGES = {"ALE": "ale_py"}
"""Packages that register an id prefix (the part before the first '/' or '-') under another name;
any other prefix is tried as a module name (``popgym-…`` → ``popgym``)."""
INSTALL_HINTS = {
    "ale_py": "pip install -e '.[atari]' (ale-py ships the ROMs; opencv resizes the frames)",
    "popgym": "pip install -e '.[popgym]' (POPGym's memory envs)",
}

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


def ensure_registered(env_id: str) -> str:
    """The bare gymnasium id of ``env_id``, registered: ``module:id`` imports ``module`` first (as
    ``gym.make`` does); an unknown id imports the package its prefix names (``ALE/…`` → ale_py,
    ``popgym-…`` → popgym). ValueError when the id is still unknown."""
    check_str("env_id", env_id, empty=False)
    module, _, name = env_id.rpartition(":")
    if module:
        _import(module, env_id)
    if name in gym.registry:
        return name
    prefix = re.split(r"[/-]", name, maxsplit=1)[0]
    package = PACKAGES.get(prefix, prefix.lower())
    tried = f"nor after importing {package!r}"
    try:
        _import(package, env_id)
    except _MissingModule:
        if package in INSTALL_HINTS:
            raise
    except ValueError as err:  # the module is there but broken: say so, it may be the one registering the id
        tried = f"importing {package!r} failed: {str(err).partition('; ')[2] or err}"
    if name not in gym.registry:
        raise ValueError(
            f"env_id: {env_id!r} is not a registered gymnasium id ({tried}); "
            + (_other_versions(name, module) or "expected an id gymnasium knows, or --import MODULE / "
               "'module:id' for the package registering it")
        )  # fmt: skip
    return name


def _other_versions(name: str, module: str) -> str:
    """'registered: …' naming the registered versions of ``name`` (Taxi-v4 for Taxi-v3), or ''."""
    try:
        namespace, base, _ = parse_env_id(name)
    except gym.error.Error:
        return ""
    found = sorted(k for k in gym.registry if parse_env_id(k)[:2] == (namespace, base))
    if not found:
        return ""
    prefix = f"{module}:" if module else ""
    return f"registered versions: {', '.join(repr(prefix + k) for k in found)}; expected one of these"


class _MissingModule(ValueError):
    """The module to import is not installed (as opposed to installed but failing to import)."""


def _import(module: str, env_id: str) -> None:
    """Import ``module``; ValueError naming it when it is not installed (:class:`_MissingModule`), when a
    module it imports is not installed, or when its import fails in any other way."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if module == missing or module.startswith(missing + "."):
            hint = INSTALL_HINTS.get(module, f"install the package providing {module!r}")
            raise _MissingModule(f"env_id: {env_id!r} needs module {module!r} ({err.msg}); {hint}") from None
        raise ValueError(
            f"env_id: {env_id!r} needs module {module!r}, which is installed but failed to import; "
            f"it needs module {missing!r}, which is not installed: install it"
        ) from None
    except Exception as err:  # a user's module: any error in its import is reported, not a traceback
        raise ValueError(
            f"env_id: {env_id!r} needs module {module!r}, which is installed but failed to import; "
            f"{type(err).__name__}: {err}"
        ) from None


def is_atari(env_id: str) -> bool:
    """Whether ``env_id`` (bare) is an ALE id, which gets :func:`atari_preprocessing`."""
    return env_id.startswith("ALE/")


atari_preprocessing = functools.partial(
    AtariPreprocessing,
    noop_max=30,
    frame_skip=4,
    screen_size=84,
    grayscale_obs=True,
    grayscale_newaxis=True,
    scale_obs=False,
)
"""The usual Atari preprocessing (gymnasium's wrapper): up to 30 no-ops at reset, frame skip 4 with
max-pooling, 84×84 grey uint8 frames ``[84, 84, 1]``, no frame stack (the LSTM is the memory). The
ALE env itself is made with ``frameskip=1`` so that the wrapper does the skipping."""


def solve_threshold(env_id: str) -> float | None:
    """The env spec's ``reward_threshold`` (None when it has none)."""
    threshold = gym.spec(ensure_registered(env_id)).reward_threshold
    return None if threshold is None else float(threshold)


def make_vector_env(
    num_envs: int, *, env_id: str = MASKED_CARTPOLE_ID, seed: int | None = None
) -> gym.vector.VectorEnv:
    """A gymnasium vector env of ``num_envs`` copies of ``env_id``, with NEXT_STEP autoreset.

    ``env_id`` may name a package to import (:func:`ensure_registered`). Ids with
    a numpy-vectorised implementation (CartPole) use it; other ids a
    ``SyncVectorEnv``; ALE ids get :data:`atari_preprocessing`. The env is reset
    once with ``seed`` before returning (call ``env.reset`` yourself to get the
    first observation again). ValueError if its spaces are ones the agent cannot
    take (:func:`agents.spaces.observation_encoding`, :func:`agents.spaces.action_encoding`).
    """
    check_int("num_envs", num_envs, minimum=1)
    name = ensure_registered(env_id)
    spec = gym.spec(name)
    try:
        if is_atari(name):
            env = gym.make_vec(
                name, num_envs=int(num_envs), vectorization_mode="sync", wrappers=[atari_preprocessing],
                frameskip=1,
            )  # fmt: skip
        else:
            mode = "vector_entry_point" if spec.vector_entry_point is not None else "sync"
            env = gym.make_vec(name, num_envs=int(num_envs), vectorization_mode=mode)
    except (gym.error.DependencyNotInstalled, ImportError) as err:  # e.g. Box2D, MuJoCo, jax, opencv
        hint = f"; {INSTALL_HINTS['ale_py']}" if is_atari(name) else ""
        raise ValueError(f"env_id: {env_id!r} needs a package that is not installed ({err}){hint}") from None
    except Exception as err:  # a user's env constructor: its error in one line, before anything runs
        raise ValueError(f"env_id {env_id!r}: making the env failed ({type(err).__name__}: {err})") from None
    autoreset = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if autoreset != AutoresetMode.NEXT_STEP:
        env.close()
        raise ValueError(f"env_id: {env_id!r} uses autoreset mode {autoreset}, expected NEXT_STEP")
    try:
        observation_encoding(env.single_observation_space, where=f"env_id {env_id!r}: observation space")
        action_encoding(env.single_action_space, where=f"env_id {env_id!r}: action space")
    except ValueError:
        env.close()
        raise
    try:
        _, _ = env.reset(seed=seed)
    except Exception as err:  # e.g. a reset() returning the observation alone (the pre-0.26 gym API)
        env.close()
        raise ValueError(
            f"env_id {env_id!r}: reset() failed ({type(err).__name__}: {err}); a gymnasium env's "
            "reset(seed=..., options=...) returns (observation, info)"
        ) from None
    return env
