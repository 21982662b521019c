"""Distributed R2D2 over several Ray nodes on this machine: workers spread by resources, the learner on a node of its own, a node lost mid-run, shards."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402
from recording_server import RecordingServer  # noqa: E402
from test_distributed import (  # noqa: E402
    STATE_SHAPES,
    assert_no_window_spans,
    assert_windows_stay_in_one_episode,
    run_until,
    small_config,
    small_options,
    synthetic_steps,
)

from agents.distributed import DistributedLoop, ReplayServer, init_ray  # noqa: E402
from agents.distributed.cluster import LOOPBACK, loopback_node  # noqa: E402

NODE = {"node_ip_address": LOOPBACK, "num_cpus": 1}
ACTOR_NODE = {**NODE, "resources": {"actor_node": 1}}
"""A node that takes one actor worker (the workers ask for actor_node=1)."""
SPREAD = {"actor_resources": {"actor_node": 1}, "learner_resources": {"accel": 1}}
"""One worker per actor node; the learner where the stand-in accelerator is."""


@pytest.fixture(scope="module")
def nodes():
    """A head (the driver, this process, and the replay servers), a node with the stand-in accelerator
    ``accel`` that also takes a worker, and an actor node; all on loopback (``loopback_node``: Ray keeps
    127.0.0.1 on Linux). Yields the cluster and a dict of its added nodes, which tests may replace."""
    if ray.is_initialized():
        ray.shutdown()  # another module's local Ray: this one joins a cluster of its own
    # A Ray temp dir of its own (short: socket paths live under it): no `ray.init(address="auto")`
    # elsewhere on this machine finds this cluster.
    root = tempfile.mkdtemp(prefix="ray")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = root
    try:
        with loopback_node():
            # A node that stops answering is dead after 3 missed checks a second apart (Ray: 5, 3 s apart).
            quick = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
            head = {**NODE, "include_dashboard": False, "_system_config": quick}
            cluster = Cluster(initialize_head=True, head_node_args=head)
            added = {
                "accel": cluster.add_node(**NODE, resources={"accel": 1, "actor_node": 1}),
                "actors": cluster.add_node(**ACTOR_NODE),
            }
            init_ray(cluster.address)
        yield cluster, added
    finally:
        ray.shutdown()
        if "cluster" in locals():
            cluster.shutdown()
        if saved is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(root, ignore_errors=True)


def wrote(loop: DistributedLoop, least: int):
    """Whether both workers have written ``least`` steps to every lane (over all shards)."""

    def check() -> bool:
        lane_steps = {}
        for server in loop.servers:
            lane_steps.update(ray.get(server.lane_steps.remote()))
        return len(lane_steps) == 2 and all(min(steps) >= least for steps in lane_steps.values())

    return check


def lose_node(loop: DistributedLoop, cluster: Cluster, added: dict, name: str) -> int:
    """Kill node ``name`` (as a crash: no graceful shutdown) and iterate until the loop has noticed that the
    worker on it is lost and Ray has marked the node dead (else Ray may still place a new actor there);
    returns that worker's index."""
    victim = next(i for i, w in enumerate(loop.worker_stats()) if w["node_id"] == added[name].node_id)
    node = added.pop(name)
    cluster.remove_node(node, allow_graceful=False)

    def dead() -> bool:
        return not any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes())

    deadline, gone, probe = time.monotonic() + 120, False, 0.0
    while not (gone and loop.worker_losses[victim] + loop.worker_deaths[victim]):
        assert time.monotonic() < deadline, "the lost node or its worker was never noticed"
        if not gone and time.monotonic() >= probe:  # one GCS query a second
            probe, gone = time.monotonic() + 1.0, dead()
        loop.iterate()
    return victim


