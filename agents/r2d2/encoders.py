"""The Q-network's observation encoders, chosen by :class:`agents.spaces.ObservationEncoding`: the
Nature-DQN / R2D2 conv torso for images (scaled inside the network, so the replay keeps uint8
frames), and the split / one-hot encoder for flat vectors (Box parts passed through, Discrete and
MultiDiscrete parts one-hot)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras

from agents.spaces import ObservationEncoding

__all__ = ["CONV_DENSE_UNITS", "CONV_TORSO", "ConvTorso", "SplitEncoder", "encode_observation"]

CONV_TORSO = ((32, 8, 4), (64, 4, 2), (64, 3, 1))
"""(filters, kernel, stride) of the Nature-DQN / R2D2 conv torso, followed by Dense 512."""
CONV_DENSE_UNITS = 512


def _runs(segments: tuple[tuple[str, int], ...]) -> list[tuple[str, int, int]]:
    """(kind, width, count): consecutive one-hot segments of equal width merged; box segments alone."""
    runs: list[tuple[str, int, int]] = []
    for kind, width in segments:
        if kind == "onehot" and runs and runs[-1][:2] == (kind, width):
            runs[-1] = (kind, width, runs[-1][2] + 1)
        else:
            runs.append((kind, width, 1))
    return runs


class SplitEncoder(keras.layers.Layer):
    """Stored flat vectors ``[B, T, width]`` -> features ``[B, T, features]``: each ('onehot', n)
    column one-hot, each ('box', w) block cast and passed through. Passes the mask through."""

    def __init__(self, segments: tuple[tuple[str, int], ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.segments = tuple((str(k), int(w)) for k, w in segments)
        self.supports_masking = True

    def call(self, x):
        if self.segments == (("box", x.shape[-1]),):  # a plain vector: nothing to split
            return keras.ops.cast(x, self.compute_dtype)
        parts, column = [], 0
        for kind, width, count in _runs(self.segments):
            if kind == "onehot":
                # A run of columns with the same number of categories is one one_hot call (Concentration
                # has 52 such columns): [..., count] -> [..., count, width] -> [..., count * width].
                index = keras.ops.cast(x[..., column : column + count], "int32")
                hot = keras.ops.one_hot(index, width, dtype=self.compute_dtype)
                parts.append(keras.ops.reshape(hot, (*keras.ops.shape(hot)[:-2], count * width)))
                column += count
            else:
                parts.append(keras.ops.cast(x[..., column : column + width], self.compute_dtype))
                column += width
        return parts[0] if len(parts) == 1 else keras.ops.concatenate(parts, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], sum(w for _, w in self.segments))

    def get_config(self):
        return {**super().get_config(), "segments": self.segments}


class ConvTorso(keras.layers.Layer):
    """Frames ``[B, T, H, W, C]`` (stored dtype) -> ``[B, T, 512]``: scaled, then the Nature-DQN conv
    stack and Dense 512, applied to every step (time folded into the batch)."""

    def __init__(self, scale: float, next_seed: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.supports_masking = True
        seed = next_seed or (lambda: None)
        init = keras.initializers.GlorotUniform
        self.convs = [
            keras.layers.Conv2D(
                f, k, strides=s, activation="relu", kernel_initializer=init(seed=seed()),
                name=f"conv_{i}", dtype=self.dtype_policy,
            )
            for i, (f, k, s) in enumerate(CONV_TORSO)
        ]  # fmt: skip
        self.dense = keras.layers.Dense(
            CONV_DENSE_UNITS, activation="relu", kernel_initializer=init(seed=seed()),
            name="conv_dense", dtype=self.dtype_policy,
        )  # fmt: skip

    def build(self, input_shape):
        shape = (None, *input_shape[2:])
        for conv in self.convs:
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
        self.dense.build((None, math.prod(shape[1:])))

    def call(self, x):
        batch, steps = keras.ops.shape(x)[0], keras.ops.shape(x)[1]
        frames = keras.ops.reshape(x, (-1, *x.shape[2:]))
        y = keras.ops.cast(frames, self.compute_dtype) * keras.ops.cast(self.scale, self.compute_dtype)
        for conv in self.convs:
            y = conv(y)
        y = self.dense(keras.ops.reshape(y, (keras.ops.shape(y)[0], -1)))
        return keras.ops.reshape(y, (batch, steps, CONV_DENSE_UNITS))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:2], CONV_DENSE_UNITS)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


def encode_observation(encoding: ObservationEncoding, obs: Any, *, next_seed: Callable[[], int], policy: Any):
    """The encoder layers of ``encoding`` applied to the observation input ``obs`` ``[B, T, *shape]``:
    the conv torso for images, the split / one-hot encoder for vectors (the Dense torso follows)."""
    if encoding.kind == "image":
        return ConvTorso(encoding.scale, next_seed, name="conv_torso", dtype=policy)(obs)
    return SplitEncoder(encoding.segments, name="observation_encoder", dtype=policy)(obs)
