"""The learner's packed feed: pack_feed then unpack_feed gives every field back, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from agents.r2d2.feed import pack_feed, unpack_feed

B, L = 3, 5


def _fields(rng, row_state_shapes):
    f = {n: rng.random((B, L)) < 0.5 for n in ("valid_t", "learn_mask", "final")}
    f["observation"] = rng.integers(0, 255, (B, L, 2, 2), dtype=np.uint8)
    f.update({n: rng.integers(0, 4, (B, L), dtype=np.int32) for n in ("action", "prev_action")})
    f.update(
        {n: rng.standard_normal((B, L)).astype(np.float32) for n in ("reward", "prev_reward", "discount")}
    )
    f["weights"] = rng.random(B).astype(np.float32)
    if row_state_shapes:
        f["state"] = _state(rng, row_state_shapes)
    return f


def _state(rng, row_state_shapes):
    return tuple(
        tuple(rng.standard_normal((B, *s)).astype(np.float32) for s in entry) for entry in row_state_shapes
    )


@pytest.mark.parametrize(
    "row_state_shapes",
    [(), (((4,), (4,)),), (((4,),), ((4,), (4,))), (((2, 3),),)],
    ids=["no state", "lstm", "gru then lstm", "2-d state"],
)
@pytest.mark.parametrize("probes", [0, 2])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_unpack_gives_back_what_was_packed(row_state_shapes, probes, compiled, rng):
    probes = probes if row_state_shapes else 0  # a stateless network has no ΔQ probes
    fields = _fields(rng, row_state_shapes)
    probe_states = [_state(rng, row_state_shapes) for _ in range(probes)]
    probe_masks = [rng.random(B) < 0.5 for _ in range(probes)]
    packed = pack_feed(fields, probe_states, probe_masks, batch_size=B)
    assert len(packed) == 7
    unpack = lambda p: unpack_feed(p, row_state_shapes=row_state_shapes, probes=probes, batch_size=B)
    out = (tf.function(unpack) if compiled else unpack)(packed)
    for name in (
        "observation",
        "action",
        "prev_action",
        "reward",
        "prev_reward",
        "discount",
        "valid_t",
        "learn_mask",
    ):
        np.testing.assert_array_equal(np.asarray(out[name]), fields[name], err_msg=name)
    np.testing.assert_array_equal(np.asarray(out["has_action"]), fields["valid_t"] & ~fields["final"])
    np.testing.assert_array_equal(np.asarray(out["weights"]), fields["weights"])
    for got, want in zip((out["state"], *out["probe_states"]), (fields.get("state", ()), *probe_states)):
        assert len(got) == len(want)
        for got_entry, want_entry in zip(got, want):
            for g, w in zip(got_entry, want_entry, strict=True):
                np.testing.assert_array_equal(np.asarray(g), w)
    assert len(out["probe_states"]) == len(out["probe_masks"]) == probes
    for g, w in zip(out["probe_masks"], probe_masks):
        np.testing.assert_array_equal(np.asarray(g), w)
