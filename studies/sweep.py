"""The one sweep runner of the studies: jobs × seeds, a directory per run, finished runs found and reused, the rest in a pool with a progress bar, and statistics over seeds."""

from __future__ import annotations

import concurrent.futures as futures
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from agents.rundir import RunDirError
from burnin._io import atomic_write_text, previous_dir

__all__ = [
    "CHECKPOINT",
    "FINISHED",
    "JOB_FILE",
    "NEW",
    "RESUMABLE",
    "SUMMARY_FILE",
    "Job",
    "check_identity",
    "claim",
    "completed",
    "find_runs",
    "grid",
    "json_form",
    "over_seeds",
    "plan",
    "read_json",
    "resumable",
    "run_jobs",
    "run_name",
    "run_state",
    "run_sweep",
    "split_run_name",
    "worker_setup",
]

JOB_FILE = "job.json"
"""In a run's directory: the identity of the job its checkpoints belong to (:attr:`Job.identity`)."""
SUMMARY_FILE = "summary.json"
"""In a run's directory: the harness's summary, written when the run ends (:mod:`agents.experiment`)."""
CHECKPOINT = "checkpoint"
"""In a run's directory: its last checkpoint (written whole; ``loop.json`` names a complete one)."""

FINISHED, RESUMABLE, NEW = "finished", "resumable", "new"
"""What :func:`run_state` finds in a job's directory."""


class Job(Protocol):
    """What the sweep reads of a study's job (each study has its own frozen dataclass, which the pool pickles)."""

    @property
    def key(self) -> Hashable:
        """Unique within a sweep: the summaries come back by it."""
        ...

    @property
    def out_dir(self) -> Path:
        """The run's directory, ``NAME-sSEED`` (:func:`run_name`) under the sweep's run directory."""
        ...

    @property
    def identity(self) -> dict[str, Any] | None:
        """What fixes the run's outcome, as :data:`JOB_FILE` records it; None for a study that keeps none."""
        ...


J = TypeVar("J", bound=Job)
V = TypeVar("V")


def run_name(name: str, seed: int) -> str:
    """A run's name in its sweep: ``NAME-sSEED`` (``CountRecallEasy-s0``, ``stored_burn_in-s2``)."""
    return f"{name}-s{seed}"


def split_run_name(name: str) -> tuple[str, int | None]:
    """(NAME, SEED) of a run's name (:func:`run_name`); (name, None) for a name that ends in no seed."""
    head, sep, seed = name.rpartition("-s")
    return (head, int(seed)) if sep and seed.isascii() and seed.isdigit() else (name, None)


def find_runs(root: Path, name: str = "*", *, suffix: str = "") -> list[Path]:
    """The runs under ``root`` whose NAME matches the glob ``name``, sorted: directories ``NAME-sSEED``, or
    with ``suffix`` files ``NAME-sSEED<suffix>`` (a study whose run is one file)."""
    found = root.glob(f"{name}-s*{suffix}")
    return sorted(p for p in found if split_run_name(p.name.removesuffix(suffix))[1] is not None)


def grid(variants: Iterable[V], seeds: Iterable[int], *, seed_major: bool = False) -> list[tuple[V, int]]:
    """Jobs × seeds: every (variant, seed), each variant's seeds together; with ``seed_major`` every variant
    of the first seed first (a sweep stopped early then has whole seeds to compare)."""
    variants, seeds = list(variants), list(seeds)
    if seed_major:
        return [(v, s) for s in seeds for v in variants]
    return [(v, s) for v in variants for s in seeds]


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None if it cannot be read or parsed (UTF-8 errors included: ValueErrors)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def json_form(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists): what a file on disk is compared with."""
    return json.loads(json.dumps(value))


def check_identity(job: Job) -> None:
    """:class:`agents.rundir.RunDirError` (a ValueError: a CLI prints it as one line, exit 2) naming the job's
    directory if its :data:`JOB_FILE` records another job or cannot be read: a sweep neither reuses nor
    overwrites another job's run (a longer budget's curve would pass for a shorter one's)."""
    path = job.out_dir / JOB_FILE
    if job.identity is None or not path.exists():  # new, or from before job files: the summary checks decide
        return
    recorded, wanted = read_json(path), json_form(job.identity)
    if recorded == wanted:
        return
    if isinstance(recorded, dict):
        what = "records another job: " + "; ".join(_differences(recorded, wanted))
    else:
        what = "cannot be read as a job record"
    raise RunDirError(
        f"run directory {job.out_dir}: its {JOB_FILE} {what}; give this sweep another --run-dir, or move "
        "that directory away"
    )


def _differences(there: dict[str, Any], here: dict[str, Any], prefix: str = "") -> list[str]:
    """``KEY X there, Y here`` per key whose values differ, nested keys dotted (``config.gamma``): a config
    of a hundred fields names the one that differs."""
    out = []
    for key in sorted(set(there) | set(here)):
        a, b = there.get(key), here.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} there, {b!r} here")
    return out


def run_state(job: Job, *, accept: Callable[[dict[str, Any]], bool]) -> tuple[str, dict[str, Any] | None]:
    """What the job's directory holds: (:data:`FINISHED`, its summary) if it has a summary that ``accept``
    takes (the run ended as the job asks, with its settings); (:data:`RESUMABLE`, None) if it has a checkpoint
    that its job file vouches for; else (:data:`NEW`, None). RunDirError if it is another job's
    (:func:`check_identity`)."""
    check_identity(job)
    summary = read_json(job.out_dir / SUMMARY_FILE)
    if isinstance(summary, dict) and accept(summary):
        return FINISHED, summary
    return (RESUMABLE if resumable(job) else NEW), None


