"""A ReplayServer that also records what the distributed tests check around a writer's re-registration:
per lane, the last observation written before it and the first one after it.

It lives in the tests (the production server keeps only the re-registration log of stats()). Ray
runs it from a pickled copy (``ray.cloudpickle.register_pickle_by_value``), since its workers cannot
import the tests.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from agents.distributed.server import PushReply, Registration, ReplayServer


class RecordingServer(ReplayServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.replay.config
        self.last_obs = np.zeros((self.num_lanes, *cfg.obs_shape), cfg.obs_dtype)
        self.observations: list[dict[str, np.ndarray]] = []  # one per entry of the fault log
        self.awaiting: dict[int, tuple[int, int]] = {}  # lane -> (fault index, row in its lanes)

    def register(self, owner: str, count: int) -> Registration:
        with self._cond:  # one moment with the server's own bookkeeping
            before = len(super().faults())
            registration = super().register(owner, count)
            if len(super().faults()) > before:
                lanes = registration.lanes
                last = self.last_obs[lanes].copy()
                self.observations.append(
                    {"last_observation": last, "first_observation": np.full_like(last, np.nan)}
                )
                for row, lane in enumerate(lanes):
                    self.awaiting[int(lane)] = (len(self.observations) - 1, row)
            return registration

    def add(
        self, owner: str, incarnation: int, lanes: Any, steps: dict[str, Any], **kwargs: Any
    ) -> PushReply:
        with self._cond:
            reply = super().add(owner, incarnation, lanes, steps, **kwargs)
            observation = steps["observation"]
            if reply.status == "ok" and len(observation):
                lanes = np.asarray(lanes, dtype=np.int64)
                for row, lane in enumerate(lanes.tolist()):
                    if lane in self.awaiting:
                        fault, at = self.awaiting.pop(lane)
                        self.observations[fault]["first_observation"][at] = observation[0][row]
                self.last_obs[lanes] = observation[-1]
            return reply

    def restore(self, directory: str | os.PathLike[str]) -> dict[str, int]:
        counters = super().restore(directory)
        with self._cond:
            # The last observation written to each lane before the checkpoint: its latest stored step.
            written = self.replay._lt[:, 0]  # LANE_POS: steps ever written per lane
            cap = self.replay.lane_capacity
            step_observation = self.replay._arrays["step_observation"]
            for lane in np.flatnonzero(written):
                self.last_obs[lane] = step_observation[lane, (written[lane] - 1) % cap]
        return counters

    def faults(self) -> list[dict[str, Any]]:
        with self._cond:
            return [
                {
                    **f,
                    "last_observation": o["last_observation"].copy(),
                    "first_observation": o["first_observation"].copy(),
                }
                for f, o in zip(super().faults(), self.observations)
            ]
