"""Shared pytest set-up: quiet TensorFlow, deterministic CPU ops, Ctrl-C handled, a seeded RNG fixture."""

from __future__ import annotations

import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tensorflow as tf

tf.config.experimental.enable_op_determinism()

# A shell starts background jobs (`cmd &` without job control) with SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler: the interrupt tests would see every Ctrl-C vanish. Give the
# suite the handler a foreground Python has, however it was launched.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
