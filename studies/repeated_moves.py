"""How often a trained greedy policy repeats a move, against a uniform random one (``python -m studies.repeated_moves``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agents.cli import ArgumentParser, run_script, script_imports

PROG = "python -m studies.repeated_moves"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from studies.memory_suite import run_env_id


def repeat_rates(actions: list[np.ndarray], dones: list[np.ndarray]) -> dict[str, float]:
    """Per step of ``num_envs`` side-by-side episodes: the fraction whose move was made before in the episode
    (``earlier``) and whose move equals the step before's (``previous``).

    actions[t]: [N] or [N, k] (MultiDiscrete) moves at step t; dones[t]: [N], the episode ended at step t.
    """
    n = len(actions[0])
    seen: list[set] = [set() for _ in range(n)]
    previous: list[Any] = [None] * n
    earlier = again = total = 0
    for a_t, done_t in zip(actions, dones, strict=True):
        for i in range(n):
            move = tuple(np.ravel(a_t[i]).tolist())
            earlier += move in seen[i]
            again += move == previous[i]
            total += 1
            seen[i].add(move)
            previous[i] = move
            if done_t[i]:
                seen[i], previous[i] = set(), None
    return {"earlier": earlier / total, "previous": again / total, "steps": total}


def record(env: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Wrap ``env.step`` to log (moves, episode ended) per step; returns the two lists it appends to."""
    actions: list[np.ndarray] = []
    dones: list[np.ndarray] = []
    step = env.step

    def logged(a: Any) -> Any:
        out = step(a)
        actions.append(np.array(a, copy=True))
        dones.append(np.logical_or(out[2], out[3]))
        return out

    env.step = logged
    return actions, dones


def measure(run_dir: Path, env_id: str, *, episodes: int, seed: int) -> dict[str, dict[str, float]]:
    """Repeat rates of the greedy policy in ``run_dir``'s checkpoint (one episode per env) and of a uniform
    random policy over as many steps."""
    from agents.envs import make_vector_env
    from agents.r2d2.actor import Actor, evaluate
    from agents.r2d2.config import R2D2Config
    from agents.r2d2.loop import TrainLoop

    checkpoint = run_dir / "checkpoint"
    config = R2D2Config.from_json(json.loads((checkpoint / "loop.json").read_text())["config"])
    loop = TrainLoop(config, make_vector_env(config.num_envs, env_id=env_id, seed=seed), seed=seed)
    loop.load(checkpoint)
    env = make_vector_env(episodes, env_id=env_id, seed=seed)
    actions, dones = record(env)
    returns = evaluate(
        Actor(config, env, seed=seed, epsilons=np.zeros(episodes)),
        loop.learner.online.get_weights(),
        seed=seed,
    )
    greedy = {**repeat_rates(actions, dones), "return": float(np.mean(returns))}
    steps = len(actions)
    env = make_vector_env(episodes, env_id=env_id, seed=seed)
    actions, dones = record(env)
    env.action_space.seed(seed)
    for _ in range(steps):
        env.step(env.action_space.sample())
    return {"greedy": greedy, "random": repeat_rates(actions, dones)}


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.split(" (")[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run directories of studies.memory_suite (TASK-sSEED)"
    )
    parser.add_argument("--episodes", type=int, default=16, help="greedy episodes per run, side by side [16]")
    parser.add_argument("--seed", type=int, default=0, help="env and random-policy seed [0]")
    args: argparse.Namespace = parser.parse_args(argv)
    parser.require_at_least(args, {"episodes": 1})
    for run in args.runs:
        if not (run / "checkpoint" / "loop.json").is_file():
            parser.error(f"runs: {run}: no checkpoint/loop.json (expected a memory_suite run directory)")
    print("| run | policy | return | move made earlier in the episode | move = the step before's | steps |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        for policy, r in measure(run, run_env_id(run), episodes=args.episodes, seed=args.seed).items():
            ret = f"{r['return']:.2f}" if "return" in r else "—"
            print(
                f"| {run.name} | {policy} | {ret} | {r['earlier']:.2f} | {r['previous']:.2f} | {r['steps']} |"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad argument (one line on stderr)."""
    return run_script(PROG, lambda: _main(argv), tf_threads=True)


if __name__ == "__main__":
    sys.exit(main())
