"""Fault injection on the agent side (issue 11): corrupted checkpoints from a generator, and interrupts at
every stage of ``TrainLoop.save``, ``TrainLoop.load`` and ``Learner.update``.

Every corrupted checkpoint must be refused with a ``CheckpointError`` naming the file (and the field or
array) and leave the loop exactly as it was: a fingerprint of the learner (weights, target, optimizer
slots and counter), the replay, the actor (counters, RNG, weights) and the loop (credit, resumes) is
the same before and after. Corruptions that may still describe a valid checkpoint (a bit flip in a zip
header's timestamp, a missing config field that takes its default) must be refused the same way or load.
An interrupt leaves each operation applied entirely or not at all, and the previous checkpoint intact.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np
import pytest
from helpers import run_loop, small_config

from agents.envs import make_vector_env
from agents.experiment import History, resume_from
from agents.r2d2 import Actor, Learner, TrainLoop, apex_epsilons, evaluate, learner_checkpoint, make_replay
from agents.r2d2 import learner as learner_module
from agents.r2d2.checkpoint import CheckpointError, read_meta, read_replay
from agents.r2d2.config import R2D2Config
from burnin.replay import SequenceReplay

CONFIG = small_config(refresh_states=True)  # the update writes recomputed states back too
FILES = ("loop.json", "learner.npz", "replay.npz")


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


def fingerprint(loop: TrainLoop) -> dict[str, Any]:
    """Everything a load may change, but the replay's contents (the replay is swapped, never mutated:
    its identity is here, its contents are checked by :func:`replay_digest`)."""
    actor = loop.actor
    return {
        "learner": learner_digest(loop.learner),
        "num_updates": loop.learner.num_updates,
        "actor_weights": digest(actor.model.get_weights()),
        "actor": (actor.steps, actor.env_steps, actor.episodes),
        "rng": json.dumps(actor.rng.bit_generator.state, sort_keys=True),
        "loop": (loop.credit, loop.resumes, loop.loaded_from, loop._reset_envs_before_acting),
        "replay": (id(loop.replay), id(actor.replay)),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A loop that has trained, and its checkpoint (extra tag 'old')."""
    loop, losses = run_loop(CONFIG, 60)
    assert losses and loop.replay.num_sampleable > 0
    root = tmp_path_factory.mktemp("faults")
    loop.save(root / "pristine", extra={"tag": "old"})
    return loop, root / "pristine"


# ------------------------------------------------------------------ the generator


class Case(NamedTuple):
    name: str
    file: str
    """Which file of the checkpoint the case replaces."""
    content: Any
    """The file's new bytes; None: the file is removed; DIRECTORY: a directory takes its place."""
    refuse: bool
    """Must be refused (else: refused as well, or loaded)."""
    mention: str
    """Text the error must hold beside the file's name."""


DELETE = object()
DIRECTORY = object()

BAD_COUNTER = {
    "missing": DELETE, "string": "7", "null": None, "float": 1.5, "bool": True, "negative": -1,
    "huge": 2**70, "nan": math.nan, "inf": math.inf, "list": [1], "object": {},
}  # fmt: skip
# CONFIG's 4 envs at 4 env steps an update: a loop stopped among an iterate's updates owes at most 1 + 4 / 4.
BAD_CREDIT = {
    "missing": DELETE, "string": "0.5", "null": None, "nan": math.nan, "inf": math.inf, "negative": -0.1,
    "above what an iterate owes": 2.5, "bool": True, "list": [],
}  # fmt: skip
BAD_FORMAT = {"missing": DELETE, "next": 2, "string": "1", "float": 1.0, "bool": True, "null": None}
BAD_OBJECT = {"missing": DELETE, "string": "x", "list": [], "null": None, "number": 3}


def with_field(meta: dict, dotted: str, value: Any) -> dict:
    """A copy of ``meta`` with the field at ``dotted`` set to ``value`` (DELETE removes it)."""
    out = copy.deepcopy(meta)
    *path, last = dotted.split(".")
    node = out
    for part in path:
        node = node[part]
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return out