def test_workers_spread_by_resources_the_learner_on_its_node_and_a_node_lost(nodes, tmp_path):
    """The run goes on when an actor node dies: the learner keeps updating on the other worker's steps."""
    cluster, added = nodes
    loop = DistributedLoop(
        small_config(),
        small_options(**SPREAD),
        seed=0,
        replay_dir=tmp_path / "replay",
        server_class=RecordingServer,
    )
    try:
        assert loop.remote_learner
        run_until(loop, 150, until=wrote(loop, 10))
        learner = loop.report()["learner"]
        assert learner["node_id"] == added["accel"].node_id != ray.get_runtime_context().get_node_id()
        workers = loop.worker_stats()
        assert {w["node_id"] for w in workers} == {added["accel"].node_id, added["actors"].node_id}
        assert loop.learner.get_weights()  # the weights come back from the learner's node

        victim = lose_node(loop, cluster, added, "actors")
        updates, steps = loop.learner.num_updates, loop.env_steps
        run_until(loop, steps + 160)  # the other worker feeds the learner alone
        assert (
            loop.learner.num_updates >= updates + 160 / 4 - 5
        )  # env_steps_per_update 4, the limiter's slack
        owners = ray.get(loop.server.stats.remote())["owners"]
        assert owners[f"actor-{1 - victim}"]["env_steps"] > owners[f"actor-{victim}"]["env_steps"]
        ckpt = loop.save(tmp_path / "checkpoint")  # the learner's state comes back to be written here
        assert {p.name for p in ckpt.iterdir()} == {"learner.npz", "loop.json"}
        ray.get(loop.server.check_invariants.remote())
        assert_windows_stay_in_one_episode(ray.get(loop.server.windows.remote()))
    finally:
        loop.close()
        added["actors"] = cluster.add_node(**ACTOR_NODE)  # the next test has its actor node again


@pytest.mark.slow
def test_a_worker_restarts_on_a_new_node_and_a_remote_learner_resumes(nodes, tmp_path):
    """The lost worker comes back on a node that joins later; no window spans the gap; the checkpoint's
    learner state goes back to a learner actor."""
    cluster, added = nodes
    options = small_options(**SPREAD)
    loop = DistributedLoop(
        small_config(), options, seed=0, replay_dir=tmp_path / "replay", server_class=RecordingServer
    )
    try:
        run_until(loop, 300, until=wrote(loop, 30))
        victim = lose_node(loop, cluster, added, "actors")
        run_until(loop, loop.env_steps + 100)
        added["actors"] = cluster.add_node(**ACTOR_NODE)  # Ray restarts the worker there

        def back_and_wrote() -> bool:
            faults = ray.get(loop.server.faults.remote())
            return bool(faults) and np.isfinite(faults[0]["first_observation"]).all()

        run_until(loop, loop.env_steps + 200, until=back_and_wrote, timeout=240)
        run_until(loop, loop.env_steps + 200)
        after = loop.worker_stats()[victim]
        assert after["incarnation"] == 1 and after["node_id"] == added["actors"].node_id
        (fault,) = ray.get(loop.server.faults.remote())
        assert (fault["owner"], fault["kind"]) == (f"actor-{victim}", "restart")
        windows = ray.get(loop.server.windows.remote())
        assert_windows_stay_in_one_episode(windows)
        seen_last, seen_first = assert_no_window_spans(windows, fault)
        assert seen_last > 0 and seen_first > 0
        ckpt = loop.save(tmp_path / "checkpoint", extra={"note": "nodes"})
        weights, updates = loop.learner.get_weights(), loop.learner.num_updates
    finally:
        loop.close()
    again = DistributedLoop(small_config(), options, seed=0, replay_dir=tmp_path / "replay2")
    try:
        assert again.load(ckpt) == {"note": "nodes"}
        assert again.learner.num_updates == updates
        for a, b in zip(again.learner.get_weights(), weights):
            np.testing.assert_array_equal(a, b)
        run_until(again, again.env_steps + 200)
        assert again.learner.num_updates > updates
    finally:
        again.close()


