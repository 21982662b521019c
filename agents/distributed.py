"""R2D2 on Ray: actor workers, a replay server with a samples-per-insert rate limiter, and the learner's loop."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from agents.envs import MASKED_CARTPOLE_ID, make_vector_env
from agents.r2d2 import (
    CHECKPOINT_FORMAT,
    Actor,
    Learner,
    LoopStats,
    R2D2Config,
    _atomic_savez,
    _atomic_write_text,
    _field,
    apex_epsilons,
    make_replay,
    readable_checkpoint,
    write_checkpoint_dir,
)
from burnin._checks import check_int as _check_int
from burnin.rate_limiter import RateLimiter
from burnin.replay import ReplayConfig, SequenceBatch, SequenceReplay

__all__ = [
    "ActorWorker",
    "DistributedConfig",
    "DistributedLoop",
    "PushReply",
    "RateLimiter",
    "Registration",
    "RemoteReplay",
    "ReplayServer",
    "SampleReply",
    "init_ray",
    "spawn_server",
    "spawn_workers",
    "train_distributed",
]

log = logging.getLogger(__name__)

SERVER_FORMAT = 1
"""Format of ``server.json`` beside the replay checkpoint (limiter counters, incarnations, owners)."""


def _check_number(name: str, value: Any, *, low: float, strict: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        raise ValueError(f"{name}: expected a finite number {'>' if strict else '>='} {low}, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How a run is spread over Ray. The R2D2 hyper-parameters stay in :class:`R2D2Config`.

    Every worker runs ``config.num_envs`` envs, so the replay has
    ``num_actors · num_envs`` lanes sharing ``config.replay_capacity`` steps, and
    the Ape-X ε spans all ``num_actors · num_envs`` rows.
    """

    num_actors: int = _field(2, "Actor worker processes (Ray actors).")
    push_every: int = _field(
        8, "Actor steps a worker collects before sending them to the replay in one call."
    )
    weights_every: int | None = _field(
        None,
        "Learner updates between weight publishes; None: the single-process pull period in updates "
        "(actor_update_period · num_envs / env_steps_per_update).",
    )
    error_buffer: float | None = _field(
        None,
        "Rate-limiter slack in learner updates (Reverb's error_buffer); None: the updates' worth of "
        "one push from every worker, plus max(1, samples_per_insert).",
    )
    rate_limited: bool = _field(
        True, "Hold samples per insert at 1 / env_steps_per_update; False: inserts never block."
    )
    checkpoint_seconds: float = _field(
        60.0, "Seconds between replay checkpoints by the server (0: only on request)."
    )
    max_restarts: int = _field(8, "Times Ray restarts a dead actor worker.")
    wait_timeout: float = _field(
        0.5, "Seconds a blocked server call waits before returning, so that nothing can hang on shutdown."
    )
    actor_cpus: float = _field(1.0, "Ray CPUs reserved per actor worker.")
    actor_threads: int = _field(
        1, "TensorFlow intra- and inter-op threads in each worker (the actor net is small)."
    )
    env_id: str = _field(MASKED_CARTPOLE_ID, "Gymnasium env id every worker runs.")

    def __post_init__(self) -> None:
        for name in ("num_actors", "push_every", "actor_threads"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("max_restarts", self.max_restarts, minimum=0)
        if self.weights_every is not None:
            _check_int("weights_every", self.weights_every, minimum=1)
        if self.error_buffer is not None:
            _check_number("error_buffer", self.error_buffer, low=0.0, strict=True)
        if not isinstance(self.rate_limited, bool):
            raise TypeError(f"rate_limited: expected a bool, got {type(self.rate_limited).__name__}")
        _check_number("checkpoint_seconds", self.checkpoint_seconds, low=0.0, strict=False)
        _check_number("wait_timeout", self.wait_timeout, low=0.0, strict=True)
        _check_number("actor_cpus", self.actor_cpus, low=0.0, strict=False)
        if not isinstance(self.env_id, str) or not self.env_id:
            raise TypeError(f"env_id: expected a non-empty str, got {self.env_id!r}")

    def samples_per_insert(self, config: R2D2Config) -> float | None:
        """Learner batches per env step (None when not rate limited)."""
        return 1.0 / config.env_steps_per_update if self.rate_limited else None

    def push_env_steps(self, config: R2D2Config) -> int:
        """Most env steps one push can carry."""
        return self.push_every * config.num_envs

    def resolved_weights_every(self, config: R2D2Config) -> int:
        if self.weights_every is not None:
            return self.weights_every
        return max(1, round(config.actor_update_period * config.num_envs / config.env_steps_per_update))

    def resolved_error_buffer(self, config: R2D2Config) -> float:
        if self.error_buffer is not None:
            return float(self.error_buffer)
        spi = 1.0 / config.env_steps_per_update
        return self.num_actors * self.push_env_steps(config) * spi + max(1.0, spi)

    def check(self, config: R2D2Config) -> None:
        """Raise ValueError when these options cannot work with ``config``."""
        lanes = self.num_actors * config.num_envs
        if config.replay_capacity // lanes < config.sequence_spec.length + 1:
            raise ValueError(
                f"num_actors: {self.num_actors} workers × num_envs={config.num_envs} = {lanes} lanes leave "
                f"{config.replay_capacity // lanes} of replay_capacity={config.replay_capacity} steps per lane, "
                f"fewer than a window and the step before it ({config.sequence_spec.length + 1})"
            )
        spi = self.samples_per_insert(config)
        if spi is not None:
            RateLimiter(
                spi,
                min_size_to_sample=config.min_replay_steps,
                error_buffer=self.resolved_error_buffer(config),
            ).check_insert_size(self.push_env_steps(config))


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
    """

    def __init__(
        self,
        config: R2D2Config,
        options: DistributedConfig,
        *,
        obs_dim: int,
        num_actions: int,
        seed: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        options.check(config)
        self.config = config
        self.options = options
        self.num_lanes = options.num_actors * config.num_envs
        self.replay: SequenceReplay = make_replay(
            config, obs_dim, num_actions, num_lanes=self.num_lanes, seed=seed
        )
        self.limiter = RateLimiter(
            options.samples_per_insert(config),
            min_size_to_sample=config.min_replay_steps,
            error_buffer=options.resolved_error_buffer(config),
        )
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
        # Last observation written per lane, and the fault log: where a writer was replaced.
        self._last_obs = np.zeros((self.num_lanes, obs_dim), np.float32)
        self._faults: list[dict[str, Any]] = []
        self._awaiting_first: dict[int, tuple[int, int]] = {}  # lane -> (fault index, row in its lanes)
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
                        "last_observation": self._last_obs[lanes].copy(),
                        "first_observation": np.full_like(self._last_obs[lanes], np.nan),
                    }
                )
                for row, lane in enumerate(lanes):
                    self._awaiting_first[int(lane)] = (len(self._faults) - 1, row)
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
        _check_int("env_steps", env_steps, minimum=0)
        self.limiter.check_insert_size(env_steps)
        num = int(np.shape(steps["action"])[0])
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
            if num:
                self._note_observations(lanes, steps["observation"])
            self._lane_steps[lanes] += num
            self.limiter.insert(env_steps)
            stats = self._owners[owner]
            stats["env_steps"] += int(env_steps)
            stats["pushes"] += 1
            for row, ret, length in episodes:
                self._episodes.append((self.limiter.inserts, int(row), float(ret), int(length)))
            self._episodes_total += len(episodes)
            self._cond.notify_all()
            newer = self._weights is not None and self._weights[0] > weights_version
            return PushReply("ok", self._weights if newer else None)

    def _note_observations(self, lanes: np.ndarray, observation: Any) -> None:
        if self._awaiting_first:
            for row, lane in enumerate(lanes.tolist()):
                if lane in self._awaiting_first:
                    fault, at = self._awaiting_first.pop(lane)
                    self._faults[fault]["first_observation"][at] = observation[0][row]
        self._last_obs[lanes] = observation[-1]

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
        """One batch once the limiter allows a sample (waits at most ``timeout``, default wait_timeout)."""
        wait = self._wait if timeout is None else float(timeout)
        start = time.perf_counter()
        deadline = time.monotonic() + wait
        with self._cond:

            def ready() -> bool:
                return self.limiter.can_sample(1) and self.replay.num_sampleable > 0

            while not self._stopped and not ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._sample_blocked_s += time.perf_counter() - start
            batch = None
            if not self._stopped and ready():
                batch = self.replay.sample(batch_size, extra_state_offsets=extra_state_offsets)
                self.limiter.sample(1)
                self._cond.notify_all()
            episodes = tuple(self._episodes)
            self._episodes.clear()
            return SampleReply(
                batch, self.limiter.inserts, self.limiter.samples, episodes, self._episodes_total
            )

    def update_priorities(self, keys: Any, priorities: Any) -> None:
        self.replay.update_priorities(keys, priorities)

    def update_states(self, keys: Any, offsets: tuple[int, ...], states: Any) -> int:
        return self.replay.update_states(keys, offsets, states)

    def publish(self, version: int, weights: list) -> None:
        """Make ``weights`` (``[ObjectRef]`` of a weight list) the latest; older versions are ignored."""
        _check_int("version", version, minimum=0)
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
                "last_observation": self._last_obs.tolist(),
            }

            def fill(tmp: Path) -> None:
                self.replay.save(tmp / "replay.npz")
                _atomic_write_text(tmp / "server.json", json.dumps(meta, indent=1, sort_keys=True))

            write_checkpoint_dir(target, fill)
            self._saves += 1
            self._last_save_s = time.time()
        return str(target)

    def restore(self, directory: str | os.PathLike[str]) -> dict[str, int]:
        """Load a checkpoint written by :meth:`save` before any writer registers; returns its counters."""
        path = readable_checkpoint(Path(directory), "server.json")
        meta_path = path / "server.json"
        if not meta_path.is_file():
            raise ValueError(f"directory: {path} holds no server.json (not a replay server checkpoint)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != SERVER_FORMAT:
            raise ValueError(
                f"directory: server.json format {meta.get('format')!r}, expected {SERVER_FORMAT}"
            )
        replay = SequenceReplay.load(path / "replay.npz")
        if replay.config != self.replay.config:
            raise ValueError(
                f"directory: the replay in {path} has {replay.config.num_lanes} lanes of "
                f"{replay.config.lane_capacity} steps, but num_actors × num_envs = {self.num_lanes} lanes of "
                f"{self.replay.config.lane_capacity} (or another layout field) are configured now"
            )
        with self._cond:
            if self._registered_since_start:
                raise RuntimeError("restore: writers have already registered with this server")
            self.replay = replay
            self._lanes = replay.registered_lanes
            self.limiter.load_state_dict(meta["limiter"])
            self._incarnations = {str(k): int(v) for k, v in meta["incarnations"].items()}
            self._owners = {str(k): dict(v) for k, v in meta["owners"].items()}
            self._episodes_total = int(meta["episodes_total"])
            self._lane_steps = np.asarray(meta["lane_steps"], dtype=np.int64)
            self._last_obs = np.asarray(meta["last_observation"], dtype=np.float32).reshape(
                self._last_obs.shape
            )
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
        """Every re-registration of an owner whose lanes held data: where it happened and the
        last observation written before it and the first one after it, per lane (NaN if none yet)."""
        with self._cond:
            return [
                {
                    **f,
                    "last_observation": f["last_observation"].copy(),
                    "first_observation": f["first_observation"].copy(),
                }
                for f in self._faults
            ]

    def check_invariants(self) -> None:
        """Run the replay's own consistency checks (for tests; AssertionError on a broken invariant)."""
        with self._cond:
            self.replay.check_invariants()

    def windows(self) -> SequenceBatch:
        """Every sampleable window, lane by lane, as one batch (for tests and debugging: it can be large)."""
        with self._cond:
            return self.replay.windows(self.replay.live_keys())


# ------------------------------------------------------------------------------------- workers


class _ServerWriter:
    """The replay as the Actor inside a worker sees it: ``add`` collects steps, :meth:`push` sends them in one call."""

    def __init__(self, server: Any, owner: str, registration: Registration, *, row_offset: int) -> None:
        self.server = server
        self.owner = owner
        self.incarnation = registration.incarnation
        self.lanes = registration.lanes
        self.config = registration.replay_config  # Actor checks config.obs_shape
        self.row_offset = row_offset
        self._steps: list[tuple] = []
        self._episodes: list[tuple[int, float, int]] = []
        self._payload: tuple | None = None

    def add(
        self, lanes: Any, *, observation: Any, action: Any, reward: Any, terminated: Any, truncated: Any,
        states: Any = None,
    ) -> None:  # fmt: skip
        if not np.array_equal(lanes, self.lanes):
            raise ValueError(
                f"lanes: this writer holds lanes {self.lanes.tolist()}, got {np.asarray(lanes).tolist()}"
            )
        self._steps.append(
            (
                np.array(observation, np.float32),
                np.array(action, np.int32),
                np.array(reward, np.float32),
                np.array(terminated, bool),
                np.array(truncated, bool),
                None if states is None else tuple(tuple(np.array(a) for a in layer) for layer in states),
            )
        )

    def episodes_finished(self, finished: list[tuple[int, float, int]]) -> None:
        self._episodes.extend((self.row_offset + row, ret, length) for row, ret, length in finished)

    def push(self, *, env_steps: int, weights_version: int) -> ray.ObjectRef:
        """Send the collected steps (stacked over time) and finished episodes; returns the reply's ref."""
        if not self._steps:
            raise RuntimeError("push: no steps were collected since the last push")
        obs, act, rew, term, trunc, states = zip(*self._steps)
        steps = {
            "observation": np.stack(obs),
            "action": np.stack(act),
            "reward": np.stack(rew),
            "terminated": np.stack(term),
            "truncated": np.stack(trunc),
            "states": None
            if states[0] is None
            else tuple(
                tuple(np.stack([s[i][j] for s in states]) for j in range(len(layer)))
                for i, layer in enumerate(states[0])
            ),
        }
        self._payload = (steps, int(env_steps), tuple(self._episodes))
        self._steps, self._episodes = [], []
        return self.resend(weights_version=weights_version)

    def resend(self, *, weights_version: int) -> ray.ObjectRef:
        """Send the last push again (after a 'busy' reply: the server stored nothing of it)."""
        if self._payload is None:
            raise RuntimeError("resend: nothing was pushed yet")
        steps, env_steps, episodes = self._payload
        return self.server.add.remote(
            self.owner, self.incarnation, self.lanes, steps,
            env_steps=env_steps, episodes=episodes, weights_version=weights_version,
        )  # fmt: skip

    def close_lanes(self, lanes: Any) -> None:
        """Called by Actor.reset: the steps collected so far go out first, then the episodes are closed."""
        if self._steps:
            raise RuntimeError("close_lanes: steps are still buffered; push them first")
        status = ray.get(self.server.close_lanes.remote(self.owner, self.incarnation, self.lanes))
        if status != "ok":
            raise RuntimeError(f"close_lanes: the server answered {status!r} for {self.owner!r}")


def _limit_tf_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TensorFlow already ran ops in this process (in-process use): keep its pools


class ActorWorker:
    """One actor process: a vector env and a fixed-batch stateful network (:class:`agents.r2d2.Actor`).

    ``server_name`` names the :class:`ReplayServer` actor. On construction
    (also after Ray restarts it) it registers its lanes as
    ``actor-<index>``, which closes whatever episodes its previous incarnation
    left open, seeds its env from ``seed``, ``index`` and the incarnation, and
    takes the latest published weights. Its rows get the Ape-X ε of global rows
    ``index · num_envs … (index + 1) · num_envs − 1`` of ``num_workers · num_envs``.
    """

    def __init__(
        self, config: R2D2Config, server_name: str, *, index: int, num_workers: int, seed: int = 0,
        options: DistributedConfig,
    ) -> None:  # fmt: skip
        _check_int("index", index, minimum=0)
        _check_int("num_workers", num_workers, minimum=index + 1)
        _check_int("seed", seed, minimum=0)
        _limit_tf_threads(options.actor_threads)
        self.index = index
        self.owner = f"actor-{index}"
        # By name, not by handle: Ray warns it may fail to restart an actor whose constructor took a handle.
        self.server = server = ray.get_actor(server_name)
        self.push_every = options.push_every
        n = config.num_envs
        registration: Registration = ray.get(server.register.remote(self.owner, n))
        self.incarnation = registration.incarnation
        # Distinct for every (worker, incarnation); worker 0's first is seed + 1, like TrainLoop's actor.
        self.seed = seed + 1 + index + num_workers * self.incarnation
        epsilons = apex_epsilons(num_workers * n, base=config.epsilon_base, alpha=config.epsilon_alpha)[
            index * n : (index + 1) * n
        ]
        self.writer = _ServerWriter(server, self.owner, registration, row_offset=index * n)
        env = make_vector_env(n, env_id=options.env_id, seed=self.seed)
        self.actor = Actor(
            config, env, replay=self.writer, lanes=registration.lanes, seed=self.seed, epsilons=epsilons
        )
        self.weights_version = -1
        weights = registration.weights
        deadline = time.monotonic() + 120.0
        while weights is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.owner}: no weights were published within 120 s")
            time.sleep(0.05)
            weights = ray.get(server.weights.remote())
        self._take(weights)
        self.pushes = 0
        self.busy = 0
        self.push_wait_s = 0.0
        self.weight_pulls = 0
        self._pushed_env_steps = self.actor.env_steps

    def _take(self, weights: tuple[int, list]) -> None:
        version, (ref,) = weights
        self.actor.set_weights(ray.get(ref))
        self.weights_version = version

    def _settle(self, ref: ray.ObjectRef) -> str:
        while True:
            start = time.perf_counter()
            reply: PushReply = ray.get(ref)
            self.push_wait_s += time.perf_counter() - start
            if reply.status != "busy":
                break
            self.busy += 1
            ref = self.writer.resend(weights_version=self.weights_version)
        if reply.weights is not None:
            self._take(reply.weights)
            self.weight_pulls += 1
        return reply.status

    def _push(self) -> ray.ObjectRef:
        env_steps = self.actor.env_steps - self._pushed_env_steps
        self._pushed_env_steps = self.actor.env_steps
        self.pushes += 1
        return self.writer.push(env_steps=env_steps, weights_version=self.weights_version)

    def run(self, *, max_env_steps: int | None = None, max_seconds: float | None = None) -> dict[str, Any]:
        """Act and push until the server stops the run (or a limit is reached); returns :meth:`stats`.

        One push is in flight while the next ``push_every`` steps are taken; a
        push that the rate limiter holds back blocks the worker (backpressure).
        """
        start, first = time.perf_counter(), self.actor.env_steps
        pending: ray.ObjectRef | None = None
        status = "ok"
        while True:
            for _ in range(self.push_every):
                self.writer.episodes_finished(self.actor.step())
            if pending is not None:
                status = self._settle(pending)
                pending = None
                if status != "ok":
                    break
            pending = self._push()
            steps_done = max_env_steps is not None and self.actor.env_steps - first >= max_env_steps
            time_done = max_seconds is not None and time.perf_counter() - start >= max_seconds
            if steps_done or time_done:
                status = self._settle(pending)
                break
        result = self.stats()
        result.update(
            status=status, run_env_steps=self.actor.env_steps - first, run_s=time.perf_counter() - start
        )
        return result

    def stats(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "env_steps": self.actor.env_steps,
            "actor_steps": self.actor.steps,
            "episodes": self.actor.episodes,
            "pushes": self.pushes,
            "busy_replies": self.busy,
            "push_wait_s": self.push_wait_s,
            "weight_pulls": self.weight_pulls,
            "weights_version": self.weights_version,
        }


