"""SequenceReplay: R2D2 windows read by index from steps stored once per lane, with stored states and priorities."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from burnin._checks import check_int, fmt
from burnin.replay import kernels
from burnin.replay.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from burnin.replay.kernels import (
    C_PRIO,
    C_SAMPLEABLE,
    C_SAMPLES,
    C_STALE,
    C_STATES,
    LANE_EVICT_AT,
    LANE_OPEN,
    LANE_PENDING_FINAL,
    LANE_PENDING_TERM,
    LANE_POS,
    NEVER,
    NO_POS,
    WIN_GEN,
    WIN_LEFT,
    WIN_RIGHT,
    WIN_START,
    WIN_STATE,
    Gathered,
    Layout,
    Tables,
)
from burnin.replay.lanes import LaneRegistry, check_lanes
from burnin.replay.spec import (
    COUNTERS,
    RecurrentState,
    ReplayConfig,
    SequenceBatch,
    SequenceSpec,
    array_specs,
    check_array,
    check_keys,
    check_offsets,
    check_state_tree,
)
from burnin.replay.testing import check_tables, live_keys
from burnin.sumtree import SumTree, tree_find

__all__ = ["SequenceReplay"]


class SequenceReplay:
    """Prioritised replay of overlapping R2D2 windows over steps stored once, in lanes.

    The full specification (lanes, the step convention of :meth:`add`, how
    episodes are cut into windows, eviction, keys, threads) is in
    ``docs/replay.md``. In short: one lane per environment row; :meth:`add` once
    per ``env.step`` with the observation the action was chosen on and the
    recurrent state before it; windows become sampleable as they complete and are
    drawn with probability ∝ priority**alpha; every public method is thread-safe
    and all-or-nothing.
    """

    def __init__(
        self,
        spec: SequenceSpec,
        *,
        num_lanes: int,
        lane_capacity: int,
        obs_shape: tuple[int, ...],
        obs_dtype: Any = np.float32,
        state_shapes: tuple[tuple[tuple[int, ...], ...], ...],
        state_dtype: Any = np.float32,
        alpha: float = 0.9,
        beta: float = 0.6,
        windows_per_lane: int | None = None,
        keep_actor_states: bool = False,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        config = ReplayConfig(
            spec=spec,
            num_lanes=num_lanes,
            lane_capacity=lane_capacity,
            obs_shape=obs_shape,
            obs_dtype=obs_dtype,
            state_shapes=state_shapes,
            state_dtype=state_dtype,
            alpha=alpha,
            beta=beta,
            windows_per_lane=windows_per_lane,
            keep_actor_states=keep_actor_states,
        )
        if seed is not None and rng is not None:
            raise ValueError("seed, rng: expected at most one of them, got both")
        if rng is not None:
            if not isinstance(rng, np.random.Generator):
                raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
            generator = rng
        else:
            if seed is not None:
                check_int("seed", seed, minimum=0)
            generator = np.random.default_rng(seed)
        specs = array_specs(config)
        del specs["tree"]
        arrays = {name: np.zeros(shape, dtype=dtype) for name, (shape, dtype) in specs.items()}
        arrays["state_pos"][:] = NO_POS
        arrays["state_owner"][:] = -1
        arrays["lanes"][:, LANE_EVICT_AT] = NEVER
        tree = SumTree(config.num_lanes * config.windows_per_lane)
        self._setup(config, generator, arrays, tree, max_priority=1.0, registry={})

    def _setup(
        self,
        config: ReplayConfig,
        rng: np.random.Generator,
        arrays: dict[str, np.ndarray],
        tree: SumTree,
        *,
        max_priority: float,
        registry: dict[str, list[int]],
    ) -> None:
        """Attach the arrays, the sum-tree, and the flat views and sizes the kernels index."""
        spec = config.spec
        self._config = config
        self._spec = spec
        self._rng = rng
        self._lock = threading.Lock()
        nl, cap, spl = config.num_lanes, config.lane_capacity, config.state_slots_per_lane
        self._cap, self._wpl, self._spl = cap, config.windows_per_lane, spl
        self._num_slots = nl * self._wpl
        self._obs_size = math.prod(config.obs_shape)
        self._tree = tree
        self._registry = LaneRegistry(nl, registry)
        self._arrays = arrays
        self._layout = Layout.of(config, fanout=tree.fanout)
        self._tables = Tables(
            lanes=arrays["lanes"],
            windows=arrays["windows"],
            alive=arrays["window_alive"],
            action=arrays["step_action"].reshape(-1),
            reward=arrays["step_reward"].reshape(-1),
            flags=arrays["step_flags"].reshape(-1),
            observation=arrays["step_observation"].reshape(-1),
            state_pos=arrays["state_pos"].reshape(-1),
            state_owner=arrays["state_owner"].reshape(-1),
            tree=tree.nodes,
            tree_offsets=tree.offsets,
            counters=arrays["counters"],
        )
        # Short names for the tables read outside the kernels.
        self._lt, self._win, self._alive = arrays["lanes"], arrays["windows"], arrays["window_alive"]
        self._counters, self._spos = arrays["counters"], self._tables.state_pos
        self._obs_flat = arrays["step_observation"].reshape(nl * cap, *config.obs_shape)
        self._states_flat = self._flat_states(arrays, "state")
        self._actor_states_flat = (
            self._flat_states(arrays, "actor_state") if config.keep_actor_states else None
        )
        self._set_max_priority(max_priority)
        # Scratch for add, reused under the lock: lanes are distinct, so n <= num_lanes.
        self._rows_buf = np.empty(nl, dtype=np.int64)
        self._flat_buf = np.empty(nl, dtype=np.int64)
        self._sslot_buf = np.empty(nl, dtype=np.int64)

    def _flat_states(self, arrays: dict[str, np.ndarray], prefix: str) -> tuple[tuple[np.ndarray, ...], ...]:
        rows = self._config.num_lanes * self._spl
        return tuple(
            tuple(arrays[f"{prefix}_{i}_{j}"].reshape(rows, *shape) for j, shape in enumerate(layer))
            for i, layer in enumerate(self._config.state_shapes)
        )

    def _set_max_priority(self, value: float) -> None:
        self._max_priority = float(value)
        self._new_leaf = self._max_priority**self._config.alpha

    # -- properties -----------------------------------------------------------------------

    @property
    def spec(self) -> SequenceSpec:
        """How episodes are cut into windows."""
        return self._spec

    @property
    def config(self) -> ReplayConfig:
        """The full layout: spec, sizes, dtypes, exponents."""
        return self._config

    @property
    def num_lanes(self) -> int:
        """Number of lanes."""
        return self._config.num_lanes

    @property
    def lane_capacity(self) -> int:
        """Steps kept per lane."""
        return self._cap

    @property
    def num_sampleable(self) -> int:
        """Windows that :meth:`sample` can return now."""
        return int(self._counters[C_SAMPLEABLE])

    @property
    def num_steps(self) -> int:
        """Steps stored now, over all lanes (final observations included)."""
        return int(np.minimum(self._lt[:, LANE_POS], self._cap).sum())

    @property
    def stale_updates(self) -> int:
        """Priority updates ignored because their window had been evicted or replaced."""
        return int(self._counters[C_STALE])

    @property
    def registered_lanes(self) -> dict[str, np.ndarray]:
        """Owner -> lane ids handed out by :meth:`register_lanes`."""
        with self._lock:
            return self._registry.as_arrays()

    def nbytes(self) -> int:
        """Total bytes of all arrays the buffer holds: steps, states, window and lane tables, sum-tree."""
        return sum(a.nbytes for a in self._arrays.values()) + self._tree.nbytes

    def stats(self) -> dict[str, Any]:
        """Counters and sizes, as plain Python numbers."""
        with self._lock:
            out: dict[str, Any] = {name: int(v) for name, v in zip(COUNTERS, self._counters)}
            out.update(
                num_steps=self.num_steps,
                num_lanes=self.num_lanes,
                lane_capacity=self._cap,
                windows_per_lane=self._wpl,
                state_slots_per_lane=self._spl,
                open_episodes=int(self._lt[:, LANE_OPEN].sum()),
                registered_lanes=self._registry.num_registered(),
                max_priority=self._max_priority,
                total_priority=self._tree.total(),
                nbytes=self.nbytes(),
            )
        return out

    # -- writing --------------------------------------------------------------------------

    def add(
        self,
        lanes: Any,
        *,
        observation: Any,
        action: Any,
        reward: Any,
        terminated: Any,
        truncated: Any,
        states: RecurrentState | None = None,
    ) -> None:
        """Store one environment step for each of ``lanes`` (the step convention: ``docs/replay.md``).

        Args:
            lanes: int ``[n]``, distinct lane ids.
            observation: ``[n, *obs_shape]``, the observation the action was chosen on.
            action: int ``[n]``, the action taken on it.
            reward: ``[n]``, the reward of that action.
            terminated: bool ``[n]``: the action ended the episode by termination.
            truncated: bool ``[n]``: the action ended the episode by truncation.
            states: the recurrent state before ``observation``, arrays ``[n, *shape]``
                per layer and array; ``None`` when ``state_shapes=()``.
        """
        cfg = self._config
        lanes = check_lanes(lanes, self.num_lanes)
        n = lanes.size
        obs = check_array("observation", observation, (n, *cfg.obs_shape), cfg.obs_dtype)
        act = check_array("action", action, (n,), np.dtype(np.int32)).astype(np.int32, copy=False)
        rew = check_array("reward", reward, (n,), np.dtype(np.float32)).astype(np.float32, copy=False)
        term = check_array("terminated", terminated, (n,), np.dtype(np.bool_))
        trunc = check_array("truncated", truncated, (n,), np.dtype(np.bool_))
        st = check_state_tree(cfg, "states", states, n)
        if n == 0:
            return
        with self._lock:
            bad, m = kernels.plan_add(lanes, term | trunc, self._lt, self._layout, self._rows_buf)
            if bad:
                ending = self._lt[lanes, LANE_PENDING_FINAL].astype(bool) & (term | trunc)
                raise ValueError(
                    f"terminated/truncated: lanes {fmt(lanes[ending])} are storing the final observation "
                    "of their episode (their previous add ended it), so both flags must be False there"
                )
            rows = self._rows_buf[:m].copy()
            _check_kept_states(st, rows, lanes)
            # Nothing raises from here on.
            kept = kernels.add_steps(
                lanes, act, rew, term, trunc, self._tables, self._layout, self._new_leaf,
                self._flat_buf, self._sslot_buf,
            )  # fmt: skip
            assert kept == m
            self._obs_flat[self._flat_buf[:n]] = obs
            if m:
                slots = self._sslot_buf[:m]
                for buffers, layer in zip(self._states_flat, st):
                    for buf, arr in zip(buffers, layer):
                        buf[slots] = arr[rows]
                for buffers, layer in zip(self._actor_states_flat or (), st):
                    for buf, arr in zip(buffers, layer):
                        buf[slots] = arr[rows]

    def close_lanes(self, lanes: Any) -> None:
        """End the open episode of each lane cleanly, e.g. when its writer goes away.

        If the lane's last step terminated the episode (its final observation not
        yet stored), a zero final observation is stored: a terminated episode
        never bootstraps from it, so the terminating transition is kept whole.
        Otherwise the last stored step becomes the final observation of a
        truncated episode (its action and reward are dropped; the step before it
        now bootstraps with discount 1). Either way the episode's remaining
        windows become sampleable, and the next :meth:`add` for the lane starts a
        new episode, so no window ever spans the gap. Lanes without an open
        episode are left alone.
        """
        lanes = check_lanes(lanes, self.num_lanes)
        with self._lock:
            self._close(lanes)

    def _close(self, lanes: np.ndarray) -> None:
        lt = self._lt
        pending_term = (
            (lt[lanes, LANE_OPEN] != 0)
            & (lt[lanes, LANE_PENDING_FINAL] != 0)
            & (lt[lanes, LANE_PENDING_TERM] != 0)
        )
        if pending_term.any():
            # A terminated episode never bootstraps from its final observation (discount 0):
            # store a zero one, so that the terminating transition and its reward are kept.
            ends = lanes[pending_term]
            n = ends.size
            no = np.zeros(n, np.bool_)
            kept = kernels.add_steps(
                ends, np.zeros(n, np.int32), np.zeros(n, np.float32), no, no, self._tables, self._layout,
                self._new_leaf, self._flat_buf, self._sslot_buf,
            )  # fmt: skip
            assert kept == 0  # a final observation never starts a window, so it keeps no state
            self._obs_flat[self._flat_buf[:n]] = 0
        kernels.close_lanes(lanes, self._tables, self._layout, self._new_leaf)

    def register_lanes(self, owner: str, count: int) -> np.ndarray:
        """Lane ids for a writer named ``owner``: ``count`` lanes never written to nor registered before.

        Registering the same owner again (e.g. a restarted remote actor) returns
        the same lanes and closes their open episodes (see :meth:`close_lanes`),
        so the new writer starts clean. Returns int64 ``[count]``.
        """
        if not isinstance(owner, str) or not owner:
            raise TypeError(f"owner: expected a non-empty str, got {type(owner).__name__} {owner!r}")
        count = check_int("count", count, minimum=1)
        with self._lock:
            held = self._registry.lanes_of(owner)
            if held is None:
                return self._registry.assign(owner, count, written=self._lt[:, LANE_POS] > 0)
            self._registry.check_count(owner, held, count)
            self._close(held)
            return held

    # -- sampling and updates --------------------------------------------------------------

    def sample(self, batch_size: int, *, extra_state_offsets: Sequence[int] = ()) -> SequenceBatch:
        """Draw ``batch_size`` windows with probability ∝ priority**alpha, with replacement.

        ``extra_state_offsets``: window steps (multiples of ``period`` in ``[0,
        length)``) at which to also return the stored state, e.g. to measure ΔQ
        against a recomputed state; each is the burn-in start of a later window
        of the same episode. Where that state is not stored (padding, past the
        episode end, or evicted) it is zeros and ``extra_state_mask`` is False.
        Raises ``ValueError`` when nothing is sampleable yet.
        """
        batch = check_int("batch_size", batch_size, minimum=1)
        offsets = check_offsets(self._spec, "extra_state_offsets", extra_state_offsets, minimum=0)
        with self._lock:
            if self._counters[C_SAMPLEABLE] == 0:
                raise ValueError("sample: no window is sampleable yet (add more steps, or end an episode)")
            total = self._tree.total()
            if not total > 0:
                raise ValueError("sample: every sampleable window has priority 0")
            slots = np.empty(batch, dtype=np.int64)
            tree = self._tree
            tree_find(tree.nodes, tree.offsets, tree.fanout, self._rng.random(batch) * total, slots)
            prob = tree.nodes[slots] / total
            n_windows = int(self._counters[C_SAMPLEABLE])
            parts = self._gather(slots, offsets)
            self._counters[C_SAMPLES] += 1
        weights = (n_windows * prob) ** -self._config.beta
        weights = (weights / weights.max()).astype(np.float32)
        return SequenceBatch(probabilities=prob, weights=weights, **parts)

    def _gather(self, slots: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
        """Materialise the live windows in ``slots``: every field of a SequenceBatch but the draw's."""
        cfg = self._config
        B, L, K = slots.size, self._spec.length, offsets.size
        out = Gathered.allocate(B, L, K, self._obs_size, cfg.obs_dtype)
        kernels.gather(slots, offsets, self._tables, self._layout, out)
        srow, spad, xrow, xok = out.state_row, out.state_pad, out.extra_row, out.extra_ok
        state = self._read_states(srow, spad)
        extra = tuple(self._read_states(xrow[:, c], ~xok[:, c]) for c in range(K))
        actor = self._actor_states_flat is not None
        return {
            "observation": out.observation.reshape(B, L, *cfg.obs_shape),
            "action": out.action,
            "reward": out.reward,
            "discount": out.discount,
            "prev_action": out.prev_action,
            "prev_reward": out.prev_reward,
            "state": state,
            "mask": out.mask,
            "learn_mask": out.learn_mask,
            "final": out.final_code >= 1,
            "terminal": out.final_code == 2,
            "keys": out.keys,
            "extra_states": extra,
            "extra_state_mask": xok,
            "actor_state": self._read_states(srow, spad, actor=True) if actor else state,
            "extra_actor_states": (
                tuple(self._read_states(xrow[:, c], ~xok[:, c], actor=True) for c in range(K))
                if actor
                else extra
            ),
        }

    def _read_states(self, rows: np.ndarray, zero: np.ndarray, *, actor: bool = False) -> RecurrentState:
        any_zero = bool(zero.any())
        out = []
        for buffers in self._actor_states_flat if actor else self._states_flat:
            arrays = []
            for buf in buffers:
                arr = buf[rows]
                if any_zero:
                    arr[zero] = 0
                arrays.append(arr)
            out.append(tuple(arrays))
        return tuple(out)

    def _live(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of ``keys`` and whether each key still names the window in its slot."""
        slots = keys % self._num_slots
        live = self._alive[slots] & (self._win[slots, WIN_GEN] == keys // self._num_slots)
        return slots, live

    def update_priorities(self, keys: Any, priorities: Any) -> None:
        """Set the priorities of sampled windows by key (finite, >= 0; for a repeated key the last wins).

        Keys whose window has since been evicted or replaced are ignored and
        counted in :attr:`stale_updates`. The running maximum, which new windows
        start with, follows the largest priority applied.
        """
        keys = check_keys("keys", keys)
        pr = np.asarray(priorities)
        if pr.dtype.kind not in "biuf":
            raise TypeError(f"priorities: expected real numbers, got dtype {pr.dtype}")
        if pr.shape != keys.shape:
            raise ValueError(f"priorities: expected shape {keys.shape} (like keys), got {pr.shape}")
        pr = pr.astype(np.float64)
        bad = ~np.isfinite(pr) | (pr < 0)
        if bad.any():
            raise ValueError(f"priorities: expected finite values >= 0, got {fmt(pr[bad])}")
        leaves = pr**self._config.alpha
        with self._lock:
            stale, largest = kernels.update_priorities(keys, pr, leaves, self._tables, self._layout)
            self._counters[C_STALE] += stale
            self._counters[C_PRIO] += keys.size - stale
            if largest > self._max_priority:
                self._set_max_priority(largest)

    def update_states(self, keys: Any, offsets: Sequence[int], states: Sequence[RecurrentState]) -> int:
        """Refresh stored states with ones the learner recomputed; returns how many stored states were written.

        For each offset ``o`` (a multiple of ``period`` in ``(0, length)``) and
        each live key, the stored state at window step ``o`` — the burn-in start
        of a later window of the same episode — is overwritten with the key's row
        of ``states[i]`` (``states`` is aligned with ``offsets``; arrays
        ``[B, *shape]``). Stale keys and offsets without a stored state are
        skipped. When several (key, offset) pairs name one stored state, the last
        in (offset, row) order wins.
        """
        keys = check_keys("keys", keys)
        offs = check_offsets(self._spec, "offsets", offsets, minimum=1)
        if isinstance(states, (str, bytes)) or not isinstance(states, Sequence) or len(states) != offs.size:
            got = f"{len(states)} entries" if isinstance(states, Sequence) else type(states).__name__
            raise ValueError(
                f"states: expected a sequence of {offs.size} RecurrentStates aligned with offsets, got {got}"
            )
        trees = [check_state_tree(self._config, f"states[{i}]", s, keys.size) for i, s in enumerate(states)]
        for i, tree in enumerate(trees):
            for a, layer in enumerate(tree):
                for j, arr in enumerate(layer):
                    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                        raise ValueError(f"states[{i}][{a}][{j}]: expected finite values, got NaN or inf")
        period, spl = self._spec.period, self._spl
        written = 0
        with self._lock:
            slots, live = self._live(keys)
            lane = slots // self._wpl
            win = self._win[slots]
            start, left, right, snum = (
                win[:, WIN_START],
                win[:, WIN_LEFT],
                win[:, WIN_RIGHT],
                win[:, WIN_STATE],
            )
            for o, tree in zip(offs, trees):
                srow = lane * spl + (snum + o // period) % spl
                ok = live & (o >= left) & (o < right) & (self._spos[srow] == start + o)
                if not ok.any():
                    continue
                rows = np.flatnonzero(ok)
                # Last row wins: numpy does not promise an order for repeated fancy writes.
                target, last = np.unique(srow[rows][::-1], return_index=True)
                rows = rows[::-1][last]
                for buffers, layer in zip(self._states_flat, tree):
                    for buf, arr in zip(buffers, layer):
                        buf[target] = arr[rows]
                written += target.size
            self._counters[C_STATES] += written
        return written

    # -- checkpoints (format: burnin.replay.checkpoint) -------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole buffer to ``path`` atomically: temp file in the same directory, fsync, rename, fsync dir.

        One ``.npz``-format file (no pickle) with steps, stored states, the
        sum-tree of priorities, the maximum priority, pointers, window and lane
        tables, lane registrations, counters and the RNG state. If writing fails,
        whatever was at ``path`` is untouched. The lock is held while writing, so
        the file is one consistent snapshot.
        """
        with self._lock:
            write_checkpoint(
                path,
                config=self._config,
                max_priority=self._max_priority,
                registry=self._registry.to_json(),
                rng=self._rng,
                tree=self._tree.state(),
                arrays=self._arrays,
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SequenceReplay:
        """Read a checkpoint written by :meth:`save`, without pickle.

        A truncated, corrupt or wrong-version file raises ``ValueError`` saying
        so; a missing file raises ``FileNotFoundError``.
        """
        ck: Checkpoint = read_checkpoint(path)
        self = cls.__new__(cls)
        self._setup(ck.config, ck.rng, ck.arrays, ck.tree, max_priority=ck.max_priority, registry=ck.registry)
        return self

    # -- for tests, debugging and diagnostics ------------------------------------------------

    def live_keys(self) -> np.ndarray:
        """Keys of every sampleable window, lane by lane, oldest first."""
        with self._lock:
            return live_keys(self._tables, self._layout)

    def windows(self, keys: Any, *, extra_state_offsets: Sequence[int] = ()) -> SequenceBatch:
        """The windows of live ``keys`` as a batch (probabilities from current priorities, weights 1)."""
        keys = check_keys("keys", keys)
        offsets = check_offsets(self._spec, "extra_state_offsets", extra_state_offsets, minimum=0)
        with self._lock:
            slots, live = self._live(keys)
            if not live.all():
                raise ValueError(f"keys: expected live window keys, got stale {fmt(keys[~live])}")
            prob = self._tree.nodes[slots] / self._tree.total()
            parts = self._gather(slots, offsets)
        return SequenceBatch(probabilities=prob, weights=np.ones(keys.size, np.float32), **parts)

    def check_invariants(self) -> None:
        """Assert that the bookkeeping is consistent (tests call this after every operation)."""
        with self._lock:
            check_tables(self._tables, self._layout)


def _check_kept_states(states: RecurrentState, rows: np.ndarray, lanes: np.ndarray) -> None:
    """ValueError if a state row that :meth:`SequenceReplay.add` keeps holds NaN or inf."""
    for i, layer in enumerate(states):
        for j, arr in enumerate(layer):
            if rows.size and arr.dtype.kind == "f" and not np.isfinite(arr[rows]).all():
                raise ValueError(
                    f"states[{i}][{j}]: expected finite values in the rows kept now "
                    f"(lanes {fmt(lanes[rows])}), got NaN or inf"
                )
