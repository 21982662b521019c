"""Fault injection for SequenceReplay (issue 11): crafted checkpoints, interrupts at every bytecode, bad values.

* Crafted checkpoints are generated from a real saved one: for every member and
  every table field, values out of range, negative, NaN, wrong shapes and dtypes,
  headers declaring terabytes, members that inflate past their header, missing,
  duplicated and extra members, and every field of the JSON meta. Each must be
  refused with a ValueError naming the file, leave the file as it was, or (where
  the change is harmless) load into a buffer that passes its invariants and
  survives sampling, updates, adds and a save.
* Interrupts: SIGINT is delivered, as CPython does, by calling the installed
  Python handler, before each bytecode executed in burnin's own code during
  ``add`` / ``update_priorities`` / ``update_states`` / ``close_lanes`` /
  ``register_lanes`` / ``sample`` / ``save``, one run per bytecode. After each the
  buffer's fingerprint is the one before the call or the one after a whole call,
  never anything else, and the invariants hold; a save leaves the old or the new
  file and no temp file.
"""

from __future__ import annotations

import copy
import dis
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import S2, assert_same, busy_replay, fingerprint, play, replay_for, snapshot, state_of

import burnin
from burnin.replay import SequenceReplay
from burnin.sumtree import SumTree

BURNIN_DIR = str(Path(burnin.__file__).resolve().parent)
ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Fingerprints and copies, built from the buffer's arrays by the test itself.
# ---------------------------------------------------------------------------------------------


def clone(replay: SequenceReplay) -> SequenceReplay:
    if hasattr(type(replay), "copy"):
        return replay.copy()
    # Before SequenceReplay.copy existed (to run these tests against older code).
    tree = SumTree(replay._num_slots)
    tree.nodes[:] = replay._tree.nodes
    new = SequenceReplay.__new__(SequenceReplay)
    new._setup(
        replay.config, copy.deepcopy(replay._rng), {k: v.copy() for k, v in replay._arrays.items()}, tree,
        max_priority=replay._max_priority, registry={k: v.tolist() for k, v in replay.registered_lanes.items()},
    )  # fmt: skip
    return new


def test_fingerprint_and_copy() -> None:
    replay = busy_replay(keep_actor_states=True)
    twin = replay.copy()
    assert twin.fingerprint() == replay.fingerprint() and fingerprint(twin) == fingerprint(replay)
    assert_same(snapshot(twin), snapshot(replay))
    np.testing.assert_array_equal(twin.sample(16).keys, replay.sample(16).keys)  # the RNG was copied
    play(twin, ["0:900"])
    assert twin.fingerprint() != replay.fingerprint()
    twin.check_invariants()
    replay.check_invariants()


# ---------------------------------------------------------------------------------------------
# Interrupts at every bytecode.
# ---------------------------------------------------------------------------------------------


# CPython 3.11 runs signal handlers only where its eval loop checks the "eval breaker": on entering
# a function (RESUME), on a loop's back edge (JUMP_BACKWARD) and when a call returns (at the end of
# CALL, so the exception is raised *at* the call). An interrupt can land at these points only.
JUMP_BACKWARD = dis.opmap["JUMP_BACKWARD"]
CALLS = {dis.opmap[name] for name in ("CALL", "CALL_FUNCTION_EX")}


def ours(frame: Any) -> bool:
    return frame is not None and frame.f_code.co_filename.startswith(BURNIN_DIR)


class Interrupter:
    """Deliver SIGINT at the ``at``-th point where CPython could, in burnin's own frames (never if ``at`` is 0).

    The points: entering a burnin function, or a Python function burnin calls; every
    call made by burnin code, as it returns (raised from the profile hook, so at
    the call, as CPython does; for
    callables the profiler does not see, such as numba kernels and ufuncs, just
    before the next instruction); every loop back edge. A call or a frame left by
    an exception is no point (CPython unwinds without checking). Delivery is what CPython
    does: call the Python handler installed for SIGINT (the default raises
    KeyboardInterrupt; a deferring one records it). ``count`` counts the points.
    """

    def __init__(self, at: int = 0) -> None:
        self.at, self.count, self.fired = at, 0, False
        self._previous: dict[Any, int | None] = {}
        self._returned: set[Any] = set()
        self._raising: set[Any] = set()  # frames an exception is passing through

    def _point(self, frame: Any) -> None:
        # Raising here makes CPython drop the hooks, so one run interrupts once.
        self.count += 1
        if self.count == self.at:
            self.fired = True
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):
                handler(signal.SIGINT, frame)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            if ours(frame) or ours(frame.f_back):
                self._point(frame)
        elif event == "return":
            if frame in self._raising:
                self._raising.discard(frame)  # left by an exception: no check on that way out
            elif ours(frame.f_back):
                self._returned.add(frame.f_back)
                self._point(frame)
        elif event == "c_return" and ours(frame):
            self._returned.add(frame)
            self._point(frame)

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_lines = False
        if ours(frame):
            frame.f_trace_opcodes = True
            return self._opcode
        return self._watch

    def _watch(self, frame: Any, event: str, arg: Any) -> Any:
        """Other frames: only whether an exception passes through (then their return is no point)."""
        if event == "exception":
            self._raising.add(frame)
        return self._watch

    def _opcode(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            self._raising.discard(frame)
            previous = self._previous.get(frame)
            self._previous[frame] = frame.f_code.co_code[frame.f_lasti]
            if previous == JUMP_BACKWARD:
                self._point(frame)
            elif previous in CALLS:
                if frame in self._returned:
                    self._returned.discard(frame)  # that call's return was the point
                else:
                    self._point(frame)
        elif event == "exception":
            # The call raised: CPython goes to the handler without a check.
            self._previous[frame] = None
            self._returned.discard(frame)
            self._raising.add(frame)
        elif event == "return":
            self._previous.pop(frame, None)
            self._returned.discard(frame)
        return self._opcode

    def __enter__(self) -> Interrupter:
        sys.setprofile(self._profile)
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)
        sys.setprofile(None)


INTERRUPTS: Counter[str] = Counter()


