"""Shared pytest set-up: quiet TensorFlow, deterministic CPU ops, a seeded RNG fixture."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tensorflow as tf

tf.config.experimental.enable_op_determinism()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
