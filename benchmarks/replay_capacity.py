"""Replay server capacity: K synthetic actors push paper-size steps through Ray while a learner samples 64 × 125 batches, per number of shards."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

PAPER_ACTOR_STEPS_PER_S = 260.0
"""R2D2 (Kapturowski et al. 2019, section 2.3): "each actor performing ~260 environment steps per second on
Atari (~130 per second on DMLab)", 256 actors, one learner at ~5 updates/s of 64 length-80 sequences."""
PAPER_LEARNER_BATCHES_PER_S = 5.0
FRAME = (84, 84, 1)
CORE_UNITS = 512
SATURATION_GAIN = 1.10
"""Doubling K saturates the server when inserts/s grow by less than this factor."""
DEFAULT_ACTORS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Pusher:
    """A process of synthetic actors: each virtual actor owns one lane (one env, as a paper actor) and keeps
    one push of ``push_steps`` pre-made steps in flight, sent again as soon as the server answers."""

    def __init__(self, indices: list[int], *, push_steps: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.indices = list(indices)
        self.push_steps = push_steps
        t = push_steps
        # The payload a real worker sends (ServerWriter.push): every step's state, stacked over time.
        self.steps = {
            "observation": rng.integers(0, 256, (t, 1, *FRAME), dtype=np.uint8),
            "action": rng.integers(0, 18, (t, 1)).astype(np.int32),
            "reward": np.zeros((t, 1), np.float32),
            "terminated": np.zeros((t, 1), bool),
            "truncated": np.zeros((t, 1), bool),
            # h and c: two arrays (one array twice might travel once).
            "states": (tuple(rng.standard_normal((t, 1, CORE_UNITS), np.float32) for _ in range(2)),),
        }
        self.payload_bytes = batch_nbytes(tuple(self.steps.values()))
        self.actors: list[tuple[int, Any, str, int, Any]] = []

    def attach(self, server_names: list[str]) -> int:
        """Register every virtual actor with its shard (actor i → shard i % S); returns the payload's bytes."""
        import ray

        servers = [ray.get_actor(name) for name in server_names]
        self.actors = []
        for i in self.indices:
            server = servers[i % len(servers)]
            reg = ray.get(server.register.remote(f"actor-{i}", 1))
            self.actors.append((i, server, f"actor-{i}", reg.incarnation, reg.lanes))
        return self.payload_bytes

    def run(self, k: int, seconds: float) -> dict[str, Any]:
        """Push for ``seconds`` with the virtual actors of index < ``k``; pushes, env steps, latencies, wall."""
        import ray

        mine = [a for a in self.actors if a[0] < k]
        inflight: dict[Any, tuple[tuple, float]] = {}

        def submit(actor: tuple) -> None:
            _, server, owner, incarnation, lanes = actor
            ref = server.add.remote(owner, incarnation, lanes, self.steps, env_steps=self.push_steps)
            inflight[ref] = (actor, time.perf_counter())

        start = time.perf_counter()
        deadline = start + seconds
        for actor in mine:
            submit(actor)
        latencies, statuses = [], {}
        while inflight:
            refs = list(inflight)
            ready, _ = ray.wait(refs, num_returns=1)
            # Then every other answer that is in: one wait per answer would cost O(K) each, O(K²) a round.
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if len(refs) > 1 else (ready, None)
            for ref in ready:
                actor, sent = inflight.pop(ref)
                status = ray.get(ref).status
                latencies.append(time.perf_counter() - sent)
                statuses[status] = statuses.get(status, 0) + 1
                if time.perf_counter() < deadline:
                    submit(actor)
        return {
            "pushes": statuses.get("ok", 0),
            "statuses": statuses,
            "latencies": latencies,
            "wall_s": time.perf_counter() - start,
        }


def paper_config(*, lane_capacity: int, lanes: int) -> Any:
    """The paper's window layout and batch (burn-in 40, unroll 80, period 40, n 5: 125 steps; batch 64), one
    env per actor, ``lane_capacity`` steps per lane."""
    from agents.r2d2.config import preset

    return preset("atari", num_envs=1, replay_capacity=lane_capacity * lanes, min_replay_steps=1)


class Sampler:
    """The learner's side, in this process: draws 64 × 125 batches (across shards as one buffer) at
    ``rate`` batches/s (0: back to back) and sends random priorities back, as the learner does, until stopped."""

    def __init__(self, servers: list[Any], config: Any, *, rate: float) -> None:
        from agents.distributed import RemoteReplay
        from agents.r2d2.config import WindowOffsets

        self.replay = RemoteReplay(servers, beta=config.importance_exponent, seed=0)
        self.batch_size = config.batch_size
        self.offsets = WindowOffsets.of(config.sequence_spec).extra
        self.rng = np.random.default_rng(0)
        self.rate = rate
        self.latencies: list[float] = []
        self.batch_bytes = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def draw(self) -> None:
        sent = time.perf_counter()
        self.replay.request(self.batch_size, extra_state_offsets=self.offsets)
        reply = self.replay.receive()
        if reply.batch is None:
            return
        self.latencies.append(time.perf_counter() - sent)
        self.batch_bytes = batch_nbytes(reply.batch)
        self.replay.update_priorities(reply.batch.keys, self.rng.random(len(reply.batch.keys)) + 0.1)

    def loop(self) -> None:
        period = 1.0 / self.rate if self.rate else 0.0
        due = time.perf_counter()
        try:
            while not self.stop.is_set():
                # A learner at the paper's pace: one batch per period, never a burst to catch up.
                due = max(due + period, time.perf_counter())
                self.draw()
                self.stop.wait(max(0.0, due - time.perf_counter()))
            self.replay.drain()
        except BaseException as err:  # reported by the measurement: a failing thread must fail the run
            self.error = err


def batch_nbytes(tree: Any) -> int:
    if isinstance(tree, np.ndarray):
        return tree.nbytes
    if isinstance(tree, tuple):  # a SequenceBatch (a NamedTuple) or nested states
        return sum(batch_nbytes(t) for t in tree)
    return 0


def percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1000) if values else None


