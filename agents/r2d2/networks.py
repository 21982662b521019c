"""Fixed-batch stateful R2D2 Q-network builder: the observation encoder (conv torso for images, one-hots
for discrete parts; :mod:`agents.r2d2.encoders`), Dense torso, stateful recurrent core (a stack of LSTM
and GRU layers), dueling heads."""

from __future__ import annotations

import dataclasses
from typing import Literal

import keras
import numpy as np

from agents.r2d2.encoders import encode_observation
from agents.seeds import Purpose, derive_seed
from agents.spaces import ObservationEncoding
from burnin._checks import check_choice, check_float, check_int, check_int_tuple
from burnin.layers import HoistedLSTM
from burnin.state import guard_batch_size, state_shapes

__all__ = [
    "CORES",
    "CORE_LAYERS",
    "DTYPE_POLICIES",
    "LSTM_IMPLS",
    "XLA_LOOP_MAX_UNITS",
    "NetworkConfig",
    "build_q_network",
    "check_architecture",
    "network_inputs",
    "row_state_shapes",
]

CORES = ("lstm", "dense")
"""'lstm': the stateful recurrent core (its layers: ``core_layers``); 'dense': the feed-forward ablation."""
CORE_LAYERS = ("lstm", "gru")
"""Kinds of stateful layers a recurrent core stacks."""
LSTM_IMPLS = ("keras", "hoisted", "unrolled", "fused")
"""LSTM implementations: keras.layers.LSTM, or burnin.layers.HoistedLSTM (same outputs)."""
XLA_LOOP_MAX_UNITS = 128
"""Widest 'fused' LSTM whose loops are compiled with XLA: XLA saves per-step overhead but its CPU matmuls
are slower than oneDNN's, which wins from 256 units on (whole update, measured: 128 units 1.09× with XLA,
256 units 0.83×, the paper's 512 units 0.83×); and in bfloat16 always (its 16-bit matmuls are slower)."""
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "bfloat16")
"""Keras dtype policies the networks may use; state variables stay float32 under the mixed one."""


