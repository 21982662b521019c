"""R2D2 on POPGym's memory tasks over seeds: MMER, final return and steps to 0.9 against a random policy (``python -m studies.memory_suite``; ``--tasks all`` for every task)."""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents.cli import ArgumentParser, parse_overrides, run_script, script_imports

PROG = "python -m studies.memory_suite"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from agents.r2d2.config import R2D2Config
    from studies import memory_report as report_
    from studies.popgym_tasks import (
        DEFAULT_TASKS,
        PRESET,
        QUICK_CONFIG,
        QUICK_TASKS,
        TARGET_TASKS,
        TASKS,
        Task,
    )

CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(R2D2Config))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """One training run of the suite: a task and a seed with everything that fixes its outcome."""

    task: Task
    seed: int
    env_steps: int
    eval_every: int
    eval_episodes: int
    overrides: dict[str, Any]
    """R2D2Config overrides on the preset actually used (the task's, and ``--quick``'s)."""
    run_dir: str
    probe: bool = False
    """Read the core with :class:`studies.memory_probe.MemoryProbeHook` at every evaluation (where the task
    has labels); the training is the same with it as without."""
    stop_when_solved: bool = False
    """End the run at its first evaluation at >= 0.9 (its MMER is then that evaluation's return)."""

    @property
    def key(self) -> tuple[str, int, str]:
        return self.task.name, self.seed, self.run_dir

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / f"{self.task.name}-s{self.seed}"

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint in :attr:`out_dir` must have been trained for to be resumed by this job (whether
        it stops at its solve may differ: a run stopped there can go on to its budget)."""
        return json.loads(json.dumps({
            "env": self.task.env_id, "seed": self.seed, "env_steps": self.env_steps,
            "eval_every": self.eval_every, "eval_episodes": self.eval_episodes, "overrides": self.overrides,
        }))  # fmt: skip

    def settings(self) -> tuple[Any, Any]:
        """(R2D2Config, RunOptions) of the run; a checkpoint every tenth of the budget (for ``--resume``: a killed run loses at most that)."""
        from agents.experiment import RunOptions
        from agents.r2d2.config import preset

        options = RunOptions(
            total_env_steps=self.env_steps,
            eval_every=self.eval_every,
            eval_episodes=self.eval_episodes,
            solve_return=self.task.threshold,
            stop_when_solved=self.stop_when_solved,  # by default the whole curve: MMER and the final return
            checkpoint_every=max(self.env_steps // 10, self.eval_every),
            progress=False,
        )
        return preset(PRESET, **self.overrides), options


JOB_FILE = "job.json"
"""In each run's directory: the :attr:`Job.identity` its checkpoints belong to."""


def run_env_id(out_dir: Path) -> str:
    """The env id a run directory (``TASK-sSEED``) was trained on: its :data:`JOB_FILE`'s, else the name's."""
    identity = _read_json(out_dir / JOB_FILE)
    if isinstance(identity, dict) and isinstance(identity.get("env"), str):
        return identity["env"]
    return f"popgym-{out_dir.name.rsplit('-s', 1)[0]}-v0"


def finished(job: Job) -> dict[str, Any] | None:
    """The summary on disk of ``job`` if that run finished its budget with the same config; else None."""
    summary = _read_json(job.out_dir / "summary.json")
    if not isinstance(summary, dict):
        return None
    config, options = job.settings()
    args = summary.get("args", {})
    same = (
        summary.get("config") == json.loads(json.dumps(config.to_json()))
        and summary.get("env") == job.task.env_id
        and summary.get("seed") == job.seed
        and all(
            args.get(k) == getattr(options, k) for k in ("total_env_steps", "eval_every", "eval_episodes")
        )
    )
    ends = ("budget", "solved") if job.stop_when_solved else ("budget",)
    return summary if same and summary.get("stop_reason") in ends else None


