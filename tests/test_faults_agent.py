"""Fault injection on the agent side (issue 11): interrupts at every stage of ``Learner.update``, and
batches that would leave the learner non-finite.

An update is applied entirely or not at all: a fingerprint of the learner (weights, target, optimizer
slots and counter) and of the replay it writes back to is either the one before or the one after a
complete update.
"""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_r2d2 import run_loop, small_config

from agents.r2d2 import Learner
from burnin.replay import SequenceReplay

CONFIG = small_config(refresh_states=True)  # the update writes recomputed states back too


# ------------------------------------------------------------------ fingerprints


def digest(arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def replay_digest(replay: SequenceReplay, tmp: Path) -> str:
    path = tmp / "fingerprint-replay.npz"
    replay.save(path)
    with np.load(path) as data:
        return digest(data[k] for k in sorted(data.files))


def learner_digest(learner: Learner) -> str:
    state = learner.state_dict()
    return digest(state[k] for k in sorted(state))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A loop that has trained, and its checkpoint (extra tag 'old')."""
    loop, losses = run_loop(CONFIG, 60)
    assert losses and loop.replay.num_sampleable > 0
    root = tmp_path_factory.mktemp("faults")
    loop.save(root / "pristine", extra={"tag": "old"})
    return loop, root / "pristine"


# ------------------------------------------------------------------ interrupts


class Injector:
    """Counts the calls of some functions; raises KeyboardInterrupt at call ``at`` (or, with ``signal``,
    sends this process a real SIGINT there and lets the call go on)."""

    def __init__(self, monkeypatch, targets: list[tuple[Any, str]]) -> None:
        self.calls: list[str] = []
        self.at: int | None = None
        self.signal = False
        for owner, name in targets:
            original = getattr(owner, name)
            label = f"{getattr(owner, '__name__', owner)}.{name}"
            monkeypatch.setattr(owner, name, self._wrap(original, label))

    def _wrap(self, original: Any, label: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            index = len(self.calls)
            self.calls.append(label)
            if index == self.at:
                if not self.signal:
                    raise KeyboardInterrupt(f"injected at {label} (call {index})")
                signal.raise_signal(signal.SIGINT)
            return original(*args, **kwargs)

        return wrapper


@pytest.mark.parametrize("mode", ["exception", "signal"])
def test_interrupt_at_each_stage_of_update_applies_all_or_nothing(saved, tmp_path, monkeypatch, mode):
    """Learner.update: an exception before the commit changes nothing; a real SIGINT anywhere leaves the
    update undone or done entirely (weights, optimizer, counter, target, priorities, refreshed states)."""
    loop, pristine = saved
    learner = loop.learner
    snapshot = learner.state_dict()
    replay_file = pristine / "replay.npz"
    batch = SequenceReplay.load(replay_file).sample(
        CONFIG.batch_size, extra_state_offsets=learner.extra_state_offsets
    )

    def state(replay: SequenceReplay) -> tuple[str, str]:
        return learner_digest(learner), replay_digest(replay, tmp_path)

    replay = SequenceReplay.load(replay_file)
    start = state(replay)
    learner.update(batch, replay=replay)
    done = state(replay)
    assert done != start
    targets = [(Learner, "_check_batch"), (Learner, "_feed"), (SequenceReplay, "update_priorities"),
               (SequenceReplay, "update_states")]  # fmt: skip
    inject = Injector(monkeypatch, targets)
    learner.load_state_dict(snapshot)
    replay = SequenceReplay.load(replay_file)
    inject.calls.clear()
    learner.update(batch, replay=replay)
    stages = list(inject.calls)
    assert sorted(stages) == ["Learner._check_batch", "Learner._feed", "SequenceReplay.update_priorities",
                              "SequenceReplay.update_states"]  # fmt: skip
    update_fn = learner._update_fn
    for at, stage in enumerate(stages):
        if mode == "exception" and stage.startswith("SequenceReplay"):
            continue  # a replay that raises on the write-back is a replay error, not an interrupt
        learner.load_state_dict(snapshot)
        replay = SequenceReplay.load(replay_file)
        assert state(replay) == start
        inject.calls.clear()
        inject.at, inject.signal = at, mode == "signal"
        with pytest.raises(KeyboardInterrupt):
            learner.update(batch, replay=replay)
        inject.at = None
        assert state(replay) in (start, done), f"half-applied after an interrupt at {at} ({stage})"
        if mode == "exception":
            assert state(replay) == start
    # Inside the compiled step itself: a KeyboardInterrupt instead of the call changes nothing,
    # and a SIGINT while it runs is held until the write-back is done too.
    for raising in (True, False):
        learner.load_state_dict(snapshot)
        replay = SequenceReplay.load(replay_file)

        def interrupted(feed, raising=raising):
            if raising:
                raise KeyboardInterrupt("injected instead of the step")
            signal.raise_signal(signal.SIGINT)
            return update_fn(feed)

        monkeypatch.setattr(learner, "_update_fn", interrupted)
        with pytest.raises(KeyboardInterrupt):
            learner.update(batch, replay=replay)
        assert state(replay) == (start if raising else done)
        monkeypatch.setattr(learner, "_update_fn", update_fn)
    learner.load_state_dict(snapshot)


def test_a_rejected_update_changes_nothing(saved):
    """Item 6: NaN in the batch is refused before the step; a finite batch whose step would be non-finite
    (rewards of 1e30) is undone inside the compiled step. Neither changes the learner."""
    loop, pristine = saved
    learner = loop.learner
    replay = SequenceReplay.load(pristine / "replay.npz")
    batch = replay.sample(CONFIG.batch_size, extra_state_offsets=learner.extra_state_offsets)
    before, updates = learner_digest(learner), learner.num_updates
    observation = batch.observation.copy()
    observation[1, 2, 0] = np.nan
    bad = {
        "observation": observation,
        "reward": np.where(batch.mask, np.float32(1e30), batch.reward).astype(np.float32),
        "weights": np.full_like(batch.weights, np.nan),
        "action": np.full_like(batch.action, 7),
        "discount": np.full_like(batch.discount, 2.0),
        "mask": batch.mask.astype(np.float32),
        "state": ((batch.state[0][0], batch.state[0][1][:-1]),),
    }
    messages = {
        "observation": r"batch\.observation: expected finite values, got \[nan\]",
        "reward": "non-finite values in the loss",
        "weights": r"batch\.weights: expected finite values",
        "action": r"batch\.action: expected values in \[0, 1\], got \[7",
        "discount": r"batch\.discount: expected values in \[0, 1\]",
        "mask": r"batch\.mask: expected bools, got dtype float32",
        "state": r"batch\.state\[0\]\[1\]: expected shape \(8, 16\)",
    }
    for field, value in bad.items():
        with pytest.raises((ValueError, TypeError), match=messages[field]):
            learner.update(batch._replace(**{field: value}), replay=replay)
        assert learner_digest(learner) == before and learner.num_updates == updates, field
    assert np.isfinite(learner.update(batch, replay=replay).loss)  # the batch itself is fine
    assert learner.num_updates == updates + 1
