"""Distributed R2D2 on Ray, behind the Loop protocol: the actor workers and the replay server(s) are Ray
actors; the learner runs in this process or as a Ray actor of its own."""

from __future__ import annotations

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
from agents.distributed.learner_host import HostStep, LearnerHost, spawn_learner
from agents.distributed.remote import RemoteReplay
from agents.distributed.server import ReplayServer
from agents.distributed.worker import spawn_workers
from agents.envs import make_vector_env
from agents.r2d2.actor import EnvError
from agents.r2d2.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_identity,
    meta_config,
    meta_field,
    read_learner_arrays,
    read_meta,
    run_identity,
    write_checkpoint_dir,
    write_learner,
    write_meta,
)
from agents.r2d2.config import R2D2Config
from agents.r2d2.learner import Learner
from agents.r2d2.loop import LoopStats, check_overrides
from agents.r2d2.networks import row_state_shapes
from agents.seeds import Purpose, RunSeeds, derive_seed
from agents.spaces import action_encoding, observation_encoding
from burnin._checks import check_int, check_str

__all__ = [
    "DistributedLoop",
    "RemoteLearner",
    "SummaryReport",
    "spawn_server",
    "spawn_servers",
    "worker_error",
]

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
    ``checkpoint_dir``, ``shard``).

    It stays on the driver's node, which writes the run directory (its
    checkpoints go there); with the learner in the driver, batches, the
    heaviest traffic, stay on the node too. It takes ``num_actors + 4``
    concurrent calls (each worker's push, the learner's sample, priorities, stats).
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


def spawn_servers(
    config: R2D2Config,
    options: DistributedConfig,
    *,
    seed: int,
    checkpoint_dir: Path | None,
    **server_options: Any,
) -> list[tuple[str, Any]]:
    """The ``options.replay_shards`` servers of a run (:func:`spawn_server`); shard ``s`` checkpoints into
    ``checkpoint_dir/shard-s`` (one server: ``checkpoint_dir`` itself) and samples with its own seed."""
    shards = options.replay_shards
    out = []
    for s in range(shards):
        directory = None if checkpoint_dir is None else shard_dir(checkpoint_dir, s, shards)
        out.append(
            spawn_server(
                config,
                options,
                seed=seed if s == 0 else derive_seed(seed, Purpose.REPLAY, s),
                checkpoint_dir=None if directory is None else str(directory),
                shard=s,
                **server_options,
            )
        )
    return out


def shard_dir(replay_dir: Path, shard: int, num_shards: int) -> Path:
    """Where shard ``shard`` of ``num_shards`` checkpoints: ``replay_dir`` for one server, else ``shard-<s>`` in it."""
    return replay_dir if num_shards == 1 else replay_dir / f"shard-{shard}"


