"""Tests for the R2D2 agent: actor/learner equivalence, ΔQ, resume, determinism, bad input, strategies."""

from __future__ import annotations

import dataclasses
import os

import gymnasium
import numpy as np
import pytest
from helpers import run_loop, small_config

import burnin
from agents.envs import make_vector_env
from agents.r2d2 import Actor, Learner, R2D2Config, TrainLoop, WindowOffsets, apex_epsilons, make_replay
from agents.r2d2.actor import EnvError
from agents.r2d2.feed import make_feed
from agents.r2d2.networks import row_state_shapes


@pytest.mark.parametrize(
    "spec, refresh, delta_q, extra",
    [
        ((4, 8, 4, 2), (4, 8, 12), (4, 8, 12), (4, 8, 12)),  # SMALL: length 14
        ((0, 8, 4, 2), (4, 8), (0, 4, 8), (4, 8)),  # no burn-in: ΔQ at step 0 too
        ((20, 40, 20, 5), (20, 40, 60), (20, 40, 60), (20, 40, 60)),  # the demo
        ((3, 8, 2, 1), (2, 4, 6, 8, 10), (4, 6, 8, 10), (4, 6, 8, 10)),  # burn-in not a multiple of period
        ((0, 1, 1, 1), (1,), (0, 1), (1,)),
    ],
)
def test_window_offsets(spec, refresh, delta_q, extra):
    offsets = WindowOffsets.of(burnin.SequenceSpec(*spec))
    assert offsets == WindowOffsets(refresh=refresh, delta_q=delta_q, extra=extra)


def test_apex_epsilons():
    eps = apex_epsilons(8, base=0.4, alpha=7.0)
    np.testing.assert_allclose(eps, 0.4 ** (1 + 7 * np.arange(8) / 7))
    assert eps[0] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.4**8)
    np.testing.assert_allclose(apex_epsilons(1), [0.4])


