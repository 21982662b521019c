"""What the tests share (test modules import this module, never each other): small models, replays fed from
step streams, the agent at a small scale, CLI runners, misbehaving envs and assertions."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import keras
import numpy as np

import burnin
from agents.envs import MaskedCartPoleEnv, make_vector_env
from agents.r2d2 import R2D2Config, TrainLoop
from burnin.replay import SequenceReplay, SequenceSpec

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
    """``err`` is one error line (after any progress bar lines of the work done before it) of the script
    ``prog``: a module name, ``agents.`` unless it names its package (``studies.ablation``)."""
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]
    assert len(lines) == 1, err
    module = prog if "." in prog else f"agents.{prog}"
    assert lines[0].startswith(f"python -m {module}: error: "), err
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


# -- models with several stateful layers: stacked, and one inside a nested Model


def stacked_model(batch: int = 4) -> keras.Model:
    keras.utils.set_random_seed(2)
    inputs = keras.Input(batch_shape=(batch, None, 3))
    x = keras.layers.LSTM(6, stateful=True, return_sequences=True, name="lstm_a")(inputs)
    x = keras.layers.GRU(4, stateful=True, return_sequences=True, name="gru_b")(x)
    x = keras.layers.LSTM(3, stateful=True, return_sequences=True, name="lstm_c")(x)
    return keras.Model(inputs, x, name="stacked")


def nested_model(batch: int = 4) -> keras.Model:
    keras.utils.set_random_seed(3)
    inner_in = keras.Input(batch_shape=(batch, None, 3))
    inner = keras.Model(
        inner_in,
        keras.layers.GRU(5, stateful=True, return_sequences=True, name="inner_gru")(inner_in),
        name="inner",
    )
    inputs = keras.Input(batch_shape=(batch, None, 3))
    x = keras.layers.LSTM(3, stateful=True, return_sequences=True, name="outer_lstm")(inputs)
    x = inner(x)
    x = keras.layers.LSTM(2, stateful=True, return_sequences=True, name="last_lstm")(x)
    return keras.Model(inputs, x, name="nested")


# -- replays fed from step streams in a compact notation
#
# A stream is a list of add calls; each call is a string of tokens "LANE:ID" with an optional
# suffix: T = the action terminated the episode, t = truncated, F = this is the final
# observation (its action and reward are passed as 99 / -99 and must be ignored). Every step
# carries observation [ID], action ID, reward 10·ID and a state whose arrays are filled with
# ID, so the expected windows can be written with step ids alone. "close:LANE" calls
# close_lanes, "keys" remembers the live keys, "stale" sends priority 5 for the remembered keys.


STATE_SHAPES = (((2,), (3,)),)


def replay_for(spec: SequenceSpec, *, lanes: int = 1, capacity: int = 64, **kwargs: Any) -> SequenceReplay:
    kwargs.setdefault("row_state_shapes", STATE_SHAPES)
    if "rng" not in kwargs:
        kwargs.setdefault("seed", 0)
    return SequenceReplay(spec, num_lanes=lanes, lane_capacity=capacity, obs_shape=(1,), **kwargs)


def state_of(ids: np.ndarray) -> tuple[tuple[np.ndarray, ...], ...]:
    ids = np.asarray(ids, dtype=np.float32)
    return ((np.repeat(ids[:, None], 2, axis=1), np.repeat(ids[:, None], 3, axis=1) + 0.5),)


def play(replay: SequenceReplay, stream: list[str]) -> dict[str, Any]:
    """Run a stream; return the sampleable count after each call and what the stream remembered."""
    counts, memo = [], {}
    for call in stream:
        if call.startswith("close:"):
            replay.close_lanes(np.array([int(x) for x in call[6:].split(",")]))
        elif call == "keys":
            memo["keys"] = replay.live_keys()
        elif call == "stale":
            keys = memo["keys"]
            replay.update_priorities(keys, np.full(keys.size, 5.0))
        else:
            lanes, ids, term, trunc, final = [], [], [], [], []
            for token in call.split():
                lane, rest = token.split(":")
                flag = rest[-1] if rest[-1] in "TtF" else ""
                lanes.append(int(lane))
                ids.append(int(rest.rstrip("TtF")))
                term.append(flag == "T")
                trunc.append(flag == "t")
                final.append(flag == "F")
            ids_arr, final_arr = np.array(ids), np.array(final)
            replay.add(
                np.array(lanes),
                observation=ids_arr[:, None].astype(np.float32),
                action=np.where(final_arr, 99, ids_arr),
                reward=np.where(final_arr, -99.0, 10.0 * ids_arr),
                terminated=np.array(term),
                truncated=np.array(trunc),
                states=state_of(ids_arr),
            )
        replay.check_invariants()
        counts.append(replay.num_sampleable)
    return {"counts": counts, **memo}


S2 = SequenceSpec(burn_in=1, unroll=2, period=2, n_step=1)  # L = 4


# -- a replay's whole contents, compared or hashed


def snapshot(replay: SequenceReplay) -> dict[str, Any]:
    """Everything that defines the buffer's contents, as copies."""
    out: dict[str, Any] = {name: arr.copy() for name, arr in replay._arrays.items()}
    out["tree"] = replay._tree.state()
    out["max_priority"] = replay._max_priority
    out["registry"] = {k: v.tolist() for k, v in replay.registered_lanes.items()}
    out["rng"] = replay._rng.bit_generator.state
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any], *, except_names: tuple[str, ...] = ()) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if name in except_names:
            continue
        if isinstance(a[name], np.ndarray):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name] == b[name], name


