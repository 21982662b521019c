"""What the agent's recurrent core can learn of CountRecallEasy when told the answer: the same torso and LSTM trained supervised on whole episodes (the true start) and on the learner's windows from a zero start (``python -m studies.count_capacity``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agents.cli import ArgumentParser, run_script, script_imports

PROG = "python -m studies.count_capacity"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from studies.memory_probe import count_recall_labels

ENV_ID = "popgym-CountRecallEasy-v0"
EPISODE = 51
"""Steps with an answer in a CountRecallEasy episode (52 cards: the last one is the final observation)."""


def episodes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` episodes of random play: one-hot (dealt, query) ``[count, 51, 4]`` and the answers ``[count, 51]``."""
    import gymnasium as gym

    from agents.envs import ensure_registered

    env = gym.make(ensure_registered(ENV_ID), disable_env_checker=True).unwrapped
    rng = np.random.default_rng(seed)
    obs = np.zeros((count, EPISODE, 2), np.int64)
    for i in range(count):
        o, _ = env.reset(seed=int(rng.integers(2**31)))
        for t in range(EPISODE):  # the answer does not change what is dealt: any action will do
            obs[i, t] = o
            o, *_ = env.step(0)
    labels = np.stack([count_recall_labels(o) for o in obs])
    return np.concatenate([np.eye(2)[obs[..., 0]], np.eye(2)[obs[..., 1]]], -1).astype(np.float32), labels


def windows(x: np.ndarray, y: np.ndarray, *, burn_in: int, period: int) -> tuple[np.ndarray, np.ndarray]:
    """The learner's windows of each episode (starts at multiples of ``period``, ``burn_in`` + 40 steps,
    zero-padded at the end) with the burn-in's answers masked as −1: what a zero start sees."""
    length = burn_in + 40
    xs, ys = [], []
    for start in range(0, EPISODE - burn_in, period):
        xw = np.zeros((len(x), length, x.shape[2]), x.dtype)
        yw = np.full((len(x), length), -1, np.int64)
        part = slice(start, min(start + length, EPISODE))
        n = part.stop - part.start
        xw[:, :n], yw[:, burn_in:n] = x[:, part], y[:, part][:, burn_in:]
        xs.append(xw)
        ys.append(yw)
    return np.concatenate(xs), np.concatenate(ys)


def train(mode: str, *, sequences: int, epochs: int, units: int, seed: int) -> list[dict[str, float]]:
    """Test accuracy per epoch of Dense(64) → LSTM(units) → Dense(128) → 27 logits, Adam 3e-4, batch 32, on
    ``mode`` 'episode' (whole episodes from a zero state) or 'window' (burn-in 10, period 10, zero start)."""
    import keras

    keras.utils.set_random_seed(seed)
    x, y = episodes(sequences, seed)
    xt, yt = episodes(max(sequences // 8, 64), seed + 1)
    if mode == "window":
        (x, y), (xt, yt) = windows(x, y, burn_in=10, period=10), windows(xt, yt, burn_in=10, period=10)
    model = keras.Sequential([
        keras.Input(x.shape[1:]), keras.layers.Dense(64, activation="relu"),
        keras.layers.LSTM(units, return_sequences=True), keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(27),
    ])  # fmt: skip
    model.compile(keras.optimizers.Adam(3e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weight, weight_t = (y >= 0).astype(np.float32), yt >= 0
    curve = []
    for epoch in range(epochs):
        model.fit(x, np.maximum(y, 0), sample_weight=weight, batch_size=32, epochs=1, verbose=0)
        right = model.predict(xt, batch_size=256, verbose=0).argmax(-1) == yt
        accuracy = float(right[weight_t].mean())
        curve.append(
            {"updates": (epoch + 1) * -(-len(x) // 32), "accuracy": accuracy, "return": 2 * accuracy - 1}
        )
    return curve


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.split(" (")[0])
    parser.add_argument("--sequences", type=int, default=4000, help="training episodes [4000]")
    parser.add_argument("--epochs", type=int, default=30, help="passes over them [30]")
    parser.add_argument("--units", type=int, default=128, help="LSTM units (the popgym preset's) [128]")
    parser.add_argument("--seed", type=int, default=0, help="data and weight seed [0]")
    parser.add_argument("--quick", action="store_true", help="CI: 64 episodes, 1 epoch, 8 units")
    parser.add_argument("--out", type=Path, default=None, help="write count_capacity.json here")
    args: argparse.Namespace = parser.parse_args(argv)
    if args.quick:
        args.sequences, args.epochs, args.units = 64, 1, 8
    parser.require_at_least(args, {"sequences": 16, "epochs": 1, "units": 1})
    result: dict[str, Any] = {"command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])}
    for mode in ("episode", "window"):
        t0 = time.perf_counter()
        curve = train(mode, sequences=args.sequences, epochs=args.epochs, units=args.units, seed=args.seed)
        result[mode] = {"curve": curve, "wall_s": time.perf_counter() - t0}
        print(f"{mode}: test accuracy {curve[-1]['accuracy']:.3f} (return {curve[-1]['return']:+.3f}) after "
              f"{curve[-1]['updates']} updates; best {max(c['accuracy'] for c in curve):.3f}")  # fmt: skip
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "count_capacity.json").write_text(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag (one line on stderr)."""
    return run_script(PROG, lambda: _main(argv), tf_threads=True)


if __name__ == "__main__":
    sys.exit(main())