def other_value(value: Any) -> Any:
    """A different value of the same JSON type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    if isinstance(value, str):
        return value + "x"
    return [*value, *value[:1]] if value else [1]


def json_case(
    meta: dict, field: str, fault: str, value: Any, *, refuse: bool = True, mention: str = ""
) -> Case:
    text = json.dumps(with_field(meta, field, value)).encode()
    return Case(f"loop.json {field}: {fault}", "loop.json", text, refuse, mention or field.split(".")[-1])


def loop_json_cases(meta: dict) -> Iterator[Case]:
    """Every field of ``loop.json``: missing, of the wrong type, out of range, NaN, another config."""
    for field in ("seed", "resumes", "actor.steps", "actor.env_steps", "actor.episodes"):
        for fault, value in BAD_COUNTER.items():
            yield json_case(meta, field, fault, value)
    for fault, value in BAD_CREDIT.items():
        yield json_case(meta, "credit", fault, value)
    for fault, value in BAD_FORMAT.items():
        yield json_case(meta, "format", fault, value)
    for field in ("actor", "actor.rng", "config"):
        for fault, value in BAD_OBJECT.items():
            yield json_case(meta, field, fault, value, mention=field.split(".")[0])
    rng = meta["actor"]["rng"]
    for fault, value in {
        "another generator": {**rng, "bit_generator": "MT19937"},
        "no state": {"bit_generator": "PCG64"},
        "state not a number": {**rng, "state": {"state": "x", "inc": 1}},
        "state negative": {**rng, "state": {"state": -5, "inc": 1}},
        "state beyond 128 bits": {**rng, "state": {"state": 2**200, "inc": 1}},
    }.items():
        yield json_case(meta, "actor.rng", fault, value, mention="rng")
    for fault, value in {"string": "x", "list": [], "number": 3}.items():
        yield json_case(meta, "extra", fault, value)
    # What the checkpoint belongs to: refused when it is not this loop's, or malformed; a checkpoint
    # written before it was recorded (no identity) still loads.
    for fault, value in {"string": "x", "list": [], "null": None, "number": 3}.items():
        yield json_case(meta, "identity", fault, value)
    yield json_case(meta, "identity", "missing (an older checkpoint)", DELETE, refuse=False)
    yield json_case(meta, "identity.env_id", "another env", "CartPole-v1", mention="env id is 'CartPole-v1'")
    yield json_case(meta, "identity.env_id", "not a string", 3, mention="env_id")
    yield json_case(meta, "identity.env_id", "unknown", None, refuse=False)
    for field in ("observation", "actions"):
        yield json_case(meta, f"identity.{field}", "missing", DELETE)
        yield json_case(meta, f"identity.{field}", "another layout", {"shape": [3]}, mention="layout")
    yield json_case(meta, "seed", "another seed", meta["seed"] + 1, mention="seed is")
    yield json_case(meta, "extra", "missing", DELETE, refuse=False)
    for field, value in sorted(meta["config"].items()):
        yield json_case(meta, f"config.{field}", "another value", other_value(value))
        yield json_case(meta, f"config.{field}", "wrong type", 3 if isinstance(value, str) else "text")
        yield json_case(meta, f"config.{field}", "missing (takes its default)", DELETE, refuse=False)
    yield json_case(meta, "config.bogus", "unknown field", 1, mention="bogus")
    yield json_case(meta, "kind", "distributed", "distributed", mention="kind")
    yield json_case(meta, "unknown", "extra top-level field", 1, refuse=False)
    yield Case("loop.json: a list", "loop.json", b"[]", True, "JSON object")
    yield Case("loop.json: NaN text", "loop.json", b"NaN", True, "JSON object")


def learner_cases(arrays: dict[str, np.ndarray], learner: Learner) -> Iterator[Case]:
    """Every array of ``learner.npz``: missing, pickled, wrong dtype and shape, NaN, inf, negative; the
    counters out of range or disagreeing; another config or env; an extra array."""

    def case(
        name: str, fault: str, changes: dict[str, Any], *, refuse: bool = True, mention: str = ""
    ) -> Case:
        new = {**arrays, **changes}
        for key in [k for k, v in changes.items() if v is DELETE]:
            del new[key]
        return Case(f"learner.npz {name}: {fault}", "learner.npz", npz_bytes(new), refuse, mention or name)

    slots = {f"optimizer/{i}": v for i, v in enumerate(learner.optimizer.variables)}
    for name in sorted(arrays):
        a = arrays[name]
        yield case(name, "missing", {name: DELETE})
        yield case(name, "pickled", {name: np.array([a, None], dtype=object)})
        wrong = {"f": np.float64, "i": np.float32, "U": np.int64}[a.dtype.kind]
        yield case(name, "wrong dtype", {name: a.astype(wrong) if a.dtype.kind != "U" else np.asarray(5)})
        yield case(name, "extra axis", {name: a[..., None]})
        if a.ndim and a.size:
            yield case(name, "one entry short", {name: a[:-1]})
        if a.dtype.kind == "f":
            for fault, value in (("NaN", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
                bad = a.copy()
                bad.flat[bad.size // 2] = value
                yield case(name, fault, {name: bad})
            positive = name in slots and (
                slots[name].name.endswith("_velocity") or slots[name].name == "learning_rate"
            )
            bad = a.copy()
            bad.flat[0] = -abs(bad.flat[0]) - 1.0
            # A weight or an Adam momentum may be negative; an Adam velocity or the learning rate may not.
            yield case(name, "negative", {name: bad}, refuse=positive)
    step = next(k for k, v in slots.items() if v is learner.optimizer.iterations)
    updates = int(arrays["num_updates"])
    for fault, value in (("negative", -1), ("absurd", 2**60), ("one more than the optimizer's", updates + 1)):
        yield case("num_updates", fault, {"num_updates": np.asarray(value, np.int64)})
    for fault, value in (("negative", -1), ("one more than num_updates", updates + 1)):
        yield case(step, f"step counter {fault}", {step: np.asarray(value, np.int64)})
    both = np.asarray(2**60, np.int64)
    yield case("num_updates", "absurd with the optimizer's", {"num_updates": both, step: both})
    rate = next(k for k, v in slots.items() if v.name == "learning_rate")
    yield case(rate, "another learning rate", {rate: arrays[rate] * 10})
    saved = json.loads(str(arrays["config"]))
    for fault, text in (
        ("not JSON", "{gamma"),
        ("a list", "[1, 2]"),
        ("another gamma", json.dumps({**saved, "gamma": 0.5})),
        ("an unknown field", json.dumps({**saved, "bogus": 1})),
        ("an invalid value", json.dumps({**saved, "batch_size": -3})),
    ):
        yield case("config", fault, {"config": np.asarray(text)})
    for fault, value in (("another env", [3, 2]), ("zero", [0, 2]), ("negative", [2, -1])):
        yield case("sizes", fault, {"sizes": np.asarray(value, np.int64)})
    yield case("bogus", "extra array", {"bogus": np.zeros(3)})


def npz_bytes(arrays: dict[str, Any]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def member_data_regions(data: bytes) -> list[tuple[str, int, int]]:
    """(member, start, end) of each stored member's bytes in a zip."""
    import io

    regions = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            off = info.header_offset
            name_len = int.from_bytes(data[off + 26 : off + 28], "little")
            extra_len = int.from_bytes(data[off + 28 : off + 30], "little")
            start = off + 30 + name_len + extra_len
            regions.append((info.filename, start, start + info.compress_size))
    return regions


