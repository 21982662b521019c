"""The stored state's part: memory-suite runs of the stored and the zero start at one budget, side by side, with both ΔQ readings (``python -m studies.stored_vs_zero``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agents.cli import ArgumentParser, run_script, script_imports

PROG = "python -m studies.stored_vs_zero"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from studies import sweep
    from studies.memory_report import format_steps, seed_metrics

STRATEGIES = ("stored", "zero")


def second_half_mean(history: list[dict[str, Any]], key: str) -> float:
    """Mean of ``key`` over the second half of a run's learner log (NaN entries skipped): the settled reading."""
    values = np.array([h[key] for h in history[len(history) // 2 :]], float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def probe_mean(evals: list[dict[str, Any]], key: str) -> float:
    """Mean over the run's probed evaluations in its second half, and over window positions, of a probe reading."""
    readings = [e["memory_probe"][key] for e in evals if e.get("memory_probe", {}).get("rows", 0) > 0]
    values = np.array(readings[len(readings) // 2 :], float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def run_row(summary: dict[str, Any], *, threshold: float, strategy: str) -> dict[str, Any]:
    """One run's numbers: its curve metrics, the learner's ΔQ against the stored state, and the probe's ΔQ
    (paper's and over the spread of Q) of this run's own start against the true state."""
    history = summary["history"]
    m = seed_metrics(history["evals"], history["episodes"], threshold=threshold)
    curve = np.array(m["curve"], float)
    return {
        "mmer": m["mmer"], "final": m["final"], "steps_to": m["steps_to"], "popgym": m["popgym"],
        "auc": float(np.trapezoid(curve[:, 1], curve[:, 0]) / (curve[-1, 0] - curve[0, 0])) if len(curve) > 1 else m["final"],
        "curve": m["curve"],
        "delta_q_vs_stored": second_half_mean(history["learner"], "delta_q_first"),
        "delta_q_vs_true": probe_mean(history["evals"], f"delta_q/{strategy}"),
        "delta_q_spread_vs_true": probe_mean(history["evals"], f"delta_q_spread/{strategy}"),
        "read_out": probe_mean(history["evals"], f"read_out/{strategy}"),
    }  # fmt: skip


def _mean_std(values: list[float]) -> str:
    stats = sweep.over_seeds(values)
    return "—" if stats["mean"] is None else f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def markdown(table: dict[str, dict[str, list[dict[str, Any]]]], *, budgets: dict[str, int]) -> str:
    lines = [
        "The stored start (the actor's state, then the burn-in) against the zero start (zeros, then the "
        "burn-in), each task at one budget for both, mean ± std over seeds. ΔQ vs stored: the learner's, "
        "at the first trained step, over the second half of its updates (the paper's first reading, its "
        "normaliser |max Q|). ΔQ vs true: the memory probe's, this run's start against the episode replayed "
        "from its first step with the current network, over the trained steps of windows that start "
        "mid-episode, second half of the evaluations; over |max Q| (paper) and over the spread of Q. "
        "Read-out: held-out accuracy of a linear read-out of the right answer from the state.",
        "",
        "| task | start | env steps | seeds | MMER | AUC | steps to threshold | ΔQ vs stored | ΔQ vs true "
        "(paper) | ΔQ vs true (spread) | read-out |",
        "| --- " * 11 + "|",
    ]
    for task, by_strategy in table.items():
        for strategy in STRATEGIES:
            rows = by_strategy.get(strategy, [])
            if not rows:
                continue
            col = lambda k, rows=rows: _mean_std([r[k] for r in rows])
            lines.append(
                f"| {task} | {strategy} | {budgets[task]:,} | {len(rows)} | {col('mmer')} | {col('auc')} | "
                f"{format_steps([r['steps_to'] for r in rows])} | {col('delta_q_vs_stored')} | "
                f"{col('delta_q_vs_true')} | {col('delta_q_spread_vs_true')} | {col('read_out')} |"
            )
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    """Learning curves per task: each seed thin, stored blue, zero orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(4.5 * len(table), 3.3), squeeze=False)
    for ax, (task, by_strategy) in zip(axes[0], table.items()):
        for strategy, color in zip(STRATEGIES, ("tab:blue", "tab:orange")):
            for i, row in enumerate(by_strategy.get(strategy, [])):
                c = np.array(row["curve"], float)
                ax.plot(
                    c[:, 0],
                    c[:, 1],
                    color=color,
                    lw=1,
                    alpha=0.8,
                    label=f"{strategy} start" if i == 0 else None,
                )
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("env steps", fontsize=8)
        ax.set_ylim(-1.05, 1.05)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def collect(run_dirs: dict[str, Path], tasks: list[str]) -> tuple[dict, dict[str, int]]:
    """Per task and start, the rows of the runs found under each start's memory-suite run directory."""
    table: dict[str, dict[str, list[dict[str, Any]]]] = {}
    budgets: dict[str, int] = {}
    for strategy, root in run_dirs.items():
        for task in tasks:
            for run in sweep.find_runs(root, task):
                summary = sweep.read_json(run / sweep.SUMMARY_FILE)
                if not isinstance(summary, dict):
                    continue  # unfinished
                if summary.get("config", {}).get("state_strategy") != strategy:
                    raise ValueError(
                        f"{run}: trained with the {summary.get('config', {}).get('state_strategy')} start"
                    )
                threshold = summary.get("args", {}).get("solve_return") or 0.9
                table.setdefault(task, {}).setdefault(strategy, []).append(
                    run_row(summary, threshold=threshold, strategy=strategy)
                )
                budgets[task] = summary["args"]["total_env_steps"]
    return table, budgets


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.split(" (")[0])
    parser.add_argument(
        "--stored", type=Path, required=True, help="memory-suite run directory of the stored start"
    )
    parser.add_argument(
        "--zero", type=Path, required=True, help="memory-suite run directory of the zero start"
    )
    parser.add_argument("--tasks", nargs="+", required=True, help="POPGym class names")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="directory of the outputs"
    )
    args: argparse.Namespace = parser.parse_args(argv)
    for flag in ("stored", "zero"):
        if not getattr(args, flag).is_dir():
            parser.error(f"--{flag}: {getattr(args, flag)} is not a directory")
    try:
        table, budgets = collect({"stored": args.stored, "zero": args.zero}, args.tasks)
    except ValueError as err:
        parser.error(f"--stored/--zero: {err}")
    if not table:
        parser.error(f"--tasks: no finished run of {args.tasks} under --stored or --zero")
    command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])
    md = markdown(table, budgets=budgets) + f"\nCommand: `{command}`\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stored_vs_zero.json").write_text(json.dumps({"command": command, "tasks": table}, indent=1))
    (args.out / "stored_vs_zero.md").write_text(md)
    plot(table, args.out / "stored_vs_zero.png")
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad argument (one line on stderr)."""
    return run_script(PROG, lambda: _main(argv), tf_threads=True)


if __name__ == "__main__":
    sys.exit(main())
