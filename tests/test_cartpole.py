"""The demo through its real CLI: a few hundred env steps, then --eval and --resume on what it wrote."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import cli

from agents.cartpole import parse_args

SHORT = [
    "--total-env-steps", "400", "--min-replay-steps", "150", "--eval-every", "200", "--eval-episodes", "4",
    "--num-envs", "4", "--batch-size", "8", "--core-units", "16", "--head-units", "16", "--torso-units", "16",
    "--burn-in", "4", "--unroll", "8", "--period", "4", "--replay-capacity", "2000", "--progress", "false",
]  # fmt: skip


def test_demo_cli_writes_summary_plot_and_checkpoint(tmp_path):
    run = cli(*SHORT, "--run-dir", str(tmp_path), "--name", "ci", "--seed", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "ci"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] >= 400 and summary["updates"] > 0
    assert summary["seed"] == 3 and summary["stop_reason"] == "budget"
    assert len(summary["history"]["evals"]) == 2
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (out / "checkpoint").iterdir()} == {"learner.npz", "replay.npz", "loop.json"}
    assert list((out / "tb").iterdir())  # TensorBoard event file

    evaluated = cli("--eval", str(out / "checkpoint"), "--eval-episodes", "3", "--seed", "3")  # its seed
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["episodes"] == 3 and len(result["returns"]) == 3

    resumed = cli(*SHORT[2:], "--total-env-steps", "600", "--run-dir", str(tmp_path), "--name", "ci", "--seed", "3",
                  "--resume", "auto")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    again = json.loads((out / "summary.json").read_text())
    assert again["env_steps"] >= 600 and again["updates"] > summary["updates"]
    assert len(again["history"]["evals"]) == 3  # the first two were carried over


def test_help_lists_every_option_with_its_doc():
    run = cli("--help")
    assert run.returncode == 0
    for text in (
        "--seed",
        "the only seed",
        "--burn-in",
        "paper: 40",
        "--state-strategy",
        "--resume",
        "--eval",
    ):
        assert text in run.stdout


def test_bad_flag_value_names_the_field(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--unroll", "0"])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err == "python -m agents.cartpole: error: --unroll: expected an int >= 1, got 0\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--total-env-steps", "0"], "--total-env-steps: expected an int >= 1, got 0"),
        (["--eval-episodes", "-2"], "--eval-episodes: expected an int >= 1, got -2"),
        (["--actors", "-1"], "--actors: expected an int >= 0, got -1"),
        (["--address", "ray://head:10001"], "--address: 'ray://head:10001' given but actors=0"),
        (["--run-dir", ""], "--run-dir: expected a directory path"),
    ],
)
def test_bad_run_argument_names_the_field(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"python -m agents.cartpole: error: {message}")


def test_args_are_frozen():
    args, _ = parse_args([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.seed = 3  # type: ignore[misc]
