"""studies.sweep: run names, jobs × seeds, what a run directory holds, the resume plan, runs here and in a pool, seed statistics."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agents.rundir import RunDirError
from studies import sweep

IDENTITY = {"env": "popgym-CountRecallEasy-v0", "seed": 0, "env_steps": 1000, "overrides": {"gamma": 0.0}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """A job as a study defines one (module level: the pool pickles it)."""

    name: str = "CountRecallEasy"
    seed: int = 0
    run_dir: str = "runs"
    identity: dict[str, Any] | None = dataclasses.field(default_factory=lambda: dict(IDENTITY))

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.seed

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / sweep.run_name(self.name, self.seed)


def echo(job: Job) -> dict[str, Any]:
    """A run that trains nothing: where it ran and with how many TensorFlow threads."""
    import tensorflow as tf

    return {
        "seed": job.seed,
        "pid": os.getpid(),
        "threads": [
            tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads(),
        ],
    }


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("CountRecallEasy-s0", ("CountRecallEasy", 0)),
        ("stored_burn_in-s12", ("stored_burn_in", 12)),
        ("zero-replay16k-s2", ("zero-replay16k", 2)),  # a '-s' inside the name: the last one splits
        ("v0", ("v0", None)),
        ("stored-sx", ("stored-sx", None)),
        ("RepeatFirstEasy-s", ("RepeatFirstEasy-s", None)),
    ],
)
def test_run_names_split_back_into_name_and_seed(name, split):
    assert sweep.split_run_name(name) == split
    if split[1] is not None:
        assert sweep.run_name(*split) == name


@pytest.mark.parametrize(
    ("seed_major", "expected"),
    [
        (False, [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]),
        (True, [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1)]),
    ],
)
def test_grid_is_every_variant_times_every_seed(seed_major, expected):
    assert sweep.grid(iter("abc"), iter([0, 1]), seed_major=seed_major) == expected
    assert sweep.grid([], [0, 1]) == [] and sweep.grid("ab", []) == []


def _fill(out_dir: Path, contents: dict[str, Any]) -> None:
    """A run directory holding ``contents``: file name -> JSON value, raw text (str), or a checkpoint."""
    out_dir.mkdir(parents=True)
    for name, value in contents.items():
        if name == "checkpoint":
            (out_dir / "checkpoint").mkdir()
            (out_dir / "checkpoint" / "loop.json").write_text("{}")
        else:
            (out_dir / name).write_text(value if isinstance(value, str) else json.dumps(value))


FINISHED_SUMMARY = {"stop_reason": "budget", "seed": 0}
STATES = [
    # (directory contents, the job's identity, accept(summary), the state found)
    ({}, IDENTITY, True, sweep.NEW),
    ({"summary.json": FINISHED_SUMMARY}, IDENTITY, True, sweep.FINISHED),  # from before job files
    (
        {"job.json": IDENTITY, "summary.json": FINISHED_SUMMARY, "checkpoint": 1},
        IDENTITY,
        True,
        sweep.FINISHED,
    ),
    ({"job.json": IDENTITY, "checkpoint": 1}, IDENTITY, True, sweep.RESUMABLE),  # killed after a checkpoint
    (
        {"job.json": IDENTITY, "summary.json": FINISHED_SUMMARY, "checkpoint": 1},
        IDENTITY,
        False,
        sweep.RESUMABLE,
    ),
    ({"job.json": IDENTITY, "summary.json": "{trunc", "checkpoint": 1}, IDENTITY, True, sweep.RESUMABLE),
    ({"checkpoint": 1}, IDENTITY, True, sweep.NEW),  # no job file vouches for it: of unknown settings
    ({"checkpoint": 1}, None, True, sweep.RESUMABLE),  # a study that keeps no job file
    ({"job.json": IDENTITY}, IDENTITY, True, sweep.NEW),  # claimed, killed before its first checkpoint
]


@pytest.mark.parametrize(("contents", "identity", "accept", "state"), STATES)
def test_run_state_reads_what_the_directory_holds(tmp_path, contents, identity, accept, state):
    job = Job(run_dir=str(tmp_path), identity=identity)
    if contents:
        _fill(job.out_dir, contents)
    found, summary = sweep.run_state(job, accept=lambda s: accept)
    assert found == state
    assert summary == (FINISHED_SUMMARY if state == sweep.FINISHED else None)
    assert sweep.resumable(job) is ("checkpoint" in contents and state != sweep.NEW)


CLASHES = [
    # (job.json on disk, what the message names besides the directory)
    ({**IDENTITY, "env_steps": 200_000}, "env_steps 200000 there, 1000 here"),
    ({**IDENTITY, "overrides": {"gamma": 0.5}}, "overrides.gamma 0.5 there, 0.0 here"),  # nested: dotted
    ({**IDENTITY, "overrides": {}}, "overrides.gamma None there, 0.0 here"),
    ({**IDENTITY, "overrides": None}, "overrides None there, {'gamma': 0.0} here"),
    ({k: v for k, v in IDENTITY.items() if k != "seed"}, "seed None there, 0 here"),
    ("{not json", "cannot be read as a job record"),
    ([1, 2], "cannot be read as a job record"),
]


@pytest.mark.parametrize(("recorded", "message"), CLASHES)
def test_a_directory_of_another_job_is_refused_naming_it(tmp_path, recorded, message):
    job = Job(run_dir=str(tmp_path))
    _fill(job.out_dir, {"job.json": recorded, "summary.json": FINISHED_SUMMARY, "checkpoint": 1})
    for check in (
        sweep.check_identity,
        sweep.resumable,
        lambda j: sweep.run_state(j, accept=lambda s: True),
        lambda j: sweep.plan([j], finished=lambda j: None, resume=False),
    ):
        with pytest.raises(ValueError, match="run directory") as err:
            check(job)
        assert isinstance(err.value, RunDirError)  # a CLI prints it as one line, exit 2
        assert str(job.out_dir) in str(err.value) and message in str(err.value)
    assert (job.out_dir / "checkpoint" / "loop.json").is_file()  # nothing removed


def test_identity_compares_as_json_reads_back(tmp_path):
    """Tuples in an identity (a config's layer sizes) are lists on disk: the same job."""
    job = Job(run_dir=str(tmp_path), identity={**IDENTITY, "overrides": {"torso_units": (16, 16)}})
    sweep.claim(job, fresh=True)
    assert json.loads((job.out_dir / sweep.JOB_FILE).read_text())["overrides"] == {"torso_units": [16, 16]}
    sweep.check_identity(job)


@pytest.mark.parametrize("fresh", [True, False])
def test_claim_records_the_job_and_a_fresh_run_drops_a_stale_checkpoint(tmp_path, fresh):
    job = Job(run_dir=str(tmp_path))
    _fill(job.out_dir, {"checkpoint": 1, "summary.json": FINISHED_SUMMARY})
    (job.out_dir / ".checkpoint.previous").mkdir()
    assert sweep.claim(job, fresh=fresh) == job.out_dir
    assert json.loads((job.out_dir / sweep.JOB_FILE).read_text()) == IDENTITY
    assert (job.out_dir / "checkpoint").exists() is not fresh
    assert (job.out_dir / ".checkpoint.previous").exists() is not fresh
    assert (job.out_dir / "summary.json").exists()  # the run's own summary replaces it when it ends
    assert [p.name for p in job.out_dir.iterdir() if p.name.startswith(f".{sweep.JOB_FILE}")] == []  # no temp
    sweep.claim(Job(run_dir=str(tmp_path), seed=1, identity=None), fresh=True)
    assert not (tmp_path / "CountRecallEasy-s1" / sweep.JOB_FILE).exists()


@pytest.mark.parametrize("resume", [True, False])
def test_plan_reuses_finished_runs_only_when_resuming(tmp_path, capsys, resume):
    jobs = [Job(run_dir=str(tmp_path), seed=s, identity={**IDENTITY, "seed": s}) for s in range(3)]
    _fill(jobs[1].out_dir, {"summary.json": {"seed": 1}})
    reused, todo = sweep.plan(
        jobs, finished=lambda j: sweep.read_json(j.out_dir / "summary.json"), resume=resume
    )
    if resume:
        assert reused == {("CountRecallEasy", 1): {"seed": 1}} and todo == [jobs[0], jobs[2]]
        assert capsys.readouterr().out == "resume: 1 finished runs reused, 2 to run\n"
    else:
        assert reused == {} and todo == jobs and capsys.readouterr().out == ""


def test_run_sweep_gives_every_summary_in_the_jobs_order_and_runs_only_the_rest(tmp_path):
    jobs = [Job(run_dir=str(tmp_path), name=n, seed=s) for n, s in sweep.grid("ab", [1, 0], seed_major=True)]
    ran = []

    def run(job: Job) -> dict[str, Any]:
        ran.append(job.key)
        return {"stop_reason": "budget", "key": list(job.key)}

    reused = {"stop_reason": "budget", "from": "disk"}
    found = sweep.run_sweep(
        run, jobs, finished=lambda j: reused if j.key == ("b", 1) else None, workers=1, resume=True, desc="t"
    )
    assert list(found) == [j.key for j in jobs] and found["b", 1] is reused
    assert ran == [("a", 1), ("a", 0), ("b", 0)]


def test_an_interrupted_run_stops_the_sweep(tmp_path):
    done = []
    jobs = [Job(run_dir=str(tmp_path), seed=s) for s in range(3)]
    summaries = {0: {"stop_reason": "budget"}, 1: {"stop_reason": "interrupted"}}
    with pytest.raises(KeyboardInterrupt):
        sweep.run_jobs(
            lambda j: summaries[j.seed], jobs, workers=1, desc="t", on_done=lambda j, s: done.append(j.seed)
        )
    assert done == [0]  # reported as it finished; the interrupted one is not, and nothing after it runs


def test_an_interrupted_run_in_a_pool_cancels_the_jobs_not_yet_started(tmp_path):
    """Leaving the pool after Ctrl-C must not run every queued job first (it did: the pool's exit waits)."""
    from concurrent import futures

    started, done = [], []
    jobs = [Job(run_dir=str(tmp_path), seed=s) for s in range(10)]

    def run(job: Job) -> dict[str, Any]:
        started.append(job.seed)
        if job.seed > 0:
            time.sleep(0.2)  # long enough that the main thread cancels the rest while this one runs
        return {"stop_reason": "interrupted" if job.seed == 0 else "budget"}

    with pytest.raises(KeyboardInterrupt), futures.ThreadPoolExecutor(max_workers=1) as pool:
        sweep.gather(pool, run, jobs, lambda j, s: done.append(sweep.completed(s)))
    assert started in ([0], [0, 1]) and done == []


def test_a_pool_runs_each_job_in_a_spawned_worker_with_its_share_of_the_cores(tmp_path):
    from burnin.host import visible_cores

    jobs = [Job(run_dir=str(tmp_path), seed=s) for s in range(3)]
    seen = []
    found = sweep.run_jobs(echo, jobs, workers=2, desc="t", on_done=lambda j, s: seen.append(j.seed))
    assert sorted(seen) == [0, 1, 2] and {k: s["seed"] for k, s in found.items()} == {
        j.key: j.seed for j in jobs
    }
    assert os.getpid() not in {s["pid"] for s in found.values()}
    share = max(1, visible_cores() // 2)
    assert all(s["threads"] == [share, share] for s in found.values())


@pytest.mark.parametrize(
    ("values", "per_seed", "mean", "std"),
    [
        ([1.0, 2.0, 4.0], [1.0, 2.0, 4.0], 7 / 3, math.sqrt(14) / 3),  # deviations −4/3, −1/3, 5/3
        ([0.5], [0.5], 0.5, 0.0),
        ([1, math.nan, None, 3], [1.0, None, None, 3.0], 2.0, 1.0),  # NaN and None: no reading, left out
        ([math.inf, -2.0], [None, -2.0], -2.0, 0.0),
        ([math.nan, None], [None, None], None, None),
        ([], [], None, None),
    ],
)
def test_over_seeds_by_hand(values, per_seed, mean, std):
    stats = sweep.over_seeds(values)
    assert stats["values"] == per_seed
    assert stats["mean"] == (None if mean is None else pytest.approx(mean))
    assert stats["std"] == (None if std is None else pytest.approx(std))


def test_find_runs_lists_a_sweeps_runs_by_name(tmp_path):
    for name in ("RepeatFirstEasy-s0", "RepeatFirstEasy-s10", "RepeatFirstEasyX-s0", "RepeatFirstEasy-sx"):
        (tmp_path / name).mkdir()
    for name in ("stored-s0.json", "zero-s1.json", "notes.json"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in sweep.find_runs(tmp_path, "RepeatFirstEasy")] == [
        "RepeatFirstEasy-s0",
        "RepeatFirstEasy-s10",
    ]
    assert [p.name for p in sweep.find_runs(tmp_path, suffix=".json")] == ["stored-s0.json", "zero-s1.json"]
