"""SB3-contrib's RecurrentPPO with RL Zoo's tuned settings, timed to a task's bar: the peer `peer_race` runs beside burnin.

Not part of the package and not a dependency: :mod:`benchmarks.peer_race` runs it as ``python -m
benchmarks.recurrent_ppo_peer`` under an interpreter of its own that has torch, sb3-contrib, gymnasium
and popgym (benchmarks/README.md says how to make one). It imports neither burnin nor TensorFlow.

The settings are RL Zoo's for RecurrentPPO on CartPoleNoVel-v1 (CartPole with its velocities hidden), the
Zoo's one tuned discrete-action memory task; the race gives the POPGym tasks the same settings (the Zoo
has none for them) with the task overrides it gives burnin too (``--set gamma=0.0``). Observations are
burnin's: masked CartPole is CartPole-v1 with only the cart position and pole angle (the Zoo's
CartPoleNoVel zeroes the velocities instead; the information is the same). Evaluation is burnin's
protocol: every ``--eval-every`` env steps, ``--eval-episodes`` deterministic episodes side by side, and the
run stops at the first evaluation whose mean return reaches ``--bar``. The last line on stdout is the
result as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

MASKED_CARTPOLE_ID = "MaskedCartPole-v1"
VISIBLE = (0, 2)
"""CartPole's observation indices that stay visible: cart position and pole angle (as burnin's env)."""
EVAL_MAX_EPISODE_STEPS = 27_000
"""An evaluation episode ends here at the latest (burnin's bound for envs with no time limit)."""

ZOO_SOURCE = (
    "RL Zoo, DLR-RM/rl-baselines3-zoo hyperparams/ppo_lstm.yml, entry CartPoleNoVel-v1 "
    "(commit 038ab1617a486b7d918be8056697bf34caeefbcd)"
)
# The Zoo's entry, value for value (its `n_timesteps` is the budget it trained for: the race sets its own).
ZOO_CARTPOLE_NOVEL: dict[str, Any] = {
    "policy": "MlpLstmPolicy",
    "n_envs": 8,
    "n_timesteps": 100_000,
    "n_steps": 32,
    "batch_size": 256,
    "gae_lambda": 0.8,
    "gamma": 0.98,
    "n_epochs": 20,
    "ent_coef": 0.0,
    "learning_rate": "lin_0.001",
    "clip_range": "lin_0.2",
}
"""RecurrentPPO's settings; ``lin_X`` is the Zoo's linear schedule from X down to 0 over ``learn()``'s budget."""


class KeepPositionAndAngle(gym.ObservationWrapper):
    """CartPole's observation reduced to ``[x, θ]``."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        box = env.observation_space
        self.observation_space = gym.spaces.Box(
            box.low[list(VISIBLE)], box.high[list(VISIBLE)], dtype=np.float32
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[list(VISIBLE)].astype(np.float32)


def make_env(task: str) -> gym.Env:
    """One env of ``task``: masked CartPole (burnin's observations), or a POPGym id."""
    if task == MASKED_CARTPOLE_ID:
        return KeepPositionAndAngle(gym.make("CartPole-v1"))
    if task.startswith("popgym-"):
        import popgym  # noqa: F401  (registers the popgym-… ids)
    return gym.make(task)


def schedule(value: Any) -> Any:
    """The Zoo's ``lin_X`` as SB3's schedule (X times the fraction of the budget left), else the value."""
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value[4:])
        return lambda progress_remaining: progress_remaining * start
    return value


def evaluate(model: RecurrentPPO, task: str, *, episodes: int, seed: int) -> np.ndarray:
    """Deterministic returns of one episode on each of ``episodes`` envs run side by side (reset with
    ``seed + i``), each cut at its time limit (else :data:`EVAL_MAX_EPISODE_STEPS`)."""
    envs = [make_env(task) for _ in range(episodes)]
    try:
        obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
        limit = getattr(envs[0].spec, "max_episode_steps", None) or EVAL_MAX_EPISODE_STEPS
        returns, done = np.zeros(episodes), np.zeros(episodes, bool)
        state, starts = None, np.ones(episodes, bool)
        for _ in range(limit):
            actions, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
            starts = np.zeros(episodes, bool)
            for i in np.flatnonzero(~done):
                obs[i], reward, terminated, truncated, _ = envs[i].step(actions[i])
                returns[i] += reward
                done[i] = terminated or truncated
            if done.all():
                break
        return returns
    finally:
        for env in envs:
            env.close()


class RaceToBar(BaseCallback):
    """Evaluates every ``every`` env steps and stops training at the first mean return ≥ ``bar``."""

    def __init__(self, task: str, *, every: int, episodes: int, bar: float, seed: int) -> None:
        super().__init__()
        self.task, self.every, self.episodes, self.bar, self.seed = task, every, episodes, bar, seed
        self.next_eval = every
        self.evals: list[dict[str, Any]] = []
        self.solved: dict[str, Any] | None = None

    def _on_training_start(self) -> None:
        self.start = time.perf_counter()

    def _on_step(self) -> bool:
        if self.num_timesteps < self.next_eval:
            return True
        self.next_eval += self.every
        # Evaluation seeds apart from the training envs' (seed … seed + n_envs - 1).
        seed = 1_000_003 * (len(self.evals) + 1) + self.seed
        returns = evaluate(self.model, self.task, episodes=self.episodes, seed=seed)
        entry = {
            "env_steps": int(self.num_timesteps),
            "mean_return": float(returns.mean()),
            "min_return": float(returns.min()),
            "wall_s": time.perf_counter() - self.start,
        }
        self.evals.append(entry)
        print(f"eval @ {entry['env_steps']} env steps: mean {entry['mean_return']:.4g}", file=sys.stderr)
        if entry["mean_return"] >= self.bar:
            self.solved = entry
            return False
        return True


def settings_with(overrides: list[str]) -> dict[str, Any]:
    """The Zoo's settings with ``KEY=JSON`` overrides; ValueError naming a bad one."""
    out = dict(ZOO_CARTPOLE_NOVEL)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in out:
            raise ValueError(f"--set: expected KEY=VALUE with KEY among {sorted(out)}, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            raise ValueError(f"--set: expected a JSON value for {key}, got {value!r}") from None
    return out


def race(task: str, *, seed: int, budget: int, every: int, episodes: int, bar: float, settings: dict) -> dict:
    """Train RecurrentPPO on ``task`` until its evaluation reaches ``bar`` or ``budget`` env steps."""
    start = time.perf_counter()
    kwargs = {k: schedule(v) for k, v in settings.items() if k not in ("policy", "n_envs", "n_timesteps")}
    env = make_vec_env(lambda: make_env(task), n_envs=settings["n_envs"], seed=seed)
    model = RecurrentPPO(settings["policy"], env, seed=seed, device="cpu", verbose=0, **kwargs)
    callback = RaceToBar(task, every=every, episodes=episodes, bar=bar, seed=seed)
    setup_s = time.perf_counter() - start
    model.learn(total_timesteps=budget, callback=callback)
    env.close()
    solved = callback.solved
    return {
        "task": task,
        "seed": seed,
        "solved_at_env_steps": solved and solved["env_steps"],
        "wall_to_bar_s": solved and solved["wall_s"],
        "env_steps": int(model.num_timesteps),
        "wall_s": time.perf_counter() - start - setup_s,
        "setup_s": setup_s,
        "evals": callback.evals,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.recurrent_ppo_peer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--task", required=True, help=f"{MASKED_CARTPOLE_ID} or a popgym-… id")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=150_000, help="env steps at most")
    parser.add_argument("--eval-every", type=int, default=5_000)
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument(
        "--bar", type=float, required=True, help="mean evaluation return that solves the task"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a Zoo setting")
    args = parser.parse_args(argv)
    for flag in ("seed", "budget", "eval_every", "eval_episodes", "threads"):
        if getattr(args, flag) < (0 if flag == "seed" else 1):
            parser.exit(2, f"{parser.prog}: error: --{flag.replace('_', '-')}: got {getattr(args, flag)}\n")
    try:
        settings = settings_with(args.set)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    torch.set_num_threads(args.threads)
    result = race(
        args.task, seed=args.seed, budget=args.budget, every=args.eval_every, episodes=args.eval_episodes,
        bar=args.bar, settings=settings,
    )  # fmt: skip
    versions = {
        p: metadata.version(p) for p in ("torch", "sb3-contrib", "stable-baselines3", "gymnasium", "popgym")
    }
    result.update(
        settings=settings, source=ZOO_SOURCE, overrides=args.set, threads=args.threads, versions=versions
    )
    result.update(
        budget=args.budget, eval_every=args.eval_every, eval_episodes=args.eval_episodes, bar=args.bar
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