# ------------------------------------------------------------------------------------- learner


def spawn_server(
    config: R2D2Config,
    options: DistributedConfig,
    *,
    obs_dim: int,
    num_actions: int,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> tuple[str, Any]:
    """Start a :class:`ReplayServer` actor on this node under a fresh name; returns (name, handle).

    It stays beside the learner because batches are the heaviest traffic, and
    it takes ``num_actors + 4`` concurrent calls (each worker's push, the
    learner's sample, priorities, stats).
    """
    name = f"burnin-replay-{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = (
        ray.remote(ReplayServer)
        .options(
            name=name,
            num_cpus=0,
            max_concurrency=options.num_actors + 4,
            max_restarts=0,
            scheduling_strategy=here,
        )
        .remote(
            config, options, obs_dim=obs_dim, num_actions=num_actions, seed=seed,
            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        )
    )  # fmt: skip
    return name, handle


def spawn_workers(
    config: R2D2Config, options: DistributedConfig, server_name: str, *, seed: int = 0
) -> list[Any]:
    """Start ``options.num_actors`` :class:`ActorWorker` actors (restarted by Ray up to ``max_restarts`` times)."""
    remote = ray.remote(ActorWorker).options(
        num_cpus=options.actor_cpus,
        max_restarts=options.max_restarts,
        max_task_retries=0,
        max_concurrency=2,  # stats() answers while run() works
    )
    n = options.num_actors
    return [
        remote.remote(config, server_name, index=i, num_workers=n, seed=seed, options=options)
        for i in range(n)
    ]


