"""Distributed R2D2 on a local Ray cluster: both actors feed the replay, restarts, rate limiter, checkpoints, resume, loopback only."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import SMALL as R2D2_SMALL
from helpers import cli as cartpole_cli
from helpers import listening_sockets, off_loopback

ray = pytest.importorskip("ray")

import recording_server  # noqa: E402
from recording_server import RecordingServer  # noqa: E402

from agents.distributed import (  # noqa: E402
    DistributedConfig,
    DistributedLoop,
    ReplayServer,
    init_ray,
)
from agents.envs import MASKED_CARTPOLE_ID  # noqa: E402
from agents.r2d2 import R2D2Config  # noqa: E402
from burnin.replay import SequenceReplay  # noqa: E402

# Ray's workers cannot import the tests: ship the recording server's module by value.
ray.cloudpickle.register_pickle_by_value(recording_server)
STATE_SHAPES = (((16,), (16,)),)  # the small config's LSTM: h and c per row

# The learner tests' small config, with a lane per env of both workers.
SMALL = {**R2D2_SMALL, "replay_capacity": 8 * 500}  # 2 workers × 4 envs = 8 lanes
SPI = 1 / SMALL["env_steps_per_update"]


def small_config(**overrides) -> R2D2Config:
    return R2D2Config(**{**SMALL, **overrides})


def small_options(**overrides) -> DistributedConfig:
    # 4 steps × 4 envs = 16 env steps (4 updates) per push; error_buffer 5 is the least that fits.
    return DistributedConfig(
        **{
            "num_actors": 2,
            "push_every": 4,
            "error_buffer": 5.0,
            "checkpoint_seconds": 0,
            "env_id": MASKED_CARTPOLE_ID,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def cluster():
    # 4 logical CPUs: a second loop's workers can start while the first loop's are still alive.
    started = init_ray(num_cpus=4)
    yield
    if started:
        ray.shutdown()


def run_until(loop: DistributedLoop, env_steps: int, *, timeout: float = 300.0, until=None) -> list:
    """Iterate until ``env_steps`` (and ``until()``) hold; returns every finished episode seen."""
    finished = []
    deadline = time.monotonic() + timeout
    while loop.env_steps < env_steps or (until is not None and not until()):
        assert time.monotonic() < deadline, f"stuck at {loop.env_steps} env steps"
        finished.extend(loop.iterate().finished)
    return finished


def assert_windows_stay_in_one_episode(batch) -> None:
    for mask, final, learn in zip(batch.valid_t, batch.final, batch.learn_mask):
        valid = np.flatnonzero(mask)
        assert valid.size and np.all(np.diff(valid) == 1), (
            "valid steps must be one run: padding, episode, padding"
        )
        finals = np.flatnonzero(final & mask)
        assert finals.size <= 1 and (finals.size == 0 or finals[0] == valid[-1]), (
            "a window runs past an episode end"
        )
        assert not (learn & ~mask).any()


def assert_no_window_spans(batch, fault) -> tuple[int, int]:
    """Around a writer's re-registration: the last step before it ends an episode, the first after starts one.

    The last step ends its episode as its final observation (close_lanes truncates there), or, if it
    terminated the episode, as the step right before the (zero) final observation close_lanes stores.
    """
    seen_last = seen_first = 0
    for row in range(len(fault["lanes"])):
        last, first = fault["last_observation"][row], fault["first_observation"][row]
        assert np.isfinite(first).all(), "the new incarnation has not written to this lane yet"
        for obs, mask, final in zip(batch.observation, batch.valid_t, batch.final):
            for j in np.flatnonzero((obs == last).all(axis=1) & mask):
                if not final[j]:
                    if j + 1 == len(mask):
                        continue  # the window ends here: what follows is out of sight
                    assert final[j + 1] and mask[j + 1], (
                        "the step before the gap is not the end of its episode"
                    )
                assert not mask[j + 2 :].any(), "a window runs across the gap"
                seen_last += 1
            for j in np.flatnonzero((obs == first).all(axis=1) & mask):
                assert j == 0 or not mask[j - 1], "a window runs across the gap"
                seen_first += 1
    return seen_last, seen_first


# --------------------------------------------------------------------- without Ray


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("num_actors", 0, ValueError),
        ("push_every", 2.0, TypeError),
        ("weights_every", 0, ValueError),
        ("error_buffer", -1.0, ValueError),
        ("wait_timeout", 0, ValueError),
        ("max_restarts", -1, ValueError),
        ("rate_limited", 1, TypeError),
    ],
)
def test_bad_option_names_the_field(field, value, error):
    with pytest.raises(error, match=f"^{field}: expected"):
        small_options(**{field: value})


def test_options_that_do_not_fit_the_config_are_reported():
    with pytest.raises(ValueError, match="^num_actors: 200 workers × num_envs=4 = 800 lanes"):
        small_options(num_actors=200).check(small_config())
    with pytest.raises(
        ValueError, match="^error_buffer: 5.0 updates is too small for inserts of 64 env steps"
    ):
        small_options(push_every=16).check(small_config())


def test_single_process_modules_do_not_import_ray():
    code = (
        "import sys; import burnin, agents.r2d2, agents.envs, agents.experiment, agents.cartpole; "
        "agents.cartpole.parse_args([]); print('ray' in sys.modules)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert run.stdout.strip() == "False"


# ------------------------------------------------------------------------ on Ray


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    """A 2-worker run; worker 0 is killed after 300 env steps and the run goes on until its restarted
    incarnation has written several windows. Left open for inspection (workers idle behind the limiter)."""
    replay_dir = tmp_path_factory.mktemp("first") / "replay"
    loop = DistributedLoop(
        small_config(), small_options(), seed=0, replay_dir=replay_dir, server_class=RecordingServer
    )
    initial = loop.learner.get_weights()

    def both_wrote() -> bool:  # workers start a few seconds apart on a busy machine
        lane_steps = ray.get(loop.server.lane_steps.remote())
        return len(lane_steps) == 2 and all(min(steps) >= 30 for steps in lane_steps.values())

    def restarted_and_wrote() -> bool:
        faults = ray.get(loop.server.faults.remote())
        return bool(faults) and np.isfinite(faults[0]["first_observation"]).all()

    finished = run_until(loop, 300, until=both_wrote)
    victim = loop.worker_stats()[0]
    ray.kill(loop.workers[0], no_restart=False)
    finished += run_until(loop, 600)  # the run goes on with one worker
    # Pause learning while Ray restarts worker 0: the limiter soon holds worker 1 too, which leaves the
    # CPUs to the restart. The new incarnation registers (a fault entry) before it can push anything.
    deadline = time.monotonic() + 120
    while not ray.get(loop.server.faults.remote()):
        assert time.monotonic() < deadline, "worker 0 was not restarted"
        time.sleep(0.5)
    finished += run_until(loop, loop.env_steps + 300, until=restarted_and_wrote)
    finished += run_until(loop, loop.env_steps + 300)  # windows on both sides of the crash
    yield loop, initial, finished, victim
    loop.close()


def test_run_fills_the_replay_from_both_actors_and_trains(first_run):
    loop, initial, finished, _ = first_run
    assert loop.learner.num_updates > 100
    assert any(not np.array_equal(a, b) for a, b in zip(initial, loop.learner.get_weights()))
    lane_steps = ray.get(loop.server.lane_steps.remote())
    assert set(lane_steps) == {"actor-0", "actor-1"}
    assert all(min(steps) > 30 for steps in lane_steps.values()), lane_steps
    assert {row // 4 for row, _, _ in finished} == {0, 1}  # both workers' episodes reach the learner
    ray.get(loop.server.check_invariants.remote())
    windows = ray.get(loop.server.windows.remote())
    assert len(windows.keys) > 50
    assert_windows_stay_in_one_episode(windows)
    stats = loop.replay.stats()
    assert stats["priority_updates"] > 0  # priorities came back from the learner
    assert all(w["weight_pulls"] > 0 for w in loop.worker_stats())


def test_rate_limiter_holds_samples_per_insert_within_ten_percent(first_run):
    loop = first_run[0]
    limiter = loop.replay.stats()["limiter"]
    after = limiter["inserts"] - limiter["min_size_to_sample"]
    assert abs(limiter["samples"] - SPI * after) <= limiter["error_buffer"] + 1
    assert limiter["measured_samples_per_insert"] == pytest.approx(SPI, rel=0.10)


def test_killed_actor_is_restarted_and_no_window_spans_the_crash(first_run):
    loop, _, _, victim = first_run
    after, other = loop.worker_stats()
    assert after["incarnation"] == 1 and after["pid"] != victim["pid"]
    assert other["incarnation"] == 0
    assert loop.worker_losses[0] >= 1 and loop.worker_losses[1] == 0
    (fault,) = ray.get(loop.server.faults.remote())
    assert (fault["owner"], fault["kind"], fault["incarnation"]) == ("actor-0", "restart", 1)
    ray.get(loop.server.check_invariants.remote())
    windows = ray.get(loop.server.windows.remote())
    assert_windows_stay_in_one_episode(windows)
    seen_last, seen_first = assert_no_window_spans(windows, fault)
    assert seen_last > 0 and seen_first > 0  # the check above looked at windows on both sides


def test_every_ray_process_of_a_local_run_listens_on_loopback_only(first_run):
    loop = first_run[0]
    # The driver (this process) started the GCS and the raylet, and the raylet the workers and agents.
    found = listening_sockets(os.getpid())
    assert not off_loopback(found), found
    assert {"gcs_server", "raylet"} <= {name for name, addresses in found.values() if addresses}, found
    assert found[os.getpid()][1], found  # the driver's own gRPC server
    for worker in loop.worker_stats():  # both actor workers' servers were looked at
        assert found.get(worker["pid"], ("", []))[1], (worker, found)


def test_joining_a_cluster_without_token_authentication_warns_in_one_line(monkeypatch, caplog):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with caplog.at_level(logging.WARNING, logger="agents.distributed.cluster"):
        assert init_ray("10.1.2.3:6379")
        (record,) = caplog.records
        message = record.getMessage()
        assert "10.1.2.3:6379" in message and "without token authentication" in message
        assert "\n" not in message
        caplog.clear()
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        assert init_ray("10.1.2.3:6379")
        assert not caplog.records


AUTH_REFUSAL = (  # the cause ray.init gives its ConnectionError when the cluster's GCS refuses the token
    "Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n  ...\n"
    "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing or incorrect."
)
JOIN_FAILURES = [
    # (what ray.init raises, text the one line holds)
    (ConnectionError("Failed to connect to Ray cluster at 10.1.2.3:6379"), "refused this run's token"),
    (ConnectionError("Could not find any running Ray instance."), "Could not find any running Ray instance"),
    (ValueError("Invalid address format: foo"), "ValueError: Invalid address format: foo"),
]


@pytest.mark.parametrize(("error", "text"), JOIN_FAILURES, ids=["refused", "none-there", "malformed"])
def test_a_cluster_that_cannot_be_joined_is_one_line_and_exit_2(error, text, monkeypatch, tmp_path, capsys):
    from helpers import CLI_FLAGS, assert_one_line_error, outcome

    from agents import train

    if "refused" in text:
        error.__cause__ = RuntimeError(AUTH_REFUSAL)

    def init(**kwargs):
        raise error

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    argv = ["--env", MASKED_CARTPOLE_ID, *CLI_FLAGS, "--actors", "1", "--address", "10.1.2.3:6379",
            "--run-dir", str(tmp_path)]  # fmt: skip
    code, _, err = outcome(train.main, argv, capsys)
    assert code == 2, err
    assert_one_line_error(err, "train", "--address: ", "10.1.2.3:6379", text)
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_ctrl_c_while_a_local_ray_starts_waits_for_it_then_stops_it(monkeypatch):
    """A SIGINT inside ray.init is held until Ray is up (one inside its C++ start-up crashed the process), then
    Ray is shut down and the KeyboardInterrupt goes on."""
    import signal

    steps = []

    def init(**kwargs):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C as Ray starts its processes
        steps.append("started")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: steps.append("shut down"))
    with pytest.raises(KeyboardInterrupt):
        init_ray(num_cpus=1)
    assert steps == ["started", "shut down"]


def test_an_env_that_fails_in_a_worker_is_named_in_one_line():
    """Ray hands a worker's error back as a RayTaskError whose text is both processes' tracebacks (with terminal
    colours): the run's one line names the worker, the env and its step instead."""
    from agents.distributed.loop import worker_error
    from agents.r2d2 import EnvError

    cause = EnvError("env 'Bad-v0' failed at env step 4784 (actor step 304): step(): RuntimeError: boom")
    task = ray.exceptions.RayTaskError("run", "Traceback (most recent call last):\n  ...", cause, pid=7)
    err = worker_error(1, task.as_instanceof_cause())
    assert isinstance(err, EnvError)
    assert str(err) == f"actor-1: {cause}"
    other = ray.exceptions.RayTaskError("run", "Traceback ...", ZeroDivisionError("division by zero"))
    assert worker_error(0, other) is other  # a bug in the worker keeps Ray's traceback


