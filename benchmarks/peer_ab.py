"""burnin's learner update against the same update in PyTorch, in alternating processes on this host, medians."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agents.cli import ArgumentParser, one_line, run_script
from benchmarks.timing import describe, paired

PROG = "python -m benchmarks.peer_ab"
ROOT = Path(__file__).resolve().parent.parent

# burnin's side, timed as torch_peer times its own: warm-up, then rounds of updates, nothing between them.
BURNIN_PROBE = """
import json, statistics, sys
import agents.cli
agents.cli.import_tensorflow_quietly()
agents.cli.configure_threads()
from benchmarks.burnin_throughput import make_runner_update, scales
from benchmarks.timing import rates
scale, rounds, updates, warmup = sys.argv[1], *map(int, sys.argv[2:5])
samples = rates(make_runner_update(scales("fp32", "auto", False)[scale]), rounds=rounds, updates=updates, warmup=warmup)
print(json.dumps({"updates_per_s": statistics.median(samples), "rounds": samples}))
"""


def peer_spec(scale: str) -> dict[str, Any]:
    """The workload of ``burnin_throughput``'s ``scale`` as :mod:`benchmarks.torch_peer` reads it."""
    from benchmarks.burnin_throughput import scales

    s = scales("fp32", "auto", False)[scale]
    c = s.config
    if not c.prev_action_reward or c.core != "lstm" or c.core_layers != ("lstm",):
        raise ValueError(
            f"scale: the PyTorch peer has one LSTM fed the previous action and reward, not {scale!r}"
        )
    fields = (
        "torso_units", "core_units", "head_units", "burn_in", "unroll", "n_step", "batch_size", "gamma",
        "learning_rate", "adam_epsilon", "max_grad_norm", "target_update_period", "priority_eta",
    )  # fmt: skip
    spec = {f: getattr(c, f) for f in fields}
    return {**spec, "rescale_eps": c.value_rescale_eps, "obs_dim": s.obs_dim, "num_actions": s.num_actions}


class MeasureError(RuntimeError):
    """A measuring process failed; the message ends with the last line it wrote to stderr."""


def _last_json(cmd: list[str]) -> dict[str, Any]:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise MeasureError(f"{' '.join(cmd[:3])} … exited {done.returncode}: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def burnin_rate(scale: str, rounds: int, updates: int, warmup: int) -> float:
    """burnin's runner update at ``scale``: updates/s, median of ``rounds``, in its own process."""
    cmd = [sys.executable, "-c", BURNIN_PROBE, scale, str(rounds), str(updates), str(warmup)]
    return float(_last_json(cmd)["updates_per_s"])


def peer_rate(
    python: str, spec: dict[str, Any], rounds: int, updates: int, warmup: int, threads: int
) -> float:
    """The PyTorch update's updates/s (median of ``rounds``), in its own process under ``python``."""
    cmd = [python, "-m", "benchmarks.torch_peer", "--spec", json.dumps(spec), "--rounds", str(rounds)]
    cmd += ["--updates", str(updates)]
    return float(_last_json([*cmd, "--warmup", str(warmup), "--threads", str(threads)])["updates_per_s"])


def torch_version(python: str) -> str | None:
    """torch's version under the interpreter ``python``, or None if it cannot run or import torch and numpy."""
    try:
        done = subprocess.run(
            [python, "-c", "import numpy, torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--torch-python", required=True, help="an interpreter that can import torch")
    parser.add_argument("--scale", choices=("cartpole", "r2d2"), default="cartpole")
    parser.add_argument("--pairs", type=int, default=5, help="alternating pairs of processes [5]")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds inside each process [5]")
    parser.add_argument("--updates", type=int, default=20, help="updates per round, on both sides [20]")
    parser.add_argument("--warmup", type=int, default=20, help="untimed updates first, on both sides [20]")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[2], help="PyTorch thread counts to run [2]"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every sample and the medians here")
    args = parser.parse_args(argv)
    parser.require_at_least(args, {"pairs": 1, "rounds": 1, "updates": 1, "threads": 1, "warmup": 0})
    version = torch_version(args.torch_python)
    if version is None:
        parser.error(f"--torch-python: {args.torch_python!r} cannot import torch and numpy")
    spec = peer_spec(args.scale)
    labels = ["burnin", *(f"torch_{t}t" for t in args.threads)]
    samples: dict[str, list[float]] = {k: [] for k in labels}
    bar = tqdm(total=args.pairs * len(labels), desc=f"peer A/B {args.scale}")
    try:
        for _ in range(args.pairs):  # burnin, torch, burnin, torch …: each sees the same load
            samples["burnin"].append(burnin_rate(args.scale, args.rounds, args.updates, args.warmup))
            bar.update(1)
            for t in args.threads:
                rate = peer_rate(args.torch_python, spec, args.rounds, args.updates, args.warmup, t)
                samples[f"torch_{t}t"].append(rate)
                bar.update(1)
    except MeasureError as err:
        bar.close()
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 1
    bar.close()
    report: dict[str, Any] = {"command": f"{PROG} " + " ".join(argv or sys.argv[1:]), "torch": version}
    report.update(scale=args.scale, spec=spec, pairs=args.pairs, rounds=args.rounds, updates=args.updates)
    report.update(warmup=args.warmup, torch_threads=args.threads)
    report["samples"] = samples
    burnin = statistics.median(samples["burnin"])
    report["medians"] = {"burnin": burnin}
    print(f"{args.scale}: updates/s, medians of {args.pairs} alternating processes")
    print(f"{'burnin':10s} {burnin:8.2f}")
    for label in labels[1:]:
        p = paired(samples["burnin"], samples[label])  # numerator: burnin; denominator: the peer
        report["medians"][label] = p
        print(f"{label:10s} {p['denominator']:8.2f}  burnin / {label}: {describe(p)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad argument (one line on stderr)."""
    return run_script(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