def interrupt_everywhere(name: str, base: SequenceReplay, op: Callable[[SequenceReplay], Any],
                         after_each: Callable[[SequenceReplay, bool], None] | None = None) -> Counter[str]:  # fmt: skip
    """Run ``op`` on a copy of ``base`` once per point where an interrupt can land in burnin, interrupted there.

    Each interrupted run must leave the copy exactly as before the call, or exactly as a whole
    call leaves it, with the invariants intact. Returns how many runs ended each way.
    """
    op(clone(base))  # compile the kernels outside the traced runs
    before = fingerprint(base)
    whole = clone(base)
    op(whole)
    after = fingerprint(whole)
    replay = clone(base)
    with Interrupter() as counter:
        op(replay)
    assert counter.count > 3
    outcomes: Counter[str] = Counter()
    for at in range(1, counter.count + 1):
        replay = clone(base)
        interrupted = False
        try:
            with Interrupter(at) as hit:
                op(replay)
        except KeyboardInterrupt:
            interrupted = True
        assert hit.fired, (name, at)
        assert interrupted, f"{name}: the interrupt at point {at} was lost"
        assert not replay._lock.locked(), f"{name}: interrupted at point {at}, the buffer's lock is left held"
        got = fingerprint(replay)
        assert got in (before, after), f"{name}: interrupted at point {at} of {counter.count}, half applied"
        replay.check_invariants()
        outcomes["nothing" if got == before else "whole"] += 1
        if after_each is not None:
            after_each(replay, got == before)
    INTERRUPTS[name] = counter.count
    print(f"\n{name}: {counter.count} interrupts, {dict(outcomes)}")
    return outcomes


def wrapping_replay(**kwargs: Any) -> SequenceReplay:
    """Two lanes whose rings have wrapped: the next add evicts, keeps a state and completes a window."""
    replay = replay_for(S2, lanes=2, capacity=12, seed=3, **kwargs)
    play(replay, [f"0:{i} 1:{100 + i}" for i in range(1, 16)])
    return replay


ADD = {
    "observation": np.array([[7.0], [8.0]]),
    "action": np.array([3, 4]),
    "reward": np.array([0.5, -0.5]),
    "terminated": np.array([False, True]),
    "truncated": np.array([False, False]),
    "states": state_of(np.array([7, 8])),
}


@pytest.mark.parametrize("keep_actor_states", [False, True])
def test_interrupted_add_is_all_or_nothing(keep_actor_states: bool) -> None:
    """Issue 11 item 2: an interrupt after the bookkeeping and before the copies left a half-written step."""
    base = wrapping_replay(keep_actor_states=keep_actor_states)
    assert base.stats()["windows_evicted"] > 0
    outcomes = interrupt_everywhere(
        f"add(keep_actor_states={keep_actor_states})", base, lambda r: r.add([0, 1], **ADD)
    )
    assert outcomes["nothing"] > 0


def test_interrupted_final_observation_add_is_all_or_nothing() -> None:
    base = wrapping_replay()
    play(base, ["0:20T 1:120t"])
    interrupt_everywhere(
        "add(final observations)", base, lambda r: r.add([1, 0], **{**ADD, "terminated": np.zeros(2, bool)})
    )


def test_interrupted_priority_update_is_all_or_nothing() -> None:
    base = busy_replay()
    keys = base.live_keys()
    stale = keys[:2] + base._num_slots * 7  # never-issued generations: counted as stale
    keys = np.concatenate([keys, stale])
    priorities = np.linspace(0.5, 9.0, keys.size)  # raises the running maximum
    interrupt_everywhere("update_priorities", base, lambda r: r.update_priorities(keys, priorities))


def test_interrupted_state_refresh_is_all_or_nothing() -> None:
    base = busy_replay(keep_actor_states=True)
    keys = base.live_keys()
    states = (state_of(np.arange(keys.size) + 500.0), state_of(np.arange(keys.size) + 700.0))
    written = clone(base).update_states(keys, [2, 2], states)  # the same offset twice: the second wins
    assert written > 0
    interrupt_everywhere("update_states", base, lambda r: r.update_states(keys, [2, 2], states))


def test_interrupted_close_and_reregister_are_all_or_nothing() -> None:
    base = busy_replay()
    play(base, ["0:50T"])  # lane 0 waits for its final observation; lane 2 ("remote") is open
    interrupt_everywhere("close_lanes", base, lambda r: r.close_lanes([0, 1, 2]))
    interrupt_everywhere("register_lanes(again)", base, lambda r: r.register_lanes("remote", 1))
    fresh = replay_for(S2, lanes=3, seed=1)
    interrupt_everywhere("register_lanes(new)", fresh, lambda r: r.register_lanes("actor-7", 2))


def test_interrupted_sample_draws_nothing_or_everything() -> None:
    base = busy_replay()
    interrupt_everywhere("sample", base, lambda r: r.sample(8, extra_state_offsets=[0, 2]))