def resumable(job: Job) -> bool:
    """Whether the job's directory holds a checkpoint its :data:`JOB_FILE` vouches for (one without a job file,
    from before them, is of unknown settings); RunDirError if it is another job's (:func:`check_identity`)."""
    check_identity(job)
    vouched = job.identity is None or (job.out_dir / JOB_FILE).is_file()
    return vouched and (job.out_dir / CHECKPOINT / "loop.json").is_file()


def claim(job: Job, *, fresh: bool) -> Path:
    """The job's directory, made, with the job's identity in :data:`JOB_FILE` (written atomically, so that a
    kill never leaves a half file to refuse later); ``fresh`` (a run from scratch) first removes a checkpoint
    left there, so that no stale checkpoint outlives the job file that vouches for it."""
    if fresh:
        for stale in (job.out_dir / CHECKPOINT, previous_dir(job.out_dir / CHECKPOINT)):
            shutil.rmtree(stale, ignore_errors=True)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    if job.identity is not None:
        atomic_write_text(job.out_dir / JOB_FILE, json.dumps(json_form(job.identity)))
    return job.out_dir


def plan(
    jobs: Sequence[J], *, finished: Callable[[J], dict[str, Any] | None], resume: bool
) -> tuple[dict[Hashable, dict[str, Any]], list[J]]:
    """(the summaries of the finished runs reused, by key; the jobs left to run). Every job's directory is
    checked first (:func:`check_identity`), so that a clash stops the sweep before anything trains; with
    ``resume``, ``finished(job)`` (the study's check of a summary on disk) finds the runs already done."""
    for job in jobs:
        check_identity(job)
    reused: dict[Hashable, dict[str, Any]] = {}
    if resume:
        reused = {job.key: s for job in jobs if (s := finished(job)) is not None}
        print(f"resume: {len(reused)} finished runs reused, {len(jobs) - len(reused)} to run")
    return reused, [job for job in jobs if job.key not in reused]


def worker_setup(threads: int) -> None:
    """A spawned worker's process-wide set-up, before its first run: TensorFlow's C++ logs muted unless asked
    for, and ``threads`` threads per op and ops at once (the cores split between the workers)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def completed(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary``, unless its run was interrupted (Ctrl-C, SIGTERM; the harness wrote its final checkpoint):
    then the sweep stops too (KeyboardInterrupt: exit 130) rather than report a partial run as finished."""
    if summary.get("stop_reason") == "interrupted":
        raise KeyboardInterrupt
    return summary


def run_jobs(
    run: Callable[[J], dict[str, Any]],
    jobs: Sequence[J],
    *,
    workers: int,
    desc: str,
    on_done: Callable[[J, dict[str, Any]], None] | None = None,
) -> dict[Hashable, dict[str, Any]]:
    """``run(job)``'s summary of every job, by key, with a progress bar over the runs: here one after another
    with one worker (this process's thread pools, as its script set them), else in ``workers`` spawned
    processes (TensorFlow does not survive fork) with the visible cores split between them. ``run`` must be
    picklable (a module's function, or a partial of one). ``on_done(job, summary)`` is called as each run
    finishes (to report results as they come)."""
    from tqdm import tqdm

    from burnin.host import visible_cores

    done: dict[Hashable, dict[str, Any]] = {}

    def finish(job: J, summary: dict[str, Any]) -> None:
        done[job.key] = completed(summary)
        if on_done is not None:
            on_done(job, done[job.key])
        bar.update()

    with tqdm(total=len(jobs), desc=desc, unit="run") as bar:
        if workers == 1:
            for job in jobs:
                finish(job, run(job))
            return done
        threads = max(1, visible_cores() // workers)
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=worker_setup, initargs=(threads,)
        ) as pool:
            gather(pool, run, jobs, finish)
    return done


def gather(
    pool: futures.Executor, run: Callable[[J], Any], jobs: Sequence[J], finish: Callable[[J, Any], None]
) -> None:
    """Submit every job to ``pool`` and ``finish`` each as it completes. On any exception (Ctrl-C, a run
    that was interrupted) the jobs not yet started are cancelled before it propagates: leaving the pool
    waits only for the runs under way (which Ctrl-C interrupts too), not for every queued one."""
    pending = {pool.submit(run, job): job for job in jobs}
    try:
        for fut in futures.as_completed(pending):
            finish(pending[fut], fut.result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def run_sweep(
    run: Callable[[J], dict[str, Any]],
    jobs: Sequence[J],
    *,
    finished: Callable[[J], dict[str, Any] | None],
    workers: int,
    resume: bool,
    desc: str,
) -> dict[Hashable, dict[str, Any]]:
    """Every job's summary, by key in the jobs' order: :func:`plan`, then :func:`run_jobs` on what is left."""
    reused, todo = plan(jobs, finished=finished, resume=resume)
    ran = run_jobs(run, todo, workers=workers, desc=desc)
    return {job.key: reused[job.key] if job.key in reused else ran[job.key] for job in jobs}


def over_seeds(values: Iterable[float | None]) -> dict[str, Any]:
    """One figure over seeds, as every study reports it: the per-seed ``values`` (None where not finite: a run
    without that reading) and the ``mean`` and population ``std`` of the finite ones (None without any)."""
    per_seed = [None if v is None or not np.isfinite(v) else float(v) for v in values]
    finite = np.array([v for v in per_seed if v is not None], dtype=float)
    if not finite.size:
        return {"values": per_seed, "mean": None, "std": None}
    return {"values": per_seed, "mean": float(finite.mean()), "std": float(finite.std())}
