"""Tests of SequenceReplay's sampling, priorities, state refresh, lanes and argument checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from helpers import S2, STATE_SHAPES, assert_same, play, replay_for, snapshot, state_of

from burnin.replay import ReplayConfig, SequenceReplay, SequenceSpec


def long_episode(replay: SequenceReplay, lane: int, first: int, count: int) -> None:
    play(replay, [f"{lane}:{i}" for i in range(first, first + count)])


# -- sampling -----------------------------------------------------------------------------


def wilson_hilferty(df: int, z: float) -> float:
    """Chi-square quantile from the normal quantile z (Wilson and Hilferty 1931; rel. error < 1e-3 at df >= 10)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def test_sampling_frequencies_match_priority_to_the_alpha() -> None:
    alpha = 0.7
    replay = replay_for(S2, lanes=2, alpha=alpha, beta=0.5)
    long_episode(replay, 0, 1, 25)
    long_episode(replay, 1, 101, 25)
    keys = replay.live_keys()
    K = keys.size
    assert K == 24  # 25 steps per lane: windows k = 0..11 complete at steps 2k + 2
    priorities = 0.5 + (np.arange(K) % 4)  # 0.5, 1.5, 2.5, 3.5, ...
    replay.update_priorities(keys, priorities)
    expected_p = priorities**alpha / (priorities**alpha).sum()

    counts = dict.fromkeys(keys.tolist(), 0)
    index = {k: i for i, k in enumerate(keys.tolist())}
    draws = 0
    for _ in range(40):
        batch = replay.sample(1000)
        draws += 1000
        for k in batch.keys.tolist():
            counts[k] += 1
        # The reported probabilities and weights follow the formulas.
        want_p = np.array([expected_p[index[k]] for k in batch.keys.tolist()])
        np.testing.assert_allclose(batch.probabilities, want_p, rtol=1e-12)
        w = (K * batch.probabilities) ** -0.5
        np.testing.assert_allclose(batch.weights, w / w.max(), rtol=1e-6)
    observed = np.array([counts[k] for k in keys.tolist()])
    expected = draws * expected_p
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # With a correct sampler the statistic is chi-square with K-1 degrees of freedom; 3.0902 is
    # the normal 0.999 quantile, so a correct sampler fails this check once in 1000 seeds. The
    # seed is fixed, so the test is deterministic.
    critical = wilson_hilferty(K - 1, 3.0902)
    assert 40 < critical < 50
    assert chi2 < critical, (chi2, critical)
    # A sampler ignoring alpha (proportional to p) is rejected by the same test.
    wrong = draws * priorities / priorities.sum()
    assert float(((observed - wrong) ** 2 / wrong).sum()) > critical


def test_zero_priority_windows_are_never_sampled_and_new_windows_get_the_max() -> None:
    replay = replay_for(S2, alpha=1.0)
    long_episode(replay, 0, 1, 8)  # windows k=0..2
    keys = replay.live_keys()
    replay.update_priorities(keys, np.array([0.0, 4.0, 0.0]))
    batch = replay.sample(200)
    assert set(batch.keys.tolist()) == {int(keys[1])}
    np.testing.assert_array_equal(batch.probabilities, 1.0)
    np.testing.assert_array_equal(batch.weights, 1.0)
    # One more window (k=3, complete at step 8): it starts at the running max, 4.
    long_episode(replay, 0, 9, 1)
    new_key = replay.live_keys()[-1]
    assert replay._tree.values([new_key % replay._num_slots])[0] == 4.0
    assert replay.stats()["max_priority"] == 4.0


