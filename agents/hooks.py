"""The run harness's hooks (evaluation, checkpoints, TensorBoard, progress bar, summary) and their Run."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agents.history import History, json_default, plot
from agents.r2d2.actor import Actor, evaluate
from agents.r2d2.config import R2D2Config
from agents.r2d2.loop import Loop, LoopStats
from agents.seeds import RunSeeds
from burnin._io import atomic_write_text

__all__ = ["Checkpoints", "EnvFactory", "Evaluation", "Hook", "Progress", "Run", "Summary", "TensorBoard"]

EnvFactory = Callable[..., Any]
"""``make_env(num_envs, *, seed)`` -> a gymnasium vector env (e.g. a partial of :func:`agents.envs.make_vector_env`)."""


class Run:
    """What the hooks share: the loop, the history, the output directory, the clock and the log."""

    def __init__(self, loop: Loop, out_dir: Path, history: History, *, wall_before: float = 0.0) -> None:
        self.loop = loop
        self.out_dir = out_dir
        self.history = history
        self.wall_before = wall_before
        self.start = time.perf_counter()
        self.start_env_steps = loop.env_steps
        self.start_updates = loop.learner.num_updates
        self.log: Callable[[str], None] = print
        """Where hooks write a line (the progress bar routes it around itself)."""

    def wall_time(self) -> float:
        """Seconds of this run, earlier sessions of a resumed run included."""
        return self.wall_before + time.perf_counter() - self.start

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the loop: the history and the wall time."""
        return {"history": self.history.to_json(), "wall_time_s": self.wall_time()}


class Hook(Protocol):
    """One concern of a run. ``on_step`` returns a stop reason to end the run, or None."""

    def on_start(self, run: Run) -> None: ...

    def on_step(self, run: Run, stats: LoopStats) -> str | None: ...

    def on_end(self, run: Run, summary: dict[str, Any]) -> None: ...


