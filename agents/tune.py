"""Tune R2D2's settings for your env with Optuna: python -m agents.tune --env ENV_ID --trials N --budget STEPS [--preset NAME] [--set FIELD=VALUE …]

Each trial is one training run (the harness of :mod:`agents.experiment`, evaluated as the train CLI
evaluates) with a config drawn from :data:`SEARCH_SPACE` on top of the preset and ``--set``. It stops at
the env's bar (``--solve-return``, else the env spec's ``reward_threshold``) or at ``--budget`` env steps.
Its objective, minimised, is the env steps (``--objective wall``: seconds) to its first evaluation at the
bar; an unsolved run scores the budget (or, for seconds, the time cap or the time it used, whichever is
longer) × (2 − its progress towards the bar), so it ranks after every solved one and closer ones first. With ``--seeds N`` a trial is N runs (seeds ``--seed``, ``--seed`` + 1,
…) scored by their median: a preset should hold on seeds it was not drawn for. Optuna's TPE sampler
(seeded by ``--seed``) proposes; its median pruner stops a trial whose evaluations fall below the median of
earlier trials' at the same evaluation; under ``--objective wall`` a run stops once it has taken twice the
best trial's score (it cannot win from there), and any run at ``--time-cap`` seconds. A new study's first
trial is the preset itself (its values of the searched fields that are on the grid).

The study lives in SQLite (``RUN_DIR/tune/STUDY/study.db``, or ``--storage URL``): the same command run
again resumes it up to ``--trials`` finished trials; another env, budget, bar, preset, pins or objective
under the same study name is refused. Each trial's run is in ``RUN_DIR/tune/STUDY/trial-N`` (its
summary, plot and log; its checkpoint is removed). At the end the best trial's settings are printed as
flags for ``python -m agents.train`` and written to ``best.json``.

Needs Optuna: ``pip install -e '.[tune]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agents.cli import (
    EXIT_FAILED,
    EXIT_USAGE,
    ArgumentParser,
    one_line,
    parse_overrides,
    run_script,
    script_imports,
)

PROG = "python -m agents.tune"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from agents.envs import make_vector_env, solve_threshold
    from agents.r2d2.config import PRESETS, R2D2Config, preset

__all__ = ["PROG", "SEARCH_SPACE", "draw", "main", "score", "train_flags"]

SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "env_steps_per_update": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0),  # the replay ratio
    "min_replay_steps": (500, 1_000, 2_000, 5_000),  # the learning start
    "learning_rate": (1e-4, 3e-4, 1e-3, 3e-3),
    "batch_size": (16, 32, 64),
    "unroll": (10, 20, 40),
    "burn_in": (0, 10, 20),
    "core_units": (32, 64, 128, 256),
    "head_units": (32, 64, 128),
    "target_update_period": (100, 200, 400, 1_000),
    "n_step": (1, 3, 5),
    "gamma": (0.9, 0.95, 0.99, 0.997),
}
"""The choices of each R2D2Config field searched (a grid, so the best config prints exactly). A drawn
``unroll`` shorter than the preset's ``period`` takes ``period`` down to it (a window's steps must all be
trained)."""

QUICK_PINS = dict(
    torso_units=(16,), core_units=16, head_units=16, batch_size=8, num_envs=4, replay_capacity=2_000,
    min_replay_steps=100, burn_in=4, unroll=8, period=4,
)  # fmt: skip
QUICK = dict(trials=2, budget=300, eval_every=100, eval_episodes=2)
"""``--quick`` (CI, seconds): 2 trials of 300 env steps with a tiny network (these fields pinned, the rest
searched), 3 evaluations of 2 episodes, in a temp dir."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Search:
    """What a study is for: trials are comparable only within one of these."""

    env: str
    preset: str
    pins: dict[str, Any]
    fields: tuple[str, ...]
    budget: int
    bar: float
    objective: str
    eval_every: int
    eval_episodes: int
    seed: int
    seeds: int = 1
    time_cap_s: float | None = None

    def identity(self) -> dict[str, Any]:
        """The study's record of it (JSON), checked when a study is resumed."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def draw(trial: Any, search: Search) -> R2D2Config:
    """The trial's config: the preset, the pins, then one choice per searched field (ValueError if invalid)."""
    base = preset(search.preset, **search.pins)
    drawn = {name: trial.suggest_categorical(name, SEARCH_SPACE[name]) for name in search.fields}
    if "unroll" in drawn:
        drawn["period"] = min(base.period, drawn["unroll"])
    config = dataclasses.replace(base, **drawn)
    from agents.r2d2.loop import check_replay_fill

    check_replay_fill(config)
    return config


