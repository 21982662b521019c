"""R2D2 on any gymnasium env: python -m agents.train --env ENV_ID [--preset NAME] [--import MODULE] ...

Usage: ``--env ENV_ID [--preset NAME] [--import MODULE] [--seed S] [--name NAME]
[--resume DIR|auto] [--eval DIR] [--allow-mismatch env,seed] [--actors N]``.

Every R2D2Config field is a flag; ``--preset`` picks the defaults they start
from. Ids a package registers on import work as they are (``popgym-…`` imports
popgym, ``ALE/…`` ale_py) or with ``--import MODULE``. Evaluation, the solve
threshold (``--solve-return``, else the env spec's ``reward_threshold``),
plots, the summary, TensorBoard, checkpoints, ``--resume``, ``--eval`` and
``--actors N`` on Ray all use that env.

A run directory belongs to one run: without ``--resume`` one that holds an
earlier run is refused, and a checkpoint of another env or seed is refused
unless ``--allow-mismatch`` names it. Every check of the flags, the env, the
run directory and the checkpoint happens before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

from agents.cli import EXIT_INTERRUPTED, EXIT_USAGE, ArgumentParser, one_line, run_script, script_imports
from agents.interrupts import sigterm_as_interrupt

PROG = "python -m agents.train"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from agents.envs import MASKED_CARTPOLE_ID, ensure_registered, make_vector_env, solve_threshold
    from agents.experiment import RunOptions, resume_path
    from agents.r2d2.checkpoint import MISMATCH_OVERRIDES
    from agents.r2d2.config import PRESET_DOCS, PRESETS, documented, preset
    from agents.rundir import check_writable, earlier_run
    from agents.spaces import action_encoding, observation_encoding
    from burnin._checks import check_choice, check_int, check_str

__all__ = [
    "PROG",
    "Args",
    "check_env",
    "main",
    "parse_args",
    "run_dir",
    "run_eval_only",
    "train_distributed",
    "train_local",
]

RAY_TEXT = ("learner_resources", "actor_resources")
"""Flags of a run on Ray written as Ray resources, ``NAME=AMOUNT,...``."""

RUN_NAMES = {MASKED_CARTPOLE_ID: "masked-cartpole"}
"""Run-name prefixes of ids whose runs were named before the CLI took any env (their ``--resume auto``
directories keep working); any other id is named after itself."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Args(RunOptions):
    """Command-line arguments besides the R2D2Config fields (see --help)."""

    env: str = documented("", "Gymnasium env id (required); 'module:id' imports module first.")
    preset: str = documented(
        "", "R2D2Config defaults the flags start from (see below; default: chosen by the env id)."
    )
    import_module: str = documented("", "Import this module first (it registers the env id).")
    seed: int = documented(0, "Seed for weights, envs, exploration and replay sampling (the only seed).")
    name: str = documented("", "Run name; outputs go to RUN_DIR/NAME (default: <env>-<core>-s<seed>).")
    run_dir: str = documented("runs", "Directory holding one sub-directory per run.")
    eval: str = documented("", "Only evaluate the checkpoint in this directory: greedy episodes, then exit.")
    actors: int = documented(
        0, "Run N actor processes on Ray (0: everything in this process, Ray not imported)."
    )
    address: str = documented("", "Ray cluster address to join (default: start a local Ray).")
    learner_resources: str = documented("", "Learner as a Ray actor asking for these resources (GPU=1,...).")
    actor_resources: str = documented("", "Ray resources each actor worker asks for besides a CPU (a=1,...).")
    replay_shards: int = documented(1, "Replay servers the workers' lanes are split over (sampled as one).")
    allow_mismatch: str = documented(
        "",
        "With --resume or --eval: accept a checkpoint of another env ('env') or seed ('seed'), "
        "comma-separated; its observation and action layout must still match.",
    )

    def __post_init__(self) -> None:
        check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        super().__post_init__()
        check_int("actors", self.actors, minimum=0)
        for name in ("name", "run_dir", "eval", "address", "import_module", "allow_mismatch", *RAY_TEXT):
            check_str(name, getattr(self, name))
        check_int("replay_shards", self.replay_shards, minimum=1)
        self._check_conflicts()
        check_str("env", self.env)
        if not self.env:
            raise ValueError("env: expected a gymnasium env id (--env ENV_ID), got ''")
        check_choice("preset", self.preset or default_preset(self.env), PRESETS)
        if not self.run_dir:
            raise ValueError("run_dir: expected a directory path, got ''")
        for name in ("address", *RAY_TEXT, "replay_shards"):  # the flags of a run on Ray, else ignored
            value = getattr(self, name)
            if value not in ("", 1) and not self.actors:
                raise ValueError(f"{name}: {value!r} given but actors=0; expected --actors N with it")
        ensure_registered(self.env_id)

    def _check_conflicts(self) -> None:
        """ValueError naming the flag that another one makes meaningless (it would be silently ignored)."""
        for name, given in (("resume", self.resume), ("actors", self.actors)):
            if self.eval and given:
                raise ValueError(
                    f"eval: {self.eval!r} given with --{name} {given}; --eval only evaluates the checkpoint "
                    f"it names, in this process: drop --{name}"
                )
        bad = sorted(set(self.overrides) - set(MISMATCH_OVERRIDES))
        if bad:
            raise ValueError(f"allow_mismatch: expected entries among {MISMATCH_OVERRIDES}, got {bad}")
        if self.overrides and not (self.resume or self.eval):
            raise ValueError(
                f"allow_mismatch: {self.allow_mismatch!r} given without --resume or --eval; it only "
                "applies to a checkpoint read"
            )

    @property
    def overrides(self) -> frozenset[str]:
        """The ``--allow-mismatch`` entries."""
        return frozenset(x.strip() for x in self.allow_mismatch.split(",") if x.strip())

    @property
    def env_id(self) -> str:
        """The id every process makes: ``module:env`` with ``--import module`` (workers import it too)."""
        return f"{self.import_module}:{self.env}" if self.import_module else self.env

    def run_options(self) -> RunOptions:
        """The harness's part of these arguments; the solve threshold defaults to the env spec's."""
        names = {f.name for f in dataclasses.fields(RunOptions)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        if values["solve_return"] is None:
            values["solve_return"] = solve_threshold(self.env_id)
        return RunOptions(**values)


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


MAX_SEED = 2**32 - 1
"""Largest run seed: NumPy's and Keras's global seeds take 32 bits."""

FLAGS = {"import_module": "--import"}
"""Flags not spelled after their field (``import`` is a Python keyword)."""


def _add_fields(parser: argparse.ArgumentParser, cls: type, group_title: str, defaults: Any) -> None:
    group = parser.add_argument_group(group_title)
    for f in dataclasses.fields(cls):
        name = f.name
        default = getattr(defaults, name)
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        doc = f.metadata.get("doc", "")
        common = dict(dest=name, default=default)
        if isinstance(default, bool):
            group.add_argument(flag, type=_bool, metavar="BOOL", help=f"{doc} [{default}]", **common)
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else int
            group.add_argument(
                flag, type=kind, nargs="*", metavar="X", help=f"{doc} {list(default)}", **common
            )
        else:
            kind = float if default is None else type(default)  # solve_return: a float or None
            group.add_argument(flag, type=kind, help=f"{doc} [{default!r}]", **common)


def _defaults(cls: type) -> Any:
    """The field defaults of a dataclass that cannot be built without arguments, as attributes."""
    return argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(cls)})


