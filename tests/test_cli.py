"""The scripts' command lines (issue 11, item 7): a bad flag or value, or a bad checkpoint, is one line on
stderr naming the flag (or the file), the value and what is expected, exit 2, no traceback; a failed
resume leaves no empty run directory; an interrupted run exits 130 after its final checkpoint; ``--eval``
follows a crashed save's fallback (item 11) and refuses NaN weights (item 8)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import CLI_FLAGS as FLAGS
from helpers import assert_one_line_error, outcome, run_python

from agents import cartpole, cli, train
from agents.r2d2 import TrainLoop
from studies import ablation, delta_q_probe, stored_start


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of the FLAGS config (an untrained loop: enough to evaluate and resume)."""
    _, config = cartpole.parse_args(FLAGS)
    loop = TrainLoop(config, cartpole.make_env(config.num_envs, seed=0), seed=0)
    for _ in range(40):
        loop.iterate()
    path = tmp_path_factory.mktemp("cli") / "run" / "checkpoint"
    loop.save(path, extra={"history": {}, "wall_time_s": 1.0})
    loop.actor.env.close()
    return path


def corrupted(checkpoint: Path, tmp_path: Path, how: str) -> Path:
    """A copy of ``checkpoint`` spoiled ``how``."""
    path = tmp_path / how / "checkpoint"
    shutil.copytree(checkpoint, path)
    if how == "nan-weights":
        with np.load(path / "learner.npz") as data:
            arrays = {k: data[k] for k in data.files}
        arrays["online/0"] = np.full_like(arrays["online/0"], np.nan)
        np.savez(path / "learner.npz", **arrays)
    elif how == "truncated-learner":
        data = (path / "learner.npz").read_bytes()
        (path / "learner.npz").write_bytes(data[: len(data) // 2])
    elif how == "bad-json":
        (path / "loop.json").write_text('{"format": 1, "config": ')
    elif how == "missing-replay":
        (path / "replay.npz").unlink()
    elif how == "config-key":
        meta = json.loads((path / "loop.json").read_text())
        del meta["config"]
        (path / "loop.json").write_text(json.dumps(meta))
    return path


BAD_FLAGS = [
    (["--seed", "-1"], "--seed: expected an int >= 0 and <= 4294967295, got -1"),
    (["--seed", str(2**32)], "--seed: expected an int >= 0 and <= 4294967295, got 4294967296"),
    (["--solve-return", "-inf"], "--solve-return: expected a finite number, got -inf"),
    (["--eval", "x", "--resume", "auto"], "--eval: 'x' given with --resume auto; --eval only evaluates"),
    (["--eval", "x", "--actors", "2"], "--eval: 'x' given with --actors 2; --eval only evaluates"),
    (["--core", "dense", "--core-layers", "gru"], "--core-layers: gru given with --core dense, which has no"),
    # the preset's own value
    (["--core", "dense", "--core-layers", "lstm"], "--core-layers: lstm given with --core dense"),
    (["--core-layers", "gru", "--core", "dense"], "--core-layers: gru given with --core dense"),
    (
        ["--replay-capacity", "2000", "--min-replay-steps", "2001"],
        "--min-replay-steps: expected an int <= 2000 (the replay holds at most",
    ),
    (["--allow-mismatch", "env"], "--allow-mismatch: 'env' given without --resume or --eval"),
    (["--allow-mismatch", "env,bogus", "--resume", "auto"], "--allow-mismatch: expected entries among"),
    (["--batch-size", "0"], "--batch-size: expected an int >= 1, got 0"),
    (["--period", "1000"], "--period: expected an int <= unroll (40), got 1000"),
    (["--gamma", "2"], "--gamma: expected a finite number >= 0.0 and <= 1.0, got 2.0"),
    (["--learning-rate", "nan"], "--learning-rate: expected a finite number > 0.0, got nan"),
    (["--core", "foo"], "--core: expected one of 'lstm', 'dense', got 'foo'"),
    (["--torso-units", "16", "0"], "--torso-units: expected a tuple of ints >= 1, got (16, 0)"),
    (["--epsilon-base", "-0.5"], "--epsilon-base: expected a finite number >= 0.0 and <= 1.0, got -0.5"),
    (["--min-replay-steps", "-1"], "--min-replay-steps: expected an int >= 0, got -1"),
    (["--state-strategy", "zero", "--refresh-states", "true"], "--refresh-states: only meaningful with"),
    (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["--progress", "maybe"], "argument --progress: expected true/false, got 'maybe'"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--resume", "/nonexistent/ckpt"], "--resume: expected a checkpoint directory, got '/nonexistent/ckpt'"),
    (["--eval", "/nonexistent/ckpt"], "--eval: expected a checkpoint directory, got '/nonexistent/ckpt'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_cartpole_bad_flag_is_one_line_and_exit_2(argv, message, capsys):
    code, _, err = outcome(cartpole.main, argv, capsys)
    assert code == 2
    assert_one_line_error(err, "cartpole", message)


def test_a_float_flag_takes_a_value_that_starts_with_a_minus():
    """Issue 24: argparse alone reads '-1e3' or '-inf' after a flag as an unknown option."""
    args, _ = cartpole.parse_args([*FLAGS, "--solve-return", "-1e3", "--gamma", "0.9"])
    assert args.solve_return == -1000.0


def test_eval_or_resume_of_a_directory_that_is_no_checkpoint(tmp_path, capsys):
    code, _, err = outcome(cartpole.main, ["--eval", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_error(
        err, "cartpole", f"--eval: expected a checkpoint directory, got '{tmp_path}'", "no loop.json"
    )
    argv = ["--run-dir", str(tmp_path / "runs"), "--name", "x", "--resume", "auto"]
    code, _, err = outcome(cartpole.main, argv, capsys)
    assert code == 2
    assert_one_line_error(err, "cartpole", "--resume: expected a checkpoint directory", "runs/x/checkpoint")
    assert not (tmp_path / "runs").exists()


def test_no_traceback_from_the_real_command_line():
    run = subprocess.run(
        [sys.executable, "-m", "agents.cartpole", "--batch-size", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert run.stderr == "python -m agents.cartpole: error: --batch-size: expected an int >= 1, got 0\n"


@pytest.mark.parametrize(
    ("how", "texts"),
    [
        ("nan-weights", ("learner.npz", "array 'online/0': expected finite values, got [nan")),
        ("truncated-learner", ("learner.npz", "truncated or corrupt")),
        ("bad-json", ("--eval: expected a checkpoint directory", "loop.json", "unreadable (JSONDecodeError")),
        ("missing-replay", None),  # --eval needs no replay
        ("config-key", ("loop.json", "field 'config': expected a JSON object")),
    ],
)
def test_eval_of_a_bad_checkpoint_names_the_file(checkpoint, tmp_path, capsys, how, texts):
    code, out, err = outcome(cartpole.main, ["--eval", str(corrupted(checkpoint, tmp_path, how))], capsys)
    if texts is None:
        assert code == 0 and json.loads(out.splitlines()[-1])["episodes"] == 20
        return
    assert code == 2, out
    assert_one_line_error(err, "cartpole", *texts)
    assert "mean_return" not in out


def test_eval_follows_the_fallback_of_a_crashed_save(checkpoint, tmp_path, capsys):
    """Item 11: between the two renames of a save only the previous checkpoint exists; --eval reads it
    and says so."""
    previous = tmp_path / ".checkpoint.previous"
    shutil.copytree(checkpoint, previous)
    code, out, err = outcome(
        cartpole.main, ["--eval", str(tmp_path / "checkpoint"), "--eval-episodes", "2"], capsys
    )
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["checkpoint"] == str(previous) and result["episodes"] == 2


@pytest.mark.parametrize("how", ["nan-weights", "truncated-learner", "missing-replay"])
def test_a_failed_resume_leaves_no_run_directory(checkpoint, tmp_path, capsys, how):
    bad = corrupted(checkpoint, tmp_path, how)
    runs = tmp_path / "runs"
    argv = [*FLAGS, "--total-env-steps", "200", "--run-dir", str(runs), "--name", "r", "--resume", str(bad)]
    code, _, err = outcome(cartpole.main, argv, capsys)
    assert code == 2
    assert_one_line_error(err, "cartpole", str(bad))
    assert not runs.exists()


def test_resume_says_which_directory_it_read(checkpoint, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    shutil.copytree(checkpoint, runs / "r" / ".checkpoint.previous")  # a crash between the renames
    argv = [*FLAGS, "--total-env-steps", "200", "--run-dir", str(runs), "--name", "r", "--resume", "auto"]
    code, out, err = outcome(cartpole.main, argv, capsys)
    assert code == 0, err
    previous = runs / "r" / ".checkpoint.previous"
    assert (
        f"resumed from {previous} (the previous checkpoint: {runs / 'r' / 'checkpoint'} was not complete)"
        in out
    )
    assert (
        sorted(p.name for p in (runs / "r").iterdir() if p.name.startswith(".")) == []
    )  # the save tidied up


def test_an_interrupted_run_exits_130_after_its_final_checkpoint(tmp_path, capsys, monkeypatch):
    real_iterate = TrainLoop.iterate
    calls = []

    def iterate(self):
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real_iterate(self)

    monkeypatch.setattr(TrainLoop, "iterate", iterate)
    argv = [*FLAGS, "--total-env-steps", "100000", "--run-dir", str(tmp_path), "--name", "i"]
    code, out, _ = outcome(cartpole.main, argv, capsys)
    assert code == 130
    assert "interrupted: writing a final checkpoint" in out
    meta = json.loads((tmp_path / "i" / "checkpoint" / "loop.json").read_text())
    assert meta["actor"]["steps"] == 29
    assert json.loads((tmp_path / "i" / "summary.json").read_text())["stop_reason"] == "interrupted"


def test_sigterm_exits_130_after_its_final_checkpoint(tmp_path):
    argv = [*FLAGS, "--total-env-steps", "1000000", "--run-dir", str(tmp_path), "--name", "t"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents.cartpole", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in proc.stdout:  # wait until it trains: the first evaluation
            if line.startswith("eval @"):
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted: writing a final checkpoint" in out
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["stop_reason"] == "interrupted"
    assert (tmp_path / "t" / "checkpoint" / "learner.npz").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0", "-1"], "--seeds: expected ints >= 0, got [-1]"),
        (["--set", "gamma=2"], "--set: gamma: expected a finite number >= 0.0 and <= 1.0, got 2"),
        (["--set", "gamma=abc"], "--set: expected a JSON value for gamma, got 'abc'"),
        (
            ["--set", "bogus=1"],
            "--set: expected FIELD=VALUE with FIELD an R2D2Config or run option, got 'bogus=1'",
        ),
        (["--set", "eval_every=0"], "--set: eval_every: expected an int >= 1, got 0"),
        (["--workers", "0"], "--workers: expected an int >= 1, got 0"),
        (["--env-steps", "10"], "--env-steps: expected an int >= 1000, got 10"),
    ],
)
def test_ablation_bad_flag_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    base = ["--strategies", "zero", "--env-steps", "1000", "--workers", "1", "--run-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    code, _, err = outcome(ablation.main, [*base, *argv], capsys)
    assert code == 2
    assert_one_line_error(err, "studies.ablation", message)
    assert not (tmp_path / "runs").exists()


def test_delta_q_probe_bad_run_dir_or_checkpoint_is_one_line(checkpoint, tmp_path, capsys):
    code, _, err = outcome(delta_q_probe.main, ["--run-dir", str(tmp_path / "none")], capsys)
    assert code == 2
    assert_one_line_error(err, "studies.delta_q_probe", "--run-dir: expected a directory of runs")
    runs = tmp_path / "runs"
    bad = corrupted(checkpoint, runs, "truncated-learner")
    argv = ["--run-dir", str(runs), "--batches", "1", "--out", str(tmp_path / "out")]
    code, _, err = outcome(delta_q_probe.main, argv, capsys)
    assert code == 2
    assert_one_line_error(err, "studies.delta_q_probe", str(bad / "learner.npz"), "truncated or corrupt")


def test_a_script_prints_no_onednn_dtype_notice_when_its_graphs_transpose_bools():
    """TensorFlow logs "oneDNN supports DT_BOOL only on platforms with AVX-512" (ERROR level, once per
    process) at the first bool transpose, on this AVX-512 host too; run_script spends it with stderr muted,
    so the learner's masks do not print it mid-run. stderr must stay open for the script's own errors."""
    body = (
        "import sys\n"
        "from agents.cli import import_tensorflow_quietly, run_script\n"
        "import_tensorflow_quietly()\n"
        "import numpy as np, tensorflow as tf\n"
        "def body():\n"
        "    mask = tf.constant(np.ones((4, 3), bool))\n"
        "    assert tf.function(lambda m: tf.transpose(tf.logical_not(m)))(mask).shape == (3, 4)\n"
        "    print('own error line', file=sys.stderr)\n"
        "    return 0\n"
        "sys.exit(run_script('probe', body))\n"
    )
    run = run_python(body)
    assert run.returncode == 0, run.stderr
    assert "oneDNN supports" not in run.stderr
    assert "own error line" in run.stderr


def test_a_script_without_script_imports_prints_no_tensorflow_start_up_logs():
    """A benchmark whose own imports are TensorFlow-free reaches TensorFlow first through run_script's
    imports; they used to print TensorFlow's C++ start-up lines (oneDNN, cuda drivers, CPU features)
    above every --help. run_script imports it quietly first."""
    body = (
        "import sys\n"
        "from agents.cli import run_script\n"
        "def body():\n"
        "    import tensorflow as tf\n"
        "    tf.constant(1.0) + 1.0\n"
        "    return 0\n"
        "sys.exit(run_script('probe', body))\n"
    )
    run = run_python(body)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""


@pytest.mark.parametrize("asked", [False, True])
def test_run_script_sets_the_thread_pools_only_when_asked(monkeypatch, asked):
    """Process-wide TensorFlow settings are the entry point's to ask for (issue 25); every CLI here asks."""
    calls = []
    monkeypatch.setattr(cli, "configure_threads", lambda: calls.append("threads"))
    assert cli.run_script("probe", lambda: 0, tf_threads=asked) == 0
    assert calls == (["threads"] if asked else [])


@pytest.mark.parametrize(
    "script", [train, cartpole, ablation, delta_q_probe, stored_start], ids=lambda m: m.__name__
)
def test_every_cli_asks_for_the_thread_pools(monkeypatch, script):
    seen = []
    # cartpole.main is train.main with its flags
    for module in (train, ablation, delta_q_probe, stored_start):
        monkeypatch.setattr(module, "run_script", lambda prog, body, **kwargs: seen.append(kwargs) or 0)
    assert script.main([]) == 0
    assert seen == [{"tf_threads": True}]


@pytest.mark.parametrize(
    ("module", "script"), [("__main__", True), ("__mp_main__", True), ("agents.x", False)]
)
def test_script_imports_import_tensorflow_first_only_in_a_script(monkeypatch, module, script):
    calls = []
    monkeypatch.setattr(cli, "import_tensorflow_quietly", lambda: calls.append("tf"))
    with cli.script_imports("probe", module):
        calls.append("block")
    assert calls == (["tf", "block"] if script else ["block"])
