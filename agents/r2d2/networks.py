"""Fixed-batch stateful R2D2 Q-network builder: Dense torso, stateful LSTM core, dueling heads."""

from __future__ import annotations

import dataclasses
from typing import Literal

import keras
import numpy as np

from burnin.layers import HoistedLSTM
from burnin.state import guard_batch_size

__all__ = ["NetworkConfig", "build_q_network", "copy_weights", "network_inputs"]


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Architecture of the Q-network; the batch size is chosen per copy, at build time."""

    obs_dim: int
    """Size of the (vector) observation."""
    num_actions: int
    """Number of discrete actions."""
    torso_units: tuple[int, ...] = (64,)
    """Widths of the Dense ReLU torso applied to each observation."""
    core: Literal["lstm", "dense"] = "lstm"
    """'lstm' for the stateful recurrent core, 'dense' for the feed-forward ablation of equal width."""
    core_units: int = 64
    """Width of the core (LSTM units or Dense units)."""
    lstm_impl: Literal["keras", "hoisted", "unrolled"] = "keras"
    """'keras': keras.layers.LSTM; 'hoisted': burnin.layers.HoistedLSTM (same outputs, input matmul hoisted);
    'unrolled': HoistedLSTM that also unrolls every call whose length is static (the runner's segments)."""
    head_units: int = 64
    """Hidden width of each dueling head (value and advantage)."""
    prev_action: bool = True
    """Feed the previous action (one-hot) to the core."""
    prev_reward: bool = True
    """Feed the previous reward to the core."""
    dtype_policy: str = "float32"
    """Keras dtype policy of the layers, e.g. 'mixed_bfloat16'. State variables stay float32."""

    def __post_init__(self) -> None:
        for name in ("obs_dim", "num_actions", "core_units", "head_units"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))  # Keras rejects numpy ints as layer sizes
        if not isinstance(self.torso_units, tuple) or any(
            isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u < 1 for u in self.torso_units
        ):
            raise ValueError(f"torso_units: expected a tuple of positive ints, got {self.torso_units!r}")
        if self.core not in ("lstm", "dense"):
            raise ValueError(f"core: expected 'lstm' or 'dense', got {self.core!r}")
        if self.lstm_impl not in ("keras", "hoisted", "unrolled"):
            raise ValueError(f"lstm_impl: expected 'keras', 'hoisted' or 'unrolled', got {self.lstm_impl!r}")
        if self.dtype_policy not in ("float32", "mixed_bfloat16", "bfloat16"):
            raise ValueError(
                f"dtype_policy: expected 'float32', 'mixed_bfloat16' or 'bfloat16', got {self.dtype_policy!r}"
            )

    @property
    def recurrent(self) -> bool:
        """Whether the core carries state."""
        return self.core == "lstm"


