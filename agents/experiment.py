"""The run harness: drive a Loop for a budget of env steps, with evaluation, checkpoints, logging, the
summary and the plot as hooks.

:func:`run` is the loop itself, top to bottom: resume, start the hooks,
iterate and let every hook see each step (any may stop the run), end the hooks,
write the summary. The hooks are in :mod:`agents.hooks` (re-exported here);
:func:`standard_hooks` gives the usual set; :func:`train` runs a
single-process :class:`agents.r2d2.TrainLoop` with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import traceback
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from agents.history import History, json_default, plot
from agents.hooks import Checkpoints, EnvFactory, Evaluation, Hook, Progress, Run, Summary, TensorBoard
from agents.r2d2.actor import EnvError
from agents.r2d2.checkpoint import CheckpointError
from agents.r2d2.config import R2D2Config, documented
from agents.r2d2.loop import Loop, TrainLoop
from agents.rundir import locked, make_run_dir
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
    "RunFailed",
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


def resume_from(
    loop: Loop, directory: Path, *, allow_mismatch: Collection[str] = ()
) -> tuple[History, float]:
    """Load the checkpoint in ``directory`` into ``loop``; its history and the wall time of the run so far.

    Says which directory it read: after a crash between the renames of a save
    that is the previous checkpoint, not ``directory``. ``allow_mismatch``:
    see :meth:`agents.r2d2.TrainLoop.load`.
    """
    extra = loop.load(directory, allow_mismatch=allow_mismatch)
    read = Path(loop.loaded_from or directory)
    try:
        history = History.from_json(extra.get("history", {}))
        wall = check_float("wall_time_s", extra.get("wall_time_s", 0.0), low=0.0)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {read / 'loop.json'}: extra.{err}") from None
    fallback = f" (the previous checkpoint: {directory} was not complete)" if read != Path(directory) else ""
    print(f"resumed from {read}{fallback} at {loop.env_steps} env steps, {loop.learner.num_updates} updates")
    return history, wall


class RunFailed(RuntimeError):
    """A run that failed after set-up, once it had saved what it could; the message is one line naming what
    failed and what was saved. The original exception is ``__cause__``; ``summary`` is the run's summary
    (with the error and its traceback, also in ``summary.json`` if that could be written)."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def run(
    loop: Loop,
    hooks: Sequence[Hook],
    *,
    out_dir: Path,
    total_env_steps: int,
    resume: Path | None = None,
    allow_mismatch: Collection[str] = (),
) -> dict[str, Any]:
    """Drive ``loop`` until ``total_env_steps`` (or a hook stops it, or Ctrl-C); returns the summary.

    ``out_dir`` is created once the resume (if any) has succeeded, and locked
    for the run (:func:`agents.rundir.locked`: a second run into it is a
    :class:`agents.rundir.RunDirError`). An interrupted run ends with stop
    reason ``'interrupted'`` after the hooks' ``on_end`` (the final checkpoint).

    Any other exception once the hooks have started ends the run with stop
    reason ``'failed'``: every hook's ``on_end`` still runs (the final
    checkpoint: each loop operation is all-or-nothing, so the loop holds the
    state before the one that failed; the summary, with the error and its
    traceback; the plot), one failing does not stop the others, and then
    :class:`RunFailed` is raised from the error. A save that fails in
    ``on_end`` after an otherwise good run is a :class:`RunFailed` too.

    The summary holds the stop reason, the counters, the wall time and
    throughput, the replay's stats and the history; each hook's ``on_end`` adds
    to it (and may write it out, see :class:`Summary`).
    """
    history, wall_before = History(), 0.0
    if resume is not None:
        history, wall_before = resume_from(loop, resume, allow_mismatch=allow_mismatch)
    make_run_dir(out_dir)  # only now: a failed resume leaves no empty run directory
    with locked(out_dir):
        state = Run(loop, out_dir, history, wall_before=wall_before)
        for i, hook in enumerate(hooks):
            try:
                hook.on_start(state)
            except BaseException:  # set-up failed: nothing has run, so there is nothing to save
                _end_quietly(hooks[:i], state)
                raise
        stop_reason, error = _iterate(state, hooks, total_env_steps)
        summary = _summary(state, stop_reason)
        if error is not None:
            summary["error"] = _error_entry(error, loop.env_steps)
            state.log(f"failed: {summary['error']['message']}; saving what it can")
        not_saved = _end_hooks(hooks, state, summary)
    if error is None and not not_saved:
        return summary
    raise RunFailed(_failure_message(summary, not_saved, out_dir), summary) from error


