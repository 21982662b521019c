"""The learner's feed: make_feed then unpack_feed gives every field of the batch back by name, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from agents.r2d2.config import WindowOffsets
from agents.r2d2.feed import STEP_FIELDS, Feed, FeedLayout, make_feed, unpack_feed
from burnin.replay import SequenceBatch

B, L, ACTIONS = 3, 5, 4
OFFSETS = WindowOffsets(refresh=(2, 4), delta_q=(0, 2, 4), extra=(2, 4))


def _state(rng, row_state_shapes):
    return tuple(
        tuple(rng.standard_normal((B, *s)).astype(np.float32) for s in entry) for entry in row_state_shapes
    )


def _batch(rng, row_state_shapes, offsets: WindowOffsets) -> SequenceBatch:
    k = len(offsets.extra)
    steps = {
        "valid_t": rng.random((B, L)) < 0.5,
        "learn_mask": rng.random((B, L)) < 0.5,
        "final": rng.random((B, L)) < 0.5,
        "terminal": np.zeros((B, L), bool),
        **{n: rng.integers(0, ACTIONS, (B, L), dtype=np.int32) for n in ("action", "prev_action")},
        **{n: rng.standard_normal((B, L)).astype(np.float32) for n in ("reward", "prev_reward")},
        "discount": (rng.random((B, L)) < 0.5).astype(np.float32),
    }
    return SequenceBatch(
        observation=rng.integers(0, 255, (B, L, 2, 2), dtype=np.uint8),
        **steps,
        state=_state(rng, row_state_shapes),
        keys=np.arange(B, dtype=np.int64),
        probabilities=np.full(B, 1 / B),
        weights=rng.random(B).astype(np.float32),
        extra_states=tuple(_state(rng, row_state_shapes) for _ in range(k)),
        extra_state_mask=rng.random((B, k)) < 0.5,
        actor_state=_state(rng, row_state_shapes),
        extra_actor_states=tuple(_state(rng, row_state_shapes) for _ in range(k)),
    )


def _assert_same_state(got, want) -> None:
    assert len(got) == len(want)
    for got_entry, want_entry in zip(got, want):
        for g, w in zip(got_entry, want_entry, strict=True):
            np.testing.assert_array_equal(np.asarray(g), w)


def test_every_step_field_is_a_field_of_the_feed():
    assert set(STEP_FIELDS) <= set(Feed._fields)


@pytest.mark.parametrize(
    "row_state_shapes",
    [(), (((4,), (4,)),), (((4,),), ((4,), (4,))), (((2, 3),),)],
    ids=["no state", "lstm", "gru then lstm", "2-d state"],
)
@pytest.mark.parametrize("offsets", [OFFSETS, WindowOffsets(refresh=(2, 4), delta_q=(2,), extra=(2,))])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_unpack_gives_back_the_batch(row_state_shapes, offsets, compiled, rng):
    offsets = offsets if row_state_shapes else WindowOffsets()  # a stateless network has no states
    batch = _batch(rng, row_state_shapes, offsets)
    layout = FeedLayout(B, L, ACTIONS, (2, 2), np.dtype(np.uint8), row_state_shapes, offsets)
    packed = make_feed(batch, layout)
    assert len(packed) == 7
    unpack = lambda p: unpack_feed(p, layout)
    feed = (tf.function(unpack) if compiled else unpack)(packed)
    for name in ("observation", "weights", *STEP_FIELDS):
        np.testing.assert_array_equal(np.asarray(getattr(feed, name)), getattr(batch, name), err_msg=name)
    np.testing.assert_array_equal(np.asarray(feed.has_action), batch.valid_t & ~batch.final)
    _assert_same_state(feed.state, batch.state)
    # ΔQ reads the actor's states: its own at step 0, the extra ones after it.
    assert len(feed.delta_q_states) == len(feed.delta_q_state_mask) == len(offsets.delta_q)
    for o, state, mask in zip(offsets.delta_q, feed.delta_q_states, feed.delta_q_state_mask):
        k = offsets.extra.index(o) if o else None
        _assert_same_state(state, batch.actor_state if o == 0 else batch.extra_actor_states[k])
        want = batch.valid_t[:, 0] if o == 0 else batch.extra_state_mask[:, k]
        np.testing.assert_array_equal(np.asarray(mask), want)