# -- replays with history, and checkpoints with one entry changed


def busy_replay(**kwargs: Any) -> SequenceReplay:
    """Three lanes with finished, open and evicted episodes, updated priorities and refreshed states."""
    replay = replay_for(S2, lanes=3, capacity=12, seed=5, **kwargs)
    # Lane 0: one long episode that wraps the ring; lane 1: episodes of 6 steps and a final
    # observation (step 6 terminates, step 7 is the final observation).
    suffix = {6: "T", 0: "F"}
    play(replay, [f"0:{i} 1:{100 + i}{suffix.get(i % 7, '')}" for i in range(1, 40)])
    remote = replay.register_lanes("remote", 1)  # lane 2, left with an open episode
    play(replay, [f"{remote[0]}:{300 + i}" for i in range(5)])
    batch = replay.sample(8)
    replay.update_priorities(batch.keys, np.linspace(0.5, 3.0, 8))
    replay.update_states(batch.keys, [2], (state_of(np.arange(8) + 900),))
    return replay


def rewrite(path: Path, dest: Path, change) -> Path:
    """Copy a checkpoint with one entry changed (a well-formed file with bad contents)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    change(arrays)
    with open(dest, "wb") as f:
        np.savez(f, **arrays)
    return dest


def fingerprint(replay: SequenceReplay) -> str:
    """SHA-256 of every array, the sum-tree, the running maximum, the registry and the RNG state."""
    h = hashlib.sha256()
    for name, value in sorted(snapshot(replay).items()):
        h.update(name.encode())
        if isinstance(value, np.ndarray):
            h.update(f"{value.dtype.str}{value.shape}".encode())
            h.update(np.ascontiguousarray(value).tobytes())
        else:
            h.update(json.dumps(value, sort_keys=True, default=lambda a: np.asarray(a).tolist()).encode())
    return h.hexdigest()


# -- the agent at a small scale, and its CLI


SMALL = dict(
    torso_units=(16,),
    core_units=16,
    head_units=16,
    burn_in=4,
    unroll=8,
    period=4,
    n_step=2,
    batch_size=8,
    replay_capacity=4 * 500,
    min_replay_steps=100,
    env_steps_per_update=4.0,
    num_envs=4,
    actor_update_period=5,
    target_update_period=10,
    learning_rate=1e-3,
)


def small_config(**overrides) -> R2D2Config:
    return R2D2Config(**{**SMALL, **overrides})


def run_loop(config: R2D2Config, iterations: int, seed: int = 0):
    env = make_vector_env(config.num_envs, seed=seed)
    loop = TrainLoop(config, env, seed=seed)
    losses = []
    for _ in range(iterations):
        stats = loop.iterate()
        if stats.learner is not None:
            losses.append(stats.learner.loss)
    return loop, losses


def cli(*args: str, timeout: float = 300, module: str = "agents.cartpole") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (the demo by default) in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- the sockets a process tree listens on


def listening_sockets(pid: int) -> dict[int, tuple[str, list[str]]]:
    """pid -> (name, ["host:port", ...]) for ``pid`` and its descendants: listening TCP and bound UDP sockets."""
    import psutil  # Ray's own copy, on the path once ray is imported

    root = psutil.Process(pid)
    found = {}
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            listening = [
                f"{c.laddr.ip}:{c.laddr.port}"
                for c in proc.net_connections("inet")
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)
            ]
            found[proc.pid] = (proc.name(), listening)
    return found


def off_loopback(found: dict[int, tuple[str, list[str]]]) -> dict[int, tuple[str, list[str]]]:
    """The entries of :func:`listening_sockets` with the sockets they have outside 127.0.0.0/8 and ::1."""
    out = {}
    for pid, (name, addresses) in found.items():
        outside = [a for a in addresses if not is_loopback(a.rpartition(":")[0])]
        if outside:
            out[pid] = (name, outside)
    return out


def is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too
