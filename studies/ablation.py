"""The R2D2 stored-state study on any env (masked CartPole by default): state strategies over seeds, ΔQ against the stored and the true state, learning curves."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agents.cli import ArgumentParser, parse_overrides, run_script, script_imports

PROG = "python -m studies.ablation"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from agents.envs import MASKED_CARTPOLE_ID
    from studies import sweep

# name -> (description, R2D2Config overrides)
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "zero": ("zero state, no burn-in", {"state_strategy": "zero", "burn_in": 0}),
    "zero_burn_in": ("zero state + burn-in", {"state_strategy": "zero"}),
    "stored": ("stored state, no burn-in", {"state_strategy": "stored", "burn_in": 0}),
    "stored_burn_in": ("stored state + burn-in", {"state_strategy": "stored"}),
    "stored_burn_in_refresh": (
        "stored state + burn-in + refresh",
        {"state_strategy": "stored", "refresh_states": True},
    ),
    "feed_forward": (
        "feed-forward net, same budget",
        {"core": "dense", "state_strategy": "zero", "burn_in": 0},
    ),
}

QUICK = dict(
    torso_units=[16], core_units=16, head_units=16, batch_size=8, num_envs=4, replay_capacity=2000,
    min_replay_steps=300, env_steps_per_update=8.0, eval_every=500, eval_episodes=8,
)  # fmt: skip
"""``--quick`` (CI): a tiny network and replay, 2 evaluations of 8 episodes; ``--set`` goes on top."""
QUICK_STRATEGIES = ("zero_burn_in", "stored_burn_in")
"""The strategies of ``--quick`` unless ``--strategies`` is given: the two whose starts differ mid-episode."""
POPGYM_SOLVED = 0.9
"""The return that counts as solved on a POPGym env (returns are scaled into [-1, 1]; the issue's target)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Study:
    """What every run of one study shares."""

    env: str = MASKED_CARTPOLE_ID
    preset: str = "masked-cartpole"
    env_steps: int = 60_000
    solve_return: float | None = 475.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``--set`` overrides (R2D2Config fields and run options), JSON values."""
    probe_batches: int = 4
    """Batches of windows for the second reading of ΔQ at every evaluation (0: none)."""


def result_name(env_id: str) -> str:
    """The study's file name: ``ablation`` for masked CartPole (as before any env was taken),
    ``ablation_<Class>`` for a POPGym id (its class, e.g. ``RepeatFirstMedium``), else the id sanitised."""
    bare = env_id.rpartition(":")[2]
    if bare == MASKED_CARTPOLE_ID:
        return "ablation"
    if bare.startswith("popgym-"):
        import gymnasium as gym

        from agents.envs import ensure_registered

        return "ablation_" + str(gym.spec(ensure_registered(env_id)).entry_point).rpartition(":")[2]
    return "ablation_" + re.sub(r"[^A-Za-z0-9_-]+", "_", bare)  # no '.': the suffixes are added to it


def default_solve_return(env_id: str) -> float | None:
    """The env spec's reward threshold, else :data:`POPGYM_SOLVED` for a POPGym id, else None."""
    from agents.envs import solve_threshold

    threshold = solve_threshold(env_id)
    if threshold is None and env_id.rpartition(":")[2].startswith("popgym-"):
        return POPGYM_SOLVED
    return threshold


def run_settings(strategy: str, study: Study) -> tuple[Any, Any]:
    """The (R2D2Config, RunOptions) of one run of ``strategy``: the preset, the strategy's overrides, then
    ``study.extra``. ValueError/TypeError naming the field for a bad value."""
    from agents.experiment import RunOptions
    from agents.r2d2.config import preset

    option_names = {f.name for f in dataclasses.fields(RunOptions)}
    extra = study.extra
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items() if k not in option_names}
    config = preset(study.preset, **{**STRATEGIES[strategy][1], **fields})
    options = RunOptions(
        total_env_steps=study.env_steps,
        solve_return=study.solve_return,
        stop_when_solved=False,  # every strategy gets the same budget
        checkpoint_every=0,
        progress=False,
        **{k: v for k, v in extra.items() if k in option_names},
    )
    return config, options


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """One run of the study: a strategy and a seed, in ``run_dir/STRATEGY-sSEED``."""

    study: Study
    strategy: str
    seed: int
    run_dir: str

    @property
    def key(self) -> tuple[str, int]:
        return self.strategy, self.seed

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / sweep.run_name(self.strategy, self.seed)

    @property
    def identity(self) -> dict[str, Any]:
        """What the run in :attr:`out_dir` was trained for (its ``job.json``): env, strategy, seed, config and
        run options (not ``probe_batches``: the probe reads windows with its own RNG, the training is the same)."""
        config, options = run_settings(self.strategy, self.study)
        return sweep.json_form({
            "env": self.study.env, "strategy": self.strategy, "seed": self.seed, "config": config.to_json(),
            "options": dataclasses.asdict(options),
        })  # fmt: skip