def test_same_seed_same_samples_and_rng_keyword() -> None:
    def build(**kwargs: Any) -> SequenceReplay:
        replay = SequenceReplay(
            S2, num_lanes=2, lane_capacity=64, obs_shape=(1,), row_state_shapes=STATE_SHAPES, **kwargs
        )
        long_episode(replay, 0, 1, 30)
        long_episode(replay, 1, 101, 17)
        return replay

    a, b = build(seed=3), build(seed=3)
    for _ in range(3):
        x, y = a.sample(16, extra_state_offsets=[2]), b.sample(16, extra_state_offsets=[2])
        for name, fx, fy in zip(x._fields, x, y):
            if isinstance(fx, np.ndarray):
                np.testing.assert_array_equal(fx, fy, err_msg=name)
    keyed, other = build(rng=np.random.default_rng(3)), build(seed=4)
    first = build(seed=3).sample(32).keys
    np.testing.assert_array_equal(keyed.sample(32).keys, first)
    assert not np.array_equal(other.sample(32).keys, first)


def test_feed_forward_network_without_state() -> None:
    replay = SequenceReplay(
        S2, num_lanes=1, lane_capacity=32, obs_shape=(), obs_dtype=np.uint8, row_state_shapes=()
    )
    for i in range(6):
        replay.add([0], observation=np.array([i], np.uint8), action=[i], reward=[1.0],
                   terminated=[False], truncated=[False])  # fmt: skip
    batch = replay.sample(4, extra_state_offsets=[0, 2])
    assert batch.state == () and batch.extra_states == ((), ())
    assert batch.observation.shape == (4, 4) and batch.observation.dtype == np.uint8
    assert batch.extra_state_mask.shape == (4, 2)
    # ``mask``, the old name of ``valid_t``, still reads it, with a DeprecationWarning.
    with pytest.warns(DeprecationWarning, match="use SequenceBatch.valid_t"):
        assert batch.mask is batch.valid_t


