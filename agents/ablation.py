"""The R2D2 stored-state study on masked CartPole: six state strategies, several seeds, ΔQ and learning curves."""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import functools
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agents.cli import ArgumentParser, run_script

PROG = "python -m agents.ablation"

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


def run_settings(strategy: str, env_steps: int, extra: dict[str, Any]) -> tuple[Any, Any]:
    """The (R2D2Config, RunOptions) of one run of ``strategy``: its overrides, then ``extra`` (the ``--set``
    overrides of either). ValueError/TypeError naming the field for a bad value."""
    from agents.envs import MASKED_CARTPOLE_SOLVED
    from agents.experiment import RunOptions
    from agents.r2d2 import R2D2Config

    option_names = {f.name for f in dataclasses.fields(RunOptions)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items() if k not in option_names}
    config = R2D2Config(**{**STRATEGIES[strategy][1], **fields})
    options = RunOptions(
        total_env_steps=env_steps,
        solve_return=MASKED_CARTPOLE_SOLVED,
        stop_when_solved=False,  # every strategy gets the same budget
        checkpoint_every=0,
        progress=False,
        **{k: v for k, v in extra.items() if k in option_names},
    )
    return config, options


def _run_one(
    strategy: str, seed: int, env_steps: int, out_dir: str, threads: int, extra: dict[str, Any]
) -> dict:
    """One training run in its own process; returns its summary (also on disk)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from agents.envs import MASKED_CARTPOLE_ID, make_vector_env
    from agents.experiment import train

    config, options = run_settings(strategy, env_steps, extra)
    name = f"{strategy}-s{seed}"
    run_args = {"seed": seed, "name": name, "run_dir": out_dir, **dataclasses.asdict(options)}
    return train(
        config,
        options,
        functools.partial(make_vector_env, env_id=MASKED_CARTPOLE_ID),
        seed=seed,
        out_dir=Path(out_dir) / name,
        title=f"R2D2 on masked CartPole ({config.core}, seed {seed})",
        fields={"name": name, "seed": seed, "config": config.to_json(), "args": run_args},
    )


def finished_summary(
    strategy: str, seed: int, env_steps: int, run_dir: Path, extra: dict[str, Any]
) -> dict | None:
    """A finished run's summary from disk, if it ran this strategy, seed, budget and overrides; else None."""
    path = run_dir / f"{strategy}-s{seed}" / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    wanted = {**STRATEGIES[strategy][1], **extra}
    recorded = {**summary.get("config", {}), **summary.get("args", {})}
    same = all(recorded.get(k) == v for k, v in wanted.items())
    budget = summary.get("args", {}).get("total_env_steps") == env_steps
    if same and budget and summary.get("stop_reason") == "budget" and summary.get("seed") == seed:
        return summary
    return None


