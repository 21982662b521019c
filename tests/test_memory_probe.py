"""Tests for studies.memory_probe: the right answers of CountRecall and RepeatPrevious, the linear read-out,
and the probe as a hook that leaves the run as it was."""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest

from agents.envs import ensure_registered, make_vector_env
from agents.experiment import RunOptions, train
from agents.r2d2.config import preset
from studies import memory_probe as mp

# (dealt, query) per step -> how often step j's query card was dealt up to and including step j
COUNT_CASES = [
    ([(0, 0)], [1]),
    ([(1, 0)], [0]),
    ([(0, 0), (1, 0), (0, 1), (0, 0)], [1, 1, 1, 3]),
    ([(1, 1), (1, 1), (1, 0), (0, 1)], [1, 2, 0, 3]),
]


@pytest.mark.parametrize(("observation", "expected"), COUNT_CASES)
def test_count_recall_labels_by_hand(observation, expected):
    assert mp.count_recall_labels(np.array(observation)).tolist() == expected


# (cards, k) -> the card k-1 steps back, -1 before the first rewarded step
REPEAT_CASES = [
    ([3, 1, 2, 0], 1, [3, 1, 2, 0]),
    ([3, 1, 2, 0], 2, [-1, 3, 1, 2]),
    ([3, 1, 2, 0], 4, [-1, -1, -1, 3]),
    ([3, 1], 4, [-1, -1]),
]


@pytest.mark.parametrize(("cards", "k", "expected"), REPEAT_CASES)
def test_repeat_previous_labels_by_hand(cards, k, expected):
    assert mp.repeat_previous_labels(np.array(cards), k=k).tolist() == expected


@pytest.mark.parametrize("task", ["CountRecallEasy", "RepeatPreviousEasy", "RepeatPreviousMedium"])
def test_the_labels_are_what_the_env_rewards(task):
    """Playing each step's label as the action earns a positive reward on every rewarded step."""
    env_id = f"popgym-{task}-v0"
    label_fn = mp.labeller(env_id)
    env = gym.make(ensure_registered(env_id), disable_env_checker=True)
    obs, _ = env.reset(seed=3)
    seen, rewards, done = [obs], [], False
    while not done:
        label = int(label_fn(np.array(seen))[-1])
        obs, reward, terminated, truncated, _ = env.step(max(label, 0))
        rewards.append((label, reward))
        seen.append(obs)
        done = terminated or truncated
    assert all(r > 0 for label, r in rewards if label >= 0)
    assert all(r == 0 for label, r in rewards if label < 0)
    assert len(rewards) > 10


def test_labeller_knows_only_its_tasks():
    assert mp.labeller("popgym-AutoencodeEasy-v0") is None
    assert mp.labeller("popgym-CountRecallHard-v0") is mp.count_recall_labels


def test_least_squares_read_out_separates_what_is_linear():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.eye(3)[y] * 2.0 + rng.normal(0, 0.1, (300, 3))
    train = np.arange(300) % 2 == 0
    assert (mp.least_squares_predict(x, y, train, classes=3)[~train] == y[~train]).all()
    noise = rng.normal(size=(300, 3))  # nothing to read: about chance
    assert np.mean(mp.least_squares_predict(noise, y, train, classes=3)[~train] == y[~train]) < 0.5


