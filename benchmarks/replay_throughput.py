"""Replay throughput and memory: SequenceReplay against a naive copy-every-window buffer, side by side."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from burnin.replay import SequenceReplay, SequenceSpec
from burnin.sumtree import SumTree

SPEC = SequenceSpec(burn_in=40, unroll=80, period=40, n_step=5)
LANES = 64
BATCH = 64
LSTM = (((512,), (512,)),)
TARGETS = {"add_steps_per_s": 1_000_000.0, "sample_update_per_s": 3000.0}


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration."""

    name: str
    """Row label."""
    obs_shape: tuple[int, ...]
    """Observation shape."""
    row_state_shapes: tuple[tuple[tuple[int, ...], ...], ...]
    """Recurrent state shapes kept by the buffer."""
    obs_dtype: str = "float32"
    """Stored observation dtype (Atari frames: uint8, as the agent stores them)."""
    max_lane_capacity: int | None = None
    """Cap on the steps per lane (frames are 7 KB: the naive buffer's copies would not fit in memory)."""


WORKLOADS = (
    Workload("obs f32[4], LSTM(512)", (4,), LSTM),
    Workload("obs f32[64], LSTM(512)", (64,), LSTM),
    Workload("obs u8[84,84,1], LSTM", (84, 84, 1), LSTM, obs_dtype="uint8", max_lane_capacity=512),
)
"""The third is an Atari frame after the usual preprocessing (84×84 grey, no frame stack)."""