def run_job(job: Job) -> dict[str, Any]:
    """One training run from scratch (here, or in a sweep's worker); returns its summary (also on disk)."""
    from agents.envs import make_vector_env
    from agents.experiment import train
    from agents.seeds import RunSeeds
    from studies.episode_probe import SecondReadingHook

    study, strategy, seed = job.study, job.strategy, job.seed
    config, options = run_settings(strategy, study)
    name = job.out_dir.name
    run_args = {"seed": seed, "name": name, "run_dir": job.run_dir, **dataclasses.asdict(options)}
    probe = study.probe_batches and config.core != "dense"
    hooks = [SecondReadingHook(batches=study.probe_batches, seed=RunSeeds(seed).probe)] if probe else []
    return train(
        config,
        options,
        functools.partial(make_vector_env, env_id=study.env),
        seed=seed,
        out_dir=sweep.claim(job, fresh=True),
        title=f"R2D2 on {study.env} ({STRATEGIES[strategy][0]}, seed {seed})",
        fields={"name": name, "seed": seed, "env": study.env, "preset": study.preset,
                "config": config.to_json(), "args": run_args},
        hooks=hooks,
    )  # fmt: skip


def finished(job: Job) -> dict[str, Any] | None:
    """A finished run's summary from disk, if it ran this env, strategy, seed, config and run options to its
    budget; else None. RunDirError if its directory is another job's (:func:`studies.sweep.check_identity`)."""
    state, summary = sweep.run_state(job, accept=functools.partial(_ran_as_asked, job))
    return summary if state == sweep.FINISHED else None


def _ran_as_asked(job: Job, summary: dict[str, Any]) -> bool:
    config, options = run_settings(job.strategy, job.study)
    args = summary.get("args", {})
    same = (
        summary.get("config") == sweep.json_form(config.to_json())
        and all(args.get(k) == v for k, v in sweep.json_form(dataclasses.asdict(options)).items())
        and summary.get("env", MASKED_CARTPOLE_ID) == job.study.env  # runs from before --env: masked CartPole
    )
    return same and summary.get("stop_reason") == "budget" and summary.get("seed") == job.seed


