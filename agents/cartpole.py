"""Masked-CartPole R2D2 demo and CLI: python -m agents.cartpole [--seed S] [--resume DIR] [--eval DIR]."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

__all__ = [
    "Args",
    "History",
    "interrupt_on_sigterm",
    "main",
    "parse_args",
    "plot",
    "run_dir",
    "run_training",
    "seed_everything",
    "train",
]


def _arg(default: Any, doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class Args:
    """Command-line arguments of the demo. Every R2D2Config field is also a flag (see --help)."""

    seed: int = _arg(0, "Seed for weights, envs, exploration and replay sampling (the only seed).")
    name: str = _arg("", "Run name; outputs go to RUN_DIR/NAME (default: masked-cartpole-<core>-s<seed>).")
    run_dir: str = _arg("runs", "Directory holding one sub-directory per run.")
    total_env_steps: int = _arg(150_000, "Stop after this many env steps.")
    eval_every: int = _arg(5_000, "Env steps between greedy evaluations.")
    eval_episodes: int = _arg(20, "Greedy episodes per evaluation (run side by side).")
    solve_return: float = _arg(475.0, "Mean greedy return that counts as solved.")
    stop_when_solved: bool = _arg(True, "Stop at the first evaluation that reaches solve_return.")
    checkpoint_every: int = _arg(25_000, "Env steps between checkpoints (0: only at the end).")
    resume: str = _arg("", "Continue from this checkpoint directory ('auto': RUN_DIR/NAME/checkpoint).")
    eval: str = _arg("", "Only evaluate the checkpoint in this directory: greedy episodes, then exit.")
    progress: bool = _arg(True, "Show a tqdm progress bar.")
    deterministic: bool = _arg(True, "Enable TensorFlow op determinism (same seed, same run on the CPU).")
    actors: int = _arg(0, "Run N actor processes on Ray (0: everything in this process, Ray not imported).")
    address: str = _arg("", "Ray cluster address to join (default: start a local Ray).")

    def __post_init__(self) -> None:
        for name, minimum in (
            ("seed", 0),
            ("total_env_steps", 1),
            ("eval_every", 1),
            ("eval_episodes", 1),
            ("checkpoint_every", 0),
            ("actors", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
            if value < minimum:
                raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
        if isinstance(self.solve_return, bool) or not isinstance(self.solve_return, (int, float)):
            raise TypeError(f"solve_return: expected a number, got {self.solve_return!r}")
        for name in ("stop_when_solved", "progress", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("name", "run_dir", "resume", "eval", "address"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name}: expected a str, got {getattr(self, name)!r}")
        if not self.run_dir:
            raise ValueError("run_dir: expected a directory path, got ''")
        if self.address and not self.actors:
            raise ValueError(f"address: {self.address!r} given but actors=0; expected --actors N with it")


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_fields(parser: argparse.ArgumentParser, cls: type, group_title: str) -> None:
    group = parser.add_argument_group(group_title)
    hints = {f.name: f for f in dataclasses.fields(cls)}
    instance = cls()
    for name, f in hints.items():
        default = getattr(instance, name)
        flag = "--" + name.replace("_", "-")
        doc = f.metadata.get("doc", "")
        if isinstance(default, bool):
            group.add_argument(
                flag, dest=name, type=_bool, default=default, metavar="BOOL", help=f"{doc} [{default}]"
            )
        elif isinstance(default, tuple):
            group.add_argument(
                flag,
                dest=name,
                type=int,
                nargs="+",
                default=default,
                metavar="N",
                help=f"{doc} {list(default)}",
            )
        else:
            group.add_argument(
                flag, dest=name, type=type(default), default=default, help=f"{doc} [{default!r}]"
            )


def parse_args(argv: list[str] | None = None):
    """Parse the CLI into (Args, R2D2Config). Bad config values raise ValueError naming the field."""
    from agents.r2d2 import R2D2Config

    parser = argparse.ArgumentParser(
        prog="python -m agents.cartpole",
        description="R2D2 with burn-in on masked CartPole (cart position and pole angle only).",
    )
    _add_fields(parser, Args, "run")
    _add_fields(
        parser,
        R2D2Config,
        "R2D2 config (defaults tuned for masked CartPole; paper values in brackets of the docs)",
    )
    ns = vars(parser.parse_args(argv))
    arg_names = {f.name for f in dataclasses.fields(Args)}
    args = Args(**{k: v for k, v in ns.items() if k in arg_names})
    config = R2D2Config.from_json({k: v for k, v in ns.items() if k not in arg_names})
    return args, config


def seed_everything(seed: int, *, deterministic: bool) -> None:
    """All seeding happens here: Python, NumPy and TensorFlow global seeds, and op determinism."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