class RemoteReplay:
    """The replay server as the learner sees it: priority and state writes go out without waiting.

    :meth:`Learner.update` calls :meth:`update_priorities` (and
    :meth:`update_states` with ``refresh_states``) as on a local replay. At most
    ``max_in_flight`` writes are outstanding; older ones are collected, which also
    surfaces any error they raised.
    """

    def __init__(self, server: Any, *, max_in_flight: int = 16) -> None:
        _check_int("max_in_flight", max_in_flight, minimum=1)
        self.server = server
        self.max_in_flight = max_in_flight
        self._in_flight: collections.deque = collections.deque()
        self._written_states = 0

    def _track(self, ref: ray.ObjectRef, counts: bool) -> None:
        self._in_flight.append((ref, counts))
        while len(self._in_flight) > self.max_in_flight:
            self._collect(*self._in_flight.popleft())

    def _collect(self, ref: ray.ObjectRef, counts: bool) -> None:
        result = ray.get(ref)
        if counts:
            self._written_states += int(result)

    def update_priorities(self, keys: Any, priorities: Any) -> None:
        self._track(self.server.update_priorities.remote(np.asarray(keys), np.asarray(priorities)), False)

    def update_states(self, keys: Any, offsets: Any, states: Any) -> int:
        """Send refreshed states; returns the states written by the calls that have finished since the last one."""
        self._track(self.server.update_states.remote(np.asarray(keys), tuple(offsets), states), True)
        while self._in_flight and ray.wait([self._in_flight[0][0]], timeout=0)[0]:  # finished ones
            self._collect(*self._in_flight.popleft())
        written, self._written_states = self._written_states, 0
        return written

    def drain(self) -> None:
        """Wait until every write sent so far has been applied."""
        while self._in_flight:
            self._collect(*self._in_flight.popleft())

    def stats(self) -> dict[str, Any]:
        return ray.get(self.server.stats.remote())


