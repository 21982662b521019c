"""Tests for the ablation study's metrics, table and CLI, on masked CartPole and on a POPGym env."""

from __future__ import annotations

import json
import math

import pytest

from studies import ablation


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
    s["history"]["evals"][0]["true_delta_q_first"] = 5.0  # first half of the evaluations: left out
    s["history"]["evals"][2].update(true_delta_q_first=0.25, true_delta_q_last=float("nan"))
    m = ablation.run_metrics(s)
    assert m["delta_q_first"] == pytest.approx(0.2)  # second half: updates 3 and 4, NaN skipped
    assert m["delta_q_last"] == pytest.approx(0.6)
    assert m["true_delta_q_first"] == 0.25 and math.isnan(m["true_delta_q_last"])
    assert m["final_return"] == 300.0 and m["best_return"] == 480.0
    assert m["steps_to_solve"] == 20
    assert ablation.run_metrics(s, solve_return=None)["steps_to_solve"] is None
    # trapezoid over (0,100) (10,100) (20,480) (30,300), divided by 30
    assert m["auc_return"] == pytest.approx((10 * 100 + 10 * 290 + 10 * 390) / 30)


def test_aggregate_and_markdown():
    runs = {
        "stored_burn_in": {
            0: {"delta_q_first": 0.1, "delta_q_last": 0.2, "true_delta_q_first": 1.0, "true_delta_q_last": 2.0,
                "final_return": 500.0, "best_return": 500.0, "auc_return": 300.0, "steps_to_solve": 40_000},
            1: {"delta_q_first": 0.3, "delta_q_last": 0.4, "true_delta_q_first": 3.0, "true_delta_q_last": 4.0,
                "final_return": 400.0, "best_return": 500.0, "auc_return": 200.0, "steps_to_solve": None},
        }
    }  # fmt: skip
    table = ablation.aggregate(runs)
    row = table["stored_burn_in"]
    assert row["delta_q_first"]["mean"] == pytest.approx(0.2)
    assert row["delta_q_first"]["std"] == pytest.approx(0.1)
    assert row["steps_to_solve"] == [40_000, None]
    meta = {
        "env_steps": 1000,
        "seeds": [0, 1],
        "command": "python -m studies.ablation",
        "solve_return": 475.0,
    }
    md = ablation.markdown(table, meta)
    assert (
        "| stored state + burn-in | 0.2 ± 0.1 | 0.3 ± 0.1 | 2 ± 1 | 3 ± 1 | 450 ± 50 | 500 ± 0 | 250 ± 50 | 40k, — |"
        in md
    )
    assert "| steps to 475 |" in md
    assert "python -m studies.ablation" in md


def test_all_nan_is_reported_as_missing():
    runs = {"zero": {0: dict.fromkeys(ablation.STAT_KEYS, math.nan) | {"steps_to_solve": None}}}
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


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ("MaskedCartPole-v1", "ablation"),  # the study's names from before --env
        ("popgym-RepeatFirstMedium-v0", "ablation_RepeatFirstMedium"),  # POPGym's class name
        ("popgym:popgym-RepeatPreviousMedium-v0", "ablation_RepeatPreviousMedium"),
        ("CartPole-v1", "ablation_CartPole-v1"),
        ("ALE/Pong-v5", "ablation_ALE_Pong-v5"),
        ("mypkg:My.Env-v0", "ablation_My_Env-v0"),  # no '.': the suffixes go after it
    ],
)
def test_result_names(env, name):
    assert ablation.result_name(env) == name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--env", "popgym-Nope-v0"], "--env: 'popgym-Nope-v0' is not a registered gymnasium id"),
        (["--env", "CartPole-v1", "--preset", "big"], "--preset: expected one of"),
        (["--probe-batches", "-1"], "--probe-batches: expected an int >= 0, got -1"),
    ],
)
def test_bad_env_or_preset_is_one_line_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        ablation.main([*argv, "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_quick_study_on_popgym_measures_both_readings_and_resumes(tmp_path, capsys):
    """--quick on RepeatFirstMedium (415-step episodes): preset popgym, solved at 0.9, ΔQ against the stored
    and against the true state for both strategies, at every evaluation; --resume then reruns nothing."""
    out = tmp_path / "ablation_RepeatFirstMedium"
    argv = ["--quick", "--env", "popgym-RepeatFirstMedium-v0", "--out", str(out)]
    assert ablation.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    meta = report["meta"]
    assert (meta["env"], meta["preset"], meta["solve_return"], meta["seeds"]) == (
        "popgym-RepeatFirstMedium-v0", "popgym", 0.9, [0]
    )  # fmt: skip
    assert set(report["table"]) == set(ablation.QUICK_STRATEGIES)
    for strategy in ablation.QUICK_STRATEGIES:
        summary = json.loads((tmp_path / "runs" / f"{strategy}-s0" / "summary.json").read_text())
        evals = summary["history"]["evals"]
        assert [e["env_steps"] // 500 for e in evals] == [1, 2]
        assert all(e["true_delta_q_rows"] > 0 and e["true_delta_q_last"] >= 0 for e in evals)
        assert 0.5 < evals[-1]["true_delta_q_mid_episode"] <= 1.0  # 415-step episodes: most windows
        metrics = report["runs"][strategy]["0"]
        assert (
            metrics["true_delta_q_last"] == evals[-1]["true_delta_q_last"]
        )  # the second half: the last eval
        assert metrics["best_return"] == max(e["mean_return"] for e in evals)
        assert metrics["steps_to_solve"] == next(
            (e["env_steps"] for e in evals if e["mean_return"] >= 0.9), None
        )
    md = out.with_suffix(".md").read_text()
    assert md.startswith("popgym-RepeatFirstMedium-v0 (preset popgym), 1000 env steps per run")
    assert "| steps to 0.9 |" in md and "| stored state + burn-in |" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert ablation.main([*argv, "--resume"]) == 0
    assert "resume: 2 finished runs reused, 0 to run" in capsys.readouterr().out
