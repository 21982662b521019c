"""The R2D2 actor: a vector env stepped by one fixed-batch stateful network, ε-greedy per row, writing
every step and the recurrent state before it to a replay; and greedy evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import tensorflow as tf
from gymnasium.vector import AutoresetMode

from agents.r2d2.config import R2D2Config
from agents.r2d2.networks import build_q_network, network_inputs
from agents.spaces import action_encoding, observation_encoding
from burnin._checks import check_float, check_int, fmt, int_vector
from burnin.replay import RecurrentState, ReplayConfig
from burnin.state import state_variables, stateful_layers

__all__ = [
    "EVAL_MAX_EPISODE_STEPS",
    "Actor",
    "EnvError",
    "ReplayWriter",
    "apex_epsilons",
    "check_epsilons",
    "evaluate",
    "max_episode_steps",
    "pcg64_from_state",
]

EVAL_MAX_EPISODE_STEPS = 27_000
"""Most steps :func:`evaluate` gives an episode of an env with no ``max_episode_steps`` (ALE's own limit:
108,000 frames at frame skip 4); an episode still running then ends there, as a time limit would."""


class EnvError(RuntimeError):
    """The env failed at a step: its ``reset()`` or ``step()`` raised, or gave an observation or reward
    that cannot be stored (wrong shape, outside its space, NaN). The message names the env and the step."""


class ReplayWriter(Protocol):
    """What the actor writes its steps to: a local :class:`burnin.replay.SequenceReplay` or a remote writer.

    ``config.obs_shape`` must match the env's observation; :meth:`add` takes one
    step for each of ``lanes`` (the convention of ``docs/replay.md``), and
    :meth:`close_lanes` ends their open episodes when the envs are reset.
    """

    @property
    def config(self) -> ReplayConfig: ...

    def add(
        self,
        lanes: Any,
        *,
        observation: Any,
        action: Any,
        reward: Any,
        terminated: Any,
        truncated: Any,
        states: RecurrentState | None = None,
    ) -> None: ...

    def close_lanes(self, lanes: Any) -> None: ...


def apex_epsilons(num: int, *, base: float = 0.4, alpha: float = 7.0) -> np.ndarray:
    """Ape-X per-actor exploration: ε_i = base^(1 + alpha · i / (N − 1)), i = 0 … N−1 (ε_0 = base)."""
    check_int("num", num, minimum=1)
    check_float("base", base, low=0.0, high=1.0)
    check_float("alpha", alpha, low=0.0)
    if num == 1:
        return np.array([base], dtype=np.float64)
    i = np.arange(num, dtype=np.float64)
    return base ** (1.0 + alpha * i / (num - 1))


class Actor:
    """Steps a gymnasium vector env of N envs with one fixed-batch stateful network of batch N.

    Per env row i: ε-greedy with the Ape-X ε_i; the recurrent state row is
    zeroed at each episode start; the state before every observation is passed
    to the replay beside the step. gymnasium's NEXT_STEP autoreset is handled
    explicitly: after a step that terminated or truncated, the row holds the
    episode's final observation; the next ``env.step`` ignores that row's
    action and returns the reset observation, and this step is what the replay
    stores as the final observation (see :mod:`burnin.replay`).

    Observations are kept and stored in the compact form of
    :func:`agents.spaces.observation_encoding` (the network encodes
    them); a MultiDiscrete action space is acted on as one flat Discrete and
    mapped back when stepping (:func:`agents.spaces.action_encoding`).
    """

    def __init__(
        self,
        config: R2D2Config,
        env: gym.vector.VectorEnv,
        *,
        replay: ReplayWriter | None = None,
        lanes: Sequence[int] | None = None,
        seed: int = 0,
        epsilons: np.ndarray | None = None,
    ) -> None:
        if not isinstance(config, R2D2Config):
            raise TypeError(f"config: expected an R2D2Config, got {type(config).__name__}")
        check_int("seed", seed, minimum=0)
        autoreset = getattr(env, "metadata", {}).get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if autoreset != AutoresetMode.NEXT_STEP:
            raise ValueError(
                f"env: autoreset mode {autoreset}, expected NEXT_STEP (the replay's step convention)"
            )
        self.config = config
        self.env = env
        self.num_envs = int(env.num_envs)
        spec = getattr(env, "spec", None)
        self.env_id: str = getattr(spec, "id", None) or type(env).__name__
        """The env's id (its spec's; else its class name), for messages."""
        self.encoding = observation_encoding(env.single_observation_space, where="env.observation_space")
        self.actions = action_encoding(env.single_action_space, where="env.action_space")
        self.num_actions = self.actions.num_actions
        if replay is not None:
            stored = replay.config
            if stored.obs_shape != self.encoding.shape:
                raise ValueError(
                    f"env: observation shape {self.encoding.shape} does not match the replay's {stored.obs_shape}"
                )
            if stored.obs_dtype != self.encoding.dtype:
                raise ValueError(
                    f"env: observations stored as {self.encoding.dtype}, but the replay holds {stored.obs_dtype}"
                )
        self.lanes = np.arange(self.num_envs) if lanes is None else int_vector("lanes", lanes, "lane ids")
        if self.lanes.shape != (self.num_envs,) or (self.lanes < 0).any():
            raise ValueError(f"lanes: expected {self.num_envs} lane ids >= 0, got {fmt(self.lanes)}")
        if epsilons is None:
            epsilons = apex_epsilons(self.num_envs, base=config.epsilon_base, alpha=config.epsilon_alpha)
        self.epsilons = check_epsilons(epsilons, self.num_envs)
        self.network_config = config.network(self.encoding, self.num_actions)
        self.model = build_q_network(self.network_config, batch_size=self.num_envs, seed=seed, name="actor")
        self.recurrent = self.network_config.recurrent
        self.replay = replay
        self.rng = np.random.default_rng(seed)
        layers = stateful_layers(self.model) if self.recurrent else []
        self._layer_sizes = [len(state_variables(layer)) for layer in layers]
        self._variables = [v for layer in layers for v in state_variables(layer)]
        self._policy = tf.function(self._policy_step, reduce_retracing=False)
        self.steps = 0  # calls of step()
        self.env_steps = 0  # real transitions (autoreset steps not counted)
        self.episodes = 0
        self.reset(seed=seed)

    def reset(self, *, seed: int | None = None) -> None:
        """Reset every env and start fresh episodes; the replay's open episodes in our lanes are closed.

        :class:`EnvError` (and nothing changed) if the env's ``reset()`` fails or its observation cannot be stored.
        """
        with self._env_call("reset()"):
            obs, _ = self.env.reset(seed=seed)
            stored = self._stored(obs)
        if self.replay is not None:
            self.replay.close_lanes(self.lanes)
        n = self.num_envs
        self.obs = stored
        self.prev_action = np.zeros(n, np.int32)
        self.prev_reward = np.zeros(n, np.float32)
        self.new_episode = np.ones(n, bool)
        self.final_pending = np.zeros(n, bool)
        self.episode_return = np.zeros(n, np.float64)
        self.episode_length = np.zeros(n, np.int64)

    def _stored(self, obs: Any) -> np.ndarray:
        """The env's observation batch in the stored form, checked (ValueError: shape, space, finite)."""
        return self.encoding.flatten(obs, self.num_envs)

    @contextlib.contextmanager
    def _env_call(self, what: str) -> Iterator[None]:
        """Any exception inside (the env's own, or a check of what it returned) as an :class:`EnvError`
        naming the env, ``what`` it was doing and the step; KeyboardInterrupt passes through."""
        try:
            yield
        except Exception as err:
            raise EnvError(
                f"env {self.env_id!r} failed at env step {self.env_steps} (actor step {self.steps}): "
                f"{what}: {type(err).__name__}: {err}"
            ) from err

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.model.set_weights(weights)

    def _policy_step(self, obs, prev_action, prev_reward, reset):
        before = []
        for v in self._variables:
            # Zero only the rows that start an episode; tf.where keeps the others bit for bit.
            v.assign(tf.where(reset[:, None], tf.zeros_like(v.value), v.value))
            before.append(tf.identity(v.value))
        inputs = network_inputs(self.network_config, obs[:, None], prev_action[:, None], prev_reward[:, None])
        q = self.model(inputs, training=False)[:, 0]  # [N, A]
        return q, before

    def act(self, *, greedy: bool = False) -> tuple[np.ndarray, np.ndarray, Any]:
        """Q-values, actions and the state before this step, for the current observations."""
        q, before = self._policy(
            tf.constant(self.obs),
            tf.constant(self.prev_action),
            tf.constant(self.prev_reward),
            tf.constant(self.new_episode),
        )
        q = q.numpy()
        greedy_actions = q.argmax(axis=1).astype(np.int32)
        if greedy:
            actions = greedy_actions
        else:
            explore = self.rng.random(self.num_envs) < self.epsilons
            random_actions = self.rng.integers(0, self.num_actions, self.num_envs, dtype=np.int32)
            actions = np.where(explore, random_actions, greedy_actions)
        arrays = iter([b.numpy() for b in before])
        states = tuple(tuple(next(arrays) for _ in range(n)) for n in self._layer_sizes)
        return q, actions, states

    def step(self, *, greedy: bool = False) -> list[tuple[int, float, int]]:
        """One env.step for all rows; returns (row, return, length) of the episodes that ended."""
        _, actions, states = self.act(greedy=greedy)
        with self._env_call("step()"):
            next_obs, reward, terminated, truncated, _ = self.env.step(self.actions.to_env(actions))
            next_obs = self._stored(next_obs)
            reward = _finite_rewards(reward, self.num_envs)
            terminated = np.asarray(terminated, bool)
            truncated = np.asarray(truncated, bool)
        if self.replay is not None:
            self.replay.add(
                self.lanes,
                observation=self.obs,
                action=actions,
                reward=reward,
                terminated=terminated,
                truncated=truncated,
                states=states if self.recurrent else None,
            )
        real = ~self.final_pending
        self.env_steps += int(real.sum())
        self.episode_return += np.where(real, reward, 0.0)
        self.episode_length += real
        done = terminated | truncated
        finished = [
            (int(i), float(self.episode_return[i]), int(self.episode_length[i])) for i in np.flatnonzero(done)
        ]
        self.episodes += len(finished)
        self.episode_return[done] = 0.0
        self.episode_length[done] = 0
        # A row that just stored its final observation starts a new episode at the next step.
        self.new_episode = self.final_pending.copy()
        self.final_pending = done
        self.prev_action = np.where(self.new_episode, 0, actions).astype(np.int32)
        self.prev_reward = np.where(self.new_episode, 0.0, reward).astype(np.float32)
        self.obs = next_obs
        self.steps += 1
        return finished

    # -------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Counters and the ε RNG (envs restart from a fresh reset when resumed)."""
        return {
            "steps": self.steps,
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "rng": self.rng.bit_generator.state,
        }

    @staticmethod
    def check_state_dict(state: Any) -> dict[str, Any]:
        """A :meth:`state_dict` checked as untrusted input: the counters as ints >= 0 and the ε RNG as a new
        Generator; TypeError/ValueError naming the field. Changes nothing."""
        if not isinstance(state, dict):
            raise TypeError(
                f"actor: expected a dict of counters and the RNG state, got {type(state).__name__}"
            )
        out: dict[str, Any] = {}
        for name in ("steps", "env_steps", "episodes"):
            if name not in state:
                raise ValueError(f"actor.{name}: missing")
            out[name] = check_int(f"actor.{name}", state[name], minimum=0)
        out["rng"] = pcg64_from_state("actor.rng", state.get("rng"))
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, checked first (:meth:`check_state_dict`): all or nothing."""
        checked = self.check_state_dict(state)
        self.steps, self.env_steps, self.episodes = (
            checked["steps"],
            checked["env_steps"],
            checked["episodes"],
        )
        self.rng = checked["rng"]


def _finite_rewards(reward: Any, num: int) -> np.ndarray:
    """A step's rewards as float32 ``[num]``; ValueError for another shape or a NaN or infinite reward."""
    out = np.asarray(reward, np.float32)
    if out.shape != (num,):
        raise ValueError(f"reward batch has shape {out.shape}, expected ({num},)")
    if not np.isfinite(out).all():
        raise ValueError(f"reward batch holds {fmt(out[~np.isfinite(out)])}, expected finite rewards")
    return out


