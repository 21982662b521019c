"""A user's run is never lost (issue 24): the train CLI refuses to start afresh over an earlier run and locks
its run directory; a failure after set-up saves the checkpoint, the summary (with the error) and the plot,
then exits 1 with one line naming the env and its step; evaluation is bounded; a checkpoint records its env,
layout, seed and config, and resume or eval against another is refused in one line; the silent wrong runs,
tracebacks and unclear messages the issue lists are one-line errors that say what to do."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gymnasium import spaces
from helpers import (
    CLI_FLAGS,
    FaultyEnv,
    assert_one_line_error,
    fault_env_id,
    outcome,
    run_loop,
    small_config,
    within,
)

from agents import cartpole, train
from agents.envs import MASKED_CARTPOLE_ID, ensure_registered, make_vector_env
from agents.r2d2 import Actor, R2D2Config, TrainLoop, evaluate
from agents.r2d2 import actor as actor_module
from agents.spaces import observation_encoding

QUICK = [*CLI_FLAGS, "--total-env-steps", "200"]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), to show a refused command changed nothing."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished masked-CartPole run (seed 0) of the CLI: RUN_DIR/a with its checkpoint, summary and plot."""
    runs = tmp_path_factory.mktemp("runs")
    assert cartpole.main([*QUICK, "--run-dir", str(runs), "--name", "a"]) == 0
    return runs / "a"


# ------------------------------------------------------------------ 1. never overwrite


def test_running_a_finished_runs_command_again_is_refused_and_changes_nothing(finished, capsys):
    before = tree_digest(finished)
    code, _, err = outcome(cartpole.main, [*QUICK, "--run-dir", str(finished.parent), "--name", "a"], capsys)
    assert code == 2
    assert_one_line_error(
        err, "cartpole", f"run directory {finished} holds an earlier run", "--resume auto", "--name"
    )
    assert tree_digest(finished) == before


def test_resuming_another_checkpoint_into_a_used_run_dir_is_refused(finished, tmp_path, capsys):
    other = tmp_path / "b"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    argv = [*QUICK, "--run-dir", str(tmp_path), "--name", "b", "--resume", str(finished / "checkpoint")]
    code, _, err = outcome(cartpole.main, argv, capsys)
    assert code == 2
    assert_one_line_error(
        err, "cartpole", f"run directory {other} holds an earlier run (summary.json)", "write over it"
    )
    assert (other / "summary.json").read_text() == "{}"


def test_a_second_run_into_a_run_dir_in_use_is_refused(tmp_path, capsys):
    from agents.rundir import LOCK_NAME, locked

    out = tmp_path / "c"
    out.mkdir()
    with locked(out):  # stands in for a first run, still going
        code, _, err = outcome(cartpole.main, [*QUICK, "--run-dir", str(tmp_path), "--name", "c"], capsys)
        assert code == 2
        assert_one_line_error(
            err, "cartpole", f"run directory {out} is in use by another run (pid {os.getpid()})"
        )
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert not (out / LOCK_NAME).exists()  # the lock goes with its run
    with locked(out):  # and can be taken again
        pass


# ------------------------------------------------------------------ 2. a failure saves what it can


FAILURES = [
    # (env fault or None, extra flags, text the one line must hold)
    ("step-raises", [], "step(): RuntimeError: the simulator lost its connection"),
    ("obs-shape", [], "step(): ValueError"),
    ("obs-nan", [], "observation batch holds [nan"),
    ("reward-nan", [], "reward batch holds [nan"),
    ("obs-out-of-space", [], "observation batch holds [7"),
    (None, ["--checkpoint-every", "100"], "OSError: [Errno 28] No space left on device"),
]


