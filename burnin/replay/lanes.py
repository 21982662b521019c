"""The writer registry: which lanes each named writer (a remote actor) holds."""

from __future__ import annotations

from typing import Any

import numpy as np

from burnin._checks import fmt, int_vector, is_int
from burnin.replay.kernels import lanes_problem

__all__ = ["LaneRegistry", "check_lanes", "registry_problem"]


def check_lanes(lanes: Any, num_lanes: int) -> np.ndarray:
    """Lane ids as int64: a 1-D integer array of distinct ids in ``[0, num_lanes)``."""
    arr = int_vector("lanes", lanes, "lane ids")
    problem = lanes_problem(arr, np.zeros(num_lanes, dtype=np.bool_))
    if problem == 1:
        bad = arr[(arr < 0) | (arr >= num_lanes)]
        raise ValueError(f"lanes: expected ids in [0, {num_lanes}), got {fmt(bad)}")
    if problem == 2:
        srt = np.sort(arr)
        dup = np.unique(srt[1:][srt[1:] == srt[:-1]])
        raise ValueError(f"lanes: expected each lane at most once, got repeated {fmt(dup)}")
    return arr


class LaneRegistry:
    """Owner name -> lane ids, for writers that are not the buffer's own process.

    A new owner gets lanes that are neither registered nor written to yet; an
    owner that registers again (a restarted remote actor) gets the same lanes
    back. The registry is saved in the replay's checkpoints.
    """

    def __init__(self, num_lanes: int, owners: dict[str, list[int]] | None = None) -> None:
        self.num_lanes = int(num_lanes)
        self._owners: dict[str, list[int]] = {str(k): [int(x) for x in v] for k, v in (owners or {}).items()}

    def lanes_of(self, owner: str) -> np.ndarray | None:
        """The lanes ``owner`` holds, or None if it never registered."""
        held = self._owners.get(owner)
        return None if held is None else np.asarray(held, dtype=np.int64)

    def assign(self, owner: str, count: int, *, written: np.ndarray) -> np.ndarray:
        """Hand a new ``owner`` the first ``count`` lanes that are neither registered nor ``written`` (bool [num_lanes])."""
        taken = np.zeros(self.num_lanes, dtype=bool)
        for held in self._owners.values():
            taken[held] = True
        free = np.flatnonzero(~taken & ~written)
        if free.size < count:
            raise ValueError(
                f"count: owner {owner!r} asked for {count} lanes, but only {free.size} of "
                f"num_lanes={self.num_lanes} are neither registered nor written to"
            )
        lanes = free[:count].astype(np.int64)
        self._owners[owner] = lanes.tolist()
        return lanes

    def check_count(self, owner: str, held: np.ndarray, count: int) -> None:
        """ValueError if ``owner`` registers again asking for another number of lanes than it holds."""
        if held.size != count:
            raise ValueError(
                f"count: owner {owner!r} already holds {held.size} lanes {fmt(held)}, got count={count}"
            )

    def as_arrays(self) -> dict[str, np.ndarray]:
        """Owner -> lane ids (int64 arrays, copies)."""
        return {k: np.asarray(v, dtype=np.int64) for k, v in self._owners.items()}

    def num_registered(self) -> int:
        """Lanes held by some owner."""
        return sum(len(v) for v in self._owners.values())

    def to_json(self) -> dict[str, list[int]]:
        """JSON-ready form, for checkpoints."""
        return {k: list(v) for k, v in self._owners.items()}

    @classmethod
    def from_json(cls, num_lanes: int, data: Any) -> LaneRegistry:
        """Inverse of :meth:`to_json`."""
        return cls(num_lanes, {str(k): [int(x) for x in v] for k, v in data.items()})


def registry_problem(registry: Any, num_lanes: int) -> str | None:
    """What is wrong with a lane registry (owner -> lane ids), or None."""
    if not isinstance(registry, dict):
        return f"registry: expected a mapping of owner names to lane lists, got {type(registry).__name__}"
    seen: dict[int, str] = {}
    for owner, lanes in registry.items():
        if not isinstance(owner, str) or not owner:
            return f"registry: expected non-empty owner names, got {owner!r}"
        if not isinstance(lanes, list) or not lanes or not all(is_int(x) for x in lanes):
            return f"registry: owner {owner!r} must hold a non-empty list of lane ids, got {lanes!r}"
        for lane in lanes:
            if not 0 <= lane < num_lanes:
                return f"registry: owner {owner!r} holds lane {lane}, outside [0, {num_lanes})"
            if lane in seen:
                return f"registry: lane {lane} is held by both {seen[lane]!r} and {owner!r}"
            seen[lane] = owner
    return None