def check_epsilons(epsilons: Any, num_envs: int) -> np.ndarray:
    """Per-row ε as float64 ``[num_envs]``; TypeError for non-numbers, ValueError unless each is finite in [0, 1]."""
    eps = np.asarray(epsilons)
    if eps.dtype.kind not in "fiu":
        raise TypeError(f"epsilons: expected numbers in [0, 1], got dtype {eps.dtype}")
    if eps.shape != (num_envs,):
        raise ValueError(f"epsilons: expected shape ({num_envs},), got {eps.shape}")
    eps = eps.astype(np.float64)
    bad = ~(np.isfinite(eps) & (eps >= 0) & (eps <= 1))
    if bad.any():
        raise ValueError(f"epsilons: expected finite values in [0, 1], got {fmt(eps[bad])}")
    return eps


def pcg64_from_state(name: str, state: Any) -> np.random.Generator:
    """A PCG64 Generator in ``state`` (a ``bit_generator.state`` dict, from a checkpoint); ValueError naming
    ``name`` otherwise. The actor's generator is always PCG64: any other bit generator is a bad checkpoint
    (the replay's :func:`burnin.replay.checkpoint.rng_from_state` takes any of numpy's)."""
    if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
        raise ValueError(f"{name}: expected the state of a PCG64 bit generator, got {state!r:.80}")
    bit_generator = np.random.PCG64()
    try:
        bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as err:
        raise ValueError(f"{name}: not a valid PCG64 state ({type(err).__name__}: {err})") from None
    return np.random.Generator(bit_generator)