def score(
    summary: dict[str, Any], *, bar: float, objective: str, budget: int, time_cap_s: float | None = None
) -> float:
    """A finished run's objective: env steps (or seconds) to its first evaluation at ``bar``. Unsolved, its
    cost at the limit × (2 − progress), progress being its best evaluation's way from its first to the bar,
    in [0, 1]; the limit is ``budget`` env steps, or, for seconds, ``time_cap_s`` (or the time it used, if
    longer or if there is no cap), so that an unsolved run ranks after every solved run under the same
    limit (one stopped early, by the pruner or the cap, included)."""
    evals = summary["history"]["evals"]
    key = "env_steps" if objective == "steps" else "wall_time_s"
    hit = next((e for e in evals if e["mean_return"] >= bar), None)
    if hit is not None:
        return float(hit[key])
    limit = float(budget) if objective == "steps" else max(summary[key], time_cap_s or 0.0)
    if not evals or bar <= evals[0]["mean_return"]:
        return 2.0 * limit
    best = max(e["mean_return"] for e in evals)
    progress = min(max((best - evals[0]["mean_return"]) / (bar - evals[0]["mean_return"]), 0.0), 1.0)
    return limit * (2.0 - progress)


class PruneOnEvaluations:
    """A harness hook: reports each evaluation (its negated mean return, lower is better like the objective)
    to the trial, at step ``offset`` + its index, and stops the run ('pruned') when Optuna's pruner says so;
    with ``time_cap_s``, it stops the run ('over time') once its wall time passes the cap."""

    def __init__(self, trial: Any, *, offset: int = 0, time_cap_s: float | None = None) -> None:
        self.trial, self.offset, self.time_cap_s = trial, offset, time_cap_s

    def on_start(self, run: Any) -> None:
        self.seen = len(run.history.evals)

    def on_step(self, run: Any, stats: Any) -> str | None:
        if (
            self.time_cap_s is not None
            and run.wall_before + time.perf_counter() - run.start > self.time_cap_s
        ):
            return "over time"
        evals = run.history.evals
        if len(evals) == self.seen:
            return None
        self.seen = len(evals)
        self.trial.report(-evals[-1]["mean_return"], step=self.offset + len(evals) - 1)
        return "pruned" if self.trial.should_prune() else None

    def on_end(self, run: Any, summary: dict[str, Any]) -> None:
        pass


def time_cap(study: Any, search: Search) -> float | None:
    """A run's time cap: ``search.time_cap_s``, and under the wall objective twice the best finished trial's
    score if less (a run that long scores more than that trial whatever it reaches); None for neither."""
    import optuna

    done = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    caps = [search.time_cap_s] if search.time_cap_s is not None else []
    if search.objective == "wall" and done:
        caps.append(2.0 * min(done))
    return min(caps, default=None)


def preset_trial(search: Search) -> dict[str, Any]:
    """The preset's own values of the searched fields that are on the grid: enqueued as a new study's
    first trial, so the search shows what it gained over the preset."""
    base = preset(search.preset, **search.pins)
    return {f: getattr(base, f) for f in search.fields if getattr(base, f) in SEARCH_SPACE[f]}


