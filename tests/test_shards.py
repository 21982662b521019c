"""burnin.shards: S replay shards sampled as one buffer draw each window as the single buffer does (chi-square), weights and keys too."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from burnin.replay import SequenceReplay, SequenceSpec
from burnin.shards import ShardedReplay, allocate_draws, merge_draws, shard_keys, split_keys

SPEC = SequenceSpec(burn_in=2, unroll=4, period=2, n_step=1)
LANES, STEPS = 6, 60
STATE = (((3,),),)  # one layer, one array of 3 per row


def make(num_lanes: int, seed: int) -> SequenceReplay:
    return SequenceReplay(
        SPEC, num_lanes=num_lanes, lane_capacity=STEPS + 2, obs_shape=(2,), row_state_shapes=STATE, seed=seed
    )


def fill(single: SequenceReplay, shards: list[SequenceReplay]) -> None:
    """The same steps into one buffer and into the shards: lane l goes to shard l % S as its lane l // S.

    Observation (lane, t) names each stored step; episodes of 25 steps end by termination.
    """
    num = len(shards)
    for t in range(STEPS):
        ends = np.full(LANES, t % 25 == 24)
        obs = np.stack([np.arange(LANES), np.full(LANES, t)], axis=1).astype(np.float32)
        row = {
            "observation": obs,
            "action": np.zeros(LANES, np.int32),
            "reward": np.ones(LANES, np.float32),
            "terminated": ends,
            "truncated": np.zeros(LANES, bool),
            "states": ((np.full((LANES, 3), t, np.float32),),),
        }
        single.add(np.arange(LANES), **row)
        for s, shard in enumerate(shards):
            mine = np.arange(s, LANES, num)
            part = {k: v[mine] for k, v in row.items() if k != "states"}
            shard.add(np.arange(mine.size), states=((row["states"][0][0][mine],),), **part)


def window_id(batch) -> list[tuple[int, int]]:
    """(lane, step) of each window's first trained step: unique per window, the same in both layouts."""
    first = batch.observation[:, SPEC.burn_in]
    return [(int(a), int(b)) for a, b in first]


def priority_of(ident: tuple[int, int]) -> float:
    lane, step = ident
    return (1 + lane) * (0.5 + (step * 7 % 11) / 10)  # 0.5 … 9, fixed per window; later lanes weigh more


def set_priorities(replay) -> None:
    """Priorities that depend on the window only: the same in both layouts."""
    buffers = replay.shards if isinstance(replay, ShardedReplay) else [replay]
    for s, buf in enumerate(buffers):
        batch = buf.windows(buf.live_keys())
        pr = np.array([priority_of(w) for w in window_id(batch)])
        keys = batch.keys if buf is replay else shard_keys(batch.keys, s, len(buffers))
        replay.update_priorities(keys, pr)