@pytest.mark.parametrize(("fault", "flags", "text"), FAILURES, ids=[f[0] or "disk-full" for f in FAILURES])
def test_a_failure_after_set_up_saves_checkpoint_summary_and_plot(
    fault, flags, text, tmp_path, capsys, monkeypatch
):
    env = fault_env_id(fault) if fault else MASKED_CARTPOLE_ID
    if fault is None:  # the disk is full at the first periodic save, and has room again for the final one
        real_save, calls = TrainLoop.save, []

        def save(self, directory, *, extra=None):
            calls.append(directory)
            if len(calls) == 1:
                raise OSError(28, "No space left on device")
            return real_save(self, directory, extra=extra)

        monkeypatch.setattr(TrainLoop, "save", save)
    argv = ["--env", env, *CLI_FLAGS, "--total-env-steps", "400", "--eval-every", "100000", *flags,
            "--run-dir", str(tmp_path), "--name", "f"]  # fmt: skip
    code, _out, err = outcome(train.main, argv, capsys)
    assert code == 1, err
    where = f"env {env!r} failed at env step " if fault else "failed at env step "
    assert_one_line_error(
        err,
        "train",
        where,
        text,
        f"saved the final checkpoint, summary (with the traceback) and plot in {tmp_path / 'f'}",
    )
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["stop_reason"] == "failed" and text in summary["error"]["message"]
    assert "Traceback" in summary["error"]["traceback"] and summary["env"] == env
    assert (tmp_path / "f" / "plot.png").is_file()
    meta = json.loads((tmp_path / "f" / "checkpoint" / "loop.json").read_text())
    assert meta["actor"]["env_steps"] == summary["env_steps"] >= 100 and summary["updates"] > 0


def test_a_failed_run_resumes_from_its_final_checkpoint(tmp_path, capsys):
    env = fault_env_id("step-raises")
    argv = ["--env", env, *CLI_FLAGS, "--total-env-steps", "400", "--eval-every", "100000",
            "--run-dir", str(tmp_path), "--name", "r"]  # fmt: skip
    assert outcome(train.main, argv, capsys)[0] == 1
    failed = json.loads((tmp_path / "r" / "summary.json").read_text())
    argv = [arg.replace(env, MASKED_CARTPOLE_ID) for arg in argv]
    code, out, err = outcome(train.main, [*argv, "--resume", "auto", "--allow-mismatch", "env"], capsys)
    assert code == 0, err
    assert f"at {failed['env_steps']} env steps, {failed['updates']} updates" in out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["env_steps"] >= 400


@pytest.mark.parametrize(
    ("fault", "raised"), [("sigint", KeyboardInterrupt), ("error", ValueError)], ids=["sigint", "error"]
)
def test_a_loop_stopped_between_its_updates_saves_a_checkpoint_that_resumes(
    fault, raised, tmp_path, monkeypatch
):
    """Ctrl-C or a failed update among the several an iterate owes: the final checkpoint keeps every update
    done or still owed, and loads (it held credit > 1 that its own load refused, so the run was lost)."""

    config = small_config(env_steps_per_update=1.0)  # 4 envs: 4 updates an iterate
    loop, _ = run_loop(config, 30)  # past min_replay_steps
    earned = loop.learner.num_updates + loop.credit + config.num_envs
    real, calls = loop.learner.update, []

    def update(batch, *, replay=None):  # the second update of the iterate is cut short
        calls.append(batch)
        if len(calls) == 2 and fault == "sigint":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C as this update starts
        elif len(calls) == 2:
            raise ValueError("the step would leave the weights non-finite")
        return real(batch, replay=replay)

    monkeypatch.setattr(loop.learner, "update", update)
    with pytest.raises(raised):
        loop.iterate()
    assert loop.learner.num_updates + loop.credit == earned and loop.credit >= 1.0
    loop.save(tmp_path / "c")
    again = TrainLoop(config, make_vector_env(config.num_envs, seed=0), seed=0)
    again.load(tmp_path / "c")
    assert (again.learner.num_updates, again.credit) == (loop.learner.num_updates, loop.credit)
    again.iterate()  # the updates still owed are done first
    assert again.credit < 1.0


def test_the_plot_of_a_run_that_failed_before_any_episode_warns_of_nothing(tmp_path):
    """A run that fails (or is stopped) before its first episode still gets its plot, without matplotlib's
    'No artists with labels found' warning in the middle of the one-line error."""
    import warnings

    from agents.history import History, plot

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot(History(), tmp_path / "plot.png", "empty", solve_return=None)
    assert (tmp_path / "plot.png").stat().st_size > 0


