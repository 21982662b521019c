"""From a gymnasium space to what the agent stores and acts on; the Q-network's encoders for these
are in :mod:`agents.r2d2.encoders`.

Observations (:func:`observation_encoding`) are stored in a compact form and
encoded inside the network, so the replay never holds one-hots or float frames:

=========================================  ==========================  ===================================
space                                      stored per step             the network's encoder
=========================================  ==========================  ===================================
Box, rank 0-1 (or any rank not an image)   float32 ``[size]``          as is, then the Dense torso
Box image ``[H, W]`` / ``[H, W, C]``,      its dtype ``[H, W, C]``      scaled (uint8: /255), then the
H, W >= 36                                 (uint8 stays uint8)          Nature-DQN conv torso
Discrete(n, start)                         int ``[1]`` (value − start)  one-hot n
MultiDiscrete(nvec, start)                 int ``[nvec.size]``          concatenated one-hots
Tuple / Dict of the above (nested)         one flat vector              each part encoded, concatenated
=========================================  ==========================  ===================================

A composite space is stored as one flat vector: integers when every part is
discrete (the narrowest of uint8, uint16, int32 that holds them), else float32 (category
indices are exact in float32). The :class:`ObservationEncoding` records, per
stored column block, the key path into the env's observation and the offset to
subtract, and per feature segment whether it is one-hot (``n``) or passed
through (``box``, its width); the network's encoder splits the flat vector by
those segments. Images inside a Tuple / Dict are flattened like any Box.

Actions (:func:`action_encoding`): Discrete, or MultiDiscrete flattened to one
Discrete over the product of its sizes when that is at most
:data:`MAX_FLAT_ACTIONS`; the actor maps the flat index back when stepping.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from gymnasium import spaces

from burnin._checks import check_int, fmt

__all__ = [
    "MAX_FLAT_ACTIONS",
    "MIN_IMAGE_SIZE",
    "SUPPORTED_ACTIONS",
    "SUPPORTED_OBSERVATIONS",
    "ActionEncoding",
    "ObservationEncoding",
    "action_encoding",
    "observation_encoding",
]

SUPPORTED_OBSERVATIONS = (
    "Box (vectors; images [H, W] or [H, W, C] with H, W >= 36), Discrete, MultiDiscrete, "
    "and Tuple / Dict of these"
)
SUPPORTED_ACTIONS = "Discrete, or MultiDiscrete with at most 4096 combinations"
MAX_FLAT_ACTIONS = 4096
"""Most combinations a MultiDiscrete action space may have to be flattened into one Discrete
(POPGym's Battleship and MineSweeper need 64 and 16 at Easy, 144 and 64 at Hard); beyond it the
one-hot prev-action input and the advantage head grow with the product."""
MIN_IMAGE_SIZE = 36
"""Smallest height and width the conv torso can take with valid padding (36 → 8 → 3 → 1)."""

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class ObservationEncoding:
    """How observations of one space are stored (``shape``, ``dtype``) and encoded by the network.

    Built by :func:`observation_encoding`; JSON round-trips with :meth:`to_json` / :meth:`from_json`
    (checkpoints keep it, so the ΔQ probe rebuilds the network without the env).
    """

    kind: str
    """'vector' (a flat vector, split by ``segments``) or 'image' (the conv torso)."""
    shape: tuple[int, ...]
    """Stored shape of one observation."""
    dtype: str
    """Stored numpy dtype name."""
    blocks: tuple[tuple[Path, tuple[int, ...], tuple[int, ...]], ...] = ()
    """Per part of the env's observation: its key path, its shape in the env, and the offsets
    subtracted from its values (Discrete / MultiDiscrete ``start``; empty for a Box). A vector stores
    the parts flattened side by side; an image has one part."""
    segments: tuple[tuple[str, int], ...] = ()
    """Feature segments of the flat vector, in order: ('box', width) passed through, ('onehot', n)
    one stored column one-hot encoded."""
    scale: float = 1.0
    """Images: multiplier applied inside the network (1/255 for uint8 frames)."""

    def __post_init__(self) -> None:
        if self.kind not in ("vector", "image"):
            raise ValueError(f"kind: expected 'vector' or 'image', got {self.kind!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        if self.kind == "vector":
            width = sum(w if k == "box" else 1 for k, w in self.segments)
            if self.shape != (width,) or sum(math.prod(s) for _, s, _ in self.blocks) != width:
                raise ValueError(f"segments: cover {width} columns, but the shape is {self.shape}")

    @classmethod
    def vector(cls, size: int) -> ObservationEncoding:
        """A float32 vector of ``size`` passed straight to the Dense torso (a 1-D Box)."""
        size = check_int("size", size, minimum=1)
        return cls("vector", (size,), "float32", (((), (size,), ()),), (("box", size),))

    @property
    def size(self) -> int:
        """Stored values per observation."""
        return math.prod(self.shape)

    @property
    def features(self) -> int:
        """Width of the encoded vector (vectors only)."""
        return sum(w for _, w in self.segments)

    def flatten(self, obs: Any, num: int) -> np.ndarray:
        """A batch of ``num`` env observations (vector-env layout: arrays, or tuples / dicts of arrays)
        in the stored form ``[num, *shape]``; ValueError naming the part whose shape is wrong."""
        columns = []
        sizes = iter(n for _, n in self.segments)
        for path, shape, offsets in self.blocks:
            part = obs
            try:
                for key in path:
                    part = part[key]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"observation batch has no part {list(path)}") from None
            part = np.asarray(part)
            where = f" part {list(path)}" if path else ""
            if part.shape != (num, *shape):
                raise ValueError(f"observation batch{where} has shape {part.shape}, expected {(num, *shape)}")
            if self.kind == "image":
                return _finite(part.reshape(num, *self.shape).astype(self.dtype, copy=False), where)
            part = part.reshape(num, -1)
            if offsets:  # a Discrete / MultiDiscrete part: one stored column per one-hot segment
                n = np.fromiter((next(sizes) for _ in range(part.shape[1])), np.int64, part.shape[1])
                part = _categories(part, np.asarray(offsets, np.int64), n, where)
            else:
                next(sizes)
            columns.append(part)
        flat = columns[0] if len(columns) == 1 else np.concatenate(columns, axis=1)
        return _finite(flat.astype(self.dtype, copy=False), "")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObservationEncoding:
        return cls(
            kind=data["kind"],
            shape=tuple(data["shape"]),
            dtype=data["dtype"],
            blocks=tuple((tuple(p), tuple(s), tuple(o)) for p, s, o in data["blocks"]),
            segments=tuple((k, int(w)) for k, w in data["segments"]),
            scale=float(data["scale"]),
        )


def _finite(batch: np.ndarray, where: str) -> np.ndarray:
    """``batch``, unless a float value is NaN or infinite (the replay stores only finite values)."""
    if batch.dtype.kind == "f" and not np.isfinite(batch).all():
        raise ValueError(
            f"observation batch{where} holds {fmt(batch[~np.isfinite(batch)])}, expected finite values"
        )
    return batch


def _categories(part: np.ndarray, offsets: np.ndarray, n: np.ndarray, where: str) -> np.ndarray:
    """The category indices (value − start) of a discrete part ``[num, columns]``; ValueError for a value
    outside its space, which would one-hot encode to all zeros (or wrap around in the stored dtype)."""
    index = part - offsets
    bad = (index < 0) | (index >= n) | (index != np.floor(index) if part.dtype.kind == "f" else False)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise ValueError(
            f"observation batch{where} holds {fmt(part[rows, cols])}, outside its space: expected integers "
            f"start <= value < start + n (start {fmt(offsets[cols])}, n {fmt(n[cols])})"
        )
    return index


def _unsupported(space: Any, where: str) -> ValueError:
    return ValueError(
        f"{where}: {space} is not a supported observation space; supported: {SUPPORTED_OBSERVATIONS}"
    )


def _image_shape(space: spaces.Box) -> tuple[int, int, int] | None:
    shape = space.shape
    if len(shape) not in (2, 3) or min(shape[:2]) < MIN_IMAGE_SIZE:
        return None
    return (*shape, 1) if len(shape) == 2 else shape


def _parts(space: Any, path: Path, where: str) -> list[tuple[Path, Any]]:
    """The leaves of a (nested) Tuple / Dict with their key paths; other spaces are one leaf."""
    if isinstance(space, spaces.Tuple):
        return [leaf for i, sub in enumerate(space.spaces) for leaf in _parts(sub, (*path, i), where)]
    if isinstance(space, spaces.Dict):
        return [leaf for key, sub in space.spaces.items() for leaf in _parts(sub, (*path, key), where)]
    if isinstance(space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete)):
        return [(path, space)]
    raise _unsupported(space, where)


def _leaf(
    path: Path, space: Any
) -> tuple[tuple[Path, tuple[int, ...], tuple[int, ...]], list[tuple[str, int]]]:
    if isinstance(space, spaces.Box):
        return (path, space.shape, ()), [("box", math.prod(space.shape))]
    if isinstance(space, spaces.Discrete):
        return (path, (), (int(space.start),)), [("onehot", int(space.n))]
    nvec = np.asarray(space.nvec).reshape(-1)
    start = np.asarray(getattr(space, "start", np.zeros_like(space.nvec))).reshape(-1)
    return (path, space.shape, tuple(int(s) for s in start)), [("onehot", int(n)) for n in nvec]


def _int_dtype(segments: list[tuple[str, int]]) -> str:
    largest = max(n for _, n in segments)
    for dtype in ("uint8", "uint16", "int32"):
        if largest - 1 <= np.iinfo(dtype).max:
            return dtype
    return "int64"


def observation_encoding(space: Any, *, where: str = "observation_space") -> ObservationEncoding:
    """The stored form and network encoder of ``space`` (see the module doc); ``ValueError`` naming the
    space and what is supported for any other space (``where`` names it in the message)."""
    if isinstance(space, spaces.Box):
        image = _image_shape(space)
        if image is not None:
            uint8 = space.dtype == np.uint8
            return ObservationEncoding(
                "image", image, "uint8" if uint8 else "float32", (((), space.shape, ()),),
                scale=1 / 255 if uint8 else 1.0,
            )  # fmt: skip
    blocks, segments = [], []
    for path, leaf in _parts(space, (), where):
        block, segs = _leaf(path, leaf)
        if isinstance(leaf, spaces.Box) and leaf.shape and min(leaf.shape) == 0:
            raise ValueError(f"{where}: {space} has an empty Box; expected at least one value")
        blocks.append(block)
        segments += segs
    width = sum(math.prod(shape) for _, shape, _ in blocks)
    discrete = all(kind == "onehot" for kind, _ in segments)
    dtype = _int_dtype(segments) if discrete else "float32"
    return ObservationEncoding("vector", (width,), dtype, tuple(blocks), tuple(segments))


@dataclasses.dataclass(frozen=True)
class ActionEncoding:
    """A Discrete action space, or a MultiDiscrete one flattened to one Discrete over the product."""

    num_actions: int
    nvec: tuple[int, ...] = ()
    """MultiDiscrete sizes (empty for Discrete)."""
    start: tuple[int, ...] = (0,)
    """Offsets added to the env's action (Discrete: one; MultiDiscrete: one per component)."""

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        """Flat action indices ``[N]`` as the env's actions: ``[N]`` or ``[N, len(nvec)]``."""
        actions = np.asarray(actions, np.int64)
        if not self.nvec:
            return actions + self.start[0]
        parts = np.unravel_index(actions, self.nvec)
        return np.stack(parts, axis=-1) + np.asarray(self.start, np.int64)


def action_encoding(space: Any, *, where: str = "action_space") -> ActionEncoding:
    """The flat Discrete view of ``space``; ``ValueError`` for Box (R2D2 is a discrete-action method),
    a MultiDiscrete of more than :data:`MAX_FLAT_ACTIONS` combinations, or any other space."""
    if isinstance(space, spaces.Discrete):
        return ActionEncoding(int(space.n), (), (int(space.start),))
    if isinstance(space, spaces.MultiDiscrete):
        nvec = tuple(int(n) for n in np.asarray(space.nvec).reshape(-1))
        total = math.prod(nvec)
        if np.asarray(space.nvec).ndim != 1 or total > MAX_FLAT_ACTIONS:
            raise ValueError(
                f"{where}: {space} has {total} combinations (shape {np.shape(space.nvec)}); expected a "
                f"1-D MultiDiscrete of at most {MAX_FLAT_ACTIONS}"
            )
        start = tuple(int(s) for s in np.asarray(getattr(space, "start", [0] * len(nvec))).reshape(-1))
        return ActionEncoding(total, nvec, start)
    if isinstance(space, spaces.Box):
        raise ValueError(
            f"{where}: {space} is continuous; R2D2 is a discrete-action method, expected {SUPPORTED_ACTIONS}"
        )
    raise ValueError(f"{where}: {space} is not a supported action space; expected {SUPPORTED_ACTIONS}")
