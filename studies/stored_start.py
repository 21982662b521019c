"""Why the stored start state loses to the zero start on POPGym's RepeatFirstEasy: training runs that probe the start state (``python -m studies.stored_start``)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agents.cli import ArgumentParser, run_script, script_imports

PROG = "python -m studies.stored_start"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from studies import sweep
    from studies.episode_probe import Recorder, true_states

ENV_ID = "popgym-RepeatFirstEasy-v0"
EVAL_EPISODES = 32

VARIANTS: dict[str, dict[str, Any]] = {
    "stored": {},
    "zero": {"state_strategy": "zero"},
    "stored-replay16k": {"replay_capacity": 16_000},
    "zero-replay16k": {"state_strategy": "zero", "replay_capacity": 16_000},
    "stored-lr1e-4": {"learning_rate": 1e-4},
    "zero-lr1e-4": {"state_strategy": "zero", "learning_rate": 1e-4},
    "stored-refresh": {"refresh_states": True},
    "stored-noprev": {"prev_action_reward": False},
    "zero-noprev": {"state_strategy": "zero", "prev_action_reward": False},
}
"""name -> R2D2Config overrides of the masked-CartPole defaults (burn-in 20, unroll 40, period 20, lr 1e-3)."""

QUICK = dict(
    torso_units=(16,), core_units=16, head_units=16, batch_size=8, num_envs=4,
    replay_capacity=4 * 500, min_replay_steps=300, env_steps_per_update=8.0,
)  # fmt: skip
"""A tiny network and replay for ``--quick`` (CI): same window layout, so the probe's third windows exist."""


def make_env(num_envs: int, seed: int):
    """RepeatFirstEasy with one-hot observations, as a NEXT_STEP-autoreset vector env."""
    import gymnasium as gym
    import popgym  # noqa: F401  (registers the popgym-… ids)

    class OneHot(gym.ObservationWrapper):
        def __init__(self, env):
            super().__init__(env)
            self.n = int(env.observation_space.n)
            self.observation_space = gym.spaces.Box(0.0, 1.0, (self.n,), np.float32)

        def observation(self, obs):
            return np.eye(self.n, dtype=np.float32)[int(obs)]

    env = gym.vector.SyncVectorEnv([lambda: OneHot(gym.make(ENV_ID)) for _ in range(num_envs)])
    env.reset(seed=seed)
    return env


def _linear_probe(x: np.ndarray, y: np.ndarray, classes: int) -> float:
    """Held-out accuracy of a softmax regression reading ``y`` from ``x`` (first half trains, second half tests)."""
    import keras

    half = len(x) // 2
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(classes, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:half], y[:half], epochs=200, batch_size=64, verbose=0)
    return float(model.evaluate(x[half:], y[half:], verbose=0)[1])


def _start_qs(learner, batch) -> dict[str, np.ndarray]:
    """Q over the window [B, L, A] from each start the learner could use, all with the current θ."""
    runner, burn_in = learner.probe_runner, learner.spec.burn_in
    inputs = learner.model_inputs(batch.observation, batch.prev_action, batch.prev_reward)
    # A zero start that cannot read the card from the burn-in's feedback: previous action and reward
    # zeroed over the burn-in (and at the first trained step, whose inputs are the burn-in's last feedback).
    blind_action, blind_reward = batch.prev_action.copy(), batch.prev_reward.copy()
    blind_action[:, : burn_in + 1], blind_reward[:, : burn_in + 1] = 0, 0.0
    blind = learner.model_inputs(batch.observation, blind_action, blind_reward)
    return {
        "zero_burn_in": runner(inputs, None, mask=batch.valid_t).outputs.numpy(),
        "stored_burn_in": runner(inputs, batch.actor_state, mask=batch.valid_t).outputs.numpy(),
        "zero_burn_in_blind": runner(blind, None, mask=batch.valid_t).outputs.numpy(),
    }


