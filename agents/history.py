"""A run's history (evaluations, training episodes, learner figures), its checked JSON form and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agents.r2d2.loop import LoopStats
from burnin._checks import check_float, check_int

__all__ = ["History", "json_default", "plot"]


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class History:
    """Everything the plot and the JSON summary need."""

    def __init__(self) -> None:
        self.evals: list[dict[str, float]] = []
        self.episodes: list[tuple[int, float]] = []
        self.learner: list[dict[str, float]] = []

    def record(self, stats: LoopStats, *, learner_every: int = 50) -> None:
        """Note the episodes that ended in ``stats``, and the learner's figures every ``learner_every`` updates."""
        for _, ret, _ in stats.finished:
            self.episodes.append((stats.env_steps, ret))
        if stats.learner is not None and stats.updates % learner_every == 0:
            self.learner.append(
                {
                    "updates": stats.updates,
                    "env_steps": stats.env_steps,
                    "loss": stats.learner.loss,
                    "delta_q_first": stats.learner.delta_q_first,
                    "delta_q_last": stats.learner.delta_q_last,
                }
            )

    def to_json(self) -> dict[str, Any]:
        return {"evals": self.evals, "episodes": self.episodes, "learner": self.learner}

    @classmethod
    def from_json(cls, data: Any) -> History:
        """Inverse of :meth:`to_json`, checked (it comes from a checkpoint): ValueError naming the entry."""
        if not isinstance(data, dict):
            raise ValueError(f"history: expected a JSON object, got {data!r:.60}")
        h = cls()
        for name in ("evals", "episodes", "learner"):
            if not isinstance(data.get(name, []), list):
                raise ValueError(f"history.{name}: expected a list, got {data[name]!r:.60}")
        for i, e in enumerate(data.get("evals", [])):
            if not isinstance(e, dict):
                raise ValueError(f"history.evals[{i}]: expected a JSON object, got {e!r:.60}")
            check_int(f"history.evals[{i}].env_steps", e.get("env_steps"), minimum=0)
            check_float(f"history.evals[{i}].mean_return", e.get("mean_return"))
            h.evals.append(dict(e))
        for i, e in enumerate(data.get("episodes", [])):
            if not isinstance(e, list) or len(e) != 2:
                raise ValueError(f"history.episodes[{i}]: expected [env_steps, return], got {e!r:.60}")
            h.episodes.append(
                (
                    check_int(f"history.episodes[{i}][0]", e[0], minimum=0),
                    check_float(f"history.episodes[{i}][1]", e[1]),
                )
            )
        for i, e in enumerate(data.get("learner", [])):
            if not isinstance(e, dict):
                raise ValueError(f"history.learner[{i}]: expected a JSON object, got {e!r:.60}")
            check_int(f"history.learner[{i}].updates", e.get("updates"), minimum=0)
            h.learner.append(dict(e))
        return h


def plot(history: History, path: Path, title: str, *, solve_return: float | None) -> None:
    """Eval return against env steps (and the solve threshold, if any), and ΔQ against learner updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if history.episodes:
        steps, rets = zip(*history.episodes)
        ax1.plot(steps, rets, ".", ms=2, alpha=0.3, color="tab:gray", label="training episodes (ε-greedy)")
    if history.evals:
        ax1.plot(
            [e["env_steps"] for e in history.evals],
            [e["mean_return"] for e in history.evals],
            "o-",
            color="tab:blue",
            label="greedy eval (mean)",
        )
    if solve_return is not None:
        ax1.axhline(solve_return, color="tab:green", ls="--", lw=1, label=f"solved ({solve_return:g})")
    ax1.set_xlabel("env steps")
    ax1.set_ylabel("return")
    ax1.set_title("return")
    if ax1.get_legend_handles_labels()[0]:  # nothing to show before the first episode (a run stopped early)
        ax1.legend(loc="upper left", fontsize=8)
    if history.learner:
        upd = [e["updates"] for e in history.learner]
        ax2.plot(upd, [e["delta_q_first"] for e in history.learner], label="ΔQ first trained step")
        ax2.plot(upd, [e["delta_q_last"] for e in history.learner], label="ΔQ last stored-state step")
        ax2.set_yscale("symlog", linthresh=1e-3)
        ax2.legend(fontsize=8)
    ax2.set_xlabel("learner updates")
    ax2.set_ylabel("ΔQ")
    ax2.set_title("recurrent-state staleness ΔQ")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
