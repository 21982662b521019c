"""The memory suite's report: per-run metrics (greedy MMER, POPGym's metric, steps to a threshold), the random policy, the tables and the learning-curve plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from studies import sweep
from studies.ablation import steps_text
from studies.popgym_tasks import PRESET, SOLVED, task_order

__all__ = [
    "CLEAR_LEAD",
    "TRAINING_WINDOW",
    "format_steps",
    "lead_cell",
    "lead_over_random",
    "markdown",
    "plot",
    "popgym_metric",
    "random_return",
    "seed_metrics",
    "stat",
    "targets_markdown",
    "threshold_steps",
]


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
    """Per-seed values (finite: a curve's returns) with their mean and (population) std over seeds."""
    stats = sweep.over_seeds(values)
    return {"values": values, "mean": stats["mean"], "std": stats["std"]}


def seed_metrics(
    evals: list[dict[str, Any]], episodes: list[list[float]] | None = None, *, threshold: float = SOLVED
) -> dict[str, Any]:
    """From one run's evaluations: the curve, MMER (its max), the final return, env steps to the first
    evaluation at ``threshold``; with the run's training ``episodes`` ([env steps, return] each), also
    POPGym's own metric (:func:`popgym_metric`)."""
    curve = [[int(e["env_steps"]), float(e["mean_return"])] for e in evals]
    returns = [r for _, r in curve]
    out = {
        "curve": curve,
        "mmer": max(returns),
        "final": returns[-1],
        "steps_to": next((s for s, r in curve if r >= threshold), None),
    }
    if episodes is not None:
        out["popgym"] = popgym_metric(episodes, [s for s, _ in curve])
    return out


TRAINING_WINDOW = 100
"""Training episodes per mean in :func:`popgym_metric`: RLlib's ``episode_reward_mean`` smooths over the
last 100 episodes by default, and POPGym reports the max of that mean over training."""


def popgym_metric(episodes: list[list[float]], at: list[int]) -> float | None:
    """POPGym's MMER on the training episodes: at each env step of ``at`` (the evaluations), the mean return
    of the last :data:`TRAINING_WINDOW` training episodes that ended by then; the max over ``at``.

    ``episodes``: [env steps at its end, return] per training episode, in order. The training policy
    explores (Ape-X ε per actor row), so this reads below the greedy MMER. None before any episode ended."""
    ends = np.array([e[0] for e in episodes], float)
    returns = np.array([e[1] for e in episodes], float)
    means = []
    for step in at:
        done = int(np.searchsorted(ends, step, side="right"))
        if done:
            means.append(float(returns[max(0, done - TRAINING_WINDOW) : done].mean()))
    return max(means) if means else None


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


def threshold_steps(entry: dict[str, Any]) -> tuple[float, list[int | None]]:
    """(threshold, env steps to it per seed) of a task entry (entries before thresholds per task: 0.9)."""
    if "threshold" in entry:
        return entry["threshold"], entry["steps_to_threshold"]
    return SOLVED, entry[f"steps_to_{SOLVED:g}"]


def markdown(report: dict[str, dict[str, Any]]) -> str:
    """The table of every task: one row per task in the suite's order."""
    lines = [
        f"R2D2 (preset `{PRESET}` + the overrides shown) on POPGym, mean ± std over seeds. MMER: the best "
        "mean greedy return over a run's evaluations (returns lie in [−1, 1], perfect play 1). Steps to "
        "threshold: env steps of the first evaluation at ≥ the task's threshold (its published target, else "
        f"{SOLVED:g}), per seed. Random: a uniform random policy. Lead: the mean final return's lead over "
        "random, in standard errors of one evaluation of a random policy (σ_random / √episodes); ≥ "
        f"{CLEAR_LEAD:g} (bold) is a clear margin. Commands in memory_suite.json.",
        "",
        "| task | env steps | eval every × episodes | seeds | MMER | 1 − MMER | final | "
        "steps to threshold | random | lead over random | overrides |",
        "| --- " * 11 + "|",
    ]
    for name in sorted(report, key=task_order):
        e = report[name]
        m, f, r = e["mmer"], e["final"], e["random_return"]
        overrides = ", ".join(f"{k}={v}" for k, v in e["overrides"].items()) or "—"
        per_seed = ", ".join(f"{v:.2f}" for v in m["values"])
        mark = " ‡" if e.get("stop_when_solved") else ""
        older = "" if "config" in e else " †"
        threshold, steps = threshold_steps(e)
        lead_text = lead_cell(f["mean"], r, episodes=e["eval_episodes"])
        lines.append(
            f"| {name}{older} | {e['budget']:,} | {e['eval_every']:,} × {e['eval_episodes']} | {len(e['seeds'])} | "
            f"{m['mean']:.2f} ± {m['std']:.2f} ({per_seed}) | {round(1 - m['mean'], 2) + 0.0:.2f} | "
            f"{f['mean']:.2f} ± {f['std']:.2f}{mark} | {format_steps(steps)} (≥ {threshold:g}) | "
            f"{r['mean']:.2f} | {lead_text} | {overrides} |"
        )
    if any(e.get("stop_when_solved") for e in report.values()):
        lines.append(
            "\n‡ run with `--stop-when-solved`: a seed's run ends at its first evaluation at ≥ its threshold, "
            "so its final return is that evaluation's (runs that never reach it use the whole budget)."
        )
    if any("config" not in e for e in report.values()):
        lines.append(
            "\n† run with an earlier `popgym` preset (before `reward_scale` and the γ = 0 override); the "
            "commit history of memory_suite.json has its settings."
        )
    return "\n".join(lines) + "\n"


def targets_markdown(report: dict[str, dict[str, Any]]) -> str:
    """The tasks with a published target, each beside it: greedy MMER, POPGym's metric, steps to the target."""
    rows = [n for n in sorted(report, key=task_order) if report[n].get("published")]
    if not rows:
        return ""
    lines = [
        f"R2D2 (preset `{PRESET}`), each seed's run ending at its first greedy evaluation at ≥ the target or at "
        "its budget. Greedy MMER: the best mean greedy return over the run's evaluations (mean over seeds, "
        "then per seed). POPGym metric: the best mean return of the last "
        f"{TRAINING_WINDOW} training episodes (exploring policy) at an evaluation, POPGym's own MMER, to set "
        "beside the published figure.",
        "",
        "| task | budget | seeds | greedy MMER | POPGym metric | env steps to target | best published "
        "(method, env steps) | met |",
        "| --- " * 8 + "|",
    ]
    sources = []
    for name in rows:
        e = report[name]
        pub, m = e["published"], e["mmer"]
        popgym = [v for v in e.get("popgym", {}).get("values", []) if v is not None]
        popgym_text = f"{np.mean(popgym):.2f} ({', '.join(f'{v:.2f}' for v in popgym)})" if popgym else "—"
        if pub["source"] not in sources:
            sources.append(pub["source"])
        mark = "¹²³"[sources.index(pub["source"])]
        met = "**yes**" if m["mean"] >= pub["score"] else "no"
        lines.append(
            f"| {name} | {e['budget']:,} | {len(e['seeds'])} | {m['mean']:.2f} "
            f"({', '.join(f'{v:.2f}' for v in m['values'])}) | {popgym_text} | "
            f"{format_steps(threshold_steps(e)[1])} | {pub['score']:g} {pub['method']}, {pub['budget']}{mark} | "
            f"{met} |"
        )
    lines += ["", *(f"{'¹²³'[i]} {source}." for i, source in enumerate(sources))]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, dict[str, Any]], path: Path) -> None:
    """One learning-curve panel per task: mean greedy return over seeds ± std, random dashed, the task's
    threshold dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(report, key=task_order)
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
    threshold = threshold_steps(entry)[0]
    ax.axhline(threshold, color="tab:green", ls=":", lw=1, label=f"{threshold:g}")
    m = entry["mmer"]
    ax.set_title(f"{name}\nMMER {m['mean']:.2f} ± {m['std']:.2f}", fontsize=9)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("env steps", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="lower right")
