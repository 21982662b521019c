"""Actor throughput on masked CartPole: compiled step vs model.predict, or (--actors N ...) env steps/s vs Ray actors."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def make_compiled(config, num_envs: int, seed: int) -> Callable[[], int]:
    """Our Actor: one tf.function per step (state reset, snapshot, forward), replay add beside it."""
    from agents.envs import make_vector_env
    from agents.r2d2 import Actor, make_replay
    from agents.r2d2.networks import row_state_shapes

    env = make_vector_env(num_envs, seed=seed)
    shapes = row_state_shapes(config.network(2, 2))
    replay = make_replay(config, 2, shapes, num_lanes=num_envs, seed=seed)
    actor = Actor(config, env, replay=replay, seed=seed)

    def step() -> int:
        before = actor.env_steps
        actor.step()
        return actor.env_steps - before

    return step


def make_predict(config, num_envs: int, seed: int) -> Callable[[], int]:
    """The same actor loop written with model.predict per step and the numpy state API."""
    import burnin
    from agents.envs import make_vector_env
    from agents.r2d2 import apex_epsilons, make_replay
    from agents.r2d2.networks import build_q_network, row_state_shapes

    env = make_vector_env(num_envs, seed=seed)
    net = config.network(2, 2)
    model = build_q_network(net, batch_size=num_envs, seed=seed)
    replay = make_replay(config, 2, row_state_shapes(model), num_lanes=num_envs, seed=seed)
    eps = apex_epsilons(num_envs, base=config.epsilon_base, alpha=config.epsilon_alpha)
    rng = np.random.default_rng(seed)
    lanes = np.arange(num_envs)
    state: dict[str, Any] = {}
    obs, _ = env.reset(seed=seed)
    state.update(
        obs=obs,
        prev_a=np.zeros(num_envs, np.int32),
        prev_r=np.zeros(num_envs, np.float32),
        new=np.ones(num_envs, bool),
        pending=np.zeros(num_envs, bool),
    )

    def step() -> int:
        burnin.reset_rows(model, state["new"])
        snapshot = burnin.get_states(model)
        q = model.predict(
            [state["obs"][:, None], state["prev_a"][:, None], state["prev_r"][:, None]],
            batch_size=num_envs,
            verbose=0,
        )[:, 0]
        actions = np.where(rng.random(num_envs) < eps, rng.integers(0, 2, num_envs), q.argmax(1)).astype(
            np.int32
        )
        next_obs, reward, term, trunc, _ = env.step(actions)
        replay.add(
            lanes,
            observation=state["obs"],
            action=actions,
            reward=reward,
            terminated=term,
            truncated=trunc,
            states=snapshot,
        )
        real = int((~state["pending"]).sum())
        done = term | trunc
        state["new"] = state["pending"].copy()
        state["pending"] = done
        state["prev_a"] = np.where(state["new"], 0, actions).astype(np.int32)
        state["prev_r"] = np.where(state["new"], 0.0, reward).astype(np.float32)
        state["obs"] = next_obs
        return real

    return step


def measure(fn: Callable[[], int], seconds: float) -> float:
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        steps += fn()
    return steps / (time.perf_counter() - start)


def ray_scaling(
    config, actor_counts: list[int], *, rounds: int, seconds: float, seed: int = 0
) -> dict[str, Any]:
    """Env steps/s of 1, 2, ... Ray actor workers pushing to one replay server (no learner, no rate limit).

    The workers for the largest count are started once; a round runs, for each
    count N (interleaved), the first N of them side by side for ``seconds``, and
    an in-process actor with a local replay (no Ray) as the reference.
    """
    import ray

    from agents.distributed import DistributedConfig, init_ray, spawn_server, spawn_workers
    from agents.envs import MASKED_CARTPOLE_ID
    from agents.r2d2.networks import build_q_network, row_state_shapes

    most = max(actor_counts)
    options = DistributedConfig(
        num_actors=most, rate_limited=False, checkpoint_seconds=0, env_id=MASKED_CARTPOLE_ID
    )
    started = init_ray(num_cpus=max(os.cpu_count() or 1, most))
    try:
        model = build_q_network(config.network(2, 2), batch_size=1, seed=seed)
        name, server = spawn_server(
            config, options, observation=2, row_state_shapes=row_state_shapes(model), seed=seed
        )
        weights = model.get_weights()
        ray.get(server.publish.remote(1, [ray.put(weights)]))
        workers = spawn_workers(config, options, name, seed=seed)
        ray.get([w.run.remote(max_seconds=0.5) for w in workers])  # start-up and tracing
        local = make_compiled(config, config.num_envs, seed)
        for _ in range(3):
            local()
        rates: dict[str, list[float]] = {"in_process": [], **{str(n): [] for n in actor_counts}}
        for _ in range(rounds):
            rates["in_process"].append(measure(local, seconds))
            for n in actor_counts:
                results = ray.get([w.run.remote(max_seconds=seconds) for w in workers[:n]])
                rates[str(n)].append(
                    sum(r["run_env_steps"] for r in results) / max(r["run_s"] for r in results)
                )
        ray.get(server.stop.remote())
        for actor in [*workers, server]:
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    med = {k: float(np.median(v)) for k, v in rates.items()}
    base = med[str(actor_counts[0])]
    return {
        "env_steps_per_s": med,
        "all_env_steps_per_s": rates,
        "speedup_vs_first": {str(n): med[str(n)] / base for n in actor_counts},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.actor_throughput", description=__doc__)
    parser.add_argument("--num-envs", type=int, default=16, help="envs per actor (network batch)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per variant per round")
    parser.add_argument("--quick", action="store_true", help="CI run: 2 rounds of 0.5 s")
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument(
        "--actors",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="instead: env steps/s of N Ray actor workers (each --num-envs envs) for each N given",
    )
    args = parser.parse_args(argv)
    if args.num_envs < 1:
        parser.error(f"--num-envs: expected >= 1, got {args.num_envs}")
    if args.actors is not None and (not args.actors or min(args.actors) < 1):
        parser.error(f"--actors: expected counts >= 1, got {args.actors}")

    from agents.r2d2 import R2D2Config

    config = R2D2Config(num_envs=args.num_envs)
    rounds, seconds = (2, 0.5) if args.quick else (args.rounds, args.seconds)
    if args.actors is not None:
        return _report_scaling(args, config, rounds, seconds)
    fns = {
        "compiled": make_compiled(config, args.num_envs, 0),
        "predict": make_predict(config, args.num_envs, 0),
    }
    for fn in fns.values():
        for _ in range(3):
            fn()  # trace and warm up
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():  # A B A B ...
            rates[name].append(measure(fn, seconds))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    report = {
        "benchmark": "actor_throughput",
        "quick": args.quick,
        "num_envs": args.num_envs,
        "rounds": rounds,
        "seconds_per_round": seconds,
        "env_steps_per_s": med,
        "all_env_steps_per_s": rates,
        "vs_predict": med["compiled"] / med["predict"],
        "network": {"core_units": config.core_units, "torso_units": list(config.torso_units)},
        "machine": _machine(),
    }
    print(f"actor on {args.num_envs} masked-CartPole envs, median of {rounds} interleaved rounds:")
    print(f"  compiled stateful step: {med['compiled']:>9.0f} env steps/s")
    print(f"  model.predict per step: {med['predict']:>9.0f} env steps/s")
    print(f"  vs_predict: {report['vs_predict']:.1f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def _machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}


def _report_scaling(args: argparse.Namespace, config, rounds: int, seconds: float) -> int:
    counts = sorted(set(args.actors))
    result = ray_scaling(config, counts, rounds=rounds, seconds=seconds)
    med = result["env_steps_per_s"]
    report = {
        "benchmark": "actor_throughput_ray",
        "quick": args.quick,
        "num_envs": args.num_envs,
        "actors": counts,
        "rounds": rounds,
        "seconds_per_round": seconds,
        **result,
        "machine": _machine(),
    }
    print(
        f"Ray actor workers of {args.num_envs} masked-CartPole envs each, pushing to one replay server; "
        f"median of {rounds} interleaved rounds on {os.cpu_count()} CPUs:"
    )
    print(f"  in-process actor (no Ray): {med['in_process']:>9.0f} env steps/s")
    for n in counts:
        speedup = result["speedup_vs_first"][str(n)]
        print(
            f"  {n:>2} Ray actor{'s' if n > 1 else ' '}:              {med[str(n)]:>9.0f} env steps/s  ({speedup:.2f}x)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