# ------------------------------------------------------------------ 3. bounded evaluation


def eval_actor(env_id: str, num: int = 2) -> Actor:
    config = R2D2Config(torso_units=(8,), core_units=8, head_units=8, num_envs=num)
    return Actor(config, make_vector_env(num, env_id=env_id, seed=0), seed=0, epsilons=np.zeros(num))


@pytest.mark.parametrize(("cap", "max_steps", "expected"), [(30, None, 30.0), (10_000, 12, 12.0)])
def test_evaluation_of_an_endless_env_ends_at_its_cap(cap, max_steps, expected, monkeypatch):
    monkeypatch.setattr(actor_module, "EVAL_MAX_EPISODE_STEPS", cap)
    actor = eval_actor(fault_env_id("endless"))
    with within(60):
        returns = evaluate(actor, actor.model.get_weights(), seed=0, max_steps=max_steps)
    np.testing.assert_array_equal(returns, [expected, expected])  # reward 1 per step, cut at the cap


def test_evaluation_caps_at_the_envs_own_limit():
    assert actor_module.max_episode_steps(make_vector_env(1, env_id=MASKED_CARTPOLE_ID)) == 500
    assert actor_module.max_episode_steps(make_vector_env(1, env_id=fault_env_id("endless"))) == 27_000


def test_a_nan_return_in_evaluation_is_an_error_not_a_hang():
    from agents.r2d2.actor import EnvError

    actor = eval_actor(fault_env_id("reward-nan", at=3))  # greedy episodes of an untrained net are short
    with (
        within(60),
        pytest.raises(
            EnvError, match=r"env 'Fault-reward-nan-at3-v0' failed at env step \d+ .*reward batch holds \[nan"
        ),
    ):
        evaluate(actor, actor.model.get_weights(), seed=0)


@pytest.mark.parametrize(
    ("fault", "code", "text"), [("endless", 0, None), ("reward-nan", 1, "reward batch holds [nan")]
)
def test_eval_cli_is_bounded(fault, code, text, finished, capsys, monkeypatch):
    monkeypatch.setattr(actor_module, "EVAL_MAX_EPISODE_STEPS", 25)
    env = fault_env_id(fault, at=3)
    argv = ["--env", env, "--eval", str(finished / "checkpoint"), "--eval-episodes", "2",
            "--allow-mismatch", "env"]  # fmt: skip
    with within(300):
        got, out, err = outcome(train.main, argv, capsys)
    assert got == code, err
    if text is None:
        assert json.loads(out.splitlines()[-1])["returns"] == [25.0, 25.0]
    else:
        assert_one_line_error(err, "train", f"env '{env}' failed at env step", text)


# ------------------------------------------------------------------ 4. what a checkpoint belongs to


def test_a_checkpoint_records_its_env_layout_seed_and_config(finished):
    meta = json.loads((finished / "checkpoint" / "loop.json").read_text())
    assert meta["identity"]["env_id"] == MASKED_CARTPOLE_ID and meta["seed"] == 0
    assert meta["identity"]["observation"]["shape"] == [2] and meta["identity"]["actions"]["num_actions"] == 2
    assert meta["config"]["core_units"] == 16


TWIN = fault_env_id("none")
"""Masked CartPole under another id: the same observation and action layout."""

