"""benchmarks.peer_race and its parts: the tasks both sides get, burnin's timed run, medians, the report, bad flags, and the peer's imports."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest
from helpers import outcome

from agents import train
from agents.r2d2.config import preset
from benchmarks import peer_race, race_report, time_split

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = os.environ.get("BURNIN_PEER_PYTHON", "/work/peer-venv/bin/python")


def _options(tmp_path, **changes):
    values = dict(
        peer_python=sys.executable, run_dir=tmp_path, budget=None, eval_every=5000, eval_episodes=20,
        peer_threads=2, quick=False,
    )  # fmt: skip
    return peer_race.RaceOptions(**{**values, **changes})


@pytest.mark.parametrize(
    "name, env_id, bar, budget, gamma",
    [
        ("MaskedCartPole", "MaskedCartPole-v1", 475.0, 150_000, None),
        ("RepeatFirstEasy", "popgym-RepeatFirstEasy-v0", 0.9, 200_000, 0.0),
        ("RepeatPreviousEasy", "popgym-RepeatPreviousEasy-v0", 0.9, 200_000, 0.0),
        ("PositionOnlyCartPoleEasy", "popgym-PositionOnlyCartPoleEasy-v0", 0.9, 200_000, None),
        ("VelocityOnlyCartpoleEasy", "popgym-VelocityOnlyCartpoleEasy-v0", 0.9, 200_000, None),
    ],
)
def test_each_task_runs_burnins_cli_with_the_suites_overrides_and_gives_the_peer_the_same(
    name, env_id, bar, budget, gamma, tmp_path
):
    task = peer_race.race_tasks()[name]
    assert (task.env_id, task.bar, task.budget) == (env_id, bar, budget)
    flags = [
        *task.burnin_flags,
        *peer_race.burnin_argv(task, 3, _options(tmp_path)),
        "--run-dir",
        str(tmp_path),
    ]
    args, config = train.parse_args(
        flags
    )  # burnin's side is the train CLI's flags, checked as it checks them
    assert (args.seed, args.total_env_steps, args.solve_return, args.stop_when_solved) == (
        3,
        budget,
        bar,
        True,
    )
    assert (args.eval_every, args.eval_episodes, args.checkpoint_every) == (5000, 20, 0)
    assert config.gamma == (preset(args.preset).gamma if gamma is None else gamma)
    peer = peer_race.peer_argv(task, 3, _options(tmp_path))
    assert peer[peer.index("--bar") + 1] == str(bar) and peer[peer.index("--task") + 1] == env_id
    assert (("--set" in peer) and f"gamma={gamma}" in peer) == (gamma is not None)
    command = task.burnin_command
    assert command.startswith(
        "python -m agents.cartpole" if name == "MaskedCartPole" else "python -m agents.train"
    )


def test_burnins_run_reports_its_time_to_the_bar_and_where_it_went(tmp_path):
    """One tiny run through the timed CLI: the bar is low enough for the first evaluation to reach it."""
    task = peer_race.RaceTask("Tiny", "MaskedCartPole-v1", 5.0, 400, ("--env", "MaskedCartPole-v1"))
    stale = tmp_path / "burnin" / "Tiny-s0"  # left by an interrupted race: a resumed race starts it afresh
    stale.mkdir(parents=True)
    (stale / "summary.json").write_text("{}")
    result = peer_race.race_burnin(
        task, 0, _options(tmp_path, budget=400, eval_every=200, eval_episodes=2, quick=True)
    )
    assert "error" not in result, result
    assert result["solved_at_env_steps"] == result["evals"][0]["env_steps"] == result["env_steps"]
    split = result["breakdown"]
    assert split["updates"] == result["updates_to_bar"] > 0
    parts = sum(split["seconds"][p] for p in time_split.PARTS)
    assert parts == pytest.approx(split["wall_s"]) and split["wall_s"] <= result["wall_s"]
    assert all(split["seconds"][p] >= 0 for p in ("updates", "acting", "evaluation", "sampling"))
    assert split["seconds"]["updates"] >= split["first_call_s"]["updates"] > split["update_ms"] / 1e3
    assert result["command"].startswith(
        "python -m agents.train --env MaskedCartPole-v1 --min-replay-steps 100"
    )


def _run(task, seed, burnin, peer):
    def side(x):
        if x == "error":
            return {"error": "exit 1: boom"}
        steps, wall = x
        return {"solved_at_env_steps": steps, "wall_to_bar_s": wall, "env_steps": 1000, "wall_s": 99.0}

    return {"task": task, "seed": seed, "burnin": side(burnin), "peer": side(peer)}


@pytest.mark.parametrize(
    "values, expected",
    [
        ([3, 1, 2], 2),
        ([None, 1, 2], 2),
        ([None, None, 1], None),
        ([1, 2], 1.5),
        ([1, None], None),
        ([], None),
    ],
)
def test_median_counts_an_unsolved_run_as_slower_than_any_solved_one(values, expected):
    assert race_report.median_or_inf(values) == expected


def test_report_gives_medians_ratios_and_failures_as_table_and_plot(tmp_path):
    runs = [
        _run("A", 0, (100, 10.0), (300, 40.0)),
        _run("A", 1, (200, 20.0), (None, None)),
        _run("A", 2, "error", (100, 20.0)),
        _run("B", 0, (None, None), (50, 5.0)),
    ]
    report = {"command": "x", "budgets": {"A": 1000, "B": 2000}, "runs": runs}
    report["medians"] = race_report.summarise(runs, {"A": 475.0, "B": 0.9})
    a, b = report["medians"]["A"], report["medians"]["B"]
    assert a["burnin"] == {"env_steps_to_bar": 150, "wall_to_bar_s": 15.0, "solved": 2, "runs": 2}
    assert a["peer"] == {"env_steps_to_bar": 300, "wall_to_bar_s": 40.0, "solved": 2, "runs": 3}
    assert a["wall_ratio"] == 15.0 / 40.0
    assert b["burnin"]["env_steps_to_bar"] is None and b["wall_ratio"] is None
    text = race_report.markdown(report)
    assert "| A | 475 | 3 | 150 | 300 | 15.0 | 40.0 | 0.38 | 2/2, 2/3 |" in text
    assert "| B | 0.9 | 1 | > 2,000 | 50 |" in text and "| A | 2 | failed | failed | 100 | 20.0 |" in text
    race_report.plot(report, tmp_path / "race.png")
    assert (tmp_path / "race.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0"], "--seeds: expected an int >= 1, got 0"),
        (["--budget", "0"], "--budget: expected an int >= 1, got 0"),
        (["--peer-threads", "0"], "--peer-threads: expected an int >= 1, got 0"),
        (["--tasks", "Pong"], "argument --tasks: invalid choice: 'Pong'"),
        (
            ["--peer-python", "/nonexistent/python"],
            "--peer-python: '/nonexistent/python' cannot import torch, ",
        ),
        # The test interpreter has no torch: it is one the harness must refuse, naming what is missing.
        ([], "(ModuleNotFoundError: No module named 'torch'); make its venv as benchmarks/README.md says"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    base = ["--peer-python", sys.executable, "--run-dir", str(tmp_path / "race"), "--quick"]
    code, _, err = outcome(peer_race.main, [*base, *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{peer_race.PROG}: error: ") and message in err, err
    assert not (tmp_path / "race").exists()


def test_a_run_dir_holding_an_earlier_race_is_refused(capsys, tmp_path):
    (tmp_path / "peer_race.json").write_text("{}")
    code, _, err = outcome(
        peer_race.main, ["--peer-python", sys.executable, "--run-dir", str(tmp_path)], capsys
    )
    assert code == 2 and "--run-dir: " in err and "holds an earlier race" in err, err


def test_the_peer_imports_neither_burnin_nor_tensorflow():
    """It runs under an interpreter of its own, which has neither."""
    tree = ast.parse((ROOT / "benchmarks" / "recurrent_ppo_peer.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    tops = {name.split(".")[0] for name in names}
    assert not tops & {"burnin", "agents", "studies", "tensorflow", "keras", "benchmarks"}
    assert {"torch", "sb3_contrib", "gymnasium"} <= tops


@pytest.mark.slow
@pytest.mark.skipif(not Path(PEER_PYTHON).exists(), reason="no peer interpreter (BURNIN_PEER_PYTHON)")
def test_quick_race_end_to_end(capsys, tmp_path):
    argv = ["--peer-python", PEER_PYTHON, "--quick", "--peer-threads", "1", "--run-dir", str(tmp_path)]
    code, out, err = outcome(peer_race.main, argv, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "peer_race.json").read_text())
    assert [(r["task"], r["seed"]) for r in report["runs"]] == [("MaskedCartPole", 0), ("RepeatFirstEasy", 0)]
    peer = report["runs"][1]["peer"]
    assert peer["settings"]["gamma"] == 0.0 and "CartPoleNoVel-v1" in peer["source"]
    assert (tmp_path / "peer_race.md").read_text() in out and (tmp_path / "peer_race.png").is_file()


def test_resume_keeps_the_finished_runs_and_reruns_the_failed_and_the_changed(capsys, tmp_path, monkeypatch):
    """A race spans sessions: --resume reruns a row only if a side failed, burnin would now train with
    another config, or the peer would get other flags; another protocol is refused in one line."""
    calls = []

    def fake(side):
        def race(task, seed, options):
            calls.append((side, task.name, seed))
            out = {"argv": peer_race.peer_argv(task, seed, options)} if side == "peer" else {}
            if side == "burnin":
                out["config"] = peer_race.expected_config(task, seed, options)
            return {**out, "solved_at_env_steps": 100, "wall_to_bar_s": 1.0, "env_steps": 100, "wall_s": 1.0}

        return race

    monkeypatch.setattr(peer_race, "peer_versions", lambda python: ({"torch": "x"}, ""))
    monkeypatch.setattr(peer_race, "race_burnin", fake("burnin"))
    monkeypatch.setattr(peer_race, "race_peer", fake("peer"))
    monkeypatch.setattr(peer_race.race_report, "plot", lambda report, path: None)
    base = [
        "--peer-python",
        sys.executable,
        "--tasks",
        "MaskedCartPole",
        "--seeds",
        "3",
        "--run-dir",
        str(tmp_path),
    ]
    assert outcome(peer_race.main, base, capsys)[0] == 0 and len(calls) == 6
    state = tmp_path / "peer_race.json"
    report = json.loads(state.read_text())
    report["runs"][0]["peer"] = {"error": "exit 1: boom"}  # seed 0: the peer failed
    report["runs"][1]["burnin"]["config"]["batch_size"] = 7  # seed 1: trained with another config then
    state.write_text(json.dumps(report))
    calls.clear()
    code, _, err = outcome(peer_race.main, [*base, "--resume"], capsys)
    assert code == 0, err
    assert calls == [(s, "MaskedCartPole", k) for k in (0, 1) for s in ("burnin", "peer")]  # seed 2 stands
    report = json.loads(state.read_text())
    assert [r["seed"] for r in report["runs"]] == [0, 1, 2] and len(report["sessions"]) == 2
    code, _, err = outcome(peer_race.main, [*base, "--resume", "--eval-episodes", "10"], capsys)
    assert code == 2 and err.strip().endswith("ran with another eval-episodes"), err
    code, _, err = outcome(peer_race.main, ["--peer-python", sys.executable, "--resume"], capsys)
    assert code == 2 and "--resume: needs the --run-dir of an earlier race" in err, err