def test_a_value_read_out_finds_a_count_a_one_hot_read_out_misses():
    """A count held in one direction of the state: the value read-out recovers it exactly, the one-hot
    read-out (a linear score per class) cannot place 27 ordered classes on one line."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 27, 2000)
    x = np.stack([y / 26.0, rng.normal(size=2000)], 1)
    train = np.arange(2000) % 2 == 0
    assert (mp.least_squares_value(x, y, train)[~train] == y[~train]).all()
    assert np.mean(mp.least_squares_predict(x, y, train, classes=27)[~train] == y[~train]) < 0.5


def _tiny_run(tmp_path, hooks):
    env_id = "popgym-CountRecallEasy-v0"
    config = preset(
        "popgym", gamma=0.0, torso_units=(8,), core_units=8, head_units=8, batch_size=4, num_envs=4,
        replay_capacity=1200, min_replay_steps=250, env_steps_per_update=8.0,
    )  # fmt: skip
    options = RunOptions(
        total_env_steps=500, eval_every=500, eval_episodes=2, progress=False, checkpoint_every=0
    )
    make = functools.partial(make_vector_env, env_id=env_id)
    return train(config, options, make, seed=0, out_dir=tmp_path, title="probe", hooks=hooks)


def test_the_probe_reads_and_leaves_the_run_as_it_was(tmp_path):
    hook = mp.MemoryProbeHook(mp.labeller("popgym-CountRecallEasy-v0"), batches=2, seed=1)
    probed = _tiny_run(tmp_path / "a", [hook])
    plain = _tiny_run(tmp_path / "b", [])
    strip = lambda evals: [
        {k: v for k, v in e.items() if k not in ("memory_probe", "wall_time_s")} for e in evals
    ]
    assert strip(probed["history"]["evals"]) == strip(plain["history"]["evals"])
    assert probed["updates"] == plain["updates"] > 0
    reading = probed["history"]["evals"][-1]["memory_probe"]
    assert reading["rows"] > 0
    for name in mp.START_NAMES:
        for key in (f"q_right/{name}", f"read_out/{name}", f"read_out_value/{name}"):
            assert len(reading[key]) == mp.BINS
            assert all(0.0 <= v <= 1.0 for v in reading[key] if v == v)
    assert reading["reward_abs"] == pytest.approx(
        preset("popgym").reward_scale / 51, rel=1e-5
    )  # learner units
    assert reading["q_abs_max"] > 0 and reading["target_abs"] > 0
    for name in ("stored", "zero"):
        assert len(reading[f"delta_q/{name}"]) == len(reading[f"delta_q_spread/{name}"]) == mp.BINS


def _reading(value: float) -> dict:
    binned = [value] * mp.BINS
    out = {"rows": 10, "td_abs": binned, "q_abs_max": 1.0, "q_gap": 0.1, "target_abs": 0.5, "reward_abs": 1.0}
    for name in mp.START_NAMES:
        out[f"q_right/{name}"] = out[f"read_out/{name}"] = binned
    for name in ("stored", "zero"):
        out[f"delta_q/{name}"] = out[f"delta_q_spread/{name}"] = binned
    return out


def test_the_probe_report_averages_the_last_reading_of_each_run(tmp_path):
    from studies import probe_report

    runs = {}
    for name, value in (("a", 0.2), ("b", 0.4)):
        evals = [{"env_steps": 100, "memory_probe": _reading(0.9)}, {"env_steps": 200, "memory_probe": _reading(value)},
                 {"env_steps": 300, "memory_probe": {"rows": 0}}]  # fmt: skip
        runs[name] = {"history": {"evals": evals}}
    md = probe_report.markdown(runs)
    assert "| stored | 0.30 / 0.30 / 0.30 / 0.30 | 0.30 / 0.30 / 0.30 / 0.30 |" in md  # mean of 0.2 and 0.4
    assert "env steps 200" in md and "20 in all" in md
    probe_report.plot(runs, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_the_cli_probes_an_untrained_network(capsys):
    import json

    tiny = [
        "torso_units=[8]",
        "core_units=8",
        "head_units=8",
        "batch_size=4",
        "num_envs=4",
        "replay_capacity=1200",
    ]
    assert mp.main(["--steps", "400", "--batches", "2", "--set", "gamma=0", *tiny]) == 0
    reading = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reading["rows"] > 0 and reading["command"].startswith(mp.PROG)
    # nothing was learned, so the stored state is the true one
    assert max(reading["delta_q/stored"]) < 1e-5 < max(reading["delta_q/zero"])


def test_the_cli_refuses_a_task_without_labels(capsys):
    with pytest.raises(SystemExit) as exc:
        mp.main(["--env", "popgym-AutoencodeEasy-v0"])
    assert exc.value.code == 2 and "--env: no labels" in capsys.readouterr().err