class Recorder:
    """Wraps replay.add to keep, per lane, every step's observation, Q-values and state as the actor saw them."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        self.obs: dict[int, list[np.ndarray]] = {int(lane): [] for lane in actor.lanes}
        self.q: dict[int, list[np.ndarray]] = {int(lane): [] for lane in actor.lanes}
        self.states: list = []
        self.new_episode: list[np.ndarray] = []
        self.last_q: np.ndarray | None = None
        original = actor.replay.add
        original_act = actor.act

        def act(**kwargs):  # Actor.step acts, then adds: keep the Q-values of the step being added
            q, actions, states = original_act(**kwargs)
            self.last_q = q
            return q, actions, states

        def add(lanes, **kwargs):
            for row, lane in enumerate(lanes):
                self.obs[int(lane)].append(kwargs["observation"][row].copy())
                self.q[int(lane)].append(self.last_q[row].copy())
            self.states.append(kwargs["states"])
            self.new_episode.append(actor.new_episode.copy())
            return original(lanes, **kwargs)

        actor.replay.add = add
        actor.act = act

    def find(self, obs_window: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
        """(lane, index in that lane's stream) of the window's first valid step."""
        first = int(np.flatnonzero(mask)[0])
        for lane, stream in self.obs.items():
            for i, o in enumerate(stream):
                if np.array_equal(o, obs_window[first]):
                    return lane, i - first
        raise AssertionError("window not found in the recorded stream")


def filled(config: R2D2Config, steps: int, *, seed: int = 0):
    env = make_vector_env(config.num_envs, seed=seed)
    learner = Learner(config, 2, 2, seed=seed)
    replay = make_replay(config, 2, learner.row_state_shapes, seed=seed)
    actor = Actor(config, env, replay=replay, seed=seed + 1)
    actor.set_weights(learner.get_weights())
    recorder = Recorder(actor)
    for _ in range(steps):
        actor.step()
    return learner, actor, replay, recorder


def test_actor_resets_state_rows_at_episode_start():
    config = small_config()
    _, _actor, _, rec = filled(config, 120)
    starts = 0
    for states, new in zip(rec.states, rec.new_episode):
        for arr in states[0]:
            assert not arr[new].any()  # zeroed rows exactly where an episode starts
        starts += int(new.sum())
        if (~new).any():
            assert states[0][0][~new].any()
    assert starts > config.num_envs  # episodes ended and restarted during the run


def test_learner_reproduces_actor_q_values_and_zero_delta_q():
    """Same parameters: burned-in learner Q equals the actor's Q at every valid unrolled step; ΔQ is 0."""
    config = small_config()
    learner, _actor, replay, rec = filled(config, 150)
    batch = replay.sample(config.batch_size, extra_state_offsets=learner.offsets.extra)
    inputs = [batch.observation, batch.prev_action, batch.prev_reward]
    out = learner.online_runner(inputs, batch.state, mask=batch.valid_t)
    q = out.outputs.numpy()  # [B, U + n, A] for window steps [burn_in, L)
    b = config.burn_in
    compared = 0
    for row in range(config.batch_size):
        lane, start = rec.find(batch.observation[row], batch.valid_t[row])
        for t in range(b, config.sequence_spec.length):
            if batch.valid_t[row, t]:
                np.testing.assert_allclose(q[row, t - b], rec.q[lane][start + t], rtol=1e-5, atol=1e-7)
                compared += 1
    assert compared > config.batch_size * config.unroll // 2
    step = learner.update(batch)
    assert step.delta_q_first == pytest.approx(0.0, abs=1e-6)
    assert step.delta_q_last == pytest.approx(0.0, abs=1e-6)
    # After the update the parameters moved, so the same window now shows a discrepancy.
    assert learner.update(batch).delta_q_last > 0


def test_the_update_is_traced_once_and_then_called_as_one_concrete_function():
    """Batches with different contents but the checked shapes reuse the first trace (no retracing),
    and the step through the concrete function equals the tf.function's, bit for bit."""
    config = small_config()
    learner, _actor, replay, _ = filled(config, 150)
    twin = Learner(config, 2, 2, seed=0)
    twin.assign_state(learner.state_dict())
    for _ in range(3):
        batch = replay.sample(config.batch_size, extra_state_offsets=learner.offsets.extra)
        step = learner.update(batch)
        reference = twin._update_fn(make_feed(batch, twin.feed_layout))  # the tf.function, called as before
        np.testing.assert_array_equal(step.priorities, reference["priorities"].numpy())
        assert step.loss == float(reference["loss"].numpy())
    assert learner._update_fn.experimental_get_tracing_count() == 1
    for a, b in zip(learner.online.weights, twin.online.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_reward_scale_is_the_update_on_scaled_rewards():
    """reward_scale c on a batch is, bit for bit, the update of c = 1 on the same batch with its rewards and
    previous rewards multiplied by c (float32 products either way); and it changes the update."""
    c = 51.0
    config = small_config(reward_scale=c)
    scaled, _actor, replay, _ = filled(config, 150)
    plain = Learner(small_config(), 2, 2, seed=0)
    other = Learner(small_config(), 2, 2, seed=0)
    batch = replay.sample(config.batch_size, extra_state_offsets=scaled.offsets.extra)
    times_c = batch._replace(
        reward=(batch.reward * np.float32(c)).astype(np.float32),
        prev_reward=(batch.prev_reward * np.float32(c)).astype(np.float32),
    )
    assert np.abs(batch.reward).max() > 0
    a, b, unscaled = scaled.update(batch), plain.update(times_c), other.update(batch)
    assert a.loss == b.loss
    np.testing.assert_array_equal(a.priorities, b.priorities)
    assert a.loss != unscaled.loss


def test_zero_strategy_has_nonzero_delta_q():
    config = small_config(state_strategy="zero", burn_in=0)
    learner, _, replay, _ = filled(config, 150)
    dq = [learner.step(replay).delta_q_first for _ in range(3)]
    assert np.nanmax(dq) > 1e-3  # zero start vs the actor's stored state


def test_same_seed_same_run():
    config = small_config()
    _, a = run_loop(config, 60)
    _, b = run_loop(config, 60)
    assert len(a) > 10
    assert a == b  # bitwise, on the CPU with op determinism


def test_resume_loses_nothing(tmp_path):
    config = small_config()
    loop, _ = run_loop(config, 60)
    loop.save(tmp_path / "ckpt")
    fresh = TrainLoop(config, make_vector_env(config.num_envs, seed=123), seed=0)
    fresh.load(tmp_path / "ckpt")
    assert fresh.learner.num_updates == loop.learner.num_updates
    for _ in range(12):  # crosses a target-network copy (every 10 updates)
        a, b = loop.learner.step(loop.replay), fresh.learner.step(fresh.replay)
        assert a.loss == b.loss
        np.testing.assert_array_equal(a.priorities, b.priorities)
    for wa, wb in zip(loop.learner.online.get_weights(), fresh.learner.online.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    for wa, wb in zip(loop.learner.target.get_weights(), fresh.learner.target.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    for va, vb in zip(loop.learner.optimizer.variables, fresh.learner.optimizer.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())


def test_checkpoint_from_another_config_is_rejected(tmp_path):
    config = small_config()
    loop, _ = run_loop(config, 5)
    loop.save(tmp_path / "ckpt")
    other = TrainLoop(small_config(gamma=0.95), make_vector_env(4, seed=0), seed=0)
    with pytest.raises(ValueError, match="config field 'gamma' is 0.99 in the checkpoint but 0.95 here"):
        other.load(tmp_path / "ckpt")


def test_save_is_atomic_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    config = small_config()
    loop, _ = run_loop(config, 5)
    loop.save(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loop.replay, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        loop.save(tmp_path / "ckpt")
    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    assert after == before


def test_crash_between_the_renames_loses_nothing(tmp_path, monkeypatch):
    config = small_config()
    loop, _ = run_loop(config, 5)
    loop.save(tmp_path / "ckpt")
    loop.iterate()
    real_replace = os.replace

    def crash_on_second(src, dst):
        if str(dst) == str(tmp_path / "ckpt"):  # the new checkpoint's final rename
            raise KeyboardInterrupt("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        loop.save(tmp_path / "ckpt")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "ckpt").exists()
    fresh = TrainLoop(config, make_vector_env(4, seed=0), seed=0)
    fresh.load(tmp_path / "ckpt")  # falls back to the previous good checkpoint
    assert fresh.actor.steps == 5  # the state of the first save, not the interrupted one


@pytest.mark.parametrize("core", ["lstm", "dense"])
def test_loop_trains_both_cores(core):
    loop, losses = run_loop(small_config(core=core), 60)
    assert losses and all(np.isfinite(losses))
    assert loop.replay.num_sampleable > 0


def test_stacked_gru_lstm_core_trains_end_to_end(tmp_path):
    """The agent takes its state layout from the network (burnin.state_shapes): a GRU under an LSTM
    stores both layers' states, the learner reproduces the actor from them, and the loop trains,
    checkpoints and resumes."""
    config = small_config(core_layers=("gru", "lstm"))
    learner, _actor, replay, rec = filled(config, 150)
    assert replay.config.row_state_shapes == (((16,),), ((16,), (16,)))
    assert [len(layer) for layer in rec.states[-1]] == [1, 2]  # GRU [h], LSTM [h, c]
    assert [layer.name for layer in burnin.stateful_layers(learner.online)] == ["gru", "lstm_1"]
    batch = replay.sample(config.batch_size, extra_state_offsets=learner.offsets.extra)
    step = learner.update(batch)  # the actor's parameters: the recomputed states are the stored ones
    assert step.delta_q_first == pytest.approx(0.0, abs=1e-6)
    assert step.delta_q_last == pytest.approx(0.0, abs=1e-6)
    loop, losses = run_loop(config, 60)
    assert len(losses) > 5 and all(np.isfinite(losses))
    loop.save(tmp_path / "ckpt")
    fresh = TrainLoop(config, make_vector_env(config.num_envs, seed=0), seed=0)
    fresh.load(tmp_path / "ckpt")
    assert fresh.iterate().updates >= loop.learner.num_updates


@pytest.mark.parametrize("seed", [0, 3])
def test_refresh_writes_the_recomputed_states_back(seed):
    """After an update, the replay holds the learner's recomputed states at the later windows' starts."""
    config = small_config(refresh_states=True, batch_size=16)
    learner, _, replay, _ = filled(config, 150, seed=seed)
    # The actor acted with these very weights, so a refresh would rewrite identical states
    # (bit for bit); move the learner's parameters so the recomputed states differ.
    learner.online.set_weights([w * 1.05 for w in learner.online.get_weights()])
    offsets = learner.offsets.refresh
    batch = replay.sample(config.batch_size, extra_state_offsets=offsets)
    assert batch.extra_state_mask.any()
    # The states the update will recompute: same parameters, same window, before the optimizer step.
    inputs = [batch.observation, batch.prev_action, batch.prev_reward]
    probe = burnin.BurnInRunner(learner.online, burn_in=config.burn_in, state_offsets=offsets)
    recomputed = probe(inputs, batch.state, mask=batch.valid_t).offset_states
    # Where each (row, offset) writes: (lane, lane position). Windows k and k+1 of one
    # episode in the same batch name the same stored state; the last (offset, row) wins.
    slots = batch.keys % replay._num_slots
    lanes, starts = slots // replay.config.windows_per_lane, replay._win[slots, 0]
    written_at: dict[tuple[int, int], np.ndarray] = {}
    writes = 0  # update_states counts distinct stored states per offset
    for k, o in enumerate(offsets):
        rows = np.flatnonzero(batch.extra_state_mask[:, k])
        writes += len({(int(lanes[r]), int(starts[r]) + o) for r in rows})
        for row in rows:
            written_at[(int(lanes[row]), int(starts[row]) + o)] = recomputed[k][0][0].numpy()[row]
    assert learner.update(batch, replay=replay).refreshed == writes > 0
    after = replay.windows(batch.keys, extra_state_offsets=offsets)
    lefts = replay._win[slots, 1]
    checked = changed = 0
    for row in range(config.batch_size):
        for k, o in enumerate((0, *offsets)):
            got = after.state[0][0][row] if o == 0 else after.extra_states[k - 1][0][0][row]
            before = batch.state[0][0][row] if o == 0 else batch.extra_states[k - 1][0][0][row]
            # A row reads a written state only where that state is its own (not padding, not past
            # its episode's end): the same lane position may belong to a neighbouring episode.
            own = lefts[row] == 0 if o == 0 else batch.extra_state_mask[row, k - 1]
            want = written_at.get((int(lanes[row]), int(starts[row]) + o), before) if own else before
            np.testing.assert_array_equal(got, want)
            checked += (int(lanes[row]), int(starts[row]) + o) in written_at
            changed += not np.array_equal(got, before)
    assert checked >= len(written_at) and changed > 0  # (a state at an episode start stays 0)
    # The actor's own states are kept beside them for ΔQ, unchanged.
    for k in range(len(offsets)):
        np.testing.assert_array_equal(after.extra_actor_states[k][0][0], batch.extra_actor_states[k][0][0])
    np.testing.assert_array_equal(after.observation, batch.observation)


BAD_CONFIG = {
    "unroll": 0,
    "burn_in": -1,
    "period": 9,  # > unroll 8
    "gamma": 1.5,
    "learning_rate": 0.0,
    "core": "gru",
    "state_strategy": "random",
    "torso_units": (16, 0),
    "batch_size": 2.5,
    "replay_capacity": 10,
    "env_steps_per_update": float("nan"),
    "core_layers": ("lstm", "rnn"),
    "reward_scale": 0.0,
}
# A value of the wrong type is a TypeError, a wrong value of the right type a ValueError (burnin._checks).
BAD_CONFIG_TYPE = {"batch_size"}


@pytest.mark.parametrize("field", sorted(BAD_CONFIG))
def test_bad_config_names_the_field(field):
    error = TypeError if field in BAD_CONFIG_TYPE else ValueError
    with pytest.raises(error, match=f"^{field}: "):
        small_config(**{field: BAD_CONFIG[field]})


def test_refresh_needs_stored_strategy():
    with pytest.raises(ValueError, match="^refresh_states: "):
        small_config(refresh_states=True, state_strategy="zero")


def test_config_json_round_trip():
    config = small_config(torso_units=(8, 4))
    assert R2D2Config.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="config: unknown fields \\['bogus'\\]"):
        R2D2Config.from_json({**config.to_json(), "bogus": 1})


class WrongShapeEnv:
    """Stands in for a user's env whose observations do not have the declared shape."""

    def __init__(self, env) -> None:
        self._env = env
        self.num_envs = env.num_envs
        self.single_observation_space = env.single_observation_space
        self.single_action_space = env.single_action_space

    def reset(self, **kwargs):
        obs, info = self._env.reset(**kwargs)
        return obs, info

    def step(self, action):
        obs, *rest = self._env.step(action)
        return np.concatenate([obs, obs], axis=1), *rest


def test_mismatched_observation_shape_is_reported():
    config = small_config()
    env = WrongShapeEnv(make_vector_env(4, seed=0))
    replay = make_replay(config, 2, row_state_shapes(config.network(2, 2)))
    actor = Actor(config, env, replay=replay)
    with pytest.raises(EnvError, match=r"env 'WrongShapeEnv' failed at env step 0 \(actor step 0\): step\(\): "
                       r"ValueError: observation batch has shape \(4, 4\), expected \(4, 2\)"):  # fmt: skip
        actor.step()
    other = make_replay(config, 3, row_state_shapes(config.network(3, 2)))
    with pytest.raises(ValueError, match=r"env: observation shape \(2,\) does not match the replay's \(3,\)"):
        Actor(config, make_vector_env(4, seed=0), replay=other)


def test_env_size_must_match_config():
    with pytest.raises(ValueError, match="env: has 3 envs, but config.num_envs is 4"):
        TrainLoop(small_config(), make_vector_env(3, seed=0))


def test_learner_checks_batch_shape():
    config = small_config()
    learner, _, replay, _ = filled(config, 150)
    batch = replay.sample(config.batch_size, extra_state_offsets=learner.offsets.extra)
    bad = batch._replace(observation=batch.observation[:, :-1])
    with pytest.raises(ValueError, match="batch.observation: expected shape"):
        learner.update(bad)


def test_network_copies_share_weights_bitwise():
    config = small_config()
    learner, actor, _, _ = filled(config, 1)
    for a, b in zip(learner.online.get_weights(), actor.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert burnin.state_shapes(actor.model) == (((4, 16), (4, 16)),)
    assert burnin.state_shapes(learner.online) == (((8, 16), (8, 16)),)


def test_config_fields_all_documented():
    docs = R2D2Config.field_docs()
    assert set(docs) == {f.name for f in dataclasses.fields(R2D2Config)}
    assert all(docs.values())


def test_delta_q_uses_burn_in_offset_first_and_the_last_available_state():
    """ΔQ_first reads the actor's state at offset burn_in; ΔQ_last the largest offset that has one."""
    config = small_config()  # burn_in 4, period 4, length 14: candidate offsets 4, 8, 12
    learner, _, replay, _ = filled(config, 150)
    assert learner.offsets.delta_q == (4, 8, 12)
    offsets = learner.offsets.extra
    batch = replay.sample(config.batch_size, extra_state_offsets=offsets)
    inputs = [batch.observation, batch.prev_action, batch.prev_reward]
    probe = burnin.BurnInRunner(learner.online, burn_in=config.burn_in, state_offsets=offsets)
    exact = [
        tuple(tuple(a.numpy() for a in e) for e in s)
        for s in probe(inputs, batch.state, mask=batch.valid_t).offset_states
    ]
    rng = np.random.default_rng(0)
    noise = [
        tuple(tuple(a + rng.standard_normal(a.shape).astype(np.float32) for a in e) for e in s) for s in exact
    ]
    # Offset 4: a wrong state (ΔQ_first > 0). Offset 8: exact and available. Offset 12: wrong, unavailable.
    states = (noise[0], exact[1], noise[2])
    avail = np.zeros((config.batch_size, 3), bool)
    # Rows whose episode ends before step 8 would take their last state at 4 (the wrong one): leave them out.
    avail[:, 0] = batch.valid_t[:, 4] & batch.valid_t[:, 8]
    avail[:, 1] = batch.valid_t[:, 8]
    assert avail[:, 0].any()
    batch = batch._replace(extra_actor_states=states, extra_states=states, extra_state_mask=avail)
    step = learner.update(batch)
    assert step.delta_q_first > 1e-3
    assert step.delta_q_last == pytest.approx(0.0, abs=1e-6)


def test_actor_stores_final_observations_under_truncation():
    """NEXT_STEP autoreset through the Actor: truncated episodes end with the env's final observation."""
    from agents.envs import MaskedCartPoleVectorEnv

    config = small_config(burn_in=2, unroll=4, period=2, n_step=1)
    env = MaskedCartPoleVectorEnv(num_envs=4, max_episode_steps=6)
    replay = make_replay(config, 2, row_state_shapes(config.network(2, 2)))
    actor = Actor(config, env, replay=replay, seed=0)
    finals, lengths = set(), []
    original_step = env.step

    def step(action):
        out = original_step(action)
        for row in np.flatnonzero(out[2] | out[3]):
            finals.add(tuple(out[0][row]))  # the final observation gymnasium returns
        return out

    env.step = step
    for _ in range(40):
        lengths += [length for _, _, length in actor.step()]
    assert lengths and max(lengths) == 6 and all(1 <= n <= 6 for n in lengths)
    assert actor.env_steps == sum(lengths) + int(actor.episode_length.sum())  # autoreset steps not counted
    batch = replay.windows(replay.live_keys())
    stored_finals = {tuple(o) for o in batch.observation[batch.final]}
    assert stored_finals and stored_finals <= finals
    assert not (batch.learn_mask & batch.final).any()
    # A truncated episode bootstraps: the step before its final observation keeps discount 1.
    before_final = np.roll(batch.final, -1, axis=1) & batch.valid_t & ~batch.final
    truncated_rows = before_final & ~np.roll(batch.terminal, -1, axis=1)
    assert truncated_rows.any() and (batch.discount[truncated_rows] == 1).all()


def test_actor_rejects_same_step_autoreset():
    config = small_config()
    env = make_vector_env(4, seed=0)
    env.metadata = {**env.metadata, "autoreset_mode": gymnasium.vector.AutoresetMode.SAME_STEP}
    with pytest.raises(ValueError, match="env: autoreset mode .*SAME_STEP.*expected NEXT_STEP"):
        Actor(config, env)


def test_presets_are_valid_configs():
    from agents.r2d2 import PRESETS, preset

    assert preset("masked-cartpole") == R2D2Config()
    paper = preset("atari", num_envs=8)
    assert (paper.burn_in, paper.unroll, paper.period, paper.n_step, paper.gamma) == (40, 80, 40, 5, 0.997)
    assert (paper.core_units, paper.batch_size, paper.learning_rate, paper.target_update_period) == (
        512,
        64,
        1e-4,
        2500,
    )
    assert paper.num_envs == 8 and set(PRESETS) == {"masked-cartpole", "popgym", "atari"}
    preset("popgym")
    with pytest.raises(ValueError, match="^name: expected one of"):
        preset("paper")
