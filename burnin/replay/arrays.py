"""The arrays a SequenceReplay holds: their names, shapes and dtypes (a checkpoint's members), a new
buffer's, and the flat views of them the kernels read."""

from __future__ import annotations

import numpy as np

from burnin.replay.kernels import LANE_EVICT_AT, NEVER, NO_POS, Tables
from burnin.replay.spec import COUNTERS, LANE_COLUMNS, WINDOW_COLUMNS, ReplayConfig
from burnin.sumtree import SumTree

__all__ = ["array_specs", "new_arrays", "tables"]


def array_specs(config: ReplayConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every array a buffer with ``config`` holds (also a checkpoint's contents)."""
    nl, cap, spl = config.num_lanes, config.lane_capacity, config.state_slots_per_lane
    num_slots = nl * config.windows_per_lane
    i64 = np.dtype(np.int64)
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "step_observation": ((nl, cap, *config.obs_shape), config.obs_dtype),
        "step_action": ((nl, cap), np.dtype(np.int32)),
        "step_reward": ((nl, cap), np.dtype(np.float32)),
        "step_flags": ((nl, cap), np.dtype(np.uint8)),
        # Lane position of each kept state (NO_POS: empty) and the number of the live
        # window that has it as its own state (-1: none yet).
        "state_pos": ((nl, spl), i64),
        "state_owner": ((nl, spl), i64),
        "windows": ((num_slots, WINDOW_COLUMNS), i64),
        "window_alive": ((num_slots,), np.dtype(np.bool_)),
        "lanes": ((nl, LANE_COLUMNS), i64),
        "counters": ((len(COUNTERS),), i64),
        "tree": ((SumTree.size(num_slots),), np.dtype(np.float64)),
    }
    for i, layer in enumerate(config.row_state_shapes):
        for j, shape in enumerate(layer):
            specs[f"state_{i}_{j}"] = ((nl, spl, *shape), config.state_dtype)
            if config.keep_actor_states:
                specs[f"actor_state_{i}_{j}"] = ((nl, spl, *shape), config.state_dtype)
    return specs


def new_arrays(config: ReplayConfig) -> dict[str, np.ndarray]:
    """The arrays of an empty buffer (all of :func:`array_specs` but the sum-tree's): no step, no state,
    no window."""
    specs = array_specs(config)
    del specs["tree"]
    arrays = {name: np.zeros(shape, dtype=dtype) for name, (shape, dtype) in specs.items()}
    arrays["state_pos"][:] = NO_POS
    arrays["state_owner"][:] = -1
    arrays["lanes"][:, LANE_EVICT_AT] = NEVER
    return arrays


def tables(arrays: dict[str, np.ndarray], tree: SumTree, priority: np.ndarray) -> Tables:
    """The kernels' :class:`Tables`: views of ``arrays`` (steps flattened over lanes), the sum-tree's
    nodes and offsets, and ``priority`` (the running maximum and its power alpha)."""
    return Tables(
        lanes=arrays["lanes"],
        windows=arrays["windows"],
        alive=arrays["window_alive"],
        action=arrays["step_action"].reshape(-1),
        reward=arrays["step_reward"].reshape(-1),
        flags=arrays["step_flags"].reshape(-1),
        observation=arrays["step_observation"].reshape(-1),
        state_pos=arrays["state_pos"].reshape(-1),
        state_owner=arrays["state_owner"].reshape(-1),
        tree=tree.nodes,
        tree_offsets=tree.offsets,
        counters=arrays["counters"],
        priority=priority,
    )
