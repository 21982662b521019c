"""Tests of SequenceReplay checkpoints (round trip, corruption, failed writes) and of concurrent use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import S2, assert_same, busy_replay, play, replay_for, rewrite, snapshot, state_of

from burnin.replay import FORMAT_VERSION, SequenceBatch, SequenceReplay


def assert_nested_equal(x: Any, y: Any, name: str) -> None:
    if isinstance(x, np.ndarray):
        np.testing.assert_array_equal(x, y, err_msg=name)
        assert x.dtype == y.dtype, name
    else:
        assert len(x) == len(y), name
        for xi, yi in zip(x, y):
            assert_nested_equal(xi, yi, name)


def assert_batches_equal(a: SequenceBatch, b: SequenceBatch) -> None:
    for name, x, y in zip(a._fields, a, b):
        assert_nested_equal(x, y, name)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    replay = busy_replay()
    path = tmp_path / "replay.npz"
    replay.save(path)
    loaded = SequenceReplay.load(path)
    assert_same(snapshot(replay), snapshot(loaded))
    assert loaded.stats() == replay.stats()
    assert loaded.config == replay.config
    assert {k: v.tolist() for k, v in loaded.registered_lanes.items()} == {"remote": [2]}
    # The next sample after load equals the next sample without the save, and so does
    # everything after more writes and updates.
    for _ in range(2):
        assert_batches_equal(
            replay.sample(16, extra_state_offsets=[0, 2]), loaded.sample(16, extra_state_offsets=[0, 2])
        )
        for r in (replay, loaded):
            play(r, ["0:500 1:600", "0:501 1:601"])
            b = r.sample(4)
            r.update_priorities(b.keys, np.full(4, 2.5))
    assert_same(snapshot(replay), snapshot(loaded))
    assert not list(tmp_path.glob(".*.tmp"))


def test_round_trip_with_other_bit_generators_and_no_state(tmp_path: Path) -> None:
    for bit_generator in (np.random.MT19937, np.random.Philox):
        replay = SequenceReplay(
            S2, num_lanes=1, lane_capacity=16, obs_shape=(2, 2), obs_dtype=np.uint8, row_state_shapes=(),
            rng=np.random.Generator(bit_generator(11)),
        )  # fmt: skip
        for i in range(10):
            replay.add([0], observation=np.full((1, 2, 2), i, np.uint8), action=[i], reward=[0.0],
                       terminated=[False], truncated=[False])  # fmt: skip
        replay.save(tmp_path / "r.npz")
        loaded = SequenceReplay.load(tmp_path / "r.npz")
        assert type(loaded._rng.bit_generator) is bit_generator
        assert_batches_equal(replay.sample(5), loaded.sample(5))


def corrupt_copies(path: Path, tmp_path: Path) -> dict[str, Path]:
    data = path.read_bytes()
    out = {}
    out["truncated"] = tmp_path / "truncated.npz"
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["empty"] = tmp_path / "empty.npz"
    out["empty"].write_bytes(b"")
    flipped = bytearray(data)
    # Flip bytes inside the first stored array (past the zip and .npy headers): the CRC no longer matches.
    offset = data.index(b"step_observation.npy") + 300
    for i in range(offset, offset + 16):
        flipped[i] ^= 0xFF
    out["flipped"] = tmp_path / "flipped.npz"
    out["flipped"].write_bytes(bytes(flipped))
    out["garbage"] = tmp_path / "garbage.npz"
    out["garbage"].write_bytes(b"not a checkpoint at all" * 10)
    out["npy"] = tmp_path / "single.npy"
    np.save(out["npy"], np.zeros(3))
    return out


def test_corrupt_files_give_clear_errors(tmp_path: Path) -> None:
    replay = busy_replay()
    path = tmp_path / "good.npz"
    replay.save(path)
    for kind, bad in corrupt_copies(path, tmp_path).items():
        with pytest.raises(
            ValueError, match=r"checkpoint .* (truncated or corrupt|not a SequenceReplay)"
        ) as info:
            SequenceReplay.load(bad)
        assert str(bad) in str(info.value), kind

    def set_version(arrays: dict[str, np.ndarray]) -> None:
        meta = json.loads(str(arrays["meta"][()]))
        meta["format_version"] = FORMAT_VERSION + 1
        arrays["meta"] = np.array(json.dumps(meta))

    wrong = rewrite(path, tmp_path / "v2.npz", set_version)
    with pytest.raises(
        ValueError, match=rf"format version {FORMAT_VERSION + 1}, but this burnin reads version 1"
    ):
        SequenceReplay.load(wrong)

    def drop_tree(arrays: dict[str, np.ndarray]) -> None:
        del arrays["tree"]

    with pytest.raises(ValueError, match="array 'tree' is missing"):
        SequenceReplay.load(rewrite(path, tmp_path / "no_tree.npz", drop_tree))

    def reshape_steps(arrays: dict[str, np.ndarray]) -> None:
        arrays["step_action"] = arrays["step_action"][:, :-1]

    with pytest.raises(ValueError, match=r"array 'step_action' is int32 \(3, 11\), expected int32 \(3, 12\)"):
        SequenceReplay.load(rewrite(path, tmp_path / "shape.npz", reshape_steps))

    def bump_priority(arrays: dict[str, np.ndarray]) -> None:
        arrays["tree"] = arrays["tree"].copy()
        arrays["tree"][-1] += 1.0  # 45 window slots in a 64-leaf tree: a padding leaf

    with pytest.raises(ValueError, match="padding leaves past capacity must be 0"):
        SequenceReplay.load(rewrite(path, tmp_path / "tree.npz", bump_priority))

    def kill_window(arrays: dict[str, np.ndarray]) -> None:
        arrays["window_alive"] = np.zeros_like(arrays["window_alive"])

    with pytest.raises(ValueError, match="is corrupt: window_alive: disagrees with the lane table"):
        SequenceReplay.load(rewrite(path, tmp_path / "alive.npz", kill_window))

    with pytest.raises(FileNotFoundError):
        SequenceReplay.load(tmp_path / "missing.npz")


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_failed_save_leaves_the_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    replay = busy_replay()
    path = tmp_path / "replay.npz"
    replay.save(path)
    good = path.read_bytes()
    play(replay, ["0:700 1:800"])  # the next save would differ
    if fail_at == "write":
        # Die after the first arrays have gone out, as a kill or a full disk would.
        real = np.lib.format.write_array
        calls = {"n": 0}

        def failing_write(*args: Any, **kwargs: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 4:
                raise OSError(28, "No space left on device")
            real(*args, **kwargs)

        monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    elif fail_at == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    else:
        monkeypatch.setattr(
            os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(13, "Permission denied"))
        )
    with pytest.raises(OSError):
        replay.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.npz"]
    loaded = SequenceReplay.load(path)
    assert loaded.stats()["steps_added"] == replay.stats()["steps_added"] - 2


# -- threads ------------------------------------------------------------------------------


def writer_stream(lanes: np.ndarray, steps: int, seed: int) -> list[dict[str, Any]]:
    """Adds for one writer's lanes: episodes of random length, final observations after every end."""
    rng = np.random.default_rng(seed)
    pending = np.zeros(lanes.size, bool)
    calls = []
    for t in range(steps):
        ends = (rng.random(lanes.size) < 0.05) & ~pending
        term = ends & (rng.random(lanes.size) < 0.5)
        ids = (lanes * 100_000 + t).astype(np.float32)
        calls.append({
            "lanes": lanes, "observation": ids[:, None], "action": lanes + t, "reward": ids / 7,
            "terminated": term, "truncated": ends & ~term, "states": state_of(ids),
        })  # fmt: skip
        pending = ends
    return calls


