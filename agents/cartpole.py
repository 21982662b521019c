"""Masked-CartPole R2D2 demo and CLI: python -m agents.cartpole [--seed S] [--resume DIR] [--eval DIR] [--actors N]."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agents.cli import EXIT_INTERRUPTED, ArgumentParser, run_script
from agents.envs import MASKED_CARTPOLE_ID, MASKED_CARTPOLE_SOLVED, make_vector_env
from agents.experiment import RunOptions, resume_path
from agents.interrupts import sigterm_as_interrupt
from agents.r2d2.config import documented
from burnin._checks import check_int, check_str

__all__ = [
    "PROG",
    "Args",
    "main",
    "make_env",
    "parse_args",
    "run_dir",
    "train",
    "train_distributed",
]

PROG = "python -m agents.cartpole"

make_env = functools.partial(make_vector_env, env_id=MASKED_CARTPOLE_ID)
"""``make_env(num_envs, seed=...)``: a vector env of masked CartPole."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Args(RunOptions):
    """Command-line arguments of the demo. Every R2D2Config field is also a flag (see --help)."""

    seed: int = documented(0, "Seed for weights, envs, exploration and replay sampling (the only seed).")
    name: str = documented(
        "", "Run name; outputs go to RUN_DIR/NAME (default: masked-cartpole-<core>-s<seed>)."
    )
    run_dir: str = documented("runs", "Directory holding one sub-directory per run.")
    solve_return: float = documented(MASKED_CARTPOLE_SOLVED, "Mean greedy return that counts as solved.")
    eval: str = documented("", "Only evaluate the checkpoint in this directory: greedy episodes, then exit.")
    actors: int = documented(
        0, "Run N actor processes on Ray (0: everything in this process, Ray not imported)."
    )
    address: str = documented("", "Ray cluster address to join (default: start a local Ray).")

    def __post_init__(self) -> None:
        check_int("seed", self.seed, minimum=0)
        super().__post_init__()
        check_int("actors", self.actors, minimum=0)
        for name in ("name", "run_dir", "eval", "address"):
            check_str(name, getattr(self, name))
        if not self.run_dir:
            raise ValueError("run_dir: expected a directory path, got ''")
        if self.address and not self.actors:
            raise ValueError(f"address: {self.address!r} given but actors=0; expected --actors N with it")

    def run_options(self) -> RunOptions:
        """The harness's part of these arguments."""
        names = {f.name for f in dataclasses.fields(RunOptions)}
        return RunOptions(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_fields(parser: argparse.ArgumentParser, cls: type, group_title: str, defaults: Any) -> None:
    group = parser.add_argument_group(group_title)
    for f in dataclasses.fields(cls):
        name = f.name
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        doc = f.metadata.get("doc", "")
        if isinstance(default, bool):
            group.add_argument(
                flag, dest=name, type=_bool, default=default, metavar="BOOL", help=f"{doc} [{default}]"
            )
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else int
            group.add_argument(
                flag,
                dest=name,
                type=kind,
                nargs="+",
                default=default,
                metavar="X",
                help=f"{doc} {list(default)}",
            )
        else:
            group.add_argument(
                flag, dest=name, type=type(default), default=default, help=f"{doc} [{default!r}]"
            )


def parse_args(argv: list[str] | None = None):
    """Parse the CLI into (Args, R2D2Config). A bad value prints one line naming its flag and exits 2
    (:mod:`agents.cli`); so does a ``--resume`` or ``--eval`` that names no checkpoint."""
    from agents.r2d2 import R2D2Config

    parser = ArgumentParser(
        prog=PROG,
        description="R2D2 with burn-in on masked CartPole (cart position and pole angle only).",
    )
    _add_fields(parser, Args, "run", Args())
    _add_fields(
        parser,
        R2D2Config,
        "R2D2 config (defaults tuned for masked CartPole; paper values in brackets of the docs)",
        R2D2Config(),
    )
    ns = vars(parser.parse_args(argv))
    arg_names = {f.name for f in dataclasses.fields(Args)}
    args = parser.build(Args, **{k: v for k, v in ns.items() if k in arg_names})
    config = parser.build(R2D2Config.from_json, {k: v for k, v in ns.items() if k not in arg_names})
    if args.actors:
        from agents.distributed import DistributedConfig

        options = parser.build(DistributedConfig, num_actors=args.actors, env_id=MASKED_CARTPOLE_ID)
        parser.build(options.check, config, aliases={"num_actors": "actors"})
    if args.eval:
        parser.checkpoint("eval", args.eval)
    elif args.resume:
        parser.checkpoint("resume", resume_path(args, run_dir(args, config)))
    return args, config


def run_eval_only(args: Args) -> dict[str, Any]:
    """``--eval DIR``: greedy episodes of the checkpoint's learner on masked CartPole; prints the JSON result.

    ``DIR`` may be a checkpoint whose save crashed between its two renames: the
    previous one is read then, and the result names the directory actually read.
    """
    from agents.r2d2 import Actor, Learner, evaluate
    from agents.r2d2.checkpoint import meta_config, read_meta
    from agents.seeds import RunSeeds

    path, meta = read_meta(args.eval)
    saved = meta_config(path / "loop.json", meta)
    seed = RunSeeds(args.seed).evaluation_env
    env = make_env(args.eval_episodes, seed=seed)
    try:
        obs_dim, num_actions = env.single_observation_space.shape[0], env.single_action_space.n
        learner = Learner(saved, int(obs_dim), int(num_actions), seed=args.seed)
        learner.assign_state(learner.read_checkpoint(path))
        actor = Actor(saved, env, seed=seed, epsilons=[0.0] * args.eval_episodes)
        returns = evaluate(actor, learner.get_weights(), seed=RunSeeds(args.seed).evaluation(0))
    finally:
        env.close()
    result = {
        "checkpoint": str(path),
        "episodes": len(returns),
        "mean_return": float(returns.mean()),
        "returns": returns.tolist(),
    }
    print(json.dumps(result))
    return result


def run_dir(args: Args, config) -> Path:
    """RUN_DIR/NAME (not created here: the run creates it once it starts, so a failed resume leaves none);
    NAME defaults to masked-cartpole-<core>[-a<actors>]-s<seed>."""
    actors = f"-a{args.actors}" if args.actors else ""
    name = args.name or f"masked-cartpole-{config.core}{actors}-s{args.seed}"
    return Path(args.run_dir) / name


def _summary_fields(args: Args, config, out_dir: Path) -> dict[str, Any]:
    return {
        "name": out_dir.name,
        "seed": args.seed,
        "config": config.to_json(),
        "args": dataclasses.asdict(args),
    }


def train(args: Args, config) -> dict[str, Any]:
    """Train, evaluate, checkpoint, plot in one process; returns the JSON summary (also in RUN_DIR/NAME/summary.json)."""
    from agents.experiment import train as train_single

    out_dir = run_dir(args, config)
    title = f"R2D2 on masked CartPole ({config.core}, seed {args.seed})"
    return train_single(
        config,
        args.run_options(),
        make_env,
        seed=args.seed,
        out_dir=out_dir,
        title=title,
        fields=_summary_fields(args, config, out_dir),
    )


class _Report:
    """A hook that adds the distributed loop's figures (workers, restarts) to the summary."""

    def on_start(self, run) -> None:
        pass

    def on_step(self, run, stats) -> None:
        return None

    def on_end(self, run, summary: dict[str, Any]) -> None:
        summary["distributed"] = run.loop.report()


def train_distributed(args: Args, config) -> dict[str, Any]:
    """``--actors N``: the same run on a :class:`agents.distributed.DistributedLoop` with N Ray actor workers.

    Outputs as the single-process run, in RUN_DIR/NAME: the learner checkpoint
    in ``checkpoint/`` and the replay server's in ``replay/`` (every
    ``checkpoint_seconds`` too); ``--resume`` reloads both.
    """
    import ray

    from agents.distributed import DistributedConfig, init_ray
    from agents.experiment import seed_everything

    options = DistributedConfig(num_actors=args.actors, env_id=MASKED_CARTPOLE_ID)
    options.check(config)
    out_dir = run_dir(args, config)
    seed_everything(args.seed, deterministic=args.deterministic)
    local_cpus = max(os.cpu_count() or 1, math.ceil(args.actors * options.actor_cpus))
    started = init_ray(args.address, num_cpus=None if args.address else local_cpus)
    # ray.init installs its own SIGTERM handler, which exits without a checkpoint: ours goes back on top.
    with sigterm_as_interrupt():
        try:
            return _run_distributed(args, config, options, out_dir)
        finally:
            if started:
                ray.shutdown()


def _run_distributed(args: Args, config, options, out_dir: Path) -> dict[str, Any]:
    from agents.distributed import DistributedLoop
    from agents.experiment import Summary, run, standard_hooks

    loop: DistributedLoop | None = None
    try:
        loop = DistributedLoop(config, options, seed=args.seed, replay_dir=out_dir / "replay")
        title = f"R2D2 on masked CartPole ({config.core}, {args.actors} Ray actors, seed {args.seed})"
        hooks = [
            *standard_hooks(config, args.run_options(), make_env, seed=args.seed, out_dir=out_dir),
            _Report(),
            Summary(title, solve_return=args.solve_return, fields=_summary_fields(args, config, out_dir)),
        ]
        resume = resume_path(args, out_dir)
        return run(loop, hooks, out_dir=out_dir, total_env_steps=args.total_env_steps, resume=resume)
    finally:
        if loop is not None:
            loop.close()


def _main(argv: list[str] | None) -> int:
    args, config = parse_args(argv)
    if args.eval:
        run_eval_only(args)
        return 0
    summary = train_distributed(args, config) if args.actors else train(args, config)
    return EXIT_INTERRUPTED if summary["stop_reason"] == "interrupted" else 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag, value or checkpoint (one line on stderr), 130 when
    interrupted (Ctrl-C or SIGTERM; a run writes its final checkpoint first)."""
    return run_script(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
