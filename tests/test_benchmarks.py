"""The learner and actor benchmarks run in --quick mode and report every figure the issue asks for."""

from __future__ import annotations

import ast
import json
import sys

import pytest

from benchmarks import actor_throughput, burnin_throughput, replay_throughput


def test_burnin_throughput_quick(tmp_path):
    out = tmp_path / "bt.json"
    assert burnin_throughput.main(["--quick", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    res = report["scales"]["cartpole"]
    assert res["peak_gflops"] > 0
    assert set(res["variants"]) == {"runner", "article", "full_bptt", "no_burn_in"}
    for v in res["variants"].values():
        for key in ("updates_per_s", "sequences_per_s", "replayed_steps_per_s", "gflops", "peak_ratio"):
            assert v[key] > 0
    runner = res["variants"]["runner"]
    assert runner["vs_article"] > 0 and runner["vs_full_bptt"] > 0
    assert res["full_bptt_flop_ratio"] > 1
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_flop_model_by_hand():
    """r2d2 scale: the issue's ≈143 GFLOP per update and ≈1.2 full-BPTT ratio."""
    scale = burnin_throughput.scales("fp32", "auto", False)["r2d2"]
    cfg, obs, acts = scale.config, scale.obs_dim, scale.num_actions
    per_step = burnin_throughput.step_flops(cfg, obs, acts)
    b, u, core_in = 64, 512, 512 + 18 + 1
    assert per_step["lstm"] == 2 * b * (core_in + u) * 4 * u
    assert per_step["torso"] == 2 * b * 64 * 512
    runner = burnin_throughput.update_flops(cfg, obs, acts, "runner")
    # forward: online 125 + target 125 + 3 ΔQ probes; backward: the 80 trained steps, twice the forward cost
    assert runner == pytest.approx(per_step["total"] * (125 + 125 + 3 + 2 * 80))
    assert 140e9 < runner < 146e9
    ratio = burnin_throughput.update_flops(cfg, obs, acts, "full_bptt") / runner
    assert ratio == pytest.approx((253 + 2 * 120) / (253 + 2 * 80))


def test_actor_throughput_quick(tmp_path, capsys):
    out = tmp_path / "at.json"
    assert actor_throughput.main(["--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["env_steps_per_s"]["compiled"] > 0 and report["env_steps_per_s"]["predict"] > 0
    assert report["vs_predict"] == pytest.approx(
        report["env_steps_per_s"]["compiled"] / report["env_steps_per_s"]["predict"]
    )
    assert "vs_predict" in capsys.readouterr().out


def test_lstm_step_reports_each_part_of_the_step(tmp_path):
    from benchmarks import lstm_step

    out = tmp_path / "step.json"
    argv = ["--batch", "4", "--units", "8", "--steps", "3", "--rounds", "1", "--repeats", "1"]
    assert lstm_step.main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for prec in ("fp32", "bf16"):
        assert 0 < report["matmul_share"][prec]
        for part in ("matmul", "matmul+input+bias", "full step"):
            assert report["per_step_us"][f"{prec} {part}"] > 0


def test_float32_gates_ab_reports_both_sides(tmp_path):
    from benchmarks import float32_gates

    out = tmp_path / "gates.json"
    assert float32_gates.main(["--scale", "cartpole", "--rounds", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["updates_per_s"]) == {"bf16_gates", "float32_gates"}
    assert report["speedup"] == pytest.approx(
        report["seconds_per_update"]["bf16_gates"] / report["seconds_per_update"]["float32_gates"]
    )


def test_replay_image_workload_stores_frames_as_uint8_at_their_size():
    """84×84×1 uint8 frames: bytes per step within 1.1× of the raw frame, the per-step fields and the
    kept states (the quick and full runs report the same figure on a larger buffer)."""
    image = next(w for w in replay_throughput.WORKLOADS if w.obs_dtype == "uint8")
    assert image.obs_shape == (84, 84, 1)
    r = replay_throughput.run_workload(image, lane_capacity=256, rounds=1, adds=20, samples=4)
    assert r["obs_dtype"] == "uint8" and r["raw_step_bytes"] == 84 * 84 + 14
    floor = r["raw_step_bytes"] + r["state_bytes"] / replay_throughput.SPEC.period
    assert floor <= r["bytes_per_step"] <= 1.1 * floor
    assert r["meets_targets"]["bytes_per_step"]
    assert r["naive"]["bytes_per_step"] > 2 * r["bytes_per_step"]  # the window copies


@pytest.mark.parametrize("scale", ["cartpole", "r2d2"])
def test_peer_spec_gives_the_pytorch_peer_every_field_it_reads_from_burnins_config(scale):
    """torch_peer runs without burnin (no TensorFlow in its interpreter): all it knows of the workload is
    this spec, so a field it reads and the driver does not write would fail only on the peer's host."""
    import re

    from benchmarks import peer_ab

    spec = peer_ab.peer_spec(scale)
    source = (peer_ab.ROOT / "benchmarks" / "torch_peer.py").read_text()
    read = set(re.findall(r'spec\["(\w+)"\]', source))
    assert {"core_units", "burn_in", "unroll", "n_step", "batch_size"} <= read
    assert read <= set(spec), f"torch_peer reads {read - set(spec)} that peer_spec does not write"
    # Its CLI checks a spec for SPEC_FIELDS: they must be what it reads, and what peer_spec writes.
    declared = next(
        node.value.args[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SPEC_FIELDS"
    )
    assert ast.literal_eval(declared) == read == set(spec)
    s = burnin_throughput.scales("fp32", "auto", False)[scale]
    for field in ("core_units", "head_units", "burn_in", "unroll", "n_step", "batch_size", "gamma"):
        assert spec[field] == getattr(s.config, field)
    assert (spec["obs_dim"], spec["num_actions"]) == (s.obs_dim, s.num_actions)
    assert spec["rescale_eps"] == s.config.value_rescale_eps
    assert json.loads(json.dumps(spec)) == {**spec, "torso_units": list(spec["torso_units"])}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pairs", "0"], "--pairs: expected an int >= 1, got 0"),
        (["--threads", "2", "0"], "--threads: expected an int >= 1, got 0"),
        (["--warmup", "-1"], "--warmup: expected an int >= 0, got -1"),
        (
            ["--torch-python", "/nonexistent/python"],
            "--torch-python: '/nonexistent/python' cannot import torch and numpy",
        ),
    ],
)
def test_peer_ab_bad_argument_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    from benchmarks import peer_ab

    out = tmp_path / "peer.json"
    # Without torch in this venv, the test interpreter itself is one that cannot import it.
    base = ["--torch-python", sys.executable, "--json", str(out)]
    with pytest.raises(SystemExit) as exit_:
        peer_ab.main([*base, *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"python -m benchmarks.peer_ab: error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-commit"], "old: expected a commit of"),
        (["HEAD", "no-such-commit"], "new: expected a commit of"),
        (["HEAD", "--pairs", "0"], "--pairs: expected an int >= 1, got 0"),
        (["HEAD", "--loop-updates", "-3"], "--loop-updates: expected an int >= 1, got -3"),
    ],
)
def test_ab_commits_bad_argument_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    from benchmarks import ab_commits

    out = tmp_path / "ab.json"
    with pytest.raises(SystemExit) as exit_:
        ab_commits.main([*argv, "--json", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m benchmarks.ab_commits: error: {message}") and err.count("\n") == 1
    assert not out.exists()