def _metrics(
    out: dict[str, list], q: dict[str, np.ndarray], card: np.ndarray, mask: np.ndarray, b: int, U: int
):
    """Per start: how often the greedy action over the trained steps is the first card (the right answer),
    and ΔQ against the true state at the first trained step and averaged over the trained steps."""
    from burnin.diagnostics import delta_q

    trained = mask[:, b : b + U]
    ok = mask[:, b]
    for name, qq in q.items():
        right = (qq[:, b : b + U].argmax(-1) == card[:, None]) & trained
        out.setdefault(f"right/{name}", []).extend((right.sum(1) / np.maximum(trained.sum(1), 1))[ok])
        if name != "true":
            per_step = np.stack(
                [
                    delta_q(qq[:, t], q["true"][:, t], q["true"][:, b : b + U], trained).numpy()
                    for t in range(b, b + U)
                ],
                1,
            )
            out.setdefault(f"dq_t1/{name}", []).extend(per_step[ok, 0])
            out.setdefault(f"dq_mean/{name}", []).extend(
                np.nanmean(np.where(trained, per_step, np.nan)[ok], 1)
            )


def probe(loop, rec: Recorder, *, batches: int = 8, raw: list | None = None) -> dict[str, float]:
    """Start-state quality on the *third* windows: those whose burn-in starts mid-episode (at episode step
    ``period``), the only ones where the zero and the stored start differ. See docs/stored_start.md."""
    learner, spec = loop.learner, loop.learner.spec
    b, U = spec.burn_in, spec.unroll
    out: dict[str, list] = {}
    xs: dict[str, list] = {"stored": [], "true": []}
    ys, ages = [], []
    for _ in range(batches):
        batch = loop.replay.sample(learner.config.batch_size)
        third = batch.valid_t[:, 0] & np.array([bool(np.any(h != 0)) for h in batch.actor_state[0][0]])
        truth = true_states(learner, rec, batch, np.flatnonzero(third))
        if truth.rows.size == 0:
            continue
        rows, where = truth.rows, truth.where
        q = {"true": truth.q, **{k: v[rows] for k, v in _start_qs(learner, batch).items()}}
        card = np.array([rec.logs[lane].observation[e].argmax() for lane, e, _ in where])
        mask = batch.valid_t[rows]
        if raw is not None:
            actor_q = np.zeros_like(q["true"])
            for i, (lane, _, s) in enumerate(where):
                valid = np.flatnonzero(mask[i])
                actor_q[i, valid] = rec.logs[lane].q[s + valid]
            raw.append({**q, "actor": actor_q, "mask": mask})
        _metrics(out, q, card, mask, b, U)
        xs["stored"].extend(np.concatenate([a[rows] for a in batch.actor_state[0]], 1))
        xs["true"].extend(np.concatenate(truth.state[0], 1))
        ys.extend(card)
        ages.extend(learner.num_updates - rec.logs[lane].updates[s] for lane, _, s in where)
    result = {k: float(np.nanmean(v)) if v else float("nan") for k, v in out.items()}
    result.update(third_rows=len(ys), age_updates=float(np.mean(ages)) if ages else float("nan"))
    for name, x in xs.items():
        enough = len(x) >= 40
        result[f"probe/{name}"] = (
            _linear_probe(np.array(x), np.array(ys), learner.num_actions) if enough else float("nan")
        )
    return result


def check(seed: int = 0, *, actor_steps: int = 300, quick: bool = False) -> dict[str, float]:
    """Parameters unchanged: on real RepeatFirst episodes, does stored + burn-in give the actor's Q-values?

    Fills a replay (untrained network, ε-greedy, no learning, so θ stays the
    actor's) and compares on the third windows the actor's own Q-values with the
    learner's stored-start burn-in pass, with the episode replayed from its first
    step, and with the zero start.
    """
    from agents.r2d2 import R2D2Config, TrainLoop

    config = R2D2Config(**{**(QUICK if quick else {}), "min_replay_steps": 10**9})
    loop = TrainLoop(config, make_env(config.num_envs, seed), seed=seed)
    rec = Recorder(loop)
    for _ in range(actor_steps):
        loop.iterate()
    raw: list = []
    result = probe(loop, rec, raw=raw)
    for name in ("true", "stored_burn_in", "zero_burn_in"):
        err = max(float(np.abs(r[name] - r["actor"])[r["mask"]].max()) for r in raw)
        scale = max(float(np.abs(r["actor"][r["mask"]]).max()) for r in raw)
        result[f"max_rel_err/{name}"] = err / scale
    result["compared_rows"] = sum(len(r["mask"]) for r in raw)
    return result