class OneHot(keras.layers.Layer):
    """Int actions [B, T] -> one-hot float [B, T, num_actions]; passes the mask through."""

    def __init__(self, num_actions: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_actions = num_actions
        self.supports_masking = True

    def call(self, x):
        return keras.ops.one_hot(keras.ops.cast(x, "int32"), self.num_actions, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.num_actions)

    def get_config(self):
        return {**super().get_config(), "num_actions": self.num_actions}


class AsFeature(keras.layers.Layer):
    """Scalars [B, T] -> float features [B, T, 1]; passes the mask through."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x):
        return keras.ops.expand_dims(keras.ops.cast(x, self.compute_dtype), -1)

    def compute_output_shape(self, input_shape):
        return (*input_shape, 1)


class Dueling(keras.layers.Layer):
    """Q = V + A − mean_a A, from value [..., 1] and advantages [..., A] (Wang et al. 2016)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        value, advantage = inputs
        return value + advantage - keras.ops.mean(advantage, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return input_shape[1]

    def compute_mask(self, inputs, mask=None):
        if mask is None:
            return None
        return mask[0] if isinstance(mask, (list, tuple)) else mask


def _seeds(seed: int | None):
    # Distinct, reproducible seeds per initializer so the same `seed` gives the
    # same weights in every copy, independent of Keras' global RNG.
    base = 0 if seed is None else int(seed)
    counter = iter(range(10_000))
    return lambda: base * 10_000 + next(counter)


def build_q_network(
    config: NetworkConfig,
    *,
    batch_size: int,
    seed: int | None = 0,
    name: str = "q_network",
) -> keras.Model:
    """Build the Q-network with a fixed batch (stateful LSTM core) or a feed-forward core.

    Inputs, each with a free time axis so one model runs windows and single steps:
      observation ``[B, T, obs_dim]`` float32, prev_action ``[B, T]`` int32,
      prev_reward ``[B, T]`` float32 (the last two only when enabled).
    Output: Q-values ``[B, T, num_actions]`` (float32 even under mixed precision).

    Copies for the learner, target and actor are built with the same ``config``
    and different ``batch_size``; weights do not depend on the batch, so
    :func:`copy_weights` (``set_weights``) shares them. The recurrent model is
    guarded against calls with another batch size (see ``burnin.guard_batch_size``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    next_seed = _seeds(seed)
    policy = keras.dtype_policies.get(config.dtype_policy)

    def dense(units: int, activation: str | None, layer_name: str) -> keras.layers.Dense:
        return keras.layers.Dense(
            units,
            activation=activation,
            kernel_initializer=keras.initializers.GlorotUniform(seed=next_seed()),
            name=layer_name,
            dtype=policy,
        )

    obs = keras.Input(batch_shape=(batch_size, None, config.obs_dim), name="observation")
    inputs = [obs]
    x = obs
    for i, units in enumerate(config.torso_units):
        x = dense(units, "relu", f"torso_{i}")(x)
    features = [x]
    if config.prev_action:
        prev_a = keras.Input(batch_shape=(batch_size, None), dtype="int32", name="prev_action")
        inputs.append(prev_a)
        features.append(OneHot(config.num_actions, name="prev_action_one_hot", dtype=policy)(prev_a))
    if config.prev_reward:
        prev_r = keras.Input(batch_shape=(batch_size, None), dtype="float32", name="prev_reward")
        inputs.append(prev_r)
        features.append(AsFeature(name="prev_reward_feature", dtype=policy)(prev_r))
    if len(features) > 1:
        x = keras.layers.Concatenate(axis=-1, name="core_input", dtype=policy)(features)
    if config.core == "lstm":
        if config.lstm_impl == "keras":
            lstm_class, extra = keras.layers.LSTM, {}
        else:
            lstm_class, extra = HoistedLSTM, {"max_unroll": 10**6 if config.lstm_impl == "unrolled" else 0}
        x = lstm_class(
            config.core_units,
            stateful=True,
            return_sequences=True,
            kernel_initializer=keras.initializers.GlorotUniform(seed=next_seed()),
            recurrent_initializer=keras.initializers.Orthogonal(seed=next_seed()),
            name="lstm",
            dtype=policy,
            **extra,
        )(x)
    else:
        x = dense(config.core_units, "relu", "core_dense")(x)
    value = dense(1, None, "value")(dense(config.head_units, "relu", "value_hidden")(x))
    advantage = dense(config.num_actions, None, "advantage")(
        dense(config.head_units, "relu", "advantage_hidden")(x)
    )
    q = Dueling(name="q_values", dtype="float32")([value, advantage])
    model = keras.Model(inputs, q, name=name)
    if config.recurrent:
        guard_batch_size(model)
    return model


def network_inputs(
    config: NetworkConfig, observation: np.ndarray, prev_action: np.ndarray, prev_reward: np.ndarray
) -> list[np.ndarray]:
    """Assemble the model input list in the order :func:`build_q_network` declares it."""
    inputs = [observation]
    if config.prev_action:
        inputs.append(prev_action)
    if config.prev_reward:
        inputs.append(prev_reward)
    return inputs


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copy all weights from ``source`` to ``target`` (copies may differ in batch size)."""
    target.set_weights(source.get_weights())