def run_metrics(summary: dict[str, Any], *, solve_return: float | None = 475.0) -> dict[str, Any]:
    """ΔQ against the stored state (learner, second half of the updates) and against the true state (the
    second reading, second half of the evaluations); final and best return, area under the return curve,
    env steps to the first evaluation at ``solve_return``."""
    hist = summary["history"]
    learner, evals = hist["learner"], hist["evals"]
    steps = np.array([e["env_steps"] for e in evals], dtype=float)
    rets = np.array([e["mean_return"] for e in evals], dtype=float)
    # Normalised area under the eval curve: mean return over the budget, starting at 0 steps.
    if len(steps):
        xs = np.concatenate([[0.0], steps])
        ys = np.concatenate([[rets[0]], rets])
        auc = float(np.trapezoid(ys, xs) / xs[-1]) if xs[-1] > 0 else float("nan")
    else:
        auc = float("nan")
    solved = None
    if solve_return is not None:
        solved = next((e["env_steps"] for e in evals if e["mean_return"] >= solve_return), None)
    return {
        "delta_q_first": _late_mean(learner, "delta_q_first"),
        "delta_q_last": _late_mean(learner, "delta_q_last"),
        "true_delta_q_first": _late_mean(evals, "true_delta_q_first"),
        "true_delta_q_last": _late_mean(evals, "true_delta_q_last"),
        "final_return": float(rets[-1]) if len(rets) else float("nan"),
        "best_return": float(rets.max()) if len(rets) else float("nan"),
        "auc_return": auc,
        "steps_to_solve": solved,
        "wall_time_s": summary["wall_time_s"],
        "updates": summary["updates"],
    }


