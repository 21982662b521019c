"""The true recurrent state of sampled windows: each window's episode replayed from its first step with the current network, and ΔQ against it."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from agents.r2d2.config import StateStrategy
from burnin.diagnostics import delta_q

__all__ = [
    "LaneLog",
    "Recorder",
    "SecondReading",
    "SecondReadingHook",
    "TrueStates",
    "pad_rows",
    "second_reading",
    "true_states",
]

UNKNOWN = -1
"""``LaneLog.episode_start`` of a step whose episode began before the recorder was installed."""


LOG_FIELDS = ("observation", "action", "reward", "final", "episode_start", "updates", "q", "token")


class LaneLog:
    """Every step one lane stored, in order: arrays valid up to ``len(log)`` (the lane position)."""

    def __init__(self, obs_shape: tuple[int, ...], obs_dtype: np.dtype, num_actions: int) -> None:
        self.n = 0
        self.observation = np.zeros((64, *obs_shape), obs_dtype)
        self.action = np.zeros(64, np.int32)
        self.reward = np.zeros(64, np.float32)
        self.final = np.zeros(64, bool)
        self.episode_start = np.zeros(64, np.int64)
        """Lane position of the first step of the step's episode (UNKNOWN: before the recorder)."""
        self.updates = np.zeros(64, np.int64)
        """Learner updates when the step was stored (the age of its stored state is measured from it)."""
        self.q = np.zeros((64, num_actions), np.float32)
        """The actor's Q-values on the step's observation."""
        self.token = np.zeros(64, np.int64)
        """A hash of what a sampled window shows of the step: observation, action, reward, final flag."""

    def __len__(self) -> int:
        return self.n

    def append(self, *, observation, action, reward, final, episode_start, updates, q) -> None:
        if self.n == len(self.token):  # amortised doubling: a run stores every step once
            for name in LOG_FIELDS:
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.zeros_like(old)]))
        i = self.n
        self.observation[i], self.action[i], self.reward[i] = observation, action, reward
        self.final[i], self.episode_start[i], self.updates[i], self.q[i] = final, episode_start, updates, q
        self.token[i] = step_token(self.observation[i], self.action[i], self.reward[i], final)
        self.n += 1


def step_token(observation: np.ndarray, action: Any, reward: Any, final: Any) -> int:
    """What identifies a stored step in a sampled window (the replay keeps no action or reward on a final step)."""
    return hash((np.ascontiguousarray(observation).tobytes(), int(action), float(reward), bool(final)))


