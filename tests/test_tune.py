"""agents.tune: the objective, the drawn configs, the printed flags, bad flags, and a quick search that resumes."""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

import pytest
from helpers import outcome

pytest.importorskip("optuna")

import optuna

from agents import train, tune
from agents.envs import MASKED_CARTPOLE_ID
from agents.r2d2.config import preset


def _summary(evals, *, env_steps=1000, wall=50.0):
    entries = [{"env_steps": s, "wall_time_s": w, "mean_return": r} for s, w, r in evals]
    return {"history": {"evals": entries}, "env_steps": env_steps, "wall_time_s": wall}


@pytest.mark.parametrize(
    "evals, objective, cap, expected",
    [
        ([(100, 5.0, 10.0), (200, 9.0, 480.0), (300, 12.0, 500.0)], "steps", None, 200.0),  # first at the bar
        ([(100, 5.0, 10.0), (200, 9.0, 480.0)], "wall", None, 9.0),
        ([(100, 5.0, 475.0)], "steps", None, 100.0),  # at the bar counts
        ([(100, 5.0, 0.0), (200, 9.0, 237.5)], "steps", None, 2000 * 1.5),  # unsolved, half way: budget × 1.5
        ([(100, 5.0, 100.0), (200, 9.0, 50.0)], "wall", None, 50.0 * 2.0),  # no progress: the time used × 2
        ([(100, 5.0, 100.0), (200, 9.0, 50.0)], "wall", 80.0, 80.0 * 2.0),  # stopped before the cap: the cap
        ([(100, 5.0, 0.0), (200, 9.0, 237.5)], "wall", 30.0, 50.0 * 1.5),  # the time used, past the cap
        ([], "steps", None, 4000.0),  # no evaluation at all
    ],
)
def test_score_is_the_cost_to_the_bar_and_ranks_unsolved_runs_after_solved_ones(
    evals, objective, cap, expected
):
    summary = _summary(evals)  # used 1000 env steps, 50 s; the budget is 2000
    assert tune.score(summary, bar=475.0, objective=objective, budget=2000, time_cap_s=cap) == pytest.approx(
        expected
    )


def _search(**changes):
    values = dict(
        env=MASKED_CARTPOLE_ID, preset="masked-cartpole", pins={}, fields=tuple(tune.SEARCH_SPACE),
        budget=10_000, bar=475.0, objective="steps", eval_every=1000, eval_episodes=2, seed=0,
    )  # fmt: skip
    return tune.Search(**{**values, **changes})


def test_a_drawn_config_round_trips_through_the_printed_train_flags(tmp_path):
    """The best trial is printed as train CLI flags: parsed back, they give the trial's config."""
    params = {name: choices[-1] for name, choices in tune.SEARCH_SPACE.items()}
    params["unroll"] = 10  # below the preset's period 20: the period follows it
    config = tune.draw(optuna.trial.FixedTrial(params), _search(pins={"torso_units": (32, 32)}))
    assert (config.unroll, config.period, config.torso_units) == (10, 10, (32, 32))
    flags = tune.train_flags(config, "masked-cartpole")
    assert "--period" in flags and "--torso-units" in flags and "--lstm-impl" not in flags
    argv = ["--env", MASKED_CARTPOLE_ID, "--preset", "masked-cartpole", *flags, "--run-dir", str(tmp_path)]
    assert train.parse_args(argv)[1] == config
    assert tune.train_flags(preset("popgym"), "popgym") == []


