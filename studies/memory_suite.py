"""R2D2 on POPGym's memory tasks over seeds: MMER, final return and steps to 0.9 against a random policy (``python -m studies.memory_suite``; ``--tasks all`` for every task)."""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agents.ablation import steps_text
from agents.cli import ArgumentParser, run_script

PROG = "python -m studies.memory_suite"
PRESET = "popgym"
"""The R2D2Config preset every task starts from (:data:`agents.r2d2.config.PRESETS`)."""
SOLVED = 0.9
"""The return the issue counts as solved (POPGym scales every task's return into [-1, 1])."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One row of the suite: a POPGym env (by its class name), its env-step budget, the env steps between
    greedy evaluations, and R2D2Config overrides on top of the ``popgym`` preset."""

    name: str
    env_steps: int
    eval_every: int
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def env_id(self) -> str:
        return f"popgym-{self.name}-v0"


# fmt: off
TASKS: dict[str, Task] = {t.name: t for t in (
    #    POPGym class                     env steps  eval every  R2D2Config overrides (on the popgym preset)
    Task("RepeatFirstEasy",                 200_000,      8_000,  {"gamma": 0.5}),  # actions never change what comes next
    Task("RepeatPreviousEasy",              200_000,      8_000,  {"gamma": 0.5}),  # (the same)
    Task("PositionOnlyCartPoleEasy",        200_000,      8_000,  {}),
    Task("CountRecallEasy",                 200_000,     10_000,  {}),
    Task("AutoencodeEasy",                  200_000,     10_000,  {}),
    Task("NoisyPositionOnlyCartPoleEasy",   200_000,     10_000,  {}),
    Task("MultiarmedBanditEasy",            200_000,     10_000,  {}),
    Task("HigherLowerEasy",                 200_000,     10_000,  {}),
    Task("MineSweeperEasy",                 200_000,     10_000,  {}),
    Task("BattleshipEasy",                  200_000,     10_000,  {}),
    Task("ConcentrationEasy",               200_000,     10_000,  {}),
    Task("RepeatPreviousMedium",            400_000,     20_000,  {"gamma": 0.5}),  # k = 32: memory > burn-in
    Task("RepeatFirstMedium",               400_000,     20_000,  {"gamma": 0.5}),  # 415-step episodes
)}
# fmt: on
"""The suite. Budgets: 200k env steps for the Easy tasks (the issue's reference budget), 400k for the Medium
ones; 20 to 25 evaluations each. Overrides: γ 0.5 where the actions never change what the agent sees next
(the Repeat games: only the immediate reward depends on the action; measured in
``studies.memory_sensitivity``)."""

DEFAULT_TASKS = ("RepeatFirstEasy", "RepeatPreviousEasy", "PositionOnlyCartPoleEasy")
"""The default run: the issue's three solve targets × 3 seeds at 200k env steps each. One run of the popgym
preset with one TensorFlow thread measured about 33 learner updates/s (136 env steps/s) on this 2-core
machine with two runs side by side, so a whole budget takes about 25 min and the nine runs on 2 workers
about 2 h; with ``--stop-when-solved`` (each run ends at its first evaluation at >= 0.9) the nine took
20 min. ``--tasks all`` runs every task (9M env steps: about 9 h on 2 workers); ``--tasks NAME …`` some;
``--env-steps N`` sets every selected task's budget."""

