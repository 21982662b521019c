"""Tests for the ablation study's metrics, table and CLI."""

from __future__ import annotations

import json
import math

import pytest

from agents import ablation


def summary(evals, learner, wall=10.0, updates=100):
    return {
        "history": {
            "evals": [{"env_steps": s, "mean_return": r} for s, r in evals],
            "learner": [
                {"updates": u, "delta_q_first": first, "delta_q_last": last} for u, first, last in learner
            ],
        },
        "wall_time_s": wall,
        "updates": updates,
    }


def test_run_metrics_by_hand():
    s = summary(
        evals=[(10, 100.0), (20, 480.0), (30, 300.0)],
        learner=[(1, 9.0, 9.0), (2, 9.0, 9.0), (3, 0.2, 0.5), (4, float("nan"), 0.7)],
    )
    m = ablation.run_metrics(s)
    assert m["delta_q_first"] == pytest.approx(0.2)  # second half: updates 3 and 4, NaN skipped
    assert m["delta_q_last"] == pytest.approx(0.6)
    assert m["final_return"] == 300.0 and m["best_return"] == 480.0
    assert m["steps_to_475"] == 20
    # trapezoid over (0,100) (10,100) (20,480) (30,300), divided by 30
    assert m["auc_return"] == pytest.approx((10 * 100 + 10 * 290 + 10 * 390) / 30)


def test_aggregate_and_markdown():
    runs = {
        "stored_burn_in": {
            0: {"delta_q_first": 0.1, "delta_q_last": 0.2, "final_return": 500.0, "best_return": 500.0,
                "auc_return": 300.0, "steps_to_475": 40_000},
            1: {"delta_q_first": 0.3, "delta_q_last": 0.4, "final_return": 400.0, "best_return": 500.0,
                "auc_return": 200.0, "steps_to_475": None},
        }
    }  # fmt: skip
    table = ablation.aggregate(runs)
    row = table["stored_burn_in"]
    assert row["delta_q_first"]["mean"] == pytest.approx(0.2)
    assert row["delta_q_first"]["std"] == pytest.approx(0.1)
    assert row["steps_to_475"] == [40_000, None]
    md = ablation.markdown(
        table, {"env_steps": 1000, "seeds": [0, 1], "command": "python -m agents.ablation"}
    )
    assert "| stored state + burn-in | 0.2 ± 0.1 | 0.3 ± 0.1 | 450 ± 50 | 250 ± 50 | 40k, — |" in md
    assert "python -m agents.ablation" in md


def test_all_nan_is_reported_as_missing():
    runs = {"zero": {0: {k: math.nan for k in ("delta_q_first", "delta_q_last", "final_return", "best_return",
                                                 "auc_return")} | {"steps_to_475": None}}}  # fmt: skip
    table = ablation.aggregate(runs)
    assert table["zero"]["delta_q_first"]["mean"] is None
    assert "n/a" in ablation.markdown(table, {"env_steps": 1, "seeds": [0], "command": "c"})


def test_cli_runs_and_writes_outputs(tmp_path):
    out = tmp_path / "abl"
    code = ablation.main(
        [
            "--strategies", "stored_burn_in", "feed_forward", "--seeds", "0", "--env-steps", "1000",
            "--workers", "1", "--out", str(out), "--run-dir", str(tmp_path / "runs"),
            "--set", "min_replay_steps=200", "eval_every=500", "num_envs=4", "replay_capacity=4000",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["table"]) == {"stored_burn_in", "feed_forward"}
    assert report["runs"]["stored_burn_in"]["0"]["updates"] > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| feed-forward net, same budget |" in out.with_suffix(".md").read_text()


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        ablation.main(["--workers", "0"])