def test_resume_reloads_the_learner_and_the_replay(first_run, tmp_path):
    first = first_run[0]
    ckpt = first.save(tmp_path / "checkpoint", extra={"note": "first"})
    # The replay went to the first loop's replay_dir; compare with what is on disk, as the first
    # loop's workers may still push a little after the save.
    saved = SequenceReplay.load(first.replay_dir / "replay.npz").stats()
    saved_server = json.loads((first.replay_dir / "server.json").read_text())
    loop = DistributedLoop(
        small_config(), small_options(), seed=0, replay_dir=tmp_path / "replay2", server_class=RecordingServer
    )
    try:
        assert loop.load(ckpt) == {"note": "first"}
        assert loop.learner.num_updates == first.learner.num_updates
        for a, b in zip(loop.learner.get_weights(), first.learner.get_weights()):
            np.testing.assert_array_equal(a, b)
        restored = loop.replay.stats()
        assert loop.env_steps == saved_server["limiter"]["inserts"] == restored["limiter"]["inserts"]
        assert restored["episodes_total"] == saved_server["episodes_total"]
        for key in ("num_steps", "num_sampleable", "steps_added", "total_priority", "open_episodes"):
            assert restored[key] == saved[key], key
        updates = loop.learner.num_updates

        def both_back() -> bool:
            faults = ray.get(loop.server.faults.remote())
            return len(faults) == 2 and all(np.isfinite(f["first_observation"]).all() for f in faults)

        run_until(loop, loop.env_steps + 300, until=both_back)
        run_until(loop, loop.env_steps + 200)
        assert loop.learner.num_updates > updates
        faults = ray.get(loop.server.faults.remote())
        assert sorted((f["owner"], f["kind"]) for f in faults) == [
            ("actor-0", "resume"),
            ("actor-1", "resume"),
        ]
        windows = ray.get(loop.server.windows.remote())
        for fault in faults:
            assert_no_window_spans(windows, fault)
    finally:
        loop.close()


