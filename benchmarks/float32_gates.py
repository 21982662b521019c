"""HoistedLSTM's float32 gate math under mixed bf16, on and off: the r2d2-scale learner update, side by side."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.float32_gates", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds; medians are reported")
    parser.add_argument("--scale", choices=("cartpole", "r2d2"), default="r2d2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: expected >= 1, got {args.rounds}")

    from benchmarks import burnin_throughput as bt
    from burnin.layers import HoistedLSTM
    from burnin.state import stateful_layers

    scale = bt.scales("bf16", "hoisted", False)[args.scale]
    updates = {}
    for flag in (False, True):
        update = bt.make_runner_update(scale)
        # The flag is read when a call is traced, so setting it before the first update is enough.
        hoisted = [
            layer
            for model in (update.learner.online, update.learner.target)
            for layer in stateful_layers(model)
            if isinstance(layer, HoistedLSTM)
        ]
        assert hoisted, "the bf16 networks are expected to use HoistedLSTM"
        for layer in hoisted:
            layer.float32_gates = flag
        updates["float32_gates" if flag else "bf16_gates"] = update
    for update in updates.values():
        update()  # trace and warm up
        update()
    seconds: dict[str, list[float]] = {k: [] for k in updates}
    for _ in range(args.rounds):
        for name, update in updates.items():
            start = time.perf_counter()
            update()
            seconds[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    report = {
        "scale": args.scale,
        "rounds": args.rounds,
        "seconds_per_update": med,
        "updates_per_s": {k: 1.0 / v for k, v in med.items()},
        "speedup": med["bf16_gates"] / med["float32_gates"],
        "all_seconds": seconds,
    }
    print(
        f"{args.scale} learner update in mixed bf16 (HoistedLSTM), median of {args.rounds} interleaved rounds:"
    )
    for name, v in med.items():
        print(f"  {name:<14} {v:.3f} s/update  {1 / v:6.2f} updates/s")
    print(f"  float32 gates speed-up: {report['speedup']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