class Recorder:
    """Keeps every step the actor of a :class:`agents.r2d2.TrainLoop` stores, per lane, and finds a sampled
    window in its lane by its steps.

    Install it before the loop's first step (or after a resume: the envs are reset
    then, which closes every lane's episode); steps of an episode that began
    before it are kept with an unknown episode start and never replayed. It
    wraps ``actor.act``, ``replay.add`` and ``replay.close_lanes`` of the loop's
    current replay. It keeps every step: memory grows with the run (about the
    bytes of an observation plus the Q-values per step).
    """

    def __init__(self, loop) -> None:
        actor, replay = loop.actor, loop.actor.replay
        self.loop = loop
        self.obs_dtype = np.dtype(replay.config.obs_dtype)
        shape = tuple(replay.config.obs_shape)
        self.logs = {int(lane): LaneLog(shape, self.obs_dtype, actor.num_actions) for lane in actor.lanes}
        # A fresh loop's first step of every lane starts an episode.
        self.fresh = dict.fromkeys(self.logs, loop.env_steps == 0)
        self.last_q = np.zeros((actor.num_envs, actor.num_actions), np.float32)
        act, add, close = actor.act, replay.add, replay.close_lanes

        def recording_act(**kw):
            q, actions, states = act(**kw)
            self.last_q = np.asarray(q)
            return q, actions, states

        def recording_add(lanes, **kw):
            add(lanes, **kw)  # first: a step the replay refuses is not recorded either
            self._record(actor, lanes, kw)

        def recording_close(lanes):
            close(lanes)
            for lane in np.atleast_1d(lanes):
                self.fresh[int(lane)] = True  # the next step starts an episode

        actor.act, replay.add, replay.close_lanes = recording_act, recording_add, recording_close

    def _record(self, actor, lanes, kw: dict[str, Any]) -> None:
        """Append the step ``replay.add`` just stored (its keyword arguments ``kw``) to each lane's log."""
        obs = np.asarray(kw["observation"], self.obs_dtype)
        updates = self.loop.learner.num_updates
        for row, lane in enumerate(np.asarray(lanes)):
            log, final = self.logs[int(lane)], bool(actor.final_pending[row])
            n = len(log)
            if self.fresh[int(lane)] or (n and log.final[n - 1]):
                start = n
            else:  # a lane that stored steps before the recorder began mid-episode
                start = log.episode_start[n - 1] if n else UNKNOWN
            self.fresh[int(lane)] = False
            log.append(
                observation=obs[row],
                action=0 if final else kw["action"][row],  # the replay keeps none on a final observation
                reward=0.0 if final else kw["reward"][row],
                final=final,
                episode_start=start,
                updates=updates,
                q=self.last_q[row],
            )

    def locate(self, batch, row: int) -> tuple[int, int] | None:
        """(lane, lane position of window step 0) of batch row ``row``, found by its valid steps; None if they
        occur nowhere or more than once in the recorded lanes."""
        valid = np.flatnonzero(batch.valid_t[row])
        if valid.size == 0:
            return None
        fields = (batch.observation[row], batch.action[row], batch.reward[row], batch.final[row])
        key = np.array([step_token(*(f[t] for f in fields)) for t in valid], np.int64)
        found = []
        for lane, log in self.logs.items():
            tokens = log.token[: len(log)]
            if len(tokens) < key.size:
                continue
            starts = np.flatnonzero(tokens[: len(tokens) - key.size + 1] == key[0])
            if starts.size:
                same = (tokens[starts[:, None] + np.arange(key.size)] == key).all(axis=1)
                found += [(lane, int(s) - int(valid[0])) for s in starts[same]]
        return found[0] if len(found) == 1 else None

    def episode_start(self, lane: int, pos: int) -> int | None:
        """Lane position of the first step of the episode holding lane position ``pos``; None if unknown."""
        start = int(self.logs[lane].episode_start[pos])
        return None if start == UNKNOWN else start


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows`` (a runner's batch size is fixed)."""
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


class TrueStates(NamedTuple):
    """Sampled windows replayed from their episode's first step with the current parameters."""

    rows: np.ndarray
    """The batch rows replayed (those found in the recorder with a known episode start)."""
    where: tuple[tuple[int, int, int], ...]
    """Per replayed row: (lane, episode start, window start), lane positions."""
    state: tuple[tuple[np.ndarray, ...], ...]
    """The true state before window step 0, arrays ``[len(rows), ...]``."""
    q: np.ndarray
    """``[len(rows), L, A]`` Q-values over the whole window from the true state."""


def true_states(learner, recorder: Recorder, batch, rows: Any) -> TrueStates:
    """Replay the episode of each of ``rows`` (at most the learner's batch size) from its first step to the
    window's start with the learner's current online network, then run the window from there.

    The prefix runs in chunks of the window length (left-padded and masked, so a
    shorter prefix keeps the zero state until its first step), so the compiled
    pass is traced for one shape only, whatever the episode length.
    """
    kept, where = [], []
    for r in np.asarray(rows, int):
        found = recorder.locate(batch, r)
        if found is None:
            continue
        lane, start = found
        # A left-padded window starts before its episode: its first valid step names the episode.
        first = recorder.episode_start(lane, start + int(np.argmax(batch.valid_t[r])))
        if first is not None:
            kept.append(int(r))
            where.append((lane, first, start))
    runner, B, L = learner.probe_runner, learner.config.batch_size, learner.spec.length
    n = len(kept)
    if n == 0:
        return TrueStates(np.zeros(0, int), (), (), np.zeros((0, L, learner.num_actions), np.float32))
    state = None
    for inputs, mask in _prefix_chunks(learner, recorder, where, B, L):
        state = runner(inputs, state, mask=mask).final_state
    idx = np.array(kept)
    window = [pad_rows(getattr(batch, f)[idx], B) for f in ("observation", "prev_action", "prev_reward")]
    out = runner(learner.model_inputs(*window), state, mask=pad_rows(batch.valid_t[idx], B))
    if state is None:  # every window starts at or before its episode's first step: the true state is zero
        true_state = tuple(
            tuple(np.zeros((n, *s), np.float32) for s in layer) for layer in learner.row_state_shapes
        )
    else:
        true_state = tuple(tuple(np.asarray(a)[:n] for a in layer) for layer in state)
    return TrueStates(idx, tuple(where), true_state, out.outputs.numpy()[:n])


def _prefix_chunks(learner, recorder: Recorder, where, B: int, L: int):
    """The model inputs and masks of the episodes' steps before each window, ``L`` steps at a time."""
    lengths = [max(start - first, 0) for _, first, start in where]
    chunks = math.ceil(max(lengths) / L)
    if chunks == 0:
        return
    P = chunks * L
    log0 = next(iter(recorder.logs.values()))
    obs = np.zeros((B, P, *log0.observation.shape[1:]), log0.observation.dtype)
    prev_action, prev_reward = np.zeros((B, P), np.int32), np.zeros((B, P), np.float32)
    mask = np.zeros((B, P), bool)
    for i, ((lane, first, _), k) in enumerate(zip(where, lengths)):
        if k == 0:
            continue
        log = recorder.logs[lane]
        obs[i, P - k :] = log.observation[first : first + k]
        # The first step of an episode sees no previous action or reward (the actor's convention).
        prev_action[i, P - k + 1 :] = log.action[first : first + k - 1]
        prev_reward[i, P - k + 1 :] = log.reward[first : first + k - 1]
        mask[i, P - k :] = True
    for c in range(chunks):
        s = slice(c * L, (c + 1) * L)
        yield learner.model_inputs(obs[:, s], prev_action[:, s], prev_reward[:, s]), mask[:, s]


class SecondReading(NamedTuple):
    """ΔQ with the true state as reference, mean over the windows that start mid-episode."""

    first: float
    """At the first trained step (NaN unless burn_in is a multiple of period, like the learner's)."""
    last: float
    """At the last window step with a stored state (each row's largest valid ΔQ offset)."""
    rows: int
    """Windows measured: sampled, starting mid-episode, and found in the recorder."""
    mid_episode: float
    """Share of the sampled windows whose step 0 lies mid-episode (the others start from the true state)."""

    def to_json(self) -> dict[str, float]:
        return {
            "true_delta_q_first": self.first,
            "true_delta_q_last": self.last,
            "true_delta_q_rows": self.rows,
            "true_delta_q_mid_episode": self.mid_episode,
        }


def second_reading(loop, recorder: Recorder, *, batches: int, rng: np.random.Generator) -> SecondReading:
    """The paper's second reading of ΔQ on ``batches`` batches of live windows drawn uniformly with ``rng``
    (not the replay's sampler, whose RNG would change the training).

    ΔQ = ‖q(ĥ_t; θ) − q(h*_t; θ)‖₂ / |max_{a,j} q(ĥ_j; θ)_a| is the learner's formula
    (:func:`burnin.diagnostics.delta_q`, the max over the trained steps and the
    tail) with ĥ the learner's own start (its strategy's stored or zero state
    at step 0, then its burn-in) and the reference h* the *true* state: the
    episode replayed from its first step with the current θ
    (:func:`true_states`). It is measured at the learner's ΔQ offsets. A window
    whose step 0 is its episode's first step (or before it) starts from the true
    state under both strategies, so it is left out and counted in ``mid_episode``.
    """
    learner = loop.learner
    firsts, lasts, sampled, mid = [], [], 0, 0
    keys = loop.replay.live_keys()
    for _ in range(batches if learner.offsets.delta_q and keys.size else 0):
        pick = rng.choice(keys, size=min(learner.config.batch_size, keys.size), replace=False)
        batch = loop.replay.windows(pick)
        truth = true_states(learner, recorder, batch, np.arange(len(pick)))
        inside = np.array([first < start for _, first, start in truth.where], bool)
        sampled, mid = sampled + len(pick), mid + int(inside.sum())
        if inside.any():
            first, last = _delta_q_to_true(learner, batch, truth.rows[inside], truth.q[inside])
            firsts.extend(first)
            lasts.extend(last)
    return SecondReading(
        first=float(np.mean(firsts)) if firsts else float("nan"),
        last=float(np.mean(lasts)) if lasts else float("nan"),
        rows=len(lasts),
        mid_episode=mid / sampled if sampled else float("nan"),
    )


def _delta_q_to_true(learner, batch, rows: np.ndarray, q_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``rows``, ΔQ of the learner's start against the true state's Q ``q_true`` at the first
    trained step (where it is a ΔQ offset) and at the row's last valid ΔQ offset."""
    offsets, b = learner.offsets.delta_q, learner.spec.burn_in
    q_hat, mask = _learner_q(learner, batch, rows), batch.valid_t[rows]
    per_offset = np.stack(
        [delta_q(q_hat[:, o], q_true[:, o], q_hat[:, b:], mask[:, b:]).numpy() for o in offsets], 1
    )  # [rows, offsets]
    valid = mask[:, list(offsets)] & np.isfinite(per_offset)
    first = per_offset[valid[:, 0], 0] if offsets[0] == b else np.zeros(0)
    has = valid.any(1)
    last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], 1)  # each row's last valid offset
    return first, per_offset[has, last[has]]