def run(
    variant: str, seed: int, env_steps: int, out_dir: Path, *, eval_every: int, quick: bool = False
) -> dict:
    """One training run of ``variant``: a greedy evaluation (32 episodes) and a probe every ``eval_every`` env
    steps; its summary in ``out_dir/VARIANT-sSEED.json``. One thread per op, as the sweep's workers on two cores
    and the script's own pools (:func:`agents.cli.configure_threads`) give it."""
    from agents.r2d2 import Actor, R2D2Config, TrainLoop, evaluate
    from agents.seeds import RunSeeds

    config = R2D2Config(**{**(QUICK if quick else {}), **VARIANTS[variant]})
    seeds = RunSeeds(seed)
    loop = TrainLoop(config, make_env(config.num_envs, seeds.actor), seed=seed)
    rec = Recorder(loop)
    evaluator = Actor(config, make_env(EVAL_EPISODES, seeds.evaluation_env), seed=seeds.evaluation_env,
                      epsilons=np.zeros(EVAL_EPISODES))  # fmt: skip
    history, t0 = [], time.time()
    while loop.env_steps < env_steps:
        loop.iterate()
        if loop.env_steps // eval_every > len(history):
            returns = evaluate(evaluator, loop.learner.get_weights(), seed=seeds.evaluation(len(history)))
            row = {
                "env_steps": loop.env_steps,
                "updates": loop.learner.num_updates,
                "return": float(returns.mean()),
            }
            if loop.learner.num_updates > 0:
                row.update(probe(loop, rec, batches=2 if quick else 8))
            history.append({**row, "seconds": time.time() - t0})
            print(variant, seed, json.dumps({k: round(v, 3) for k, v in history[-1].items()}), flush=True)
    summary = {
        "variant": variant, "seed": seed, "overrides": VARIANTS[variant], "env_steps": env_steps,
        "mmer": max(h["return"] for h in history), "final": history[-1]["return"], "history": history,
        "final_probe": probe(loop, rec, batches=4 if quick else 40),  # more rows for the linear probe
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{sweep.run_name(variant, seed)}.json").write_text(json.dumps(summary, indent=1))
    return summary


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """One run of the study: a variant and a seed. Its run is one file, ``run_dir/VARIANT-sSEED.json``, found
    by its name (the study keeps no job file: ``identity`` None)."""

    variant: str
    seed: int
    env_steps: int
    eval_every: int
    run_dir: str
    quick: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return self.variant, self.seed

    @property
    def identity(self) -> None:
        return None

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir)

    @property
    def path(self) -> Path:
        return self.out_dir / f"{sweep.run_name(self.variant, self.seed)}.json"


def run_job(job: Job) -> dict:
    """:func:`run` of ``job`` (here, or in a sweep's worker)."""
    return run(job.variant, job.seed, job.env_steps, job.out_dir, eval_every=job.eval_every, quick=job.quick)


def finished(job: Job) -> dict | None:
    """The run's JSON if it is on disk (whole: a run killed while writing it runs again); else None."""
    summary = sweep.read_json(job.path)
    return summary if isinstance(summary, dict) else None


def _mean_std(values: list[float]) -> str:
    stats = sweep.over_seeds(values)
    n = sum(v is not None for v in stats["values"])
    if n == 0:
        return "n/a"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}" if n > 1 else f"{stats['mean']:.2f}"