class NaiveWindowReplay:
    """Baseline: each window is copied out in full when it is complete, as several R2D2 ports do.

    Same windows, fields, sum-tree and keys as SequenceReplay, but every window
    holds its own copy of its L steps (and its stored state), so each step is
    stored about L / period times. Lanes stage their open episode's last L + 1
    steps; padding and masks are materialised when a window is copied.
    """

    def __init__(self, spec: SequenceSpec, *, num_lanes: int, num_windows: int, obs_shape: tuple[int, ...],
                 row_state_shapes: tuple[tuple[tuple[int, ...], ...], ...], alpha: float, beta: float, seed: int,
                 obs_dtype: str = "float32") -> None:  # fmt: skip
        L = spec.length
        self.spec, self.alpha, self.beta = spec, alpha, beta
        self.num_windows = num_windows
        self.rng = np.random.default_rng(seed)
        self.shapes = [s for layer in row_state_shapes for s in layer]
        self.win = {
            "observation": np.zeros((num_windows, L, *obs_shape), obs_dtype),
            "action": np.zeros((num_windows, L), np.int32),
            "reward": np.zeros((num_windows, L), np.float32),
            "discount": np.zeros((num_windows, L), np.float32),
            "prev_action": np.zeros((num_windows, L), np.int32),
            "prev_reward": np.zeros((num_windows, L), np.float32),
            "valid_t": np.zeros((num_windows, L), bool),
            "learn_mask": np.zeros((num_windows, L), bool),
            "terminal": np.zeros((num_windows, L), bool),
        }
        self.win_states = [np.zeros((num_windows, *s), np.float32) for s in self.shapes]
        self.gen = np.zeros(num_windows, np.int64)
        self.tree = SumTree(num_windows)
        self.written = 0
        self.max_priority = 1.0
        S = L + 1  # staging ring per lane, indexed by episode step
        self.stage_len = S
        self.st_obs = np.zeros((num_lanes, S, *obs_shape), obs_dtype)
        self.st_act = np.zeros((num_lanes, S), np.int32)
        self.st_rew = np.zeros((num_lanes, S), np.float32)
        self.st_term = np.zeros((num_lanes, S), bool)
        self.st_final = np.zeros((num_lanes, S), bool)
        R = -(-L // spec.period) + 2  # staged states, indexed by window number k
        self.st_states = [np.zeros((num_lanes, R, *s), np.float32) for s in self.shapes]
        self.ep_step = np.zeros(num_lanes, np.int64)
        self.pending = np.zeros(num_lanes, bool)
        self.pending_term = np.zeros(num_lanes, bool)
        self.next_k = np.zeros(num_lanes, np.int64)

    def nbytes(self) -> int:
        arrays = [*self.win.values(), *self.win_states, self.gen, self.st_obs, self.st_act, self.st_rew,
                  self.st_term, self.st_final, *self.st_states]  # fmt: skip
        return sum(a.nbytes for a in arrays) + self.tree.nbytes

    def stored_steps(self) -> int:
        """Distinct environment steps the stored windows represent: period new steps per window."""
        return min(self.written, self.num_windows) * self.spec.period

    def add(self, lanes: np.ndarray, *, observation, action, reward, terminated, truncated, states) -> None:
        spec, S = self.spec, self.stage_len
        b, P = spec.burn_in, spec.period
        final = self.pending[lanes]
        e = self.ep_step[lanes]
        idx = e % S
        self.st_obs[lanes, idx] = observation
        self.st_act[lanes, idx] = np.where(final, 0, action)
        self.st_rew[lanes, idx] = np.where(final, 0, reward)
        self.st_term[lanes, idx] = terminated & ~final
        self.st_final[lanes, idx] = final
        keep = ~final & ((e + b) % P == 0)
        if keep.any():
            rows = np.flatnonzero(keep)
            k = (e[rows] + b) // P
            for buf, arr in zip(self.st_states, (a for layer in states for a in layer)):
                buf[lanes[rows], k % buf.shape[1]] = arr[rows]
        c = e - (spec.unroll + spec.n_step - 1)
        comp = ~final & (c >= 0) & (c % P == 0)
        if comp.any():
            cl = lanes[comp]
            k = c[comp] // P
            self.next_k[cl] = k + 1
            self._copy_windows(cl, k, np.full(cl.size, spec.length), final_step=None)
        if final.any():
            for lane, T in zip(lanes[final], e[final]):
                K = (T - 1) // P if T >= 1 else -1
                ks = np.arange(self.next_k[lane], K + 1)
                if ks.size:
                    right = np.minimum(T - (ks * P - b) + 1, spec.length)
                    self._copy_windows(np.full(ks.size, lane), ks, right, final_step=T)
            self.ep_step[lanes[final]] = 0
            self.next_k[lanes[final]] = 0
            self.ep_step[lanes[~final]] += 1
        else:
            self.ep_step[lanes] += 1
        self.pending[lanes] = (terminated | truncated) & ~final
        self.pending_term[lanes] = terminated & ~final

    def _copy_windows(
        self, lanes: np.ndarray, k: np.ndarray, right: np.ndarray, final_step: int | None
    ) -> None:
        spec, S = self.spec, self.stage_len
        b, u, P, L = spec.burn_in, spec.unroll, spec.period, spec.length
        m = lanes.size
        sp = k * P - b
        ar = np.arange(L)
        e = sp[:, None] + ar
        mask = (e >= 0) & (ar < right[:, None])
        idx = e % S
        rows = (self.written + np.arange(m)) % self.num_windows
        lanes2 = lanes[:, None]
        w = self.win
        obs_mask = mask.reshape(mask.shape + (1,) * (self.st_obs.ndim - 2))  # [n, L, 1, ...] for any obs rank
        w["observation"][rows] = np.where(obs_mask, self.st_obs[lanes2, idx], 0)
        act = np.where(mask, self.st_act[lanes2, idx], 0)
        rew = np.where(mask, self.st_rew[lanes2, idx], 0)
        final = mask & self.st_final[lanes2, idx]
        w["action"][rows], w["reward"][rows], w["valid_t"][rows] = act, rew, mask
        w["discount"][rows] = mask & ~final & ~self.st_term[lanes2, idx]
        prev_ok = mask & (e > 0)
        w["prev_action"][rows] = np.where(prev_ok, self.st_act[lanes2, (e - 1) % S], 0)
        w["prev_reward"][rows] = np.where(prev_ok, self.st_rew[lanes2, (e - 1) % S], 0)
        w["learn_mask"][rows] = mask & ~final & (ar >= b) & (ar < b + u)
        w["terminal"][rows] = final & self.pending_term[lanes][:, None]
        for buf, st in zip(self.win_states, self.st_states):
            buf[rows] = np.where(
                (sp >= 0).reshape(-1, *([1] * (buf.ndim - 1))), st[lanes, k % st.shape[1]], 0
            )
        self.gen[rows] += 1
        self.tree.update(rows, np.full(m, self.max_priority**self.alpha))
        self.written += m

    def sample(self, batch_size: int) -> SimpleNamespace:
        total = self.tree.total()
        rows = self.tree.find(self.rng.random(batch_size) * total)
        out = {name: arr[rows] for name, arr in self.win.items()}
        out["states"] = [buf[rows] for buf in self.win_states]
        prob = self.tree.values(rows) / total
        weights = (min(self.written, self.num_windows) * prob) ** -self.beta
        out["weights"] = (weights / weights.max()).astype(np.float32)
        out["keys"] = self.gen[rows] * self.num_windows + rows
        return SimpleNamespace(**out)

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        rows = keys % self.num_windows
        live = self.gen[rows] == keys // self.num_windows
        self.tree.update(rows[live], priorities[live] ** self.alpha)
        self.max_priority = max(self.max_priority, float(priorities[live].max(initial=0.0)))


class Stream:
    """A pre-generated actor stream for LANES lanes: episodes of mean length 400, with final observations."""

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        row_state_shapes: Any,
        steps: int,
        seed: int,
        obs_dtype: str = "float32",
    ) -> None:
        rng = np.random.default_rng(seed)
        if np.dtype(obs_dtype).kind == "f":
            self.obs = rng.standard_normal((16, LANES, *obs_shape)).astype(obs_dtype)
        else:
            self.obs = rng.integers(0, 256, (16, LANES, *obs_shape)).astype(obs_dtype)
        self.action = rng.integers(0, 4, (16, LANES))
        self.reward = rng.standard_normal((16, LANES)).astype(np.float32)
        self.states = [
            tuple(
                tuple(rng.standard_normal((LANES, *s)).astype(np.float32) for s in layer)
                for layer in row_state_shapes
            )
            for _ in range(4)
        ]
        ends = rng.random((steps, LANES)) < 1 / 400
        ends[1:] &= ~ends[:-1]  # the add after an end carries the final observation
        self.terminated = ends & (rng.random((steps, LANES)) < 0.5)
        self.truncated = ends & ~self.terminated
        self.steps = steps
        self.lanes = np.arange(LANES)

    def feed(self, replay: Any, start: int, count: int) -> None:
        for t in range(start, start + count):
            i = t % self.steps
            replay.add(
                self.lanes, observation=self.obs[i % 16], action=self.action[i % 16], reward=self.reward[i % 16],
                terminated=self.terminated[i], truncated=self.truncated[i], states=self.states[i % 4],
            )  # fmt: skip


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_workload(w: Workload, *, lane_capacity: int, rounds: int, adds: int, samples: int) -> dict[str, Any]:
    P = SPEC.period
    lane_capacity = min(lane_capacity, w.max_lane_capacity or lane_capacity)
    ours = SequenceReplay(SPEC, num_lanes=LANES, lane_capacity=lane_capacity, obs_shape=w.obs_shape,
                          obs_dtype=w.obs_dtype, row_state_shapes=w.row_state_shapes, seed=0)  # fmt: skip
    naive = NaiveWindowReplay(SPEC, num_lanes=LANES, num_windows=LANES * -(-lane_capacity // P), obs_shape=w.obs_shape,
                              row_state_shapes=w.row_state_shapes, alpha=0.9, beta=0.6, seed=0, obs_dtype=w.obs_dtype)  # fmt: skip
    fill = lane_capacity + 2 * SPEC.length
    stream = Stream(
        w.obs_shape, w.row_state_shapes, steps=fill + rounds * adds + 1, seed=1, obs_dtype=w.obs_dtype
    )
    for buf in (ours, naive):  # fill to steady state (and compile the kernels)
        stream.feed(buf, 0, fill)
    rng = np.random.default_rng(2)
    prios = rng.random((64, BATCH)) + 0.05

    def sample_update(buf: Any) -> None:
        for i in range(samples):
            buf.update_priorities(buf.sample(BATCH).keys, prios[i % 64])

    sample_update(ours)
    sample_update(naive)
    times: dict[str, dict[str, list[float]]] = {name: {"add": [], "sample": []} for name in ("ours", "naive")}
    position = fill
    for r in range(rounds):
        order = [("ours", ours), ("naive", naive)] if r % 2 == 0 else [("naive", naive), ("ours", ours)]
        for name, buf in order:
            times[name]["add"].append(timed(lambda buf=buf, at=position: stream.feed(buf, at, adds)))
        position += adds
        for name, buf in order:
            times[name]["sample"].append(timed(lambda buf=buf: sample_update(buf)))

    state_bytes = sum(4 * math.prod(s) for layer in w.row_state_shapes for s in layer)
    obs_bytes = np.dtype(w.obs_dtype).itemsize * math.prod(w.obs_shape)
    raw = obs_bytes + 4 + 4 + 4 + 1 + 1  # obs, action, reward, discount, terminated, truncated
    target_bytes = 1.1 * raw + state_bytes / P

    def figures(name: str, nbytes: int, steps: int) -> dict[str, float]:
        return {
            "add_steps_per_s": LANES * adds / statistics.median(times[name]["add"]),
            "sample_update_per_s": samples / statistics.median(times[name]["sample"]),
            "bytes_per_step": nbytes / steps,
        }

    mine = figures("ours", ours.nbytes(), ours.num_steps)
    base = figures("naive", naive.nbytes(), naive.stored_steps())
    # The floor for sampling: copying one batch's observations out of random windows.
    obs = ours._arrays["step_observation"].reshape(LANES * lane_capacity, -1)
    starts = rng.integers(0, obs.shape[0] - SPEC.length, (samples, BATCH))

    def copy_only() -> None:
        for row in starts:
            out = np.empty((BATCH, SPEC.length, obs.shape[1]), obs.dtype)
            for j, s in enumerate(row):
                out[j] = obs[s : s + SPEC.length]

    floor = samples / statistics.median(timed(copy_only) for _ in range(3))
    return {
        "workload": w.name,
        "obs_shape": list(w.obs_shape),
        "obs_dtype": w.obs_dtype,
        "lane_capacity": lane_capacity,
        "stored_steps": ours.num_steps,
        "sampleable_windows": ours.num_sampleable,
        **mine,
        "raw_step_bytes": raw,
        "state_bytes": state_bytes,
        "bytes_per_step_target": target_bytes,
        "naive": base,
        # naive ÷ ours for each figure: > 1 on bytes means the copies cost that much more memory.
        "copy_ratio": {k: base[k] / mine[k] for k in mine},
        "obs_copy_floor_per_s": floor,
        "meets_targets": {
            "add_steps_per_s": mine["add_steps_per_s"] >= TARGETS["add_steps_per_s"],
            "sample_update_per_s": mine["sample_update_per_s"] >= TARGETS["sample_update_per_s"],
            "bytes_per_step": mine["bytes_per_step"] <= target_bytes,
        },
        "stats": {k: v for k, v in ours.stats().items() if isinstance(v, int)},
    }


def table(results: list[dict[str, Any]]) -> str:
    head = f"{'workload':<24}{'buffer':<8}{'add steps/s':>14}{'sample+update/s':>17}{'bytes/step':>12}{'target':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['workload']:<24}{'ours':<8}{r['add_steps_per_s']:>14,.0f}{r['sample_update_per_s']:>17,.0f}"
            f"{r['bytes_per_step']:>12,.1f}{r['bytes_per_step_target']:>9,.1f}"
        )
        n = r["naive"]
        lines.append(
            f"{'':<24}{'naive':<8}{n['add_steps_per_s']:>14,.0f}{n['sample_update_per_s']:>17,.0f}"
            f"{n['bytes_per_step']:>12,.1f}"
        )
        c = r["copy_ratio"]
        lines.append(
            f"{'':<24}{'ratio':<8}{c['add_steps_per_s']:>14.2f}{c['sample_update_per_s']:>17.2f}"
            f"{c['bytes_per_step']:>12.2f}   (naive ÷ ours)"
        )
        lines.append(
            f"{'':<24}raw step {r['raw_step_bytes']} B, state {r['state_bytes']} B / period {SPEC.period}; "
            f"bare observation copy of a batch: {r['obs_copy_floor_per_s']:,.0f}/s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replay_throughput", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small buffer and few repeats (a few seconds, for CI)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--rounds", type=int, default=None, help="A/B rounds per workload (medians are reported)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        # 4096 steps per lane is the smallest size at which the state ring's two spare slots
        # fit the bytes_per_step target; the quick run keeps it and cuts the repeats.
        sizes = {"lane_capacity": 4096, "rounds": args.rounds or 2, "adds": 200, "samples": 40}
    else:
        sizes = {"lane_capacity": 8192, "rounds": args.rounds or 7, "adds": 2000, "samples": 400}
    results = [run_workload(w, **sizes) for w in WORKLOADS]
    report = {
        "benchmark": "replay_throughput",
        "quick": args.quick,
        "spec": {
            "burn_in": SPEC.burn_in,
            "unroll": SPEC.unroll,
            "period": SPEC.period,
            "n_step": SPEC.n_step,
        },
        "lanes": LANES,
        "batch": BATCH,
        **sizes,
        "targets": TARGETS,
        "machine": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "results": results,
    }
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
