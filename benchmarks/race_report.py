"""The peer race's report: medians per task (an unsolved run slower than any solved one), burnin's breakdown, a markdown table and a plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.time_split import PARTS

SIDES = ("burnin", "peer")


def median_or_inf(values: list[float | None]) -> float | None:
    """The median with None (unsolved) as +inf; None when that median is +inf or there are no values."""
    if not values:
        return None
    m = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(m) else m


def _side_medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "env_steps_to_bar": median_or_inf([x.get("solved_at_env_steps") for x in results]),
        "wall_to_bar_s": median_or_inf([x.get("wall_to_bar_s") for x in results]),
        "solved": sum(x.get("solved_at_env_steps") is not None for x in results),
        "runs": len(results),
    }


def _breakdown_medians(splits: list[dict[str, Any]]) -> dict[str, float]:
    """Medians of burnin's time splits at the bar: updates, ms per update, each part's seconds."""
    return {
        "updates": statistics.median(s["updates"] for s in splits),
        "update_ms": statistics.median(s["update_ms"] for s in splits),
        "acting_ms_per_env_step": statistics.median(s["acting_ms_per_env_step"] for s in splits),
        **{f"{p}_s": statistics.median(s["seconds"][p] for s in splits) for p in PARTS},
    }


def summarise(runs: list[dict[str, Any]], bars: dict[str, float]) -> dict[str, Any]:
    """Per task (in run order): each side's medians over seeds of env steps and wall clock to the bar and
    how many solved; burnin's breakdown at the bar (medians over its solved seeds); burnin / peer wall."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["task"] for r in runs):
        rows = [r for r in runs if r["task"] == name]
        entry: dict[str, Any] = {"bar": bars[name], "seeds": len(rows)}
        for side in SIDES:
            entry[side] = _side_medians([r[side] for r in rows if side in r and "error" not in r[side]])
        splits = [r["burnin"]["breakdown"] for r in rows if r.get("burnin", {}).get("breakdown")]
        if splits:
            entry["burnin"]["breakdown"] = _breakdown_medians(splits)
        b, p = entry["burnin"]["wall_to_bar_s"], entry["peer"]["wall_to_bar_s"]
        entry["wall_ratio"] = b / p if b is not None and p is not None else None
        out[name] = entry
    return out


def _fmt(value: float | None, *, budget: int | None = None, digits: int = 0) -> str:
    if value is None:
        return f"> {budget:,}" if budget else "unsolved"
    return f"{value:,.{digits}f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(names: list[str]) -> list[str]:
    return [_row(names), _row(["---"] * len(names))]


def _cell(result: dict[str, Any], key: str, digits: int) -> str:
    if "error" in result:
        return "failed"
    return _fmt(result.get(key), digits=digits) if result else ""


def markdown(report: dict[str, Any]) -> str:
    """The race as markdown: medians per task, burnin's breakdown, then every run."""
    budgets = report["budgets"]
    lines = [f"`{report['command']}`", ""]
    lines += _header([
        "task", "bar", "seeds", "burnin env steps", "peer env steps", "burnin wall s", "peer wall s",
        "burnin / peer wall", "solved (burnin, peer)",
    ])  # fmt: skip
    for name, m in report["medians"].items():
        b, p = m["burnin"], m["peer"]
        lines.append(_row([
            name, f"{m['bar']:g}", str(m["seeds"]),
            _fmt(b["env_steps_to_bar"], budget=budgets[name]), _fmt(p["env_steps_to_bar"], budget=budgets[name]),
            _fmt(b["wall_to_bar_s"], digits=1), _fmt(p["wall_to_bar_s"], digits=1),
            "" if m["wall_ratio"] is None else f"{m['wall_ratio']:.2f}",
            f"{b['solved']}/{b['runs']}, {p['solved']}/{p['runs']}",
        ]))  # fmt: skip
    lines += ["", "burnin's time to the bar, split (medians over its solved seeds):", ""]
    lines += _header([
        "task", "updates", "ms per update", "updates s", "acting s", "acting ms per env step", "evaluation s",
        "weight pulls s", "other s",
    ])  # fmt: skip
    for name, m in report["medians"].items():
        d = m["burnin"].get("breakdown")
        if d:
            lines.append(_row([
                name, f"{d['updates']:,.0f}", f"{d['update_ms']:.1f}", f"{d['updates_s']:.1f}",
                f"{d['acting_s']:.1f}", f"{d['acting_ms_per_env_step']:.2f}", f"{d['evaluation_s']:.1f}",
                f"{d['weight_pulls_s']:.1f}", f"{d['other_s']:.1f}",
            ]))  # fmt: skip
    lines += [
        "",
        *_header(["task", "seed", "burnin env steps", "burnin wall s", "peer env steps", "peer wall s"]),
    ]
    for r in report["runs"]:
        b, p = r.get("burnin", {}), r.get("peer", {})
        cells = [_cell(b, "solved_at_env_steps", 0), _cell(b, "wall_to_bar_s", 1)]
        cells += [_cell(p, "solved_at_env_steps", 0), _cell(p, "wall_to_bar_s", 1)]
        lines.append(_row([r["task"], str(r["seed"]), *cells]))
    return "\n".join(lines) + "\n"


PANELS = (
    ("solved_at_env_steps", "env_steps", "env_steps_to_bar", "env steps to the bar"),
    ("wall_to_bar_s", "wall_s", "wall_to_bar_s", "wall clock to the bar (s)"),
)
"""(a run's figure, what an unsolved run used instead, the median's key, the axis label) per panel."""


def _panel(ax: Any, report: dict[str, Any], names: list[str], panel: tuple[str, ...]) -> None:
    key, used, median_key, label = panel
    for i, name in enumerate(names):
        for j, (side, color) in enumerate(zip(SIDES, ("C0", "C1"))):
            x = i + (j - 0.5) * 0.3
            for run in (r for r in report["runs"] if r["task"] == name):
                res = run.get(side)
                if not res or "error" in res:
                    continue
                solved = res.get(key) is not None
                ax.plot(x, res[key] if solved else res[used], "o" if solved else "x", color=color, alpha=0.7)
            m = report["medians"][name][side][median_key]
            if m is not None:
                ax.hlines(m, x - 0.12, x + 0.12, color=color, linewidth=2.5)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, which="both")


def plot(report: dict[str, Any], path: Path) -> None:
    """Each run's env steps and wall clock to the bar per task and side (an unsolved run as an x at what it
    used), the medians as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["medians"])
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 2.4 * len(names)), 4.2))
    for ax, panel in zip(axes, PANELS):
        _panel(ax, report, names, panel)
    for style, color, label in (
        ("o", "C0", "burnin"),
        ("o", "C1", "RecurrentPPO (RL Zoo)"),
        ("x", "gray", "unsolved"),
    ):
        axes[0].plot([], [], style, color=color, label=label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Time to the bar per seed (bars: medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
