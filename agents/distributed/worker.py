"""Ray actor workers: each steps a vector env with an :class:`agents.r2d2.Actor` and pushes its steps to
the replay server through a :class:`ServerWriter`."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import ray

from agents.distributed.config import DistributedConfig, ray_options
from agents.distributed.server import PushReply, Registration
from agents.envs import make_vector_env
from agents.r2d2.actor import Actor, apex_epsilons
from agents.r2d2.config import R2D2Config
from agents.seeds import RunSeeds
from burnin._checks import check_int

__all__ = ["ActorWorker", "ServerWriter", "spawn_workers"]


class ServerWriter:
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
                np.array(observation, self.config.obs_dtype),
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
    left open, seeds its env and ε RNG from the run ``seed``, ``index`` and the incarnation
    (:meth:`agents.seeds.RunSeeds.worker`), and
    takes the latest published weights. Its rows get the Ape-X ε of global rows
    ``index · num_envs … (index + 1) · num_envs − 1`` of ``num_workers · num_envs``.
    """

    def __init__(
        self, config: R2D2Config, server_name: str, *, index: int, num_workers: int, seed: int = 0,
        options: DistributedConfig,
    ) -> None:  # fmt: skip
        check_int("index", index, minimum=0)
        check_int("num_workers", num_workers, minimum=index + 1)
        check_int("seed", seed, minimum=0)
        _limit_tf_threads(options.actor_threads)
        self.index = index
        self.owner = f"actor-{index}"
        # By name, not by handle: Ray warns it may fail to restart an actor whose constructor took a handle.
        self.server = server = ray.get_actor(server_name)
        self.push_every = options.push_every
        n = config.num_envs
        registration: Registration = ray.get(server.register.remote(self.owner, n))
        self.incarnation = registration.incarnation
        # Distinct for every (worker, incarnation), derived from the run seed.
        self.seed = RunSeeds(seed).worker(index, self.incarnation)
        epsilons = apex_epsilons(num_workers * n, base=config.epsilon_base, alpha=config.epsilon_alpha)[
            index * n : (index + 1) * n
        ]
        self.writer = ServerWriter(server, self.owner, registration, row_offset=index * n)
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


def spawn_workers(
    config: R2D2Config, options: DistributedConfig, server_names: str | list[str], *, seed: int = 0
) -> list[Any]:
    """Start ``options.num_actors`` :class:`ActorWorker` actors (restarted by Ray up to ``max_restarts`` times).

    ``server_names``: the replay server, or one per shard (worker ``i`` writes to
    shard ``options.shard_of(i)``). Each asks Ray for ``actor_cpus`` and
    ``actor_resources``: a custom resource that only some nodes have puts the
    workers there, and as many of them per node as it has units.
    """
    names = [server_names] if isinstance(server_names, str) else list(server_names)
    if len(names) != options.replay_shards:
        raise ValueError(f"server_names: expected {options.replay_shards} (one per shard), got {len(names)}")
    remote = ray.remote(ActorWorker).options(
        max_restarts=options.max_restarts,
        max_task_retries=0,
        max_concurrency=2,  # stats() answers while run() works
        **ray_options(options.actor_resources, cpus=options.actor_cpus),
    )
    n = options.num_actors
    return [
        remote.remote(config, names[options.shard_of(i)], index=i, num_workers=n, seed=seed, options=options)
        for i in range(n)
    ]