@pytest.mark.slow
def test_sharded_replay_trains_checkpoints_each_shard_and_resumes(nodes, tmp_path):
    options = small_options(**SPREAD, replay_shards=2)
    loop = DistributedLoop(small_config(), options, seed=0, replay_dir=tmp_path / "replay")
    try:
        run_until(loop, 400, until=wrote(loop, 30))
        updates = loop.learner.num_updates
        run_until(loop, loop.env_steps + 200)
        assert loop.learner.num_updates > updates
        shards = loop.replay.stats()["shards"]
        assert [sorted(s["owners"]) for s in shards] == [["actor-0"], ["actor-1"]]  # worker i -> shard i % 2
        assert all(s["priority_updates"] > 0 for s in shards)  # the learner drew from both and wrote back
        windows = sum(s["limiter"]["samples"] for s in shards)  # each shard counts the windows drawn from it
        assert windows == pytest.approx(8 * loop.learner.num_updates, abs=16)
        ckpt = loop.save(tmp_path / "checkpoint", extra={"note": "sharded"})
        shards = loop.replay.stats()["shards"]
        weights = loop.learner.get_weights()
    finally:
        loop.close()
    assert sorted(p.name for p in (tmp_path / "replay").iterdir()) == ["shard-0", "shard-1"]
    for shard in ("shard-0", "shard-1"):
        assert {p.name for p in (tmp_path / "replay" / shard).iterdir()} == {"replay.npz", "server.json"}
    again = DistributedLoop(small_config(), options, seed=0, replay_dir=tmp_path / "replay2")
    try:
        assert again.load(ckpt) == {"note": "sharded"}
        for a, b in zip(again.learner.get_weights(), weights):
            np.testing.assert_array_equal(a, b)
        restored = again.replay.stats()["shards"]
        assert [s["num_steps"] for s in restored] == [s["num_steps"] for s in shards]
        assert again.env_steps == sum(s["limiter"]["inserts"] for s in restored)
        updates = again.learner.num_updates
        run_until(again, again.env_steps + 200)
        assert again.learner.num_updates > updates
    finally:
        again.close()


# ----------------------------------------------------------------- shard servers, without Ray


def test_shard_servers_count_windows_and_answer_a_zero_share_at_once():
    """Two shards of one run, in this process: lanes split by worker, limiters in windows, a 0-window ask."""
    config = small_config(min_replay_steps=40)
    options = small_options(replay_shards=2, wait_timeout=0.05, error_buffer=20.0)
    shards = [
        ReplayServer(config, options, observation=2, row_state_shapes=STATE_SHAPES, shard=s) for s in (0, 1)
    ]
    assert [s.num_lanes for s in shards] == [4, 4]
    assert shards[0].replay.lane_capacity == config.replay_capacity // 8  # each lane keeps the run's capacity
    limiter = shards[0].limiter  # 8 windows a batch at 1/4 batch per env step; half the lanes, half the fill
    assert (limiter.samples_per_insert, limiter.min_size_to_sample, limiter.error_buffer) == (2.0, 20, 88.0)
    rng = np.random.default_rng(0)
    for s, shard in enumerate(shards):
        reg = shard.register(f"actor-{s}", 4)
        pending = np.zeros(4, bool)
        for _ in range(4):
            steps = synthetic_steps(rng, 4, 4, pending)
            assert shard.add(f"actor-{s}", reg.incarnation, reg.lanes, steps, env_steps=16).status == "ok"
    assert all(s.total_priority() > 0 for s in shards)
    start = time.perf_counter()
    nothing = shards[1].sample(0)
    assert nothing.batch is None and nothing.env_steps == 64 and time.perf_counter() - start < 0.04
    drawn = shards[0].sample(5, extra_state_offsets=(4,))
    assert len(drawn.batch.keys) == 5 and shards[0].limiter.samples == 5 and shards[1].limiter.samples == 0
    # 64 inserts · 2 windows − 5 drawn − 172 more would fall below offset 40 − slack 88: held back.
    assert shards[0].sample(172, timeout=0.05).batch is None
    assert len(shards[0].sample(171).batch.keys) == 171
    with pytest.raises(ValueError, match="^shard: expected an int >= 0 and <= 1, got 2"):
        ReplayServer(config, options, observation=2, row_state_shapes=STATE_SHAPES, shard=2)


