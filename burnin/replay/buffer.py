"""SequenceReplay: R2D2 windows read by index from steps stored once per lane, with stored states and priorities."""

from __future__ import annotations

import copy
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from burnin._checks import check_generator, check_int, fmt
from burnin.replay import invariants, kernels, listing
from burnin.replay.arrays import new_arrays, tables
from burnin.replay.checkpoint import Checkpoint, encode_json, read_checkpoint, write_checkpoint
from burnin.replay.gather import gather_windows
from burnin.replay.lanes import LaneRegistry, check_lanes, registry_problem
from burnin.replay.spec import (
    COUNTERS,
    RecurrentState,
    ReplayConfig,
    SequenceBatch,
    SequenceSpec,
    cast_states,
    check_array,
    check_keys,
    check_offsets,
    check_priorities,
    check_refresh,
    check_state_tree,
    renamed_state_shapes,
)
from burnin.replay.state_rows import flat_rows, refresh_rows, rows_2d, state_buffers
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
        row_state_shapes: tuple[tuple[tuple[int, ...], ...], ...] | None = None,
        state_dtype: Any = np.float32,
        alpha: float = 0.9,
        beta: float = 0.6,
        windows_per_lane: int | None = None,
        keep_actor_states: bool = False,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        state_shapes: tuple[tuple[tuple[int, ...], ...], ...] | None = None,
    ) -> None:
        """The arguments are the fields of :class:`ReplayConfig` (``row_state_shapes`` is required;
        ``state_shapes`` is its deprecated name), and the seed or generator of the sampling."""
        config = ReplayConfig(
            spec=spec,
            num_lanes=num_lanes,
            lane_capacity=lane_capacity,
            obs_shape=obs_shape,
            obs_dtype=obs_dtype,
            row_state_shapes=renamed_state_shapes(row_state_shapes, state_shapes),
            state_dtype=state_dtype,
            alpha=alpha,
            beta=beta,
            windows_per_lane=windows_per_lane,
            keep_actor_states=keep_actor_states,
        )
        generator = check_generator(seed, rng)
        tree = SumTree(config.num_lanes * config.windows_per_lane)
        self._setup(config, generator, new_arrays(config), tree, max_priority=1.0, registry={})

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
        self._layout = kernels.Layout.of(config, fanout=tree.fanout)
        with np.errstate(over="ignore"):
            self._prio = np.array([max_priority, np.float64(max_priority) ** config.alpha], dtype=np.float64)
        self._tables = tables(arrays, tree, self._prio)
        # Short names for the tables read outside the kernels.
        self._lt, self._win, self._alive = arrays["lanes"], arrays["windows"], arrays["window_alive"]
        self._counters, self._spos = arrays["counters"], self._tables.state_pos
        keep, dtype = config.keep_actor_states, config.state_dtype
        self._states_flat = state_buffers(arrays, "state", nl * spl, config.row_state_shapes)
        self._actor_states_flat = (
            state_buffers(arrays, "actor_state", nl * spl, config.row_state_shapes) if keep else None
        )
        # The same arrays as [rows, width] views, one tuple for the compiled commits (a zero-width
        # stand-in when nothing is stored, as the commits take one type of tuple).
        self._state_widths = [math.prod(shape) for layer in config.row_state_shapes for shape in layer]
        self._states_2d = rows_2d(self._states_flat, dtype)
        self._actor_states_2d = rows_2d(self._actor_states_flat, dtype) if keep else self._states_2d
        self._no_rows = self._rows(tuple((np.empty((0, w), dtype),) for w in self._state_widths), 0)
        # Scratch for add, reused under the lock: lanes are distinct, so n <= num_lanes.
        self._rows_buf = np.empty(nl, dtype=np.int64)
        self._flat_buf = np.empty(nl, dtype=np.int64)
        self._sslot_buf = np.empty(nl, dtype=np.int64)

    def _rows(self, tree: RecurrentState, m: int) -> tuple[np.ndarray, ...]:
        """A state tree of ``m`` rows, in the stored dtype, as the commits take it."""
        return flat_rows(tree, m, self._state_widths, self._config.state_dtype)

    @property
    def _max_priority(self) -> float:
        """The running maximum priority, which new windows start with (to the alpha)."""
        return float(self._prio[0])

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
        return int(self._counters[kernels.C_SAMPLEABLE])

    @property
    def num_steps(self) -> int:
        """Steps stored now, over all lanes (final observations included)."""
        return int(np.minimum(self._lt[:, kernels.LANE_POS], self._cap).sum())

    @property
    def stale_updates(self) -> int:
        """Priority updates ignored because their window had been evicted or replaced."""
        return int(self._counters[kernels.C_STALE])

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
                open_episodes=int(self._lt[:, kernels.LANE_OPEN].sum()),
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
                per layer and array; ``None`` when ``row_state_shapes=()``.
        """
        cfg = self._config
        lanes = check_lanes(lanes, self.num_lanes)
        n = lanes.size
        obs = check_array("observation", observation, (n, *cfg.obs_shape), cfg.obs_dtype)
        act = check_array("action", action, (n,), np.dtype(np.int32))
        rew = check_array("reward", reward, (n,), np.dtype(np.float32))
        term = check_array("terminated", terminated, (n,), np.dtype(np.bool_))
        trunc = check_array("truncated", truncated, (n,), np.dtype(np.bool_))
        st = check_state_tree(cfg, "states", states, n)
        if n == 0:
            return
        obs_rows = np.ascontiguousarray(obs).reshape(n, self._obs_size)
        with self._lock:
            bad, m = kernels.plan_add(lanes, term | trunc, self._lt, self._layout, self._rows_buf)
            if bad:
                ending = self._lt[lanes, kernels.LANE_PENDING_FINAL].astype(bool) & (term | trunc)
                raise ValueError(
                    f"terminated/truncated: lanes {fmt(lanes[ending])} are storing the final observation "
                    "of their episode (their previous add ended it), so both flags must be False there"
                )
            rows = self._rows_buf[:m].copy()
            # Only the state rows kept now must be finite, as stored.
            if m:
                picked = tuple(tuple(arr[rows] for arr in layer) for layer in st)
                where = {"rows": "the rows kept now, at lanes", "ids": lanes[rows]}
                kept = self._rows(cast_states("states", picked, cfg.state_dtype, **where), m)
            else:
                kept = self._no_rows
            # Every write in one compiled call: an interrupt finds the add either not begun or done.
            done = kernels.commit_add(
                lanes, act, rew, term, trunc, self._tables, self._layout, self._flat_buf, self._sslot_buf,
                obs_rows, self._states_2d, self._actor_states_2d, cfg.keep_actor_states, kept,
            )  # fmt: skip
            assert done == m

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
            kernels.commit_close(lanes, self._tables, self._layout, self._flat_buf, self._sslot_buf)

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
                return self._registry.assign(owner, count, written=self._lt[:, kernels.LANE_POS] > 0)
            self._registry.check_count(owner, held, count)
            kernels.commit_close(held, self._tables, self._layout, self._flat_buf, self._sslot_buf)
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
            if self._counters[kernels.C_SAMPLEABLE] == 0:
                raise ValueError("sample: no window is sampleable yet (add more steps, or end an episode)")
            total = self._tree.total()
            if not total > 0:
                raise ValueError("sample: every sampleable window has priority 0")
            # A sample changes the RNG and then the sample counter: if it is interrupted (or fails)
            # before the counter moved, the RNG is put back, so the draw never happened.
            rng_state = self._rng.bit_generator.state
            count = int(self._counters[kernels.C_SAMPLES])
            try:
                slots = np.empty(batch, dtype=np.int64)
                tree = self._tree
                tree_find(tree.nodes, tree.offsets, tree.fanout, self._rng.random(batch) * total, slots)
                leaves = tree.nodes[slots]
                parts = self._gather(slots, offsets)
                self._counters[kernels.C_SAMPLES] += 1
            except BaseException:
                if self._counters[kernels.C_SAMPLES] == count:
                    self._rng.bit_generator.state = rng_state
                raise
        prob = leaves / total
        # (N·P)**-beta / max over the batch = (P / min P)**-beta: no NaN even if a probability underflows.
        with np.errstate(over="ignore"):
            weights = ((leaves / leaves.min()) ** -self._config.beta).astype(np.float32)
        return SequenceBatch(probabilities=prob, weights=weights, **parts)

    def _gather(self, slots: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
        return gather_windows(
            slots,
            offsets,
            tables=self._tables,
            layout=self._layout,
            config=self._config,
            states=self._states_flat,
            actor_states=self._actor_states_flat,
        )

    def _live(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of ``keys`` and whether each key still names the window in its slot."""
        slots = keys % self._num_slots
        live = self._alive[slots] & (self._win[slots, kernels.WIN_GEN] == keys // self._num_slots)
        return slots, live

    def update_priorities(self, keys: Any, priorities: Any) -> None:
        """Set the priorities of sampled windows by key (finite, >= 0; for a repeated key the last wins).

        Keys whose window has since been evicted or replaced are ignored and
        counted in :attr:`stale_updates`. The running maximum, which new windows
        start with, follows the largest priority applied.
        """
        keys = check_keys("keys", keys)
        alpha = self._config.alpha
        pr, leaves = check_priorities(
            priorities, keys, alpha=alpha, total_limit=invariants.TOTAL_LIMIT, num_slots=self._num_slots
        )
        with self._lock:
            kernels.commit_priorities(keys, pr, leaves, alpha, self._tables, self._layout)

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
        offs, trees = check_refresh(self._config, offsets, states, keys.size)
        with self._lock:
            slots, live = self._live(keys)
            target, new_states, written = refresh_rows(
                self._win[slots],
                live,
                slots // self._wpl,
                offs,
                trees,
                self._spos,
                period=self._spec.period,
                state_slots=self._spl,
            )
            if not written:
                return 0
            new_rows = self._rows(new_states, target.size)
            # Every write in one compiled call: an interrupt finds the refresh either not begun or done.
            kernels.commit_states(self._states_2d, target, new_rows, self._counters, written)
        return written

    # -- checkpoints (format: burnin.replay.checkpoint) -------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole buffer (one consistent snapshot, no pickle) to ``path`` atomically: whatever was
        there is untouched if writing fails. Format and guarantees: ``docs/replay.md``."""
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
    def load(cls, path: str | os.PathLike[str], *, max_bytes: int | None = None) -> SequenceReplay:
        """Read a checkpoint written by :meth:`save` as untrusted input: headers checked before reading,
        every table's invariants after; a bad file raises ``ValueError`` naming it and what is wrong, a
        missing one ``FileNotFoundError``. ``max_bytes`` bounds the declared sizes (default: physical
        memory). Details: ``docs/replay.md``."""
        ck: Checkpoint = read_checkpoint(path, max_bytes=max_bytes)
        self = cls.__new__(cls)
        self._setup(ck.config, ck.rng, ck.arrays, ck.tree, max_priority=ck.max_priority, registry=ck.registry)
        problem = self._problem()
        if problem is not None:
            raise ValueError(f"checkpoint {path} is corrupt: {problem}")
        return self

    # -- for tests, debugging and diagnostics ------------------------------------------------

    def live_keys(self) -> np.ndarray:
        """Keys of every sampleable window, lane by lane, oldest first."""
        with self._lock:
            return listing.live_keys(self._tables, self._layout)

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
        """Assert that the bookkeeping is consistent and every stored value finite (tests call this after
        every operation; :meth:`load` refuses a checkpoint that breaks it)."""
        with self._lock:
            problem = self._problem()
        assert problem is None, problem

    def _problem(self) -> str | None:
        return (
            invariants.table_problem(self._tables, self._layout, alpha=self._config.alpha)
            or registry_problem(self._registry.to_json(), self.num_lanes)
            or invariants.data_problem(self._arrays)
        )

    def fingerprint(self) -> str:
        """A SHA-256 of everything the buffer holds: every array, the priorities, the running maximum,
        the lane registry, the configuration and the RNG state. Equal fingerprints, equal buffers."""
        with self._lock:
            meta = {
                "config": self._config.to_json(),
                "registry": self._registry.to_json(),
                "rng": encode_json(self._rng.bit_generator.state),
            }
            return listing.fingerprint(self._arrays, self._tree.nodes, self._prio, meta)

    def copy(self) -> SequenceReplay:
        """An independent copy of the buffer (arrays, priorities, registry and RNG state)."""
        with self._lock:
            arrays = {name: arr.copy() for name, arr in self._arrays.items()}
            tree = SumTree(self._num_slots, fanout=self._tree.fanout)
            tree.nodes[:] = self._tree.nodes
            rng = copy.deepcopy(self._rng)
            prio = self._prio.copy()
            registry = self._registry.to_json()
        new = type(self).__new__(type(self))
        new._setup(self._config, rng, arrays, tree, max_priority=float(prio[0]), registry=registry)
        new._prio[:] = prio
        return new