def _late_mean(entries: list[dict[str, Any]], key: str) -> float:
    """Mean of the finite ``key`` values over the second half of ``entries`` (NaN if none)."""
    half = entries[len(entries) // 2 :]
    values = [x[key] for x in half if x.get(key) is not None and np.isfinite(x[key])]
    return float(np.mean(values)) if values else float("nan")


STAT_KEYS = (
    "delta_q_first", "delta_q_last", "true_delta_q_first", "true_delta_q_last", "final_return",
    "best_return", "auc_return",
)  # fmt: skip


def aggregate(per_run: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per strategy: mean, std and per-seed values of every metric (NaN left out of the mean and std)."""
    table = {}
    for strategy, runs in per_run.items():
        row: dict[str, Any] = {"description": STRATEGIES[strategy][0], "seeds": sorted(runs)}
        for key in STAT_KEYS:
            stats = sweep.over_seeds(r.get(key, np.nan) for r in runs.values())
            row[key] = {"mean": stats["mean"], "std": stats["std"], "values": stats["values"]}
        row["steps_to_solve"] = [runs[s]["steps_to_solve"] for s in sorted(runs)]
        table[strategy] = row
    return table


def _fmt(stat: dict[str, Any], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}g} ± {stat['std']:.{digits}g}"


def steps_text(value: int | None) -> str:
    """Env steps in thousands for a table (``45k``, ``16.5k``), ``—`` for never."""
    return "—" if value is None else f"{value / 1000:.1f}".rstrip("0").rstrip(".") + "k"  # 45008 → 45k


def markdown(table: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The study's table: ΔQ (against the actor's stored state, and against the true state), returns."""
    solve = meta.get("solve_return")
    lines = [
        f"{meta.get('env', MASKED_CARTPOLE_ID)} (preset {meta.get('preset', 'masked-cartpole')}), "
        f"{meta['env_steps']} env steps per run, seeds {meta['seeds']}, mean ± std over seeds. "
        "ΔQ vs stored: the learner's, against the actor's stored state, averaged over the second half of "
        "each run's updates. ΔQ vs true: the paper's second reading, against the state replayed from the "
        "episode's first step with the current network, on windows that start mid-episode, averaged over "
        "the second half of the evaluations.",
        "",
        "| strategy | ΔQ vs stored, first trained step | ΔQ vs stored, last stored-state step | "
        "ΔQ vs true, first trained step | ΔQ vs true, last stored-state step | final return | "
        f"best return (MMER) | AUC return | steps to {'—' if solve is None else f'{solve:g}'} |",
        "| --- " * 9 + "|",
    ]
    for row in table.values():
        solved = ", ".join(steps_text(s) for s in row["steps_to_solve"])
        cells = [_fmt(row[k]) for k in STAT_KEYS[:4]] + [_fmt(row[k], 4) for k in STAT_KEYS[4:]]
        lines.append(f"| {row['description']} | " + " | ".join(cells) + f" | {solved} |")
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def _band(ax, curves: list[np.ndarray], grid: np.ndarray, color: str, **kw) -> None:
    """Mean over seeds of curves ``[n, 2]`` (x, y) on ``grid``, and their min–max band."""
    ys = np.array([np.interp(grid, c[:, 0], c[:, 1]) for c in curves])
    ax.plot(grid, ys.mean(0), color=color, **kw)
    ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.12)


def _points(entries: list[dict[str, Any]], x: str, y: str) -> np.ndarray | None:
    """``(x, y)`` of the entries with a finite ``y`` (NaN: no ΔQ there, e.g. a feed-forward net)."""
    pts = [(e[x], e[y]) for e in entries if e.get(y) is not None and np.isfinite(e[y])]
    return np.array(pts, dtype=float) if pts else None


def plot(
    per_run_summaries: dict[str, dict[int, dict[str, Any]]],
    path: Path,
    env_steps: int,
    *,
    solve_return: float | None = 475.0,
) -> None:
    """ΔQ at the first trained and the last stored-state step against updates (solid: vs the stored state,
    dashed: vs the true state), and the greedy return against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_first, ax_last, ax_ret) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (strategy, runs) in zip(colors, per_run_summaries.items()):
        label = STRATEGIES[strategy][0]
        for key, ax in (("delta_q_first", ax_first), ("delta_q_last", ax_last)):
            for source, name, style in (("learner", key, "-"), ("evals", "true_" + key, "--")):
                curves = [_points(r["history"][source], "updates", name) for r in runs.values()]
                curves = [c for c in curves if c is not None]
                if curves:
                    lo, hi = max(c[0, 0] for c in curves), min(c[-1, 0] for c in curves)
                    _band(ax, curves, np.linspace(lo, hi, 60), color, ls=style)
        curves = [_points(r["history"]["evals"], "env_steps", "mean_return") for r in runs.values()]
        curves = [c for c in curves if c is not None]
        if curves:
            _band(ax_ret, curves, np.linspace(curves[0][0, 0], env_steps, 40), color, label=label)
    for ax, title in (
        (ax_first, "ΔQ at the first trained step"),
        (ax_last, "ΔQ at the last stored-state step"),
    ):
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("learner updates")
        ax.set_title(f"{title}\n— vs the stored state, - - vs the true state")
    if solve_return is not None:
        ax_ret.axhline(solve_return, color="gray", ls="--", lw=1)
    ax_ret.set_xlabel("env steps")
    ax_ret.set_title("greedy eval return (mean over seeds, band: min–max)")
    ax_ret.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Study]:
    """The study's arguments and the :class:`Study` they describe. A bad value prints one line naming its
    flag and exits 2 (:mod:`agents.cli`); every run's config is built here once to check it."""
    from agents.r2d2.config import PRESETS
    from agents.train import check_env, default_preset
    from burnin._checks import check_choice

    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--env", default=MASKED_CARTPOLE_ID, help="gymnasium env id [%(default)s]")
    parser.add_argument("--preset", default="", help="R2D2Config preset (default: chosen by the env id)")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=None)
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="seeds per strategy (>= 2 for the study) [0 1 2]"
    )
    parser.add_argument("--env-steps", type=int, default=None, help="env-step budget of every run [60000]")
    parser.add_argument(
        "--solve-return", type=float, default=None,
        help="return that counts as solved (default: the env spec's, 0.9 on POPGym, else none)",
    )  # fmt: skip
    parser.add_argument(
        "--probe-batches", type=int, default=4,
        help="batches of windows for ΔQ against the true state at each evaluation (0: off) [4]",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=None, help="runs in parallel processes (1: here) [2; --quick: 1]"
    )
    parser.add_argument("--out", type=Path, default=None, help="output prefix [benchmarks/results/<name>]")
    parser.add_argument("--run-dir", type=Path, default=None, help="per-run outputs [runs/<name>]")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="extra R2D2Config or run option (RunOptions) overrides (JSON values)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse finished runs found in --run-dir with the same env, strategy, seed, config and options",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="CI: a tiny network, 1000 env steps, seed 0, zero vs stored + burn-in, here, outputs in a temp dir",
    )  # fmt: skip
    args = parser.parse_args(argv)
    _defaults(args)
    parser.require_at_least(args, {"workers": 1, "env_steps": 1000, "probe_batches": 0})
    bad_seeds = [s for s in args.seeds if s < 0]
    if bad_seeds:
        parser.error(f"--seeds: expected ints >= 0, got {bad_seeds}")
    parser.build(check_env, args.env, aliases={"env_id": "env"})
    args.preset = parser.build(check_choice, "preset", args.preset or default_preset(args.env), PRESETS)
    extra = {**(QUICK if args.quick else {}), **parse_overrides(parser, args.set)}
    solve = args.solve_return if args.solve_return is not None else default_solve_return(args.env)
    study = Study(env=args.env, preset=args.preset, env_steps=args.env_steps, solve_return=solve,
                  extra=extra, probe_batches=args.probe_batches)  # fmt: skip
    for strategy in args.strategies:
        try:
            run_settings(strategy, study)
        except (TypeError, ValueError) as err:
            parser.error(f"--set: {' '.join(str(err).split())} (strategy {strategy!r})")
    _outputs(args)  # last: a temp dir is made only for a run that starts
    return args, study


