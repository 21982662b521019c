"""R2D2 on POPGym's memory tasks over seeds: MMER, final return and steps to 0.9 against a random policy (``python -m studies.memory_suite``; ``--tasks all`` for every task)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from agents.cli import ArgumentParser, parse_overrides, run_script, script_imports

PROG = "python -m studies.memory_suite"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from agents.r2d2.config import R2D2Config
    from studies import memory_report as report_
    from studies import sweep
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
        return Path(self.run_dir) / sweep.run_name(self.task.name, self.seed)

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint in :attr:`out_dir` must have been trained for to be resumed by this job (whether
        it stops at its solve may differ: a run stopped there can go on to its budget)."""
        return sweep.json_form({
            "env": self.task.env_id, "seed": self.seed, "env_steps": self.env_steps,
            "eval_every": self.eval_every, "eval_episodes": self.eval_episodes, "overrides": self.overrides,
        })  # fmt: skip

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


JOB_FILE = sweep.JOB_FILE
"""In each run's directory: the :attr:`Job.identity` its checkpoints belong to."""


def run_env_id(out_dir: Path) -> str:
    """The env id a run directory (``TASK-sSEED``) was trained on: its :data:`JOB_FILE`'s, else the name's."""
    identity = sweep.read_json(out_dir / JOB_FILE)
    if isinstance(identity, dict) and isinstance(identity.get("env"), str):
        return identity["env"]
    return f"popgym-{sweep.split_run_name(out_dir.name)[0]}-v0"


def finished(job: Job) -> dict[str, Any] | None:
    """The summary on disk of ``job`` if that run finished its budget with the same config; else None.
    :class:`agents.rundir.RunDirError` if its directory is another job's (:func:`studies.sweep.check_identity`)."""
    state, summary = sweep.run_state(job, accept=functools.partial(_ended_as_asked, job))
    return summary if state == sweep.FINISHED else None


def _ended_as_asked(job: Job, summary: dict[str, Any]) -> bool:
    """Whether ``summary`` is of a run of ``job``'s env, seed, config and schedule that ran to its budget (or,
    for a job that stops when solved, to its solve)."""
    config, options = job.settings()
    args = summary.get("args", {})
    same = (
        summary.get("config") == sweep.json_form(config.to_json())
        and summary.get("env") == job.task.env_id
        and summary.get("seed") == job.seed
        and all(
            args.get(k) == getattr(options, k) for k in ("total_env_steps", "eval_every", "eval_episodes")
        )
    )
    ends = ("budget", "solved") if job.stop_when_solved else ("budget",)
    return same and summary.get("stop_reason") in ends


def run_job(job: Job, *, resume: bool) -> dict[str, Any]:
    """Train ``job`` (here, or in a sweep's worker); with ``resume`` a killed run goes on from its last
    checkpoint, if its job file vouches for it (and starts over if that checkpoint cannot be resumed)."""
    from agents.r2d2.checkpoint import CheckpointError

    if resume and sweep.resumable(job):
        try:
            return _train(job, resume=str(job.out_dir / sweep.CHECKPOINT))
        except CheckpointError as err:
            print(f"{job.out_dir.name}: starting over ({err})")
    return _train(job, resume="")


PROBE_BATCHES = 8
"""Batches of windows per ``--probe`` reading (a few hundred mid-episode windows)."""


def _train(job: Job, *, resume: str) -> dict[str, Any]:
    from agents.envs import make_vector_env
    from agents.experiment import train
    from studies.memory_probe import MemoryProbeHook, labeller

    config, options = job.settings()
    options = dataclasses.replace(options, resume=resume)
    sweep.claim(job, fresh=not resume)
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
    summaries, todo = sweep.plan(flat, finished=finished, resume=args.resume)
    json_path = args.out / "memory_suite.json"
    previous = sweep.read_json(json_path)
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
    sweep.run_jobs(
        functools.partial(run_job, resume=args.resume),
        todo,
        workers=args.workers,
        desc="memory suite runs",
        on_done=on_done,
    )
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