def synthetic_steps(rng: np.random.Generator, num_steps: int, lanes: int, pending: np.ndarray) -> dict:
    """Random steps in the replay's convention (an ending step is followed by the final observation)."""
    out = {k: [] for k in ("observation", "action", "reward", "terminated", "truncated")}
    h, c = [], []
    for _ in range(num_steps):
        ends = (rng.random(lanes) < 0.05) & ~pending
        term = ends & (rng.random(lanes) < 0.5)
        out["observation"].append(rng.standard_normal((lanes, 2)).astype(np.float32))
        out["action"].append(rng.integers(0, 2, lanes).astype(np.int32))
        out["reward"].append(np.ones(lanes, np.float32))
        out["terminated"].append(term)
        out["truncated"].append(ends & ~term)
        h.append(rng.standard_normal((lanes, 16)).astype(np.float32))
        c.append(rng.standard_normal((lanes, 16)).astype(np.float32))
        pending[:] = ends
    steps = {k: np.stack(v) for k, v in out.items()}
    steps["states"] = ((np.stack(h), np.stack(c)),)
    return steps


def test_rate_limiter_blocks_whichever_side_is_faster():
    # The server's waiting, driven by threads as the threaded Ray actor's calls are.
    config, options = small_config(), small_options(wait_timeout=0.05)
    server = ReplayServer(config, options, observation=2, row_state_shapes=STATE_SHAPES, seed=0)
    reg = server.register("actor-0", 4)
    busy = []
    # One writer stream over all phases: the replay remembers where each lane's episode is.
    stream = {"rng": np.random.default_rng(0), "pending": np.zeros(4, bool), "unsent": None}

    def write(stop: threading.Event, pause: float) -> None:  # an actor worker's pushes
        while not stop.is_set():
            steps = stream["unsent"] or synthetic_steps(stream["rng"], 4, 4, stream["pending"])
            stream["unsent"] = steps
            while server.add("actor-0", reg.incarnation, reg.lanes, steps, env_steps=16).status == "busy":
                busy.append(1)
                if stop.is_set():
                    return  # sent again in the next phase, as a worker resends after 'busy'
            stream["unsent"] = None
            time.sleep(pause)

    def sample(stop: threading.Event, pause: float) -> None:  # the learner's draws
        while not stop.is_set():
            batch = server.sample(8, timeout=0.05).batch
            if batch is not None:
                server.update_priorities(batch.keys, np.ones(8))
                time.sleep(pause)

    def phase(seconds: float, write_pause: float | None, sample_pause: float | None) -> None:
        stop, errors = threading.Event(), []

        def guarded(fn, pause):
            try:
                fn(stop, pause)
            except BaseException as err:  # re-raised below: a failure in a thread must fail the test
                errors.append(err)

        threads = [
            threading.Thread(target=guarded, args=(fn, p))
            for fn, p in ((write, write_pause), (sample, sample_pause))
            if p is not None
        ]
        for th in threads:
            th.start()
        time.sleep(seconds)
        stop.set()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        lim = server.limiter
        assert abs(lim.samples - SPI * max(lim.inserts - 100, 0)) <= 5.0 + 1  # error_buffer + the last draw

    def waits() -> tuple[float, float]:
        stats = server.stats()
        return stats["owners"]["actor-0"]["insert_blocked_s"], stats["sample_blocked_s"]

    phase(1.0, 0.0, None)  # nobody samples: the writer stops error_buffer updates ahead
    assert busy and 100 <= server.limiter.inserts <= 100 + 5.0 / SPI
    insert_wait, sample_wait = waits()
    phase(1.5, 0.0, 0.004)  # a slow learner: the writer waits most of the time
    assert waits()[0] - insert_wait > 0.5 * 1.5
    insert_wait, sample_wait = waits()
    inserts = server.limiter.inserts
    phase(1.5, 0.01, 0.0)  # a slow writer: the learner waits most of the time
    assert waits()[1] - sample_wait > 0.5 * 1.5
    assert server.limiter.inserts > inserts + 500
    assert server.limiter.measured_samples_per_insert == pytest.approx(SPI, rel=0.10)