class DistributedLoop:
    """Distributed R2D2 behind :class:`agents.r2d2.TrainLoop`'s interface: the learner runs here, the
    actor workers and the replay server are Ray actors.

    :meth:`iterate` takes the batch prefetched by the previous call, asks the
    server for the next one (it is sampled while this update runs), updates,
    sends the priorities back without waiting, and publishes the weights
    (``ray.put`` once) every ``weights_every`` updates. Workers and server start
    at the first :meth:`iterate`, so :meth:`load` can restore first. A worker
    whose process dies is restarted by Ray and its ``run`` is resubmitted here.
    """

    def __init__(
        self,
        config: R2D2Config,
        options: DistributedConfig,
        *,
        seed: int = 0,
        replay_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not ray.is_initialized():
            raise RuntimeError("ray: not initialised; call agents.distributed.init_ray() or ray.init() first")
        _check_int("seed", seed, minimum=0)
        options.check(config)
        self.config = config
        self.options = options
        self.seed = int(seed)
        probe = make_vector_env(1, env_id=options.env_id)
        self.obs_dim = int(probe.single_observation_space.shape[0])
        self.num_actions = int(probe.single_action_space.n)
        probe.close()
        self.learner = Learner(config, self.obs_dim, self.num_actions, seed=seed)
        self.replay_dir = None if replay_dir is None else Path(replay_dir).absolute()
        self.server_name, self.server = spawn_server(
            config, options, obs_dim=self.obs_dim, num_actions=self.num_actions, seed=self.seed,
            checkpoint_dir=self.replay_dir,
        )  # fmt: skip
        self.replay = RemoteReplay(self.server)
        self.workers: list[Any] = []
        self.worker_losses = [0] * options.num_actors  # times a worker's process was lost
        self.worker_deaths = [
            0
        ] * options.num_actors  # ActorDiedError seen (restarts used up at > max_restarts)
        self._down: dict[int, ray.ObjectRef] = {}  # worker -> stats() probe while Ray restarts it
        self._runs: dict[int, ray.ObjectRef] = {}
        self._pending: ray.ObjectRef | None = None
        self._version = 0
        self._weights_ref: ray.ObjectRef | None = None
        self._weights_every = options.resolved_weights_every(config)
        self._next_health = 0.0
        self._started = False
        self._closed = False
        self.env_steps = 0
        self.episodes = 0

    # -- running ----------------------------------------------------------------------------

    def _publish(self) -> None:
        self._version += 1
        self._weights_ref = ray.put(self.learner.get_weights())
        self.server.publish.remote(self._version, [self._weights_ref])

    def _request(self) -> ray.ObjectRef:
        return self.server.sample.remote(
            self.config.batch_size, extra_state_offsets=self.learner.extra_state_offsets
        )

    def start(self) -> None:
        """Publish the weights, start the workers and ask for the first batch (iterate does this once)."""
        if self._started:
            return
        if self._closed:
            raise RuntimeError("start: this loop was closed")
        self._started = True
        self._publish()
        self.workers = spawn_workers(self.config, self.options, self.server_name, seed=self.seed)
        self._runs = {i: w.run.remote() for i, w in enumerate(self.workers)}
        self._pending = self._request()

    def iterate(self) -> LoopStats:
        """One learner update on the prefetched batch, or, when the limiter holds the learner back, none."""
        self.start()
        reply: SampleReply = ray.get(self._pending)
        self._pending = self._request()
        self.env_steps = reply.env_steps
        self.episodes = reply.episodes_total
        finished = [(row, ret, length) for _, row, ret, length in reply.episodes]
        step = None
        if reply.batch is not None:
            step = self.learner.update(reply.batch, replay=self.replay)
            if self.learner.num_updates % self._weights_every == 0:
                self._publish()
        if time.monotonic() >= self._next_health:
            self.check_workers()
        return LoopStats(self.env_steps, self.learner.num_updates, self.episodes, finished, step)

    def check_workers(self) -> None:
        """Resubmit ``run()`` to workers that Ray has restarted, and drop those gone for good.

        :meth:`iterate` calls it every second; call it yourself while not iterating for long.
        """
        self._next_health = time.monotonic() + 1.0
        if not self._runs:
            return
        self._check_restarts()
        index = {ref: i for i, ref in self._runs.items()}
        done, _ = ray.wait(list(index), num_returns=len(index), timeout=0)
        for ref in done:
            i = index[ref]
            try:
                result = ray.get(ref)
            except ray.exceptions.ActorUnavailableError as err:
                # The process died and Ray is restarting it; a call made meanwhile fails at once, so ask
                # again at every check until the new incarnation (registered afresh) takes it.
                if i not in self._down:
                    self.worker_losses[i] += 1
                    self._down[i] = self.workers[i].stats.remote()
                    log.warning("actor-%d died; Ray restarts it: %s", i, err)
                self._runs[i] = self.workers[i].run.remote()
            except ray.exceptions.ActorDiedError as err:  # a bug in the worker raises RayTaskError instead
                self.worker_deaths[i] += 1
                if self.worker_deaths[i] > self.options.max_restarts:
                    log.warning("actor-%d is gone for good: %s", i, err)
                    del self._runs[i]
                    if not self._runs:
                        raise RuntimeError("every actor worker died and used up its restarts") from err
                else:
                    self._runs[i] = self.workers[i].run.remote()
            else:
                raise RuntimeError(f"actor-{i}: run() ended with status {result['status']!r} during the run")

    def _check_restarts(self) -> None:
        """Probe each worker being restarted; say so when it answers again."""
        for i, probe in list(self._down.items()):
            if not ray.wait([probe], timeout=0)[0]:
                continue
            try:
                stats = ray.get(probe)
            except ray.exceptions.RayActorError:
                self._down[i] = self.workers[i].stats.remote()
            else:
                del self._down[i]
                log.warning("actor-%d is back as incarnation %d", i, stats["incarnation"])

    def worker_stats(self, *, timeout: float = 30.0) -> list[dict[str, Any] | None]:
        """Each worker's :meth:`ActorWorker.stats` (None for one that does not answer within ``timeout``)."""
        refs = [w.stats.remote() for w in self.workers]
        out: list[dict[str, Any] | None] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=timeout))
            except (ray.exceptions.RayError, TimeoutError):
                out.append(None)
        return out

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path:
        """Checkpoint the learner into ``directory`` (atomically) and the replay into ``replay_dir``.

        ``directory`` holds ``learner.npz`` and ``loop.json`` (with the config, so
        ``--eval`` reads it); ``loop.json`` names the replay directory relative to it.
        """
        if self.replay_dir is None:
            raise ValueError("replay_dir: this loop was built without one, so it cannot checkpoint")
        final = Path(directory).absolute()
        self.replay.drain()  # priorities already computed belong in the replay checkpoint
        ray.get(self.server.save.remote())
        meta = {
            "format": CHECKPOINT_FORMAT,
            "kind": "distributed",
            "config": self.config.to_json(),
            "options": dataclasses.asdict(self.options),
            "seed": self.seed,
            "replay_dir": os.path.relpath(self.replay_dir, final),
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "extra": extra or {},
        }
        state = self.learner.state_dict()

        def fill(tmp: Path) -> None:
            _atomic_savez(tmp / "learner.npz", state)
            _atomic_write_text(tmp / "loop.json", json.dumps(meta, indent=1, sort_keys=True))

        write_checkpoint_dir(final, fill)
        return final

    def load(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Restore the learner from ``directory`` and the replay server from the replay checkpoint it names.

        Must come before the first :meth:`iterate`. Workers then register again,
        which closes the episodes that were open at save time, so no window spans
        the gap. Returns the checkpoint's ``extra``.
        """
        if self._started:
            raise RuntimeError("load: the loop has started; load a checkpoint before the first iterate()")
        path = readable_checkpoint(Path(directory).absolute(), "loop.json")
        meta_path = path / "loop.json"
        if not meta_path.is_file():
            raise ValueError(f"checkpoint: {path} has no loop.json (not a complete checkpoint)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("kind") != "distributed":
            raise ValueError(
                f"checkpoint: {path} is format {meta.get('format')!r} kind {meta.get('kind')!r}, expected "
                f"format {CHECKPOINT_FORMAT} kind 'distributed' (a single-process checkpoint resumes without --actors)"
            )
        with np.load(path / "learner.npz", allow_pickle=False) as data:
            self.learner.load_state_dict({k: data[k] for k in data.files})
        restored = ray.get(self.server.restore.remote(str((path / meta["replay_dir"]).resolve())))
        self.env_steps = restored["env_steps"]
        self.episodes = restored["episodes"]
        return meta.get("extra", {})

    def close(self) -> None:
        """Stop the workers and the server and kill them (idempotent). Checkpoint first if you need one."""
        if self._closed:
            return
        self._closed = True
        try:
            ray.get(self.server.stop.remote(), timeout=30)
        except ray.exceptions.RayError as err:
            log.warning("replay server did not stop cleanly: %s", err)
        if self._runs:
            # Workers see 'stopped' at their next push; give them a moment to return.
            ray.wait(
                list(self._runs.values()),
                num_returns=len(self._runs),
                timeout=4 * self.options.wait_timeout + 5,
            )
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        ray.kill(self.server, no_restart=True)
        self._runs = {}

    def report(self) -> dict[str, Any]:
        """Workers and server figures for the run summary."""
        return {
            "options": dataclasses.asdict(self.options),
            "weights_every": self._weights_every,
            "weights_published": self._version,
            "worker_losses": list(self.worker_losses),
            "worker_deaths": list(self.worker_deaths),
            "workers": self.worker_stats(),
        }


# ---------------------------------------------------------------------------------------- CLI


def init_ray(address: str = "", *, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address``, or start a local one; True when this call started Ray (so we shut it down).

    A local cluster gets ``num_cpus`` logical CPUs and no dashboard. Worker
    output is forwarded to this terminal (errors and tracebacks matter), with
    TensorFlow's C++ logging quietened the same way as here.
    """
    if ray.is_initialized():
        return False
    if num_cpus is not None:
        _check_int("num_cpus", num_cpus, minimum=1)
    env_vars = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    common = dict(log_to_driver=True, logging_level=logging.WARNING, runtime_env={"env_vars": env_vars})
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **common)
    return True