def run_job(job: Job, *, threads: int, resume: bool) -> dict[str, Any]:
    """Train ``job`` (in a worker process with ``threads`` TensorFlow threads, or here with 0); a killed run
    resumes from its last checkpoint with ``resume`` (and starts over if that checkpoint is of another config)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    from agents.r2d2.checkpoint import CheckpointError

    checkpoint = job.out_dir / "checkpoint"
    if resume and (checkpoint / "loop.json").is_file():
        if _read_json(job.out_dir / JOB_FILE) != job.identity:  # e.g. a longer budget's curve is not ours
            print(f"{job.out_dir.name}: starting over (its checkpoint is of another budget or settings)")
        else:
            try:
                return _train(job, resume=str(checkpoint))
            except CheckpointError as err:
                print(f"{job.out_dir.name}: starting over ({err})")
    return _train(job, resume="")


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None if it cannot be read or parsed (UTF-8 errors included: ValueErrors)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


PROBE_BATCHES = 8
"""Batches of windows per ``--probe`` reading (a few hundred mid-episode windows)."""


def _train(job: Job, *, resume: str) -> dict[str, Any]:
    from agents.envs import make_vector_env
    from agents.experiment import train
    from studies.memory_probe import MemoryProbeHook, labeller

    config, options = job.settings()
    options = dataclasses.replace(options, resume=resume)
    if not resume:  # starting over: a stale checkpoint must not outlive the job file that vouches for it
        for stale in ("checkpoint", ".checkpoint.previous"):
            shutil.rmtree(job.out_dir / stale, ignore_errors=True)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    (job.out_dir / JOB_FILE).write_text(json.dumps(job.identity))
    run_args = {"seed": job.seed, **dataclasses.asdict(options)}
    label_fn = labeller(job.task.env_id) if job.probe else None
    hooks = [MemoryProbeHook(label_fn, batches=PROBE_BATCHES, seed=job.seed)] if label_fn else []
    return train(
        config,
        options,
        functools.partial(make_vector_env, env_id=job.task.env_id),
        seed=job.seed,
        out_dir=job.out_dir,
        title=f"R2D2 on {job.task.name} (preset {PRESET}, seed {job.seed})",
        fields={"env": job.task.env_id, "seed": job.seed, "config": config.to_json(), "args": run_args},
        hooks=hooks,
    )


def run_jobs(
    jobs: list[Job],
    *,
    workers: int,
    resume: bool,
    desc: str = "memory suite runs",
    on_done: Callable[[Job, dict[str, Any]], None] | None = None,
) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Every job's summary, with a progress bar over runs: here one after another with one worker, else in
    ``workers`` spawned processes (TensorFlow does not survive fork), the cores split between them.
    ``on_done(job, summary)`` is called as each run finishes (to report results as they come)."""
    from tqdm import tqdm

    from burnin.host import visible_cores

    done: dict[tuple[str, int, str], dict[str, Any]] = {}

    def finish(job: Job, summary: dict[str, Any]) -> None:
        done[job.key] = completed(summary)
        if on_done is not None:
            on_done(job, done[job.key])
        bar.update()

    with tqdm(total=len(jobs), desc=desc, unit="run") as bar:
        if workers == 1:
            for job in jobs:
                finish(job, run_job(job, threads=0, resume=resume))
            return done
        threads = max(1, visible_cores() // workers)
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            pending = {pool.submit(run_job, job, threads=threads, resume=resume): job for job in jobs}
            for fut in futures.as_completed(pending):
                finish(pending[fut], fut.result())
    return done


def completed(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary``, unless its run was interrupted (Ctrl-C, SIGTERM): then the suite stops too (exit 130),
    with the run's final checkpoint written for ``--resume``, rather than report a partial curve."""
    if summary["stop_reason"] == "interrupted":
        raise KeyboardInterrupt
    return summary


def task_entry(
    jobs: list[Job], summaries: dict[tuple[str, int, str], dict], random: dict, command: str
) -> dict[str, Any]:
    """The JSON entry of one task: its runs (one per seed) summarised."""
    job, by_seed = jobs[0], sorted(jobs, key=lambda j: j.seed)
    per_seed = {
        j.seed: report_.seed_metrics(
            summaries[j.key]["history"]["evals"],
            summaries[j.key]["history"]["episodes"],
            threshold=job.task.threshold,
        )
        for j in by_seed
    }
    seeds = list(per_seed)
    return {
        "env_id": job.task.env_id,
        "budget": job.env_steps,
        "eval_every": job.eval_every,
        "eval_episodes": job.eval_episodes,
        "preset": PRESET,
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in job.overrides.items()},
        "seeds": seeds,
        "stop_when_solved": job.stop_when_solved,
        "config": summaries[by_seed[0].key]["config"],
        "mmer": report_.stat([per_seed[s]["mmer"] for s in seeds]),
        "final": report_.stat([per_seed[s]["final"] for s in seeds]),
        "popgym": {"values": [per_seed[s]["popgym"] for s in seeds]},
        "threshold": job.task.threshold,
        "steps_to_threshold": [per_seed[s]["steps_to"] for s in seeds],
        "published": dataclasses.asdict(job.task.target) if job.task.target else None,
        "random_return": random,
        "curves": {str(s): per_seed[s]["curve"] for s in seeds},
        "updates": [summaries[j.key]["updates"] for j in by_seed],
        "wall_time_s": [summaries[j.key]["wall_time_s"] for j in by_seed],
        "command": command,
    }


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, list[Job]]]:
    """The CLI's arguments with ``--quick``'s and the defaults filled in, and the jobs they name (each
    task's config built once here); a bad one prints one line naming its flag and exits 2 (:mod:`agents.cli`)."""
    parser = ArgumentParser(
        prog=PROG, description=__doc__, epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="POPGym class names, 'all', or 'targets' (those with a published target) [the default run]",
    )
    add("--seeds", nargs="+", type=int, default=None, help="seeds per task [0 1 2]")
    add("--workers", type=int, default=None, help="runs in parallel processes (1: in this process) [2]")
    add("--env-steps", type=int, default=None, help="every selected task's budget [the table's]")
    add("--eval-every", type=int, default=None, help="env steps between evaluations [the table's, scaled]")
    add("--eval-episodes", type=int, default=None, help="greedy episodes per evaluation [32]")
    add("--random-episodes", type=int, default=None, help="episodes of the random policy [200]")
    add(
        "--stop-when-solved",
        action="store_true",
        help="end each run at its first evaluation at >= its threshold (saves the rest of its budget)",
    )
    add("--resume", action="store_true", help="reuse finished runs; resume killed ones from their checkpoint")
    add(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="R2D2Config overrides on every task's (JSON values), e.g. state_strategy='\"zero\"'",
    )
    add(
        "--probe",
        action="store_true",
        help="read the core at every evaluation (studies.memory_probe; tasks with labels); same training",
    )
    add(
        "--quick", action="store_true", help="CI: 2 tasks, 1 seed, 1000 env steps, tiny net, temp dir (≈20 s)"
    )
    add("--out", type=Path, default=None, help="directory of memory_suite.{md,json,png} [benchmarks/results]")
    add("--run-dir", type=Path, default=None, help="per-run outputs [runs/memory_suite]")
    args = parser.parse_args(argv)
    args.tasks = _tasks(parser, args.tasks, quick=args.quick)
    args.overrides = {k: v for k, v in parse_overrides(parser, args.set).items() if k in CONFIG_FIELDS}
    if len(args.overrides) < len(args.set):
        parser.error(f"--set: expected R2D2Config fields only, got {args.set}")
    _fill(args)
    parser.require_at_least(
        args, dict.fromkeys(("workers", "env_steps", "eval_every", "eval_episodes", "random_episodes"), 1)
    )
    if not args.seeds or min(args.seeds) < 0:
        parser.error(f"--seeds: expected ints >= 0, got {args.seeds}")
    if args.out is None:  # --quick never writes over the committed results
        args.out = (
            Path(tempfile.mkdtemp(prefix="memory-suite-")) if args.quick else Path("benchmarks/results")
        )
    if args.run_dir is None:
        args.run_dir = args.out / "runs" if args.quick else Path("runs/memory_suite")
    jobs = make_jobs(args)
    for name, runs in jobs.items():
        try:
            runs[0].settings()
        except (TypeError, ValueError) as err:
            parser.error(f"--tasks: {name}: {err}")
    return args, jobs