def max_episode_steps(env: Any) -> int:
    """The steps :func:`evaluate` gives an episode of ``env``: its spec's ``max_episode_steps``, else
    :data:`EVAL_MAX_EPISODE_STEPS`."""
    limit = getattr(getattr(env, "spec", None), "max_episode_steps", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else EVAL_MAX_EPISODE_STEPS


def evaluate(
    actor: Actor, weights: list[np.ndarray], *, seed: int, max_steps: int | None = None
) -> np.ndarray:
    """Greedy returns of one episode per env row of ``actor`` (built with zero ε), run side by side.

    The actor's envs are reset with ``seed`` first; reuse one actor to keep its
    compiled step across evaluations. Bounded: an episode still running after
    ``max_steps`` steps (default :func:`max_episode_steps` of the env) ends
    there with the return it has, as a time limit would. An env that fails, or
    gives a NaN or infinite reward, raises :class:`EnvError` naming it.
    """
    check_int("seed", seed, minimum=0)
    limit = (
        max_episode_steps(actor.env) if max_steps is None else check_int("max_steps", max_steps, minimum=1)
    )
    actor.set_weights(weights)
    actor.reset(seed=seed)
    returns = np.zeros(actor.num_envs)
    done = np.zeros(actor.num_envs, bool)
    for _ in range(limit):
        for row, ret, _ in actor.step(greedy=True):
            if not done[row]:
                returns[row], done[row] = ret, True
        if done.all():
            return returns
    cut = ~done
    returns[cut] = actor.episode_return[cut]
    return returns
