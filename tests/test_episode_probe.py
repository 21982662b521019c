"""The episode probe: windows are found in their lanes, and with θ unchanged the true state gives the actor's Q."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("popgym")

from agents.envs import make_vector_env
from agents.r2d2 import TrainLoop
from agents.r2d2.config import preset
from studies.episode_probe import Recorder, second_reading, true_states

TINY = dict(
    torso_units=(16,), core_units=16, head_units=16, batch_size=8, num_envs=4, replay_capacity=4 * 400,
    min_replay_steps=10**9,  # no learning: θ stays the actor's, so the stored states are exact
)  # fmt: skip


@pytest.fixture(scope="module", params=["stored", "zero"])
def filled(request):
    """A loop on RepeatFirstEasy (51-step episodes; popgym preset: burn-in 10, period 10) after 300 env steps
    per lane, with a recorder installed from the start."""
    config = preset("popgym", **TINY, state_strategy=request.param)
    env = make_vector_env(config.num_envs, env_id="popgym-RepeatFirstEasy-v0", seed=0)
    loop = TrainLoop(config, env, seed=0)
    recorder = Recorder(loop)
    while loop.env_steps < 1200:
        loop.iterate()
    yield loop, recorder
    env.close()


def test_every_sampled_window_is_found_and_replays_to_the_actors_q(filled):
    loop, recorder = filled
    batch = loop.replay.sample(8)
    truth = true_states(loop.learner, recorder, batch, np.arange(8))
    assert truth.rows.tolist() == list(range(8))  # observations, actions and rewards identify every window
    for i, (lane, first, start) in enumerate(truth.where):
        log = recorder.logs[lane]
        valid = np.flatnonzero(batch.valid_t[i])
        np.testing.assert_array_equal(log.observation[start + valid], batch.observation[i, valid])
        actor_q = log.q[start + valid]
        scale = np.abs(actor_q).max()
        np.testing.assert_allclose(truth.q[i, valid], actor_q, rtol=0, atol=1e-5 * scale)
        assert log.episode_start[start + valid[0]] == first <= start + valid[0]


def test_second_reading_is_zero_for_the_stored_start_only(filled):
    loop, recorder = filled
    reading = second_reading(loop, recorder, batches=3, rng=np.random.default_rng(0))
    assert reading.rows >= 8 and 0.3 < reading.mid_episode < 1.0
    if loop.config.state_strategy == "stored":  # θ unchanged: the actor's stored state is the true state
        assert reading.first <= 1e-5 and reading.last <= 1e-5
    else:  # a zero state mid-episode is not, even after 10 burn-in steps (a random net forgets slowly)
        assert reading.first > 1e-3 and reading.last > 1e-4


def test_windows_before_the_recorder_have_no_episode_start():
    config = preset("popgym", **TINY)
    env = make_vector_env(config.num_envs, env_id="popgym-RepeatFirstEasy-v0", seed=0)
    loop = TrainLoop(config, env, seed=0)
    for _ in range(10):  # 10 steps into the first episodes
        loop.iterate()
    recorder = Recorder(loop)
    for _ in range(60):
        loop.iterate()
    log = recorder.logs[0]
    assert (log.episode_start[:41] == -1).all()  # the rest of the episode the recorder joined
    assert (log.episode_start[42 : len(log)] == 42).all()  # after its final observation (step 41), known
    env.close()


def test_windows_from_before_the_recorder_are_not_replayed():
    config = preset("popgym", **TINY)
    env = make_vector_env(config.num_envs, env_id="popgym-RepeatFirstEasy-v0", seed=0)
    loop = TrainLoop(config, env, seed=0)
    for _ in range(70):
        loop.iterate()
    recorder = Recorder(loop)
    for _ in range(30):  # the lanes' logs are shorter than most windows
        loop.iterate()
    truth = true_states(loop.learner, recorder, loop.replay.sample(8), np.arange(8))
    assert truth.rows.size == 0 and truth.q.shape == (0, loop.learner.spec.length, 4)  # none began after it
    env.close()