def check_architecture(
    torso_units: tuple[int, ...],
    core: str,
    core_layers: tuple[str, ...],
    lstm_impl: str,
    dtype_policy: str,
    *,
    dtype_name: str = "dtype_policy",
) -> None:
    """The one check of the architecture fields (NetworkConfig and R2D2Config call it)."""
    check_int_tuple("torso_units", torso_units)
    check_choice("core", core, CORES)
    if not isinstance(core_layers, tuple) or not core_layers:
        raise TypeError(f"core_layers: expected a non-empty tuple of {CORE_LAYERS}, got {core_layers!r}")
    for kind in core_layers:
        check_choice("core_layers", kind, CORE_LAYERS)
    check_choice("lstm_impl", lstm_impl, LSTM_IMPLS)
    check_choice(dtype_name, dtype_policy, DTYPE_POLICIES)


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Architecture of the Q-network; the batch size is chosen per copy, at build time."""

    obs_dim: int
    """Stored values per observation (the size of a vector observation)."""
    num_actions: int
    """Number of discrete actions."""
    torso_units: tuple[int, ...] = (64,)
    """Widths of the Dense ReLU torso applied to each observation."""
    core: Literal["lstm", "dense"] = "lstm"
    """'lstm' for the stateful recurrent core, 'dense' for the feed-forward ablation of equal width."""
    core_units: int = 64
    """Width of the core (units of each recurrent layer, or Dense units)."""
    core_layers: tuple[str, ...] = ("lstm",)
    """Stateful layers of the recurrent core, input side first, each 'lstm' or 'gru' (core='lstm' only)."""
    lstm_impl: Literal["keras", "hoisted", "unrolled", "fused"] = "keras"
    """'keras': keras.layers.LSTM; 'hoisted': burnin.layers.HoistedLSTM (same outputs, input matmul hoisted);
    'unrolled': HoistedLSTM that also unrolls every call whose length is static (the runner's segments);
    'fused': HoistedLSTM with its hand-written sequence gradient, and in float32 up to
    XLA_LOOP_MAX_UNITS both loops compiled with XLA (outputs and gradients equal to rounding; the fastest
    on the CPU, benchmarks/README.md)."""
    head_units: int = 64
    """Hidden width of each dueling head (value and advantage)."""
    prev_action: bool = True
    """Feed the previous action (one-hot) to the core."""
    prev_reward: bool = True
    """Feed the previous reward to the core."""
    reward_scale: float = 1.0
    """The previous reward is fed multiplied by this (the learner's ``reward_scale``: the same units)."""
    dtype_policy: str = "float32"
    """Keras dtype policy of the layers, e.g. 'mixed_bfloat16'. State variables stay float32."""
    observation: ObservationEncoding | None = None
    """How observations are stored and encoded (:func:`agents.spaces.observation_encoding`);
    None: a float32 vector of ``obs_dim``."""

    def __post_init__(self) -> None:
        for name in ("obs_dim", "num_actions", "core_units", "head_units"):
            # Keras rejects numpy ints as layer sizes.
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        check_float("reward_scale", self.reward_scale, low=0.0, strict=True)
        check_architecture(self.torso_units, self.core, self.core_layers, self.lstm_impl, self.dtype_policy)
        if self.observation is None:
            object.__setattr__(self, "observation", ObservationEncoding.vector(self.obs_dim))
        elif not isinstance(self.observation, ObservationEncoding):
            raise TypeError(
                f"observation: expected an ObservationEncoding, got {type(self.observation).__name__}"
            )
        elif self.observation.size != self.obs_dim:
            raise ValueError(
                f"obs_dim: {self.obs_dim}, but the observation encoding stores {self.observation.size} values"
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
    """Scalars [B, T] -> float features [B, T, 1], times ``scale``; passes the mask through."""

    def __init__(self, scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.supports_masking = True

    def call(self, x):
        x = keras.ops.expand_dims(keras.ops.cast(x, self.compute_dtype), -1)
        return x if self.scale == 1.0 else x * self.scale

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}

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


def _initializer_seeds(seed: int | None):
    # Distinct, reproducible seeds per initializer so the same `seed` gives the
    # same weights in every copy, independent of Keras' global RNG.
    base = 0 if seed is None else int(seed)
    counter = iter(range(10**6))
    return lambda: derive_seed(base, Purpose.WEIGHTS, next(counter))


def _core_layer(config: NetworkConfig, kind: str, index: int, next_seed, policy) -> keras.layers.Layer:
    """Layer ``index`` of the recurrent core: the first is named after its kind ('lstm', 'gru'), the next
    ones ``<kind>_<index>``."""
    options = dict(
        stateful=True,
        return_sequences=True,
        kernel_initializer=keras.initializers.GlorotUniform(seed=next_seed()),
        recurrent_initializer=keras.initializers.Orthogonal(seed=next_seed()),
        name=kind if index == 0 else f"{kind}_{index}",
        dtype=policy,
    )
    if kind == "gru":
        return keras.layers.GRU(config.core_units, **options)
    if config.lstm_impl == "keras":
        return keras.layers.LSTM(config.core_units, **options)
    return HoistedLSTM(
        config.core_units,
        max_unroll=10**6 if config.lstm_impl == "unrolled" else 0,
        fused_gradient=config.lstm_impl == "fused",
        jit_loops=config.lstm_impl == "fused"
        and config.dtype_policy == "float32"
        and config.core_units <= XLA_LOOP_MAX_UNITS,
        **options,
    )


def _previous_step_inputs(config: NetworkConfig, batch_size: int, policy) -> tuple[list, list]:
    """The previous action (one-hot) and reward inputs, when enabled, and the features they give."""
    inputs, features = [], []
    if config.prev_action:
        prev_a = keras.Input(batch_shape=(batch_size, None), dtype="int32", name="prev_action")
        inputs.append(prev_a)
        features.append(OneHot(config.num_actions, name="prev_action_one_hot", dtype=policy)(prev_a))
    if config.prev_reward:
        prev_r = keras.Input(batch_shape=(batch_size, None), dtype="float32", name="prev_reward")
        inputs.append(prev_r)
        features.append(AsFeature(config.reward_scale, name="prev_reward_feature", dtype=policy)(prev_r))
    return inputs, features


def build_q_network(
    config: NetworkConfig,
    *,
    batch_size: int,
    seed: int | None = 0,
    name: str = "q_network",
) -> keras.Model:
    """Build the Q-network with a fixed batch (stateful recurrent core) or a feed-forward core.

    Inputs, each with a free time axis so one model runs windows and single steps:
      observation ``[B, T, *config.observation.shape]`` in its stored dtype, prev_action ``[B, T]`` int32,
      prev_reward ``[B, T]`` float32 (the last two only when enabled).
    Output: Q-values ``[B, T, num_actions]`` (float32 even under mixed precision).

    Copies for the learner, target and actor are built with the same ``config``
    and different ``batch_size``; weights do not depend on the batch, so
    ``set_weights(other.get_weights())`` shares them. The recurrent model is
    guarded against calls with another batch size (see ``burnin.guard_batch_size``).
    """
    check_int("batch_size", batch_size, minimum=1)
    next_seed = _initializer_seeds(seed)
    policy = keras.dtype_policies.get(config.dtype_policy)

    def dense(units: int, activation: str | None, layer_name: str) -> keras.layers.Dense:
        return keras.layers.Dense(
            units,
            activation=activation,
            kernel_initializer=keras.initializers.GlorotUniform(seed=next_seed()),
            name=layer_name,
            dtype=policy,
        )

    encoding = config.observation
    obs = keras.Input(
        batch_shape=(batch_size, None, *encoding.shape), dtype=encoding.dtype, name="observation"
    )
    inputs = [obs]
    x = encode_observation(encoding, obs, next_seed=next_seed, policy=policy)
    for i, units in enumerate(config.torso_units):
        x = dense(units, "relu", f"torso_{i}")(x)
    previous, features = _previous_step_inputs(config, batch_size, policy)
    inputs += previous
    features = [x, *features]
    if len(features) > 1:
        x = keras.layers.Concatenate(axis=-1, name="core_input", dtype=policy)(features)
    if config.recurrent:
        for index, kind in enumerate(config.core_layers):
            x = _core_layer(config, kind, index, next_seed, policy)(x)
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


def row_state_shapes(network: keras.Model | NetworkConfig) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per stateful layer and state array, its shape without the batch (:func:`burnin.state_shapes` drops
    it): what a replay stores per row (``SequenceReplay(row_state_shapes=...)``); ``()`` for a feed-forward
    network. Of a built model, or of the network a :class:`NetworkConfig` describes (built once at batch 1)."""
    if isinstance(network, NetworkConfig):
        if not network.recurrent:
            return ()
        network = build_q_network(network, batch_size=1, name="row_state_shapes")
    try:
        shapes = state_shapes(network)
    except ValueError:  # no stateful RNN layer: the feed-forward ablation
        return ()
    return tuple(tuple(shape[1:] for shape in layer) for layer in shapes)