class Evaluation:
    """Greedy evaluation every ``every`` env steps on ``episodes`` envs side by side; stops the run once
    the mean return reaches ``solve_return`` if ``stop_when_solved``."""

    def __init__(
        self,
        config: R2D2Config,
        make_env: EnvFactory,
        *,
        every: int,
        episodes: int,
        solve_return: float | None,
        stop_when_solved: bool,
        seeds: RunSeeds,
    ) -> None:
        self.config, self.make_env, self.seeds = config, make_env, seeds
        self.every, self.episodes = every, episodes
        self.solve_return, self.stop_when_solved = solve_return, stop_when_solved
        self.solved_at: int | None = None

    def on_start(self, run: Run) -> None:
        seed = self.seeds.evaluation_env
        self.env = self.make_env(self.episodes, seed=seed)
        self.actor = Actor(self.config, self.env, seed=seed, epsilons=np.zeros(self.episodes))
        self.next_eval = (run.loop.env_steps // self.every + 1) * self.every
        self.solved_at = next((e["env_steps"] for e in run.history.evals if self._solves(e)), None)

    def on_step(self, run: Run, stats: LoopStats) -> str | None:
        loop = run.loop
        if loop.env_steps < self.next_eval:
            return None
        self.next_eval += self.every
        returns = evaluate(
            self.actor, loop.learner.get_weights(), seed=self.seeds.evaluation(len(run.history.evals))
        )
        entry = {
            "env_steps": loop.env_steps,
            "updates": loop.learner.num_updates,
            "mean_return": float(returns.mean()),
            "min_return": float(returns.min()),
            "wall_time_s": run.wall_time(),
        }
        run.history.evals.append(entry)
        run.log(
            f"eval @ {loop.env_steps} env steps: mean greedy return {entry['mean_return']:.4g} "
            f"(min {entry['min_return']:.4g}) over {len(returns)} episodes"
        )
        if self.solved_at is None and self._solves(entry):
            self.solved_at = loop.env_steps
            if self.stop_when_solved:
                return "solved"
        return None

    def _solves(self, entry: dict[str, float]) -> bool:
        return self.solve_return is not None and entry["mean_return"] >= self.solve_return

    def on_end(self, run: Run, summary: dict[str, Any]) -> None:
        if getattr(self, "env", None) is not None:
            self.env.close()
        evals = run.history.evals
        summary["solved_at_env_steps"] = self.solved_at
        summary["final_eval_mean_return"] = evals[-1]["mean_return"] if evals else None
        summary["best_eval_mean_return"] = max((e["mean_return"] for e in evals), default=None)


class Checkpoints:
    """A checkpoint into ``directory`` every ``every`` env steps (0: none during the run) and one at the end."""

    def __init__(self, directory: Path, *, every: int) -> None:
        self.directory, self.every = directory, every

    def on_start(self, run: Run) -> None:
        env_steps = run.loop.env_steps
        self.next = (env_steps // self.every + 1) * self.every if self.every else None

    def on_step(self, run: Run, stats: LoopStats) -> str | None:
        if self.next is not None and run.loop.env_steps >= self.next:
            self.next += self.every
            run.loop.save(self.directory, extra=run.checkpoint_extra())
        return None

    def on_end(self, run: Run, summary: dict[str, Any]) -> None:
        run.loop.save(self.directory, extra=run.checkpoint_extra())


class TensorBoard:
    """Episode returns and lengths, the learner's loss and ΔQ (every 50 updates), updates/s and evaluations."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_start(self, run: Run) -> None:
        import tensorflow as tf

        self.tf = tf
        self.writer = tf.summary.create_file_writer(str(self.directory))
        self.rate_t, self.rate_u = time.perf_counter(), run.loop.learner.num_updates
        self.evals_logged = len(run.history.evals)

    def on_step(self, run: Run, stats: LoopStats) -> str | None:
        scalar = self.tf.summary.scalar
        with self.writer.as_default(step=stats.env_steps):
            for _, ret, length in stats.finished:
                scalar("train/episode_return", ret)
                scalar("train/episode_length", length)
            if stats.learner is not None and stats.updates % 50 == 0:
                scalar("learner/loss", stats.learner.loss)
                scalar("learner/delta_q_first", stats.learner.delta_q_first)
                scalar("learner/delta_q_last", stats.learner.delta_q_last)
                scalar("learner/updates", stats.updates)
            now = time.perf_counter()
            if now - self.rate_t >= 2.0:
                updates = run.loop.learner.num_updates
                scalar("learner/updates_per_s", (updates - self.rate_u) / (now - self.rate_t))
                self.rate_t, self.rate_u = now, updates
            for entry in run.history.evals[self.evals_logged :]:
                scalar("eval/mean_return", entry["mean_return"], step=entry["env_steps"])
            self.evals_logged = len(run.history.evals)
        return None

    def on_end(self, run: Run, summary: dict[str, Any]) -> None:
        with self.writer.as_default():
            for entry in run.history.evals[self.evals_logged :]:  # an evaluation that ended the run
                self.tf.summary.scalar("eval/mean_return", entry["mean_return"], step=entry["env_steps"])
        self.writer.flush()


class Progress:
    """A tqdm bar over the env-step budget: recent return, loss, ΔQ, updates and updates/s."""

    def __init__(self, total_env_steps: int, *, enabled: bool) -> None:
        self.total, self.enabled = total_env_steps, enabled

    def on_start(self, run: Run) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total,
            initial=run.loop.env_steps,
            unit="step",
            disable=not self.enabled,
            dynamic_ncols=True,
        )
        run.log = self.bar.write
        self.last_env_steps = run.loop.env_steps
        self.recent = deque((r for _, r in run.history.episodes[-20:]), maxlen=20)
        self.loss = self.dq_last = float("nan")
        self.rate_t, self.rate_u, self.ups = time.perf_counter(), run.loop.learner.num_updates, 0.0

    def on_step(self, run: Run, stats: LoopStats) -> str | None:
        self.bar.update(stats.env_steps - self.last_env_steps)
        self.last_env_steps = stats.env_steps
        self.recent.extend(ret for _, ret, _ in stats.finished)
        if stats.learner is not None:
            self.loss, self.dq_last = stats.learner.loss, stats.learner.delta_q_last
        now = time.perf_counter()
        if now - self.rate_t >= 2.0:
            self.ups = (stats.updates - self.rate_u) / (now - self.rate_t)
            self.rate_t, self.rate_u = now, stats.updates
        self.bar.set_postfix(
            ep=stats.episodes,
            ret=f"{np.mean(self.recent):.3g}" if self.recent else "-",
            loss=f"{self.loss:.3g}",
            dq=f"{self.dq_last:.2g}",
            upd=stats.updates,
            ups=f"{self.ups:.1f}",
            refresh=False,
        )
        return None

    def on_end(self, run: Run, summary: dict[str, Any]) -> None:
        self.bar.close()
        run.log = print


class Summary:
    """At the end: ``fields`` added to the summary, then ``summary.json`` and ``plot.png`` written and a
    closing line printed. Put it last: it writes what the hooks before it added."""

    def __init__(
        self, title: str, *, solve_return: float | None, fields: dict[str, Any] | None = None
    ) -> None:
        self.title, self.solve_return, self.fields = title, solve_return, fields or {}

    def on_start(self, run: Run) -> None:
        pass

    def on_step(self, run: Run, stats: LoopStats) -> str | None:
        return None

    def on_end(self, run: Run, summary: dict[str, Any]) -> None:
        summary.update(self.fields)
        failed = []
        for name, write in (
            (
                "summary.json",
                lambda path: atomic_write_text(path, json.dumps(summary, indent=1, default=json_default)),
            ),
            ("plot.png", lambda path: plot(run.history, path, self.title, solve_return=self.solve_return)),
        ):
            try:  # each file whatever the other does: a failed run saves what it can
                write(run.out_dir / name)
            except Exception as err:
                failed.append(f"{name}: {type(err).__name__}: {' '.join(str(err).split())}")
        if failed:
            raise RuntimeError("; ".join(failed))
        print(
            f"{summary['stop_reason']}: {summary['env_steps']} env steps, {summary['updates']} updates, "
            f"solved at {summary.get('solved_at_env_steps')}, wall {summary['wall_time_s']:.0f} s; "
            f"outputs in {run.out_dir}"
        )