# ------------------------------------------------------------- the capacity benchmark, quick


def test_replay_capacity_quick(nodes, tmp_path):
    """The benchmark's machinery on this module's cluster (joining it saves a Ray start in the suite)."""
    from benchmarks import replay_capacity

    out = tmp_path / "capacity.json"
    assert replay_capacity.main(["--quick", "--shards", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["shards"], r["actors"]) for r in report["rows"]] == [(2, 1), (2, 2)]
    frame, state = 84 * 84, 2 * 512 * 4  # uint8 frame; float32 h and c
    assert report["rows"][0]["payload_bytes_per_push"] == 40 * (frame + state + 4 + 4 + 1 + 1)
    for row in report["rows"]:
        assert row["pushes"] > 0 and row["inserts_per_s"] == pytest.approx(40 * row["pushes"] / row["wall_s"])
        assert row["samples"] > 0 and row["mb_out_per_s"] > 0 and row["push_ms_p50"] > 0
        assert row["batch_mb"] > 64 * 125 * frame / 1e6  # the 64 × 125 frames at least
    summary = report["summary"]["2"]
    assert summary["paper_actors_sustained"] == int(summary["capacity_inserts_per_s"] // 260)
    assert "| shards | actors K |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


# -------------------------------------------------------------------------------- the CLI

RAY_FLAG_ERRORS = [
    # (flags, text of the one line)
    (
        ["--learner-resources", "GPU=1"],
        "--learner-resources: 'GPU=1' given but actors=0; expected --actors N with it",
    ),
    (["--replay-shards", "2"], "--replay-shards: 2 given but actors=0; expected --actors N with it"),
    (
        ["--actors", "2", "--learner-resources", "GPU"],
        "--learner-resources: expected NAME=AMOUNT[,NAME=AMOUNT...]",
    ),
    (
        ["--actors", "2", "--actor-resources", "node=-1"],
        "--actor-resources: node: expected a finite number >= 0.0",
    ),
    (["--actors", "2", "--actor-resources", "a=1,a=2"], "--actor-resources: resource 'a' given twice"),
    (["--actors", "2", "--replay-shards", "3"], "--replay-shards: expected <= num_actors=2"),
]


@pytest.mark.parametrize(("flags", "text"), RAY_FLAG_ERRORS)
def test_a_bad_placement_flag_is_one_line_and_exit_2(flags, text, tmp_path, capsys):
    from helpers import CLI_FLAGS, assert_one_line_error, outcome

    from agents import train

    argv = ["--env", "CartPole-v1", *CLI_FLAGS, *flags, "--run-dir", str(tmp_path)]
    code, _, err = outcome(train.main, argv, capsys)
    assert code == 2, err
    assert_one_line_error(err, "train", text)
    assert list(tmp_path.iterdir()) == []  # nothing ran


@pytest.mark.slow
def test_cli_with_a_learner_actor_and_two_shards_trains_checkpoints_and_resumes(tmp_path):
    """``--learner-resources CPU=1 --replay-shards 2`` on a local Ray: the run directory as with the learner in
    the driver, the replay in one directory per shard, and ``--resume auto`` reloads both."""
    from test_distributed import SHORT, cli

    flags = [*SHORT, "--learner-resources", "CPU=1", "--replay-shards", "2", "--run-dir", str(tmp_path)]
    run = cli(*flags, "--name", "d", "--seed", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "d"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] >= 500 and summary["updates"] > 0
    assert summary["distributed"]["learner"]["weights_published"] > 0
    assert {p.name for p in (out / "checkpoint").iterdir()} == {"learner.npz", "loop.json"}
    assert sorted(p.name for p in (out / "replay").iterdir()) == ["shard-0", "shard-1"]
    resumed = cli(*flags[2:], "--total-env-steps", "800", "--name", "d", "--seed", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["env_steps"] >= 800 and again["updates"] > summary["updates"]
    assert {f["kind"] for f in again["replay"]["faults"]} == {"resume"}
