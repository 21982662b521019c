"""R2D2 on any gymnasium env: every POPGym family at Easy, an image env (conv torso, uint8 replay), the
unsupported spaces' errors, exact resume on a POPGym env, the train CLI, and a short Atari session."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import gymnasium as gym
import helpers
import numpy as np
import popgym  # noqa: F401  (registers the popgym-… ids)
import pytest
from gymnasium import spaces

from agents.envs import ensure_registered, make_vector_env
from agents.r2d2 import R2D2Config, TrainLoop
from agents.spaces import ObservationEncoding, action_encoding, observation_encoding
from agents.train import main

TINY = dict(
    torso_units=(8,), core_units=8, head_units=8, burn_in=2, unroll=4, period=2, n_step=2,
    batch_size=4, replay_capacity=4 * 200, min_replay_steps=60, env_steps_per_update=16.0,
    num_envs=4, actor_update_period=5, target_update_period=5,
)  # fmt: skip
"""A network and replay small enough that a family builds, acts, stores and trains in a few seconds."""

EASY = sorted(k for k in gym.registry if k.startswith("popgym-") and k.endswith("Easy-v0"))
CONTINUOUS = {k for k in EASY if "Pendulum" in k}  # Box actions: refused, R2D2 is discrete-action
DISCRETE = [k for k in EASY if k not in CONTINUOUS]


def tiny(**overrides) -> R2D2Config:
    return R2D2Config(**{**TINY, **overrides})


def test_the_easy_families_cover_every_space_kind():
    kinds = {type(gym.spec(k).make().observation_space).__name__ for k in DISCRETE}
    actions = {type(gym.spec(k).make().action_space).__name__ for k in DISCRETE}
    assert {"Discrete", "MultiDiscrete", "Tuple", "Box"} <= kinds
    assert actions == {"Discrete", "MultiDiscrete"} and len(DISCRETE) >= 12


@pytest.mark.parametrize("env_id", DISCRETE)
def test_popgym_family_builds_acts_stores_and_trains(env_id):
    config = tiny()
    loop = TrainLoop(config, make_vector_env(config.num_envs, env_id=env_id, seed=0), seed=0)
    losses = []
    while loop.env_steps < 160:
        stats = loop.iterate()
        losses += [] if stats.learner is None else [stats.learner.loss]
    assert losses and np.all(np.isfinite(losses))
    encoding = loop.actor.encoding
    stored = loop.replay.config
    assert stored.obs_shape == encoding.shape and stored.obs_dtype == encoding.dtype
    if encoding.dtype != "float32":  # all-discrete observations are stored as small integers
        assert np.dtype(encoding.dtype).kind == "u"
    batch = loop.replay.sample(4)
    assert batch.observation.dtype == stored.obs_dtype
    assert batch.action.max() < loop.actor.num_actions


@pytest.mark.parametrize("env_id", sorted(CONTINUOUS))
def test_popgym_box_actions_are_refused(env_id):
    with pytest.raises(ValueError, match=r"action space: Box.* is continuous; R2D2 is a discrete-action"):
        make_vector_env(2, env_id=env_id)


def test_composite_layout_and_offsets():
    space = spaces.Dict(
        {
            "card": spaces.Discrete(3, start=1),
            "pos": spaces.Box(-1.0, 1.0, (2,), np.float32),
            "grid": spaces.Tuple((spaces.MultiDiscrete([2, 5], start=[0, -2]), spaces.Discrete(4))),
        }
    )
    enc = observation_encoding(space)
    assert (enc.kind, enc.shape, enc.dtype) == ("vector", (6,), "float32")
    # gymnasium's Dict sorts its keys: card, grid, pos.
    assert enc.segments == (("onehot", 3), ("onehot", 2), ("onehot", 5), ("onehot", 4), ("box", 2))
    assert enc.features == 16
    batch = {
        "card": np.array([1, 3]),
        "pos": np.array([[0.5, -0.5], [0.0, 1.0]], np.float32),
        "grid": (np.array([[1, -2], [0, 2]]), np.array([3, 0])),
    }
    np.testing.assert_array_equal(enc.flatten(batch, 2), [[0, 1, 0, 3, 0.5, -0.5], [2, 0, 4, 0, 0, 1]])
    assert ObservationEncoding.from_json(json.loads(json.dumps(enc.to_json()))) == enc
    assert observation_encoding(spaces.Tuple((spaces.Discrete(2), spaces.Discrete(300)))).dtype == "uint16"
    with pytest.raises(
        ValueError, match=r"observation batch part \['pos'\] has shape \(2, 3\), expected \(2, 2\)"
    ):
        enc.flatten({**batch, "pos": np.zeros((2, 3))}, 2)


def test_multidiscrete_actions_map_back():
    enc = action_encoding(spaces.MultiDiscrete([3, 4], start=[1, 0]))
    assert enc.num_actions == 12
    np.testing.assert_array_equal(enc.to_env(np.array([0, 5, 11])), [[1, 0], [2, 1], [3, 3]])
    assert action_encoding(spaces.Discrete(3, start=2)).to_env(np.array([0, 2])).tolist() == [2, 4]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (spaces.MultiBinary(4), r"observation_space: MultiBinary\(4\) is not a supported observation space; supported: Box"),
        (spaces.Text(5), r"observation_space: Text\(.*\) is not a supported observation space; supported: Box"),
        (spaces.Tuple((spaces.Discrete(2), spaces.Graph(spaces.Box(0, 1, (2,)), None))), r"Graph\(.*\) is not a supported"),
        (spaces.Sequence(spaces.Discrete(2)), r"Sequence\(.*\) is not a supported observation space"),
        (spaces.Dict({"a": spaces.Box(0, 1, (0,))}), r"has an empty Box"),
    ],
)  # fmt: skip
def test_unsupported_observation_spaces_are_named(space, message):
    with pytest.raises(ValueError, match=message):
        observation_encoding(space)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (spaces.Box(-1, 1, (2,)), r"action_space: Box\(.*\) is continuous; R2D2 is a discrete-action method"),
        (spaces.MultiDiscrete([64, 65]), r"has 4160 combinations .*expected a 1-D MultiDiscrete of at most 4096"),
        (spaces.MultiBinary(3), r"action_space: MultiBinary\(3\) is not a supported action space; expected Discrete"),
        (spaces.Tuple((spaces.Discrete(2),)), r"Tuple\(.*\) is not a supported action space"),
    ],
)  # fmt: skip
def test_unsupported_action_spaces_are_named(space, message):
    with pytest.raises(ValueError, match=message):
        action_encoding(space)


class Frames(gym.Env):
    """36×36×1 uint8 frames, all at the brightness of a hidden bit shown on the first step only;
    reward for naming the bit at the last of 6 steps (a memory task in pixels)."""

    observation_space = spaces.Box(0, 255, (36, 36, 1), np.uint8)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.bit, self.t = int(self.np_random.integers(2)), 0
        return np.full((36, 36, 1), 255 * self.bit, np.uint8), {}

    def step(self, action):
        self.t += 1
        done = self.t == 6
        reward = float(done and action == self.bit)
        return np.zeros((36, 36, 1), np.uint8), reward, done, False, {}


def test_image_env_trains_with_the_conv_torso_and_stores_uint8():
    config = tiny(torso_units=())
    env = gym.vector.SyncVectorEnv([Frames for _ in range(config.num_envs)])
    env.reset(seed=0)
    loop = TrainLoop(config, env, seed=0)
    assert loop.actor.encoding.kind == "image" and loop.actor.encoding.scale == pytest.approx(1 / 255)
    names = [layer.name for layer in loop.learner.online.layers]
    assert "conv_torso" in names
    assert loop.replay.config.obs_dtype == np.uint8 and loop.replay.config.obs_shape == (36, 36, 1)
    losses = []
    while loop.env_steps < 120:
        stats = loop.iterate()
        losses += [] if stats.learner is None else [stats.learner.loss]
    assert losses and np.all(np.isfinite(losses))
    batch = loop.replay.sample(4)
    assert batch.observation.dtype == np.uint8 and batch.observation.shape[2:] == (36, 36, 1)
    assert set(np.unique(batch.observation)) <= {0, 255}
    env.close()


def test_small_multi_dimensional_boxes_go_to_the_dense_torso():
    assert observation_encoding(spaces.Box(0, 1, (10, 10, 3), np.float32)).kind == "vector"
    assert observation_encoding(spaces.Box(0, 255, (40, 40), np.uint8)).shape == (40, 40, 1)


def test_resume_is_exact_on_a_popgym_env(tmp_path):
    config = tiny()
    env_id = "popgym-AutoencodeEasy-v0"  # Tuple(Discrete, Discrete) observations
    loop = TrainLoop(config, make_vector_env(4, env_id=env_id, seed=0), seed=0)
    while loop.learner.num_updates < 3:
        loop.iterate()
    loop.save(tmp_path / "ckpt")
    fresh = TrainLoop(config, make_vector_env(4, env_id=env_id, seed=9), seed=0)
    fresh.load(tmp_path / "ckpt")
    assert fresh.replay.config.obs_dtype == np.uint8
    for _ in range(7):  # crosses a target-network copy (every 5 updates)
        a, b = loop.learner.step(loop.replay), fresh.learner.step(fresh.replay)
        assert a.loss == b.loss
        np.testing.assert_array_equal(a.priorities, b.priorities)
    for wa, wb in zip(loop.learner.online.get_weights(), fresh.learner.online.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    other = TrainLoop(config, make_vector_env(4, env_id="popgym-RepeatFirstEasy-v0", seed=0), seed=0)
    with pytest.raises(ValueError, match=r"^checkpoint \S+: "):  # another env's network and replay
        other.load(tmp_path / "ckpt")


def test_ids_registered_on_import():
    assert ensure_registered("popgym:popgym-RepeatFirstEasy-v0") == "popgym-RepeatFirstEasy-v0"
    with pytest.raises(ValueError, match=r"env_id: 'nosuchpkg:Foo-v0' needs module 'nosuchpkg'"):
        ensure_registered("nosuchpkg:Foo-v0")
    with pytest.raises(ValueError, match=r"env_id: 'Nope-v0' is not a registered gymnasium id"):
        ensure_registered("Nope-v0")


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return helpers.cli(*args, timeout=timeout, module="agents.train")


def test_train_cli_on_popgym_writes_everything_and_evaluates(tmp_path, capsys):
    tiny_flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "torso_units"]
    # In this process (the CLI's exit-2 path is checked in a subprocess below): saves a TensorFlow start.
    code = main(["--env", "popgym-BattleshipEasy-v0", *tiny_flags, "--torso-units", "8", "--total-env-steps", "200",
                 "--eval-every", "100", "--eval-episodes", "2", "--progress", "false", "--run-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    out = tmp_path / "popgym-BattleshipEasy-v0-lstm-s0"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env"] == "popgym-BattleshipEasy-v0" and summary["args"]["preset"] == "popgym"
    assert summary["updates"] > 0 and len(summary["history"]["evals"]) == 2
    assert summary["solved_at_env_steps"] is None  # POPGym specs have no reward_threshold
    assert (out / "plot.png").exists() and (out / "checkpoint" / "learner.npz").exists()
    code = main(
        ["--env", "popgym-BattleshipEasy-v0", "--eval", str(out / "checkpoint"), "--eval-episodes", "2"]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["episodes"] == 2


def test_cli_error_is_one_line_and_exit_2_without_traceback():
    run = cli("--env", "Pendulum-v1", "--run-dir", "/tmp/burnin-cli-errors")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [
        "python -m agents.train: error: env_id 'Pendulum-v1': action space: Box(-2.0, 2.0, (1,), float32) is continuous; "
        "R2D2 is a discrete-action method, expected Discrete, or MultiDiscrete with at most 4096 combinations"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--env", "Nope-v0"],
            "python -m agents.train: error: --env: 'Nope-v0' is not a registered gymnasium id",
        ),
        ([], "python -m agents.train: error: --env: expected a gymnasium env id"),
        (
            ["--env", "CartPole-v1", "--preset", "nope"],
            "python -m agents.train: error: --preset: expected one of",
        ),
        (
            ["--env", "CartPole-v1", "--unroll", "0"],
            "python -m agents.train: error: --unroll: expected an int >= 1, got 0",
        ),
    ],
)
def test_cli_errors_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:  # agents.cli: argparse's exit 2
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("ale_py") is None, reason="needs ale-py: pip install -e '.[atari]'"
)
def test_short_atari_session(tmp_path):
    flags = ["--num-envs", "2", "--batch-size", "2", "--min-replay-steps", "300", "--replay-capacity", "4000",
             "--env-steps-per-update", "100", "--total-env-steps", "500", "--eval-every", "100000",
             "--eval-episodes", "1", "--progress", "false"]  # fmt: skip
    run = cli("--env", "ALE/Pong-v5", "--preset", "atari", *flags, "--run-dir", str(tmp_path), timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "ALE-Pong-v5-lstm-s0" / "summary.json").read_text())
    assert summary["env_steps"] >= 500 and summary["updates"] > 0