def test_server_checkpoint_round_trips_exactly(tmp_path):
    # The server's own logic, in this process: restore, then save again, gives the same files.
    config, options = (
        small_config(),
        small_options(rate_limited=False),
    )  # the test adds faster than it samples
    a = ReplayServer(config, options, observation=2, row_state_shapes=STATE_SHAPES, seed=3)
    b = ReplayServer(config, options, observation=2, row_state_shapes=STATE_SHAPES, seed=99)
    rng = np.random.default_rng(0)
    pending = {o: np.zeros(4, bool) for o in ("actor-0", "actor-1")}
    regs = {o: a.register(o, 4) for o in pending}
    for _ in range(12):
        for owner, reg in regs.items():
            steps = synthetic_steps(rng, 4, 4, pending[owner])
            reply = a.add(owner, reg.incarnation, reg.lanes, steps, env_steps=16, episodes=((0, 5.0, 5),))
            assert reply.status == "ok"
        batch = a.sample(8, extra_state_offsets=(4, 8)).batch
        if batch is not None:
            a.update_priorities(batch.keys, rng.random(8) * 3)
    a.register("actor-0", 4)  # a restart: closes its lanes, bumps its incarnation
    a.save(tmp_path / "one")
    counters = b.restore(tmp_path / "one")
    assert counters["env_steps"] == 12 * 2 * 16 and counters["episodes"] == 24
    b.save(tmp_path / "two")
    with np.load(tmp_path / "one/replay.npz") as one, np.load(tmp_path / "two/replay.npz") as two:
        assert sorted(one.files) == sorted(two.files)
        for key in one.files:
            np.testing.assert_array_equal(one[key], two[key], err_msg=key)
    server_json = [json.loads((tmp_path / d / "server.json").read_text()) for d in ("one", "two")]
    assert server_json[0] == server_json[1]
    assert server_json[0]["limiter"]["inserts"] == 384 and server_json[0]["limiter"]["samples"] > 0
    # Same RNG, priorities and counters: the next draws are the same.
    for _ in range(3):
        x, y = a.sample(8, extra_state_offsets=(4,)), b.sample(8, extra_state_offsets=(4,))
        for field in x.batch._fields:
            np.testing.assert_equal(getattr(x.batch, field), getattr(y.batch, field), err_msg=field)
        assert (x.env_steps, x.samples) == (y.env_steps, y.samples)
    # The restored server goes on where the saved one stopped: incarnations too.
    assert b.register("actor-0", 4).incarnation == 2
    with pytest.raises(RuntimeError, match="^restore: writers have already registered"):
        b.restore(tmp_path / "one")
    # A save interrupted between its two renames leaves the last good checkpoint at .one.previous.
    (tmp_path / "one").rename(tmp_path / ".one.previous")
    c = ReplayServer(config, options, observation=2, row_state_shapes=STATE_SHAPES, seed=5)
    assert c.restore(tmp_path / "one") == counters
    (tmp_path / ".one.previous").rename(tmp_path / "one")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_restore_into_another_layout_names_the_cause(tmp_path):
    config = small_config()
    ReplayServer(config, small_options(), observation=2, row_state_shapes=STATE_SHAPES).save(
        tmp_path / "ckpt"
    )
    other = ReplayServer(config, small_options(num_actors=1), observation=2, row_state_shapes=STATE_SHAPES)
    with pytest.raises(ValueError, match="^directory: the replay in .* num_actors × num_envs = 4 lanes"):
        other.restore(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="^directory: .* holds no server.json"):
        other.restore(tmp_path)
    with pytest.raises(ValueError, match="^directory: this server has no checkpoint_dir"):
        other.save()


