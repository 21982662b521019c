"""Property tests (issue 11): add / sample / update_priorities / update_states with arbitrary floats.

Every call either is accepted, and then the buffer's invariants hold and a sample
is sane (finite probabilities and weights), or is refused with a ValueError and
the buffer's fingerprint is what it was before the call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from helpers import fingerprint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from burnin.replay import SequenceReplay, SequenceSpec

S2 = SequenceSpec(burn_in=1, unroll=2, period=2, n_step=1)
INF = float("inf")
EXTREMES = [0.0, -0.0, 5e-324, 1e-300, 1e-38, 1.0, 3.4e38, 3.5e38, 1e200, 1e308, 1.7976931348623157e308,
            INF, -INF, float("nan"), -1.0, -1e-300, 65504.0, 2.0**64]  # fmt: skip
values = st.one_of(st.floats(width=64), st.sampled_from(EXTREMES))
small_floats = st.floats(min_value=-1e3, max_value=1e3)

adds = st.tuples(
    st.just("add"),
    st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=3, unique=True),
    st.one_of(small_floats, values),  # observation
    st.one_of(small_floats, values),  # reward
    st.one_of(small_floats, values),  # state
    st.sampled_from(["", "T", "t"]),
)
priorities = st.tuples(st.just("priorities"), st.lists(values, min_size=1, max_size=6))
samples = st.tuples(st.just("sample"), st.integers(1, 16))
refreshes = st.tuples(st.just("states"), values)
programs = st.lists(st.one_of(adds, adds, adds, priorities, samples, refreshes), min_size=1, max_size=40)
alphas = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0, 2.0, 10.0, 300.0]), st.floats(0.0, 50.0))


def run(replay: SequenceReplay, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind == "add":
        _, lanes, obs, reward, state, flag = op
        lanes = np.array(lanes)
        n = lanes.size
        pending = replay._lt[lanes, 9].astype(bool)  # storing a final observation: no flags allowed
        return replay.add(
            lanes,
            observation=np.full((n, 2), obs),
            action=np.arange(n),
            reward=np.full(n, reward),
            terminated=np.full(n, flag == "T") & ~pending,
            truncated=np.full(n, flag == "t") & ~pending,
            states=((np.full((n, 3), state),),),
        )
    if kind == "priorities":
        keys = replay.live_keys()
        if not keys.size:
            return None
        pr = np.array(op[1])
        chosen = keys[np.arange(pr.size) % keys.size]
        return replay.update_priorities(chosen, pr)
    if kind == "sample":
        return replay.sample(op[1], extra_state_offsets=[0, 2])
    keys = replay.live_keys()
    return replay.update_states(keys, [2], (((np.full((keys.size, 3), op[1]),),),))


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(alpha=alphas, beta=st.sampled_from([0.0, 0.6, 1.0]), program=programs)
def test_every_call_is_accepted_whole_or_refused_unchanged(
    alpha: float, beta: float, program: list[tuple[Any, ...]]
) -> None:
    replay = SequenceReplay(S2, num_lanes=3, lane_capacity=12, obs_shape=(2,), row_state_shapes=(((3,),),),
                            alpha=alpha, beta=beta, seed=0)  # fmt: skip
    for op in program:
        before = fingerprint(replay)
        try:
            out = run(replay, op)
        except ValueError:
            assert fingerprint(replay) == before, op
            continue
        replay.check_invariants()
        stats = replay.stats()
        assert np.isfinite(stats["total_priority"]) and np.isfinite(stats["max_priority"])
        if op[0] == "sample":
            assert (
                np.isfinite(out.probabilities).all()
                and ((out.probabilities >= 0) & (out.probabilities <= 1)).all()
            )
            assert np.isfinite(out.weights).all() and ((out.weights >= 0) & (out.weights <= 1)).all()
            assert out.weights.max() == 1.0
            assert np.isfinite(out.observation).all() and np.isfinite(out.reward).all()
            assert all(np.isfinite(a).all() for layer in out.state for a in layer)
    if replay.num_sampleable and replay.stats()["total_priority"] > 0:
        batch = replay.sample(32)
        assert np.isfinite(batch.weights).all()