def run_trial(trial: Any, search: Search, study_dir: Path) -> float:
    """Optuna's objective: the median score of the trial's config over ``search.seeds`` runs (seeds
    ``search.seed``, ``search.seed`` + 1, …), each in ``trial-N/seed-S``."""
    import optuna

    try:
        config = draw(trial, search)
    except ValueError as err:  # a drawn combination the config refuses: no run, never drawn as a best
        raise optuna.TrialPruned(f"invalid config: {one_line(err)}") from None
    trial_dir = study_dir / f"trial-{trial.number}"
    # A trial number is new in its study: anything in its directory is stale.
    shutil.rmtree(trial_dir, ignore_errors=True)
    cap, evals_per_run = time_cap(trial.study, search), search.budget // search.eval_every + 1
    scores, solved, steps = [], [], []
    for k in range(search.seeds):
        seed = search.seed + k
        out_dir = trial_dir / f"seed-{seed}" if search.seeds > 1 else trial_dir
        hook = PruneOnEvaluations(trial, offset=k * evals_per_run, time_cap_s=cap)
        summary = train_once(config, search, seed=seed, out_dir=out_dir, hook=hook, number=trial.number)
        if summary["stop_reason"] == "interrupted":
            raise KeyboardInterrupt
        if summary["stop_reason"] == "pruned":
            raise optuna.TrialPruned()
        scores.append(
            score(summary, bar=search.bar, objective=search.objective, budget=search.budget, time_cap_s=cap)
        )
        solved.append(summary["stop_reason"] == "solved")
        steps.append(summary["env_steps"])
    trial.set_user_attr("solved", all(solved))
    trial.set_user_attr("env_steps", steps[0] if search.seeds == 1 else steps)
    trial.set_user_attr("scores", scores)
    return float(statistics.median(scores))


def train_once(
    config: R2D2Config, search: Search, *, seed: int, out_dir: Path, hook: PruneOnEvaluations, number: int
) -> dict[str, Any]:
    """One training run of a trial, its log in ``out_dir/log.txt`` and its checkpoint removed after."""
    from agents.experiment import RunOptions, train

    out_dir.mkdir(parents=True)
    options = RunOptions(
        total_env_steps=search.budget, eval_every=search.eval_every, eval_episodes=search.eval_episodes,
        solve_return=search.bar, checkpoint_every=0, progress=False,
    )  # fmt: skip
    fields = {"env": search.env, "seed": seed, "config": config.to_json(), "trial": number}
    with open(out_dir / "log.txt", "w") as log, contextlib.redirect_stdout(log):  # the console keeps the bar
        summary = train(
            config, options, functools.partial(make_vector_env, env_id=search.env), seed=seed,
            out_dir=out_dir, title=f"tune trial {number} on {search.env} (seed {seed})", fields=fields,
            hooks=[hook],
        )  # fmt: skip
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)  # the search needs only the summary
    return summary


def train_flags(config: R2D2Config, preset_name: str) -> list[str]:
    """``config``'s fields that differ from the preset, as ``python -m agents.train`` flags."""
    base, out = preset(preset_name), []
    for f in dataclasses.fields(R2D2Config):
        value = getattr(config, f.name)
        if value == getattr(base, f.name):
            continue
        out.append("--" + f.name.replace("_", "-"))
        if isinstance(value, tuple):
            out += [str(v) for v in value]
        else:
            out.append(str(value).lower() if isinstance(value, bool) else str(value))
    return out


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--env", required=True, help="gymnasium env id ('module:id' imports module)")
    parser.add_argument("--preset", default="", help="R2D2Config preset to start from [by env id]")
    parser.add_argument("--trials", type=int, default=None, help="finished trials the study ends at [30]")
    parser.add_argument("--budget", type=int, default=None, help="env steps per trial at most [150000]")
    parser.add_argument("--solve-return", type=float, default=None, help="the bar [the env spec's]")
    parser.add_argument("--objective", choices=("steps", "wall"), default="steps", help="to the bar [steps]")
    parser.add_argument(
        "--search", nargs="+", choices=list(SEARCH_SPACE), default=None, help="[all but --set]"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="pin R2D2Config fields")
    parser.add_argument("--eval-every", type=int, default=None, help="env steps between evaluations [5000]")
    parser.add_argument("--eval-episodes", type=int, default=None, help="episodes per evaluation [20]")
    parser.add_argument("--pruner", choices=("median", "none"), default="median")
    parser.add_argument(
        "--time-cap", type=float, default=None, metavar="S", help="stop any run after S seconds [none]"
    )
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed and the first run's [0]")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per trial, seeds SEED, SEED+1, …; scored by their median [1]",
    )
    parser.add_argument("--study-name", default="", help="[ENV-PRESET-OBJECTIVE]")
    parser.add_argument("--run-dir", type=Path, default=None, help="[runs; --quick: a temp dir]")
    parser.add_argument(
        "--storage", default="", help="an Optuna storage URL [sqlite:///RUN_DIR/tune/STUDY/study.db]"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI: 2 tiny trials of 300 env steps, in a temp dir"
    )
    return parser