def run_metrics(summary: dict[str, Any], *, solve_return: float = 475.0) -> dict[str, Any]:
    """ΔQ over the second half of training, final and best return, area under the return curve, steps to 475."""
    hist = summary["history"]
    learner = hist["learner"]
    half = learner[len(learner) // 2 :] if learner else []
    evals = hist["evals"]
    steps = np.array([e["env_steps"] for e in evals], dtype=float)
    rets = np.array([e["mean_return"] for e in evals], dtype=float)
    # Normalised area under the eval curve: mean return over the budget, starting at 0 steps.
    if len(steps):
        xs = np.concatenate([[0.0], steps])
        ys = np.concatenate([[rets[0]], rets])
        auc = float(np.trapezoid(ys, xs) / xs[-1]) if xs[-1] > 0 else float("nan")
    else:
        auc = float("nan")
    solved = next((e["env_steps"] for e in evals if e["mean_return"] >= solve_return), None)

    def mean_of(key: str) -> float:
        values = [x[key] for x in half if x[key] is not None and np.isfinite(x[key])]
        return float(np.mean(values)) if values else float("nan")

    return {
        "delta_q_first": mean_of("delta_q_first"),
        "delta_q_last": mean_of("delta_q_last"),
        "final_return": float(rets[-1]) if len(rets) else float("nan"),
        "best_return": float(rets.max()) if len(rets) else float("nan"),
        "auc_return": auc,
        "steps_to_475": solved,
        "wall_time_s": summary["wall_time_s"],
        "updates": summary["updates"],
    }


def aggregate(per_run: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    table = {}
    for strategy, runs in per_run.items():
        row: dict[str, Any] = {"description": STRATEGIES[strategy][0], "seeds": sorted(runs)}
        for key in ("delta_q_first", "delta_q_last", "final_return", "best_return", "auc_return"):
            values = np.array([r[key] for r in runs.values()], dtype=float)
            finite = values[np.isfinite(values)]
            row[key] = {
                "mean": float(finite.mean()) if finite.size else None,
                "std": float(finite.std()) if finite.size else None,
                "values": [None if not np.isfinite(v) else float(v) for v in values],
            }
        row["steps_to_475"] = [runs[s]["steps_to_475"] for s in sorted(runs)]
        table[strategy] = row
    return table


def _fmt(stat: dict[str, Any], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}g} ± {stat['std']:.{digits}g}"


def markdown(table: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Masked CartPole, {meta['env_steps']} env steps per run, seeds {meta['seeds']}, "
        f"mean ± std over seeds. ΔQ is averaged over the second half of each run's updates.",
        "",
        "| strategy | ΔQ first trained step | ΔQ last stored-state step | final return | AUC return | steps to 475 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in table.values():
        solved = ", ".join("—" if s is None else f"{s // 1000}k" for s in row["steps_to_475"])
        lines.append(
            f"| {row['description']} | {_fmt(row['delta_q_first'])} | {_fmt(row['delta_q_last'])} | "
            f"{_fmt(row['final_return'], 4)} | {_fmt(row['auc_return'], 4)} | {solved} |"
        )
    lines.append("")
    lines.append(f"Command: `{meta['command']}`")
    return "\n".join(lines) + "\n"


def plot(per_run_summaries: dict[str, dict[int, dict[str, Any]]], path: Path, env_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_first, ax_last, ax_ret) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (strategy, runs) in zip(colors, per_run_summaries.items()):
        label = STRATEGIES[strategy][0]
        for key, ax in (("delta_q_first", ax_first), ("delta_q_last", ax_last)):
            curves = []
            for summary in runs.values():
                # NaN: no ΔQ at that update (a feed-forward net, or no row with a stored state there)
                pts = [
                    (x["updates"], x[key])
                    for x in summary["history"]["learner"]
                    if x[key] is not None and np.isfinite(x[key])
                ]
                if pts:
                    curves.append(np.array(pts, dtype=float))
            if curves:
                grid = np.linspace(max(c[0, 0] for c in curves), min(c[-1, 0] for c in curves), 60)
                ys = np.array([np.interp(grid, c[:, 0], c[:, 1]) for c in curves])
                ax.plot(grid, ys.mean(0), color=color, label=label)
                ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.15)
        curves = []
        for summary in runs.values():
            ev = summary["history"]["evals"]
            if ev:
                curves.append(np.array([(e["env_steps"], e["mean_return"]) for e in ev], dtype=float))
        if curves:
            grid = np.linspace(curves[0][0, 0], env_steps, 40)
            ys = np.array([np.interp(grid, c[:, 0], c[:, 1]) for c in curves])
            ax_ret.plot(grid, ys.mean(0), color=color, label=label)
            ax_ret.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.15)
    for ax, title in (
        (ax_first, "ΔQ at the first trained step"),
        (ax_last, "ΔQ at the last stored-state step"),
    ):
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("learner updates")
        ax.set_title(title)
    ax_ret.axhline(475, color="gray", ls="--", lw=1)
    ax_ret.set_xlabel("env steps")
    ax_ret.set_title("greedy eval return (mean over seeds, band: min–max)")
    ax_ret.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The study's arguments, and the ``--set`` overrides as a dict. A bad value prints one line naming
    its flag and exits 2 (:mod:`agents.cli`); every run's config is built here once to check it."""
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per strategy (>= 3 for the study)"
    )
    parser.add_argument("--env-steps", type=int, default=60_000, help="env-step budget of every run")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel processes")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation"), help="output prefix")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/ablation"), help="per-run outputs")
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
        help="reuse finished runs found in --run-dir with the same strategy, seed, budget and overrides",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers: expected an int >= 1, got {args.workers}")
    if args.env_steps < 1000:
        parser.error(f"--env-steps: expected an int >= 1000, got {args.env_steps}")
    bad_seeds = [s for s in args.seeds if s < 0]
    if bad_seeds:
        parser.error(f"--seeds: expected ints >= 0, got {bad_seeds}")
    extra = _overrides(parser, args.set)
    for strategy in args.strategies:
        try:
            run_settings(strategy, args.env_steps, extra)
        except (TypeError, ValueError) as err:
            parser.error(f"--set: {' '.join(str(err).split())} (strategy {strategy!r})")
    return args, extra


def _overrides(parser: ArgumentParser, items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` items as a dict of JSON values; FIELD must be an R2D2Config or RunOptions field."""
    from agents.experiment import RunOptions
    from agents.r2d2 import R2D2Config

    known = {f.name for f in dataclasses.fields(R2D2Config)} | {
        f.name for f in dataclasses.fields(RunOptions)
    }
    extra: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            parser.error(f"--set: expected FIELD=VALUE with FIELD an R2D2Config or run option, got {item!r}")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set: expected a JSON value for {key}, got {value!r}")
    return extra


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag (one line on stderr), 130 when interrupted."""
    return run_script(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args, extra = parse_args(argv)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    jobs = [(s, seed) for seed in args.seeds for s in args.strategies]
    summaries: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in args.strategies}
    if args.resume:
        for s, seed in list(jobs):
            found = finished_summary(s, seed, args.env_steps, args.run_dir, extra)
            if found is not None:
                summaries[s][seed] = found
                jobs.remove((s, seed))
        print(f"resume: {sum(map(len, summaries.values()))} finished runs reused, {len(jobs)} to run")
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
    from tqdm import tqdm

    with futures.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        pending = {
            pool.submit(_run_one, s, seed, args.env_steps, str(args.run_dir), threads, extra): (s, seed)
            for s, seed in jobs
        }
        for fut in tqdm(futures.as_completed(pending), total=len(pending), desc="ablation runs"):
            s, seed = pending[fut]
            summaries[s][seed] = fut.result()
    metrics = {s: {seed: run_metrics(summ) for seed, summ in runs.items()} for s, runs in summaries.items()}
    table = aggregate(metrics)
    meta = {
        "env_steps": args.env_steps,
        "seeds": args.seeds,
        "workers": args.workers,
        "wall_time_s": time.perf_counter() - start,
        "command": "python -m agents.ablation " + " ".join(argv if argv is not None else sys.argv[1:]),
        "overrides": {s: STRATEGIES[s][1] for s in args.strategies},
        "extra": extra,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "table": table, "runs": metrics}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = markdown(table, meta)
    args.out.with_suffix(".md").write_text(md)
    plot(summaries, args.out.with_suffix(".png"), args.env_steps)
    print(md)
    print(f"outputs: {args.out}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
