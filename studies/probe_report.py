"""The memory probe's readings over training, as a table and a plot (``python -m studies.probe_report RUN_DIR …``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agents.cli import ArgumentParser, run_script, script_imports

PROG = "python -m studies.probe_report"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from studies.memory_probe import BINS, START_NAMES


def probed_evals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluations of a run's summary that carry a memory-probe reading with windows in it."""
    return [e for e in summary["history"]["evals"] if e.get("memory_probe", {}).get("rows", 0) > 0]


def mean_over_runs(readings: list[dict[str, Any]], key: str) -> list[float]:
    """Per bin, the mean over runs of a binned reading (NaN bins and runs without it skipped)."""
    values = np.array([r[key] for r in readings if key in r], float).reshape(-1, BINS)  # [runs, BINS]
    if not len(values):
        return [float("nan")] * BINS
    with np.errstate(invalid="ignore"):
        return [float(v) for v in np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=0)]


def _cells(values: list[float], digits: int = 2) -> str:
    return " / ".join("—" if not np.isfinite(v) else f"{v:.{digits}f}" for v in values)


def markdown(runs: dict[str, dict[str, Any]]) -> str:
    """One table per kind of reading, at each run's last probed evaluation, mean over the runs."""
    last = [probed_evals(s)[-1] for s in runs.values()]
    readings = [e["memory_probe"] for e in last]
    steps = sorted({e["env_steps"] for e in last})
    lines = [
        f"Memory probe at each run's last probed evaluation (env steps {', '.join(f'{s:,}' for s in steps)}), "
        f"mean over {len(runs)} run(s): {', '.join(runs)}. Windows that start mid-episode, "
        f"{sum(r['rows'] for r in readings)} in all. Each cell: {BINS} bins of trained window position, "
        "first to last.",
        "",
        "| start | greedy action is the answer | linear read-out of the answer from the state |",
        "| --- | --- | --- |",
    ]
    for name in START_NAMES:
        lines.append(
            f"| {name} | {_cells(mean_over_runs(readings, f'q_right/{name}'))} | "
            f"{_cells(mean_over_runs(readings, f'read_out/{name}'))} |"
        )
    lines += [
        "",
        "| start, against the true state | ΔQ (paper: over max Q) | ΔQ over the spread of Q |",
        "| --- | --- | --- |",
    ]
    for name in ("stored", "zero"):
        lines.append(
            f"| {name} | {_cells(mean_over_runs(readings, f'delta_q/{name}'), 3)} | "
            f"{_cells(mean_over_runs(readings, f'delta_q_spread/{name}'), 3)} |"
        )
    scale = {
        k: float(np.mean([r[k] for r in readings]))
        for k in ("q_abs_max", "q_gap", "target_abs", "reward_abs")
    }
    lines += [
        "",
        f"Stored start, the learner's units: mean |δ| by position {_cells(mean_over_runs(readings, 'td_abs'), 4)}; "
        f"max_a |Q| {scale['q_abs_max']:.3f}, best − second-best Q {scale['q_gap']:.4f}, |target| "
        f"{scale['target_abs']:.3f}, |reward| of a rewarded step {scale['reward_abs']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Over training: the greedy answer's and the read-out's accuracy per start (mean over positions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), squeeze=False)
    colors = dict(zip(START_NAMES, ("tab:blue", "tab:orange", "tab:green")))
    for ax, (kind, title) in zip(
        axes[0], (("q_right", "greedy action = answer"), ("read_out", "linear read-out"))
    ):
        for run, summary in runs.items():
            evals = probed_evals(summary)
            x = [e["env_steps"] for e in evals]
            for name in START_NAMES:
                y = [np.nanmean(e["memory_probe"][f"{kind}/{name}"]) for e in evals]
                label = f"{name} start" if run == next(iter(runs)) else None
                ax.plot(x, y, color=colors[name], lw=1, alpha=0.8, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("env steps", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.split(" (")[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run directories trained with the probe (summary.json)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write NAME.md and NAME.png here")
    parser.add_argument("--name", default="memory_probe", help="file name of the outputs [memory_probe]")
    args: argparse.Namespace = parser.parse_args(argv)
    runs = {}
    for run in args.runs:
        try:
            summary = json.loads((run / "summary.json").read_text())
        except (OSError, ValueError) as err:
            parser.error(f"runs: {run}: no readable summary.json ({type(err).__name__})")
        if not probed_evals(summary):
            parser.error(f"runs: {run}: no memory-probe reading (train with --probe)")
        runs[run.name] = summary
    md = markdown(runs)
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.md").write_text(md)
        plot(runs, args.out / f"{args.name}.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad argument (one line on stderr)."""
    return run_script(PROG, lambda: _main(argv), tf_threads=True)


if __name__ == "__main__":
    sys.exit(main())