DEFAULTS = dict(trials=30, budget=150_000, eval_every=5_000, eval_episodes=20)
"""The flags' defaults (``--quick``'s are :data:`QUICK`)."""


def parse_args(parser: ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Search]:
    """The arguments and the :class:`Search` they describe; a bad one is one line naming its flag, exit 2."""
    from agents.train import MAX_SEED, check_env, default_preset
    from burnin._checks import check_choice

    args = parser.parse_args(argv)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else value)
    minimums = {"trials": 1, "budget": 1, "eval_every": 1, "eval_episodes": 1, "seed": 0, "seeds": 1}
    parser.require_at_least(args, minimums)
    if args.time_cap is not None and not args.time_cap > 0:
        parser.error(f"--time-cap: expected seconds > 0, got {args.time_cap}")
    if args.seed + args.seeds - 1 > MAX_SEED:
        last = f" (--seeds {args.seeds}: its last run's seed must be <= {MAX_SEED})" if args.seeds > 1 else ""
        parser.error(f"--seed: expected an int <= {MAX_SEED - args.seeds + 1}{last}, got {args.seed}")
    parser.build(check_env, args.env, aliases={"env_id": "env"})
    name = parser.build(check_choice, "preset", args.preset or default_preset(args.env), PRESETS)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in parse_overrides(parser, args.set).items()}
    pins = {**(QUICK_PINS if args.quick else {}), **given}
    not_config = sorted(set(pins) - {f.name for f in dataclasses.fields(R2D2Config)})
    if not_config:
        parser.error(
            f"--set: {', '.join(not_config)}: run options are flags here (--budget, --eval-every, …)"
        )
    try:
        preset(name, **pins)
    except (TypeError, ValueError) as err:
        parser.error(f"--set: {one_line(err)}")
    bar = args.solve_return if args.solve_return is not None else solve_threshold(args.env)
    if bar is None:
        parser.error(f"--solve-return: {args.env!r} has no reward_threshold in its spec: give the bar")
    fields = tuple(f for f in (args.search or SEARCH_SPACE) if f not in pins)
    if not fields:
        parser.error("--search: every field is pinned by --set: nothing to search")
    search = Search(
        env=args.env, preset=name, pins=pins, fields=fields, budget=args.budget, bar=bar,
        objective=args.objective, eval_every=args.eval_every, eval_episodes=args.eval_episodes, seed=args.seed,
        seeds=args.seeds, time_cap_s=args.time_cap,
    )  # fmt: skip
    args.study_name = args.study_name or re.sub(r"[^\w.-]+", "-", f"{args.env}-{name}-{args.objective}")
    if args.run_dir is None:
        args.run_dir = Path(tempfile.mkdtemp(prefix="tune-quick-")) if args.quick else Path("runs")
    args.study_dir = args.run_dir / "tune" / args.study_name
    args.storage = args.storage or f"sqlite:///{(args.study_dir / 'study.db').absolute()}"
    return args, search