QUICK_TASKS = ("RepeatFirstEasy", "RepeatPreviousEasy")
QUICK_CONFIG = dict(
    torso_units=(16,), core_units=16, head_units=16, batch_size=8, num_envs=4, replay_capacity=2000,
    min_replay_steps=300, env_steps_per_update=8.0,
)  # fmt: skip
"""``--quick`` (CI, about 20 s): these two tasks, seed 0, 1000 env steps, a tiny network, 2 evaluations
of 8 episodes, 20 random episodes, outputs in a temp dir."""


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
        """(R2D2Config, RunOptions) of the run; a checkpoint every quarter of the budget (for ``--resume``)."""
        from agents.experiment import RunOptions
        from agents.r2d2.config import preset

        options = RunOptions(
            total_env_steps=self.env_steps,
            eval_every=self.eval_every,
            eval_episodes=self.eval_episodes,
            solve_return=SOLVED,
            stop_when_solved=self.stop_when_solved,  # by default the whole curve: MMER and the final return
            checkpoint_every=max(self.env_steps // 4, self.eval_every),
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


def _train(job: Job, *, resume: str) -> dict[str, Any]:
    from agents.envs import make_vector_env
    from agents.experiment import train

    config, options = job.settings()
    options = dataclasses.replace(options, resume=resume)
    if not resume:  # starting over: a stale checkpoint must not outlive the job file that vouches for it
        for stale in ("checkpoint", ".checkpoint.previous"):
            shutil.rmtree(job.out_dir / stale, ignore_errors=True)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    (job.out_dir / JOB_FILE).write_text(json.dumps(job.identity))
    run_args = {"seed": job.seed, **dataclasses.asdict(options)}
    return train(
        config,
        options,
        functools.partial(make_vector_env, env_id=job.task.env_id),
        seed=job.seed,
        out_dir=job.out_dir,
        title=f"R2D2 on {job.task.name} (preset {PRESET}, seed {job.seed})",
        fields={"env": job.task.env_id, "seed": job.seed, "config": config.to_json(), "args": run_args},
    )


def run_jobs(
    jobs: list[Job], *, workers: int, resume: bool, desc: str = "memory suite runs"
) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Every job's summary, with a progress bar over runs: here one after another with one worker, else in
    ``workers`` spawned processes (TensorFlow does not survive fork), the cores split between them."""
    from tqdm import tqdm

    done: dict[tuple[str, int, str], dict[str, Any]] = {}
    with tqdm(total=len(jobs), desc=desc, unit="run") as bar:
        if workers == 1:
            for job in jobs:
                done[job.key] = completed(run_job(job, threads=0, resume=resume))
                bar.update()
            return done
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            pending = {pool.submit(run_job, job, threads=threads, resume=resume): job for job in jobs}
            for fut in futures.as_completed(pending):
                done[pending[fut].key] = completed(fut.result())
                bar.update()
    return done


def completed(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary``, unless its run was interrupted (Ctrl-C, SIGTERM): then the suite stops too (exit 130),
    with the run's final checkpoint written for ``--resume``, rather than report a partial curve."""
    if summary["stop_reason"] == "interrupted":
        raise KeyboardInterrupt
    return summary


def random_return(env_id: str, *, episodes: int, seed: int) -> dict[str, Any]:
    """Mean and std of the return of a uniform random policy over ``episodes`` episodes (env reset with
    ``seed + i``, actions from the action space seeded with ``seed``)."""
    import gymnasium as gym

    from agents.envs import ensure_registered

    env = gym.make(ensure_registered(env_id), disable_env_checker=True)
    env.action_space.seed(seed)
    returns = []
    for i in range(episodes):
        env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    env.close()
    return {
        "mean": float(np.mean(returns)),
        "std": float(np.std(returns)),
        "episodes": episodes,
        "seed": seed,
    }


def stat(values: list[float]) -> dict[str, Any]:
    """Per-seed values with their mean and (population) std."""
    return {"values": values, "mean": float(np.mean(values)), "std": float(np.std(values))}


def seed_metrics(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """From one run's evaluations: the curve, MMER (its max), the final return, env steps to the first ≥ 0.9."""
    curve = [[int(e["env_steps"]), float(e["mean_return"])] for e in evals]
    returns = [r for _, r in curve]
    return {
        "curve": curve,
        "mmer": max(returns),
        "final": returns[-1],
        "steps_to": next((s for s, r in curve if r >= SOLVED), None),
    }


def task_entry(
    jobs: list[Job], summaries: dict[tuple[str, int, str], dict], random: dict, command: str
) -> dict[str, Any]:
    """The JSON entry of one task: its runs (one per seed) summarised."""
    job, by_seed = jobs[0], sorted(jobs, key=lambda j: j.seed)
    per_seed = {j.seed: seed_metrics(summaries[j.key]["history"]["evals"]) for j in by_seed}
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
        "mmer": stat([per_seed[s]["mmer"] for s in seeds]),
        "final": stat([per_seed[s]["final"] for s in seeds]),
        f"steps_to_{SOLVED:g}": [per_seed[s]["steps_to"] for s in seeds],
        "random_return": random,
        "curves": {str(s): per_seed[s]["curve"] for s in seeds},
        "updates": [summaries[j.key]["updates"] for j in by_seed],
        "wall_time_s": [summaries[j.key]["wall_time_s"] for j in by_seed],
        "command": command,
    }


def format_steps(values: list[int | None]) -> str:
    """Env steps per seed in thousands (``24k, 16.5k, —``; — for a run that never got there)."""
    if all(v is None for v in values):
        return "—"
    return ", ".join(steps_text(v) for v in values)


def lead_over_random(final: float, random: dict[str, float], *, episodes: int) -> float:
    """How far a final return lies above the random policy's, in standard errors of one evaluation.

    lead = (final − μ_random) / (σ_random / √episodes), σ_random the random policy's episode-return std: a
    policy that plays like the random one scores within ±2 about 95% of the time. Judged on the final
    return, not MMER: a max over ~20 evaluations lies about 2 standard errors above the mean by chance alone.
    """
    diff = final - random["mean"]
    se = random["std"] / math.sqrt(episodes)
    if se == 0:  # a task whose random return never varies: any difference is certain
        return math.copysign(math.inf, diff) if diff else 0.0
    return diff / se


CLEAR_LEAD = 3.0
"""A lead over random of at least this many standard errors counts as clear in the table."""


def lead_cell(final: float, random: dict[str, float], *, episodes: int) -> str:
    """The table's lead column: the lead in return and in standard errors, bold when clear. A lead that
    rounds to zero prints as +0.00 (0.0 SE), not −0.00 (−0.0 SE)."""
    lead = lead_over_random(final, random, episodes=episodes)
    # round, then + 0.0: a −0.0 becomes 0.0 (Python 3.10 has no "z" format option)
    text = f"{round(final - random['mean'], 2) + 0.0:+.2f} ({round(lead, 1) + 0.0:.1f} SE)"
    return f"**{text}**" if lead >= CLEAR_LEAD else text


def markdown(report: dict[str, dict[str, Any]]) -> str:
    """The table: one row per task in :data:`TASKS` order."""
    lines = [
        f"R2D2 (preset `{PRESET}` + the overrides shown) on POPGym, mean ± std over seeds. MMER: the best "
        "mean greedy return over a run's evaluations (POPGym's metric; returns lie in [−1, 1], perfect "
        f"play 1). Steps to {SOLVED:g}: env steps of the first evaluation at ≥ {SOLVED:g}, per seed. Random: a "
        "uniform random policy. Lead: the mean final return's lead over random, in standard errors of one "
        "evaluation of a random policy (σ_random / √episodes); ≥ "
        f"{CLEAR_LEAD:g} (bold) is a clear margin. Commands in memory_suite.json.",
        "",
        "| task | env steps | eval every × episodes | seeds | MMER | 1 − MMER | final | "
        f"steps to {SOLVED:g} | random | lead over random | overrides |",
        "| --- " * 11 + "|",
    ]
    for name in sorted(report, key=_order):
        e = report[name]
        m, f, r = e["mmer"], e["final"], e["random_return"]
        overrides = ", ".join(f"{k}={v}" for k, v in e["overrides"].items()) or "—"
        per_seed = ", ".join(f"{v:.2f}" for v in m["values"])
        mark = " ‡" if e.get("stop_when_solved") else ""
        lead_text = lead_cell(f["mean"], r, episodes=e["eval_episodes"])
        lines.append(
            f"| {name} | {e['budget']:,} | {e['eval_every']:,} × {e['eval_episodes']} | {len(e['seeds'])} | "
            f"{m['mean']:.2f} ± {m['std']:.2f} ({per_seed}) | {1 - m['mean']:.2f} | "
            f"{f['mean']:.2f} ± {f['std']:.2f}{mark} | {format_steps(e[f'steps_to_{SOLVED:g}'])} | {r['mean']:.2f} | "
            f"{lead_text} | {overrides} |"
        )
    if any(e.get("stop_when_solved") for e in report.values()):
        lines.append(
            f"\n‡ run with `--stop-when-solved`: a seed's run ends at its first evaluation at ≥ {SOLVED:g}, "
            "so its final return is that evaluation's (runs that never reach it use the whole budget)."
        )
    return "\n".join(lines) + "\n"


def _order(name: str) -> int:
    return list(TASKS).index(name) if name in TASKS else len(TASKS)


def plot(report: dict[str, dict[str, Any]], path: Path) -> None:
    """One learning-curve panel per task: mean greedy return over seeds ± std, random dashed, 0.9 dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(report, key=_order)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        _panel(ax, name, report[name])
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panel(ax, name: str, entry: dict[str, Any]) -> None:
    curves = [np.array(c, dtype=float) for c in entry["curves"].values()]
    for c in curves:  # each seed thin: a run stopped at its solve ends there
        ax.plot(c[:, 0], c[:, 1], color="tab:blue", lw=0.7, alpha=0.5)
    # mean ± std where every seed has evaluated (all evaluate at about the same env steps)
    grid = min(curves, key=len)[:, 0]
    ys = np.array([np.interp(grid, c[:, 0], c[:, 1]) for c in curves])
    mean, std = ys.mean(0), ys.std(0)
    ax.plot(grid, mean, color="tab:blue", label=f"R2D2 ({len(curves)} seed{'s' if len(curves) != 1 else ''})")
    ax.fill_between(grid, mean - std, mean + std, color="tab:blue", alpha=0.2)
    ax.axhline(entry["random_return"]["mean"], color="tab:gray", ls="--", lw=1, label="random")
    ax.axhline(SOLVED, color="tab:green", ls=":", lw=1, label=f"{SOLVED:g}")
    m = entry["mmer"]
    ax.set_title(f"{name}\nMMER {m['mean']:.2f} ± {m['std']:.2f}", fontsize=9)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("env steps", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="lower right")


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
        help="POPGym class names, or 'all' [the default run]",
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
        help=f"end each run at its first evaluation at >= {SOLVED:g} (saves the rest of its budget)",
    )
    add("--resume", action="store_true", help="reuse finished runs; resume killed ones from their checkpoint")
    add(
        "--quick", action="store_true", help="CI: 2 tasks, 1 seed, 1000 env steps, tiny net, temp dir (≈20 s)"
    )
    add("--out", type=Path, default=None, help="directory of memory_suite.{md,json,png} [benchmarks/results]")
    add("--run-dir", type=Path, default=None, help="per-run outputs [runs/memory_suite]")
    args = parser.parse_args(argv)
    args.tasks = _tasks(parser, args.tasks, quick=args.quick)
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
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown task {unknown[0]!r}; choices: {', '.join(TASKS)}, or 'all'")
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
        overrides = {**task.overrides, **(QUICK_CONFIG if args.quick else {})}
        out[name] = [
            Job(task=task, seed=s, env_steps=steps, eval_every=every, eval_episodes=args.eval_episodes,
                overrides=overrides, run_dir=str(args.run_dir), stop_when_solved=args.stop_when_solved)
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
            out[name] = random_return(TASKS[name].env_id, episodes=episodes, seed=0)
    return out


def _main(argv: list[str] | None) -> int:
    args, jobs = parse_args(argv)
    flat = [j for runs in jobs.values() for j in runs]
    summaries = {j.key: s for j in flat if args.resume and (s := finished(j)) is not None}
    if args.resume:
        print(f"resume: {len(summaries)} finished runs reused, {len(flat) - len(summaries)} to run")
    summaries.update(
        run_jobs([j for j in flat if j.key not in summaries], workers=args.workers, resume=args.resume)
    )
    json_path = args.out / "memory_suite.json"
    previous = _read_json(json_path)
    previous = previous if isinstance(previous, dict) else {}
    randoms = random_returns(args.tasks, previous, episodes=args.random_episodes)
    command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])
    report = {**previous, **{n: task_entry(jobs[n], summaries, randoms[n], command) for n in args.tasks}}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (args.out / "memory_suite.md").write_text(md)
    plot(report, args.out / "memory_suite.png")
    print(md)
    print(f"outputs: {args.out}/memory_suite.{{md,json,png}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag (one line on stderr), 130 when interrupted."""
    return run_script(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