MISMATCHES = [
    # (--eval or --resume, flags, the one line's text (None: accepted))
    ("eval", ["--env", TWIN], f"env id is 'MaskedCartPole-v1' in the checkpoint but '{TWIN}' here; pass --env MaskedCartPole-v1, or --allow-mismatch env"),
    ("eval", ["--env", TWIN, "--allow-mismatch", "env"], None),
    ("eval", ["--env", MASKED_CARTPOLE_ID, "--seed", "7"], "seed is 0 in the checkpoint but 7 here; pass --seed 0, or --allow-mismatch seed"),
    ("eval", ["--env", MASKED_CARTPOLE_ID, "--seed", "7", "--allow-mismatch", "seed"], None),
    ("eval", ["--env", "CartPole-v1", "--allow-mismatch", "env"], "observation layout is"),
    ("resume", ["--env", TWIN], "env id is 'MaskedCartPole-v1' in the checkpoint"),
    ("resume", ["--env", MASKED_CARTPOLE_ID, "--seed", "7"], "seed is 0 in the checkpoint but 7 here"),
    ("resume", ["--env", TWIN, "--allow-mismatch", "env"], None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "flags", "text"), MISMATCHES, ids=[" ".join([m, *f]) for m, f, _ in MISMATCHES]
)
def test_resume_or_eval_of_another_env_or_seed_is_refused_unless_allowed(
    mode, flags, text, finished, tmp_path, capsys
):
    checkpoint = finished / "checkpoint"
    before = tree_digest(finished)
    run = ["--total-env-steps", "300", "--run-dir", str(tmp_path), "--name", "m"] if mode == "resume" else []
    argv = [*flags, *CLI_FLAGS, "--eval-episodes", "2", *run, f"--{mode}", str(checkpoint)]
    code, _out, err = outcome(train.main, argv, capsys)
    assert tree_digest(finished) == before
    if text is None:
        assert code == 0, err
        return
    assert code == 2
    assert_one_line_error(err, "train", f"--{mode}: checkpoint {checkpoint}", text)
    assert not (tmp_path / "m").exists()


def test_a_layout_mismatch_shows_both_sides_in_one_key_order():
    """The layout read back from JSON and this run's come in different key orders; side by side they must not."""
    from agents.r2d2.checkpoint import IdentityMismatch

    saved, mine = {"shape": [4], "kind": "vector"}, {"kind": "vector", "shape": [6]}
    text = str(IdentityMismatch(Path("loop.json"), "observation", saved, mine))
    assert '{"kind":"vector","shape":[4]} in the checkpoint but {"kind":"vector","shape":[6]} here' in text


