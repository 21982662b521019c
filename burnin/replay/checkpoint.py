"""SequenceReplay checkpoints: one ``.npz`` file, written atomically, read without pickle as untrusted input.

The file holds a JSON ``meta`` member (format version, config, maximum
priority, lane registry, RNG state), the priority sum-tree as ``tree``, and
every array of :func:`burnin.replay.spec.array_specs` under its name.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from burnin._checks import check_int
from burnin._io import atomic_write
from burnin.replay.arrays import array_specs
from burnin.replay.lanes import registry_problem
from burnin.replay.spec import ReplayConfig
from burnin.sumtree import SumTree

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "default_max_bytes",
    "read_checkpoint",
    "rng_from_state",
    "write_checkpoint",
]

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
    """Inverse of :func:`encode_json` (arrays of integers only, as a bit generator's state holds)."""
    if isinstance(value, dict):
        if "__ndarray__" in value:
            dtype = np.dtype(value["dtype"])
            if dtype.kind not in "iu":
                raise CorruptCheckpoint(f"rng: expected an integer array in the RNG state, got dtype {dtype}")
            return np.array(value["__ndarray__"], dtype=dtype)
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
    try:
        bit_generator.state = state
    except (ValueError, TypeError, KeyError, OverflowError, IndexError) as err:
        raise CorruptCheckpoint(f"rng: not a valid {name} state ({type(err).__name__}: {err})") from None
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


def default_max_bytes() -> int:
    """The machine's physical memory: no checkpoint that declares more can load."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 1 << 40


def read_checkpoint(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> Checkpoint:
    """Read and check a file written by :func:`write_checkpoint`, without pickle, as untrusted input.

    The JSON ``meta`` member (format version, config, maximum priority,
    registry, RNG state) is read and checked first; the config then fixes the
    name, dtype and shape of every other member, and what the config declares
    must fit in ``max_bytes`` (default: :func:`default_max_bytes`). Each member's
    ``.npy`` header is read and checked against that before any of its data,
    and no member is inflated past the bytes its shape needs. A truncated,
    corrupt, oversized or wrong-version file raises ``ValueError`` naming the file
    and what is wrong; a missing file raises ``FileNotFoundError``. The tables'
    values are checked by :meth:`SequenceReplay.load` (the buffer's invariants).
    """
    path = Path(path)
    where = f"checkpoint {path}"
    limit = default_max_bytes() if max_bytes is None else check_int("max_bytes", max_bytes, minimum=1)
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise CorruptCheckpoint("not a SequenceReplay checkpoint (it holds a single .npy array)")
        with zipfile.ZipFile(path) as zf:
            return _read_members(zf, limit)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except CorruptCheckpoint as err:
        raise ValueError(f"{where}: {err}") from None
    except (
        ValueError, TypeError, KeyError, OSError, EOFError, OverflowError, RecursionError, UnicodeError,
        NotImplementedError, MemoryError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error,
    ) as err:  # fmt: skip
        raise ValueError(f"{where} is truncated or corrupt: {type(err).__name__}: {err}") from err


META_CHARS = 1 << 24
"""Most characters the JSON ``meta`` member may hold (64 MiB as UTF-32)."""
_CHUNK = 1 << 24


class _Counting:
    """A reader that counts the bytes read through it (the length of a member's .npy header)."""

    def __init__(self, f: Any) -> None:
        self.f, self.count = f, 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.count += len(data)
        return data


def _read_npy(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, shape: tuple[int, ...] | None, dtype: np.dtype | None
) -> np.ndarray:
    """One ``.npy`` member, its header checked against ``shape`` and ``dtype`` before its data is read.

    ``shape``/``dtype`` None: the JSON meta member (a scalar unicode string of at most META_CHARS).
    """
    name = info.filename[:-4]
    with zf.open(info) as raw:
        f = _Counting(raw)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise CorruptCheckpoint(
                f"array {name!r} has .npy format version {version}, expected (1, 0) or (2, 0)"
            )
        if dtype is None:
            if got_shape != () or got_dtype.kind != "U" or got_dtype.itemsize > 4 * META_CHARS:
                raise CorruptCheckpoint(
                    f"array 'meta' is {got_dtype} {got_shape}, expected a JSON string of at most {META_CHARS} characters"
                )
            shape, dtype = (), got_dtype
        elif got_shape != shape or got_dtype != dtype:
            raise CorruptCheckpoint(f"array {name!r} is {got_dtype} {got_shape}, expected {dtype} {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if info.file_size != f.count + nbytes:
            raise CorruptCheckpoint(
                f"array {name!r}: its zip member holds {info.file_size - f.count} bytes of data, but its "
                f"header declares {dtype} {shape} = {nbytes} bytes"
            )
        arr = np.empty(shape[::-1] if fortran else shape, dtype=dtype)
        out = arr.reshape(-1).view(np.uint8)
        at = 0
        while at < nbytes:
            chunk = raw.read(min(_CHUNK, nbytes - at))
            if not chunk:
                raise CorruptCheckpoint(f"array {name!r} is truncated: {at} of {nbytes} bytes")
            out[at : at + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            at += len(chunk)
        if raw.read(1):  # pragma: no cover - zipfile stops at file_size
            raise CorruptCheckpoint(f"array {name!r} holds more than {nbytes} bytes")
    return np.ascontiguousarray(arr.T) if fortran else arr


def _read_members(zf: zipfile.ZipFile, max_bytes: int) -> Checkpoint:
    infos = zf.infolist()
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise CorruptCheckpoint(
                f"unexpected member {info.filename!r} (a checkpoint holds .npy arrays only)"
            )
        name = info.filename[:-4]
        if name in members:
            raise CorruptCheckpoint(f"array {name!r} appears twice")
        members[name] = info
    if "meta" not in members:
        raise CorruptCheckpoint("no 'meta' entry: not a SequenceReplay checkpoint")
    try:
        meta = json.loads(str(_read_npy(zf, members["meta"], None, None)[()]))
    except RecursionError:
        raise CorruptCheckpoint("meta: JSON nested too deeply") from None
    except json.JSONDecodeError as err:
        raise CorruptCheckpoint(f"meta: not JSON ({err})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CorruptCheckpoint(f"format version {version!r}, but this burnin reads version {FORMAT_VERSION}")
    missing = {"config", "max_priority", "registry", "rng"} - set(meta)
    if missing:
        raise CorruptCheckpoint(f"meta: missing {sorted(missing)}")
    try:
        config = ReplayConfig.from_json(meta["config"])
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError) as err:
        raise CorruptCheckpoint(f"meta: config: {type(err).__name__}: {err}") from None
    specs = array_specs(config)
    declared = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
    if declared > max_bytes:
        raise CorruptCheckpoint(
            f"its config declares {declared} bytes of arrays, more than max_bytes={max_bytes} "
            f"(num_lanes={config.num_lanes}, lane_capacity={config.lane_capacity}, obs_shape={config.obs_shape})"
        )
    for name in specs:
        if name not in members:
            raise CorruptCheckpoint(f"array {name!r} is missing")
    extra = sorted(set(members) - set(specs) - {"meta"})
    if extra:
        raise CorruptCheckpoint(f"unexpected arrays {extra}")
    top = meta["max_priority"]
    if isinstance(top, bool) or not isinstance(top, (int, float)) or not math.isfinite(top) or top < 1:
        raise CorruptCheckpoint(
            f"max_priority: expected a finite number >= 1 (the running maximum starts at 1), got {top!r}"
        )
    problem = registry_problem(meta["registry"], config.num_lanes)
    if problem is not None:
        raise CorruptCheckpoint(problem)
    rng = rng_from_state(decode_json(meta["rng"]))
    arrays = {name: _read_npy(zf, members[name], shape, dtype) for name, (shape, dtype) in specs.items()}
    tree = SumTree(config.num_lanes * config.windows_per_lane)
    try:
        tree.set_state(arrays.pop("tree"))
    except ValueError as err:
        raise CorruptCheckpoint(str(err)) from None
    registry = {k: list(v) for k, v in meta["registry"].items()}
    return Checkpoint(config, rng, arrays, tree, float(top), registry)