class RemoteLearner:
    """A learner running as a Ray actor (:class:`LearnerHost`), as the harness sees one: ``num_updates`` (as of
    the last step) and :meth:`get_weights` (fetched)."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.num_updates = 0

    def get_weights(self) -> list[np.ndarray]:
        return ray.get(self.host.get_weights.remote())


class DistributedLoop:
    """Distributed R2D2 behind :class:`agents.r2d2.TrainLoop`'s interface: the actor workers and the replay
    server(s) are Ray actors; the learner (:class:`LearnerHost`) runs here, or, with
    ``options.learner_resources``, as a Ray actor wherever those resources are.

    :meth:`iterate` is one :meth:`LearnerHost.step`: an update on the batch
    prefetched by the previous call while the next one is drawn, priorities
    sent back without waiting, the weights published (``ray.put`` once) every
    ``weights_every`` updates. Workers and servers start at the first
    :meth:`iterate`, so :meth:`load` can restore first. A worker whose process
    dies (or whose node does) is restarted by Ray and its ``run`` is resubmitted here.
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
        local = options.learner_resources is None
        learner = (
            Learner(config, self.observation, self.num_actions, seed=self.seeds.weights) if local else None
        )
        shapes = (
            learner.row_state_shapes
            if local
            else row_state_shapes(config.network(self.observation, self.num_actions))
        )
        self.replay_dir = None if replay_dir is None else Path(replay_dir).absolute()
        spawned = spawn_servers(
            config, options, observation=self.observation, row_state_shapes=shapes, seed=self.seeds.replay,
            checkpoint_dir=self.replay_dir, server_class=server_class,
        )  # fmt: skip
        self.server_names = [name for name, _ in spawned]
        self.servers = [handle for _, handle in spawned]
        self.server_name, self.server = spawned[0]
        host = dict(
            observation=self.observation, num_actions=self.num_actions, server_names=self.server_names
        )
        self.learner: Learner | RemoteLearner
        if local:
            self._host: Any = LearnerHost(config, options, seed=self.seed, learner=learner, **host)
            self.learner = learner
            self.replay = self._host.replay
        else:
            self._host = spawn_learner(config, options, seed=self.seed, **host)
            self.learner = RemoteLearner(self._host)
            self.replay = RemoteReplay(self.servers)  # figures and checkpoints; the learner draws its own
        self.workers: list[Any] = []
        self.worker_losses = [0] * options.num_actors  # times a worker's process was lost
        # ActorDiedError seen (restarts used up at > max_restarts)
        self.worker_deaths = [0] * options.num_actors
        self._down: dict[int, ray.ObjectRef] = {}  # worker -> stats() probe while Ray restarts it
        self._runs: dict[int, ray.ObjectRef] = {}
        self._next_health = 0.0
        self._started = False
        self._closed = False
        self.env_steps = 0
        self.episodes = 0
        self.loaded_from: Path | None = None

    @property
    def remote_learner(self) -> bool:
        """Whether the learner runs as a Ray actor (``options.learner_resources``) rather than here."""
        return isinstance(self.learner, RemoteLearner)

    def _on_host(self, method: str, *args: Any) -> Any:
        """Call a :class:`LearnerHost` method here, or on the learner actor (waiting for it)."""
        if self.remote_learner:
            return ray.get(getattr(self._host, method).remote(*args))
        return getattr(self._host, method)(*args)

    # -- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Publish the weights, ask for the first batch and start the workers (iterate does this once)."""
        if self._started:
            return
        if self._closed:
            raise RuntimeError("start: this loop was closed")
        self._started = True
        # A learner actor still starting (TensorFlow, the model) publishes while the workers start theirs.
        started = self._host.start.remote() if self.remote_learner else self._host.start()
        self.workers = spawn_workers(self.config, self.options, self.server_names, seed=self.seed)
        self._runs = {i: w.run.remote() for i, w in enumerate(self.workers)}
        if self.remote_learner:
            ray.get(started)

    def iterate(self) -> LoopStats:
        """One learner update on the prefetched batch, or, when the limiter holds the learner back, none."""
        self.start()
        out: HostStep = self._on_host("step")
        self.env_steps, self.episodes = out.env_steps, out.episodes
        if self.remote_learner:
            self.learner.num_updates = out.updates
        if time.monotonic() >= self._next_health:
            self.check_workers()
        return LoopStats(self.env_steps, out.updates, self.episodes, out.finished, out.step)

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
        Each replay shard writes its own checkpoint (``replay_dir/shard-<s>``). A
        learner running as a Ray actor sends its state here to be written.
        """
        if self.replay_dir is None:
            raise ValueError("replay_dir: this loop was built without one, so it cannot checkpoint")
        final = Path(directory).absolute()
        self._on_host("drain")  # priorities already computed belong in the replay checkpoint
        ray.get([server.save.remote() for server in self.servers])
        meta = {
            "format": CHECKPOINT_FORMAT,
            "kind": "distributed",
            "config": self.config.to_json(),
            "options": dataclasses.asdict(self.options),
            "seed": self.seed,
            "identity": self.identity,
            "replay_dir": os.path.relpath(self.replay_dir, final),
            "replay_shards": self.options.replay_shards,
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "extra": extra or {},
        }
        state = self._on_host("state_dict")

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
        shards = meta.get("replay_shards", 1)  # checkpoints from before sharding have one server
        if shards != self.options.replay_shards:
            raise CheckpointError(
                f"checkpoint {file}: replay_shards: its replay has {shards!r} shards, this run "
                f"{self.options.replay_shards}; resume with the same number of replay shards"
            )
        learner = self._read_learner(path)
        restored = []
        for s, server in enumerate(self.servers):
            where = shard_dir((path / replay_dir).resolve(), s, len(self.servers))
            try:
                restored.append(ray.get(server.restore.remote(str(where))))
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, CheckpointError):
                    raise CheckpointError(str(err.cause)) from None
                raise
        if self.remote_learner:
            self._on_host("assign_staged")
            self.learner.num_updates = self._on_host("num_updates")
        else:
            self.learner.assign_state(learner)
        self.env_steps = sum(r["env_steps"] for r in restored)
        self.episodes = sum(r["episodes"] for r in restored)
        self.loaded_from = path
        return extra

    def _read_learner(self, path: Path) -> dict[str, np.ndarray] | None:
        """The learner's arrays of checkpoint ``path``, read and checked (a remote learner keeps them staged)."""
        if not self.remote_learner:
            return self.learner.read_checkpoint(path)
        # Read here, where the run directory is; checked by the learner actor, which holds the model.
        arrays = read_learner_arrays(path, self._on_host("array_specs"))
        try:
            self._on_host("stage", arrays)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, (TypeError, ValueError)):
                raise CheckpointError(f"checkpoint {path / 'learner.npz'}: {err.cause}") from None
            raise
        return None

    def close(self) -> None:
        """Stop the workers, the servers and a learner actor, and kill them (idempotent). Checkpoint first if you
        need one."""
        if self._closed:
            return
        self._closed = True
        try:
            ray.get([server.stop.remote() for server in self.servers], timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as err:
            log.warning("replay server did not stop cleanly: %s", err)
        if self._runs:
            # Workers see 'stopped' at their next push; give them a moment to return.
            ray.wait(
                list(self._runs.values()),
                num_returns=len(self._runs),
                timeout=4 * self.options.wait_timeout + 5,
            )
        for actor in [*self.workers, *self.servers, *([self._host] if self.remote_learner else [])]:
            ray.kill(actor, no_restart=True)
        self._runs = {}

    def report(self) -> dict[str, Any]:
        """Workers, learner and server figures for the run summary."""
        try:
            learner = self._on_host("figures")
        except ray.exceptions.RayError as err:  # a learner actor that is gone: the summary is still written
            learner = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
        return {
            "options": dataclasses.asdict(self.options),
            "weights_every": self.options.resolved_weights_every(self.config),
            "weights_published": learner.get("weights_published"),
            "learner": learner,
            "worker_losses": list(self.worker_losses),
            "worker_deaths": list(self.worker_deaths),
            "workers": self.worker_stats(),
        }


class SummaryReport:
    """A run-harness hook that adds a :class:`DistributedLoop`'s figures (:meth:`DistributedLoop.report`:
    workers, restarts, where the learner ran) to the run summary."""

    def on_start(self, run: Any) -> None:
        pass

    def on_step(self, run: Any, stats: LoopStats) -> None:
        return None

    def on_end(self, run: Any, summary: dict[str, Any]) -> None:
        summary["distributed"] = run.loop.report()