def test_an_old_checkpoint_without_identity_is_evaluated_with_a_note(finished, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(finished / "checkpoint", old)
    meta = json.loads((old / "loop.json").read_text())
    del meta["identity"]
    (old / "loop.json").write_text(json.dumps(meta))
    code, _out, err = outcome(cartpole.main, ["--eval", str(old), "--eval-episodes", "2"], capsys)
    assert code == 0, err
    assert f"note: checkpoint {old} records no env or layout" in err and "only its seed is checked" in err
    code, _, err = outcome(cartpole.main, ["--eval", str(old), "--seed", "3"], capsys)
    assert code == 2 and "seed is 0 in the checkpoint but 3 here" in err  # its seed was always recorded


# ------------------------------------------------------------------ 5. silent wrong runs


OUT_OF_SPACE = [
    (spaces.Discrete(3), np.array([3]), r"holds \[3\], outside its space"),
    (spaces.Discrete(3, start=1), np.array([0]), r"holds \[0\], outside its space: .*start \[1\], n \[3\]"),
    (spaces.Discrete(3), np.array([1.5]), r"holds \[1.5\], outside its space"),
    (spaces.MultiDiscrete([2, 3]), np.array([[1, 3]]), r"holds \[3\], outside its space"),
    (spaces.Tuple([spaces.Discrete(2), spaces.Box(-1, 1, (2,))]), (np.array([-1]), np.zeros((1, 2))), r"part \[0\] holds \[-1\]"),
    (spaces.Box(-1, 1, (2,)), np.array([[0.0, np.inf]]), r"holds \[inf\], expected finite values"),
]  # fmt: skip


@pytest.mark.parametrize(("space", "obs", "message"), OUT_OF_SPACE, ids=[str(c[0]) for c in OUT_OF_SPACE])
def test_an_observation_outside_its_space_is_refused(space, obs, message):
    with pytest.raises(ValueError, match=message):
        observation_encoding(space).flatten(obs, 1)


# ------------------------------------------------------------------ 6. tracebacks that are one line now


def test_run_dir_that_is_a_file_or_not_writable_is_one_line(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    cases = [(str(file), f"--run-dir: expected a directory, got '{file}"),
             (str(file / "sub"), f"({str(file)!r} is a file)")]  # fmt: skip
    if not os.access("/proc/sys", os.W_OK):  # a read-only filesystem
        cases.append(
            ("/proc/sys/burnin-runs", "'/proc/sys' is not writable (read-only filesystem or no permission)")
        )
    for run_dir, text in cases:
        code, _, err = outcome(cartpole.main, [*QUICK, "--run-dir", run_dir], capsys)
        assert code == 2, run_dir
        assert_one_line_error(err, "cartpole", text)
    assert file.read_text() == "x"


MISSING_DEPENDENCIES = [
    ("phys2d/CartPole-v1", "jax", "needs a package that is not installed (No module named 'jax')"),
    ("Ant-v2", "mujoco_py", "needs a package that is not installed (The mujoco v2 and v3 based environments"),
]


@pytest.mark.parametrize(
    ("env_id", "module", "text"), MISSING_DEPENDENCIES, ids=[c[0] for c in MISSING_DEPENDENCIES]
)
def test_an_env_whose_package_needs_a_missing_dependency_is_one_line(env_id, module, text, capsys):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    code, _, err = outcome(train.main, ["--env", env_id], capsys)
    assert code == 2
    assert_one_line_error(err, "train", f"--env: {env_id!r} {text}")


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents.train", "--env", "CartPole-v1", "--run-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)  # TensorFlow takes seconds to load: still starting up
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["python -m agents.train: interrupted"]


# ------------------------------------------------------------------ 7. unclear messages


class ObsOnlyReset(FaultyEnv):
    """A reset() that returns the observation alone (the gym API before 0.26)."""

    def reset(self, *, seed=None, options=None):
        return super().reset(seed=seed, options=options)[0]


def test_a_reset_that_returns_only_the_observation_says_so():
    import gymnasium as gym

    if "ObsOnlyReset-v0" not in gym.registry:
        gym.register("ObsOnlyReset-v0", entry_point=ObsOnlyReset, max_episode_steps=500)
    with pytest.raises(
        ValueError, match=r"^env_id 'ObsOnlyReset-v0': reset\(\) failed .*returns \(observation, info\)"
    ):
        make_vector_env(1, env_id="ObsOnlyReset-v0")


def test_ids_get_a_hint_and_broken_modules_are_not_reported_missing(tmp_path, monkeypatch):
    (tmp_path / "needs_dep_b24.py").write_text("import not_installed_dep_b24\n")
    (tmp_path / "broken_b24.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        ("Taxi-v3", r"'Taxi-v3' is not a registered gymnasium id .*registered versions: 'Taxi-v4'"),
        ("needs_dep_b24:Foo-v0", r"needs module 'needs_dep_b24', which is installed but failed to import; it needs "
                                 r"module 'not_installed_dep_b24', which is not installed"),
        ("broken_b24:Foo-v0", r"installed but failed to import; RuntimeError: boom at import"),
        ("nosuchmodule_b24:Foo-v0", r"needs module 'nosuchmodule_b24' \(No module named"),
    ]  # fmt: skip
    for env_id, message in cases:
        with pytest.raises(ValueError, match=message):
            ensure_registered(env_id)


# ------------------------------------------------------------------ 8. noise


def test_ray_workers_import_tensorflow_quietly(monkeypatch):
    """Under --actors N every Ray worker printed TensorFlow's C++ start-up lines through log_to_driver."""
    import ray

    from agents.distributed import cluster

    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(cluster, "token_auth_on", lambda: True)
    cluster.init_ray("127.0.0.1:6379")
    hook = seen["runtime_env"]["worker_process_setup_hook"]
    module, _, name = hook.rpartition(".")
    # As Ray runs the hook in a new worker process, then the worker's own imports and first op.
    code = (
        f"import importlib; getattr(importlib.import_module({module!r}), {name!r})(); "
        "import tensorflow as tf; tf.constant(1.0) + 1.0"
    )
    env = {**os.environ, **seen["runtime_env"]["env_vars"]}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stderr == "", run.stderr
