"""Where a burnin run's time goes: ``python -m benchmarks.time_split TRAIN_FLAGS…`` runs agents.train with timers on the loop's parts.

The run is the train CLI's own (same flags, same run directory, same summary); beside its
``summary.json`` it writes ``time_split.json``: at every evaluation, the wall time of the run so far
split into learner updates (sampling, and the update with its priority write-back), acting (the
actor's env steps, policy and replay writes), evaluations, the actor's weight pulls, and the rest
(hooks, Python between the parts), with the updates and env steps done, so that a run's time to a
bar is *updates needed × time per update + acting + evaluation + the rest*. The first update is
counted apart too: it traces (and compiles) the update.

The timers wrap the loop's and the evaluation hook's methods on their instances for this process's
run only (a ``perf_counter`` pair per call, under a microsecond against a ~20 ms update).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROG = "python -m benchmarks.time_split"
FILE = "time_split.json"
"""Written into the run directory, beside summary.json."""
TIMED = ("updates", "update_calls", "acting", "evaluation", "weight_pulls")
"""What the timers add up: ``updates`` is ``Learner.step`` (sampling, then ``Learner.update``: the
compiled update and the priority write-back), ``update_calls`` the ``Learner.update`` inside it."""
PARTS = ("updates", "acting", "evaluation", "weight_pulls", "other")
"""The parts that add up to the run's wall time (``sampling`` is reported too, as a part of ``updates``)."""


class TimeSplit:
    """A harness hook: wraps the loop's learner step and update, actor step and weight pull, and the
    evaluation hook's ``on_step`` (found in ``hooks``) on their instances, and records the split at each
    evaluation (``snapshots``), written to ``time_split.json`` at the end."""

    def __init__(self, hooks: list[Any]) -> None:
        self.hooks = hooks
        self.seconds = dict.fromkeys(TIMED, 0.0)
        self.first: dict[str, float] = {}
        """Each part's first call: the update's and the actor's trace (and compile) are in it."""
        self.calls = dict.fromkeys(TIMED, 0)
        self.snapshots: list[dict[str, Any]] = []

    def _timed(self, part: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.seconds[part] += spent
                self.calls[part] += 1
                self.first.setdefault(part, spent)

        return timed

    def on_start(self, run: Any) -> None:
        from agents.hooks import Evaluation

        loop = run.loop
        # Instance attributes shadow the class's methods: only this run's objects are timed.
        targets = [(loop.learner, "step", "updates"), (loop.learner, "update", "update_calls")]
        actor = getattr(loop, "actor", None)  # a distributed loop acts in its workers: not timed here
        if actor is not None:
            targets += [(actor, "step", "acting"), (actor, "set_weights", "weight_pulls")]
        for hook in self.hooks:
            if isinstance(hook, Evaluation):
                hook.on_step = self._snapshot_after(run, self._timed("evaluation", hook.on_step))
        for owner, name, part in targets:
            setattr(owner, name, self._timed(part, getattr(owner, name)))
        self.start_env_steps, self.start_updates = loop.env_steps, loop.learner.num_updates

    def _snapshot_after(self, run: Any, on_step: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(state: Any, stats: Any) -> Any:
            evals_before = len(run.history.evals)
            result = on_step(state, stats)
            if len(run.history.evals) > evals_before:
                self.snapshots.append(self.split(run, run.history.evals[-1]))
            return result

        return wrapped

    def split(self, run: Any, entry: dict[str, Any]) -> dict[str, Any]:
        """The split at an evaluation ``entry`` (its wall time is the run's, at the end of it)."""
        s = dict(self.seconds)
        wall = run.wall_time() - run.wall_before
        env_steps = run.loop.env_steps - self.start_env_steps
        return {
            "env_steps": entry["env_steps"],
            "updates": entry["updates"],
            "mean_return": entry["mean_return"],
            "wall_s": wall,
            "seconds": {
                **{p: s[p] for p in PARTS[:-1]},
                "other": wall - sum(s[p] for p in PARTS[:-1]),
                "sampling": s["updates"] - s["update_calls"],
            },
            "first_call_s": {p: self.first.get(p, 0.0) for p in ("updates", "acting")},
            "update_ms": 1e3 * self._steady("updates"),
            "acting_ms_per_env_step": 1e3 * self._steady("acting") * self.calls["acting"] / max(env_steps, 1),
            "evaluations": len(run.history.evals),
        }

    def _steady(self, part: str) -> float:
        """Seconds per call of ``part`` after its first (which traces), or 0.0 before a second call."""
        calls = self.calls[part]
        return (self.seconds[part] - self.first.get(part, 0.0)) / (calls - 1) if calls > 1 else 0.0

    def on_step(self, run: Any, stats: Any) -> None:
        return None

    def on_end(self, run: Any, summary: dict[str, Any]) -> None:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"parts": [*PARTS, "sampling"], "at_evaluations": self.snapshots}, indent=1)
        (run.out_dir / FILE).write_text(text + "\n")


@contextmanager
def timing() -> Iterator[None]:
    """Every run the harness starts in this block (through :func:`agents.experiment.standard_hooks`)
    gets a :class:`TimeSplit` hook after the standard ones."""
    import agents.experiment as experiment

    original = experiment.standard_hooks

    def with_split(*args: Any, **kwargs: Any) -> list[Any]:
        hooks = original(*args, **kwargs)
        return [*hooks, TimeSplit(hooks)]

    experiment.standard_hooks = with_split
    try:
        yield
    finally:
        experiment.standard_hooks = original


def read(run_dir: Path) -> list[dict[str, Any]]:
    """The splits at each evaluation that ``run_dir``'s ``time_split.json`` holds."""
    return json.loads((Path(run_dir) / FILE).read_text())["at_evaluations"]


def main(argv: list[str] | None = None) -> int:
    """``agents.train``'s CLI (same flags and exit codes), timed."""
    from agents.cli import import_tensorflow_quietly

    import_tensorflow_quietly()  # a script, as agents.train run as one: TensorFlow's start-up logs hidden
    from agents import train

    with timing():
        return train.main(sys.argv[1:] if argv is None else argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
