"""The replay server: one SequenceReplay behind a samples-per-insert rate limiter, for Ray actor workers
and the learner; with its own atomic checkpoints."""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from agents.distributed.config import DistributedConfig
from agents.distributed.server_meta import check_server_meta
from agents.r2d2.checkpoint import (
    CheckpointError,
    read_json,
    read_replay,
    remove_stale_temp_dirs,
    write_checkpoint_dir,
)
from agents.r2d2.config import R2D2Config
from agents.r2d2.loop import make_replay
from agents.spaces import ObservationEncoding
from burnin._checks import check_int
from burnin._io import atomic_write_text, readable_dir
from burnin.rate_limiter import RateLimiter
from burnin.replay import ReplayConfig, SequenceBatch, SequenceReplay

__all__ = ["SERVER_FORMAT", "PushReply", "Registration", "ReplayServer", "SampleReply"]

log = logging.getLogger(__name__)

SERVER_FORMAT = 1
"""Format of ``server.json`` beside the replay checkpoint (limiter counters, incarnations, owners)."""


class Registration(NamedTuple):
    """What :meth:`ReplayServer.register` hands a worker."""

    lanes: np.ndarray
    incarnation: int
    """0 for the first registration of an owner, +1 for each later one (a restart or a resume)."""
    replay_config: ReplayConfig
    weights: tuple[int, list] | None
    """(version, [ObjectRef of the weight list]) of the latest publish, or None."""


class PushReply(NamedTuple):
    """Answer to :meth:`ReplayServer.add`."""

    status: str
    """'ok'; 'busy' (rate limited for wait_timeout: send the same steps again); 'stale' (a newer
    incarnation of this owner registered); 'stopped' (the run is over)."""
    weights: tuple[int, list] | None
    """Newer weights than the worker said it has, else None."""


class SampleReply(NamedTuple):
    """Answer to :meth:`ReplayServer.sample`."""

    batch: SequenceBatch | None
    """None when the limiter (or an empty replay) kept the learner waiting for wait_timeout."""
    env_steps: int
    samples: int
    episodes: tuple[tuple[int, int, float, int], ...]
    """(env steps when reported, global env row, return, length) of episodes finished since the last reply."""
    episodes_total: int


def _step_states(states: Any, t: int) -> Any:
    if states is None:
        return None
    return tuple(tuple(arr[t] for arr in layer) for layer in states)