def _defaults(args: argparse.Namespace) -> None:
    """Fill the flags not given with the study's defaults, or ``--quick``'s."""
    quick = args.quick
    if args.strategies is None:
        args.strategies = list(QUICK_STRATEGIES if quick else STRATEGIES)
    if args.seeds is None:
        args.seeds = [0] if quick else [0, 1, 2]
    if args.env_steps is None:
        args.env_steps = 1000 if quick else 60_000
    if args.workers is None:
        args.workers = 1 if quick else 2


def _outputs(args: argparse.Namespace) -> None:
    """The output prefix and run directory not given: named after the env (:func:`result_name`); with
    ``--quick`` in a new temp dir, never over the committed results."""
    if args.quick and args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="ablation-quick-")) / "ablation"
    name = result_name(args.env)
    if args.out is None:
        args.out = Path("benchmarks/results") / name
    if args.run_dir is None:
        args.run_dir = args.out.parent / "runs" if args.quick else Path("runs") / name


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag (one line on stderr), 130 when interrupted."""
    return run_script(PROG, lambda: _main(argv), tf_threads=True)


def _main(argv: list[str] | None) -> int:
    args, study = parse_args(argv)
    jobs = [
        Job(study=study, strategy=s, seed=seed, run_dir=str(args.run_dir))
        for s, seed in sweep.grid(args.strategies, args.seeds, seed_major=True)
    ]
    start = time.perf_counter()
    found = sweep.run_sweep(
        run_job, jobs, finished=finished, workers=args.workers, resume=args.resume, desc="ablation runs"
    )
    # per strategy, its seeds in ascending order: the table's per-seed values line up with its "seeds"
    summaries = {s: {seed: found[s, seed] for seed in sorted(args.seeds)} for s in args.strategies}
    metrics = {
        s: {seed: run_metrics(summ, solve_return=study.solve_return) for seed, summ in runs.items()}
        for s, runs in summaries.items()
    }
    table = aggregate(metrics)
    meta = {
        "env": study.env,
        "preset": study.preset,
        "env_steps": study.env_steps,
        "solve_return": study.solve_return,
        "probe_batches": study.probe_batches,
        "seeds": args.seeds,
        "workers": args.workers,
        "wall_time_s": time.perf_counter() - start,
        "command": f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "overrides": {s: STRATEGIES[s][1] for s in args.strategies},
        "extra": study.extra,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "table": table, "runs": metrics}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = markdown(table, meta)
    args.out.with_suffix(".md").write_text(md)
    plot(summaries, args.out.with_suffix(".png"), study.env_steps, solve_return=study.solve_return)
    print(md)
    print(f"outputs: {args.out}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