def test_threads_write_sample_update_and_save_concurrently(tmp_path: Path) -> None:
    spec_kwargs = {"lanes": 6, "capacity": 60}
    replay = replay_for(S2, **spec_kwargs)
    writers = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    streams = [writer_stream(lanes, 400, seed) for seed, lanes in enumerate(writers)]
    errors: list[BaseException] = []
    done = threading.Event()

    def write(calls: list[dict[str, Any]]) -> None:
        try:
            for call in calls:
                replay.add(call["lanes"], **{k: v for k, v in call.items() if k != "lanes"})
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    def learn() -> None:
        rng = np.random.default_rng(9)
        try:
            while not done.is_set():
                if replay.num_sampleable == 0:
                    time.sleep(0.001)
                    continue
                batch = replay.sample(16, extra_state_offsets=[2])
                replay.update_priorities(batch.keys, rng.random(16) + 0.1)
                replay.update_states(batch.keys, [2], (batch.extra_states[0],))
                assert batch.valid_t[:, 1:].sum() > 0
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    def checkpoint() -> None:
        try:
            for i in range(3):
                replay.save(tmp_path / f"ckpt{i}.npz")
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(s,)) for s in streams]
    learners = [threading.Thread(target=learn), threading.Thread(target=checkpoint)]
    for t in learners + threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in learners:
        t.join()
    assert not errors, errors
    replay.check_invariants()
    for i in range(3):
        SequenceReplay.load(tmp_path / f"ckpt{i}.npz").check_invariants()

    # Lanes are private to their writer, so the steps and windows must be exactly those of a
    # serial run of the same streams (priorities differ: the learner thread updated them).
    serial = replay_for(S2, **spec_kwargs)
    for calls in streams:
        for call in calls:
            serial.add(call["lanes"], **{k: v for k, v in call.items() if k != "lanes"})
    a, b = snapshot(replay), snapshot(serial)
    # update_states wrote back the states it had read, and skipped any overwritten meanwhile,
    # so the stored states match too.
    assert_same(a, b, except_names=("tree", "counters", "max_priority", "rng"))
    assert replay.stats()["steps_added"] == 3 * 2 * 400


# -- benchmark ----------------------------------------------------------------------------


def test_benchmark_quick_run_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.replay_throughput", "--quick", "--json", str(out)],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "naive ÷ ours" in proc.stdout
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["lanes"] == 64 and report["batch"] == 64
    assert report["spec"] == {"burn_in": 40, "unroll": 80, "period": 40, "n_step": 5}
    assert [r["obs_shape"] for r in report["results"]] == [[4], [64], [84, 84, 1]]
    assert [r["obs_dtype"] for r in report["results"]] == ["float32", "float32", "uint8"]
    figures = {"add_steps_per_s", "sample_update_per_s", "bytes_per_step"}
    for result in report["results"]:
        assert figures | {
            "raw_step_bytes",
            "bytes_per_step_target",
            "naive",
            "copy_ratio",
            "meets_targets",
        } <= set(result)
        assert set(result["naive"]) == figures and set(result["copy_ratio"]) == figures
        assert all(result[k] > 0 for k in figures)
        # Storing each step once must beat copying every window on memory, whatever the timing noise.
        assert result["copy_ratio"]["bytes_per_step"] > 1.5
        assert result["meets_targets"]["bytes_per_step"]