def draw(replay, draws: int) -> tuple[list, np.ndarray]:
    ids, probs = [], []
    for _ in range(draws // 64):
        batch = replay.sample(64)
        ids += window_id(batch)
        probs.append(batch.probabilities)
    return ids, np.concatenate(probs)


def chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """p-value of Pearson's goodness-of-fit statistic (df = cells − 1), from TensorFlow's igammac."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    return float(tf.math.igammac((observed.size - 1) / 2.0, stat / 2.0))


def homogeneity_p(a: np.ndarray, b: np.ndarray) -> float:
    """p-value that two count vectors over the same cells come from one distribution (2 × k table)."""
    table = np.stack([a, b]).astype(np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return float(tf.math.igammac((a.size - 1) / 2.0, stat / 2.0))


@pytest.fixture(scope="module")
def layouts():
    single = make(LANES, seed=1)
    sharded = {}
    for num in (2, 3):
        shards = [make(len(range(s, LANES, num)), seed=10 + s) for s in range(num)]
        fill(single if num == 2 else make(LANES, seed=0), shards)
        sharded[num] = ShardedReplay(shards, seed=5)
        set_priorities(sharded[num])
    set_priorities(single)
    everything = single.windows(single.live_keys())
    ids = window_id(everything)
    return single, sharded, ids


@pytest.mark.parametrize("num_shards", [2, 3])
def test_sharded_draws_follow_the_single_buffer_distribution(layouts, num_shards):
    single, sharded, ids = layouts
    replay = sharded[num_shards]
    assert replay.num_sampleable == single.num_sampleable == len(ids)
    index = {w: i for i, w in enumerate(ids)}
    draws = 64 * 400
    got, got_p = draw(replay, draws)
    ref, ref_p = draw(single, draws)
    # The probability each draw reports is the single buffer's for that window (to float rounding).
    p_single = dict(zip(ref, ref_p))
    for w, p in zip(got, got_p):
        if w in p_single:
            assert p == pytest.approx(p_single[w], rel=1e-9)
    leaves = np.array([priority_of(w) for w in ids]) ** single.config.alpha
    expected = draws * leaves / leaves.sum()
    counts = np.bincount([index[w] for w in got], minlength=len(ids))
    ref_counts = np.bincount([index[w] for w in ref], minlength=len(ids))
    assert expected.min() >= 5  # the chi-square approximation holds
    assert chi_square_p(counts, expected) > 1e-3
    assert chi_square_p(ref_counts, expected) > 1e-3
    assert homogeneity_p(counts, ref_counts) > 1e-3


def test_the_test_rejects_a_sampler_that_splits_draws_evenly(layouts):
    """Power check: equal draws per shard (ignoring their totals) is not the single buffer's distribution."""
    single, sharded, ids = layouts
    replay = sharded[2]
    totals = replay.totals()
    assert abs(totals[0] - totals[1]) / totals.sum() > 0.02  # the shards' masses differ
    index = {w: i for i, w in enumerate(ids)}
    got = []
    for _ in range(400):
        parts = [s.sample(32) for s in replay.shards]
        got += window_id(merge_draws(parts, totals, beta=0.6))
    leaves = np.array([priority_of(w) for w in ids]) ** single.config.alpha
    counts = np.bincount([index[w] for w in got], minlength=len(ids))
    assert chi_square_p(counts, len(got) * leaves / leaves.sum()) < 1e-6


def test_merged_weights_and_keys_are_those_of_one_buffer(layouts):
    single, sharded, _ = layouts
    replay = sharded[3]
    batch = replay.sample(64, extra_state_offsets=(2,))
    leaves = batch.probabilities * replay.totals().sum()
    np.testing.assert_allclose(batch.weights, (leaves / leaves.min()) ** -single.config.beta, rtol=1e-6)
    assert batch.weights.max() == 1.0 and batch.weights.dtype == np.float32
    assert batch.actor_state is batch.state  # one set of arrays, as the buffer returns it
    # Keys route back to their shard: a priority update lands on the drawn window only.
    replay.update_priorities(batch.keys[:1], [50.0])
    again = {w: p for w, p in zip(*draw(replay, 64 * 20))}
    assert again[window_id(batch)[0]] > 0.05
    written = replay.update_states(batch.keys, (2,), [((np.zeros((64, 3), np.float32),),)])
    assert written > 0


ALLOCATIONS = [
    # (totals, what allocate_draws says)
    ([1.0, 0.0, 3.0], None),
    ([0.0, 0.0], "no shard has a sampleable window"),
    ([1.0, np.nan], "expected finite values >= 0"),
    ([], "one total priority per shard"),
]


@pytest.mark.parametrize(("totals", "error"), ALLOCATIONS)
def test_allocate_draws(totals, error):
    rng = np.random.default_rng(0)
    if error:
        with pytest.raises(ValueError, match=error):
            allocate_draws(totals, 8, rng)
        return
    counts = np.sum([allocate_draws(totals, 64, rng) for _ in range(200)], axis=0)
    assert counts.sum() == 64 * 200 and counts[1] == 0
    assert counts[2] / counts.sum() == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("num_shards", [1, 2, 5])
def test_split_keys_undoes_shard_keys(num_shards):
    local = np.array([0, 7, 123456789], np.int64)
    whole = np.concatenate([shard_keys(local, s, num_shards) for s in range(num_shards)])
    if num_shards == 1:
        np.testing.assert_array_equal(whole, local)  # one shard: the buffer's own keys
    for s, (rows, keys) in enumerate(split_keys(whole, num_shards)):
        np.testing.assert_array_equal(rows, np.arange(3) + 3 * s)
        np.testing.assert_array_equal(keys, local)


def test_shards_of_another_layout_are_refused():
    other = SequenceReplay(
        SequenceSpec(burn_in=2, unroll=4, period=4, n_step=1), num_lanes=1, lane_capacity=40, obs_shape=(2,),
        row_state_shapes=STATE,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"^shards\[1\]: its spec, alpha or beta differ"):
        ShardedReplay([make(1, 0), other])
