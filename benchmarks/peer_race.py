"""burnin against SB3-contrib's RecurrentPPO (RL Zoo's settings) to each task's bar, in alternating processes: env steps and wall clock per seed, medians.

For each task and seed, burnin's CLI (``agents.cartpole`` / ``agents.train --preset popgym``, timed by
:mod:`benchmarks.time_split`) and then the peer (:mod:`benchmarks.recurrent_ppo_peer`, under its own
interpreter) each run in a process of their own, one after the other (burnin s, peer s, burnin s+1, …),
so both see the same load. Both evaluate alike: every ``--eval-every`` env steps, ``--eval-episodes``
greedy (deterministic) episodes side by side; a run stops at its first evaluation whose mean return
reaches the task's bar, and its env steps and wall clock (from the start of training, evaluations
included) there are its time to the bar. An unsolved run counts as slower than any solved one (a median
over seeds that falls on one is reported as "> budget"). burnin's runs also say where their time went:
updates needed, time per update, acting and evaluation (``time_split.json``). Outputs: JSON with every
run, a markdown table and a plot, written as the race goes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agents.cli import ArgumentParser, one_line, run_script
from benchmarks import race_report, time_split

PROG = "python -m benchmarks.peer_race"
ROOT = Path(__file__).resolve().parent.parent
PEER_MODULES = ("torch", "sb3_contrib", "gymnasium", "popgym")
PEER_PACKAGES = ("torch", "sb3-contrib", "stable-baselines3", "gymnasium", "popgym")


@dataclasses.dataclass(frozen=True)
class RaceTask:
    """A task of the race: its env id, bar and env-step budget, and the overrides both sides get."""

    name: str
    env_id: str
    bar: float
    budget: int
    burnin_flags: tuple[str, ...]
    """The train CLI's flags for the env, its preset and the task's overrides."""
    peer_set: tuple[str, ...] = ()
    """The same task overrides for the peer (``KEY=VALUE`` of its settings)."""

    @property
    def burnin_command(self) -> str:
        """How a user runs burnin's side (without the race's run-directory flags)."""
        from agents.cartpole import DEFAULTS

        if self.burnin_flags[: len(DEFAULTS)] == DEFAULTS:
            return " ".join(["python -m agents.cartpole", *self.burnin_flags[len(DEFAULTS) :]])
        return " ".join(["python -m agents.train", *self.burnin_flags])


POPGYM_RACE = (
    "RepeatFirstEasy",
    "RepeatPreviousEasy",
    "PositionOnlyCartPoleEasy",
    "VelocityOnlyCartpoleEasy",
)
"""POPGym's short-memory tasks of issue 27 (VelocityOnlyCartpole is spelled so by POPGym)."""
POPGYM_BUDGET = 200_000
"""Env steps for a POPGym task the memory suite has no budget for (its Easy tasks' budget)."""


