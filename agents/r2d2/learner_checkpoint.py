"""The learner's checkpoint arrays (``learner.npz``): what a Learner saves, their checks as untrusted input, their load."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import keras
import numpy as np

from agents.interrupts import deferred_interrupts
from agents.r2d2.checkpoint import (
    MAX_COUNTER,
    CheckpointError,
    check_same,
    comparable_config,
    read_learner_arrays,
)
from agents.r2d2.config import R2D2Config
from burnin._checks import fmt

__all__ = [
    "LearnerParts",
    "array_specs",
    "assign_state",
    "check_state_dict",
    "read_checkpoint",
    "state_dict",
]

Specs = dict[str, tuple[tuple[int, ...], np.dtype]]


class LearnerParts(Protocol):
    """What these functions read and write of a learner (:class:`agents.r2d2.learner.Learner`)."""

    config: R2D2Config
    online: keras.Model
    target: keras.Model
    optimizer: keras.optimizers.Optimizer
    obs_dim: int
    num_actions: int


def state_dict(learner: LearnerParts) -> dict[str, np.ndarray]:
    """Every array needed to resume exactly: weights, target weights, optimizer slots, counters."""
    arrays: dict[str, np.ndarray] = {}
    for i, w in enumerate(learner.online.get_weights()):
        arrays[f"online/{i}"] = w
    for i, w in enumerate(learner.target.get_weights()):
        arrays[f"target/{i}"] = w
    for i, v in enumerate(learner.optimizer.variables):
        arrays[f"optimizer/{i}"] = np.asarray(v.numpy())
    arrays["num_updates"] = np.asarray(int(learner.optimizer.iterations.numpy()), dtype=np.int64)
    arrays["config"] = np.asarray(json.dumps(learner.config.to_json(), sort_keys=True))
    arrays["sizes"] = np.asarray([learner.obs_dim, learner.num_actions], dtype=np.int64)
    return arrays


def array_specs(learner: LearnerParts) -> Specs:
    """Name -> (shape, dtype) of every array of :func:`state_dict` (``config`` is a string of any length)."""
    specs: Specs = {}
    for prefix, variables in (
        ("online", learner.online.weights),
        ("target", learner.target.weights),
        ("optimizer", learner.optimizer.variables),
    ):
        for i, v in enumerate(variables):
            specs[f"{prefix}/{i}"] = (tuple(v.shape), np.dtype(v.dtype))
    specs["num_updates"] = ((), np.dtype(np.int64))
    specs["config"] = ((), np.dtype("U"))
    specs["sizes"] = ((2,), np.dtype(np.int64))
    return specs


def check_state_dict(learner: LearnerParts, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a :func:`state_dict`, checked as untrusted input for ``learner``; changes nothing.

    ValueError (TypeError for a wrong type) naming the array for: a missing
    or extra array, a wrong shape or dtype, a non-finite weight or slot, a
    config or env sizes other than this learner's, an update counter
    outside [0, 2**53] or other than the optimizer's, a learning rate
    other than the config's, a negative Adam velocity.
    """
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays: expected a mapping of name to array, got {type(arrays).__name__}")
    specs = array_specs(learner)
    missing, extra = sorted(set(specs) - set(arrays)), sorted(set(arrays) - set(specs))
    if missing or extra:
        raise ValueError(f"arrays: missing {missing}, unexpected {extra}")
    out = {}
    for name, (shape, dtype) in specs.items():
        arr = np.asarray(arrays[name])
        same = arr.dtype.kind == "U" if dtype.kind == "U" else arr.dtype == dtype
        if not same or arr.shape != shape:
            raise ValueError(f"array {name!r}: expected {dtype} {shape}, got {arr.dtype} {arr.shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = ~np.isfinite(arr)
            raise ValueError(
                f"array {name!r}: expected finite values, got {fmt(arr[bad])} at {int(bad.sum())} of {arr.size} entries"
            )
        out[name] = arr
    _check_saved_config(str(out["config"]), learner.config)
    sizes = tuple(int(s) for s in out["sizes"])
    if sizes != (learner.obs_dim, learner.num_actions):
        raise ValueError(
            f"array 'sizes': env sizes (obs_dim, num_actions) are {sizes} in the checkpoint "
            f"but {(learner.obs_dim, learner.num_actions)} here"
        )
    _check_optimizer(out, learner.optimizer, learner.config)
    return out


def read_checkpoint(learner: LearnerParts, directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``learner.npz`` of a checkpoint directory, read and checked for ``learner`` (:func:`check_state_dict`);
    changes nothing. CheckpointError naming the file and the array."""
    arrays = read_learner_arrays(directory, array_specs(learner))
    try:
        return check_state_dict(learner, arrays)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {Path(directory) / 'learner.npz'}: {err}") from None


def assign_state(learner: LearnerParts, arrays: dict[str, np.ndarray]) -> None:
    """Assign arrays that :func:`check_state_dict` returned, all or nothing (Ctrl-C held meanwhile)."""
    with deferred_interrupts():
        before = state_dict(learner)
        try:
            _set(learner, arrays)
        except BaseException:
            _set(learner, before)
            raise


def _set(learner: LearnerParts, arrays: Mapping[str, np.ndarray]) -> None:
    learner.online.set_weights(_numbered(arrays, "online"))
    learner.target.set_weights(_numbered(arrays, "target"))
    for var, value in zip(learner.optimizer.variables, _numbered(arrays, "optimizer")):
        var.assign(value)


def _numbered(arrays: Mapping[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    items = sorted(
        ((int(k.split("/", 1)[1]), v) for k, v in arrays.items() if k.startswith(prefix + "/")),
        key=lambda kv: kv[0],
    )
    return [v for _, v in items]


def _check_saved_config(text: str, config: R2D2Config) -> None:
    try:
        saved = json.loads(text)
        if not isinstance(saved, dict):
            raise TypeError(f"expected a JSON object, got {type(saved).__name__}")
        saved = comparable_config(saved)
    except (ValueError, TypeError, RecursionError) as err:
        raise ValueError(f"array 'config': not a valid config ({err})") from None
    check_same(saved, comparable_config(config), "config field")


def _check_optimizer(
    arrays: dict[str, np.ndarray], optimizer: keras.optimizers.Optimizer, config: R2D2Config
) -> None:
    """The counters agree and are in range; the learning rate is the config's; Adam's velocities are >= 0."""
    num_updates = int(arrays["num_updates"])
    if not 0 <= num_updates <= MAX_COUNTER:
        raise ValueError(f"array 'num_updates': expected an int in [0, {MAX_COUNTER}], got {num_updates}")
    for i, v in enumerate(optimizer.variables):
        value = arrays[f"optimizer/{i}"]
        if v is optimizer.iterations and int(value) != num_updates:
            raise ValueError(
                f"array 'optimizer/{i}': the optimizer's step counter is {int(value)}, "
                f"but num_updates is {num_updates}"
            )
        if v.name == "learning_rate" and value != np.float32(config.learning_rate):
            raise ValueError(
                f"array 'optimizer/{i}': learning rate {float(value)!r}, expected the config's "
                f"{config.learning_rate!r}"
            )
        if v.name.endswith("_velocity") and (value < 0).any():
            raise ValueError(f"array 'optimizer/{i}': Adam velocities are >= 0, got {fmt(value[value < 0])}")