def _failure_message(summary: dict[str, Any], not_saved: list[str], out_dir: Path) -> str:
    """One line: what failed (the error, else the stop reason), what was saved or not, and where."""
    error = summary.get("error")
    what = error["message"] if error else f"the run ended ({summary['stop_reason']})"
    if not not_saved:
        return f"{what}; saved the final checkpoint, summary (with the traceback) and plot in {out_dir}"
    return f"{what}; saving in {out_dir} failed: {'; '.join(not_saved)}"


def _iterate(state: Run, hooks: Sequence[Hook], total_env_steps: int) -> tuple[str, Exception | None]:
    """Iterate until the budget or a stop; (stop reason, the exception that ended the run or None)."""
    loop, history = state.loop, state.history
    try:
        while loop.env_steps < total_env_steps:
            stats = loop.iterate()
            history.record(stats)
            stop = next((r for r in (hook.on_step(state, stats) for hook in hooks) if r is not None), None)
            if stop is not None:
                return stop, None
    except KeyboardInterrupt:
        state.log("interrupted: writing a final checkpoint")
        return "interrupted", None
    except Exception as err:  # saved by the hooks' on_end, then raised again as RunFailed
        return "failed", err
    return "budget", None


def _summary(state: Run, stop_reason: str) -> dict[str, Any]:
    loop = state.loop
    session = time.perf_counter() - state.start
    return {
        "stop_reason": stop_reason,
        "env_steps": loop.env_steps,
        "updates": loop.learner.num_updates,
        "episodes": len(state.history.episodes),
        "wall_time_s": state.wall_before + session,
        "throughput": {
            "session_s": session,
            "env_steps_per_s": (loop.env_steps - state.start_env_steps) / session,
            "updates_per_s": (loop.learner.num_updates - state.start_updates) / session,
        },
        "replay": _replay_stats(loop),
        "history": state.history.to_json(),
    }


def _replay_stats(loop: Loop) -> dict[str, Any]:
    """The replay's stats; after a failure (a remote replay that is gone) the error instead, so that the
    summary and the final checkpoint are still written."""
    try:
        return loop.replay.stats()
    except Exception as err:
        return {"error": f"{type(err).__name__}: {' '.join(str(err).split())}"}


def _error_entry(error: Exception, env_steps: int) -> dict[str, Any]:
    """The summary's ``error``: a one-line message (an env's error names the env and its step; any other
    names the env step the run had reached), the exception's type and its traceback."""
    text = " ".join(str(error).split())
    message = (
        text
        if isinstance(error, EnvError)
        else f"failed at env step {env_steps}: {type(error).__name__}: {text}"
    )
    return {
        "message": message,
        "type": type(error).__name__,
        "traceback": "".join(traceback.format_exception(error)),
    }


def _end_hooks(hooks: Sequence[Hook], state: Run, summary: dict[str, Any]) -> list[str]:
    """Every hook's ``on_end``, in order, each whatever the others do; what failed ('Hook: error'), also
    added to the summary (``save_errors``) for the hooks after it (the summary is written last)."""
    failed: list[str] = []
    for hook in hooks:
        try:
            hook.on_end(state, summary)
        except Exception as err:
            failed.append(f"{type(hook).__name__} ({type(err).__name__}: {' '.join(str(err).split())})")
            summary["save_errors"] = list(failed)
    return failed


def _end_quietly(hooks: Sequence[Hook], state: Run) -> None:
    """Close the hooks that started before a set-up failure, saving nothing (no summary, no checkpoint)."""
    for hook in hooks:
        if isinstance(hook, (TensorBoard, Progress, Evaluation)):
            with contextlib.suppress(Exception):
                hook.on_end(state, {})


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
    allow_mismatch: Collection[str] = (),
) -> dict[str, Any]:
    """A single-process run: seed, build a :class:`TrainLoop` on ``make_env``, run it with the standard
    hooks, then ``hooks`` (they see each step after the evaluation), then the summary (``fields`` added to
    it); returns the summary (also in ``out_dir/summary.json``). A failure after set-up saves what it can
    and raises :class:`RunFailed` (see :func:`run`); ``allow_mismatch`` is passed to the resume."""
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
            allow_mismatch=allow_mismatch,
        )
    finally:
        env.close()
