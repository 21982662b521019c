"""The POPGym sensitivity runs: one job per variant and seed, each in its own directory, and the table."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytest.importorskip("popgym")

from studies import memory_sensitivity as sens
from studies import memory_suite as suite


def test_every_variant_is_its_own_valid_run_stopped_at_its_solve(tmp_path):
    args = argparse.Namespace(seeds=[0, 1], env_steps=6000, eval_every=600, eval_episodes=4, run_dir=tmp_path)
    labelled = sens.jobs(args)
    assert len(labelled) == 2 * len(sens.VARIANTS)
    assert len({job.key for _, job in labelled}) == len(labelled)  # run_jobs keeps every one
    assert len({job.out_dir for _, job in labelled}) == len(labelled)
    for label, job in labelled:
        config, options = job.settings()
        assert options.stop_when_solved and options.total_env_steps == 6000
        tuned = suite.Job(task=job.task, seed=0, env_steps=1, eval_every=1, eval_episodes=1,
                          overrides=job.task.overrides, run_dir="x").settings()[0]  # fmt: skip
        changed = {
            f for f in ("adam_epsilon", "gamma", "reward_scale") if getattr(config, f) != getattr(tuned, f)
        }
        # the label names what the row turns back, and nothing else differs from the suite's setting
        expected = {"tuned": set(), "Adam ε 1e-3": {"adam_epsilon"}, "γ 0.99": {"gamma"},
                    "reward ×1": {"reward_scale"}}.get(label)  # fmt: skip
        if expected is None:
            assert label.startswith("before: ") and config.adam_epsilon == 1e-3 and config.reward_scale == 1
            assert config.gamma == 0.99
        else:
            assert changed == expected, (label, changed)


def test_the_table_has_a_row_per_variant_with_per_seed_values():
    sqrt_v = [{"median": 2.6e-6, "p99": 1e-4}, {"median": 1.2e-7, "p99": 1e-5}]
    rows = [
        {"task": "RepeatFirstEasy", "settings": "tuned", "mmer": [0.95, 0.5], "steps_to": [24000, None],
         "adam_sqrt_v": sqrt_v}
    ]  # fmt: skip
    md = sens.markdown(rows, env_steps=60_000)
    assert "| RepeatFirstEasy | tuned | 0.95, 0.50 | 24k, — | 2.6e-06, 1.2e-07 | — |" in md
    rows[0]["q_scale"] = [[5.0, 1.25], None]
    assert "| 2.6e-06, 1.2e-07 | 5.0 → 1.2 |" in sens.markdown(rows, env_steps=60_000)
    assert "60,000 env steps" in md


def test_q_scale_reads_the_first_and_last_probe():
    probe = lambda q, y: {"memory_probe": {"rows": 3, "q_abs_max": q, "target_abs": y}}
    evals = [{"memory_probe": {"rows": 0}}, probe(0.5, 0.01), {}, probe(1.0, 0.5)]
    assert sens.q_scale(evals) == [50.0, 2.0]
    assert sens.q_scale([{}]) is None


def test_a_bad_flag_is_one_line_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        sens.main(["--env-steps", "0", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{sens.PROG}: error: --env-steps: expected an int >= 1, got 0"
    assert not Path(tmp_path / "out").exists()


def test_adam_denominator_reads_the_velocities_of_a_learner_checkpoint(tmp_path):
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam(1e-3)
    grads = [np.full(w.shape, 0.5 + i, np.float32) for i, w in enumerate(model.trainable_variables)]
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    # the layout the function assumes: [iterations, learning rate, (momentum, velocity) per variable]
    names = [v.name for v in optimizer.variables]
    assert [i for i, n in enumerate(names) if n.endswith("_velocity")] == list(range(3, len(names), 2))
    np.savez(
        tmp_path / "learner.npz", **{f"optimizer/{i}": v.numpy() for i, v in enumerate(optimizer.variables)}
    )
    root = np.sqrt(np.concatenate([(1 - 0.999) * g.ravel() ** 2 for g in grads]))  # v after one step
    got = sens.adam_denominator(tmp_path / "learner.npz")
    assert got["median"] == pytest.approx(np.median(root), rel=1e-5)
    assert got["p99"] == pytest.approx(np.percentile(root, 99), rel=1e-5)