def report(run_dir: Path, out: Path, command: str) -> str:
    """Table (markdown), JSON and plot of every finished run under ``run_dir``."""
    runs = [json.loads(p.read_text()) for p in sweep.find_runs(run_dir, suffix=".json")]
    if not runs:
        raise ValueError(f"--run-dir: no finished run under {run_dir}")
    names = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    cols = ("dq_mean/zero_burn_in", "dq_mean/stored_burn_in", "right/true", "right/zero_burn_in",
            "right/stored_burn_in", "right/zero_burn_in_blind", "probe/stored", "probe/true", "age_updates")  # fmt: skip
    lines = [
        "| variant | seeds | MMER | final | " + " | ".join(c.replace("/", " ") for c in cols) + " |",
        "| --- " * (4 + len(cols)) + "|",
    ]
    table: dict[str, Any] = {}
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        late = [
            [h.get(c, float("nan")) for h in r["history"][len(r["history"]) // 2 :]]
            for r in mine
            for c in cols
        ]
        row = {
            "seeds": [r["seed"] for r in mine],
            "mmer": [r["mmer"] for r in mine],
            "final": [r["final"] for r in mine],
        }
        for i, c in enumerate(cols):  # second half of training, then averaged over seeds
            row[c] = [
                float(np.nanmean(late[k * len(cols) + i]))
                if np.isfinite(late[k * len(cols) + i]).any()
                else float("nan")
                for k in range(len(mine))
            ]
        table[name] = row
        cells = [_mean_std(row[c]) for c in ("mmer", "final", *cols)]
        lines.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + f"\n\nCommand: `{command}`\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"table": table, "runs": runs, "command": command}, indent=1)
    )
    out.with_suffix(".md").write_text(md)
    _plot(runs, names, out.with_suffix(".png"))
    return md


def _plot(runs: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = dict(zip(names, plt.cm.tab10.colors))
    for r in runs:
        x = [h["env_steps"] for h in r["history"]]
        c = colors[r["variant"]]
        label = (
            r["variant"]
            if r["seed"] == min(q["seed"] for q in runs if q["variant"] == r["variant"])
            else None
        )
        axes[0].plot(x, [h["return"] for h in r["history"]], color=c, label=label, alpha=0.8)
        if r["variant"] in ("stored", "zero"):
            for key, style in (("dq_mean/stored_burn_in", "-"), ("dq_mean/zero_burn_in", ":")):
                axes[1].plot(x, [h.get(key, np.nan) for h in r["history"]], style, color=c)
            for key, style in (("right/true", "-"), ("right/zero_burn_in_blind", ":")):
                axes[2].plot(x, [h.get(key, np.nan) for h in r["history"]], style, color=c)
    axes[0].set(title="greedy return (32 episodes)", xlabel="env steps")
    axes[0].legend(fontsize=7)
    axes[1].set(
        title="ΔQ vs the true state, third windows\n— stored+burn-in, ··· zero+burn-in",
        xlabel="env steps",
        yscale="log",
    )
    axes[2].set(
        title="greedy action = first card, third windows\n— true state, ··· zero start blind to feedback",
        xlabel="env steps",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag (one line on stderr), 130 when interrupted."""
    return run_script(PROG, lambda: _main(argv), tf_threads=True)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--variants", nargs="+", default=["stored", "zero"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--env-steps", type=int, default=60_000, help="env steps per run")
    parser.add_argument(
        "--eval-every", type=int, default=5_000, help="env steps between evaluations and probes"
    )
    parser.add_argument("--workers", type=int, default=1, help="runs side by side (processes)")
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs/stored_start"), help="per-run JSON (reused)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/stored_start"), help="output prefix"
    )
    parser.add_argument(
        "--check", action="store_true", help="only the unchanged-parameters equivalence check"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny network and budget (CI)")
    args = parser.parse_args(argv)
    parser.require_at_least(args, dict.fromkeys(("env_steps", "eval_every", "workers"), 1))
    if args.check:
        print(json.dumps(check(args.seeds[0], quick=args.quick), indent=1))
        return 0
    jobs = [
        Job(variant=v, seed=s, env_steps=args.env_steps, eval_every=args.eval_every, run_dir=str(args.run_dir),
            quick=args.quick)
        for v, s in sweep.grid(args.variants, args.seeds, seed_major=True)
    ]  # fmt: skip
    # A run on disk is always reused (the study has no --resume): its file names its variant and seed.
    sweep.run_sweep(run_job, jobs, finished=finished, workers=args.workers, resume=True, desc="runs")
    command = f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:])
    print(report(args.run_dir, args.out, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
