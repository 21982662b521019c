"""The 2020 Keras 2 stateful-LSTM article's five hidden-state cases, redone on Keras 3 with burnin.state."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import burnin

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZA"
WINDOW = 3
BATCH = 6
NUM_CLASSES = len(ALPHABET)  # 27: each position of the string is a class


def alphabet_data() -> tuple[np.ndarray, np.ndarray]:
    """Windows of 3 letters (positions / 27) ``[24, 3, 1]`` and the next letter one-hot ``[24, 27]``."""
    positions = np.arange(len(ALPHABET))
    starts = np.arange(len(ALPHABET) - WINDOW)
    x = np.stack([positions[s : s + WINDOW] for s in starts]).astype(np.float32) / NUM_CLASSES
    y = keras.utils.to_categorical(positions[starts + WINDOW], NUM_CLASSES).astype(np.float32)
    return x[..., None], y


def build_article_model(seed: int = 0) -> keras.Model:
    """``Input(batch_shape=(6, 3, 1)) -> LSTM(16, stateful=True, name="lstm") -> Dense(27, softmax)``."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(batch_shape=(BATCH, WINDOW, 1))
    x = keras.layers.LSTM(16, stateful=True, name="lstm")(inputs)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="article")
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return burnin.guard_batch_size(model)


@dataclasses.dataclass
class ArticleResult:
    """Column 0 of the six rows for each case, and whether each expectation held."""

    values: dict[int, np.ndarray]
    checks: dict[int, bool]
    descriptions: dict[int, str]

    @property
    def all_hold(self) -> bool:
        return all(self.checks.values())


DESCRIPTIONS = {
    1: "after training, no reset: the 6 rows differ (each row has its own state)",
    2: "the same call again: values change (the state moved on)",
    3: "state restored to the one saved before case 1: identical to case 1",
    4: "state reset to zeros: all 6 rows identical",
    5: "every row set to row 0's saved state: every row equals case 1's row 0",
}


def run_cases(model: keras.Model, predict: Callable[[np.ndarray], np.ndarray]) -> ArticleResult:
    """Run the article's five cases with ``predict`` (one call on 6 copies of the first window)."""
    x, _ = alphabet_data()
    probe = np.repeat(x[:1], BATCH, axis=0)  # 6 copies of "ABC"
    saved = burnin.get_states(model)

    out1 = predict(probe)
    out2 = predict(probe)
    burnin.set_states(model, saved)
    out3 = predict(probe)
    burnin.reset_states(model)
    out4 = predict(probe)
    burnin.set_states(model, burnin.broadcast_row(saved, 0))
    out5 = predict(probe)

    checks = {
        1: len({row.tobytes() for row in out1}) == BATCH,
        2: not np.array_equal(out1, out2),
        3: np.array_equal(out3, out1),
        4: all(np.array_equal(row, out4[0]) for row in out4),
        5: all(np.array_equal(row, out1[0]) for row in out5),
    }
    values = {i: out[:, 0].copy() for i, out in enumerate((out1, out2, out3, out4, out5), start=1)}
    return ArticleResult(values=values, checks=checks, descriptions=DESCRIPTIONS)


def train_article_model(seed: int = 0, epochs: int = 2) -> keras.Model:
    """Train the article's model on the alphabet task: ``epochs`` epochs, batch 6, no shuffling."""
    model = build_article_model(seed)
    x, y = alphabet_data()
    model.fit(x, y, epochs=epochs, batch_size=BATCH, shuffle=False, verbose=0)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.article", description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and training")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (the article used 2)")
    args = parser.parse_args(argv)

    model = train_article_model(args.seed, args.epochs)
    result = run_cases(model, lambda p: model.predict(p, batch_size=BATCH, verbose=0))
    np.set_printoptions(precision=8, suppress=True, linewidth=120)
    print("Keras 3 redo of the stateful-LSTM article: column 0 of predict() on 6 copies of 'ABC'\n")
    for case in range(1, 6):
        verdict = "holds" if result.checks[case] else "FAILS"
        print(f"case {case}: {result.descriptions[case]}")
        print(f"  {result.values[case]}")
        print(f"  expectation {verdict} (bitwise)\n")
    print("all five expectations hold" if result.all_hold else "SOME EXPECTATIONS FAIL")
    return 0 if result.all_hold else 1


if __name__ == "__main__":
    sys.exit(main())