def test_a_drawn_config_the_replay_cannot_fill_is_refused():
    params = {"min_replay_steps": 5_000}
    with pytest.raises(ValueError, match="min_replay_steps"):
        tune.draw(
            optuna.trial.FixedTrial(params), _search(pins={"replay_capacity": 2_000}, fields=tuple(params))
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trials", "0"], "--trials: expected an int >= 1, got 0"),
        (["--budget", "0"], "--budget: expected an int >= 1, got 0"),
        (["--seed", str(2**32)], "--seed: expected an int <= 4294967295"),
        (["--seed", str(2**32 - 1), "--seeds", "2"], "--seed: expected an int <= 4294967294 (--seeds 2"),
        (["--seeds", "0"], "--seeds: expected an int >= 1, got 0"),
        (["--time-cap", "0"], "--time-cap: expected seconds > 0, got 0.0"),
        (["--set", "bogus=1"], "--set: expected FIELD=VALUE with FIELD an R2D2Config or run option"),
        (["--set", "total_env_steps=5"], "--set: total_env_steps: run options are flags here"),
        (["--set", "batch_size=0"], "--set: batch_size: expected an int >= 1, got 0"),
        (["--search", "gamma", "--set", "gamma=0.5"], "--search: every field is pinned by --set"),
        (["--objective", "speed"], "argument --objective: invalid choice: 'speed'"),
        (["--storage", "nosuchdb://x"], "--storage: 'nosuchdb://x'"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    base = ["--env", MASKED_CARTPOLE_ID, "--run-dir", str(tmp_path), "--quick"]
    code, _, err = outcome(tune.main, [*base, *argv], capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{tune.PROG}: error: {message}"), err


def test_an_env_with_no_bar_needs_solve_return(capsys, tmp_path):
    argv = ["--env", "popgym-RepeatFirstEasy-v0", "--quick", "--run-dir", str(tmp_path)]
    code, _, err = outcome(tune.main, argv, capsys)
    assert (code, err) == (2, f"{tune.PROG}: error: --solve-return: 'popgym-RepeatFirstEasy-v0' has no "
                               "reward_threshold in its spec: give the bar\n")  # fmt: skip


def test_without_optuna_it_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    code, _, err = outcome(tune.main, ["--env", MASKED_CARTPOLE_ID], capsys)
    assert (code, err) == (2, f"{tune.PROG}: error: needs Optuna: pip install -e '.[tune]'\n")


def test_quick_search_prints_train_flags_resumes_and_refuses_another_search(capsys, tmp_path):
    # One trial keeps the test short; --quick's two are the same path twice.
    base = ["--env", MASKED_CARTPOLE_ID, "--quick", "--trials", "1", "--run-dir", str(tmp_path)]
    base += ["--solve-return", "15"]
    code, out, err = outcome(tune.main, base, capsys)
    assert code == 0, err
    command = next(line for line in out.splitlines() if line.startswith("python -m agents.train "))
    study_dir = tmp_path / "tune" / "MaskedCartPole-v1-masked-cartpole-steps"
    best = json.loads((study_dir / "best.json").read_text())
    assert best["command"] == command and "--solve-return 15.0" in command
    assert sorted(p.name for p in study_dir.glob("trial-*")) == ["trial-0"]
    assert not (study_dir / "trial-0" / "checkpoint").exists()
    assert (study_dir / "trial-0" / "summary.json").is_file()
    # The same command again: the study is done, nothing runs; the same best.
    code, out, err = outcome(tune.main, base, capsys)
    assert code == 0, err
    assert "resuming study 'MaskedCartPole-v1-masked-cartpole-steps': 1 of 1 trials finished" in out
    assert command in out.splitlines()
    # Another budget under the same study name is another search.
    code, _, err = outcome(tune.main, [*base, "--budget", "200"], capsys)
    assert code == 2 and "is another search (its budget differ)" in err, err


class _Trial:
    """A stand-in for an Optuna trial: records reports, and prunes once told to."""

    def __init__(self, prune_after: int) -> None:
        self.reports: list[tuple[float, int]] = []
        self.prune_after = prune_after

    def report(self, value: float, step: int) -> None:
        self.reports.append((value, step))

    def should_prune(self) -> bool:
        return len(self.reports) >= self.prune_after


def test_the_pruning_hook_reports_each_evaluation_once_and_stops_the_run_when_told():
    trial, run = _Trial(prune_after=2), SimpleNamespace(history=SimpleNamespace(evals=[]))
    hook = tune.PruneOnEvaluations(trial)
    hook.on_start(run)
    assert hook.on_step(run, None) is None and trial.reports == []  # no new evaluation
    run.history.evals.append({"mean_return": 9.0})
    assert hook.on_step(run, None) is None and trial.reports == [(-9.0, 0)]
    assert hook.on_step(run, None) is None and len(trial.reports) == 1  # the same one is not reported again
    run.history.evals.append({"mean_return": 12.0})
    assert hook.on_step(run, None) == "pruned" and trial.reports[-1] == (-12.0, 1)


def test_the_pruning_hook_stops_a_run_past_its_time_cap_and_offsets_its_reports():
    trial = _Trial(prune_after=99)
    run = SimpleNamespace(history=SimpleNamespace(evals=[]), wall_before=0.0, start=time.perf_counter())
    hook = tune.PruneOnEvaluations(trial, offset=7, time_cap_s=3600.0)
    hook.on_start(run)
    run.history.evals.append({"mean_return": 5.0})
    assert hook.on_step(run, None) is None and trial.reports == [(-5.0, 7)]  # the second seed's first
    run.wall_before = 3601.0  # resumed past the cap
    assert hook.on_step(run, None) == "over time"


@pytest.mark.parametrize(
    "objective, values, cap, expected",
    [
        ("wall", [], None, None),
        ("wall", [40.0, 30.0, None], None, 60.0),  # twice the best finished trial
        ("steps", [40.0], None, None),  # env steps are no time
        ("wall", [40.0], 50.0, 50.0),  # --time-cap below twice the best
        ("wall", [20.0], 50.0, 40.0),
        ("steps", [], 50.0, 50.0),
    ],
)
def test_the_time_cap_is_the_flag_or_twice_the_best_trial_under_the_wall_objective(
    objective, values, cap, expected
):
    complete, pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    trials = [SimpleNamespace(value=v, state=complete if v is not None else pruned) for v in values]
    search = _search(objective=objective, time_cap_s=cap)
    assert tune.time_cap(SimpleNamespace(trials=trials), search) == expected


def test_a_new_study_first_tries_the_preset_itself():
    search = _search(fields=("env_steps_per_update", "core_units", "learning_rate"), pins={"core_units": 100})
    assert tune.preset_trial(search) == {"env_steps_per_update": 8.0, "learning_rate": 1e-3}  # 100: off grid


def test_a_trial_of_two_seeds_runs_each_in_its_own_dir_and_scores_their_median(capsys, tmp_path):
    argv = ["--env", MASKED_CARTPOLE_ID, "--quick", "--trials", "1", "--seeds", "2", "--seed", "5"]
    code, _, err = outcome(tune.main, [*argv, "--run-dir", str(tmp_path), "--pruner", "none"], capsys)
    assert code == 0, err
    study_dir = tmp_path / "tune" / "MaskedCartPole-v1-masked-cartpole-steps"
    runs = sorted(p.parent.name for p in study_dir.glob("trial-0/seed-*/summary.json"))
    assert runs == ["seed-5", "seed-6"]
    seeds = [json.loads((study_dir / "trial-0" / r / "summary.json").read_text())["seed"] for r in runs]
    assert seeds == [5, 6]
    trial = optuna.load_study(
        study_name=study_dir.name, storage=f"sqlite:///{study_dir / 'study.db'}"
    ).trials[0]
    assert (
        trial.value == pytest.approx(sum(trial.user_attrs["scores"]) / 2)
        and len(trial.user_attrs["scores"]) == 2
    )
