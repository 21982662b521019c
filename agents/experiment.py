"""The run harness: drive a Loop for a budget of env steps, with evaluation, checkpoints, logging, the
summary and the plot as hooks.

:func:`run` is the loop itself, top to bottom: resume, start the hooks,
iterate and let every hook see each step (any may stop the run), end the hooks,
write the summary. :func:`standard_hooks` gives the usual set; :func:`train`
runs a single-process :class:`agents.r2d2.TrainLoop` with them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agents.r2d2.actor import Actor, evaluate
from agents.r2d2.checkpoint import CheckpointError
from agents.r2d2.config import R2D2Config, documented
from agents.r2d2.loop import Loop, LoopStats, TrainLoop
from agents.seeds import RunSeeds
from burnin._checks import check_bool, check_float, check_int, check_str

__all__ = [
    "Checkpoints",
    "EnvFactory",
    "Evaluation",
    "History",
    "Hook",
    "Progress",
    "Run",
    "RunOptions",
    "Summary",
    "TensorBoard",
    "json_default",
    "plot",
    "resume_from",
    "resume_path",
    "run",
    "seed_everything",
    "standard_hooks",
    "train",
]

EnvFactory = Callable[..., Any]
"""``make_env(num_envs, *, seed)`` -> a gymnasium vector env (e.g. a partial of :func:`agents.envs.make_vector_env`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How long a run goes and what the harness does along the way."""

    total_env_steps: int = documented(150_000, "Stop after this many env steps.")
    eval_every: int = documented(5_000, "Env steps between greedy evaluations.")
    eval_episodes: int = documented(20, "Greedy episodes per evaluation (run side by side).")
    solve_return: float | None = documented(
        None, "Mean greedy return that counts as solved (None: no threshold, the run is never solved)."
    )
    stop_when_solved: bool = documented(True, "Stop at the first evaluation that reaches solve_return.")
    checkpoint_every: int = documented(25_000, "Env steps between checkpoints (0: only at the end).")
    resume: str = documented("", "Continue from this checkpoint directory ('auto': RUN_DIR/NAME/checkpoint).")
    progress: bool = documented(True, "Show a tqdm progress bar.")
    deterministic: bool = documented(
        True, "Enable TensorFlow op determinism (same seed, same run on the CPU)."
    )

    def __post_init__(self) -> None:
        for name, minimum in (
            ("total_env_steps", 1),
            ("eval_every", 1),
            ("eval_episodes", 1),
            ("checkpoint_every", 0),
        ):
            check_int(name, getattr(self, name), minimum=minimum)
        if self.solve_return is not None:
            check_float("solve_return", self.solve_return)
        for name in ("stop_when_solved", "progress", "deterministic"):
            check_bool(name, getattr(self, name))
        check_str("resume", self.resume)


def seed_everything(seed: int, *, deterministic: bool) -> None:
    """All global seeding happens here: Python, NumPy and TensorFlow global seeds, and op determinism."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


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


def resume_from(loop: Loop, directory: Path) -> tuple[History, float]:
    """Load the checkpoint in ``directory`` into ``loop``; its history and the wall time of the run so far.

    Says which directory it read: after a crash between the renames of a save
    that is the previous checkpoint, not ``directory``.
    """
    extra = loop.load(directory)
    read = Path(loop.loaded_from or directory)
    try:
        history = History.from_json(extra.get("history", {}))
        wall = check_float("wall_time_s", extra.get("wall_time_s", 0.0), low=0.0)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {read / 'loop.json'}: extra.{err}") from None
    fallback = f" (the previous checkpoint: {directory} was not complete)" if read != Path(directory) else ""
    print(f"resumed from {read}{fallback} at {loop.env_steps} env steps, {loop.learner.num_updates} updates")
    return history, wall


def run(
    loop: Loop, hooks: Sequence[Hook], *, out_dir: Path, total_env_steps: int, resume: Path | None = None
) -> dict[str, Any]:
    """Drive ``loop`` until ``total_env_steps`` (or a hook stops it, or Ctrl-C); returns the summary.

    ``out_dir`` is created once the resume (if any) has succeeded. An
    interrupted run ends with stop reason ``'interrupted'`` after the hooks'
    ``on_end`` (the final checkpoint).

    The summary holds the stop reason, the counters, the wall time and
    throughput, the replay's stats and the history; each hook's ``on_end`` adds
    to it (and may write it out, see :class:`Summary`).
    """
    history, wall_before = History(), 0.0
    if resume is not None:
        history, wall_before = resume_from(loop, resume)
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed resume leaves no empty run directory
    state = Run(loop, out_dir, history, wall_before=wall_before)
    stop_reason = "budget"
    started: list[Hook] = []
    try:
        for hook in hooks:
            hook.on_start(state)
            started.append(hook)
        while loop.env_steps < total_env_steps:
            stats = loop.iterate()
            history.record(stats)
            stop = next((r for r in (hook.on_step(state, stats) for hook in hooks) if r is not None), None)
            if stop is not None:
                stop_reason = stop
                break
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        state.log("interrupted: writing a final checkpoint")
    session = time.perf_counter() - state.start
    summary = {
        "stop_reason": stop_reason,
        "env_steps": loop.env_steps,
        "updates": loop.learner.num_updates,
        "episodes": len(history.episodes),
        "wall_time_s": wall_before + session,
        "throughput": {
            "session_s": session,
            "env_steps_per_s": (loop.env_steps - state.start_env_steps) / session,
            "updates_per_s": (loop.learner.num_updates - state.start_updates) / session,
        },
        "replay": loop.replay.stats(),
        "history": history.to_json(),
    }
    for hook in started:
        hook.on_end(state, summary)
    return summary


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
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=json_default))
        plot(run.history, run.out_dir / "plot.png", self.title, solve_return=self.solve_return)
        print(
            f"{summary['stop_reason']}: {summary['env_steps']} env steps, {summary['updates']} updates, "
            f"solved at {summary.get('solved_at_env_steps')}, wall {summary['wall_time_s']:.0f} s; "
            f"outputs in {run.out_dir}"
        )