def train_distributed(args: Any, config: R2D2Config) -> dict[str, Any]:
    """``python -m agents.cartpole --actors N``: :func:`agents.cartpole.run_training` on a :class:`DistributedLoop`.

    Outputs as the single-process run, in RUN_DIR/NAME: the learner checkpoint
    in ``checkpoint/`` and the replay server's in ``replay/`` (every
    ``checkpoint_seconds`` too); ``--resume`` reloads both.
    """
    from agents.cartpole import (
        _json_default,
        interrupt_on_sigterm,
        run_dir,
        run_training,
        seed_everything,
    )

    options = DistributedConfig(num_actors=args.actors)
    options.check(config)
    out_dir = run_dir(args, config)
    seed_everything(args.seed, deterministic=args.deterministic)
    local_cpus = max(os.cpu_count() or 1, math.ceil(args.actors * options.actor_cpus))
    started = init_ray(args.address, num_cpus=None if args.address else local_cpus)
    interrupt_on_sigterm()  # ray.init installs its own SIGTERM handler, which exits without a checkpoint
    loop: DistributedLoop | None = None
    try:
        loop = DistributedLoop(config, options, seed=args.seed, replay_dir=out_dir / "replay")
        title = f"R2D2 on masked CartPole ({config.core}, {args.actors} Ray actors, seed {args.seed})"
        summary = run_training(args, config, loop, out_dir=out_dir, title=title)
        summary["distributed"] = loop.report()
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
        return summary
    finally:
        if loop is not None:
            loop.close()
        if started:
            ray.shutdown()
