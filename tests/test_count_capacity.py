"""studies.count_capacity: the supervised data are CountRecall's answers, the windows mask the burn-in, and --quick runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("popgym")

from studies import count_capacity as cc


def test_episodes_carry_one_hot_cards_and_their_counts():
    x, y = cc.episodes(3, seed=0)
    assert x.shape == (3, cc.EPISODE, 4) and y.shape == (3, cc.EPISODE)
    assert (x[..., :2].sum(-1) == 1).all() and (x[..., 2:].sum(-1) == 1).all()
    dealt, query = x[..., :2].argmax(-1), x[..., 2:].argmax(-1)
    for i in range(3):  # y_t = how often step t's query card was dealt up to step t
        expected = [(dealt[i, : t + 1] == query[i, t]).sum() for t in range(cc.EPISODE)]
        assert y[i].tolist() == expected


def test_windows_mask_the_burn_in_and_the_padding():
    x = np.arange(cc.EPISODE, dtype=np.float32).reshape(1, -1, 1)
    y = np.arange(cc.EPISODE).reshape(1, -1)
    xw, yw = cc.windows(x, y, burn_in=10, period=10)
    assert xw.shape == (5, 50, 1)  # starts 0, 10, 20, 30, 40
    assert (yw[:, :10] == -1).all()  # the burn-in is never scored
    assert yw[1, 10] == 20 and xw[1, 0, 0] == 10  # the window from 10 scores step 20 first
    assert (yw[4, 11:] == -1).all() and yw[4, 10] == 50  # the last window runs off the episode's end


def test_quick_run_writes_both_curves(tmp_path):
    assert cc.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "count_capacity.json").read_text())
    for mode in ("episode", "window"):
        assert 0.0 <= result[mode]["curve"][-1]["accuracy"] <= 1.0