def measure(
    pushers: list[Any], sampler: Sampler, k: int, *, seconds: float, push_steps: int, payload_bytes: int
) -> dict[str, Any]:
    """One measurement: ``k`` virtual actors push for ``seconds`` while the sampler draws."""
    import ray

    sampler.latencies.clear()
    sampler.stop.clear()
    thread = threading.Thread(target=sampler.loop, name="sampler")
    start = time.perf_counter()
    thread.start()
    try:
        results = ray.get([p.run.remote(k, seconds) for p in pushers])
    finally:
        wall = time.perf_counter() - start
        sampler.stop.set()
        thread.join()
    if sampler.error is not None:
        raise sampler.error
    latencies = [x for r in results for x in r["latencies"]]
    pushes = sum(r["pushes"] for r in results)
    refused = sum(n for r in results for status, n in r["statuses"].items() if status != "ok")
    samples = len(sampler.latencies)
    return {
        "actors": k,
        "wall_s": wall,
        "pushes": pushes,
        "refused_pushes": refused,
        "inserts_per_s": pushes * push_steps / wall,
        "pushes_per_s": pushes / wall,
        "push_ms_p50": percentile_ms(latencies, 50),
        "push_ms_p95": percentile_ms(latencies, 95),
        "samples": samples,
        "samples_per_s": samples / wall,
        "sample_ms_p50": percentile_ms(sampler.latencies, 50),
        "sample_ms_p95": percentile_ms(sampler.latencies, 95),
        "mb_in_per_s": pushes * payload_bytes / wall / 1e6,
        "mb_out_per_s": samples * sampler.batch_bytes / wall / 1e6,
    }