class ReplayServer:
    """One :class:`SequenceReplay` behind a samples-per-insert rate limiter; meant to run as a threaded Ray actor.

    Writers register lanes under an owner name; a second registration of the
    same owner (a restarted worker) gets the same lanes, closes their open
    episodes (so no window spans the restart) and a new incarnation number, and
    steps still in flight from the old incarnation are refused ('stale'). One
    ``threading.Condition`` guards the limiter and the bookkeeping; blocked
    ``add`` and ``sample`` calls wait on it at most ``wait_timeout`` seconds and
    then return, so a stop or a dead caller never leaves a thread stuck.

    With ``checkpoint_dir``, a thread writes ``replay.npz`` and ``server.json``
    (limiter counters, incarnations, owners) there every ``checkpoint_seconds``,
    as one directory swapped in atomically; :meth:`save` does it on request.

    ``shard``: which of ``options.replay_shards`` shards this server is: it holds the
    lanes of that shard's workers, and its limiter counts windows
    (:meth:`DistributedConfig.limiter`).
    """

    def __init__(
        self,
        config: R2D2Config,
        options: DistributedConfig,
        *,
        observation: int | ObservationEncoding,
        row_state_shapes: tuple[tuple[tuple[int, ...], ...], ...],
        seed: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        shard: int = 0,
    ) -> None:
        options.check(config)
        check_int("shard", shard, minimum=0, maximum=options.replay_shards - 1)
        self.config = config
        self.options = options
        self.num_lanes = options.shard_lanes(config, shard)
        self.replay: SequenceReplay = make_replay(
            options.shard_config(config, shard),
            observation,
            row_state_shapes,
            num_lanes=self.num_lanes,
            seed=seed,
        )
        self.limiter: RateLimiter = options.limiter(config, shard)
        self._per_window = options.replay_shards > 1  # the limiter counts windows, not batches
        self._wait = float(options.wait_timeout)
        self._cond = threading.Condition()
        self._stopped = False
        self._incarnations: dict[str, int] = {}
        self._owners: dict[str, dict[str, Any]] = {}
        self._lanes: dict[str, np.ndarray] = {}  # the replay's registry, kept here: checked on every push
        self._registered_since_start: set[str] = set()
        self._episodes: collections.deque = collections.deque(maxlen=100_000)
        self._episodes_total = 0
        self._lane_steps = np.zeros(self.num_lanes, np.int64)
        # Where a writer was replaced (a restart) or came back after a resume, for stats().
        self._faults: list[dict[str, Any]] = []
        self._weights: tuple[int, list] | None = None
        self._sample_blocked_s = 0.0  # time the learner waited for the limiter (not sampling work)
        self._saves = 0
        self._last_save_s: float | None = None
        self._save_error: str | None = None
        self._checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self._stop_event = threading.Event()
        self._saver: threading.Thread | None = None

    # -- writers --------------------------------------------------------------------------

    def register(self, owner: str, count: int) -> Registration:
        """Lanes for ``owner`` (see :meth:`SequenceReplay.register_lanes`) and its incarnation number."""
        with self._cond:
            lanes = self.replay.register_lanes(owner, count)
            self._lanes[owner] = lanes
            # Timed checkpoints start with the first writer, never before a restore() could come,
            # so an empty replay never replaces the checkpoint a resumed run is reading.
            self._start_autosave()
            incarnation = self._incarnations.get(owner, -1) + 1
            self._incarnations[owner] = incarnation
            stats = self._owners.setdefault(
                owner, {"env_steps": 0, "pushes": 0, "busy": 0, "insert_blocked_s": 0.0, "registrations": 0}
            )
            stats["registrations"] += 1
            if self._lane_steps[lanes].any():
                kind = "restart" if owner in self._registered_since_start else "resume"
                self._faults.append(
                    {
                        "owner": owner,
                        "kind": kind,
                        "incarnation": incarnation,
                        "env_steps": self.limiter.inserts,
                        "lanes": lanes.tolist(),
                    }
                )
            self._registered_since_start.add(owner)
            # A push of the replaced incarnation may be waiting: wake it so it returns 'stale'.
            self._cond.notify_all()
            return Registration(lanes, incarnation, self.replay.config, self._weights)

    def _check_owner(self, owner: str, lanes: np.ndarray) -> None:
        held = self._lanes.get(owner)
        if held is None:
            raise ValueError(f"owner: {owner!r} has not registered lanes")
        if not np.array_equal(held, lanes):
            raise ValueError(f"lanes: owner {owner!r} holds lanes {held.tolist()}, got {lanes.tolist()}")

    def add(
        self,
        owner: str,
        incarnation: int,
        lanes: Any,
        steps: dict[str, Any],
        *,
        env_steps: int,
        episodes: tuple[tuple[int, float, int], ...] = (),
        weights_version: int = -1,
    ) -> PushReply:
        """Store ``T`` env steps of ``lanes`` in order, once the limiter allows ``env_steps`` more.

        ``steps`` holds ``observation [T, n, *obs]``, ``action``, ``reward``,
        ``terminated``, ``truncated`` ``[T, n]`` and ``states`` (per layer and array
        ``[T, n, *shape]``, or None), each step as :meth:`SequenceReplay.add` takes
        it. ``env_steps`` is how many of them are real transitions (the limiter's
        unit); ``episodes`` the (global row, return, length) of episodes they ended.
        """
        lanes = np.asarray(lanes, dtype=np.int64)
        check_int("env_steps", env_steps, minimum=0)
        self.limiter.check_insert_size(env_steps)
        start = time.perf_counter()
        deadline = time.monotonic() + self._wait
        with self._cond:
            while True:
                if self._stopped:
                    return PushReply("stopped", None)
                if self._incarnations.get(owner) != incarnation:
                    return PushReply("stale", None)
                if self.limiter.can_insert(env_steps):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._owners[owner]["busy"] += 1
                    self._owners[owner]["insert_blocked_s"] += time.perf_counter() - start
                    return PushReply("busy", None)
                self._cond.wait(remaining)
            self._owners[owner]["insert_blocked_s"] += time.perf_counter() - start
            self._check_owner(owner, lanes)
            self._store(owner, lanes, steps, env_steps, episodes)
            self._cond.notify_all()
            newer = self._weights is not None and self._weights[0] > weights_version
            return PushReply("ok", self._weights if newer else None)

    def _store(
        self, owner: str, lanes: np.ndarray, steps: dict[str, Any], env_steps: int, episodes: tuple
    ) -> None:
        """Add the pushed steps to the replay and count them (under the condition)."""
        num = int(np.shape(steps["action"])[0])
        for t in range(num):
            self.replay.add(
                lanes,
                observation=steps["observation"][t],
                action=steps["action"][t],
                reward=steps["reward"][t],
                terminated=steps["terminated"][t],
                truncated=steps["truncated"][t],
                states=_step_states(steps["states"], t),
            )
        self._lane_steps[lanes] += num
        self.limiter.insert(env_steps)
        stats = self._owners[owner]
        stats["env_steps"] += int(env_steps)
        stats["pushes"] += 1
        for row, ret, length in episodes:
            self._episodes.append((self.limiter.inserts, int(row), float(ret), int(length)))
        self._episodes_total += len(episodes)

    def close_lanes(self, owner: str, incarnation: int, lanes: Any) -> str:
        """Close the open episodes of ``lanes`` (the owner's); 'stale' if a newer incarnation registered."""
        lanes = np.asarray(lanes, dtype=np.int64)
        with self._cond:
            if self._incarnations.get(owner) != incarnation:
                return "stale"
            self._check_owner(owner, lanes)
            self.replay.close_lanes(lanes)
            return "ok"

    # -- learner --------------------------------------------------------------------------

    def sample(
        self, batch_size: int, *, extra_state_offsets: tuple[int, ...] = (), timeout: float | None = None
    ) -> SampleReply:
        """One batch once the limiter allows a sample (waits at most ``timeout``, default wait_timeout).

        A shard (see the class) may be asked for 0 windows: it answers at once, with its counters.
        """
        wait = self._wait if timeout is None else float(timeout)
        start = time.perf_counter()
        deadline = time.monotonic() + wait
        units = batch_size if self._per_window else 1
        with self._cond:

            def ready() -> bool:
                return self.limiter.can_sample(units) and self.replay.num_sampleable > 0

            while batch_size and not self._stopped and not ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._sample_blocked_s += time.perf_counter() - start
            batch = None
            if batch_size and not self._stopped and ready():
                batch = self.replay.sample(batch_size, extra_state_offsets=extra_state_offsets)
                self.limiter.sample(units)
                self._cond.notify_all()
            episodes = tuple(self._episodes)
            self._episodes.clear()
            return SampleReply(
                batch, self.limiter.inserts, self.limiter.samples, episodes, self._episodes_total
            )

    def total_priority(self) -> float:
        """Sum of priority ** alpha over the sampleable windows: a shard's weight in the learner's draws."""
        with self._cond:
            return float(self.replay.stats()["total_priority"]) if self.replay.num_sampleable else 0.0

    def update_priorities(self, keys: Any, priorities: Any) -> None:
        self.replay.update_priorities(keys, priorities)

    def update_states(self, keys: Any, offsets: tuple[int, ...], states: Any) -> int:
        return self.replay.update_states(keys, offsets, states)

    def publish(self, version: int, weights: list) -> None:
        """Make ``weights`` (``[ObjectRef]`` of a weight list) the latest; older versions are ignored."""
        check_int("version", version, minimum=0)
        with self._cond:
            if self._weights is None or version > self._weights[0]:
                self._weights = (int(version), list(weights))

    def weights(self) -> tuple[int, list] | None:
        with self._cond:
            return self._weights

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str] | None = None) -> str:
        """Write ``replay.npz`` and ``server.json`` into ``directory`` (default: checkpoint_dir), atomically.

        The condition is held throughout, so the replay, the limiter counters and
        the incarnations in the checkpoint describe one moment.
        """
        target = self._checkpoint_dir if directory is None else Path(directory)
        if target is None:
            raise ValueError("directory: this server has no checkpoint_dir, so a directory is required")
        with self._cond:
            meta = {
                "format": SERVER_FORMAT,
                "limiter": self.limiter.state_dict(),
                "incarnations": self._incarnations,
                "owners": self._owners,
                "episodes_total": self._episodes_total,
                "lane_steps": self._lane_steps.tolist(),
            }

            def fill(tmp: Path) -> None:
                self.replay.save(tmp / "replay.npz")
                atomic_write_text(tmp / "server.json", json.dumps(meta, indent=1, sort_keys=True))

            write_checkpoint_dir(target, fill, marker="server.json")
            self._saves += 1
            self._last_save_s = time.time()
        return str(target)

    def restore(self, directory: str | os.PathLike[str]) -> dict[str, int]:
        """Load a checkpoint written by :meth:`save` before any writer registers; returns its counters.

        All or nothing: ``server.json`` and ``replay.npz`` are read and checked
        first (a bad one is a :class:`CheckpointError` naming the file), then
        swapped in under the condition.
        """
        directory = Path(directory)
        remove_stale_temp_dirs(directory)
        path = readable_dir(directory, "server.json")
        if not (path / "server.json").is_file():
            raise CheckpointError(f"directory: {path} holds no server.json (not a replay server checkpoint)")
        file = path / "server.json"
        meta = read_json(file)
        version = meta.get("format")
        if type(version) is not int or version != SERVER_FORMAT:
            raise CheckpointError(f"checkpoint {file}: format {version!r}, expected {SERVER_FORMAT}")
        replay = read_replay(path / "replay.npz")
        if replay.config != self.replay.config:
            raise CheckpointError(
                f"directory: the replay in {path} has {replay.config.num_lanes} lanes of "
                f"{replay.config.lane_capacity} steps, but num_actors × num_envs = {self.num_lanes} lanes of "
                f"{self.replay.config.lane_capacity} (or another layout field) are configured now"
            )
        state = check_server_meta(file, meta, sorted(replay.registered_lanes), self.num_lanes)
        with self._cond:
            if self._registered_since_start:
                raise RuntimeError("restore: writers have already registered with this server")
            self.replay = replay
            self._lanes = replay.registered_lanes
            self.limiter.load_state_dict(state["limiter"])
            self._incarnations = state["incarnations"]
            self._owners = state["owners"]
            self._episodes_total = state["episodes_total"]
            self._lane_steps = state["lane_steps"]
            return {
                "env_steps": self.limiter.inserts,
                "samples": self.limiter.samples,
                "episodes": self._episodes_total,
            }

    def _start_autosave(self) -> None:
        if self._saver is None and self._checkpoint_dir is not None and self.options.checkpoint_seconds > 0:
            self._saver = threading.Thread(target=self._autosave, name="replay-checkpoints", daemon=True)
            self._saver.start()

    def _autosave(self) -> None:
        while not self._stop_event.wait(self.options.checkpoint_seconds):
            try:
                self.save()
            except Exception as err:  # keep serving; the error shows in stats()
                self._save_error = f"{type(err).__name__}: {err}"
                log.error("replay checkpoint failed: %s", self._save_error)

    def stop(self) -> None:
        """Refuse further adds and samples, wake every waiting call, and stop the checkpoint thread."""
        self._stop_event.set()
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- introspection --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Replay counters, limiter counters, per-owner figures, checkpoints and restarts."""
        with self._cond:
            limiter = self.limiter.state_dict()
            limiter["measured_samples_per_insert"] = self.limiter.measured_samples_per_insert
            return {
                **self.replay.stats(),
                "limiter": limiter,
                "owners": {k: dict(v, incarnation=self._incarnations[k]) for k, v in self._owners.items()},
                "episodes_total": self._episodes_total,
                "sample_blocked_s": self._sample_blocked_s,
                "faults": [
                    {k: f[k] for k in ("owner", "kind", "incarnation", "env_steps")} for f in self._faults
                ],
                "checkpoints": self._saves,
                "last_checkpoint_time": self._last_save_s,
                "checkpoint_error": self._save_error,
                "weights_version": None if self._weights is None else self._weights[0],
            }

    def lane_steps(self) -> dict[str, list[int]]:
        """Steps written so far to each lane, by owner."""
        with self._cond:
            registry = self.replay.registered_lanes
            return {owner: self._lane_steps[lanes].tolist() for owner, lanes in registry.items()}

    def faults(self) -> list[dict[str, Any]]:
        """Every re-registration of an owner whose lanes held data: owner, kind ('restart' or 'resume'),
        incarnation, env steps inserted by then, and the lanes."""
        with self._cond:
            return [dict(f, lanes=list(f["lanes"])) for f in self._faults]

    def check_invariants(self) -> None:
        """Run the replay's own consistency checks (for tests; AssertionError on a broken invariant)."""
        with self._cond:
            self.replay.check_invariants()

    def windows(self) -> SequenceBatch:
        """Every sampleable window, lane by lane, as one batch (for tests and debugging: it can be large)."""
        with self._cond:
            return self.replay.windows(self.replay.live_keys())