def _tasks(parser: ArgumentParser, names: list[str] | None, *, quick: bool) -> list[str]:
    if names is None:
        return list(QUICK_TASKS if quick else DEFAULT_TASKS)
    if names == ["all"]:
        return list(TASKS)
    if names == ["targets"]:
        return list(TARGET_TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown task {unknown[0]!r}; choices: {', '.join(TASKS)}, 'all' or 'targets'")
    return list(dict.fromkeys(names))


def _fill(args: argparse.Namespace) -> None:
    quick = args.quick
    defaults = {
        "seeds": [0] if quick else [0, 1, 2],
        "workers": 1 if quick else 2,
        "eval_episodes": 8 if quick else 32,
        "random_episodes": 20 if quick else 200,
        "env_steps": 1000 if quick else None,
        "eval_every": 500 if quick else None,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _epilog() -> str:
    rows = [
        f"  {t.name:30s} {t.env_steps:>9,} env steps, eval every {t.eval_every:,}" for t in TASKS.values()
    ]
    return f"tasks (default: {', '.join(DEFAULT_TASKS)}):\n" + "\n".join(rows)


def make_jobs(args: argparse.Namespace) -> dict[str, list[Job]]:
    """Per task, its jobs (one per seed) with the budget, evaluation interval and overrides they run with."""
    out: dict[str, list[Job]] = {}
    for name in args.tasks:
        task = TASKS[name]
        steps = args.env_steps or task.env_steps
        every = args.eval_every or max(1, round(task.eval_every * steps / task.env_steps))
        overrides = {**task.overrides, **(QUICK_CONFIG if args.quick else {}), **args.overrides}
        out[name] = [
            Job(task=task, seed=s, env_steps=steps, eval_every=every, eval_episodes=args.eval_episodes,
                overrides=overrides, run_dir=str(args.run_dir), stop_when_solved=args.stop_when_solved,
                probe=args.probe)
            for s in args.seeds
        ]  # fmt: skip
    return out


def random_returns(names: list[str], previous: dict[str, Any], *, episodes: int) -> dict[str, dict]:
    """The random policy's return per task: cached in the previous JSON when measured the same way."""
    out = {}
    for name in names:
        cached = previous.get(name, {}).get("random_return", {})
        if cached.get("episodes") == episodes and cached.get("seed") == 0:
            out[name] = cached
        else:
            out[name] = report_.random_return(TASKS[name].env_id, episodes=episodes, seed=0)
    return out


def _main(argv: list[str] | None) -> int:
    args, jobs = parse_args(argv)
    flat = [j for runs in jobs.values() for j in runs]
    summaries = {j.key: s for j in flat if args.resume and (s := finished(j)) is not None}
    if args.resume:
        print(f"resume: {len(summaries)} finished runs reused, {len(flat) - len(summaries)} to run")
    json_path = args.out / "memory_suite.json"
    previous = _read_json(json_path)
    report = previous if isinstance(previous, dict) else {}
    randoms = random_returns(args.tasks, report, episodes=args.random_episodes)
    command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])

    def report_task(name: str) -> None:
        """Once every seed of task ``name`` has finished: its entry, and the files rewritten with it."""
        if all(j.key in summaries for j in jobs[name]):
            report[name] = task_entry(jobs[name], summaries, randoms[name], command)
            write_report(report, args.out)

    def on_done(job: Job, summary: dict[str, Any]) -> None:
        summaries[job.key] = summary
        report_task(job.task.name)

    for name in args.tasks:  # tasks whose runs had all finished before (--resume)
        report_task(name)
    run_jobs([j for j in flat if j.key not in summaries], workers=args.workers, resume=args.resume,
             on_done=on_done)  # fmt: skip
    print(write_report(report, args.out))
    print(f"outputs: {args.out}/memory_suite.{{md,json,png}}")
    return 0


def write_report(report: dict[str, dict[str, Any]], out: Path) -> str:
    """memory_suite.{json,md,png} in ``out`` for ``report``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_suite.json").write_text(json.dumps(report, indent=1))
    md = report_.targets_markdown(report) + "\n" + report_.markdown(report)
    (out / "memory_suite.md").write_text(md)
    report_.plot(report, out / "memory_suite.png")
    return md


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag (one line on stderr), 130 when interrupted."""
    return run_script(PROG, lambda: _main(argv), tf_threads=True)


if __name__ == "__main__":
    sys.exit(main())