def sweep_shards(shards: int, pushers: list[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start ``shards`` replay servers, fill every lane past a window, then measure each K in turn (ascending,
    stopping one doubling after the inserts stop growing, unless ``--no-stop``)."""
    import gymnasium
    import ray

    from agents.distributed import DistributedConfig, spawn_servers
    from agents.spaces import observation_encoding

    most = max(args.actors)
    config = paper_config(lane_capacity=args.lane_capacity, lanes=most)
    options = DistributedConfig(
        env_id="benchmark", num_actors=most, replay_shards=shards, rate_limited=False, checkpoint_seconds=0,
        push_every=args.push_steps,
    )  # fmt: skip
    space = gymnasium.spaces.Box(0, 255, FRAME, np.uint8)
    spawned = spawn_servers(
        config, options, seed=0, checkpoint_dir=None, observation=observation_encoding(space),
        row_state_shapes=(((CORE_UNITS,), (CORE_UNITS,)),),
    )  # fmt: skip
    servers = [handle for _, handle in spawned]
    try:
        payload_bytes = ray.get([p.attach.remote([name for name, _ in spawned]) for p in pushers])[0]
        # Every lane holds a few windows before anything is timed (new lanes would only add sampleable mass).
        fill = (config.sequence_spec.length * 2) / args.push_steps
        ray.get([p.run.remote(most, 0.0) for p in pushers for _ in range(int(np.ceil(fill)))])
        sampler = Sampler(servers, config, rate=args.sample_rate)
        for _ in range(2):
            sampler.draw()  # the first draws compile the gather kernels: not timed
        rows: list[dict[str, Any]] = []
        for k in args.actors:
            row = measure(
                pushers,
                sampler,
                k,
                seconds=args.seconds,
                push_steps=args.push_steps,
                payload_bytes=payload_bytes,
            )
            row["shards"] = shards
            row["payload_bytes_per_push"] = payload_bytes
            row["batch_mb"] = sampler.batch_bytes / 1e6
            rows.append(row)
            print(line(row), flush=True)
            grew = len(rows) < 2 or row["inserts_per_s"] >= SATURATION_GAIN * rows[-2]["inserts_per_s"]
            if not grew and not args.no_stop:
                break
        return rows
    finally:
        for server in servers:
            ray.kill(server, no_restart=True)


def line(row: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        return "—" if row[key] is None else f"{row[key]:.0f}"

    return (
        f"  S={row['shards']} K={row['actors']:>3}: {row['inserts_per_s']:>8.0f} inserts/s "
        f"({row['pushes_per_s']:.0f} pushes/s, p50/p95 {ms('push_ms_p50')}/{ms('push_ms_p95')} ms), "
        f"{row['samples_per_s']:.2f} samples/s (p50/p95 {ms('sample_ms_p50')}/{ms('sample_ms_p95')} ms), "
        f"in {row['mb_in_per_s']:.0f} MB/s, out {row['mb_out_per_s']:.0f} MB/s"
    )


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per shard count: the most inserts/s seen, the K it saturated at, and the paper-speed actors that feeds."""
    out = {}
    for shards in sorted({r["shards"] for r in rows}):
        mine = [r for r in rows if r["shards"] == shards]
        best = max(mine, key=lambda r: r["inserts_per_s"])
        saturated = next(
            (
                b["actors"]
                for a, b in itertools.pairwise(mine)
                if b["inserts_per_s"] < SATURATION_GAIN * a["inserts_per_s"]
            ),
            None,
        )
        out[str(shards)] = {
            "capacity_inserts_per_s": best["inserts_per_s"],
            "at_actors": best["actors"],
            "saturated_at_actors": saturated,
            "samples_per_s_there": best["samples_per_s"],
            "paper_actors_sustained": int(best["inserts_per_s"] // PAPER_ACTOR_STEPS_PER_S),
            "feeds_paper_learner": best["samples_per_s"] >= PAPER_LEARNER_BATCHES_PER_S,
        }
    return out


def table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    head = (
        "| shards | actors K | inserts/s | pushes/s | push p50 / p95 ms | samples/s | sample p50 / p95 ms "
        "| MB/s in | MB/s out | paper actors fed |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )

    def ms(r: dict[str, Any], key: str) -> str:
        return "—" if r[key] is None else f"{r[key]:.0f}"

    body = "".join(
        f"| {r['shards']} | {r['actors']} | {r['inserts_per_s']:,.0f} | {r['pushes_per_s']:,.0f} | "
        f"{ms(r, 'push_ms_p50')} / {ms(r, 'push_ms_p95')} | {r['samples_per_s']:.2f} | "
        f"{ms(r, 'sample_ms_p50')} / {ms(r, 'sample_ms_p95')} | {r['mb_in_per_s']:,.0f} | "
        f"{r['mb_out_per_s']:,.0f} | {int(r['inserts_per_s'] // PAPER_ACTOR_STEPS_PER_S)} |\n"
        for r in rows
    )
    caps = "".join(
        f"- {s} shard{'s' if s != '1' else ''}: {v['capacity_inserts_per_s']:,.0f} inserts/s at K={v['at_actors']} "
        f"= {v['paper_actors_sustained']} paper-speed actors ({PAPER_ACTOR_STEPS_PER_S:.0f} env steps/s each), "
        f"{v['samples_per_s_there']:.2f} samples/s beside them (paper learner: {PAPER_LEARNER_BATCHES_PER_S:.0f})\n"
        for s, v in summary.items()
    )
    return head + body + "\n" + caps


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ins, smp) = plt.subplots(1, 2, figsize=(10, 4))
    for shards in sorted({r["shards"] for r in rows}):
        mine = [r for r in rows if r["shards"] == shards]
        ks = [r["actors"] for r in mine]
        ins.plot(ks, [r["inserts_per_s"] for r in mine], marker="o", label=f"{shards} shard(s)")
        smp.plot(ks, [r["samples_per_s"] for r in mine], marker="o", label=f"{shards} shard(s)")
    ins.axhline(256 * PAPER_ACTOR_STEPS_PER_S, color="grey", ls="--", label="256 paper actors")
    smp.axhline(PAPER_LEARNER_BATCHES_PER_S, color="grey", ls="--", label="paper learner")
    for ax, title in ((ins, "env steps inserted / s"), (smp, "64 × 125 batches sampled / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("synthetic actors K")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replay_capacity", description=__doc__)
    parser.add_argument("--actors", type=int, nargs="+", default=list(DEFAULT_ACTORS), metavar="K",
                        help="synthetic actors (one lane each), ascending [%(default)s]")  # fmt: skip
    parser.add_argument(
        "--shards", type=int, nargs="+", default=[1, 2], metavar="S", help="replay shards [%(default)s]"
    )
    parser.add_argument("--pushers", type=int, default=2, help="processes the synthetic actors run in [2]")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement [10]")
    parser.add_argument("--push-steps", type=int, default=40, help="steps per push: one period [40]")
    parser.add_argument(
        "--sample-rate", type=float, default=PAPER_LEARNER_BATCHES_PER_S,
        help="batches/s the learner asks for: the paper's learner [5]; 0: as fast as the server gives them",
    )  # fmt: skip
    parser.add_argument("--lane-capacity", type=int, default=500, help="replay steps per lane [500]")
    parser.add_argument("--no-stop", action="store_true", help="measure every K, also past saturation")
    parser.add_argument(
        "--address", default="", help="Ray cluster to join (default: a local Ray on loopback)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI run; other defaults: K 1 2, S 1 2, 1 s each, one pusher"
    )
    parser.add_argument("--json", type=Path, default=None, help="write JSON here, and .md / .png beside it")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(actors=[1, 2], shards=[1, 2], seconds=1.0, pushers=1, lane_capacity=260)
    args = parser.parse_args(argv)
    for name in ("actors", "shards"):
        values = getattr(args, name)
        if min(values) < 1 or values != sorted(set(values)):
            parser.error(f"--{name}: expected ascending counts >= 1, got {values}")
    if max(args.shards) > max(args.actors):
        parser.error(f"--shards: every shard needs an actor: expected <= the largest K {max(args.actors)}")
    for name, least in (("pushers", 1), ("push_steps", 1), ("lane_capacity", 126)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')}: expected >= {least}, got {getattr(args, name)}")
    if args.seconds <= 0:
        parser.error(f"--seconds: expected > 0, got {args.seconds}")
    if args.sample_rate < 0:
        parser.error(f"--sample-rate: expected >= 0, got {args.sample_rate}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import ray

    from agents.distributed import init_ray

    started = init_ray(
        args.address, num_cpus=None if args.address else max(os.cpu_count() or 1, args.pushers)
    )
    try:
        remote = ray.remote(Pusher).options(num_cpus=0, max_concurrency=1)
        most = max(args.actors)
        pushers = [
            remote.remote(list(range(p, most, args.pushers)), push_steps=args.push_steps, seed=p)
            for p in range(args.pushers)
        ]
        rows: list[dict[str, Any]] = []
        print(
            f"replay capacity: 84×84 uint8 frames, LSTM-512 (h, c), pushes of {args.push_steps} steps, batches "
            f"of 64 × 125, {args.pushers} pusher process(es), {os.cpu_count()} CPUs",
            flush=True,
        )
        for shards in args.shards:
            rows += sweep_shards(shards, pushers, args)
        for p in pushers:
            ray.kill(p, no_restart=True)
    finally:
        if started:
            ray.shutdown()
    summary = summarise(rows)
    report = {
        "benchmark": "replay_capacity",
        "command": "python -m benchmarks.replay_capacity "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "paper_actor_env_steps_per_s": PAPER_ACTOR_STEPS_PER_S,
        "paper_learner_batches_per_s": PAPER_LEARNER_BATCHES_PER_S,
        "rows": rows,
        "summary": summary,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
    }
    text = table(rows, summary)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        args.json.with_suffix(".md").write_text(f"`{report['command']}`\n\n{text}")
        plot(rows, args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
