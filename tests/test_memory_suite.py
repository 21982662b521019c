"""The POPGym memory suite: its task table, the metrics of a curve, and --quick end to end (files, JSON, resume, errors)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import gymnasium as gym
import pytest

pytest.importorskip("popgym")

from agents.envs import ensure_registered
from studies import memory_report, sweep
from studies import memory_suite as suite

ISSUE_TASKS = (
    "RepeatPreviousEasy RepeatFirstEasy CountRecallEasy AutoencodeEasy PositionOnlyCartPoleEasy "
    "NoisyPositionOnlyCartPoleEasy MultiarmedBanditEasy HigherLowerEasy MineSweeperEasy BattleshipEasy "
    "ConcentrationEasy RepeatPreviousMedium RepeatFirstMedium"
).split()


def test_the_table_holds_the_issues_tasks_and_the_default_run():
    assert sorted(suite.TASKS) == sorted(ISSUE_TASKS)
    assert set(suite.DEFAULT_TASKS) <= set(suite.TASKS) and set(suite.QUICK_TASKS) <= set(suite.TASKS)


@pytest.mark.parametrize("name", sorted(suite.TASKS))
def test_each_task_is_popgyms_class_with_a_sane_budget(name):
    task = suite.TASKS[name]
    spec = gym.spec(ensure_registered(task.env_id))
    assert str(spec.entry_point).rpartition(":")[2] == name  # the JSON key is POPGym's class name
    assert task.env_steps % task.eval_every == 0 and task.env_steps // task.eval_every >= 10
    suite.Job(task=task, seed=0, env_steps=task.env_steps, eval_every=task.eval_every, eval_episodes=32,
              overrides=task.overrides, run_dir="unused").settings()  # fmt: skip


@pytest.mark.parametrize(
    ("curve", "mmer", "final", "steps_to"),
    [
        ([(500, -0.5), (1000, 0.2), (1500, 0.1)], 0.2, 0.1, None),
        ([(500, 0.95), (1000, 0.5)], 0.95, 0.5, 500),
        ([(500, 0.3), (1000, 0.9), (1500, 1.0)], 1.0, 1.0, 1000),  # 0.9 itself counts
    ],
)
def test_seed_metrics_read_the_curve(curve, mmer, final, steps_to):
    m = memory_report.seed_metrics([{"env_steps": s, "mean_return": r} for s, r in curve])
    assert (m["mmer"], m["final"], m["steps_to"]) == (mmer, final, steps_to)
    assert m["curve"] == [list(p) for p in curve]


# (episodes as [env steps at the end, return], evaluation steps) -> the best mean of the last 100 by then
POPGYM_CASES = [
    ([[10, 1.0], [20, 0.0]], [5], None),  # no episode ended by the only evaluation
    ([[10, 1.0], [20, 0.0]], [15, 25], 1.0),  # at 15: [1.0]; at 25: mean(1, 0) = 0.5
    ([[i, 0.0] for i in range(100)] + [[100 + i, 1.0] for i in range(100)], [99, 149, 199], 1.0),
    ([[i, 0.0] for i in range(100)] + [[100 + i, 1.0] for i in range(50)], [149], 0.5),  # the last 100 only
]


@pytest.mark.parametrize(("episodes", "at", "expected"), POPGYM_CASES)
def test_popgym_metric_is_the_best_mean_of_the_last_100_training_episodes(episodes, at, expected):
    assert memory_report.popgym_metric(episodes, at) == expected


def test_a_target_task_is_solved_at_its_published_figure():
    targets = [suite.TASKS[name] for name in suite.TARGET_TASKS]
    assert {t.name for t in targets} >= {"CountRecallEasy", "RepeatPreviousMedium", "AutoencodeEasy"}
    for task in targets:
        assert task.threshold == task.target.score and task.env_steps <= 1_000_000
        job = suite.Job(task=task, seed=0, env_steps=1000, eval_every=500, eval_episodes=4, overrides={},
                        run_dir="unused", stop_when_solved=True)  # fmt: skip
        assert job.settings()[1].solve_return == task.target.score
    assert suite.TASKS["RepeatFirstEasy"].threshold == 0.9
    _, jobs = suite.parse_args(["--tasks", "targets"])
    assert list(jobs) == list(suite.TARGET_TASKS)


def test_the_targets_table_sets_each_task_beside_its_published_figure():
    entry = {
        "budget": 1_000_000, "seeds": [0, 1], "mmer": memory_report.stat([0.6, 0.5]),
        "popgym": {"values": [0.4, None]}, "threshold": 0.51, "steps_to_threshold": [400_000, None],
        "published": {"score": 0.51, "method": "PPO-LSTM", "budget": "15M", "source": "POPGym table"},
    }  # fmt: skip
    md = memory_report.targets_markdown({"CountRecallEasy": entry, "RepeatFirstEasy": {"published": None}})
    assert (
        "| CountRecallEasy | 1,000,000 | 2 | 0.55 (0.60, 0.50) | 0.40 (0.40) | 400k, — | 0.51 PPO-LSTM, 15M¹ | **yes** |"
        in md
    )
    assert "¹ POPGym table." in md and "RepeatFirstEasy" not in md


@pytest.mark.parametrize(
    ("final", "random", "episodes", "lead"),
    [
        (-0.4, {"mean": -0.5, "std": 0.2}, 16, 2.0),  # 0.1 / (0.2 / 4)
        (-0.6, {"mean": -0.5, "std": 0.2}, 16, -2.0),
        (0.5, {"mean": 0.5, "std": 0.0}, 32, 0.0),
        (0.6, {"mean": 0.5, "std": 0.0}, 32, math.inf),
    ],
)
def test_lead_over_random_is_in_standard_errors_of_one_evaluation(final, random, episodes, lead):
    assert memory_report.lead_over_random(final, random, episodes=episodes) == pytest.approx(lead)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (RepeatFirstEasy and RepeatPreviousEasy, seed 0, 1000 env steps): its output dir."""
    out = tmp_path_factory.mktemp("suite")
    assert suite.main(["--quick", "--out", str(out)]) == 0
    return out


