"""The article's five stateful-LSTM cases, bitwise, through predict, eager calls and tf.function."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import burnin
from agents import article


@pytest.fixture(scope="module")
def trained():
    model = article.train_article_model(seed=0, epochs=2)
    return model, burnin.get_states(model)


def test_alphabet_data_matches_the_article():
    x, y = article.alphabet_data()
    assert x.shape == (24, 3, 1) and y.shape == (24, 27)
    np.testing.assert_allclose(x[0, :, 0], np.array([0, 1, 2]) / 27)  # "ABC"
    assert y[0].argmax() == 3  # next letter "D"
    np.testing.assert_allclose(x[-1, :, 0], np.array([23, 24, 25]) / 27)  # "XYZ"
    assert y[-1].argmax() == 26  # the closing "A"


@pytest.mark.parametrize("mode", ["predict", "eager", "function"])
def test_five_cases_hold_bitwise(trained, mode):
    model, after_training = trained
    burnin.set_states(model, after_training)  # each mode starts where training left the state
    if mode == "predict":
        predict = lambda p: model.predict(p, batch_size=article.BATCH, verbose=0)
    elif mode == "eager":
        predict = lambda p: keras.ops.convert_to_numpy(model(p))
    else:
        fn = tf.function(lambda p: model(p))
        predict = lambda p: fn(tf.constant(p)).numpy()
    result = article.run_cases(model, predict)
    assert result.checks == {1: True, 2: True, 3: True, 4: True, 5: True}
    # The printed values are the ones compared: case 3 repeats case 1 exactly.
    np.testing.assert_array_equal(result.values[3], result.values[1])
    np.testing.assert_array_equal(result.values[5], np.full(6, result.values[1][0]))
    assert len(set(result.values[4].tolist())) == 1


def test_cli_prints_all_cases(capsys):
    assert article.main(["--seed", "1"]) == 0
    out = capsys.readouterr().out
    for case in range(1, 6):
        assert f"case {case}:" in out
    assert out.count("expectation holds (bitwise)") == 5
    assert "all five expectations hold" in out
