"""Checkpoint directories of the agents: their format, the learner's arrays, and the checks on loading.

A checkpoint directory holds ``loop.json`` (the format, the config and what
the loop needs to resume), ``learner.npz`` (:meth:`Learner.state_dict`; what its arrays must
hold is checked in :mod:`agents.r2d2.learner_checkpoint`) and,
for a single-process run, ``replay.npz`` (:meth:`SequenceReplay.save`). It is
written as a whole with :func:`write_checkpoint_dir`.

Every file is untrusted input: a missing, truncated, bit-flipped or crafted
file gives a :class:`CheckpointError` naming the file and what is wrong, read
before anything is changed. ``learner.npz`` is read member by member without
pickle: each array's header is checked against the shape and dtype the
networks expect before a byte of its data is read, so no member can inflate
past what its declared shape needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from agents.r2d2.config import R2D2Config
from burnin._checks import check_int
from burnin._io import atomic_savez, atomic_write_text, previous_dir, readable_dir, write_dir_atomically
from burnin.replay import SequenceReplay

__all__ = [
    "CHECKPOINT_FORMAT",
    "MAX_COUNTER",
    "MISMATCH_OVERRIDES",
    "CheckpointError",
    "IdentityMismatch",
    "check_identity",
    "check_same",
    "comparable_config",
    "meta_config",
    "meta_field",
    "read_json",
    "read_learner_arrays",
    "read_learner_sizes",
    "read_meta",
    "read_npz",
    "read_replay",
    "remove_stale_temp_dirs",
    "run_identity",
    "write_checkpoint_dir",
    "write_learner",
    "write_meta",
]

CHECKPOINT_FORMAT = 1
"""Format of ``loop.json``; a checkpoint of another format is refused."""

MAX_COUNTER = 2**53
"""Largest counter (updates, env steps, episodes) a checkpoint may hold: exact in JSON and in a float64."""

MAX_META_BYTES = 256 * 2**20
"""Largest ``loop.json`` read (it holds the run's history)."""

MAX_TEXT_BYTES = 2**20
"""Largest string member (the learner's config JSON) read from an ``.npz``."""

MAX_ENV_SIZE = 2**20
"""Largest observation size or number of actions a checkpoint may declare (a network is built from them)."""

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or does not describe what it should; the message names it."""


# ---------------------------------------------------------------- writing


def _temp_dir_pattern(final: Path) -> re.Pattern[str]:
    """Names of :func:`burnin._io.write_dir_atomically`'s temp dirs for ``final``: ``.NAME.tmp-PID-THREAD``."""
    return re.compile(rf"\.{re.escape(final.name)}\.tmp-(\d+)-(\d+)")


def _writer_alive(pid: int, thread: int) -> bool:
    """Whether the writer of a temp dir may still be at work (its process exists; here, its thread)."""
    if pid == os.getpid():
        live = {t.ident for t in threading.enumerate()}
        return thread in live and thread != threading.get_ident()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_dirs(final: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp dirs a crashed save left beside ``final`` (only our naming pattern, only of writers
    that are gone: a dead process, or a finished thread of this one); returns what was removed."""
    final = Path(final)
    pattern = _temp_dir_pattern(final)
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or _writer_alive(int(match[1]), int(match[2])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def write_checkpoint_dir(
    final: str | os.PathLike[str], fill: Callable[[Path], None], *, marker: str = "loop.json"
) -> None:
    """:func:`burnin._io.write_dir_atomically`, leaving nothing behind.

    Stale temp dirs of crashed writers go first; if this save fails at any
    point (KeyboardInterrupt included) its own temp dir goes too; after a
    successful save, a previous directory left by a crash between the two
    renames is removed (``final`` now holds a complete ``marker``).
    """
    final = Path(final)
    remove_stale_temp_dirs(final)
    mine = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write_dir_atomically(final, fill)
    except BaseException:
        # write_dir_atomically removes its temp dir when fill fails, not when a rename does.
        shutil.rmtree(mine, ignore_errors=True)
        raise
    previous = previous_dir(final)
    if previous.exists() and (final / marker).is_file():
        shutil.rmtree(previous, ignore_errors=True)


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write ``loop.json`` into a checkpoint directory being built."""
    atomic_write_text(directory / "loop.json", json.dumps(meta, indent=1, sort_keys=True))


def write_learner(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``learner.npz`` (a :meth:`Learner.state_dict`) into a checkpoint directory being built."""
    atomic_savez(directory / "learner.npz", arrays)


# ---------------------------------------------------------------- loop.json


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file`` (at most :data:`MAX_META_BYTES`); CheckpointError naming it otherwise."""
    try:
        size = file.stat().st_size
        if size > MAX_META_BYTES:
            raise CheckpointError(f"checkpoint {file}: {size} bytes, expected at most {MAX_META_BYTES}")
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"checkpoint {file}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_meta(directory: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint directory actually to read and its ``loop.json`` (format checked).

    After a crash between the two renames of a save, the directory actually
    read is the previous one (:func:`burnin._io.readable_dir`): use the path
    returned, not ``directory``, in messages. Stale temp dirs of crashed saves
    are removed first. CheckpointError if there is no complete checkpoint.
    """
    directory = Path(directory)
    remove_stale_temp_dirs(directory)
    path = readable_dir(directory, "loop.json")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {directory}: no such directory")
    if not (path / "loop.json").is_file():
        raise CheckpointError(f"checkpoint {path}: no loop.json (not a complete checkpoint)")
    meta = read_json(path / "loop.json")
    version = meta.get("format")
    if type(version) is not int or version != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path / 'loop.json'}: format {version!r}, expected {CHECKPOINT_FORMAT}"
        )
    return path, meta


def meta_field(file: Path, meta: Mapping[str, Any], name: str, check: Callable[..., T], **options: Any) -> T:
    """``check(name, meta[name], **options)`` (a :mod:`burnin._checks` validator); CheckpointError naming
    ``file`` and the field if it is missing or fails. ``name`` may be dotted (``actor.steps``) for a nested field."""
    value: Any = meta
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise CheckpointError(f"checkpoint {file}: field {name!r} is missing")
        value = value[part]
    try:
        out = check(name, value, **options)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {file}: {err}") from None
    if check is check_int and out > MAX_COUNTER:
        raise CheckpointError(f"checkpoint {file}: {name}: expected an int <= {MAX_COUNTER}, got {out}")
    return out


def meta_config(file: Path, meta: Mapping[str, Any], mine: R2D2Config | None = None) -> R2D2Config:
    """The config in ``loop.json``; CheckpointError if it is missing, invalid, or (with ``mine``) differs."""
    data = meta.get("config")
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {file}: field 'config': expected a JSON object, got {data!r:.80}")
    try:
        config = R2D2Config.from_json(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {file}: config: {err}") from None
    if mine is not None:
        check_same(comparable_config(config), comparable_config(mine), "config field", where=file)
    return config


def comparable_config(config: R2D2Config | dict[str, Any]) -> dict[str, Any]:
    """A config (or its saved JSON, missing fields taking their defaults) as JSON values, for :func:`check_same`."""
    if isinstance(config, dict):
        config = R2D2Config.from_json(config)
    return json.loads(json.dumps(config.to_json()))


def check_same(saved: dict[str, Any], mine: dict[str, Any], what: str, *, where: Path | None = None) -> None:
    """CheckpointError naming the first ``what`` (e.g. 'config field') whose value differs between a
    checkpoint (``where``, if known) and here."""
    for name in sorted(set(saved) | set(mine)):
        if saved.get(name) != mine.get(name):
            place = "checkpoint" if where is None else f"checkpoint {where}"
            raise CheckpointError(
                f"{place}: {what} {name!r} is {saved.get(name)!r} in the checkpoint but {mine.get(name)!r} here"
            )


# ---------------------------------------------------------------- what a checkpoint belongs to

MISMATCH_OVERRIDES = ("env", "seed")
"""The identity fields a caller may accept a mismatch of (a policy tried on another env of the same layout,
or continued under another seed); the layouts never: the network is built for them."""


class IdentityMismatch(CheckpointError):
    """A checkpoint of another env, seed or layout than the run reading it: ``field`` ('env', 'seed',
    'observation', 'actions'), the checkpoint's value and this run's."""

    def __init__(self, file: Path, field: str, saved: Any, mine: Any) -> None:
        self.file, self.field, self.saved, self.mine = file, field, saved, mine
        what = {"env": "env id", "observation": "observation layout", "actions": "action layout"}.get(
            field, field
        )
        show = lambda v: (
            json.dumps(v, separators=(",", ":"), sort_keys=True) if isinstance(v, dict) else repr(v)
        )
        super().__init__(
            f"checkpoint {file}: {what} is {show(saved)} in the checkpoint but {show(mine)} here"
        )


def run_identity(*, env_id: str | None, observation: Any, actions: Any) -> dict[str, Any]:
    """The ``identity`` entry of ``loop.json``: the env's gymnasium id (None if unknown) and the JSON of its
    observation and action layout (:class:`agents.spaces.ObservationEncoding`, ``ActionEncoding``). The
    seed and the config have their own entries."""
    as_json = lambda x: json.loads(json.dumps(x))  # tuples as lists, as read back
    return {
        "env_id": env_id,
        "observation": as_json(observation.to_json()),
        "actions": as_json(dataclasses.asdict(actions)),
    }


def check_identity(
    file: Path, meta: Mapping[str, Any], *, seed: int, identity: Mapping[str, Any], allow: Iterable[str] = ()
) -> bool:
    """Check that ``loop.json`` (``meta``, read from ``file``) belongs to this run: its seed, env id and
    layouts against ``seed`` and ``identity`` (:func:`run_identity`). A mismatch is an :class:`IdentityMismatch`
    naming both sides, unless the field is in ``allow`` (a subset of :data:`MISMATCH_OVERRIDES`); an env id of
    None on either side is not compared. Returns False for a checkpoint written before the identity was
    recorded (no ``identity`` entry): its env id and layout are unknown, and only its seed is checked (the
    learner's array shapes and the replay's layout are checked on reading, as always)."""
    allow = set(allow)
    saved_seed = meta_field(file, meta, "seed", check_int, minimum=0)
    if saved_seed != seed and "seed" not in allow:
        raise IdentityMismatch(file, "seed", saved_seed, seed)
    if "identity" not in meta:
        return False
    saved = meta["identity"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {file}: identity: expected a JSON object, got {saved!r:.80}")
    env_id = saved.get("env_id")
    if env_id is not None and not isinstance(env_id, str):
        raise CheckpointError(
            f"checkpoint {file}: identity.env_id: expected a str or null, got {env_id!r:.80}"
        )
    if None not in (env_id, identity["env_id"]) and env_id != identity["env_id"] and "env" not in allow:
        raise IdentityMismatch(file, "env", env_id, identity["env_id"])
    for name in ("observation", "actions"):
        if name not in saved:
            raise CheckpointError(f"checkpoint {file}: field 'identity.{name}' is missing")
        if saved[name] != identity[name]:
            raise IdentityMismatch(file, name, saved[name], identity[name])
    return True


# ---------------------------------------------------------------- .npz members


def _member_header(f: Any, file: Path, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise CheckpointError(f"checkpoint {file}: array {name!r} has npy format {version}, expected 1.0 or 2.0")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, file: Path, name: str, spec: Any) -> np.ndarray:
    """One member, its header checked against ``spec`` = (shape, dtype) before its data is read."""
    shape, dtype = spec
    with zf.open(info) as f:
        got_shape, fortran, got_dtype = _member_header(f, file, name)
        if got_dtype.hasobject:
            raise CheckpointError(f"checkpoint {file}: array {name!r} holds Python objects (pickle), refused")
        text = dtype.kind == "U" and got_dtype.kind == "U" and got_shape == shape
        if not text and (got_shape != shape or got_dtype != dtype):
            raise CheckpointError(
                f"checkpoint {file}: array {name!r} is {got_dtype} {got_shape}, expected {dtype} {shape}"
            )
        nbytes = int(np.prod(got_shape, dtype=np.int64)) * got_dtype.itemsize
        if text and nbytes > MAX_TEXT_BYTES:
            raise CheckpointError(f"checkpoint {file}: array {name!r} is {nbytes} bytes of text, too long")
        if info.file_size != f.tell() + nbytes:
            raise CheckpointError(
                f"checkpoint {file}: array {name!r} member is {info.file_size} bytes, its header declares "
                f"{f.tell() + nbytes}"
            )
        data = f.read(nbytes)
        if len(data) != nbytes or f.read(1):  # reading to the end also checks the member's CRC
            raise CheckpointError(f"checkpoint {file}: array {name!r} is truncated")
    arr = np.frombuffer(data, dtype=got_dtype)
    return arr.reshape(got_shape, order="F" if fortran else "C").copy()


def read_npz(
    file: str | os.PathLike[str], specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], *, exact: bool = True
) -> dict[str, np.ndarray]:
    """The arrays ``specs`` names (name -> (shape, dtype); a ``U`` dtype takes a string of any length) from
    an ``.npz`` file, without pickle, each header checked before its data is read.

    With ``exact``, a member ``specs`` does not name is refused too. Every
    failure (missing file, not a zip, truncated, bad CRC, missing or extra
    member, wrong shape or dtype) is a CheckpointError naming the file.
    """
    file = Path(file)
    try:
        with zipfile.ZipFile(file) as zf:
            members = {}
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise CheckpointError(f"checkpoint {file}: member {info.filename!r} is not an array")
                members[info.filename[: -len(".npy")]] = info
            missing = sorted(set(specs) - set(members))
            if missing:
                raise CheckpointError(f"checkpoint {file}: arrays {missing} are missing")
            extra = sorted(set(members) - set(specs))
            if exact and extra:
                raise CheckpointError(f"checkpoint {file}: unexpected arrays {extra}")
            return {name: _read_member(zf, members[name], file, name, spec) for name, spec in specs.items()}
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {file}: missing") from None
    except (
        OSError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
    ) as err:
        raise CheckpointError(
            f"checkpoint {file}: truncated or corrupt ({type(err).__name__}: {err})"
        ) from None


def read_learner_arrays(
    directory: str | os.PathLike[str], specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]
) -> dict[str, np.ndarray]:
    """The arrays of ``learner.npz`` in a checkpoint directory, as :meth:`Learner.array_specs` declares them
    (see :func:`read_npz`); :func:`agents.r2d2.learner_checkpoint.check_state_dict` checks their values."""
    return read_npz(Path(directory) / "learner.npz", specs)


def read_learner_sizes(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """(obs_dim, num_actions) of ``learner.npz``, to build a learner for it; CheckpointError if out of range."""
    file = Path(directory) / "learner.npz"
    sizes = read_npz(file, {"sizes": ((2,), np.dtype(np.int64))}, exact=False)["sizes"]
    if not ((sizes >= 1) & (sizes <= MAX_ENV_SIZE)).all():
        raise CheckpointError(
            f"checkpoint {file}: array 'sizes': expected (obs_dim, num_actions) in [1, {MAX_ENV_SIZE}], "
            f"got {sizes.tolist()}"
        )
    return int(sizes[0]), int(sizes[1])


def read_replay(file: str | os.PathLike[str]) -> SequenceReplay:
    """:meth:`SequenceReplay.load` of ``file``, any failure a CheckpointError naming it."""
    file = Path(file)
    try:
        return SequenceReplay.load(file)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {file}: missing") from None
    except (OSError, ValueError, TypeError, KeyError, MemoryError) as err:
        text = str(err)
        raise CheckpointError(text if str(file) in text else f"checkpoint {file}: {text}") from None
