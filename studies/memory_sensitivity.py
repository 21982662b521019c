"""What made R2D2 solve POPGym's three target tasks: each setting of the tuned suite turned back, one run per variant (``python -m studies.memory_sensitivity``)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agents.cli import ArgumentParser, run_script, script_imports

PROG = "python -m studies.memory_sensitivity"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from studies import memory_report, sweep
    from studies import memory_suite as suite
    from studies.popgym_tasks import TASKS


BEFORE = {"adam_epsilon": 1e-3, "gamma": 0.99, "reward_scale": 1.0}
"""The settings before the tuning: the paper's Adam ε, the masked-CartPole γ, the env's own rewards."""

TURNED_BACK: tuple[tuple[str, dict[str, Any]], ...] = (
    ("Adam ε 1e-3", {"adam_epsilon": 1e-3}),
    ("γ 0.99", {"gamma": 0.99}),
    ("reward ×1", {"reward_scale": 1.0}),
)
"""Each tuned setting turned back alone (a γ row only where the task overrides γ)."""

SENSITIVITY_TASKS = ("RepeatFirstEasy", "RepeatPreviousEasy", "PositionOnlyCartPoleEasy", "CountRecallEasy")


def variants() -> tuple[tuple[str, str, dict[str, Any]], ...]:
    """(task, label, R2D2Config overrides on the suite's task settings) per run: the tuned settings, each
    setting turned back alone, and all of them turned back."""
    out = []
    for name in SENSITIVITY_TASKS:
        task = TASKS[name]
        out.append((name, "tuned", {}))
        for label, overrides in TURNED_BACK:
            if "gamma" not in overrides or "gamma" in task.overrides:
                out.append((name, label, overrides))
        out.append((name, "before: " + ", ".join(label for label, _ in TURNED_BACK), BEFORE))
    return tuple(out)


VARIANTS = variants()


def jobs(args: argparse.Namespace) -> list[tuple[str, suite.Job]]:
    """(label, job) per variant and seed; each variant in its own run directory."""
    out = []
    for (i, (name, label, overrides)), seed in sweep.grid(enumerate(VARIANTS), args.seeds):
        job = suite.Job(
            task=TASKS[name], seed=seed, env_steps=args.env_steps, eval_every=args.eval_every,
            eval_episodes=args.eval_episodes, overrides={**TASKS[name].overrides, **overrides},
            run_dir=str(args.run_dir / f"v{i}"),
            stop_when_solved=True,
            probe=True,  # the memory probe where the task has labels: the Q scale against the reward scale
        )  # fmt: skip
        out.append((label, job))
    return out


def adam_denominator(learner_npz: Path) -> dict[str, float]:
    """Median and 99th percentile over every weight of sqrt(v), Adam's second-moment estimate, in a learner
    checkpoint: the size ε competes with in the step m / (sqrt(v) + ε). Keras' Adam keeps [iterations,
    learning rate, then (momentum, velocity) per trainable variable]: the velocities are entries 3, 5, …"""
    with np.load(learner_npz) as z:
        count = sum(1 for k in z.files if k.startswith("optimizer/"))
        root = np.sqrt(np.concatenate([z[f"optimizer/{i}"].ravel() for i in range(3, count, 2)]))
    return {"median": float(np.median(root)), "p99": float(np.percentile(root, 99))}


def q_scale(evals: list[dict[str, Any]]) -> list[float] | None:
    """max_a |Q| over |target| (the learner's units) at the run's first and last memory-probe reading: how far
    the network's Q-values stand from the size of what they learn; None for a run without the probe."""
    readings = [e["memory_probe"] for e in evals if e.get("memory_probe", {}).get("rows", 0) > 0]
    if not readings:
        return None
    return [r["q_abs_max"] / r["target_abs"] for r in (readings[0], readings[-1])]


def markdown(rows: list[dict[str, Any]], *, env_steps: int) -> str:
    lines = [
        f"R2D2 (preset `popgym` + the suite's task settings, then the row's), budget {env_steps:,} env steps, a "
        "run ends at its first evaluation at ≥ its task's threshold. MMER: best mean greedy return (per seed).",
        "",
        "| task | settings | MMER | env steps to threshold | median √v̂ of Adam at the end (ε: the row's) | "
        "max_a |Q| / |target|, first → last probe |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mmer = ", ".join(f"{v:.2f}" for v in r["mmer"])
        root = ", ".join(f"{d['median']:.1e}" for d in r["adam_sqrt_v"])
        scale = ", ".join(f"{q[0]:.1f} → {q[1]:.1f}" for q in r.get("q_scale", []) if q) or "—"
        lines.append(
            f"| {r['task']} | {r['settings']} | {mmer} | {memory_report.format_steps(r['steps_to'])} | {root} | "
            f"{scale} |"
        )
    return "\n".join(lines) + "\n"


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds per variant [0]")
    parser.add_argument("--env-steps", type=int, default=60_000, help="budget of every run [60000]")
    parser.add_argument("--eval-every", type=int, default=6_000, help="env steps between evaluations [6000]")
    parser.add_argument("--eval-episodes", type=int, default=32, help="greedy episodes per evaluation [32]")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel processes [2]")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs found in --run-dir")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="directory of the outputs"
    )
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs/memory_sensitivity"), help="per-run outputs"
    )
    args = parser.parse_args(argv)
    parser.require_at_least(args, dict.fromkeys(("env_steps", "eval_every", "eval_episodes", "workers"), 1))
    if min(args.seeds) < 0:
        parser.error(f"--seeds: expected ints >= 0, got {args.seeds}")
    labelled = jobs(args)
    summaries = sweep.run_sweep(
        functools.partial(suite.run_job, resume=args.resume),
        [job for _, job in labelled],
        finished=suite.finished,
        workers=args.workers,
        resume=args.resume,
        desc="sensitivity runs",
    )
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for label, job in labelled:
        m = memory_report.seed_metrics(summaries[job.key]["history"]["evals"], threshold=job.task.threshold)
        row = rows.setdefault((job.task.name, label), {
            "task": job.task.name, "settings": label, "overrides": job.overrides, "seeds": [], "mmer": [],
            "steps_to": [], "curves": [], "adam_sqrt_v": [], "q_scale": [],
        })  # fmt: skip
        row["seeds"].append(job.seed)
        row["mmer"].append(m["mmer"])
        row["steps_to"].append(m["steps_to"])
        row["curves"].append(m["curve"])
        row["adam_sqrt_v"].append(adam_denominator(job.out_dir / "checkpoint" / "learner.npz"))
        row["q_scale"].append(q_scale(summaries[job.key]["history"]["evals"]))
    command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])
    report = {"command": command, "env_steps": args.env_steps, "rows": list(rows.values())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_sensitivity.json").write_text(json.dumps(report, indent=1))
    md = markdown(report["rows"], env_steps=args.env_steps)
    (args.out / "memory_sensitivity.md").write_text(md)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag (one line on stderr), 130 when interrupted."""
    return run_script(PROG, lambda: _main(argv), tf_threads=True)


if __name__ == "__main__":
    sys.exit(main())