# ------------------------------------------------------------------ the CLI, slow

SHORT = [
    "--total-env-steps", "500", "--min-replay-steps", "150", "--eval-every", "250", "--eval-episodes", "4",
    "--num-envs", "4", "--batch-size", "8", "--core-units", "16", "--head-units", "16", "--torso-units", "16",
    "--burn-in", "4", "--unroll", "8", "--period", "4", "--replay-capacity", "4000", "--progress", "false",
    "--actors", "2",
]  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess:
    return cartpole_cli(*args, timeout=600)  # Ray start-up and two worker processes


@pytest.mark.slow
def test_cli_with_actors_trains_checkpoints_and_resumes(tmp_path):
    run = cli(*SHORT, "--run-dir", str(tmp_path), "--name", "d", "--seed", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "d"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] >= 500 and summary["updates"] > 0 and len(summary["history"]["evals"]) == 2
    assert [w["owner"] for w in summary["distributed"]["workers"]] == ["actor-0", "actor-1"]
    assert {p.name for p in (out / "checkpoint").iterdir()} == {"learner.npz", "loop.json"}
    assert {p.name for p in (out / "replay").iterdir()} == {"replay.npz", "server.json"}
    assert (out / "plot.png").is_file() and list((out / "tb").iterdir())

    evaluated = cli("--eval", str(out / "checkpoint"), "--eval-episodes", "3", "--seed", "2")  # its seed
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    resumed = cli(*SHORT[2:], "--total-env-steps", "800", "--run-dir", str(tmp_path), "--name", "d", "--seed", "2",
                  "--resume", "auto")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    again = json.loads((out / "summary.json").read_text())
    assert again["env_steps"] >= 800 and again["updates"] > summary["updates"]
    assert len(again["history"]["evals"]) == 3
    assert {f["kind"] for f in again["replay"]["faults"]} == {"resume"}
