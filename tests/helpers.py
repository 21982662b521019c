"""Small model factories and assertions shared by the tests."""

from __future__ import annotations

import keras
import numpy as np

import burnin


def lstm_model(batch: int = 4, units: int = 8, features: int = 3, *, seed: int = 0) -> keras.Model:
    """Input [batch, None, features] -> stateful LSTM(units) -> Dense(2)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(batch_shape=(batch, None, features))
    x = keras.layers.LSTM(units, stateful=True, return_sequences=True, name="lstm")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="lstm_model")


def random_state(model: keras.Model, rng: np.random.Generator):
    """A random RecurrentState shaped like the model's."""
    return tuple(
        tuple(rng.standard_normal(shape).astype(np.float32) for shape in entry)
        for entry in burnin.state_shapes(model)
    )


def assert_states_equal(a, b) -> None:
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb)
        for xa, xb in zip(ea, eb):
            np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))