def race_tasks() -> dict[str, RaceTask]:
    """Masked CartPole (the demo: its preset, its bar 475, its default budget) and the POPGym tasks (the
    popgym preset with the memory suite's per-task overrides, bar 0.9)."""
    from agents.cartpole import DEFAULTS
    from agents.envs import MASKED_CARTPOLE_ID, MASKED_CARTPOLE_SOLVED
    from agents.experiment import RunOptions
    from studies.popgym_tasks import PRESET, SOLVED, TASKS

    out = {
        "MaskedCartPole": RaceTask(
            "MaskedCartPole",
            MASKED_CARTPOLE_ID,
            MASKED_CARTPOLE_SOLVED,
            RunOptions().total_env_steps,
            DEFAULTS,
        )
    }
    for name in POPGYM_RACE:
        suite = TASKS.get(name)
        overrides = suite.overrides if suite else {}
        flags = [f for k, v in overrides.items() for f in (f"--{k.replace('_', '-')}", json.dumps(v))]
        env_id = f"popgym-{name}-v0"
        budget = suite.env_steps if suite else POPGYM_BUDGET
        peer_set = tuple(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        out[name] = RaceTask(
            name, env_id, SOLVED, budget, ("--env", env_id, "--preset", PRESET, *flags), peer_set
        )
    return out


PROTOCOL = ("eval_every", "eval_episodes", "peer_threads", "quick")
"""The race options both sides are held to; a resumed race must have the same."""
STATE = "peer_race.json"
"""The race's record in its run directory, written after every task and seed; ``--resume`` reads it."""
QUICK_TASKS = ("MaskedCartPole", "RepeatFirstEasy")
QUICK_BURNIN = (
    "--min-replay-steps", "100", "--num-envs", "4", "--batch-size", "8", "--core-units", "16",
    "--head-units", "16", "--torso-units", "16", "--burn-in", "4", "--unroll", "8", "--period", "4",
    "--n-step", "2", "--replay-capacity", "2000", "--env-steps-per-update", "4",
)  # fmt: skip
QUICK_PEER = ("n_envs=4", "n_steps=16", "batch_size=64", "n_epochs=2")
QUICK = dict(budget=400, eval_every=200, eval_episodes=2, seeds=1)
"""``--quick`` (CI, seconds): these two tasks, 1 seed, 400 env steps, 2 evaluations of 2 episodes, a tiny
burnin network and a short peer rollout; the pipeline is checked, nothing is measured."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RaceOptions:
    peer_python: str
    run_dir: Path
    budget: int | None
    eval_every: int
    eval_episodes: int
    peer_threads: int
    quick: bool


def peer_versions(python: str) -> tuple[dict[str, str] | None, str]:
    """The peer's package versions under ``python``, or None and why it cannot import what the peer needs."""
    code = (
        f"import {', '.join(PEER_MODULES)}, json; from importlib.metadata import version; "
        f"print(json.dumps({{p: version(p) for p in {PEER_PACKAGES!r}}}))"
    )
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as err:
        return None, one_line(err)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def burnin_argv(task: RaceTask, seed: int, options: RaceOptions) -> list[str]:
    """The train CLI's flags of burnin's run of ``task`` under ``seed`` after the task's own (it stops at the
    bar; no checkpoints during the run: the peer writes none)."""
    argv = list(QUICK_BURNIN if options.quick else ())
    argv += ["--seed", str(seed), "--total-env-steps", str(options.budget or task.budget)]
    argv += ["--eval-every", str(options.eval_every), "--eval-episodes", str(options.eval_episodes)]
    argv += ["--solve-return", str(task.bar), "--stop-when-solved", "true", "--checkpoint-every", "0"]
    return [*argv, "--progress", "false"]


def peer_argv(task: RaceTask, seed: int, options: RaceOptions) -> list[str]:
    argv = ["--task", task.env_id, "--seed", str(seed), "--budget", str(options.budget or task.budget)]
    argv += ["--eval-every", str(options.eval_every), "--eval-episodes", str(options.eval_episodes)]
    argv += ["--bar", str(task.bar), "--threads", str(options.peer_threads)]
    extra = [*task.peer_set, *(QUICK_PEER if options.quick else ())]
    return [*argv, "--set", *extra] if extra else argv


def run_process(cmd: list[str], log: Path) -> tuple[int, float, str, str]:
    """Run ``cmd`` from the repository root, its output in ``log``: (exit status, seconds, the last stdout
    line, the last stderr line)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    last = (done.stdout.strip().splitlines() or [""])[-1]
    return done.returncode, seconds, last, (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]


def first_at_bar(evals: list[dict[str, Any]], bar: float) -> dict[str, Any] | None:
    """The first evaluation whose mean return is at or above ``bar``."""
    return next((e for e in evals if e["mean_return"] >= bar), None)


def race_burnin(task: RaceTask, seed: int, options: RaceOptions) -> dict[str, Any]:
    """burnin's run of ``task`` under ``seed``: time to the bar and where it went."""
    name, flags = f"{task.name}-s{seed}", burnin_argv(task, seed, options)
    where = ["--run-dir", str(options.run_dir / "burnin"), "--name", name]
    # The race's own directory: a run there is this row's, left unfinished by an interrupted race.
    shutil.rmtree(options.run_dir / "burnin" / name, ignore_errors=True)
    cmd = [sys.executable, "-m", "benchmarks.time_split", *task.burnin_flags, *flags, *where]
    code, seconds, _, err = run_process(cmd, options.run_dir / "logs" / f"burnin-{name}.log")
    out: dict[str, Any] = {"command": " ".join([task.burnin_command, *flags]), "process_s": seconds}
    if code != 0:
        return {**out, "error": f"exit {code}: {err}"}
    run_dir = options.run_dir / "burnin" / name
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [
        {k: e[k] for k in ("env_steps", "updates", "mean_return", "wall_time_s")}
        for e in summary["history"]["evals"]
    ]
    hit = first_at_bar(evals, task.bar)
    splits = time_split.read(run_dir)
    return {
        **out,
        "solved_at_env_steps": hit and hit["env_steps"],
        "wall_to_bar_s": hit and hit["wall_time_s"],
        "updates_to_bar": hit and hit["updates"],
        "env_steps": summary["env_steps"],
        "updates": summary["updates"],
        "wall_s": summary["wall_time_s"],
        "throughput": summary["throughput"],
        "breakdown": first_at_bar(splits, task.bar),
        "breakdown_at_end": splits[-1] if splits else None,
        "config": summary["config"],
        "evals": evals,
    }


def race_peer(task: RaceTask, seed: int, options: RaceOptions) -> dict[str, Any]:
    """The peer's run of ``task`` under ``seed`` (its result as it reports it)."""
    argv = peer_argv(task, seed, options)
    cmd = [options.peer_python, "-m", "benchmarks.recurrent_ppo_peer", *argv]
    code, seconds, last, err = run_process(cmd, options.run_dir / "logs" / f"peer-{task.name}-s{seed}.log")
    if code != 0:
        return {"process_s": seconds, "error": f"exit {code}: {err}", "argv": argv}
    return {**json.loads(last), "process_s": seconds, "argv": argv}


def expected_config(task: RaceTask, seed: int, options: RaceOptions) -> dict[str, Any]:
    """The R2D2Config (as JSON) burnin's run of ``task`` under ``seed`` would train with today."""
    from agents.train import parse_args

    _, config = parse_args([*task.burnin_flags, *burnin_argv(task, seed, options)])
    return json.loads(json.dumps(config.to_json()))


def reusable(row: dict[str, Any] | None, task: RaceTask, seed: int, options: RaceOptions) -> bool:
    """Whether a resumed race's ``row`` stands as it is: both sides finished without an error, burnin with
    the config it would train with today and the peer with the same flags."""
    if row is None or any(side not in row or "error" in row[side] for side in race_report.SIDES):
        return False
    return row["burnin"].get("config") == expected_config(task, seed, options) and row["peer"].get(
        "argv"
    ) == peer_argv(task, seed, options)


def write_outputs(report: dict[str, Any], paths: dict[str, Path], tasks: dict[str, RaceTask]) -> None:
    """The JSON (also as ``RUN_DIR/peer_race.json``, which ``--resume`` reads), the markdown table and the
    plot of the race so far."""
    report["medians"] = race_report.summarise(report["runs"], {n: t.bar for n, t in tasks.items()})
    for path in {paths["json"], paths["state"]}:
        path.write_text(json.dumps(report, indent=1) + "\n")
    paths["markdown"].write_text(race_report.markdown(report))
    race_report.plot(report, paths["plot"])


def race_header(
    command: str, options: RaceOptions, tasks: dict[str, RaceTask], peer_packages: dict[str, str]
) -> dict[str, Any]:
    """The report's fields before any run: the command, host, both sides' packages, protocol, budgets."""
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": {
            "cpus": len(os.sched_getaffinity(0)),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "burnin_packages": {p: version(p) for p in ("tensorflow", "keras", "gymnasium", "popgym")},
        "peer_packages": peer_packages,
        "protocol": {
            **{k: getattr(options, k) for k in PROTOCOL},
            "order": "for each task and seed: burnin, then the peer, each in a process of its own",
        },
        "budgets": {n: options.budget or t.budget for n, t in tasks.items()},
        "runs": [],
    }


