"""The replay server(s) as the learner sees them: batches drawn across shards as from one buffer, writes routed to their shard."""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np
import ray

from agents.distributed.server import SampleReply
from burnin._checks import check_int
from burnin.shards import allocate_draws, merge_draws, split_keys, split_rows

__all__ = ["RemoteReplay"]


class RemoteReplay:
    """One replay server, or ``S`` shards of one replay, as the learner sees them.

    :meth:`request` starts drawing a batch and :meth:`receive` collects it, so a
    draw runs while the learner updates. With shards, a draw first reads every
    shard's total priority, splits the batch among them in proportion
    (:func:`burnin.shards.allocate_draws`), asks each for its share and merges
    the parts (:func:`burnin.shards.merge_draws`): each window is drawn as from
    one buffer holding them all, and its key names its shard. A shard that its
    rate limiter holds back keeps the draw open: the parts already drawn wait,
    and :meth:`request` asks again for the missing ones.

    :meth:`Learner.update` calls :meth:`update_priorities` (and
    :meth:`update_states` with ``refresh_states``) as on a local replay: they go
    out without waiting, each to the shard of its keys. At most
    ``max_in_flight`` writes are outstanding; older ones are collected, which
    also surfaces any error they raised.
    """

    def __init__(
        self, servers: Any, *, max_in_flight: int = 16, beta: float = 0.6, seed: int | None = None
    ) -> None:
        check_int("max_in_flight", max_in_flight, minimum=1)
        self.servers = list(servers) if isinstance(servers, (list, tuple)) else [servers]
        self.server = self.servers[0]
        self.max_in_flight = max_in_flight
        self.beta = float(beta)
        self._rng = np.random.default_rng(seed)
        self._in_flight: collections.deque = collections.deque()
        self._written_states = 0
        self._pending: Any = None  # one server: the sample's ref
        self._draw: dict[str, Any] | None = None  # shards: the open draw
        self._counters = [(0, 0, 0)] * len(self.servers)  # per shard: env steps, samples, episodes total
        self._batches = 0

    @property
    def num_shards(self) -> int:
        return len(self.servers)

    # -- writes -----------------------------------------------------------------------------

    def _track(self, ref: ray.ObjectRef, counts: bool) -> None:
        self._in_flight.append((ref, counts))
        while len(self._in_flight) > self.max_in_flight:
            self._collect(*self._in_flight.popleft())

    def _collect(self, ref: ray.ObjectRef, counts: bool) -> None:
        result = ray.get(ref)
        if counts:
            self._written_states += int(result)

    def update_priorities(self, keys: Any, priorities: Any) -> None:
        keys, priorities = np.asarray(keys), np.asarray(priorities)
        for server, (rows, local) in zip(self.servers, split_keys(keys, self.num_shards)):
            if rows.size:
                self._track(server.update_priorities.remote(local, priorities[rows]), False)

    def update_states(self, keys: Any, offsets: Any, states: Any) -> int:
        """Send refreshed states; returns the states written by the calls that have finished since the last one."""
        for server, (rows, local) in zip(self.servers, split_keys(np.asarray(keys), self.num_shards)):
            if rows.size:
                part = states if rows.size == len(keys) else [split_rows(s, rows) for s in states]
                self._track(server.update_states.remote(local, tuple(offsets), part), True)
        while self._in_flight and ray.wait([self._in_flight[0][0]], timeout=0)[0]:  # finished ones
            self._collect(*self._in_flight.popleft())
        written, self._written_states = self._written_states, 0
        return written

    def drain(self) -> None:
        """Wait until every write sent so far has been applied."""
        while self._in_flight:
            self._collect(*self._in_flight.popleft())

    # -- draws ------------------------------------------------------------------------------

    def request(self, batch_size: int, *, extra_state_offsets: tuple[int, ...] = ()) -> None:
        """Start drawing a batch (or, with shards, ask again for the parts an open draw still lacks)."""
        if self.num_shards == 1:
            if self._pending is None:
                self._pending = self.server.sample.remote(batch_size, extra_state_offsets=extra_state_offsets)
            return
        if self._draw is None:
            totals = np.asarray(ray.get([s.total_priority.remote() for s in self.servers]), np.float64)
            counts = (
                allocate_draws(totals, batch_size, self._rng)
                if totals.sum() > 0
                else np.zeros(len(totals), int)
            )
            # Shards with no share are asked too: for their counters and episodes.
            self._draw = {
                "totals": totals,
                "counts": counts,
                "parts": {},
                "refs": {},
                "offsets": extra_state_offsets,
            }
        draw = self._draw
        for s, server in enumerate(self.servers):
            if s not in draw["parts"] and s not in draw["refs"]:
                draw["refs"][s] = server.sample.remote(
                    int(draw["counts"][s]), extra_state_offsets=draw["offsets"]
                )

    def receive(self) -> SampleReply:
        """The requested batch; its ``batch`` is None while the limiter (or an empty replay) holds it back."""
        if self.num_shards == 1:
            ref, self._pending = self._pending, None
            if ref is None:
                raise RuntimeError("receive: nothing was requested")
            return ray.get(ref)
        draw = self._draw
        if draw is None:
            raise RuntimeError("receive: nothing was requested")
        episodes: list = []
        for s, ref in list(draw["refs"].items()):
            reply: SampleReply = ray.get(ref)
            del draw["refs"][s]
            self._counters[s] = (reply.env_steps, reply.samples, reply.episodes_total)
            episodes.extend(reply.episodes)
            if reply.batch is not None or not draw["counts"][s]:
                draw["parts"][s] = reply.batch
        batch = None
        if len(draw["parts"]) == self.num_shards:
            self._draw = None
            if draw["counts"].sum():
                parts = [draw["parts"][s] for s in range(self.num_shards)]
                batch = merge_draws(parts, draw["totals"], beta=self.beta, rng=self._rng)
                self._batches += 1
            else:
                time.sleep(0.05)  # nothing sampleable anywhere yet: do not spin on the servers
        env_steps, _, episodes_total = (sum(c) for c in zip(*self._counters))
        return SampleReply(batch, env_steps, self._batches, tuple(episodes), episodes_total)

    # -- figures ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The server's stats; with shards, each shard's under ``shards`` and their sums beside them."""
        if self.num_shards == 1:
            return ray.get(self.server.stats.remote())
        shards = ray.get([s.stats.remote() for s in self.servers])
        summed = ("num_steps", "num_sampleable", "steps_added", "open_episodes", "episodes_total")
        out: dict[str, Any] = {k: sum(s.get(k, 0) for s in shards) for k in summed}
        out["total_priority"] = sum(s["total_priority"] for s in shards)
        out["faults"] = [dict(f, shard=i) for i, s in enumerate(shards) for f in s["faults"]]
        out["checkpoint_error"] = next((s["checkpoint_error"] for s in shards if s["checkpoint_error"]), None)
        out["shards"] = shards
        return out
