"""The run harness (agents.experiment.run) and its hooks' contract, on a scripted loop with no network: the
order the hooks are called in, stop reasons, what a failing or interrupted step and a failing hook do; and
History's checked JSON form (agents.history)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from agents.experiment import RunFailed, run
from agents.history import History
from agents.r2d2.loop import LoopStats
from agents.rundir import RunDirError


class ScriptedLearner:
    num_updates = 0


class ScriptedReplay:
    def stats(self) -> dict[str, Any]:
        return {"size": 0}


class ScriptedLoop:
    """A :class:`agents.r2d2.loop.Loop` that takes ``steps_per_iterate`` env steps per iterate and ends an
    episode of return 1.0 every 3rd iterate; ``fail_at`` / ``interrupt_at`` (iterate count) raise there."""

    def __init__(self, steps_per_iterate: int = 10, *, fail_at: int = 0, interrupt_at: int = 0) -> None:
        self.learner, self.replay, self.loaded_from = ScriptedLearner(), ScriptedReplay(), None
        self.steps_per_iterate, self.fail_at, self.interrupt_at = steps_per_iterate, fail_at, interrupt_at
        self.iterations = 0
        self._env_steps = 0

    @property
    def env_steps(self) -> int:
        return self._env_steps

    def iterate(self) -> LoopStats:
        self.iterations += 1
        if self.iterations == self.fail_at:
            raise RuntimeError("the env went away")
        if self.iterations == self.interrupt_at:
            raise KeyboardInterrupt
        self._env_steps += self.steps_per_iterate
        finished = [(0, 1.0, 3)] if self.iterations % 3 == 0 else []
        return LoopStats(self._env_steps, 0, self.iterations // 3, finished, None)

    def save(self, directory, *, extra=None) -> Path:
        raise AssertionError("no hook here saves")

    def load(self, directory, *, allow_mismatch=()) -> dict[str, Any]:
        raise AssertionError("no run here resumes")


class Recorder:
    """A hook that records its calls in the shared ``calls`` list; ``stop_at`` (env steps) returns ``stop``
    from on_step, ``fail_in`` names the method that raises."""

    def __init__(self, name: str, calls: list, *, stop_at: int = 0, stop: str = "done", fail_in: str = ""):
        self.name, self.calls, self.stop_at, self.stop, self.fail_in = name, calls, stop_at, stop, fail_in
        self.summary: dict[str, Any] | None = None

    def _call(self, method: str, detail: Any = None) -> None:
        self.calls.append((self.name, method, detail))
        if method == self.fail_in:
            raise RuntimeError(f"{self.name} broke in {method}")

    def on_start(self, run_: Any) -> None:
        self._call("on_start")

    def on_step(self, run_: Any, stats: LoopStats) -> str | None:
        self._call("on_step", stats.env_steps)
        return self.stop if self.stop_at and stats.env_steps >= self.stop_at else None

    def on_end(self, run_: Any, summary: dict[str, Any]) -> None:
        self.summary = summary
        self._call("on_end", summary["stop_reason"])


def drive(tmp_path: Path, loop: ScriptedLoop, hooks: list, total: int = 50) -> dict[str, Any]:
    return run(loop, hooks, out_dir=tmp_path / "run", total_env_steps=total)


def test_hooks_start_see_every_step_and_end_in_their_order(tmp_path):
    calls: list = []
    hooks = [Recorder("a", calls), Recorder("b", calls)]
    summary = drive(tmp_path, ScriptedLoop(), hooks, total=30)
    steps = [(name, "on_step", s) for s in (10, 20, 30) for name in ("a", "b")]
    assert calls == [
        ("a", "on_start", None),
        ("b", "on_start", None),
        *steps,
        ("a", "on_end", "budget"),
        ("b", "on_end", "budget"),
    ]
    assert hooks[0].summary is summary and hooks[1].summary is summary  # on_end adds to the one returned
    assert summary["stop_reason"] == "budget" and summary["env_steps"] == 30 and summary["episodes"] == 1
    assert summary["history"]["episodes"] == [(30, 1.0)]


def test_a_stop_string_ends_the_run_and_later_hooks_skip_that_step(tmp_path):
    calls: list = []
    hooks = [Recorder("a", calls, stop_at=20, stop="solved"), Recorder("b", calls)]
    summary = drive(tmp_path, ScriptedLoop(), hooks, total=1000)
    assert summary["stop_reason"] == "solved" and summary["env_steps"] == 20
    seen = [(n, d) for n, m, d in calls if m == "on_step"]
    assert seen == [("a", 10), ("b", 10), ("a", 20)]  # b never sees the step a stopped at
    assert [(n, d) for n, m, d in calls if m == "on_end"] == [("a", "solved"), ("b", "solved")]


def test_the_first_stop_string_of_a_step_wins(tmp_path):
    calls: list = []
    hooks = [Recorder("a", calls, stop_at=10, stop="first"), Recorder("b", calls, stop_at=10, stop="second")]
    assert drive(tmp_path, ScriptedLoop(), hooks)["stop_reason"] == "first"


def test_a_failing_step_still_ends_every_hook_then_raises_run_failed(tmp_path):
    calls: list = []
    hooks = [Recorder("a", calls), Recorder("b", calls)]
    with pytest.raises(RunFailed) as caught:
        drive(tmp_path, ScriptedLoop(fail_at=3), hooks)
    err = caught.value
    assert str(err).startswith("failed at env step 20: RuntimeError: the env went away; saved the final")
    assert isinstance(err.__cause__, RuntimeError)
    assert err.summary["stop_reason"] == "failed" and err.summary["env_steps"] == 20
    assert "Traceback" in err.summary["error"]["traceback"] and err.summary["error"]["type"] == "RuntimeError"
    assert [(n, d) for n, m, d in calls if m == "on_end"] == [("a", "failed"), ("b", "failed")]


def test_a_hook_that_fails_in_on_step_fails_the_run_like_the_loop(tmp_path):
    calls: list = []
    hooks = [Recorder("a", calls, fail_in="on_step"), Recorder("b", calls)]
    with pytest.raises(RunFailed, match="failed at env step 10: RuntimeError: a broke in on_step"):
        drive(tmp_path, ScriptedLoop(), hooks)
    assert [(n, d) for n, m, d in calls if m == "on_end"] == [("a", "failed"), ("b", "failed")]


def test_a_hook_that_fails_in_on_end_does_not_stop_the_others(tmp_path):
    calls: list = []
    hooks = [Recorder("a", calls, fail_in="on_end"), Recorder("b", calls)]
    with pytest.raises(RunFailed) as caught:
        drive(tmp_path, ScriptedLoop(), hooks, total=20)
    assert "the run ended (budget); saving in" in str(caught.value)
    assert "Recorder (RuntimeError: a broke in on_end)" in str(caught.value)
    assert [n for n, m, _ in calls if m == "on_end"] == ["a", "b"]
    assert hooks[1].summary["save_errors"] == ["Recorder (RuntimeError: a broke in on_end)"]


def test_a_hook_that_fails_to_start_ends_the_run_before_any_step(tmp_path):
    calls: list = []
    hooks = [Recorder("a", calls), Recorder("b", calls, fail_in="on_start"), Recorder("c", calls)]
    loop = ScriptedLoop()
    with pytest.raises(RuntimeError, match="b broke in on_start"):
        drive(tmp_path, loop, hooks)
    assert loop.iterations == 0
    assert calls == [("a", "on_start", None), ("b", "on_start", None)]  # set-up failed: nothing to save


def test_an_interrupted_run_ends_every_hook_and_returns(tmp_path):
    calls: list = []
    summary = drive(tmp_path, ScriptedLoop(interrupt_at=2), [Recorder("a", calls)])
    assert summary["stop_reason"] == "interrupted" and summary["env_steps"] == 10
    assert calls[-1] == ("a", "on_end", "interrupted")


def test_a_second_run_into_a_directory_in_use_is_refused(tmp_path):
    inner: list = []

    class Nested(Recorder):
        def on_start(self, run_: Any) -> None:
            with pytest.raises(RunDirError, match="in use"):
                drive(tmp_path, ScriptedLoop(), [])
            inner.append("refused")

    drive(tmp_path, ScriptedLoop(), [Nested("n", [])], total=10)
    assert inner == ["refused"]


def test_history_json_round_trip_and_checks():
    h = History()
    h.evals.append({"env_steps": 100, "mean_return": 9.5})
    h.episodes.append((40, 12.0))
    h.learner.append({"updates": 50, "delta_q_first": 0.1, "delta_q_last": 0.2})
    back = History.from_json(json.loads(json.dumps(h.to_json())))  # as a checkpoint holds it
    assert (back.evals, back.episodes, back.learner) == (h.evals, h.episodes, h.learner)
    for bad, message in [
        ([], "history: expected a JSON object"),
        (
            {"evals": [{"env_steps": -1, "mean_return": 1.0}]},
            "history.evals[0].env_steps: expected an int >= 0",
        ),
        ({"episodes": [[1, 2, 3]]}, "history.episodes[0]: expected [env_steps, return]"),
        ({"learner": [{"updates": "x"}]}, "history.learner[0].updates"),
    ]:
        with pytest.raises((TypeError, ValueError), match=re.escape(message)):
            History.from_json(bad)