class History:
    """Everything the plot and the JSON summary need."""

    def __init__(self) -> None:
        self.evals: list[dict[str, float]] = []
        self.episodes: list[tuple[int, float]] = []
        self.learner: list[dict[str, float]] = []

    def to_json(self) -> dict[str, Any]:
        return {"evals": self.evals, "episodes": self.episodes, "learner": self.learner}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> History:
        h = cls()
        h.evals = list(data.get("evals", []))
        h.episodes = [tuple(e) for e in data.get("episodes", [])]
        h.learner = list(data.get("learner", []))
        return h


def plot(history: History, path: Path, title: str) -> None:
    """Eval return against env steps, and ΔQ against learner updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if history.episodes:
        steps, rets = zip(*history.episodes)
        ax1.plot(steps, rets, ".", ms=2, alpha=0.3, color="tab:gray", label="training episodes (ε-greedy)")
    if history.evals:
        ax1.plot(
            [e["env_steps"] for e in history.evals],
            [e["mean_return"] for e in history.evals],
            "o-",
            color="tab:blue",
            label="greedy eval (mean)",
        )
    ax1.axhline(475, color="tab:green", ls="--", lw=1, label="solved (475)")
    ax1.set_xlabel("env steps")
    ax1.set_ylabel("return")
    ax1.set_title("return")
    ax1.legend(loc="upper left", fontsize=8)
    if history.learner:
        upd = [e["updates"] for e in history.learner]
        ax2.plot(upd, [e["delta_q_first"] for e in history.learner], label="ΔQ first trained step")
        ax2.plot(upd, [e["delta_q_last"] for e in history.learner], label="ΔQ last stored-state step")
        ax2.set_yscale("symlog", linthresh=1e-3)
        ax2.legend(fontsize=8)
    ax2.set_xlabel("learner updates")
    ax2.set_ylabel("ΔQ")
    ax2.set_title("recurrent-state staleness ΔQ")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_eval_only(args: Args) -> dict[str, Any]:
    from agents.envs import MASKED_CARTPOLE_ID, make_vector_env
    from agents.r2d2 import Learner, R2D2Config, evaluate

    path = Path(args.eval)
    meta_path = path / "loop.json"
    if not meta_path.is_file():
        raise ValueError(f"eval: {path} is not a checkpoint directory (no loop.json)")
    saved = R2D2Config.from_json(json.loads(meta_path.read_text())["config"])
    env = make_vector_env(1, env_id=MASKED_CARTPOLE_ID)
    obs_dim, num_actions = env.single_observation_space.shape[0], env.single_action_space.n
    env.close()
    learner = Learner(saved, obs_dim, num_actions, seed=args.seed)
    with np.load(path / "learner.npz", allow_pickle=False) as data:
        learner.load_state_dict({k: data[k] for k in data.files})
    returns = evaluate(saved, learner.get_weights(), num_episodes=args.eval_episodes, seed=args.seed + 10_000)
    result = {
        "checkpoint": str(path),
        "episodes": len(returns),
        "mean_return": float(returns.mean()),
        "returns": returns.tolist(),
    }
    print(json.dumps(result))
    return result


def run_dir(args: Args, config) -> Path:
    """RUN_DIR/NAME, created; NAME defaults to masked-cartpole-<core>[-a<actors>]-s<seed>."""
    actors = f"-a{args.actors}" if args.actors else ""
    name = args.name or f"masked-cartpole-{config.core}{actors}-s{args.seed}"
    out_dir = Path(args.run_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def train(args: Args, config) -> dict[str, Any]:
    """Train, evaluate, checkpoint, plot; returns the JSON summary (also written to RUN_DIR/NAME/summary.json)."""
    from agents.envs import MASKED_CARTPOLE_ID, make_vector_env
    from agents.r2d2 import TrainLoop

    out_dir = run_dir(args, config)
    seed_everything(args.seed, deterministic=args.deterministic)
    env = make_vector_env(config.num_envs, env_id=MASKED_CARTPOLE_ID, seed=args.seed)
    try:
        loop = TrainLoop(config, env, seed=args.seed)
        title = f"R2D2 on masked CartPole ({config.core}, seed {args.seed})"
        return run_training(args, config, loop, out_dir=out_dir, title=title)
    finally:
        env.close()


def run_training(args: Args, config, loop, *, out_dir: Path, title: str) -> dict[str, Any]:
    """The training run around ``loop``: resume, evals, progress, TensorBoard, checkpoints, summary and plot.

    ``loop`` is a :class:`agents.r2d2.TrainLoop` or anything with its interface
    (:class:`agents.distributed.DistributedLoop`): ``iterate()``, ``env_steps``,
    ``learner``, ``replay.stats()``, ``save(dir, extra=)`` and ``load(dir)``.
    """
    import tensorflow as tf
    from tqdm import tqdm

    from agents.envs import MASKED_CARTPOLE_ID, make_vector_env
    from agents.r2d2 import Actor, evaluate

    name = out_dir.name
    ckpt_dir = out_dir / "checkpoint"
    history = History()
    wall_before = 0.0
    if args.resume:
        resume = ckpt_dir if args.resume == "auto" else Path(args.resume)
        extra = loop.load(resume)
        history = History.from_json(extra.get("history", {}))
        wall_before = float(extra.get("wall_time_s", 0.0))
        print(f"resumed from {resume} at {loop.env_steps} env steps, {loop.learner.num_updates} updates")

    eval_env = make_vector_env(args.eval_episodes, env_id=MASKED_CARTPOLE_ID, seed=args.seed + 10_000)
    eval_actor = Actor(config, eval_env, seed=args.seed + 10_000, epsilons=np.zeros(args.eval_episodes))
    writer = tf.summary.create_file_writer(str(out_dir / "tb"))

    start = time.perf_counter()
    start_env_steps, start_updates = loop.env_steps, loop.learner.num_updates
    recent = deque((r for _, r in history.episodes[-20:]), maxlen=20)
    solved_at = next((e["env_steps"] for e in history.evals if e["mean_return"] >= args.solve_return), None)
    next_eval = (loop.env_steps // args.eval_every + 1) * args.eval_every
    next_ckpt = (
        (loop.env_steps // args.checkpoint_every + 1) * args.checkpoint_every
        if args.checkpoint_every
        else None
    )
    last_loss = last_dq_first = last_dq_last = float("nan")
    rate_t, rate_u = time.perf_counter(), loop.learner.num_updates
    ups = 0.0

    def checkpoint() -> None:
        loop.save(
            ckpt_dir,
            extra={"history": history.to_json(), "wall_time_s": wall_before + time.perf_counter() - start},
        )

    bar = tqdm(
        total=args.total_env_steps,
        initial=loop.env_steps,
        unit="step",
        disable=not args.progress,
        dynamic_ncols=True,
    )
    stop_reason = "budget"
    try:
        while loop.env_steps < args.total_env_steps:
            before = loop.env_steps
            stats = loop.iterate()
            bar.update(stats.env_steps - before)
            with writer.as_default(step=stats.env_steps):
                for _, ret, length in stats.finished:
                    recent.append(ret)
                    history.episodes.append((stats.env_steps, ret))
                    tf.summary.scalar("train/episode_return", ret)
                    tf.summary.scalar("train/episode_length", length)
                if stats.learner is not None:
                    last_loss = stats.learner.loss
                    last_dq_first, last_dq_last = stats.learner.delta_q_first, stats.learner.delta_q_last
                    if stats.updates % 50 == 0:
                        tf.summary.scalar("learner/loss", last_loss)
                        tf.summary.scalar("learner/delta_q_first", last_dq_first)
                        tf.summary.scalar("learner/delta_q_last", last_dq_last)
                        tf.summary.scalar("learner/updates", stats.updates)
                        history.learner.append(
                            {
                                "updates": stats.updates,
                                "env_steps": stats.env_steps,
                                "loss": last_loss,
                                "delta_q_first": last_dq_first,
                                "delta_q_last": last_dq_last,
                            }
                        )
            now = time.perf_counter()
            if now - rate_t >= 2.0:
                ups = (loop.learner.num_updates - rate_u) / (now - rate_t)
                rate_t, rate_u = now, loop.learner.num_updates
                with writer.as_default(step=stats.env_steps):
                    tf.summary.scalar("learner/updates_per_s", ups)
            bar.set_postfix(
                ep=stats.episodes,
                ret=f"{np.mean(recent):.0f}" if recent else "-",
                loss=f"{last_loss:.3g}",
                dq=f"{last_dq_last:.2g}",
                upd=stats.updates,
                ups=f"{ups:.1f}",
                refresh=False,
            )
            if loop.env_steps >= next_eval:
                next_eval += args.eval_every
                returns = evaluate(
                    config,
                    loop.learner.get_weights(),
                    num_episodes=args.eval_episodes,
                    seed=args.seed + 10_000 + len(history.evals),
                    actor=eval_actor,
                )
                entry = {
                    "env_steps": loop.env_steps,
                    "updates": loop.learner.num_updates,
                    "mean_return": float(returns.mean()),
                    "min_return": float(returns.min()),
                    "wall_time_s": wall_before + time.perf_counter() - start,
                }
                history.evals.append(entry)
                with writer.as_default(step=loop.env_steps):
                    tf.summary.scalar("eval/mean_return", entry["mean_return"])
                bar.write(
                    f"eval @ {loop.env_steps} env steps: mean greedy return {entry['mean_return']:.1f} "
                    f"(min {entry['min_return']:.0f}) over {len(returns)} episodes"
                )
                if solved_at is None and entry["mean_return"] >= args.solve_return:
                    solved_at = loop.env_steps
                    if args.stop_when_solved:
                        stop_reason = "solved"
                        break
            if next_ckpt is not None and loop.env_steps >= next_ckpt:
                next_ckpt += args.checkpoint_every
                checkpoint()
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        bar.write("interrupted: writing a final checkpoint")
    finally:
        bar.close()
        eval_env.close()
    checkpoint()
    writer.flush()
    session = time.perf_counter() - start
    wall = wall_before + session
    summary = {
        "name": name,
        "seed": args.seed,
        "stop_reason": stop_reason,
        "env_steps": loop.env_steps,
        "updates": loop.learner.num_updates,
        "episodes": len(history.episodes),
        "solved_at_env_steps": solved_at,
        "final_eval_mean_return": history.evals[-1]["mean_return"] if history.evals else None,
        "best_eval_mean_return": max((e["mean_return"] for e in history.evals), default=None),
        "wall_time_s": wall,
        "throughput": {
            "session_s": session,
            "env_steps_per_s": (loop.env_steps - start_env_steps) / session,
            "updates_per_s": (loop.learner.num_updates - start_updates) / session,
        },
        "replay": loop.replay.stats(),
        "config": config.to_json(),
        "args": dataclasses.asdict(args),
        "history": history.to_json(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    plot(history, out_dir / "plot.png", title)
    print(
        f"{stop_reason}: {loop.env_steps} env steps, {loop.learner.num_updates} updates, "
        f"solved at {solved_at}, wall {wall:.0f} s; outputs in {out_dir}"
    )
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def interrupt_on_sigterm() -> None:
    """A scheduler's SIGTERM ends the run as Ctrl-C does: a final checkpoint, the summary, a clean shutdown."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    interrupt_on_sigterm()
    if args.eval:
        run_eval_only(args)
        return 0
    if args.actors:
        from agents.distributed import train_distributed

        train_distributed(args, config)
        return 0
    train(args, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
