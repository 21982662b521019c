"""The learner's side of a distributed run: a Learner fed by the replay server(s), in the driver or as a Ray actor placed by its resources."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import ray

from agents.distributed.config import DistributedConfig, ray_options
from agents.distributed.remote import RemoteReplay
from agents.r2d2.config import R2D2Config
from agents.r2d2.learner import Learner, LearnerStep
from agents.seeds import Purpose, RunSeeds, derive_seed
from agents.spaces import ObservationEncoding

__all__ = ["HostStep", "LearnerHost", "spawn_learner"]


class HostStep(NamedTuple):
    """What one :meth:`LearnerHost.step` tells the loop."""

    env_steps: int
    episodes: int
    """Episodes finished in the whole run."""
    finished: list[tuple[int, float, int]]
    """(global env row, return, length) of episodes reported since the last step."""
    step: LearnerStep | None
    """The update, or None when the limiter held the learner back."""
    updates: int


class LearnerHost:
    """A :class:`Learner` and the replay servers it reads and writes (:class:`RemoteReplay`).

    :meth:`step` takes the batch requested by the previous step, requests the
    next one (drawn while this update runs), updates, sends the priorities back
    without waiting, and publishes the weights (one ``ray.put``, its ref handed
    to every server) every ``weights_every`` updates. It runs in the driver, or
    as a Ray actor (:func:`spawn_learner`) wherever its resources are: its state
    then comes back to the driver for checkpoints (:meth:`state_dict`) and goes
    out to it on a resume (:meth:`stage`, :meth:`assign_staged`).
    """

    def __init__(
        self,
        config: R2D2Config,
        options: DistributedConfig,
        *,
        observation: int | ObservationEncoding,
        num_actions: int,
        server_names: list[str],
        seed: int = 0,
        learner: Learner | None = None,
    ) -> None:
        """``learner``: one built already (the driver's); else one is built from the run ``seed``."""
        self.config = config
        self.learner = learner or Learner(config, observation, num_actions, seed=RunSeeds(seed).weights)
        servers = [ray.get_actor(name) for name in server_names]
        # The shards' split draws its own stream (the servers take REPLAY and REPLAY/s).
        split = derive_seed(seed, Purpose.REPLAY, 0)
        self.replay = RemoteReplay(servers, beta=config.importance_exponent, seed=split)
        self.weights_every = options.resolved_weights_every(config)
        self.version = 0
        self._weights_ref: ray.ObjectRef | None = None
        self._staged: dict[str, np.ndarray] | None = None
        self._started = False

    def _request(self) -> None:
        self.replay.request(self.config.batch_size, extra_state_offsets=self.learner.offsets.extra)

    def publish(self) -> int:
        """Hand the current weights to every server (workers take them with their next push); the version."""
        self.version += 1
        self._weights_ref = ray.put(self.learner.get_weights())
        for server in self.replay.servers:
            server.publish.remote(self.version, [self._weights_ref])
        return self.version

    def start(self) -> None:
        """Publish the first weights and request the first batch (the first :meth:`step` does it)."""
        if not self._started:
            self._started = True
            self.publish()
            self._request()

    def step(self) -> HostStep:
        """One update on the batch requested before, or none while the limiter holds the learner back."""
        self.start()
        reply = self.replay.receive()
        self._request()
        step = None
        if reply.batch is not None:
            step = self.learner.update(reply.batch, replay=self.replay)
            if self.learner.num_updates % self.weights_every == 0:
                self.publish()
        finished = [(row, ret, length) for _, row, ret, length in reply.episodes]
        return HostStep(reply.env_steps, reply.episodes_total, finished, step, self.learner.num_updates)

    # -- what the driver asks of a remote learner ----------------------------------------------

    def num_updates(self) -> int:
        return self.learner.num_updates

    def get_weights(self) -> list[np.ndarray]:
        return self.learner.get_weights()

    def drain(self) -> None:
        """Wait until every priority and state write sent so far has been applied."""
        self.replay.drain()

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.learner.state_dict()

    def array_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return self.learner.array_specs()

    def stage(self, arrays: dict[str, Any]) -> None:
        """Check a checkpoint's arrays (:meth:`Learner.check_state_dict`: TypeError/ValueError naming the array)
        and keep them for :meth:`assign_staged`; changes nothing yet."""
        self._staged = self.learner.check_state_dict(arrays)

    def assign_staged(self) -> None:
        if self._staged is None:
            raise RuntimeError("assign_staged: nothing was staged")
        self.learner.assign_state(self._staged)
        self._staged = None

    def figures(self) -> dict[str, Any]:
        """Where the learner runs and how many weight versions it published (for the run summary)."""
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "weights_published": self.version,
        }


def spawn_learner(config: R2D2Config, options: DistributedConfig, **host_options: Any) -> Any:
    """A :class:`LearnerHost` as a Ray actor asking for ``options.learner_resources``; returns its handle.

    Not restarted by Ray: a learner that dies loses its updates since the last checkpoint, and the run ends
    (``--resume`` goes on from that checkpoint).
    """
    if options.learner_resources is None:
        raise ValueError("learner_resources: None runs the learner in the driver; there is no actor to spawn")
    return (
        ray.remote(LearnerHost)
        .options(max_restarts=0, max_concurrency=1, **ray_options(options.learner_resources))
        .remote(config, options, **host_options)
    )