def _learner_q(learner, batch, rows: np.ndarray) -> np.ndarray:
    """``[len(rows), L, A]`` Q over the window from the learner's start: its strategy's state at step 0, no
    gradient (the burn-in changes nothing in the forward pass)."""
    B = learner.config.batch_size
    window = [pad_rows(getattr(batch, f)[rows], B) for f in ("observation", "prev_action", "prev_reward")]
    start = None
    if learner.config.strategy == StateStrategy.STORED:
        start = tuple(tuple(pad_rows(a[rows], B) for a in layer) for layer in batch.state)
    out = learner.probe_runner(learner.model_inputs(*window), start, mask=pad_rows(batch.valid_t[rows], B))
    return out.outputs.numpy()[: len(rows)]


class SecondReadingHook:
    """A run hook (:mod:`agents.experiment`): the second reading at every evaluation, added to that
    evaluation's entry of the history (``true_delta_q_first``, ``..._last``, ``..._rows``, ``..._mid_episode``).

    Put it after the :class:`agents.experiment.Evaluation` hook. It records the
    actor's steps from the start (:class:`Recorder`), so it needs a
    single-process loop with a recurrent network; on any other loop it does nothing.
    """

    def __init__(self, *, batches: int, seed: int) -> None:
        self.batches, self.rng = batches, np.random.default_rng(seed)
        self.recorder: Recorder | None = None

    def on_start(self, run) -> None:
        loop = run.loop
        if hasattr(loop, "actor") and loop.learner.network_config.recurrent:
            self.recorder = Recorder(loop)
        self.seen = len(run.history.evals)

    def on_step(self, run, stats) -> None:
        evals = run.history.evals
        if self.recorder is not None and len(evals) > self.seen:
            reading = second_reading(run.loop, self.recorder, batches=self.batches, rng=self.rng)
            evals[-1].update(reading.to_json())
        self.seen = len(evals)

    def on_end(self, run, summary: dict[str, Any]) -> None:
        pass
