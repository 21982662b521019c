"""Distributed R2D2 on Ray, behind the Loop protocol: the learner runs in this process; the actor workers
and the replay server are Ray actors."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from agents.distributed.config import DistributedConfig
from agents.distributed.server import ReplayServer, SampleReply
from agents.distributed.worker import spawn_workers
from agents.envs import make_vector_env
from agents.r2d2.actor import EnvError
from agents.r2d2.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_identity,
    meta_config,
    meta_field,
    read_meta,
    run_identity,
    write_checkpoint_dir,
    write_learner,
    write_meta,
)
from agents.r2d2.config import R2D2Config
from agents.r2d2.learner import Learner
from agents.r2d2.loop import LoopStats, check_overrides
from agents.seeds import RunSeeds
from agents.spaces import action_encoding, observation_encoding
from burnin._checks import check_int, check_str

__all__ = ["DistributedLoop", "RemoteReplay", "spawn_server", "worker_error"]

log = logging.getLogger(__name__)


def worker_error(index: int, err: ray.exceptions.RayTaskError) -> Exception:
    """What to raise for the error worker ``index``'s ``run()`` ended with: its env's :class:`EnvError` as one
    line naming the worker (Ray's own text holds both processes' tracebacks), anything else as Ray gave it."""
    if isinstance(err.cause, EnvError):
        return EnvError(f"actor-{index}: {err.cause}")
    return err


def spawn_server(
    config: R2D2Config,
    options: DistributedConfig,
    *,
    server_class: type[ReplayServer] = ReplayServer,
    **server_options: Any,
) -> tuple[str, Any]:
    """Start a ``server_class`` (:class:`ReplayServer`) actor on this node under a fresh name; returns (name, handle).

    ``server_options`` are the server's keyword arguments (``observation``, ``row_state_shapes``, ``seed``,
    ``checkpoint_dir``).

    It stays beside the learner because batches are the heaviest traffic, and
    it takes ``num_actors + 4`` concurrent calls (each worker's push, the
    learner's sample, priorities, stats).
    """
    name = f"burnin-replay-{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = (
        ray.remote(server_class)
        .options(
            name=name,
            num_cpus=0,
            max_concurrency=options.num_actors + 4,
            max_restarts=0,
            scheduling_strategy=here,
        )
        .remote(config, options, **server_options)
    )
    return name, handle


class RemoteReplay:
    """The replay server as the learner sees it: priority and state writes go out without waiting.

    :meth:`Learner.update` calls :meth:`update_priorities` (and
    :meth:`update_states` with ``refresh_states``) as on a local replay. At most
    ``max_in_flight`` writes are outstanding; older ones are collected, which also
    surfaces any error they raised.
    """

    def __init__(self, server: Any, *, max_in_flight: int = 16) -> None:
        check_int("max_in_flight", max_in_flight, minimum=1)
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
        server_class: type[ReplayServer] = ReplayServer,
    ) -> None:
        """``server_class``: the replay server to run (a subclass may record more, as the tests' does)."""
        if not ray.is_initialized():
            raise RuntimeError("ray: not initialised; call agents.distributed.init_ray() or ray.init() first")
        check_int("seed", seed, minimum=0)
        options.check(config)
        self.config = config
        self.options = options
        self.seed = int(seed)
        probe = make_vector_env(1, env_id=options.env_id)
        self.observation = observation_encoding(probe.single_observation_space)
        actions = action_encoding(probe.single_action_space)
        self.num_actions = actions.num_actions
        probe.close()
        self.identity = run_identity(
            env_id=options.env_id.rpartition(":")[2], observation=self.observation, actions=actions
        )
        self.seeds = RunSeeds(self.seed)
        self.learner = Learner(config, self.observation, self.num_actions, seed=self.seeds.weights)
        self.replay_dir = None if replay_dir is None else Path(replay_dir).absolute()
        self.server_name, self.server = spawn_server(
            config, options, observation=self.observation, row_state_shapes=self.learner.row_state_shapes,
            seed=self.seeds.replay, checkpoint_dir=None if self.replay_dir is None else str(self.replay_dir),
            server_class=server_class,
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
        self.loaded_from: Path | None = None

    # -- running ----------------------------------------------------------------------------

    def _publish(self) -> None:
        self._version += 1
        self._weights_ref = ray.put(self.learner.get_weights())
        self.server.publish.remote(self._version, [self._weights_ref])

    def _request(self) -> ray.ObjectRef:
        return self.server.sample.remote(
            self.config.batch_size, extra_state_offsets=self.learner.offsets.extra
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
            except ray.exceptions.RayTaskError as err:
                raise worker_error(i, err) from err
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
            "identity": self.identity,
            "replay_dir": os.path.relpath(self.replay_dir, final),
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "extra": extra or {},
        }
        state = self.learner.state_dict()

        def fill(tmp: Path) -> None:
            write_learner(tmp, state)
            write_meta(tmp, meta)

        write_checkpoint_dir(final, fill)
        return final

    def load(self, directory: str | os.PathLike[str], *, allow_mismatch: Any = ()) -> dict[str, Any]:
        """Restore the learner from ``directory`` and the replay server from the replay checkpoint it names.

        Must come before the first :meth:`iterate`. Workers then register again,
        which closes the episodes that were open at save time, so no window spans
        the gap. Returns the checkpoint's ``extra``. Everything is read and
        checked before anything changes (a bad file is a :class:`CheckpointError`
        naming it); :attr:`loaded_from` is the directory actually read. Another seed, env or layout is
        refused as :meth:`agents.r2d2.TrainLoop.load` refuses it (``allow_mismatch`` likewise).
        """
        if self._started:
            raise RuntimeError("load: the loop has started; load a checkpoint before the first iterate()")
        path, meta = read_meta(Path(directory).absolute())
        file = path / "loop.json"
        if meta.get("kind") != "distributed":
            raise CheckpointError(
                f"checkpoint {file}: kind {meta.get('kind')!r}, expected 'distributed' "
                "(a single-process checkpoint resumes without --actors)"
            )
        meta_config(file, meta, self.config)
        allow = check_overrides("allow_mismatch", allow_mismatch)
        check_identity(file, meta, seed=self.seed, identity=self.identity, allow=allow)
        replay_dir = meta_field(file, meta, "replay_dir", check_str, empty=False)
        extra = meta.get("extra", {})
        if not isinstance(extra, dict):
            raise CheckpointError(f"checkpoint {file}: extra: expected a JSON object, got {extra!r:.80}")
        learner = self.learner.read_checkpoint(path)
        try:
            restored = ray.get(self.server.restore.remote(str((path / replay_dir).resolve())))
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, CheckpointError):
                raise CheckpointError(str(err.cause)) from None
            raise
        self.learner.assign_state(learner)
        self.env_steps = restored["env_steps"]
        self.episodes = restored["episodes"]
        self.loaded_from = path
        return extra

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