def open_study(parser: ArgumentParser, args: argparse.Namespace, search: Search) -> Any:
    """The study, new or resumed (its record must be this search's), seeded TPE and the chosen pruner."""
    import optuna

    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
        if args.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    args.study_dir.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(
            storage=args.storage, study_name=args.study_name, direction="minimize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=search.seed), pruner=pruner,
        )  # fmt: skip
    except Exception as err:  # a bad URL, an unreadable database: Optuna's and SQLAlchemy's own errors
        parser.error(f"--storage: {args.storage!r}: {type(err).__name__}: {one_line(err)}")
    recorded = study.user_attrs.get("search")
    if recorded is None:
        study.set_user_attr("search", search.identity())
        first = preset_trial(search)
        if first:
            study.enqueue_trial(first)
    elif recorded != search.identity():
        differ = sorted(k for k in recorded if recorded[k] != search.identity().get(k))
        parser.error(
            f"--study-name: study {args.study_name!r} in {args.storage} is another search (its "
            f"{', '.join(differ)} differ); give another --study-name"
        )
    return study


def report_best(study: Any, search: Search, args: argparse.Namespace) -> int:
    """Print the best trial as train CLI flags and write ``best.json``; EXIT_FAILED if no trial finished."""
    import optuna

    states = [t.state for t in study.trials]
    counts = {s.name.lower(): states.count(s) for s in optuna.trial.TrialState if states.count(s)}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print(f"{PROG}: error: no trial finished ({counts}); logs in {args.study_dir}", file=sys.stderr)
        return EXIT_FAILED
    best = study.best_trial
    config = draw(optuna.trial.FixedTrial(best.params), search)
    flags = ["--env", search.env, "--preset", search.preset, *train_flags(config, search.preset)]
    if args.solve_return is not None:
        flags += ["--solve-return", str(search.bar)]
    command = " ".join(["python -m agents.train", *flags])
    unit = "env steps" if search.objective == "steps" else "s"
    tally = ", ".join(f"{n} {s}" for s, n in counts.items())
    if best.user_attrs.get("solved", False):
        outcome = f"{best.value:,.0f} {unit} to the bar {search.bar:g}"
    else:  # the best is then the closest: its score is what it used × (2 − progress)
        outcome = f"no trial reached the bar {search.bar:g} in {search.budget:,} env steps; the closest"
    print(f"best: trial {best.number} of {len(study.trials)} ({tally}): {outcome}")
    print(command)
    best_file = args.study_dir / "best.json"
    record = {"trial": best.number, "value": best.value, "objective": search.objective, "params": best.params}
    record.update(config=config.to_json(), command=command, search=search.identity(), trials=counts)
    best_file.write_text(json.dumps(record, indent=1) + "\n")
    print(f"all trials: {args.storage} (study {args.study_name!r}); best: {best_file}")
    return 0


def _main(argv: list[str] | None) -> int:
    import optuna

    parser = build_parser()
    args, search = parse_args(parser, argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and one line per trial say it
    study = open_study(parser, args, search)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = sum(t.state in finished for t in study.trials)
    if done:
        print(f"resuming study {args.study_name!r}: {done} of {args.trials} trials finished")
    if done < args.trials:
        from agents.experiment import RunFailed

        study.optimize(
            lambda trial: run_trial(trial, search, args.study_dir), n_trials=args.trials - done,
            catch=(RunFailed,), show_progress_bar=True, callbacks=[_trial_line],
        )  # fmt: skip
    return report_best(study, search, args)


def _trial_line(study: Any, trial: Any) -> None:
    from tqdm import tqdm

    if trial.value is None:
        how = trial.state.name.lower()
    else:
        solved = "solved" if trial.user_attrs.get("solved") else "unsolved, score"
        how = f"{solved} {trial.value:,.0f}"
    tqdm.write(f"trial {trial.number}: {how} {trial.params}")


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done; 2 for a bad flag, env or storage, or another search under the study's name (one
    line on stderr); 1 when no trial finished; 130 when interrupted (finished trials are kept)."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        print(f"{PROG}: error: needs Optuna: pip install -e '.[tune]'", file=sys.stderr)
        return EXIT_USAGE
    return run_script(PROG, lambda: _main(argv), tf_threads=True)


if __name__ == "__main__":
    sys.exit(main())