def file_cases(name: str, data: bytes) -> Iterator[Case]:
    """The file as a whole: missing, a directory, empty, truncated, junk, bit flips (anywhere: refused or
    harmless; inside a zip member's data: refused, its CRC or header no longer matches)."""
    yield Case(f"{name}: missing", name, None, True, "")
    yield Case(f"{name}: a directory", name, DIRECTORY, True, "")
    yield Case(f"{name}: empty", name, b"", True, "")
    for n in sorted({1, 10, 100, len(data) // 2, len(data) - 1}):
        if 0 < n < len(data):
            yield Case(f"{name}: truncated to {n} bytes", name, data[:n], True, "")
    junk = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    yield Case(f"{name}: junk", name, junk, True, "")
    for pos in np.linspace(0, len(data) - 1, 24, dtype=int):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        yield Case(f"{name}: bit flip at byte {pos}", name, bytes(flipped), False, "")
    if name.endswith(".npz"):
        for member, start, end in member_data_regions(data)[:6]:
            for pos in np.linspace(start, end - 1, 3, dtype=int):
                flipped = bytearray(data)
                flipped[pos] ^= 0x01
                yield Case(f"{name}: bit flip in {member} at byte {pos}", name, bytes(flipped), True, "")


def all_cases(pristine: Path, learner: Learner) -> list[Case]:
    meta = json.loads((pristine / "loop.json").read_text())
    with np.load(pristine / "learner.npz") as data:
        arrays = {k: data[k] for k in data.files}
    cases = list(loop_json_cases(meta))
    cases += learner_cases(arrays, learner)
    for name in FILES:
        cases += file_cases(name, (pristine / name).read_bytes())
    return cases


def apply(case: Case, directory: Path) -> None:
    target = directory / case.file
    if target.is_dir():
        target.rmdir()
    else:
        target.unlink(missing_ok=True)
    if case.content is DIRECTORY:
        target.mkdir()
    elif case.content is not None:
        target.write_bytes(case.content)


# ------------------------------------------------------------------ corrupted checkpoints


def test_generator_covers_every_field_and_array(saved):
    loop, pristine = saved
    cases = all_cases(pristine, loop.learner)
    names = " ".join(c.name for c in cases)
    for field in ("seed", "credit", "resumes", "format", "actor.steps", "actor.rng", "config.gamma", "extra",
                  "identity", "identity.env_id", "identity.observation", "identity.actions"):  # fmt: skip
        assert f"loop.json {field}:" in names
    for array in loop.learner.array_specs():
        assert f"learner.npz {array}: missing" in names
    assert len(cases) > 400  # the number reported in the closing note


@pytest.mark.parametrize("file", FILES)
def test_corrupted_checkpoint_is_refused_and_changes_nothing(saved, tmp_path, file):
    loop, pristine = saved
    work = tmp_path / "ckpt"
    shutil.copytree(pristine, work)
    cases = [c for c in all_cases(pristine, loop.learner) if c.file == file]
    replay, replay_before = loop.replay, replay_digest(loop.replay, tmp_path)
    failures, refused = [], 0
    for case in cases:
        apply(case, work)
        before = fingerprint(loop)
        try:
            loop.load(work)
        except CheckpointError as err:
            refused += 1
            message = str(err)
            if case.file not in message or case.mention not in message:
                failures.append(f"{case.name}: unclear error {message!r}")
            if fingerprint(loop) != before:
                failures.append(f"{case.name}: refused, but the loop changed")
        except Exception as err:  # any other outcome is a failure to report
            failures.append(f"{case.name}: {type(err).__name__}: {err}")
        else:
            if case.refuse:
                failures.append(f"{case.name}: accepted")
            replay, replay_before = loop.replay, replay_digest(loop.replay, tmp_path)
        apply(Case("", file, (pristine / file).read_bytes(), False, ""), work)  # back to the good file
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert refused >= sum(c.refuse for c in cases)
    assert loop.replay is replay and replay_digest(loop.replay, tmp_path) == replay_before


def test_a_bad_late_field_leaves_the_loop_as_it_was(saved, tmp_path):
    """Item 5: a bad ``credit`` used to raise after the learner, the replay and the actor were replaced."""
    loop, pristine = saved
    work = tmp_path / "ckpt"
    shutil.copytree(pristine, work)
    loop.learner.online.set_weights(
        [w + 0.5 for w in loop.learner.online.get_weights()]
    )  # differ from the file
    meta = json.loads((work / "loop.json").read_text())
    meta["credit"] = "lots"
    (work / "loop.json").write_text(json.dumps(meta))
    before, replay = fingerprint(loop), loop.replay
    with pytest.raises(ValueError, match=r"loop\.json: credit: expected a number, got str 'lots'"):
        loop.load(work)
    assert fingerprint(loop) == before and loop.replay is replay
    loop.load(pristine)  # and the checkpoint itself still loads


def test_nan_weights_in_a_checkpoint_are_refused(saved, tmp_path):
    """Item 8: a learner.npz with NaN weights, or a negative or absurd counter, is refused on load."""
    loop, pristine = saved
    for name, value in (
        ("online/0", np.nan),
        ("target/3", np.inf),
        ("num_updates", -4),
        ("num_updates", 10**15),
    ):
        work = tmp_path / f"ckpt-{name.replace('/', '-')}-{value}"
        shutil.copytree(pristine, work)
        with np.load(work / "learner.npz") as data:
            arrays = {k: data[k] for k in data.files}
        if name == "num_updates":
            arrays[name] = np.asarray(value, np.int64)
        else:
            arrays[name] = arrays[name].copy()
            arrays[name].flat[0] = value
        np.savez(work / "learner.npz", **arrays)
        before = fingerprint(loop)
        with pytest.raises(ValueError, match=rf"learner\.npz: .*{name}"):
            loop.load(work)
        assert fingerprint(loop) == before
        with pytest.raises(ValueError, match=name):
            loop.learner.load_state_dict(arrays)
        assert fingerprint(loop) == before


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


def leftovers(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_interrupt_at_each_stage_of_save_keeps_the_last_checkpoint(saved, tmp_path, monkeypatch):
    loop, pristine = saved
    old = {name: (pristine / name).read_bytes() for name in FILES}
    root = tmp_path / "runs"
    inject = Injector(
        monkeypatch,
        [(os, "replace"), (os, "fsync"), (os, "mkdir"), (shutil, "rmtree"), (np, "savez"), (json, "dumps"),
         (SequenceReplay, "save"), (Learner, "state_dict")],
    )  # fmt: skip

    def fresh() -> None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        shutil.copytree(pristine, root / "ckpt")
        inject.calls.clear()

    fresh()
    loop.save(root / "ckpt", extra={"tag": "new"})
    stages = list(inject.calls)
    assert len(stages) > 15 and "os.replace" in stages and "SequenceReplay.save" in stages
    for at, stage in enumerate(stages):
        before = fingerprint(loop)
        fresh()
        inject.at = at
        with pytest.raises(KeyboardInterrupt):
            loop.save(root / "ckpt", extra={"tag": "new"})
        inject.at = None
        where = f"interrupt at call {at} ({stage})"
        assert fingerprint(loop) == before, where
        assert leftovers(root) <= {"ckpt", ".ckpt.previous"}, (where, leftovers(root))  # no temp dir
        path, meta = read_meta(root / "ckpt")  # the last good checkpoint, or the new one: complete
        if meta["extra"]["tag"] == "old":
            assert {name: (path / name).read_bytes() for name in FILES} == old, where
        else:
            loop.learner.read_checkpoint(path)
            read_replay(path / "replay.npz")
        loop.save(root / "ckpt", extra={"tag": "next"})  # the next save works and tidies up
        assert leftovers(root) == {"ckpt"}, (where, leftovers(root))


LOAD_STAGES = [
    (json, "loads"), (zipfile.ZipFile, "open"), (np, "frombuffer"), (learner_checkpoint, "check_state_dict"),
    (SequenceReplay, "load"), (learner_checkpoint, "state_dict"), (Learner, "assign_state"),
    (keras.Model, "set_weights"),
]  # fmt: skip


@pytest.mark.parametrize("mode", ["exception", "signal"])
def test_interrupt_at_each_stage_of_load_applies_all_or_nothing(saved, tmp_path, monkeypatch, mode):
    """An exception at any stage leaves the loop as it was; a real SIGINT at any stage too, or, once the
    commit has begun, is held until the checkpoint is entirely in (then raised)."""
    loop, pristine = saved
    files = {name: (pristine / name).read_bytes() for name in FILES}
    loop.learner.online.set_weights([w - 0.25 for w in loop.learner.online.get_weights()])  # differ from it
    start = fingerprint(loop)
    inject = Injector(monkeypatch, LOAD_STAGES)
    snapshot = (loop.learner.state_dict(), loop.actor.model.get_weights(), loop.replay)
    counters = (loop.actor.steps, loop.actor.env_steps, loop.actor.episodes, loop.actor.rng)
    state = (loop.credit, loop.resumes, loop.loaded_from, loop._reset_envs_before_acting)

    def reset() -> None:
        loop.learner.load_state_dict(snapshot[0])
        loop.actor.set_weights(snapshot[1])
        loop.replay = loop.actor.replay = snapshot[2]
        loop.actor.steps, loop.actor.env_steps, loop.actor.episodes, loop.actor.rng = counters
        loop.credit, loop.resumes, loop.loaded_from, loop._reset_envs_before_acting = state
        inject.calls.clear()

    reset()
    loop.load(pristine)
    stages = list(inject.calls)
    loaded = fingerprint(loop)
    loaded.pop("replay")
    assert "Model.set_weights" in stages and "ZipFile.open" in stages
    outcomes = {"unchanged": 0, "loaded": 0}
    for at, stage in enumerate(stages):
        reset()
        assert fingerprint(loop) == start
        inject.calls.clear()
        inject.at, inject.signal = at, mode == "signal"
        with pytest.raises(KeyboardInterrupt):
            loop.load(pristine)
        inject.at = None
        after = fingerprint(loop)
        if after == start:
            outcomes["unchanged"] += 1
        else:
            after.pop("replay")
            assert mode == "signal" and after == loaded, f"half-applied after an interrupt at {at} ({stage})"
            outcomes["loaded"] += 1
        assert {name: (pristine / name).read_bytes() for name in FILES} == files
    reset()
    assert outcomes["unchanged"] > 10
    if mode == "signal":
        assert outcomes["loaded"] >= 3  # the commit's stages: held, then delivered


@pytest.mark.parametrize("mode", ["exception", "signal"])
def test_interrupt_at_each_stage_of_update_applies_all_or_nothing(saved, tmp_path, monkeypatch, mode):
    """Learner.update: an exception before the commit changes nothing; a real SIGINT anywhere leaves the
    update undone or done entirely (weights, optimizer, counter, target, priorities, refreshed states)."""
    loop, pristine = saved
    learner = loop.learner
    snapshot = learner.state_dict()
    replay_file = pristine / "replay.npz"
    batch = read_replay(replay_file).sample(CONFIG.batch_size, extra_state_offsets=learner.offsets.extra)

    def state(replay: SequenceReplay) -> tuple[str, str]:
        return learner_digest(learner), replay_digest(replay, tmp_path)

    replay = read_replay(replay_file)
    start = state(replay)
    learner.update(batch, replay=replay)
    done = state(replay)
    assert done != start
    targets = [(learner_module, "make_feed"), (SequenceReplay, "update_priorities"),
               (SequenceReplay, "update_states")]  # fmt: skip
    inject = Injector(monkeypatch, targets)
    learner.assign_state(snapshot)
    replay = read_replay(replay_file)
    inject.calls.clear()
    learner.update(batch, replay=replay)
    stages = list(inject.calls)
    assert sorted(stages) == ["SequenceReplay.update_priorities", "SequenceReplay.update_states",
                              "agents.r2d2.learner.make_feed"]  # fmt: skip
    update_fn = learner._update_concrete  # the compiled step, traced by the update above
    for at, stage in enumerate(stages):
        if mode == "exception" and stage.startswith("SequenceReplay"):
            continue  # a replay that raises on the write-back is a replay error, not an interrupt
        learner.assign_state(snapshot)
        replay = read_replay(replay_file)
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
        learner.assign_state(snapshot)
        replay = read_replay(replay_file)

        def interrupted(feed, raising=raising):
            if raising:
                raise KeyboardInterrupt("injected instead of the step")
            signal.raise_signal(signal.SIGINT)
            return update_fn(feed)

        monkeypatch.setattr(learner, "_update_concrete", interrupted)
        with pytest.raises(KeyboardInterrupt):
            learner.update(batch, replay=replay)
        assert state(replay) == (start if raising else done)
        monkeypatch.setattr(learner, "_update_concrete", update_fn)
    learner.assign_state(snapshot)


def test_a_rejected_update_changes_nothing(saved):
    """Item 6: NaN in the batch is refused before the step; a finite batch whose step would be non-finite
    (rewards of 1e30) is undone inside the compiled step. Neither changes the learner."""
    loop, pristine = saved
    learner = loop.learner
    replay = read_replay(pristine / "replay.npz")
    batch = replay.sample(CONFIG.batch_size, extra_state_offsets=learner.offsets.extra)
    before, updates = learner_digest(learner), learner.num_updates
    observation = batch.observation.copy()
    observation[1, 2, 0] = np.nan
    bad = {
        "observation": observation,
        "reward": np.where(batch.valid_t, np.float32(1e30), batch.reward).astype(np.float32),
        "weights": np.full_like(batch.weights, np.nan),
        "action": np.full_like(batch.action, 7),
        "discount": np.full_like(batch.discount, 2.0),
        "valid_t": batch.valid_t.astype(np.float32),
        "state": ((batch.state[0][0], batch.state[0][1][:-1]),),
    }
    messages = {
        "observation": r"batch\.observation: expected finite values, got \[nan\]",
        "reward": "non-finite values in the loss",
        "weights": r"batch\.weights: expected finite values",
        "action": r"batch\.action: expected values in \[0, 1\], got \[7",
        "discount": r"batch\.discount: expected values in \[0, 1\]",
        "valid_t": r"batch\.valid_t: expected bools, got dtype float32",
        "state": r"batch\.state\[0\]\[1\]: expected shape \(8, 16\)",
    }
    for field, value in bad.items():
        with pytest.raises((ValueError, TypeError), match=messages[field]):
            learner.update(batch._replace(**{field: value}), replay=replay)
        assert learner_digest(learner) == before and learner.num_updates == updates, field
    assert np.isfinite(learner.update(batch, replay=replay).loss)  # the batch itself is fine
    assert learner.num_updates == updates + 1


# ------------------------------------------------------------------ temp dirs and the fallback


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def dead_thread_ident() -> int:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    return t.ident


def test_stale_temp_dirs_are_removed_on_save_and_load(saved, tmp_path, monkeypatch):
    """Item 10: a crash inside a save leaves its temp dir; the next save or load removes those of dead
    writers (our naming pattern only), and a failed save removes its own."""
    loop, pristine = saved
    root = tmp_path / "runs"
    shutil.copytree(pristine, root / "ckpt")

    def plant() -> set[str]:
        """Stale temp dirs (removed by the next save or load) and other entries (kept); returns the kept."""
        stale = {f".ckpt.tmp-{dead_pid()}-1", f".ckpt.tmp-{os.getpid()}-{dead_thread_ident()}"}
        keep = {
            ".ckpt.tmp-1-1",
            ".other.tmp-999999-1",
            ".ckpt.tmp-abc",
            "ckpt.tmp-999999-1",
        }  # pid 1 is alive
        for name in stale | keep:
            (root / name).mkdir()
            (root / name / "learner.npz").write_bytes(b"partial")
        return keep

    keep = plant()
    loop.save(root / "ckpt")
    assert leftovers(root) == {"ckpt"} | keep
    for name in keep:
        shutil.rmtree(root / name)
    keep = plant()
    loop.load(root / "ckpt")
    assert leftovers(root) == {"ckpt"} | keep
    for name in keep:
        shutil.rmtree(root / name)
    # A save that fails at its first rename removes its own temp dir.
    real_replace = os.replace

    def fail_on_swap(src, dst):
        if Path(dst) == root / ".ckpt.previous":
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_swap)
    with pytest.raises(OSError, match="rename failed"):
        loop.save(root / "ckpt")
    monkeypatch.setattr(os, "replace", real_replace)
    assert leftovers(root) == {"ckpt"}


def test_after_a_crash_between_the_renames_the_messages_name_the_directory_read(saved, tmp_path, capsys):
    """Item 11: the resume reads the previous checkpoint and says so; the next save removes it."""
    loop, pristine = saved
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(pristine, root / ".ckpt.previous")  # what a crash between the renames leaves
    history, wall = resume_from(loop, root / "ckpt")
    assert loop.loaded_from == root / ".ckpt.previous"
    out = capsys.readouterr().out
    assert (
        f"resumed from {root / '.ckpt.previous'} (the previous checkpoint: {root / 'ckpt'} was not complete)"
        in out
    )
    assert isinstance(history, History) and wall == 0.0
    loop.save(root / "ckpt")
    assert leftovers(root) == {"ckpt"}
    loop.load(root / "ckpt")
    assert loop.loaded_from == root / "ckpt"


def test_a_corrupt_history_in_the_checkpoint_is_refused(saved, tmp_path):
    loop, pristine = saved
    work = tmp_path / "ckpt"
    shutil.copytree(pristine, work)
    meta = json.loads((work / "loop.json").read_text())
    meta["extra"] = {"history": {"evals": [{"env_steps": -5, "mean_return": 1.0}]}}
    (work / "loop.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"loop\.json: extra\.history\.evals\[0\]\.env_steps: expected an int >= 0"
    ):
        resume_from(loop, work)


# ------------------------------------------------------------------ arguments (item 13)


def test_actor_refuses_bad_epsilons_and_seeds():
    config = small_config()
    env = make_vector_env(4, seed=0)
    for eps, error in (([0.1, np.nan, 0.2, 0.3], ValueError), ([0.1, 2.0, 0.2, 0.3], ValueError),
                       ([-1.0, 0.1, 0.2, 0.3], ValueError), (["a"] * 4, TypeError), ([0.1] * 3, ValueError)):  # fmt: skip
        with pytest.raises(error, match="^epsilons: expected"):
            Actor(config, env, epsilons=eps)
    with pytest.raises(ValueError, match="^seed: expected an int >= 0, got -1"):
        Actor(config, env, seed=-1)
    with pytest.raises(ValueError, match="^lanes: expected 4 lane ids >= 0"):
        Actor(config, env, lanes=[0, 1, 2, -3])
    with pytest.raises(TypeError, match="^config: expected an R2D2Config"):
        Actor(config.to_json(), env)
    with pytest.raises(ValueError, match="^base: expected a finite number >= 0.0 and <= 1.0, got 2"):
        apex_epsilons(4, base=2)
    actor = Actor(config, env, epsilons=np.zeros(4))
    with pytest.raises(ValueError, match="^seed: expected an int >= 0"):
        evaluate(actor, actor.model.get_weights(), seed=-2)
    with pytest.raises(ValueError, match=r"^actor\.rng: expected the state of a PCG64"):
        actor.load_state_dict(
            {"steps": 1, "env_steps": 1, "episodes": 0, "rng": {"bit_generator": "MT19937"}}
        )
    env.close()


def test_learner_and_loop_refuse_bad_sizes_and_seeds():
    config = small_config()
    with pytest.raises(TypeError, match="^obs_dim: expected an int, got float 2.7"):
        Learner(config, 2.7, 2)
    with pytest.raises(TypeError, match="^num_actions: expected an int, got str '2'"):
        Learner(config, 2, "2")
    with pytest.raises(ValueError, match="^seed: expected an int >= 0, got -1"):
        Learner(config, 2, 2, seed=-1)
    with pytest.raises(TypeError, match="^burn_in_gradient: expected a bool"):
        Learner(config, 2, 2, burn_in_gradient="no")
    with pytest.raises(ValueError, match="^seed: expected an int >= 0, got -3"):
        TrainLoop(config, make_vector_env(4, seed=0), seed=-3)
    with pytest.raises(ValueError, match="^num_lanes: expected an int >= 1, got 0"):
        make_replay(config, 2, (), num_lanes=0)


def test_config_gaps():
    with pytest.raises(TypeError, match="^config: expected a dict of fields, got list"):
        R2D2Config.from_json([])
    with pytest.raises(TypeError, match="^torso_units: expected a tuple of ints"):
        R2D2Config.from_json({"torso_units": 5})
    with pytest.raises(ValueError, match=r"^period: expected an int <= unroll \(8\), got 9"):
        small_config(period=9)
