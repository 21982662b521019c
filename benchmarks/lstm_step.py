"""Where an LSTM step's time goes at r2d2 scale: the recurrent matmul alone against the whole step, fp32 and bf16."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf


def make_fns(batch: int, units: int, steps: int, dtype: tf.DType) -> dict:
    """Forward passes over ``steps`` recurrent steps; the input projection is precomputed (as HoistedLSTM does)."""
    rng = np.random.default_rng(0)
    u = tf.constant(rng.standard_normal((units, 4 * units)) * 0.03, dtype)
    b = tf.constant(np.zeros(4 * units), dtype)
    xz = tf.constant(rng.standard_normal((steps, batch, 4 * units)) * 0.1, dtype)  # [T, B, 4u]
    h0 = tf.zeros((batch, units), dtype)

    @tf.function
    def matmul_only():
        h = h0
        for _ in range(steps):
            # Keeps the chain of dependent matmuls; the slice keeps shapes as in the step.
            h = tf.matmul(h, u)[:, :units] * 0.01
        return h

    @tf.function
    def matmul_bias():
        h = h0
        for t in range(steps):
            h = (xz[t] + tf.matmul(h, u) + b)[:, :units] * 0.01
        return h

    @tf.function
    def full_step():
        h, c = h0, h0
        for t in range(steps):
            z = xz[t] + tf.matmul(h, u) + b
            z_i, z_f, z_c, z_o = tf.split(z, 4, axis=1)
            c = tf.sigmoid(z_f) * c + tf.sigmoid(z_i) * tf.tanh(z_c)
            h = tf.sigmoid(z_o) * tf.tanh(c)
        return h

    fns = {"matmul": matmul_only, "matmul+input+bias": matmul_bias, "full step": full_step}
    if dtype != tf.float32:
        xz32, b32 = tf.cast(xz, tf.float32), tf.cast(b, tf.float32)

        @tf.function
        def fp32_gates():
            # Only the matmul in low precision: its output is cast up, the gate math runs in fp32.
            h, c = h0, tf.zeros((batch, units), tf.float32)
            for t in range(steps):
                z = xz32[t] + tf.cast(tf.matmul(h, u), tf.float32) + b32
                z_i, z_f, z_c, z_o = tf.split(z, 4, axis=1)
                c = tf.sigmoid(z_f) * c + tf.sigmoid(z_i) * tf.tanh(z_c)
                h = tf.cast(tf.sigmoid(z_o) * tf.tanh(c), dtype)
            return h

        fns["step, fp32 gates"] = fp32_gates
    return fns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lstm_step", description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5, help="calls timed per round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("batch", "units", "steps", "rounds", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected >= 1, got {getattr(args, name)}")

    fns = {
        (prec, name): fn
        for prec, dtype in (("fp32", tf.float32), ("bf16", tf.bfloat16))
        for name, fn in make_fns(args.batch, args.units, args.steps, dtype).items()
    }
    for fn in fns.values():
        fn().numpy()  # trace and warm up
    times: dict = {k: [] for k in fns}
    for _ in range(args.rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(args.repeats):
                fn().numpy()
            times[key].append((time.perf_counter() - start) / args.repeats / args.steps)
    med = {k: float(np.median(v)) for k, v in times.items()}
    flop = 2 * args.batch * args.units * 4 * args.units
    print(
        f"one recurrent step, B={args.batch}, units={args.units}, {args.steps} steps per call, "
        f"median of {args.rounds} interleaved rounds:"
    )
    report: dict = {"config": vars(args) | {"json": None}, "per_step_us": {}, "matmul_share": {}}
    for prec in ("fp32", "bf16"):
        full = med[(prec, "full step")]
        for name in ("matmul", "matmul+input+bias", "full step", "step, fp32 gates"):
            if (prec, name) not in med:
                continue
            t = med[(prec, name)]
            report["per_step_us"][f"{prec} {name}"] = t * 1e6
            gf = f"{flop / t / 1e9:7.1f} GFLOP/s (h@U)" if name == "matmul" else ""
            print(f"  {prec} {name:<18} {t * 1e6:8.1f} µs  {t / full:5.2f} of the step  {gf}")
        report["matmul_share"][prec] = med[(prec, "matmul")] / full
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