def test_quick_run_writes_table_json_and_plot(quick):
    report = json.loads((quick / "memory_suite.json").read_text())
    assert set(report) == set(suite.QUICK_TASKS)
    for name in suite.QUICK_TASKS:
        entry = report[name]
        assert entry["env_id"] == f"popgym-{name}-v0" and entry["budget"] == 1000
        assert len(entry["mmer"]["values"]) == len(entry["seeds"]) == 1  # one value per seed
        curve = entry["curves"]["0"]
        assert [s // 500 for s, _ in curve] == [1, 2] and entry["eval_episodes"] == 8
        returns = [r for _, r in curve]
        assert entry["mmer"]["values"] == [max(returns)] and entry["mmer"]["mean"] == max(returns)
        assert entry["final"]["values"] == [returns[-1]]
        assert entry["threshold"] == 0.9 and entry["published"] is None
        assert entry["steps_to_threshold"] == [next((s for s, r in curve if r >= 0.9), None)]
        assert entry["popgym"]["values"][0] is not None and -1 <= entry["popgym"]["values"][0] <= 1
        assert -1.0 <= entry["random_return"]["mean"] <= 0.0 and entry["random_return"]["episodes"] == 20
        assert entry["overrides"]["core_units"] == 16 and entry["command"].startswith(suite.PROG + " --quick")
    md = (quick / "memory_suite.md").read_text()
    assert "| RepeatFirstEasy | 1,000 | 500 × 8 | 1 |" in md and "| RepeatPreviousEasy |" in md
    row = next(line for line in md.splitlines() if line.startswith("| RepeatFirstEasy |")).split(" | ")
    entry = report["RepeatFirstEasy"]
    lead = memory_report.lead_over_random(entry["final"]["mean"], entry["random_return"], episodes=8)
    assert row[9].strip("*").endswith(f"({round(lead, 1) + 0.0:.1f} SE)")  # the lead column
    assert (quick / "memory_suite.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_skips_finished_runs_and_resumes_a_killed_one_from_its_checkpoint(quick, capsys):
    before = json.loads((quick / "memory_suite.json").read_text())
    runs = quick / "runs"
    finished = runs / "RepeatFirstEasy-s0" / "summary.json"
    mtime = finished.stat().st_mtime_ns
    (runs / "RepeatPreviousEasy-s0" / "summary.json").unlink()  # killed after its last checkpoint
    capsys.readouterr()
    assert suite.main(["--quick", "--out", str(quick), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resume: 1 finished runs reused, 1 to run" in out
    assert f"resumed from {runs / 'RepeatPreviousEasy-s0' / 'checkpoint'} at 1000 env steps" in out
    assert finished.stat().st_mtime_ns == mtime
    after = json.loads((quick / "memory_suite.json").read_text())
    for name in suite.QUICK_TASKS:  # the same runs: nothing trained again
        assert (
            after[name]["curves"] == before[name]["curves"]
            and after[name]["updates"] == before[name]["updates"]
        )
    assert suite.main(["--quick", "--out", str(quick), "--resume"]) == 0
    assert "resume: 2 finished runs reused, 0 to run" in capsys.readouterr().out


def test_resume_refuses_the_run_directory_of_another_budget(quick, tmp_path, capsys):
    """A killed run's checkpoint is resumed only by the job it was trained for, and another job never
    overwrites it: under a 500-step budget the 1000-step run's directory is refused, one line naming it and
    what differs, exit 2, before anything trains (its curve would pass for the shorter run's)."""
    runs = tmp_path / "runs"
    out_dir = runs / "RepeatFirstEasy-s0"
    shutil.copytree(quick / "runs" / "RepeatFirstEasy-s0", out_dir)
    (out_dir / "summary.json").unlink()  # killed after its last checkpoint
    argv = ["--quick", "--tasks", "RepeatFirstEasy", "--out", str(tmp_path), "--run-dir", str(runs)]
    for resume in (["--resume"], []):
        capsys.readouterr()
        assert suite.main([*argv, "--env-steps", "500", "--eval-every", "250", *resume]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            f"{suite.PROG}: error: run directory {out_dir}: its job.json records another job: "
        )
        assert "env_steps 1000 there, 500 here; eval_every 500 there, 250 here" in err and "\n" not in err
    assert json.loads((out_dir / suite.JOB_FILE).read_text())["env_steps"] == 1000
    assert (out_dir / "checkpoint" / "loop.json").is_file() and not (tmp_path / "memory_suite.json").exists()


def test_a_run_directory_of_the_suite_before_the_sweep_runner_is_still_its_jobs(tmp_path):
    """The job file the suite wrote before studies.sweep (runs/pair_stored/CountRecallEasy-s0/job.json, as
    it is on disk): the same job, resumable from its checkpoint, finished once its summary is there."""
    recorded = (
        '{"env": "popgym-CountRecallEasy-v0", "seed": 0, "env_steps": 200000, "eval_every": 10000, '
        '"eval_episodes": 32, "overrides": {"gamma": 0.0}}'
    )
    argv = ["--tasks", "CountRecallEasy", "--seeds", "0", "--env-steps", "200000", "--eval-every", "10000"]
    _, jobs = suite.parse_args([*argv, "--run-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    job = jobs["CountRecallEasy"][0]
    assert job.out_dir == tmp_path / "CountRecallEasy-s0"
    (job.out_dir / "checkpoint").mkdir(parents=True)
    (job.out_dir / "checkpoint" / "loop.json").write_text("{}")
    (job.out_dir / suite.JOB_FILE).write_text(recorded)
    assert sweep.resumable(job) and suite.finished(job) is None
    assert suite.run_env_id(job.out_dir) == "popgym-CountRecallEasy-v0"
    config, options = job.settings()
    args = {k: getattr(options, k) for k in ("total_env_steps", "eval_every", "eval_episodes")}
    summary = {"config": config.to_json(), "env": job.task.env_id, "seed": 0, "args": args,
               "stop_reason": "budget"}  # fmt: skip
    (job.out_dir / "summary.json").write_text(json.dumps(summary))
    assert suite.finished(job) == json.loads(json.dumps(summary))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "RepeatFirstEasy", "Nope"], "--tasks: unknown task 'Nope'; choices: RepeatFirstEasy,"),
        (["--seeds", "0", "-1"], "--seeds: expected ints >= 0, got [0, -1]"),
        (["--workers", "0"], "--workers: expected an int >= 1, got 0"),
        (["--eval-episodes", "0"], "--eval-episodes: expected an int >= 1, got 0"),
        (["--env-steps", "x"], "--env-steps: invalid int value: 'x'"),
    ],
)
def test_bad_flags_are_one_line_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        suite.main([*argv, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{suite.PROG}: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_defaults_and_quick_never_write_the_committed_results():
    args, jobs = suite.parse_args([])
    assert args.tasks == list(suite.DEFAULT_TASKS) and args.seeds == [0, 1, 2] and args.workers == 2
    assert args.out == Path("benchmarks/results") and args.eval_episodes == 32
    assert [(j.env_steps, j.eval_every) for j in jobs["RepeatFirstEasy"]] == [(200_000, 8_000)] * 3
    args, jobs = suite.parse_args(["--quick"])
    assert Path(tempfile.gettempdir()) in args.out.parents and args.run_dir == args.out / "runs"
    args.out.rmdir()
    args, jobs = suite.parse_args(["--tasks", "all", "--env-steps", "200000"])
    assert list(jobs) == list(suite.TASKS)
    assert {(j.env_steps, j.eval_every) for j in jobs["RepeatFirstMedium"]} == {(200_000, 10_000)}


def test_an_interrupted_run_stops_the_suite_with_130_and_no_report(tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM during a run: the harness writes its final checkpoint and returns; the suite then
    exits 130 without reporting the partial run (``--resume`` continues it)."""
    calls = []
    monkeypatch.setattr(
        suite, "run_job", lambda job, **kw: calls.append(job.key) or {"stop_reason": "interrupted"}
    )
    assert suite.main(["--quick", "--out", str(tmp_path)]) == 130
    assert [k[:2] for k in calls] == [("RepeatFirstEasy", 0)] and not (
        tmp_path / "memory_suite.json"
    ).exists()
    assert "interrupted" in capsys.readouterr().err


def _job(tmp_path, *, stop_when_solved):
    task = suite.TASKS["RepeatFirstEasy"]
    return suite.Job(task=task, seed=0, env_steps=1000, eval_every=500, eval_episodes=8, overrides={},
                     run_dir=str(tmp_path), stop_when_solved=stop_when_solved)  # fmt: skip


@pytest.mark.parametrize(
    ("stop_reason", "stop_when_solved", "reused"),
    [("budget", False, True), ("solved", False, False), ("budget", True, True), ("solved", True, True),
     ("interrupted", True, False)],
)  # fmt: skip
def test_resume_reuses_a_run_stopped_at_its_solve_only_under_stop_when_solved(
    tmp_path, stop_reason, stop_when_solved, reused
):
    job = _job(tmp_path, stop_when_solved=stop_when_solved)
    config, options = job.settings()
    assert options.stop_when_solved is stop_when_solved
    job.out_dir.mkdir(parents=True)
    args = {k: getattr(options, k) for k in ("total_env_steps", "eval_every", "eval_episodes")}
    summary = {"config": config.to_json(), "env": job.task.env_id, "seed": 0, "args": args,
               "stop_reason": stop_reason}  # fmt: skip
    (job.out_dir / "summary.json").write_text(json.dumps(summary))
    assert (suite.finished(job) is not None) is reused


def test_stop_when_solved_is_a_flag_and_marks_the_final_column(tmp_path):
    _, jobs = suite.parse_args(["--stop-when-solved", "--out", str(tmp_path)])
    assert all(j.stop_when_solved for runs in jobs.values() for j in runs)
    _, jobs = suite.parse_args(["--out", str(tmp_path)])
    assert not any(j.stop_when_solved for runs in jobs.values() for j in runs)
    entry = {"budget": 1000, "eval_every": 500, "eval_episodes": 8, "seeds": [0], "overrides": {},
             "mmer": memory_report.stat([0.95]), "final": memory_report.stat([0.95]), "steps_to_0.9": [500],
             "random_return": {"mean": -0.5, "std": 0.2}, "config": {}}  # fmt: skip
    assert "‡" not in memory_report.markdown({"RepeatFirstEasy": entry})
    md = memory_report.markdown({"RepeatFirstEasy": {**entry, "stop_when_solved": True}})
    assert (
        "| 0.95 ± 0.00 (0.95) | 0.05 | 0.95 ± 0.00 ‡ | 0.5k (≥ 0.9) |" in md
        and "‡ run with `--stop-when-solved`" in md
        and "†" not in md
    )
    older = {k: v for k, v in entry.items() if k != "config"}  # an entry from before the config was kept
    assert "| RepeatFirstEasy † |" in memory_report.markdown({"RepeatFirstEasy": older})


@pytest.mark.parametrize(
    "final, random, cell",
    [
        (-0.001, {"mean": 0.0, "std": 1.0}, "+0.00 (0.0 SE)"),  # rounds to zero: no minus sign
        (-0.5, {"mean": -0.5, "std": 0.5}, "+0.00 (0.0 SE)"),
        (0.5, {"mean": 0.0, "std": 1.0}, "**+0.50 (3.0 SE)**"),  # 0.5 / (1 / √36) = 3: clear, bold
        (-0.25, {"mean": 0.0, "std": 1.0}, "-0.25 (-1.5 SE)"),
        (0.1, {"mean": 0.0, "std": 0.0}, "**+0.10 (inf SE)**"),  # a random policy that never varies
    ],
)
def test_lead_cell_by_hand(final, random, cell):
    assert memory_report.lead_cell(final, random, episodes=36) == cell


def test_set_puts_config_overrides_on_every_task(tmp_path):
    _, jobs = suite.parse_args(
        ["--tasks", "CountRecallEasy", "--set", 'state_strategy="zero"', "--out", str(tmp_path)]
    )
    for job in jobs["CountRecallEasy"]:
        config = job.settings()[0]
        assert config.state_strategy == "zero" and config.gamma == 0.0  # the task's override stays


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("eval_every=3", "--set: expected R2D2Config fields only"),
        ("gamma=x", "--set: expected a JSON value for gamma"),
    ],
)
def test_a_bad_set_is_one_line_exit_2(item, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        suite.main(["--set", item, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not (tmp_path / "out").exists()


def test_the_tables_print_no_negative_zero_and_no_empty_targets_table():
    entry = {"budget": 1000, "eval_every": 500, "eval_episodes": 8, "seeds": [0], "overrides": {}, "config": {},
             "mmer": memory_report.stat([1.0]), "final": memory_report.stat([1.0]), "threshold": 0.9,
             "steps_to_threshold": [500], "random_return": {"mean": -0.5, "std": 0.2}, "published": None}  # fmt: skip
    assert "| 0.00 |" in memory_report.markdown(
        {"RepeatFirstEasy": entry}
    ) and "-0.00" not in memory_report.markdown({"RepeatFirstEasy": entry})
    assert memory_report.targets_markdown({"RepeatFirstEasy": entry}) == ""