def standard_hooks(
    config: R2D2Config, options: RunOptions, make_env: EnvFactory, *, seed: int, out_dir: Path
) -> list[Hook]:
    """TensorBoard, the progress bar, evaluation and checkpoints, in the order they see each step."""
    return [
        TensorBoard(out_dir / "tb"),
        Progress(options.total_env_steps, enabled=options.progress),
        Evaluation(
            config,
            make_env,
            every=options.eval_every,
            episodes=options.eval_episodes,
            solve_return=options.solve_return,
            stop_when_solved=options.stop_when_solved,
            seeds=RunSeeds(seed),
        ),
        Checkpoints(out_dir / "checkpoint", every=options.checkpoint_every),
    ]


def resume_path(options: RunOptions, out_dir: Path) -> Path | None:
    """The checkpoint ``options.resume`` names ('auto': ``out_dir/checkpoint``), or None."""
    if not options.resume:
        return None
    return out_dir / "checkpoint" if options.resume == "auto" else Path(options.resume)


def train(
    config: R2D2Config,
    options: RunOptions,
    make_env: EnvFactory,
    *,
    seed: int,
    out_dir: Path,
    title: str,
    fields: dict[str, Any] | None = None,
    hooks: Sequence[Hook] = (),
) -> dict[str, Any]:
    """A single-process run: seed, build a :class:`TrainLoop` on ``make_env``, run it with the standard
    hooks, then ``hooks`` (they see each step after the evaluation), then the summary (``fields`` added to
    it); returns the summary (also in ``out_dir/summary.json``)."""
    seed_everything(seed, deterministic=options.deterministic)
    env = make_env(config.num_envs, seed=seed)
    try:
        loop = TrainLoop(config, env, seed=seed)
        all_hooks = [
            *standard_hooks(config, options, make_env, seed=seed, out_dir=out_dir),
            *hooks,
            Summary(title, solve_return=options.solve_return, fields=fields),
        ]
        return run(
            loop,
            all_hooks,
            out_dir=out_dir,
            total_env_steps=options.total_env_steps,
            resume=resume_path(options, out_dir),
        )
    finally:
        env.close()


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