def test_interrupted_save_leaves_old_or_new_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11 item 10 (the replay's part): no temp file outlives a failed save, wherever the interrupt lands."""
    monkeypatch.setattr(
        os, "fsync", lambda fd: None
    )  # durability is not what is tested here; speed is needed
    old = busy_replay()
    path = tmp_path / "replay.npz"
    old.save(path)
    old_bytes = path.read_bytes()
    new = clone(old)
    play(new, ["0:700 1:800"])
    want = {fingerprint(old): "old", fingerprint(new): "new"}
    files: Counter[str] = Counter()

    def after_each(replay: SequenceReplay, unchanged: bool) -> None:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.npz"], "a temp file is left"
        files[want[fingerprint(SequenceReplay.load(path))]] += 1
        path.write_bytes(old_bytes)

    def op(replay: SequenceReplay) -> None:
        replay.save(path)

    outcomes = interrupt_everywhere("save", new, op, after_each)
    # save never changes the buffer, so every run counts as "nothing" there; the file tells.
    assert outcomes == Counter(nothing=sum(outcomes.values()))
    assert files["old"] > 0 and files["new"] > 0
    print("save: files", dict(files))


# ---------------------------------------------------------------------------------------------
# Crafted checkpoints.
# ---------------------------------------------------------------------------------------------


def read_raw(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(str(arrays.pop("meta")[()]))
    return meta, arrays


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npy_header(shape: tuple[int, ...], descr: str, fortran: bool = False) -> bytes:
    """A version 1.0 .npy header declaring any shape and dtype."""
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}"
    pad = 64 - (10 + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def meta_npy(meta: Any) -> bytes:
    return npy(np.array(json.dumps(meta) if not isinstance(meta, str) else meta))


Members = list[tuple[str, bytes, int]]  # (member name, bytes, zipfile compression)


def members_of(meta: Any, arrays: dict[str, np.ndarray]) -> Members:
    out = [("meta.npy", meta_npy(meta), zipfile.ZIP_STORED)]
    out += [(f"{name}.npy", npy(arr), zipfile.ZIP_STORED) for name, arr in arrays.items()]
    return out


def write_zip(path: Path, members: Members) -> Path:
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are on purpose
        for name, data, compression in members:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = compression
            zf.writestr(info, data)
    return path


@dataclass
class Crafted:
    name: str
    build: Callable[[dict[str, Any], dict[str, np.ndarray]], Members]
    expect: str  # "reject", "either" (refused, or loads and works) or "same" (loads the very same buffer)
    match: str = ""


def with_array(name: str, change: Callable[[np.ndarray], np.ndarray | None]) -> Callable[..., Members]:
    def build(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Members:
        arrays = dict(arrays)
        arr = arrays[name].copy()
        out = change(arr)
        arrays[name] = arr if out is None else out
        return members_of(meta, arrays)

    return build


def with_meta(change: Callable[[dict[str, Any]], Any]) -> Callable[..., Members]:
    def build(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Members:
        meta = copy.deepcopy(meta)
        out = change(meta)
        return members_of(meta if out is None else out, arrays)

    return build


def with_member(
    name: str, change: Callable[[bytes, np.ndarray | None], list[tuple[str, bytes, int]]]
) -> Callable[..., Members]:
    """Replace member ``name`` (raw bytes) by what ``change(bytes, array)`` returns (several members, or none)."""

    def build(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Members:
        members = members_of(meta, arrays)
        out: Members = []
        for member, data, compression in members:
            if member == f"{name}.npy":
                out += change(data, arrays.get(name))
            else:
                out.append((member, data, compression))
        return out

    return build


def setter(index: Any, value: Any) -> Callable[[np.ndarray], None]:
    def change(arr: np.ndarray) -> None:
        arr[index] = value

    return change


BIG = 2**62
NO_POS = -(2**62)


def structural_cases(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[Crafted]:
    cases = []
    other = {"b": np.uint8, "i": np.int32, "u": np.int8, "f": None}
    for name, arr in [("meta", np.array(json.dumps(meta))), *arrays.items()]:
        n = name
        reject = f"checkpoint .*{'array' if name != 'meta' else ''}"
        cases.append(
            Crafted(f"{n}:missing", with_member(n, lambda d, a: []), "reject", "missing|no 'meta' entry")
        )
        cases.append(
            Crafted(
                f"{n}:duplicate",
                with_member(n, lambda d, a, n=n: [(f"{n}.npy", d, 0)] * 2),
                "reject",
                "appears twice",
            )
        )
        cases.append(
            Crafted(
                f"{n}:trailing_bytes",
                with_member(n, lambda d, a, n=n: [(f"{n}.npy", d + bytes(1000), 0)]),
                "reject",
                "zip member holds",
            )
        )
        cases.append(
            Crafted(
                f"{n}:truncated",
                with_member(n, lambda d, a, n=n: [(f"{n}.npy", d[:-8], 0)]),
                "reject",
                reject,
            )
        )
        cases.append(
            Crafted(
                f"{n}:header_only",
                with_member(n, lambda d, a, n=n: [(f"{n}.npy", d[: d.index(b"\n") + 1], 0)]),
                "reject",
                reject,
            )
        )
        cases.append(
            Crafted(
                f"{n}:object_dtype",
                with_member(n, lambda d, a, n=n: [(f"{n}.npy", npy_header((3,), "|O") + bytes(24), 0)]),
                "reject",
                reject,
            )
        )
        cases.append(
            Crafted(
                f"{n}:terabyte_header",
                with_member(n, lambda d, a, n=n: [(f"{n}.npy", npy_header((2**40, 8), "<f8") + d[128:], 0)]),
                "reject",
                r"2\*\*40|1099511627776",
            )
        )
        cases.append(
            Crafted(
                f"{n}:npy_version_9",
                with_member(n, lambda d, a, n=n: [(f"{n}.npy", d[:6] + b"\x09\x00" + d[8:], 0)]),
                "reject",
                reject,
            )
        )
        cases.append(
            Crafted(
                f"{n}:deflated",
                with_member(n, lambda d, a, n=n: [(f"{n}.npy", d, zipfile.ZIP_DEFLATED)]),
                "same",
            )
        )
        if name == "meta":
            continue
        kind = arr.dtype.kind
        if other[kind] is not None or kind == "f":
            wrong = (np.float64 if arr.dtype == np.float32 else np.float32) if kind == "f" else other[kind]
            if kind == "i" and arr.dtype == np.int32:
                wrong = np.int64
            cases.append(
                Crafted(f"{n}:dtype", with_array(n, lambda a, w=wrong: a.astype(w)), "reject", "expected")
            )
        if arr.dtype.itemsize > 1:
            cases.append(
                Crafted(
                    f"{n}:big_endian",
                    with_array(n, lambda a: a.astype(a.dtype.newbyteorder(">"))),
                    "reject",
                    "expected",
                )
            )
        cases.append(Crafted(f"{n}:one_row_short", with_array(n, lambda a: a[:-1]), "reject", "expected"))
        cases.append(
            Crafted(
                f"{n}:one_row_more", with_array(n, lambda a: np.concatenate([a, a[:1]])), "reject", "expected"
            )
        )
        if arr.ndim > 1:
            cases.append(
                Crafted(f"{n}:flattened", with_array(n, lambda a: a.reshape(-1)), "reject", "expected")
            )
            cases.append(Crafted(f"{n}:fortran_order", with_array(n, np.asfortranarray), "same"))
    cases.append(
        Crafted(
            "extra_member",
            lambda m, a: [*members_of(m, a), ("junk.npy", npy(np.zeros(3)), 0)],
            "reject",
            "unexpected arrays",
        )
    )
    cases.append(
        Crafted(
            "non_npy_member",
            lambda m, a: [*members_of(m, a), ("notes.txt", b"hi", 0)],
            "reject",
            "unexpected member",
        )
    )
    return cases


def table_cases(r: SequenceReplay, arrays: dict[str, np.ndarray]) -> list[Crafted]:
    """Values out of range, negative, huge, off by one or NaN in every table field."""
    cases: list[Crafted] = []
    wpl, spl, ns = r.config.windows_per_lane, r.config.state_slots_per_lane, r._num_slots
    win, alive = arrays["windows"], arrays["window_alive"]
    live = np.flatnonzero(alive)
    own = live[win[live, 1] == 0][0]
    padded = live[win[live, 1] > 0][0]
    dead = np.flatnonzero(~alive)[0]
    # windows: every column of a live window with and without left padding; a dead slot's generation.
    for label, slot in (("own", own), ("padded", padded)):
        for c, col in enumerate(("start", "left", "right", "touch", "state", "generation")):
            for tag, value in (("neg", -1), ("big", BIG), ("min", np.iinfo(np.int64).min), ("1e6", 10**6),
                               ("plus1", int(win[slot, c]) + 1), ("minus1", int(win[slot, c]) - 1)):  # fmt: skip
                # A padded window's state number is virtual: only its extra states read it, checked by position.
                expect = (
                    "either"
                    if col == "state" and label == "padded" and tag not in ("big", "min")
                    else "reject"
                )
                cases.append(
                    Crafted(
                        f"windows[{label}].{col}={tag}",
                        with_array("windows", setter((slot, c), value)),
                        expect,
                        "corrupt",
                    )
                )
    cases.append(
        Crafted(
            "windows[dead].generation+1",
            with_array("windows", setter((dead, 5), int(win[dead, 5]) + 1)),
            "reject",
            "generation",
        )
    )
    cases.append(Crafted("windows[dead].start=big", with_array("windows", setter((dead, 0), BIG)), "either"))
    cases.append(
        Crafted(
            "window_alive[live]=False",
            with_array("window_alive", setter(own, False)),
            "reject",
            "window_alive",
        )
    )
    cases.append(
        Crafted(
            "window_alive[dead]=True",
            with_array("window_alive", setter(dead, True)),
            "reject",
            "window_alive",
        )
    )
    # lanes: every column of every lane.
    lanes = arrays["lanes"]
    for lane in range(lanes.shape[0]):
        for c in range(lanes.shape[1]):
            for tag, value, expect in (("neg", -1, "reject"), ("big", BIG + 12345, "reject"), ("two", 2, "either"),
                                       ("plus1", int(lanes[lane, c]) + 1, "either")):  # fmt: skip
                if c in (0, 5, 6) and tag == "plus1":
                    expect = "reject"  # pos, head, tail: counters disagree
                if c in (8, 9, 10) and tag == "two":
                    expect = "reject"
                cases.append(
                    Crafted(
                        f"lanes[{lane}][{c}]={tag}",
                        with_array("lanes", setter((lane, c), value)),
                        expect,
                        "corrupt",
                    )
                )
    # stored-state slots.
    sp = arrays["state_pos"].reshape(-1)
    owned_row = (own // wpl) * spl + win[own, 4] % spl
    empty_row = np.flatnonzero(sp == NO_POS)[0]
    for tag, value in (("neg", -1), ("big", BIG), ("plus1", int(sp[owned_row]) + 1), ("empty", NO_POS)):
        cases.append(
            Crafted(
                f"state_pos[owned]={tag}",
                with_array("state_pos", lambda a, v=value: a.reshape(-1).__setitem__(owned_row, v)),
                "reject",
                "corrupt",
            )
        )
    cases.append(
        Crafted(
            "state_pos[empty]=0",
            with_array("state_pos", lambda a: a.reshape(-1).__setitem__(empty_row, 0)),
            "either",
        )
    )
    for tag, value in (
        ("minus1", -1),
        ("neg2", -2),
        ("big", BIG),
        ("plus1", int(arrays["state_owner"].reshape(-1)[owned_row]) + 1),
    ):
        cases.append(
            Crafted(
                f"state_owner[owned]={tag}",
                with_array("state_owner", lambda a, v=value: a.reshape(-1).__setitem__(owned_row, v)),
                "reject",
                "corrupt",
            )
        )
    # counters.
    for i in range(arrays["counters"].size):
        cases.append(
            Crafted(f"counters[{i}]=-1", with_array("counters", setter(i, -1)), "reject", "counters")
        )
        cases.append(
            Crafted(f"counters[{i}]=big", with_array("counters", setter(i, BIG)), "reject", "counters")
        )
        cases.append(
            Crafted(
                f"counters[{i}]+1",
                with_array("counters", setter(i, arrays["counters"][i] + 1)),
                "reject" if i in (0, 1, 3, 4) else "either",
                "counters",
            )
        )
    # the priority tree.
    for tag, value in (
        ("nan", np.nan),
        ("inf", np.inf),
        ("neg", -1.0),
        ("plus1", float(arrays["tree"][own]) + 1),
        ("1e308", 1e308),
    ):
        cases.append(Crafted(f"tree[live]={tag}", with_array("tree", setter(own, value)), "reject", "tree"))
    cases.append(Crafted("tree[dead]=1", with_array("tree", setter(dead, 1.0)), "reject", "tree"))

    def rebuilt(slot: int, value: float) -> Callable[[np.ndarray], np.ndarray]:
        def change(a: np.ndarray) -> np.ndarray:
            tree = SumTree(ns)
            tree.update(np.arange(ns), np.where(np.arange(ns) == slot, value, a[:ns]))
            return tree.state()

        return change

    cases.append(
        Crafted(
            "tree[dead]=1 (sums rebuilt)",
            with_array("tree", rebuilt(dead, 1.0)),
            "reject",
            "evicted window keeps a priority",
        )
    )
    cases.append(
        Crafted(
            "tree[live]=1e9 (sums rebuilt)",
            with_array("tree", rebuilt(own, 1e9)),
            "reject",
            "above max_priority",
        )
    )
    cases.append(Crafted("tree[live]=0.25 (sums rebuilt)", with_array("tree", rebuilt(own, 0.25)), "either"))
    # steps and stored values.
    cap = r.config.lane_capacity
    lane, start = own // wpl, int(win[own, 0])
    inner = lane * cap + (start + 1) % cap
    for value in (16, 255, 5):
        cases.append(
            Crafted(
                f"step_flags={value}",
                with_array("step_flags", setter((lane, (start + 1) % cap), value)),
                "reject",
                "step_flags|steps",
            )
        )

    def final_inside(a: np.ndarray) -> None:
        a.reshape(-1)[inner] = 4

    def zero_step(a: np.ndarray) -> None:
        a.reshape(-1)[inner] = 0

    cases.append(Crafted("final observation inside a live window", lambda m, a: members_of(m, {
        **a, "step_flags": _changed(a["step_flags"], final_inside), "step_action": _changed(a["step_action"], zero_step),
        "step_reward": _changed(a["step_reward"], zero_step)}), "reject", "spans two episodes|ended"))  # fmt: skip
    cases.append(
        Crafted("step_action=anything", with_array("step_action", setter((0, 0), -123456)), "either")
    )
    for name in [n for n, a in arrays.items() if a.dtype.kind == "f" and n != "tree"]:
        for tag, value in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
            cases.append(
                Crafted(
                    f"{name}={tag}",
                    with_array(name, lambda a, v=value: a.reshape(-1).__setitem__(-1, v)),
                    "reject",
                    f"{name}: expected finite",
                )
            )
    return cases


def _changed(arr: np.ndarray, change: Callable[[np.ndarray], None]) -> np.ndarray:
    arr = arr.copy()
    change(arr)
    return arr


def meta_cases(meta: dict[str, Any]) -> list[Crafted]:
    cases = [
        Crafted("meta:not_json", with_meta(lambda m: "{not json"), "reject", "not JSON"),
        Crafted("meta:a_list", with_meta(lambda m: [1, 2]), "reject", "format version"),
        Crafted(
            "meta:deeply_nested",
            with_meta(lambda m: "[" * 100_000 + "]" * 100_000),
            "reject",
            "nested|format version",
        ),
        Crafted(
            "meta:huge_string",
            with_member("meta", lambda d, a: [("meta.npy", npy_header((), "<U100000000"), 0)]),
            "reject",
            "JSON string of at most",
        ),
    ]
    for value in (2, 0, "1", True, None, 1.0000001):
        cases.append(
            Crafted(
                f"format_version={value!r}",
                with_meta(lambda m, v=value: m.__setitem__("format_version", v)),
                "reject",
                "format version",
            )
        )
    for key in ("format_version", "config", "max_priority", "registry", "rng"):
        cases.append(
            Crafted(
                f"meta.{key}:missing",
                with_meta(lambda m, k=key: m.pop(k)),
                "reject",
                "missing|format version",
            )
        )
    config_values: dict[str, list[Any]] = {
        "spec": [[0, 0, 0, 0], [1, 2], "abcd", None, [1, 2, 3, 1], [2**70, 2, 2, 1]],
        "num_lanes": [0, -1, 2.5, "3", None, 2, 10**7],
        "lane_capacity": [0, 3, 13, 10**15, 2**80],
        "obs_shape": [[], [0], [-1], [10**6, 10**6], "1", [1.5]],
        "obs_dtype": ["O", "foo", "<U8", "<i4", "V8", None],
        "state_shapes": [[], [[[2]]], [[[2], [0]]], "x", [[[10**12], [3]]]],
        "state_dtype": ["<i4", "<f8", "?", None],
        "alpha": [float("nan"), -1, "0.9", None, 1e300],
        "beta": [float("nan"), -0.5, [1]],
        "windows_per_lane": [2, 0, 10**12, 1.5],
        "keep_actor_states": [False, 1, "yes"],
    }
    for key in config_values:
        if key != "keep_actor_states":
            cases.append(
                Crafted(
                    f"config.{key}:missing",
                    with_meta(lambda m, k=key: m["config"].pop(k)),
                    "reject",
                    "config",
                )
            )
        for value in config_values[key]:
            cases.append(
                Crafted(
                    f"config.{key}={value!r}"[:80],
                    with_meta(lambda m, k=key, v=value: m["config"].__setitem__(k, v)),
                    "reject",
                    "corrupt|config|expected|declares|unexpected|missing",
                )
            )
    cases.append(
        Crafted(
            "config.obs_dtype='>f4'", with_meta(lambda m: m["config"].__setitem__("obs_dtype", ">f4")), "same"
        )
    )
    for value in (float("nan"), -1.0, 0.5, 0, float("inf"), "2", True, None, [3], 2**1100):
        cases.append(
            Crafted(
                f"max_priority={value!r}"[:60],
                with_meta(lambda m, v=value: m.__setitem__("max_priority", v)),
                "reject",
                "max_priority|corrupt",
            )
        )
    for value in (1e6, 1e308):  # a running maximum above every leaf is consistent
        cases.append(
            Crafted(
                f"max_priority={value}",
                with_meta(lambda m, v=value: m.__setitem__("max_priority", v)),
                "either",
            )
        )
    registries = [{"remote": [99]}, {"remote": [3]}, {"remote": [-1]}, {"remote": [1.5]}, {"remote": ["2"]}, {"remote": []},
                  {"remote": [True]}, {"remote": 2}, {"": [2]}, {"a": [2], "b": [2]}, {"a": [2, 2]}, [2], "remote",
                  {"remote": [2**64]}]  # fmt: skip
    for value in registries:
        cases.append(
            Crafted(
                f"registry={json.dumps(value)}",
                with_meta(lambda m, v=value: m.__setitem__("registry", v)),
                "reject",
                "registry",
            )
        )
    cases.append(
        Crafted(
            "registry=two owners",
            with_meta(lambda m: m.__setitem__("registry", {"remote": [2], "x": [0]})),
            "either",
        )
    )
    rng_changes: dict[str, Callable[[dict[str, Any]], Any]] = {
        "unknown": lambda s: s.__setitem__("bit_generator", "Foo"),
        "not_a_dict": lambda s: "PCG64",
        "state_missing": lambda s: s.pop("state"),
        "state_huge": lambda s: s["state"].__setitem__("state", 2**200),
        "state_negative": lambda s: s["state"].__setitem__("state", -5),
        "state_str": lambda s: s["state"].__setitem__("inc", "x"),
        "object_array": lambda s: s["state"].__setitem__("state", {"__ndarray__": [1, 2], "dtype": "|O"}),
        "float_array": lambda s: s["state"].__setitem__("state", {"__ndarray__": [1.5], "dtype": "<f8"}),
        "mt_short_key": lambda s: {
            "bit_generator": "MT19937",
            "state": {"key": {"__ndarray__": [1, 2, 3], "dtype": "<u4"}, "pos": 0},
        },
    }
    for tag, change in rng_changes.items():

        def edit(m: dict[str, Any], change: Callable[[dict[str, Any]], Any] = change) -> None:
            out = change(m["rng"])
            if out is not None:
                m["rng"] = out

        cases.append(Crafted(f"rng:{tag}", with_meta(edit), "reject", "rng|RNG|bit generator|corrupt"))
    return cases


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[SequenceReplay, Path]:
    replay = busy_replay(keep_actor_states=True)
    path = tmp_path_factory.mktemp("good") / "replay.npz"
    replay.save(path)
    return replay, path


def all_cases() -> list[Crafted]:
    """Every crafted case, generated from a real checkpoint of :func:`busy_replay`."""
    replay = busy_replay(keep_actor_states=True)
    with tempfile.TemporaryDirectory() as tmp:
        replay.save(Path(tmp) / "replay.npz")
        meta, arrays = read_raw(Path(tmp) / "replay.npz")
    return structural_cases(meta, arrays) + table_cases(replay, arrays) + meta_cases(meta)


CASES = all_cases()
OUTCOMES: Counter[str] = Counter()


def exercise(replay: SequenceReplay) -> None:
    """Use a loaded buffer every way: nothing may crash, and the invariants must hold after."""
    replay.check_invariants()
    lanes = np.arange(replay.num_lanes)
    if replay.num_sampleable:
        batch = replay.sample(32, extra_state_offsets=[0, 2])
        assert np.isfinite(batch.weights).all() and (batch.probabilities > 0).all()
        replay.update_priorities(batch.keys, np.linspace(0.1, 2.0, 32))
        replay.update_states(batch.keys, [2], (state_of(np.arange(32)),))
    for i in range(6):
        pending = replay._lt[:, 9].astype(bool)
        replay.add(lanes, observation=np.full((lanes.size, 1), i, np.float32), action=lanes, reward=np.ones(lanes.size),
                   terminated=(i == 3) & ~pending, truncated=np.zeros(lanes.size, bool), states=state_of(lanes))  # fmt: skip
    replay.close_lanes(lanes)
    replay.check_invariants()
    replay.sample(8)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_crafted_checkpoint(
    case: Crafted, good_checkpoint: tuple[SequenceReplay, Path], tmp_path: Path
) -> None:
    original, good = good_checkpoint
    meta, arrays = read_raw(good)
    path = write_zip(tmp_path / "crafted.npz", case.build(meta, arrays))
    data, listing = path.read_bytes(), sorted(os.listdir(tmp_path))
    try:
        loaded = SequenceReplay.load(path)
    except ValueError as err:
        OUTCOMES["rejected"] += 1
        assert case.expect in ("reject", "either"), f"{case.name} was refused: {err}"
        assert str(path) in str(err)
        if case.match:
            assert re.search(case.match, str(err)), f"{case.name}: {err}"
        # A failed load changes nothing.
        assert path.read_bytes() == data and sorted(os.listdir(tmp_path)) == listing
        return
    OUTCOMES["loaded"] += 1
    assert case.expect in ("either", "same"), f"{case.name} loaded"
    if case.expect == "same":
        assert fingerprint(loaded) == fingerprint(original)
    exercise(loaded)


@pytest.mark.parametrize("seed", range(4))
def test_random_table_mutations_never_crash(
    seed: int, good_checkpoint: tuple[SequenceReplay, Path], tmp_path: Path
) -> None:
    """Random single-entry mutations of every integer table: refused, or loaded and safe to use."""
    _, good = good_checkpoint
    meta, arrays = read_raw(good)
    rng = np.random.default_rng(seed)
    names = ["windows", "lanes", "state_pos", "state_owner", "counters", "step_flags", "window_alive"]
    outcome: Counter[str] = Counter()
    for _ in range(60):
        name = names[rng.integers(len(names))]
        arr = arrays[name].copy()
        flat = arr.reshape(-1)
        i = rng.integers(flat.size)
        if arr.dtype == np.bool_:
            flat[i] = ~flat[i]
        elif arr.dtype == np.uint8:
            flat[i] = rng.integers(256)
        else:
            choices = [
                int(flat[i]) + int(rng.integers(-3, 4)),
                int(rng.integers(-(2**63), 2**63 - 1)),
                -1,
                0,
                BIG,
            ]
            flat[i] = choices[rng.integers(len(choices))]
        path = write_zip(tmp_path / f"m{seed}.npz", members_of(meta, {**arrays, name: arr}))
        try:
            loaded = SequenceReplay.load(path)
        except ValueError:
            outcome["rejected"] += 1
            continue
        outcome["loaded"] += 1
        exercise(loaded)
    OUTCOMES["random rejected"] += outcome["rejected"]
    OUTCOMES["random loaded"] += outcome["loaded"]
    print(f"\nrandom mutations (seed {seed}): {dict(outcome)}")


def test_crafted_window_table_cannot_crash_the_process(tmp_path: Path) -> None:
    """Issue 11 item 1: out-of-range window values (valid CRCs) loaded, then sample() aborted the process
    with heap corruption. Run in a child process, so that a crash is a failed test and not a dead run."""
    code = f"""
import sys, json
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT)!r}]
import numpy as np
from pathlib import Path
from helpers import busy_replay, rewrite
from burnin.replay import SequenceReplay
good = Path({str(tmp_path / "good.npz")!r})
busy_replay().save(good)
results = []
for col, value in [(2, 100000), (1, -100000), (0, -5000000000), (1, 10**9), (2, -3), (4, 2**62)]:
    def change(a, col=col, value=value):
        w = a["windows"].copy()
        w[np.flatnonzero(a["window_alive"]), col] = value
        a["windows"] = w
    bad = rewrite(good, Path({str(tmp_path)!r}) / f"bad{{col}}.npz", change)
    try:
        replay = SequenceReplay.load(bad)
    except ValueError as err:
        results.append("refused")
        continue
    replay.sample(64)
    results.append("loaded and sampled")
print(json.dumps(results))
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, f"the child died (returncode {proc.returncode}): {proc.stderr[-1500:]}"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["refused"] * 6


# -- crafted-checkpoint regressions named by the issue (item 9) --------------------------------


def test_terabyte_header_is_a_value_error_not_a_memory_error(
    good_checkpoint: tuple[SequenceReplay, Path], tmp_path: Path
) -> None:
    _, good = good_checkpoint
    meta, arrays = read_raw(good)
    members = [
        (n, npy_header((2**40, 8), "<f8") if n == "step_reward.npy" else d, c)
        for n, d, c in members_of(meta, arrays)
    ]
    with pytest.raises(
        ValueError, match=r"array 'step_reward' is float64 \(1099511627776, 8\), expected float32"
    ):
        SequenceReplay.load(write_zip(tmp_path / "tb.npz", members))
    with pytest.raises(ValueError, match=r"config declares \d+ bytes of arrays, more than max_bytes=1000"):
        SequenceReplay.load(good, max_bytes=1000)
    with pytest.raises(TypeError, match="max_bytes: expected an int, got str"):
        SequenceReplay.load(good, max_bytes="1e9")
    # A config that declares terabytes (with headers to match) is refused before anything is allocated.
    meta["config"]["lane_capacity"] = 10**12
    with pytest.raises(ValueError, match=r"config declares \d+ bytes of arrays, more than max_bytes"):
        SequenceReplay.load(write_zip(tmp_path / "tb2.npz", members_of(meta, arrays)))


def zip_raw(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip written by hand: (name, payload as stored, method, crc32, uncompressed size) per member."""
    out, central = bytearray(), bytearray()
    for name, payload, method, crc, size in members:
        offset = len(out)
        fields = struct.pack("<HHHHHIII", 20, 0, method, 0, 0x21, crc, len(payload), size)
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name.encode() + payload
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields
        central += struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, offset) + name.encode()
    end = struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0
    )
    path.write_bytes(bytes(out + central + end))
    return path


def test_member_inflating_to_a_gigabyte_is_refused_before_inflating(
    good_checkpoint: tuple[SequenceReplay, Path], tmp_path: Path
) -> None:
    """Issue 11 item 9: a member that inflates to 1 GB was inflated before its shape was checked."""
    _, good = good_checkpoint
    meta, arrays = read_raw(good)
    gib = 1 << 30
    header = npy_header((gib // 4,), "<f4")
    # 1 GiB of zeros as ~1 MB of deflate: one fully flushed block of 16 MiB of zeros, repeated.
    block = bytes(1 << 24)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    payload = first + zeros * 64 + zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    for _ in range(64):
        crc = zlib.crc32(block, crc)
    members = []
    for name, data, _ in members_of(meta, arrays):
        if name == "step_reward.npy":
            members.append((name, payload, 8, crc, gib + len(header)))
        else:
            members.append((name, data, 0, zlib.crc32(data), len(data)))
    path = zip_raw(tmp_path / "bomb.npz", members)
    assert path.stat().st_size < 3 << 20
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(
            ValueError, match=r"array 'step_reward' is float32 \(268435456,\), expected float32 \(3, 12\)"
        ):
            SequenceReplay.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB: the member was inflated"
    assert time.perf_counter() - start < 5.0


def test_max_priority_and_registry_are_checked(
    good_checkpoint: tuple[SequenceReplay, Path], tmp_path: Path
) -> None:
    """Issue 11 item 9: max_priority NaN or negative and registry lanes out of range or negative loaded."""
    _, good = good_checkpoint
    for key, value, match in [
        ("max_priority", float("nan"), "max_priority: expected a finite number >= 1"),
        ("max_priority", -2.0, "max_priority: expected a finite number >= 1"),
        ("registry", {"remote": [7]}, r"registry: owner 'remote' holds lane 7, outside \[0, 3\)"),
        ("registry", {"remote": [-1]}, r"registry: owner 'remote' holds lane -1, outside \[0, 3\)"),
    ]:
        meta, arrays = read_raw(good)
        meta[key] = value
        with pytest.raises(ValueError, match=match):
            SequenceReplay.load(write_zip(tmp_path / "bad.npz", members_of(meta, arrays)))


def test_a_killed_save_leaves_a_temp_that_the_next_save_removes(tmp_path: Path) -> None:
    """Issue 11 item 10 (replay): a save killed with SIGKILL left its temp file for ever."""
    code = f"""
import os, sys, signal
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT)!r}]
import numpy as np
from helpers import busy_replay
replay = busy_replay()
real, calls = np.lib.format.write_array, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    real(*args, **kwargs)
np.lib.format.write_array = dying
replay.save({str(tmp_path / "replay.npz")!r})
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-1000:]
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".replay.npz.") and left[0].endswith(".tmp"), left
    busy_replay().save(tmp_path / "replay.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.npz"]


def test_second_interrupt_during_the_cleanup_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save fails, and a real SIGINT (Ctrl-C) arrives while its temp file is being removed: the removal
    still happens (the interrupt is held back until then), and the interrupt is raised after it."""
    replay = busy_replay()
    real_write, real_unlink = np.lib.format.write_array, Path.unlink
    calls = {"n": 0}

    def failing_write(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real_write(*args, **kwargs)

    def interrupted_unlink(self: Path, missing_ok: bool = False) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    monkeypatch.setattr(Path, "unlink", interrupted_unlink)
    with pytest.raises(KeyboardInterrupt):
        replay.save(tmp_path / "replay.npz")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_a_save_stops_it_and_removes_the_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real SIGINT in the middle of writing: the save stops at its next write, cleans up, and raises."""
    replay = busy_replay()
    real, calls = np.lib.format.write_array, {"n": 0}

    def signalling(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", signalling)
    with pytest.raises(KeyboardInterrupt):
        replay.save(tmp_path / "replay.npz")
    assert calls["n"] <= 4  # stopped promptly, not after writing every array
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------------------
# Values that are finite in the caller's dtype but not as stored, and extreme priorities.
# ---------------------------------------------------------------------------------------------


def test_priority_overflow_to_inf_is_refused_before_anything_changes() -> None:
    """Issue 11 item 3: alpha=2 and a priority of 1e200 put an inf leaf in the tree; later samples had
    probability 0 and NaN weights."""
    replay = replay_for(S2, lanes=2, alpha=2.0)
    play(replay, [f"0:{i} 1:{100 + i}" for i in range(1, 12)])
    keys = replay.live_keys()
    before = snapshot(replay)
    priorities = np.ones(keys.size)
    priorities[-1] = 1e200
    with pytest.raises(
        ValueError,
        match=r"priorities: expected priority\*\*alpha \(alpha=2.0\) > 0 and <= .* got priorities \[1e\+200\]",
    ):
        replay.update_priorities(keys, priorities)
    assert_same(before, snapshot(replay))
    # Largest priorities that are accepted keep sampling sane, even when new windows start at them.
    limit = (np.finfo(np.float64).max / 2 / replay._num_slots) ** 0.5
    replay.update_priorities(keys[-1:], [limit * 0.999])
    play(replay, ["0:50 1:150", "0:51 1:151", "0:52 1:152"])
    replay.check_invariants()
    batch = replay.sample(256)
    assert np.isfinite(replay.stats()["total_priority"])
    assert np.isfinite(batch.weights).all() and (batch.probabilities > 0).all()
    # A positive priority so small that priority**alpha underflows to 0 would never be sampled.
    with pytest.raises(ValueError, match=r"got priorities \[1e-200\]"):
        replay.update_priorities(keys[:1], [1e-200])


def stored_overflow_calls() -> list[tuple[str, Callable[[SequenceReplay], Any], str]]:
    big = np.array([[1.0], [1e39]])
    state = state_of(np.array([1, 2]))
    big_state = ((state[0][0].astype(np.float64) * np.array([[1.0], [1e39]]), state[0][1]),)
    return [
        ("observation", lambda r: r.add([0, 1], **{**ADD, "observation": big, "terminated": np.zeros(2, bool)}),
         r"observation: expected values within float32's range \(\|x\| <= 3.4028235e\+38\), got \[1e\+39\] in rows \[1\]"),
        ("reward", lambda r: r.add([0, 1], **{**ADD, "reward": np.array([1e39, 0.0]), "terminated": np.zeros(2, bool)}),
         r"reward: expected values within float32's range .* got \[1e\+39\] in rows \[0\]"),
        ("kept state", lambda r: r.add([0, 1], **{**ADD, "states": big_state, "terminated": np.zeros(2, bool)}),
         r"states\[0\]\[0\]: expected values within float32's range .* in the rows kept now, at lanes \[1\]"),
        ("update_states", lambda r: r.update_states(r.live_keys()[:2], [2], (big_state,)),
         r"states\[0\]\[0\]\[0\]: expected values within float32's range .* in rows \[1\]"),
        ("float16 observation", None, ""),
    ]  # fmt: skip


@pytest.mark.parametrize("case", [c for c in stored_overflow_calls() if c[1] is not None], ids=lambda c: c[0])
def test_values_beyond_float32_are_refused_as_stored(
    case: tuple[str, Callable[[SequenceReplay], Any], str],
) -> None:
    """Issue 11 item 4: finite float64 values beyond float32 were stored as inf."""
    _, call, match = case
    replay = replay_for(S2, lanes=2)
    play(replay, ["0:1 1:11", "0:2 1:12", "0:3 1:13"])  # the next add keeps states in both lanes
    before = snapshot(replay)
    with pytest.raises(ValueError, match=match):
        call(replay)
    assert_same(before, snapshot(replay))


def test_float16_states_are_stored_and_their_overflow_is_refused() -> None:
    replay = SequenceReplay(S2, num_lanes=1, lane_capacity=16, obs_shape=(1,), row_state_shapes=(((2,),),),
                            state_dtype=np.float16, seed=0)  # fmt: skip
    step = {
        "observation": [[1.0]],
        "action": [0],
        "reward": [0.0],
        "terminated": [False],
        "truncated": [False],
    }
    replay.add([0], **step, states=((np.array([[9.0, 0.5]]),),))  # episode step 0; step 1 keeps its state
    before = fingerprint(replay)
    with pytest.raises(
        ValueError,
        match=r"states\[0\]\[0\]: expected values within float16's range \(\|x\| <= 65504\), got \[70000.0\]",
    ):
        replay.add([0], **step, states=((np.array([[1.0, 70000.0]]),),))
    assert fingerprint(replay) == before
    for i in range(1, 7):
        replay.add([0], **step, states=((np.array([[i, 0.5]]),),))
    batch = replay.sample(4)
    assert batch.state[0][0].dtype == np.float16
    assert set(batch.state[0][0][~(batch.state[0][0] == 0).all(axis=1), 1].tolist()) <= {0.5}
    replay.check_invariants()


def test_float_observations_other_than_float32_and_float64_are_refused() -> None:
    """Found beyond the list: float16 observations were accepted, then every add failed inside numba."""
    with pytest.raises(
        TypeError, match="obs_dtype: expected float32 or float64 for floating observations, got float16"
    ):
        SequenceReplay(
            S2, num_lanes=1, lane_capacity=16, obs_shape=(2,), obs_dtype=np.float16, row_state_shapes=()
        )


def test_non_native_byte_order_is_stored_natively() -> None:
    """Found beyond the list: obs_dtype='>f4' was accepted, then every add failed inside numba."""
    replay = SequenceReplay(
        S2, num_lanes=1, lane_capacity=16, obs_shape=(1,), obs_dtype=">f4", row_state_shapes=()
    )
    assert replay.config.obs_dtype == np.dtype("<f4") or replay.config.obs_dtype.isnative
    for i in range(6):
        replay.add(
            [0],
            observation=np.array([[i]], ">f4"),
            action=[0],
            reward=[0.0],
            terminated=[False],
            truncated=[False],
        )
    assert replay.sample(3).observation.dtype.isnative


# -- small ones (item 13) -------------------------------------------------------------------


def test_uint64_keys_and_lanes_are_printed_as_given() -> None:
    replay = replay_for(S2, lanes=2)
    play(replay, ["0:1", "0:2", "0:3"])
    huge = np.array([2**64 - 5], np.uint64)
    with pytest.raises(
        ValueError, match=r"keys: expected window keys <= 9223372036854775807, got \[18446744073709551611\]"
    ):
        replay.update_priorities(huge, [1.0])
    with pytest.raises(
        ValueError, match=r"lanes: expected lane ids <= 9223372036854775807, got \[18446744073709551611\]"
    ):
        replay.close_lanes(huge)


def test_update_states_refuses_integer_states() -> None:
    replay = replay_for(S2, lanes=2)
    play(replay, [f"0:{i}" for i in range(1, 8)])
    keys = replay.live_keys()[:2]
    ints = ((np.ones((2, 2), np.int64), np.ones((2, 3), np.int64)),)
    before = snapshot(replay)
    with pytest.raises(TypeError, match=r"states\[0\]\[0\]\[0\]: expected a floating array, got dtype int64"):
        replay.update_states(keys, [2], (ints,))
    assert_same(before, snapshot(replay))
