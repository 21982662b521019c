"""Small model factories, CLI helpers, misbehaving envs and assertions shared by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import gymnasium as gym
import keras
import numpy as np

import burnin
from agents.envs import MaskedCartPoleEnv

CLI_FLAGS = [
    "--min-replay-steps", "100", "--eval-every", "100", "--eval-episodes", "2", "--num-envs", "4",
    "--batch-size", "8", "--core-units", "16", "--head-units", "16", "--torso-units", "16", "--burn-in", "4",
    "--unroll", "8", "--period", "4", "--n-step", "2", "--replay-capacity", "2000", "--progress", "false",
    "--env-steps-per-update", "4",
]  # fmt: skip
"""A config small enough that the train CLI runs a few hundred env steps in seconds."""


def lstm_model(batch: int = 4, units: int = 8, features: int = 3, *, seed: int = 0) -> keras.Model:
    """Input [batch, None, features] -> stateful LSTM(units) -> Dense(2)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(batch_shape=(batch, None, features))
    x = keras.layers.LSTM(units, stateful=True, return_sequences=True, name="lstm")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="lstm_model")


def random_state(model: keras.Model, rng: np.random.Generator):
    """A random RecurrentState shaped like the model's."""
    return tuple(
        tuple(rng.standard_normal(shape).astype(np.float32) for shape in entry)
        for entry in burnin.state_shapes(model)
    )


def assert_states_equal(a, b) -> None:
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb)
        for xa, xb in zip(ea, eb):
            np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))


def run_python(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter started as a user starts one: without the
    ``TF_CPP_MIN_LOG_LEVEL`` this suite sets (conftest); stdout and stderr captured as text."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def outcome(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``main(argv)`` in this process."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(err: str, prog: str, *texts: str) -> None:
    """``err`` is one error line (after any progress bar lines of the work done before it)."""
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m agents.{prog}: error: "), err
    for text in texts:
        assert text in lines[0], (text, err)
    assert "Traceback" not in err


@contextlib.contextmanager
def within(seconds: int) -> Iterator[None]:
    """TimeoutError if the block runs longer than ``seconds`` (a hang becomes a failing test)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class FaultyEnv(MaskedCartPoleEnv):
    """Masked CartPole that misbehaves from its ``at``-th step on (counted over its episodes), as a user's
    env may: ``fault`` is 'step-raises', 'obs-shape' (one value too many), 'obs-nan', 'reward-nan',
    'obs-out-of-space' (a Discrete(4) observation of 7), 'endless' (never terminates), or 'none' (none:
    masked CartPole under another id)."""

    def __init__(self, fault: str | None = None, at: int = 40, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fault, self.at, self.steps = fault, at, 0
        if fault == "obs-out-of-space":
            self.observation_space = gym.spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return self._obs(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps += 1
        bad = self.steps >= self.at
        if bad and self.fault == "step-raises":
            raise RuntimeError("the simulator lost its connection")
        if self.fault == "endless":
            self.state = np.zeros(4)  # the pole stays up: the episode never ends
            terminated = False
        if bad and self.fault == "reward-nan":
            reward = float("nan")
        if bad and self.fault == "obs-nan":
            obs = np.full_like(obs, np.nan)
        if bad and self.fault == "obs-shape":
            obs = np.concatenate([obs, obs[:1]])
        return self._obs(obs, bad), reward, terminated, truncated, info

    def _obs(self, obs, bad: bool = False):
        if self.fault == "obs-out-of-space":
            return 7 if bad else self.steps % 4
        return obs


FAULTS = ("step-raises", "obs-shape", "obs-nan", "reward-nan", "obs-out-of-space", "endless")


def fault_env_id(fault: str, at: int = 40) -> str:
    """The gymnasium id of :class:`FaultyEnv` with ``fault`` from step ``at`` (registered on first use), e.g.
    'Fault-obs-nan-v0' ('Fault-obs-nan-at3-v0' for ``at=3``). 'endless' has no time limit; the others end at
    500 steps as CartPole does."""
    env_id = f"Fault-{fault}-v0" if at == 40 else f"Fault-{fault}-at{at}-v0"
    if env_id not in gym.registry:
        limit = None if fault == "endless" else 500
        gym.register(
            env_id, entry_point=FaultyEnv, kwargs={"fault": fault, "at": at}, max_episode_steps=limit
        )
    return env_id