def test_batch_shapes_with_image_observations() -> None:
    spec = SequenceSpec(burn_in=2, unroll=3, period=3, n_step=2)
    replay = SequenceReplay(
        spec, num_lanes=3, lane_capacity=40, obs_shape=(4, 5, 2), obs_dtype=np.uint8,
        row_state_shapes=(((6,), (6,)), ((3, 2),)), seed=1,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(30):
        replay.add(
            np.arange(3), observation=rng.integers(0, 255, (3, 4, 5, 2)), action=rng.integers(0, 4, 3),
            reward=rng.random(3), terminated=rng.random(3) < 0.05, truncated=np.zeros(3, bool),
            states=((rng.random((3, 6)), rng.random((3, 6))), (rng.random((3, 3, 2)),)),
        )  # fmt: skip
    batch = replay.sample(5, extra_state_offsets=[3])
    assert batch.observation.shape == (5, 7, 4, 5, 2)
    assert [a.shape for layer in batch.state for a in layer] == [(5, 6), (5, 6), (5, 3, 2)]
    assert batch.state[0][0].dtype == np.float32
    assert [a.shape for layer in batch.extra_states[0] for a in layer] == [(5, 6), (5, 6), (5, 3, 2)]


# -- update_states ------------------------------------------------------------------------


def refresh_setup() -> tuple[SequenceReplay, np.ndarray]:
    replay = replay_for(S2)  # P = 2, L = 4: offset 2 of window k is the burn-in start of window k+1
    long_episode(replay, 0, 1, 12)  # windows k=0..4; states at ids 2, 4, 6, 8, 10, 12
    return replay, replay.live_keys()


def test_update_states_refreshes_by_key_and_nothing_else() -> None:
    replay, keys = refresh_setup()
    before = snapshot(replay)
    new = state_of(100 + np.arange(keys.size))
    written = replay.update_states(keys, [2], (new,))
    assert (
        written == 5
    )  # window k's offset 2 is step id 2k+2: the states of windows k+1 (k+1 = 5 not yet complete)
    batch = replay.windows(keys, extra_state_offsets=[2])
    # Window k+1 now starts from the state written through window k's key.
    for k in range(1, 5):
        np.testing.assert_array_equal(batch.state[0][0][k], 100 + k - 1)
        np.testing.assert_array_equal(batch.state[0][1][k], 100.5 + k - 1)
    np.testing.assert_array_equal(batch.state[0][0][0], 0)  # k=0 is left-padded: zeros, untouched
    np.testing.assert_array_equal(batch.extra_states[0][0][0][:, 0], 100 + np.arange(5))
    after = snapshot(replay)
    assert_same(before, after, except_names=("state_0_0", "state_0_1", "counters"))
    # Only the five written rows of the state arrays changed.
    changed = np.flatnonzero((before["state_0_0"] != after["state_0_0"]).any(axis=-1).reshape(-1))
    assert changed.size == 5
    assert replay.stats()["state_updates"] == 5


def test_actor_states_survive_a_refresh(tmp_path) -> None:
    """With keep_actor_states, refreshed slots still report the actor's original state; without, they match."""
    replay = replay_for(S2, keep_actor_states=True)
    long_episode(replay, 0, 1, 12)
    keys = replay.live_keys()
    untouched = replay.windows(keys, extra_state_offsets=[2])
    for a, b in zip(untouched.extra_actor_states[0][0], untouched.extra_states[0][0]):
        np.testing.assert_array_equal(a, b)
    replay.update_states(keys, [2], (state_of(100 + np.arange(keys.size)),))
    batch = replay.windows(keys, extra_state_offsets=[2])
    np.testing.assert_array_equal(batch.extra_states[0][0][0][:, 0], 100 + np.arange(5))
    for got, want in zip(batch.extra_actor_states[0][0], untouched.extra_states[0][0]):
        np.testing.assert_array_equal(got, want)  # the actor's states: ids 2, 4, ... as added
    for got, want in zip(batch.actor_state[0], untouched.state[0]):
        np.testing.assert_array_equal(got, want)
    replay.save(tmp_path / "r.npz")
    loaded = SequenceReplay.load(tmp_path / "r.npz")
    assert loaded.config.keep_actor_states
    again = loaded.windows(keys, extra_state_offsets=[2])
    for got, want in zip(again.extra_actor_states[0][0], batch.extra_actor_states[0][0]):
        np.testing.assert_array_equal(got, want)
    plain = replay_for(S2)
    long_episode(plain, 0, 1, 12)
    plain.update_states(keys, [2], (state_of(100 + np.arange(keys.size)),))
    b2 = plain.windows(keys, extra_state_offsets=[2])
    assert b2.extra_actor_states is b2.extra_states and b2.actor_state is b2.state


def test_update_states_skips_evicted_windows_and_missing_states() -> None:
    replay = replay_for(S2, capacity=7)
    long_episode(replay, 0, 1, 8)  # live k=1..3 (k=0 and k=1 read step 0: k=0, k=1 evicted at step 7)
    old_keys = np.array(sorted(set(replay.live_keys().tolist())))
    long_episode(replay, 0, 9, 4)  # now only k=4 lives; the old keys are stale
    before = snapshot(replay)
    written = replay.update_states(old_keys, [2], (state_of(np.full(old_keys.size, 555)),))
    assert written == 0
    assert_same(before, snapshot(replay), except_names=("counters",))
    # A window whose offset lies past its episode's end has no state there: skipped.
    replay2 = replay_for(S2)
    play(replay2, ["0:1", "0:2T", "0:3F"])  # T = 2: one window, its step 2 is the final observation
    key = replay2.live_keys()
    assert replay2.update_states(key, [2], (state_of(np.array([9])),)) == 0


def test_update_states_last_pair_wins() -> None:
    replay, keys = refresh_setup()
    k = keys[1:2]
    written = replay.update_states(np.r_[k, k], [2], (state_of(np.array([7, 8])),))
    assert written == 1
    np.testing.assert_array_equal(replay.windows(keys[2:3]).state[0][0], [[8, 8]])


# -- lanes --------------------------------------------------------------------------------


def test_register_lanes() -> None:
    replay = replay_for(S2, lanes=6)
    np.testing.assert_array_equal(replay.register_lanes("actor-0", 2), [0, 1])
    play(replay, ["3:1"])  # lane 3 is written directly (a local vector env): never handed out
    np.testing.assert_array_equal(replay.register_lanes("actor-1", 2), [2, 4])
    assert {k: v.tolist() for k, v in replay.registered_lanes.items()} == {
        "actor-0": [0, 1],
        "actor-1": [2, 4],
    }
    with pytest.raises(ValueError, match=r"count: owner 'actor-2' asked for 2 lanes, but only 1"):
        replay.register_lanes("actor-2", 2)
    with pytest.raises(
        ValueError, match=r"count: owner 'actor-0' already holds 2 lanes \[0, 1\], got count=3"
    ):
        replay.register_lanes("actor-0", 3)


def test_registering_again_closes_the_owners_open_episodes() -> None:
    replay = replay_for(S2, lanes=3)
    lanes = replay.register_lanes("remote", 2)
    play(replay, ["0:1 1:11", "0:2 1:12", "0:3T 1:13"])  # lane 0 waits for its final observation
    assert replay.num_sampleable == 2
    again = replay.register_lanes("remote", 2)  # the actor restarted
    np.testing.assert_array_equal(again, lanes)
    stats = replay.stats()
    assert stats["open_episodes"] == 0 and stats["episodes_completed"] == 2
    # Lane 0 had terminated: it gets a zero final observation and keeps its terminal step 3.
    # Lane 1 was mid-episode: its last step became the final observation of a truncated
    # episode, and the step before it bootstraps.
    batch = replay.windows(replay.live_keys())
    np.testing.assert_array_equal(batch.observation[:, :, 0], [[0, 1, 2, 3], [2, 3, 0, 0], [0, 11, 12, 13]])
    np.testing.assert_array_equal(batch.discount, [[0, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]])
    np.testing.assert_array_equal(batch.reward[1], [20, 30, 0, 0])
    np.testing.assert_array_equal(batch.terminal, [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch.final, [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    # The restarted writer starts new episodes: its first add is step 0, not a final observation.
    play(replay, ["0:21 1:31", "0:22 1:32", "0:23 1:33"])
    keys = replay.live_keys()
    lane_of = keys % replay._num_slots // replay.config.windows_per_lane
    newest = [keys[lane_of == lane][-1] for lane in (0, 1)]
    batch = replay.windows(np.array(newest))
    np.testing.assert_array_equal(batch.observation[:, :, 0], [[0, 21, 22, 23], [0, 31, 32, 33]])


def test_close_lanes_on_idle_lanes_is_a_no_op() -> None:
    replay = replay_for(S2, lanes=2)
    play(replay, ["0:1T", "0:2F"])
    before = snapshot(replay)
    replay.close_lanes([0, 1])
    assert_same(before, snapshot(replay))


# -- argument checks ----------------------------------------------------------------------


def good_add(**overrides: Any) -> dict[str, Any]:
    kwargs = {
        "observation": np.ones((2, 1), np.float32),
        "action": np.array([1, 2]),
        "reward": np.array([0.5, 1.0]),
        "terminated": np.array([False, False]),
        "truncated": np.array([False, False]),
        "states": state_of(np.array([1, 2])),
    }
    kwargs.update(overrides)
    return kwargs


NAN_OBS = np.array([[1.0], [np.nan]], np.float32)
NAN_STATE = ((np.array([[np.nan, 0.0], [0.0, 0.0]]), np.zeros((2, 3))),)

BAD_CALLS = [
    ("lanes_float", lambda r: r.add([0.0, 1.0], **good_add()), TypeError, "lanes: expected integer lane ids"),
    ("lanes_2d", lambda r: r.add([[0, 1]], **good_add()), ValueError, "lanes: expected a 1-D array"),
    ("lane_out_of_range", lambda r: r.add([0, 5], **good_add()), ValueError, r"lanes: expected ids in \[0, 3\), got \[5\]"),
    ("lane_negative", lambda r: r.add([-1, 0], **good_add()), ValueError, r"got \[-1\]"),
    ("lanes_repeated", lambda r: r.add([1, 1], **good_add()), ValueError, r"each lane at most once, got repeated \[1\]"),
    ("obs_shape", lambda r: r.add([0, 1], **good_add(observation=np.ones((2, 2)))), ValueError,
     r"observation: expected shape \(2, 1\), got \(2, 2\)"),
    ("obs_dtype", lambda r: r.add([0, 1], **good_add(observation=np.array([["a"], ["b"]]))), TypeError,
     "observation: expected dtype castable to float32"),
    ("obs_nan", lambda r: r.add([0, 1], **good_add(observation=NAN_OBS)), ValueError,
     r"observation: expected finite values, got NaN or inf in rows \[1\]"),
    ("action_float", lambda r: r.add([0, 1], **good_add(action=np.array([1.0, 2.0]))), TypeError,
     "action: expected dtype castable to int32"),
    ("action_range", lambda r: r.add([0, 1], **good_add(action=np.array([1, 2**40]))), ValueError,
     "action: expected values in"),
    ("reward_nan", lambda r: r.add([0, 1], **good_add(reward=np.array([np.inf, 1.0]))), ValueError,
     r"reward: expected finite values, got NaN or inf in rows \[0\]"),
    ("reward_shape", lambda r: r.add([0, 1], **good_add(reward=np.array([1.0]))), ValueError,
     r"reward: expected shape \(2,\)"),
    ("terminated_int", lambda r: r.add([0, 1], **good_add(terminated=np.array([0, 1]))), TypeError,
     "terminated: expected dtype castable to bool"),
    ("truncated_shape", lambda r: r.add([0, 1], **good_add(truncated=np.array([False]))), ValueError,
     "truncated: expected shape"),
    ("states_missing", lambda r: r.add([0, 1], **good_add(states=None)), ValueError,
     "states: expected a RecurrentState of 1 layer"),
    ("states_layers", lambda r: r.add([0, 1], **good_add(states=((), ()))), ValueError, "got 2 entries"),
    ("states_arrays", lambda r: r.add([0, 1], **good_add(states=((np.zeros((2, 2)),),))), ValueError,
     r"states\[0\]: expected a tuple of 2 arrays"),
    ("states_shape", lambda r: r.add([0, 1], **good_add(states=((np.zeros((2, 2)), np.zeros((2, 4))),))),
     ValueError, r"states\[0\]\[1\]: expected shape \(2, 3\), got \(2, 4\)"),
    ("states_dtype", lambda r: r.add([0, 1], **good_add(states=((np.zeros((2, 2)), np.full((2, 3), "x")),))),
     TypeError, r"states\[0\]\[1\]: expected a floating array"),
    ("states_nan_kept", lambda r: r.add([0, 1], **good_add(states=NAN_STATE)), ValueError,
     r"states\[0\]\[0\]: expected finite values, got NaN or inf in the rows kept now, at lanes \[0\]"),
    ("final_obs_with_flag", lambda r: r.add([0, 1], **good_add(terminated=np.array([False, True]))), ValueError,
     r"terminated/truncated: lanes \[1\] are storing the final observation"),
    ("batch_size_zero", lambda r: r.sample(0), ValueError, "batch_size: expected an int >= 1, got 0"),
    ("batch_size_float", lambda r: r.sample(2.0), TypeError, "batch_size: expected an int"),
    ("extra_offset_not_multiple", lambda r: r.sample(2, extra_state_offsets=[1]), ValueError,
     r"extra_state_offsets: expected multiples of period=2 in \[0, 4\), got 1"),
    ("extra_offset_too_far", lambda r: r.sample(2, extra_state_offsets=[4]), ValueError, "got 4"),
    ("extra_offset_str", lambda r: r.sample(2, extra_state_offsets="2"), TypeError, "extra_state_offsets"),
    ("priorities_nan", lambda r: r.update_priorities(r.live_keys()[:1], [np.nan]), ValueError,
     r"priorities: expected finite values >= 0, got \[nan\]"),
    ("priorities_inf", lambda r: r.update_priorities(r.live_keys()[:1], [np.inf]), ValueError, r"got \[inf\]"),
    ("priorities_negative", lambda r: r.update_priorities(r.live_keys()[:1], [-1.0]), ValueError, r"got \[-1.0\]"),
    ("priorities_shape", lambda r: r.update_priorities(r.live_keys()[:2], [1.0]), ValueError,
     r"priorities: expected shape \(2,\)"),
    ("keys_float", lambda r: r.update_priorities([1.5], [1.0]), TypeError, "keys: expected integer window keys"),
    ("keys_negative", lambda r: r.update_priorities([-3], [1.0]), ValueError, r"keys: expected keys >= 0, got \[-3\]"),
    ("refresh_offset_zero", lambda r: r.update_states(r.live_keys()[:1], [0], (state_of([1]),)), ValueError,
     r"offsets: expected multiples of period=2 in \[1, 4\), got 0"),
    ("refresh_misaligned", lambda r: r.update_states(r.live_keys()[:1], [2], ()), ValueError,
     "states: expected a sequence of 1 RecurrentStates aligned with offsets, got 0 entries"),
    ("refresh_nan", lambda r: r.update_states(r.live_keys()[:2], [2], (NAN_STATE,)), ValueError,
     r"states\[0\]\[0\]\[0\]: expected finite values"),
    ("refresh_batch", lambda r: r.update_states(r.live_keys()[:1], [2], (state_of([1, 2]),)), ValueError,
     r"states\[0\]\[0\]\[0\]: expected shape \(1, 2\)"),
    ("close_lanes_range", lambda r: r.close_lanes([3]), ValueError, r"lanes: expected ids in \[0, 3\)"),
    ("register_owner", lambda r: r.register_lanes("", 1), TypeError, "owner: expected a non-empty str"),
    ("register_count", lambda r: r.register_lanes("x", 0), ValueError, "count: expected an int >= 1, got 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "match"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_input_raises_and_leaves_the_buffer_unchanged(call, error: type[Exception], match: str) -> None:
    replay = replay_for(S2, lanes=3)
    # Lanes 0 and 1 hold windows; lane 0's next step (3) keeps a state; lane 1's last add
    # terminated, so its next add is a final observation.
    play(replay, ["0:1 1:11", "0:2 1:12", "0:3 1:13", "1:14T"])
    before = snapshot(replay)
    with pytest.raises(error, match=match):
        call(replay)
    assert_same(before, snapshot(replay))


def test_nan_in_a_state_row_that_is_not_kept_is_accepted() -> None:
    replay = replay_for(S2, lanes=2)
    play(replay, ["0:1 1:11"])  # next: episode step 1 of both lanes, where (1 + burn_in) % 2 == 0: kept
    play(replay, ["0:2 1:12"])  # next: step 2, not kept
    before = snapshot(replay)
    replay.add([0, 1], **good_add(states=NAN_STATE))
    assert replay.stats()["steps_added"] == 6  # both steps stored
    after = snapshot(replay)
    for name in ("state_0_0", "state_0_1"):  # and no state row with them: nothing NaN was kept
        np.testing.assert_array_equal(after[name], before[name])
    replay.check_invariants()


def test_sample_from_an_empty_buffer() -> None:
    replay = replay_for(S2)
    play(replay, ["0:1", "0:2"])
    with pytest.raises(ValueError, match="no window is sampleable yet"):
        replay.sample(1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lane_capacity": 4}, ValueError, r"lane_capacity: expected >= spec.length \+ 1 = 5"),
        ({"num_lanes": 0}, ValueError, "num_lanes: expected an int >= 1"),
        ({"obs_shape": (0,)}, ValueError, "obs_shape: expected a tuple of ints >= 1"),
        ({"obs_dtype": object}, TypeError, "obs_dtype: expected a bool, integer or floating dtype"),
        ({"state_dtype": np.int32}, TypeError, "state_dtype: expected float16, float32 or float64"),
        ({"row_state_shapes": ((),)}, ValueError, "row_state_shapes: expected a tuple"),
        (
            {"row_state_shapes": (((0,),),)},
            ValueError,
            r"row_state_shapes\[0\]\[0\]: expected a tuple of ints >= 1",
        ),
        ({"row_state_shapes": None}, TypeError, "missing required keyword argument: 'row_state_shapes'"),
        (
            {"state_shapes": STATE_SHAPES},
            TypeError,
            "state_shapes is the deprecated name of row_state_shapes",
        ),
        ({"alpha": -0.1}, ValueError, "alpha: expected a finite float >= 0.0"),
        ({"beta": float("nan")}, ValueError, "beta: expected a finite float"),
        ({"windows_per_lane": 2}, ValueError, "windows_per_lane: expected an int >= 3"),
        ({"seed": -1}, ValueError, "seed: expected an int >= 0"),
        ({"seed": 1, "rng": np.random.default_rng(1)}, ValueError, "seed, rng: expected at most one"),
        ({"rng": 5}, TypeError, "rng: expected a numpy.random.Generator"),
    ],
)
def test_bad_construction(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    base = {"num_lanes": 1, "lane_capacity": 16, "obs_shape": (1,), "row_state_shapes": STATE_SHAPES}
    base.update(kwargs)
    with pytest.raises(error, match=match):
        SequenceReplay(S2, **base)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ((1, 2, 3, 1), ValueError, "period: expected <= unroll=2"),
        ((-1, 2, 1, 1), ValueError, "burn_in: expected an int >= 0, got -1"),
        ((0, 0, 1, 1), ValueError, "unroll: expected an int >= 1"),
        ((0, 2, 0, 1), ValueError, "period: expected an int >= 1"),
        ((0, 2, 1, 0), ValueError, "n_step: expected an int >= 1"),
        ((0, 2.0, 1, 1), TypeError, "unroll: expected an int, got float"),
        ((True, 2, 1, 1), TypeError, "burn_in: expected an int, got bool"),
    ],
)
def test_bad_spec(fields: tuple[Any, ...], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SequenceSpec(*fields)


def test_state_shapes_is_the_deprecated_name_of_row_state_shapes() -> None:
    """``state_shapes`` (without the batch) was the replay's name of what ``burnin.state_shapes`` gives with it."""
    with pytest.warns(DeprecationWarning, match="use row_state_shapes"):
        old = SequenceReplay(S2, num_lanes=1, lane_capacity=16, obs_shape=(1,), state_shapes=STATE_SHAPES)
    assert old.config.row_state_shapes == STATE_SHAPES
    with pytest.warns(DeprecationWarning, match="use ReplayConfig.row_state_shapes"):
        assert old.config.state_shapes == STATE_SHAPES
    # A checkpoint keeps the key it always had: the format is unchanged.
    assert old.config.to_json()["state_shapes"] == [[list(s) for s in layer] for layer in STATE_SHAPES]


def test_default_sizes() -> None:
    spec = SequenceSpec(burn_in=40, unroll=80, period=40, n_step=5)
    base = {
        "num_lanes": 1,
        "obs_shape": (4,),
        "obs_dtype": np.float32,
        "state_dtype": np.float32,
        "alpha": 0.9,
        "beta": 0.6,
    }
    config = ReplayConfig(spec=spec, lane_capacity=1000, row_state_shapes=(((512,), (512,)),), **base)
    assert spec.length == 125
    assert config.windows_per_lane == 2 * 25 + 1 + 2
    assert config.state_slots_per_lane == 25 + 2
    no_burn_in = ReplayConfig(spec=SequenceSpec(0, 4, 2, 1), lane_capacity=100, row_state_shapes=(), **base)
    assert no_burn_in.state_slots_per_lane == no_burn_in.windows_per_lane == 2 * 50 + 2


def test_replay_modules_stay_numpy_only() -> None:
    # The replay runs in a Ray replay server without TensorFlow: its modules must not import it.
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "burnin"
    paths = sorted((root / "replay").glob("*.py")) + [
        root / name for name in ("sumtree.py", "rate_limiter.py", "_checks.py", "_io.py")
    ]
    assert len(paths) >= 11
    for path in paths:
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        imported |= {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & {"tensorflow", "keras", "gymnasium", "ray"}, (path.name, imported)
