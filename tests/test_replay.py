"""Tests of SequenceReplay: hand-computed window tables, a brute-force property test, sampling, checkpoints, threads."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from helpers import S2, STATE_SHAPES, play, replay_for, state_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from burnin.replay import SequenceReplay, SequenceSpec

# Step streams in a compact notation: see helpers.play.


def final_ids_by_lane(stream: list[str]) -> dict[int, set[int]]:
    """Observation ids stored as a final observation: 'F' tokens, and the last step of a closed lane."""
    final: dict[int, set[int]] = {}
    last: dict[int, tuple[int, str]] = {}
    for call in stream:
        if call.startswith("close:"):
            for lane in (int(x) for x in call[6:].split(",")):
                if lane in last and last[lane][1] == "T":
                    final.setdefault(lane, set()).add(0)  # a zero final observation is stored
                    last[lane] = (0, "F")
                elif lane in last and last[lane][1] != "F":
                    final.setdefault(lane, set()).add(last[lane][0])
                    last[lane] = (last[lane][0], "F")
        elif call not in ("keys", "stale"):
            for token in call.split():
                lane_text, rest = token.split(":")
                flag = rest[-1] if rest[-1] in "TtF" else ""
                ident = int(rest.rstrip("TtF"))
                last[int(lane_text)] = (ident, flag)
                if flag == "F":
                    final.setdefault(int(lane_text), set()).add(ident)
    return final


@dataclasses.dataclass(frozen=True)
class W:
    """One expected window, written by hand. Rows are space-separated; '-' marks an invalid step."""

    lane: int
    obs: str  # observation id per window step
    act: str  # action per step (0 at the final observation)
    disc: str  # discount per step
    prev: str  # prev_action per step (0 at the episode's first step)
    learn: str  # 'x' where learn_mask is set
    term: str  # 'x' where the step is the final observation of a terminated episode
    state: int | None  # id of the step whose state is stored before window step 0 (None: zeros)
    priority: float = 1.0  # leaf value (priority ** alpha) expected at the end


def row(text: str) -> tuple[np.ndarray, np.ndarray]:
    items = text.split()
    valid = np.array([x != "-" for x in items])
    return np.array([float(x) if x != "-" else 0.0 for x in items]), valid


def marks(text: str) -> np.ndarray:
    return np.array([c == "x" for c in text])


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    spec: SequenceSpec
    stream: list[str]
    windows: list[W]
    counts: list[int] | None = None  # sampleable windows after each stream call
    capacity: int = 64
    lanes: int = 1
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    stats: dict[str, int] = dataclasses.field(default_factory=dict)


# fmt: off
CASES = [
    Case(
        # burn_in 4 > the 2 actionable steps: one window, mostly padding, zero state.
        name="episode_shorter_than_burn_in",
        spec=SequenceSpec(burn_in=4, unroll=2, period=2, n_step=1),  # L = 7
        stream=["0:1", "0:2T", "0:3F"],
        counts=[0, 0, 1],
        windows=[
            W(0, obs="- - - - 1 2 3", act="- - - - 1 2 0", disc="- - - - 1 0 0", prev="- - - - 0 1 2",
              learn="....xx.", term="......x", state=None),
        ],
    ),
    Case(
        # unroll 4 > the 3 actionable steps: windows end early (right padding); truncation bootstraps.
        name="episode_shorter_than_unroll",
        spec=SequenceSpec(burn_in=1, unroll=4, period=2, n_step=1),  # L = 6
        stream=["0:1", "0:2", "0:3t", "0:4F"],
        counts=[0, 0, 0, 2],
        windows=[
            W(0, obs="- 1 2 3 4 -", act="- 1 2 3 0 -", disc="- 1 1 1 0 -", prev="- 0 1 2 3 -",
              learn=".xxx..", term="......", state=None),
            W(0, obs="2 3 4 - - -", act="2 3 0 - - -", disc="1 1 0 - - -", prev="1 2 3 - - -",
              learn=".x....", term="......", state=2),
        ],
    ),
    Case(
        # T = 4 = 2·period: the trained parts [0, 2) and [2, 4) tile the episode exactly once.
        name="exact_multiple_of_period",
        spec=SequenceSpec(burn_in=2, unroll=2, period=2, n_step=1),  # L = 5
        stream=["0:1", "0:2", "0:3", "0:4T", "0:5F"],
        counts=[0, 0, 1, 1, 2],
        windows=[
            W(0, obs="- - 1 2 3", act="- - 1 2 3", disc="- - 1 1 1", prev="- - 0 1 2",
              learn="..xx.", term=".....", state=None),
            W(0, obs="1 2 3 4 5", act="1 2 3 4 0", disc="1 1 1 0 0", prev="0 1 2 3 4",
              learn="..xx.", term="....x", state=1),
        ],
    ),
    Case(
        # Same steps in two lanes: termination zeroes the discount and marks the terminal step;
        # truncation keeps discount 1 and marks nothing.
        name="termination_vs_truncation",
        spec=S2,
        lanes=2,
        stream=["0:1 1:11", "0:2T 1:12t", "0:3F 1:13F"],
        counts=[0, 0, 2],
        windows=[
            W(0, obs="- 1 2 3", act="- 1 2 0", disc="- 1 0 0", prev="- 0 1 2", learn=".xx.", term="...x",
              state=None),
            W(1, obs="- 11 12 13", act="- 11 12 0", disc="- 1 1 0", prev="- 0 11 12", learn=".xx.", term="....",
              state=None),
        ],
    ),
    Case(
        # Three lanes written in changing subsets and orders; lane 1 starts a second episode
        # right after its first one ended, and no window mixes the two.
        name="interleaved_lanes",
        spec=S2,
        lanes=3,
        stream=["0:1 1:11", "1:12T", "2:21 0:2", "1:13F 0:3 2:22", "1:14 2:23t", "0:4 2:24F 1:15", "1:16"],
        counts=[0, 0, 0, 2, 3, 4, 5],
        windows=[
            # lane 0, open episode 1 2 3 4: window k=0 complete at step 2
            W(0, obs="- 1 2 3", act="- 1 2 3", disc="- 1 1 1", prev="- 0 1 2", learn=".xx.", term="....",
              state=None),
            # lane 1, episode 11 12T 13F, then the open episode 14 15 16
            W(1, obs="- 11 12 13", act="- 11 12 0", disc="- 1 0 0", prev="- 0 11 12", learn=".xx.", term="...x",
              state=None),
            W(1, obs="- 14 15 16", act="- 14 15 16", disc="- 1 1 1", prev="- 0 14 15", learn=".xx.", term="....",
              state=None),
            # lane 2, episode 21 22 23t 24F: k = 0, 1
            W(2, obs="- 21 22 23", act="- 21 22 23", disc="- 1 1 1", prev="- 0 21 22", learn=".xx.", term="....",
              state=None),
            W(2, obs="22 23 24 -", act="22 23 0 -", disc="1 1 0 -", prev="21 22 23 -", learn=".x..", term="....",
              state=22),
        ],
    ),
    Case(
        # capacity 7 over a 12-step episode: windows die as soon as the step they read first is
        # overwritten (k=0 and k=1 read step 0, k=2 step 2, k=3 step 4, k=4 step 6); the survivor
        # wraps around the ring (it reads ring slots 6, 0, 1, 2, 3).
        name="wrap_around_eviction",
        spec=S2,
        capacity=7,
        stream=[f"0:{i}" for i in range(1, 13)],
        counts=[0, 0, 1, 1, 2, 2, 3, 1, 2, 1, 2, 1],
        windows=[
            W(0, obs="8 9 10 11", act="8 9 10 11", disc="1 1 1 1", prev="7 8 9 10", learn=".xx.", term="....",
              state=8),
        ],
        stats={"windows_evicted": 4, "early_evictions": 0},
    ),
    Case(
        # The keys remembered after step 7 all belong to evicted windows by the end, and with
        # windows_per_lane at its minimum of 3 their slots were reused: the key of k=1 (slot 1)
        # names a dead generation of the slot that now holds the live k=4. The update must be
        # ignored and counted, and the live window keep its priority.
        name="stale_priority_update",
        spec=S2,
        capacity=7,
        kwargs={"windows_per_lane": 3, "alpha": 1.0},
        stream=[*[f"0:{i}" for i in range(1, 8)], "keys", *[f"0:{i}" for i in range(8, 13)], "stale"],
        windows=[
            W(0, obs="8 9 10 11", act="8 9 10 11", disc="1 1 1 1", prev="7 8 9 10", learn=".xx.", term="....",
              state=8, priority=1.0),
        ],
        stats={"stale_updates": 3, "priority_updates": 0, "early_evictions": 0},
    ),
    Case(
        # close_lanes right after a termination, before the final observation arrived: a zero
        # final observation (id 0) is stored, so step 3 keeps its action, reward and discount 0.
        name="close_lanes_after_termination",
        spec=S2,
        stream=["0:1", "0:2", "0:3T", "close:0", "0:11", "0:12", "0:13"],
        counts=[0, 0, 1, 2, 2, 2, 3],
        windows=[
            W(0, obs="- 1 2 3", act="- 1 2 3", disc="- 1 1 0", prev="- 0 1 2", learn=".xx.", term="....",
              state=None),
            W(0, obs="2 3 0 -", act="2 3 0 -", disc="1 0 0 -", prev="1 2 3 -", learn=".x..", term="..x.",
              state=2),
            W(0, obs="- 11 12 13", act="- 11 12 13", disc="- 1 1 1", prev="- 0 11 12", learn=".xx.", term="....",
              state=None),
        ],
    ),
    Case(
        # close_lanes mid-episode: the last stored step (3) becomes the final observation of a
        # truncated episode, so T = 2 and only window k=0 exists; step 2 now bootstraps
        # (discount 1); the next add starts a new episode.
        name="close_lanes_mid_episode",
        spec=S2,
        stream=["0:1", "0:2", "0:3", "close:0", "0:11", "0:12", "0:13"],
        counts=[0, 0, 1, 1, 1, 1, 2],
        windows=[
            W(0, obs="- 1 2 3", act="- 1 2 0", disc="- 1 1 0", prev="- 0 1 2", learn=".xx.", term="....",
              state=None),
            W(0, obs="- 11 12 13", act="- 11 12 13", disc="- 1 1 1", prev="- 0 11 12", learn=".xx.", term="....",
              state=None),
        ],
    ),
    Case(
        # Many 1-step episodes with windows_per_lane 3: one window per episode fills the window
        # ring long before the step ring, so the oldest are evicted early and counted.
        name="early_eviction_of_short_episodes",
        spec=S2,
        kwargs={"windows_per_lane": 3},
        stream=["0:1T", "0:2F", "0:3T", "0:4F", "0:5t", "0:6F", "0:7T", "0:8F", "0:9T", "0:10F"],
        counts=[0, 1, 1, 2, 2, 3, 3, 3, 3, 3],
        windows=[
            W(0, obs="- 5 6 -", act="- 5 0 -", disc="- 1 0 -", prev="- 0 5 -", learn=".x..", term="....", state=None),
            W(0, obs="- 7 8 -", act="- 7 0 -", disc="- 0 0 -", prev="- 0 7 -", learn=".x..", term="..x.", state=None),
            W(0, obs="- 9 10 -", act="- 9 0 -", disc="- 0 0 -", prev="- 0 9 -", learn=".x..", term="..x.",
              state=None),
        ],
        stats={"early_evictions": 2, "episodes_completed": 5},
    ),
    Case(
        # burn_in 0: every window has a stored state, the one at its first trained step.
        name="no_burn_in",
        spec=SequenceSpec(burn_in=0, unroll=2, period=1, n_step=1),  # L = 3
        stream=["0:1", "0:2", "0:3T", "0:4F"],
        counts=[0, 0, 1, 3],
        windows=[
            W(0, obs="1 2 3", act="1 2 3", disc="1 1 0", prev="0 1 2", learn="xx.", term="...", state=1),
            W(0, obs="2 3 4", act="2 3 0", disc="1 0 0", prev="1 2 3", learn="xx.", term="..x", state=2),
            W(0, obs="3 4 -", act="3 0 -", disc="0 0 -", prev="2 3 -", learn="x..", term=".x.", state=3),
        ],
    ),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_window_table(case: Case) -> None:
    replay = replay_for(case.spec, lanes=case.lanes, capacity=case.capacity, **case.kwargs)
    result = play(replay, case.stream)
    if case.counts is not None:
        assert result["counts"] == case.counts
    keys = replay.live_keys()
    assert keys.size == len(case.windows)
    batch = replay.windows(keys)
    lanes = keys % replay._num_slots // replay.config.windows_per_lane
    L = case.spec.length
    for i, w in enumerate(case.windows):
        obs, mask = row(w.obs)
        act, act_valid = row(w.act)
        disc, _ = row(w.disc)
        prev, _ = row(w.prev)
        assert len(obs) == L and (act_valid == mask).all()
        assert lanes[i] == w.lane
        np.testing.assert_array_equal(batch.valid_t[i], mask, err_msg=f"window {i} mask")
        np.testing.assert_array_equal(batch.observation[i, :, 0], obs, err_msg=f"window {i} obs")
        np.testing.assert_array_equal(batch.action[i], act, err_msg=f"window {i} action")
        np.testing.assert_array_equal(batch.reward[i], 10 * act, err_msg=f"window {i} reward")
        np.testing.assert_array_equal(batch.discount[i], disc, err_msg=f"window {i} discount")
        np.testing.assert_array_equal(batch.prev_action[i], prev, err_msg=f"window {i} prev_action")
        np.testing.assert_array_equal(batch.prev_reward[i], 10 * prev, err_msg=f"window {i} prev_reward")
        np.testing.assert_array_equal(
            batch.learn_mask[i], marks(w.learn.ljust(L, ".")), err_msg=f"window {i} learn"
        )
        np.testing.assert_array_equal(
            batch.terminal[i], marks(w.term.ljust(L, ".")), err_msg=f"window {i} terminal"
        )
        final_ids = final_ids_by_lane(case.stream).get(w.lane, set())
        np.testing.assert_array_equal(
            batch.final[i], mask & np.isin(obs, list(final_ids)), err_msg=f"window {i} final"
        )
        expected_state = state_of(np.array([w.state if w.state is not None else 0]))
        if w.state is None:
            expected_state = tuple(tuple(np.zeros_like(a) for a in layer) for layer in expected_state)
        for got_layer, want_layer in zip(batch.state, expected_state):
            for got, want in zip(got_layer, want_layer):
                np.testing.assert_array_equal(got[i], want[0], err_msg=f"window {i} state")
        assert replay._tree.values([keys[i] % replay._num_slots])[0] == w.priority
    stats = replay.stats()
    for name, value in case.stats.items():
        assert stats[name] == value, name
    assert batch.observation.dtype == np.float32 and batch.action.dtype == np.int32
    assert batch.reward.dtype == np.float32 and batch.discount.dtype == np.float32
    assert batch.keys.dtype == np.int64


# ---------------------------------------------------------------------------------------------
# Property test against a brute-force reference.
# ---------------------------------------------------------------------------------------------


class Reference:
    """Brute force: every step ever added, per lane, and the windows the rules imply."""

    def __init__(self, spec: SequenceSpec, lanes: int, capacity: int) -> None:
        self.spec, self.capacity = spec, capacity
        # Per lane: list of steps (id, action, reward, terminated, truncated, final) by lane
        # position, and episodes as [start position, final position or None].
        self.steps: list[list[dict[str, Any]]] = [[] for _ in range(lanes)]
        self.episodes: list[list[list[Any]]] = [[] for _ in range(lanes)]
        self.pending = [False] * lanes

    def add(self, lane: int, ident: int, term: bool, trunc: bool) -> None:
        steps, eps = self.steps[lane], self.episodes[lane]
        pos = len(steps)
        if self.pending[lane]:
            steps.append(
                {"id": ident, "action": 0, "reward": 0.0, "term": False, "trunc": False, "final": True}
            )
            eps[-1][1] = pos
            self.pending[lane] = False
            return
        if not eps or eps[-1][1] is not None:
            eps.append([pos, None])
        steps.append(
            {
                "id": ident,
                "action": ident,
                "reward": 10.0 * ident,
                "term": term,
                "trunc": trunc,
                "final": False,
            }
        )
        self.pending[lane] = term or trunc

    def close(self, lane: int) -> None:
        steps, eps = self.steps[lane], self.episodes[lane]
        if not eps or eps[-1][1] is not None:
            return
        if self.pending[lane] and steps[-1]["term"]:
            # Terminated, final observation not yet added: the replay stores a zero one.
            steps.append({"id": 0, "action": 0, "reward": 0.0, "term": False, "trunc": False, "final": True})
            eps[-1][1] = len(steps) - 1
            self.pending[lane] = False
            return
        last = len(steps) - 1
        steps[last].update(action=0, reward=0.0, term=False, trunc=False, final=True)
        if last > eps[-1][0]:
            steps[last - 1].update(term=False, trunc=True)
        eps[-1][1] = last
        self.pending[lane] = False

    def windows(self) -> dict[tuple[int, int], dict[str, Any]]:
        """(lane, lane position of window step 0) -> expected content, for every live window."""
        b, P, L = self.spec.burn_in, self.spec.period, self.spec.length
        out = {}
        for lane, eps in enumerate(self.episodes):
            steps = self.steps[lane]
            oldest = len(steps) - self.capacity  # positions below this were overwritten
            for start, final in eps:
                last = final if final is not None else len(steps) - 1
                T = final - start if final is not None else None  # episode step of the final observation
                k = 0
                while True:
                    sp = k * P - b
                    if T is not None and k * P > T - 1:
                        break
                    if T is None and start + sp + L - 1 > last:
                        break  # not complete yet
                    first_read = start + max(sp - 1, 0)
                    if first_read >= oldest:
                        out[(lane, start + sp)] = self._content(lane, start, last, sp, T)
                    k += 1
        return out

    def _content(self, lane: int, start: int, last: int, sp: int, T: int | None) -> dict[str, Any]:
        b, u, P, L = self.spec.burn_in, self.spec.unroll, self.spec.period, self.spec.length
        steps = self.steps[lane]
        c = {name: np.zeros(L) for name in ("obs", "act", "rew", "disc", "pact", "prew")}
        c.update({name: np.zeros(L, bool) for name in ("valid_t", "learn", "term", "final")})
        for t in range(L):
            e = sp + t
            if e < 0 or start + e > last:
                continue
            s = steps[start + e]
            c["valid_t"][t] = True
            c["obs"][t], c["act"][t], c["rew"][t] = s["id"], s["action"], s["reward"]
            c["disc"][t] = 0.0 if s["final"] or s["term"] else 1.0
            c["learn"][t] = not s["final"] and b <= t < b + u
            c["term"][t] = s["final"] and steps[start + e - 1]["term"] if e > 0 else False
            c["final"][t] = s["final"]
            if e > 0:
                c["pact"][t], c["prew"][t] = steps[start + e - 1]["action"], steps[start + e - 1]["reward"]
        c["state"] = steps[start + sp]["id"] if sp >= 0 else None
        c["trained"] = {steps[start + sp + t]["id"] for t in range(L) if c["learn"][t]}
        # A state is kept at episode step e >= 0 where window (e + b) / P starts its burn-in, as long
        # as that window exists (in an open episode: as long as step e is stored).
        c["extra"] = {}
        for o in range(0, L, P):
            e = sp + o
            exists = e >= 0 and start + e <= last and (T is None or e + b <= T - 1)
            c["extra"][o] = steps[start + e]["id"] if exists else None
        return c


@st.composite
def streams(draw: st.DrawFn) -> tuple[SequenceSpec, int, list[tuple[str, Any]]]:
    unroll = draw(st.integers(1, 4))
    spec = SequenceSpec(
        burn_in=draw(st.integers(0, 3)),
        unroll=unroll,
        period=draw(st.integers(1, unroll)),
        n_step=draw(st.integers(1, 3)),
    )
    capacity = spec.length + 1 + draw(st.integers(0, 14))
    events = draw(
        st.lists(
            st.one_of(
                st.tuples(
                    st.just("add"), st.lists(st.tuples(st.integers(0, 2), st.integers(0, 9)), max_size=3)
                ),
                st.tuples(st.just("close"), st.lists(st.integers(0, 2), max_size=2, unique=True)),
            ),
            min_size=1,
            max_size=60,
        )
    )
    return spec, capacity, events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_property_against_brute_force(drawn: tuple[SequenceSpec, int, list[tuple[str, Any]]]) -> None:
    check_against_reference(*drawn)


@pytest.mark.parametrize("seed", range(6))
def test_long_random_streams_against_brute_force(seed: int) -> None:
    # Hypothesis favours short streams; these run long enough to wrap every lane's ring many times.
    rng = np.random.default_rng(seed)
    unroll = int(rng.integers(1, 6))
    spec = SequenceSpec(
        burn_in=int(rng.integers(0, 5)),
        unroll=unroll,
        period=int(rng.integers(1, unroll + 1)),
        n_step=int(rng.integers(1, 4)),
    )
    capacity = spec.length + 1 + int(rng.integers(0, 20))
    events: list[tuple[str, Any]] = []
    for _ in range(600):
        if rng.random() < 0.02:
            events.append(("close", [int(rng.integers(0, 3))]))
        else:
            lanes = rng.permutation(3)[: rng.integers(1, 4)]
            # Episode ends with probability 2 * 0.06: mostly episodes of a few periods.
            events.append(
                ("add", [(int(x), int(rng.integers(0, 9)) if rng.random() < 0.12 else 9) for x in lanes])
            )
    check_against_reference(spec, capacity, events)


def check_against_reference(spec: SequenceSpec, capacity: int, events: list[tuple[str, Any]]) -> None:
    lanes = 3
    replay = SequenceReplay(
        spec,
        num_lanes=lanes,
        lane_capacity=capacity,
        obs_shape=(1,),
        row_state_shapes=STATE_SHAPES,
        windows_per_lane=capacity,  # room for every window: no early eviction to model
        seed=0,
    )
    ref = Reference(spec, lanes, capacity)
    ident = 0
    for kind, payload in events:
        if kind == "close":
            replay.close_lanes(np.array(payload, dtype=np.int64))
            for lane in payload:
                ref.close(lane)
        else:
            chosen: dict[int, int] = {}
            for lane, roll in payload:
                chosen.setdefault(lane, roll)
            if not chosen:
                continue
            lane_ids = np.array(sorted(chosen), dtype=np.int64)
            ids = np.arange(ident + 1, ident + 1 + lane_ids.size)
            ident += lane_ids.size
            # roll 0: terminate, 1: truncate, else go on; a lane storing its final observation
            # must pass False for both.
            term = np.array([chosen[int(x)] == 0 and not ref.pending[int(x)] for x in lane_ids])
            trunc = np.array([chosen[int(x)] == 1 and not ref.pending[int(x)] for x in lane_ids])
            replay.add(
                lane_ids,
                observation=ids[:, None].astype(np.float32),
                action=ids,
                reward=10.0 * ids,
                terminated=term,
                truncated=trunc,
                states=state_of(ids),
            )
            for lane, i, te, tr in zip(lane_ids, ids, term, trunc):
                ref.add(int(lane), int(i), bool(te), bool(tr))
        replay.check_invariants()

    stats = replay.stats()
    assert stats["early_evictions"] == 0
    expected = ref.windows()
    keys = replay.live_keys()
    assert keys.size == len(expected)
    if keys.size == 0:
        return
    offsets = list(range(0, spec.length, spec.period))
    batch = replay.windows(keys, extra_state_offsets=offsets)
    slots = keys % replay._num_slots
    got_lane = slots // replay.config.windows_per_lane
    got_start = replay._win[slots, 0]
    trained: dict[int, set[int]] = {}
    for i in range(keys.size):
        lane, start = int(got_lane[i]), int(got_start[i])
        want = expected[(lane, start)]
        np.testing.assert_array_equal(batch.valid_t[i], want["valid_t"])
        np.testing.assert_array_equal(batch.observation[i, :, 0], want["obs"])
        np.testing.assert_array_equal(batch.action[i], want["act"])
        np.testing.assert_array_equal(batch.reward[i], want["rew"])
        np.testing.assert_array_equal(batch.discount[i], want["disc"])
        np.testing.assert_array_equal(batch.prev_action[i], want["pact"])
        np.testing.assert_array_equal(batch.prev_reward[i], want["prew"])
        np.testing.assert_array_equal(batch.learn_mask[i], want["learn"])
        np.testing.assert_array_equal(batch.terminal[i], want["term"])
        np.testing.assert_array_equal(batch.final[i], want["final"])
        # The stored state is the one the actor passed at the window's first step (zeros if padding).
        want_id = want["state"] if want["state"] is not None else None
        for layer_got, layer_want in zip(batch.state, state_of(np.array([want_id or 0]))):
            for got, ref_arr in zip(layer_got, layer_want):
                np.testing.assert_array_equal(got[i], ref_arr[0] if want_id is not None else 0)
        # Extra states: the actor's state at each offset where a later window of the episode starts its burn-in.
        for c, o in enumerate(offsets):
            assert batch.extra_state_mask[i, c] == (want["extra"][o] is not None), (o, want["extra"])
            value = want["extra"][o] if want["extra"][o] is not None else 0
            np.testing.assert_array_equal(batch.extra_states[c][0][0][i], value)
        trained.setdefault(lane, set()).update(want["trained"])
    # Every actionable step of every complete, fully stored episode is in the trained part of a live window.
    for lane, eps in enumerate(ref.episodes):
        oldest = len(ref.steps[lane]) - capacity
        for start, final in eps:
            if final is None or start < oldest:
                continue
            for pos in range(start, final):
                assert ref.steps[lane][pos]["id"] in trained.get(lane, set())
