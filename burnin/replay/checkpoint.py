"""SequenceReplay checkpoints: one ``.npz`` file, written atomically, read without pickle as untrusted input.

The file holds a JSON ``meta`` member (format version, config, maximum
priority, lane registry, RNG state), the priority sum-tree as ``tree``, and
every array of :func:`burnin.replay.spec.array_specs` under its name.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from burnin._io import atomic_write
from burnin.replay.kernels import C_SAMPLEABLE
from burnin.replay.spec import ReplayConfig, array_specs
from burnin.sumtree import SumTree

__all__ = ["FORMAT_VERSION", "Checkpoint", "read_checkpoint", "rng_from_state", "write_checkpoint"]

FORMAT_VERSION = 1
"""Checkpoint format written by :meth:`SequenceReplay.save`; :meth:`SequenceReplay.load` reads only this one."""

BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")


class CorruptCheckpoint(Exception):
    """A checkpoint that reads but does not describe a valid buffer."""


class Checkpoint(NamedTuple):
    """What a checkpoint file holds, checked."""

    config: ReplayConfig
    rng: np.random.Generator
    arrays: dict[str, np.ndarray]
    """Every array of ``array_specs(config)`` but ``tree``, with its declared shape and dtype."""
    tree: SumTree
    """The priorities, its sums checked against its leaves."""
    max_priority: float
    registry: dict[str, list[int]]


def encode_json(value: Any) -> Any:
    """numpy arrays and integers (as in a bit generator's state) to JSON-ready values."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, dict):
        return {k: encode_json(v) for k, v in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    return value


def decode_json(value: Any) -> Any:
    """Inverse of :func:`encode_json`."""
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
        return {k: decode_json(v) for k, v in value.items()}
    return value


def rng_from_state(state: Any) -> np.random.Generator:
    """A Generator in the saved ``bit_generator.state``; only numpy's own bit generators are accepted."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in BIT_GENERATORS:
        raise CorruptCheckpoint(
            f"unknown bit generator {name!r} in the RNG state, expected one of {BIT_GENERATORS}"
        )
    bit_generator = getattr(np.random, name)()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def write_checkpoint(
    path: str | os.PathLike[str],
    *,
    config: ReplayConfig,
    max_priority: float,
    registry: dict[str, list[int]],
    rng: np.random.Generator,
    tree: np.ndarray,
    arrays: dict[str, np.ndarray],
) -> None:
    """Write one checkpoint file atomically (see :func:`burnin._io.atomic_write`)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "config": config.to_json(),
        "max_priority": max_priority,
        "registry": registry,
        "rng": encode_json(rng.bit_generator.state),
    }
    atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), tree=tree, **arrays))


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and check a file written by :func:`write_checkpoint`, without pickle.

    A truncated, corrupt or wrong-version file raises ``ValueError`` saying so;
    a missing file raises ``FileNotFoundError``.
    """
    path = Path(path)
    where = f"checkpoint {path}"
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{where} is truncated or corrupt: {err}") from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{where} is not a SequenceReplay checkpoint (it holds a single .npy array)")
    try:
        with loaded as data:
            checkpoint = _read_members(data)
    except CorruptCheckpoint as err:
        raise ValueError(f"{where}: {err}") from None
    except (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{where} is truncated or corrupt: {type(err).__name__}: {err}") from err
    alive = checkpoint.arrays["window_alive"]
    leaves = checkpoint.tree.values()
    if checkpoint.arrays["counters"][C_SAMPLEABLE] != alive.sum() or leaves[~alive].any():
        raise ValueError(f"{where} is corrupt: window table and priorities disagree")
    return checkpoint


def _read_members(data: Any) -> Checkpoint:
    if "meta" not in data.files:
        raise CorruptCheckpoint("no 'meta' entry: not a SequenceReplay checkpoint")
    meta = json.loads(str(data["meta"][()]))
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise CorruptCheckpoint(f"format version {version!r}, but this burnin reads version {FORMAT_VERSION}")
    config = ReplayConfig.from_json(meta["config"])
    rng = rng_from_state(decode_json(meta["rng"]))
    arrays = {}
    for name, (shape, dtype) in array_specs(config).items():
        if name not in data.files:
            raise CorruptCheckpoint(f"array {name!r} is missing")
        arr = data[name]
        if arr.shape != shape or arr.dtype != dtype:
            raise CorruptCheckpoint(f"array {name!r} is {arr.dtype} {arr.shape}, expected {dtype} {shape}")
        arrays[name] = arr
    tree = SumTree(config.num_lanes * config.windows_per_lane)
    tree.set_state(arrays.pop("tree"))
    registry = {str(k): [int(x) for x in v] for k, v in meta["registry"].items()}
    return Checkpoint(config, rng, arrays, tree, float(meta["max_priority"]), registry)