DEFAULT_PRESETS = (("ALE/", "atari"), ("popgym-", "popgym"))
"""(id prefix, preset) chosen when --preset is not given; any other id gets 'masked-cartpole' (the
defaults)."""


def default_preset(env: str) -> str:
    """The preset for ``env`` when none is given (:data:`DEFAULT_PRESETS`)."""
    bare = env.rpartition(":")[2]
    return next((name for prefix, name in DEFAULT_PRESETS if bare.startswith(prefix)), "masked-cartpole")


def _preset_help() -> str:
    lines = [f"  {n}: {PRESET_DOCS[n]}" for n in PRESETS]
    auto = ", ".join(f"{prefix}… → {name}" for prefix, name in DEFAULT_PRESETS)
    return f"presets (--preset NAME; default by env id: {auto}, else masked-cartpole):\n" + "\n".join(lines)


def parse_args(argv: list[str] | None = None, *, prog: str = PROG):
    """Parse the CLI into (Args, R2D2Config): the config starts from ``--preset`` and every flag given
    overrides it. A bad value, an env the agent cannot take, or a ``--resume`` / ``--eval`` that names no
    checkpoint prints one line naming its flag and exits 2 (:mod:`agents.cli`)."""
    from agents.r2d2 import R2D2Config

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="")
    first.add_argument("--env", default="")
    known = first.parse_known_args(argv)[0]
    parser = ArgumentParser(
        prog=prog,
        description="R2D2 with burn-in on any gymnasium env with Discrete (or small MultiDiscrete) actions.",
        epilog=_preset_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_fields(parser, Args, "run", _defaults(Args))
    chosen = parser.build(check_choice, "preset", known.preset or default_preset(known.env), PRESETS)
    _add_fields(
        parser,
        R2D2Config,
        f"R2D2 config (defaults: preset {chosen!r}; paper values in the docs)",
        preset(chosen),
    )
    # --core-layers given at all, even at the preset's value, conflicts with --core dense: None marks it unset.
    parser.set_defaults(core_layers=None)
    ns = {**vars(parser.parse_args(argv)), "preset": chosen}
    layers_given = ns["core_layers"] is not None
    if not layers_given:
        ns["core_layers"] = preset(chosen).core_layers
    arg_names = {f.name for f in dataclasses.fields(Args)}
    aliases = {"env_id": "env"}
    args = parser.build(Args, **{k: v for k, v in ns.items() if k in arg_names}, aliases=aliases)
    config = parser.build(R2D2Config.from_json, {k: v for k, v in ns.items() if k not in arg_names})
    if config.core == "dense" and layers_given:
        parser.error(
            f"--core-layers: {' '.join(config.core_layers)} given with --core dense, which has no recurrent "
            "layers; drop --core-layers, or use --core lstm"
        )
    layout = parser.build(check_env, args.env_id, aliases=aliases)
    if args.actors:
        options = parser.build(distributed_options, args)
        parser.build(options.check, config, aliases={"num_actors": "actors"})
    elif not args.eval:
        from agents.r2d2.loop import check_replay_fill

        parser.build(check_replay_fill, config)
    if args.eval:
        check_checkpoint(parser, args, "eval", args.eval, layout)
        return args, config
    out_dir = run_dir(args, config)
    parser.build(check_writable, "run_dir", out_dir)
    found = (
        check_checkpoint(parser, args, "resume", resume_path(args, out_dir), layout) if args.resume else None
    )
    earlier = earlier_run(out_dir)
    if earlier and (found is None or found.parent.absolute() != out_dir.absolute()):
        resuming = "" if found is None else f"--resume {args.resume} would write over it; "
        parser.error(
            f"run directory {out_dir} holds an earlier run ({', '.join(earlier)}); {resuming}continue it with "
            "--resume auto, or start another with --name NAME"
        )
    return args, config


def check_env(env_id: str) -> tuple[Any, Any]:
    """The env's observation and action encodings (:mod:`agents.spaces`); ValueError (naming ``env_id``)
    unless the agent can take its spaces. One env is made, reset and closed."""
    env = make_vector_env(1, env_id=env_id)
    try:
        return observation_encoding(env.single_observation_space), action_encoding(env.single_action_space)
    finally:
        env.close()


def check_checkpoint(
    parser: ArgumentParser, args: Args, dest: str, path: Any, layout: tuple[Any, Any]
) -> Path:
    """The checkpoint directory ``--resume`` / ``--eval`` (``dest``) names, read and checked against this run:
    one line naming both sides (exit 2) for another seed or env, unless ``--allow-mismatch`` accepts it, or
    another layout. A checkpoint that records no env or layout (written before they were recorded) is
    accepted with a note: only its seed can be checked."""
    from agents.r2d2.checkpoint import (
        CheckpointError,
        IdentityMismatch,
        check_identity,
        read_meta,
        run_identity,
    )

    found = parser.checkpoint(dest, path)
    env = ensure_registered(args.env_id)
    mine = run_identity(env_id=env, observation=layout[0], actions=layout[1])
    try:
        _, meta = read_meta(found)
        recorded = check_identity(
            found / "loop.json", meta, seed=args.seed, identity=mine, allow=args.overrides
        )
    except IdentityMismatch as err:
        what = "evaluate it" if dest == "eval" else "continue it"
        hints = {
            "seed": f"pass --seed {err.saved}, or --allow-mismatch seed to {what} under seed {err.mine}",
            "env": f"pass --env {err.saved}, or --allow-mismatch env to {what} on {err.mine}",
        }
        hint = hints.get(err.field, "its network is built for that layout: use the env it was trained on")
        parser.error(f"--{dest}: {err}; {hint}")
    except CheckpointError as err:
        parser.error(f"--{dest}: {err}")
    if not recorded:
        print(
            f"{parser.prog}: note: checkpoint {found} records no env or layout (written before they were "
            f"recorded): only its seed is checked, and its env is taken to be {env!r}",
            file=sys.stderr,
        )
    return found


def make_env_factory(args: Args):
    """``make_env(num_envs, seed=...)``: vector envs of the run's env."""
    return functools.partial(make_vector_env, env_id=args.env_id)


def run_eval_only(args: Args) -> dict[str, Any]:
    """``--eval DIR``: greedy episodes of the checkpoint's learner on the env; prints the JSON result.

    ``DIR`` may be a checkpoint whose save crashed between its two renames: the
    previous one is read then, and the result names the directory actually read.
    """
    from agents.r2d2 import Actor, Learner, evaluate
    from agents.r2d2.checkpoint import meta_config, read_meta
    from agents.seeds import RunSeeds

    path, meta = read_meta(args.eval)
    saved = meta_config(path / "loop.json", meta)
    seed = RunSeeds(args.seed).evaluation_env
    env = make_vector_env(args.eval_episodes, env_id=args.env_id, seed=seed)
    try:
        actor = Actor(saved, env, seed=seed, epsilons=[0.0] * args.eval_episodes)
        learner = Learner(saved, actor.encoding, actor.num_actions, seed=args.seed)
        learner.assign_state(learner.read_checkpoint(path))
        returns = evaluate(actor, learner.get_weights(), seed=RunSeeds(args.seed).evaluation(0))
    finally:
        env.close()
    result = {
        "checkpoint": str(path),
        "env": args.env_id,
        "episodes": len(returns),
        "mean_return": float(returns.mean()),
        "returns": returns.tolist(),
    }
    print(json.dumps(result))
    return result


def run_dir(args: Args, config) -> Path:
    """RUN_DIR/NAME (not created here: the run creates it once it starts, so a failed resume leaves none);
    NAME defaults to <env>-<core>[-a<actors>]-s<seed>, <env> the id without a
    'module:' prefix and with '/' as '-' (or its :data:`RUN_NAMES` entry)."""
    actors = f"-a{args.actors}" if args.actors else ""
    bare = args.env.rpartition(":")[2]  # 'module:id' names the run after the id
    env = RUN_NAMES.get(bare, bare.replace("/", "-"))
    name = args.name or f"{env}-{config.core}{actors}-s{args.seed}"
    return Path(args.run_dir) / name


def _summary_fields(args: Args, config, out_dir: Path) -> dict[str, Any]:
    return {
        "name": out_dir.name,
        "env": args.env_id,
        "seed": args.seed,
        "config": config.to_json(),
        "args": dataclasses.asdict(args),
    }


def _title(args: Args, config) -> str:
    actors = f", {args.actors} Ray actors" if args.actors else ""
    return f"R2D2 on {args.env} ({config.core}{actors}, seed {args.seed})"


def train_local(args: Args, config) -> dict[str, Any]:
    """Train, evaluate, checkpoint, plot in one process; returns the JSON summary (also in RUN_DIR/NAME/summary.json)."""
    from agents.experiment import train

    out_dir = run_dir(args, config)
    return train(
        config,
        args.run_options(),
        make_env_factory(args),
        seed=args.seed,
        out_dir=out_dir,
        title=_title(args, config),
        fields=_summary_fields(args, config, out_dir),
        allow_mismatch=args.overrides,
    )


def distributed_options(args: Args) -> Any:
    """The :class:`agents.distributed.DistributedConfig` of ``--actors N`` and the other flags of a run on Ray."""
    from agents.distributed import DistributedConfig

    ray_flags = {name: getattr(args, name) for name in (*RAY_TEXT, "replay_shards")}
    return DistributedConfig.from_flags(args.actors, args.env_id, **ray_flags)


def train_distributed(args: Args, config) -> dict[str, Any]:
    """``--actors N``: the same run on a :class:`agents.distributed.DistributedLoop` with N Ray actor workers.

    Outputs as the single-process run, in RUN_DIR/NAME: the learner checkpoint
    in ``checkpoint/`` and the replay server's in ``replay/`` (every
    ``checkpoint_seconds`` too); ``--resume`` reloads both.
    """
    import ray

    from agents.distributed import init_ray
    from agents.experiment import seed_everything
    from burnin.host import visible_cores

    options = distributed_options(args)
    options.check(config)
    out_dir = run_dir(args, config)
    seed_everything(args.seed, deterministic=args.deterministic)
    local_cpus = max(visible_cores(), math.ceil(args.actors * options.actor_cpus))
    started = init_ray(args.address, num_cpus=None if args.address else local_cpus)
    # ray.init installs its own SIGTERM handler, which exits without a checkpoint: ours goes back on top.
    with sigterm_as_interrupt():
        try:
            return _run_distributed(args, config, options, out_dir)
        finally:
            if started:
                ray.shutdown()


def _run_distributed(args: Args, config, options, out_dir: Path) -> dict[str, Any]:
    from agents.distributed import DistributedLoop, SummaryReport
    from agents.experiment import Summary, run, standard_hooks

    run_options = args.run_options()
    loop: DistributedLoop | None = None
    try:
        loop = DistributedLoop(config, options, seed=args.seed, replay_dir=out_dir / "replay")
        fields = _summary_fields(args, config, out_dir)
        hooks = [
            *standard_hooks(config, run_options, make_env_factory(args), seed=args.seed, out_dir=out_dir),
            SummaryReport(),
            Summary(_title(args, config), solve_return=run_options.solve_return, fields=fields),
        ]
        resume = resume_path(args, out_dir)
        return run(
            loop,
            hooks,
            out_dir=out_dir,
            total_env_steps=args.total_env_steps,
            resume=resume,
            allow_mismatch=args.overrides,
        )
    finally:
        if loop is not None:
            loop.close()


def _main(argv: list[str] | None, prog: str) -> int:
    args, config = parse_args(argv, prog=prog)
    if args.eval:
        run_eval_only(args)
        return 0
    if args.actors:
        from agents.distributed import JoinError

        try:
            summary = train_distributed(args, config)
        except JoinError as err:  # raised before anything ran: the flag or the environment is wrong
            print(f"{prog}: error: --address: {one_line(err)}", file=sys.stderr)
            return EXIT_USAGE
    else:
        summary = train_local(args, config)
    return EXIT_INTERRUPTED if summary["stop_reason"] == "interrupted" else 0


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """The CLI: 0 when done; 2 for a bad flag, value, env or checkpoint, or a Ray cluster that cannot be joined
    (one line on stderr); 1 for a run that failed after saving what it could; 130 when interrupted (Ctrl-C or
    SIGTERM; a run writes its final checkpoint first)."""
    return run_script(prog, lambda: _main(argv, prog), tf_threads=True)


if __name__ == "__main__":
    sys.exit(main())