def _parse(argv: list[str] | None, tasks: dict[str, RaceTask]) -> Any:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peer-python", required=True, help="an interpreter with torch, sb3-contrib, gymnasium, popgym"
    )
    parser.add_argument("--tasks", nargs="+", choices=list(tasks), default=None, help="[all; --quick: 2]")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per task, from --first-seed [5]")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=None, help="env steps per run [each task's own]")
    parser.add_argument("--eval-every", type=int, default=5_000, help="env steps between evaluations [5000]")
    parser.add_argument("--eval-episodes", type=int, default=20, help="episodes per evaluation [20]")
    parser.add_argument("--peer-threads", type=int, default=2, help="torch threads of the peer [2]")
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="[runs/peer-race-DATE; --quick: a temp dir]"
    )
    for name in ("json", "markdown", "plot"):
        parser.add_argument(f"--{name}", type=Path, default=None, help=f"[RUN_DIR/peer_race.{name[:4]}]")
    parser.add_argument("--quick", action="store_true", help="CI: 2 tasks, 1 seed, 400 env steps, tiny nets")
    parser.add_argument(
        "--resume", action="store_true", help="go on with the race in --run-dir: its finished runs stand"
    )
    args = parser.parse_args(argv)
    minimums = {
        "seeds": 1,
        "first_seed": 0,
        "budget": 1,
        "eval_every": 1,
        "eval_episodes": 1,
        "peer_threads": 1,
    }
    parser.require_at_least(args, minimums)
    if args.quick:
        args.tasks = args.tasks or list(QUICK_TASKS)
        args.budget, args.eval_every = QUICK["budget"], QUICK["eval_every"]
        args.eval_episodes, args.seeds = QUICK["eval_episodes"], QUICK["seeds"]
    args.previous = None
    if args.resume:
        state = args.run_dir / STATE if args.run_dir is not None else None
        if state is None or not state.is_file():
            parser.error(
                f"--resume: needs the --run-dir of an earlier race (with its {STATE}), got {args.run_dir}"
            )
        try:
            args.previous = json.loads(state.read_text())
            args.previous["runs"], args.previous["protocol"], args.previous["budgets"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            parser.error(
                f"--resume: {str(state)!r} is not a race's record ({type(err).__name__}: {one_line(err)})"
            )
        differ = differences(args.previous, args, tasks)
        if differ:
            parser.error(f"--resume: the race in {str(args.run_dir)!r} ran with another {', '.join(differ)}")
    elif args.run_dir is not None and args.run_dir.exists():
        if not args.run_dir.is_dir() or any(args.run_dir.iterdir()):
            parser.error(
                f"--run-dir: {str(args.run_dir)!r} holds an earlier race (or is a file); give another, or "
                "--resume it"
            )
    versions, why = peer_versions(args.peer_python)
    if versions is None:
        parser.error(
            f"--peer-python: {args.peer_python!r} cannot import {', '.join(PEER_MODULES)} ({why}); make its "
            "venv as benchmarks/README.md says"
        )
    if args.run_dir is None:  # last: a temp dir is made only for a race that starts
        if args.quick:
            args.run_dir = Path(tempfile.mkdtemp(prefix="peer-race-"))
        else:
            args.run_dir = Path("runs") / f"peer-race-{time.strftime('%Y%m%d-%H%M%S')}"
    args.peer_packages = versions
    return args


def _main(argv: list[str] | None) -> int:
    tasks = race_tasks()
    args = _parse(argv, tasks)
    chosen = {name: tasks[name] for name in (args.tasks or tasks)}
    options = RaceOptions(
        peer_python=args.peer_python, run_dir=args.run_dir, budget=args.budget, eval_every=args.eval_every,
        eval_episodes=args.eval_episodes, peer_threads=args.peer_threads, quick=args.quick,
    )  # fmt: skip
    args.run_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": args.json or args.run_dir / "peer_race.json",
        "markdown": args.markdown or args.run_dir / "peer_race.md",
        "plot": args.plot or args.run_dir / "peer_race.png",
        "state": args.run_dir / STATE,
    }
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    report = race_header(command, options, chosen, args.peer_packages)
    before = resumed_rows(args.previous, report) if args.previous is not None else {}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    failed = []
    with tqdm(total=2 * len(chosen) * len(seeds), desc="peer race", unit="run") as bar:
        for name, task in chosen.items():
            for seed in seeds:
                if reusable(before.get((name, seed)), task, seed, options):
                    report["runs"].append(before[name, seed])
                    write_outputs(report, paths, chosen)
                    bar.update(2)
                    continue
                row: dict[str, Any] = {"task": name, "seed": seed}
                for side, race in (("burnin", race_burnin), ("peer", race_peer)):
                    row[side] = race(task, seed, options)
                    if "error" in row[side]:
                        failed.append(f"{side} {name} seed {seed}: {row[side]['error']}")
                    bar.update()
                report["runs"].append(row)
                write_outputs(report, paths, chosen)
    print(race_report.markdown(report))
    print(f"outputs: {paths['json']}, {paths['markdown']}, {paths['plot']}; runs and logs in {args.run_dir}")
    if failed:
        print(
            f"{PROG}: error: {len(failed)} run(s) failed (logs in {args.run_dir / 'logs'}): {failed[0]}",
            file=sys.stderr,
        )
        return 1
    return 0


def resumed_rows(previous: dict[str, Any], report: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """The earlier race's runs by (task, seed); ``report`` keeps the earlier commands and dates in
    ``sessions``."""
    earlier = previous.get("sessions") or [{"command": previous.get("command"), "date": previous.get("date")}]
    report["sessions"] = [*earlier, {"command": report["command"], "date": report["date"]}]
    return {(r["task"], r["seed"]): r for r in previous["runs"]}


def differences(previous: dict[str, Any], args: Any, tasks: dict[str, RaceTask]) -> list[str]:
    """What of the protocol and the budgets differs between an earlier race and this command."""
    out = [k.replace("_", "-") for k in PROTOCOL if previous["protocol"].get(k) != getattr(args, k)]
    for name in args.tasks or tasks:
        budget = args.budget or tasks[name].budget
        if previous["budgets"].get(name, budget) != budget:
            out.append(f"budget of {name} ({previous['budgets'][name]}, now {budget})")
    return out


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag or a peer interpreter that lacks a package (one line on
    stderr), 1 when a run failed (the others are still reported)."""
    return run_script(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
