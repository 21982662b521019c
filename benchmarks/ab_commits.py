"""Two commits' learner update and demo loop, measured in alternating processes (A B A B …), medians."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agents.cli import ArgumentParser, run_script
from benchmarks.timing import describe, paired

PROG = "python -m benchmarks.ab_commits"
ROOT = Path(__file__).resolve().parent.parent

# Runs inside the commit's checkout: the demo's TrainLoop on masked CartPole, timed after a warm-up.
# Only names that every compared commit has (TrainLoop, R2D2Config, make_vector_env) are used.
LOOP_PROBE = """
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import agents.cli  # the process set-up every script of that commit gets (thread pools where it has them)
getattr(agents.cli, "import_tensorflow_quietly", lambda: None)()  # a no-op where importing it did this
getattr(agents.cli, "configure_threads", lambda: None)()
from agents.envs import MASKED_CARTPOLE_ID, make_vector_env
from agents.r2d2 import R2D2Config
from agents.r2d2.loop import TrainLoop
warm, updates = int(sys.argv[1]), int(sys.argv[2])
config = R2D2Config()
loop = TrainLoop(config, make_vector_env(env_id=MASKED_CARTPOLE_ID, num_envs=config.num_envs, seed=0), seed=0)
while loop.learner.num_updates < warm:
    loop.iterate()
e0, u0, t0 = loop.env_steps, loop.learner.num_updates, time.perf_counter()
while loop.learner.num_updates < warm + updates:
    loop.iterate()
wall = time.perf_counter() - t0
print(json.dumps({"env_steps_per_s": (loop.env_steps - e0) / wall, "updates_per_s": (loop.learner.num_updates - u0) / wall}))
"""


def checkout(commit: str, where: Path, label: str) -> Path:
    """A detached worktree of ``commit`` under ``where`` (``label`` keeps an A/A run's two apart)."""
    path = where / f"{label}-{commit[:12]}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
        check=True,
        capture_output=True,
    )
    return path


def update_rate(tree: Path, rounds: int) -> float:
    """The demo-scale runner's updates/s (median of ``rounds``) from that checkout's benchmark."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.burnin_throughput",
            "--scales",
            "cartpole",
            "--variants",
            "runner",
            "--rounds",
            str(rounds),
            "--json",
            str(out),
            "--no-progress",
        ]
        env = {**os.environ, "MPLBACKEND": "Agg"}
        subprocess.run(cmd, cwd=tree, check=True, capture_output=True, env=env)
        return float(json.loads(out.read_text())["scales"]["cartpole"]["variants"]["runner"]["updates_per_s"])


def loop_rate(tree: Path, warm: int, updates: int) -> dict[str, float]:
    """The demo loop's env steps/s and updates/s in that checkout."""
    done = subprocess.run(
        [sys.executable, "-c", LOOP_PROBE, str(warm), str(updates)],
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("old", help="the commit to compare against (e.g. the one before a change)")
    parser.add_argument("new", nargs="?", default="HEAD", help="the commit to measure (default HEAD)")
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs of processes per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="benchmark rounds inside each update process")
    parser.add_argument("--loop-updates", type=int, default=300, help="timed demo-loop updates per process")
    parser.add_argument("--skip-loop", action="store_true", help="only the update benchmark")
    parser.add_argument("--json", type=Path, default=None, help="write every sample and the medians here")
    args = parser.parse_args(argv)
    parser.require_at_least(args, {"pairs": 1, "rounds": 1, "loop_updates": 1})
    shas = []
    for name, commit in (("old", args.old), ("new", args.new)):
        found = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
            capture_output=True,
            text=True,
        )
        if found.returncode != 0:
            parser.error(f"{name}: expected a commit of {ROOT}, got {commit!r}")
        shas.append(found.stdout.strip())
    report: dict[str, Any] = {"old": shas[0], "new": shas[1], "pairs": args.pairs, "samples": {}}
    with tempfile.TemporaryDirectory() as tmp:
        trees = [checkout(sha, Path(tmp), label) for label, sha in zip(("old", "new"), shas)]
        try:
            measures = {"update_per_s": lambda t: update_rate(t, args.rounds)}
            if not args.skip_loop:
                measures["loop_env_steps_per_s"] = lambda t: loop_rate(t, 30, args.loop_updates)[
                    "env_steps_per_s"
                ]
            bar = tqdm(total=args.pairs * 2 * len(measures), desc="A/B")
            for name, measure in measures.items():
                samples: dict[str, list[float]] = {"old": [], "new": []}
                for _ in range(args.pairs):
                    for label, tree in zip(("old", "new"), trees):  # A B A B …: both see the same load
                        samples[label].append(measure(tree))
                        bar.update(1)
                report["samples"][name] = samples
            bar.close()
        finally:
            for tree in trees:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
                )
    print(f"old {shas[0][:10]}  new {shas[1][:10]}  ({args.pairs} alternating pairs, medians)")
    report["medians"] = {}
    for name, samples in report["samples"].items():
        p = paired(samples["new"], samples["old"])
        old, new = p["denominator"], p["numerator"]
        report["medians"][name] = {
            "old": old,
            "new": new,
            "ratio": p["ratio"],
            "pair_ratios": p["pair_ratios"],
        }
        print(f"{name:22s} old {old:8.1f}  new {new:8.1f}  {describe(p)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad argument (one line on stderr)."""
    return run_script(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
