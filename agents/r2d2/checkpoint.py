"""Checkpoint directories of the agents: their format, the learner's arrays, and the checks on loading.

A checkpoint directory holds ``loop.json`` (the format, the config and what
the loop needs to resume), ``learner.npz`` (:meth:`Learner.state_dict`) and,
for a single-process run, ``replay.npz`` (:meth:`SequenceReplay.save`). It is
written as a whole with :func:`burnin._io.write_dir_atomically`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from agents.r2d2.config import R2D2Config
from burnin._io import atomic_savez, atomic_write_text, readable_dir, write_dir_atomically

__all__ = [
    "CHECKPOINT_FORMAT",
    "check_same",
    "comparable_config",
    "read_learner_arrays",
    "read_meta",
    "write_checkpoint_dir",
    "write_learner",
    "write_meta",
]

CHECKPOINT_FORMAT = 1
"""Format of ``loop.json``; a checkpoint of another format is refused."""

write_checkpoint_dir = write_dir_atomically


def comparable_config(config: R2D2Config | dict[str, Any]) -> dict[str, Any]:
    """A config (or its saved JSON, missing fields taking their defaults) as JSON values, for :func:`check_same`."""
    if isinstance(config, dict):
        config = R2D2Config.from_json(config)
    return json.loads(json.dumps(config.to_json()))


def check_same(saved: dict[str, Any], mine: dict[str, Any], what: str) -> None:
    """ValueError naming the first ``what`` (e.g. 'config field') whose value differs between a checkpoint and here."""
    for name in sorted(set(saved) | set(mine)):
        if saved.get(name) != mine.get(name):
            raise ValueError(
                f"checkpoint: {what} {name!r} is {saved.get(name)!r} in the checkpoint but {mine.get(name)!r} here"
            )


def read_meta(directory: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint directory actually to read (see :func:`burnin._io.readable_dir`) and its ``loop.json``."""
    path = readable_dir(Path(directory), "loop.json")
    meta_path = path / "loop.json"
    if not meta_path.is_file():
        raise ValueError(f"checkpoint: {path} has no loop.json (not a complete checkpoint)")
    return path, json.loads(meta_path.read_text())


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write ``loop.json`` into a checkpoint directory being built."""
    atomic_write_text(directory / "loop.json", json.dumps(meta, indent=1, sort_keys=True))


def write_learner(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``learner.npz`` (a :meth:`Learner.state_dict`) into a checkpoint directory being built."""
    atomic_savez(directory / "learner.npz", arrays)


def read_learner_arrays(directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of ``learner.npz`` in a checkpoint directory, read without pickle."""
    with np.load(Path(directory) / "learner.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
