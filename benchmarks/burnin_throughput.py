"""Burn-in learner throughput: our runner vs the article's Keras style, full BPTT and no burn-in, side by side."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

VARIANTS = ("runner", "article", "full_bptt", "no_burn_in")
SCALES = ("cartpole", "r2d2")

# References for updates_per_s at r2d2 scale (64 sequences of 80 trained steps), quoted from issue 5.
REFERENCES = {
    "r2d2_paper_gpu_learner": 5.0,
    "h200_pytorch_cudnn_fp32": 93.0,
    "h200_pytorch_cudnn_bf16": 155.0,
}


@dataclasses.dataclass(frozen=True)
class Scale:
    """One workload: the learner config and the env sizes it sees."""

    name: str
    obs_dim: int
    num_actions: int
    config: Any


PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16"}


def scales(precision: str, lstm_impl: str, jit: bool) -> dict[str, Scale]:
    """The two workloads. ``lstm_impl='auto'``: the config's default (the fastest, measured)."""
    from agents.r2d2 import R2D2Config

    if lstm_impl == "auto":
        lstm_impl = R2D2Config().lstm_impl
    common = {"lstm_impl": lstm_impl, "jit_compile": jit, "precision": PRECISIONS[precision]}
    # The demo's default learner (python -m agents.cartpole).
    cartpole = R2D2Config(**common)
    # The paper's learner without the conv torso.
    r2d2 = R2D2Config(
        torso_units=(512,),
        core_units=512,
        head_units=512,
        burn_in=40,
        unroll=80,
        period=40,
        n_step=5,
        gamma=0.997,
        batch_size=64,
        learning_rate=1e-4,
        target_update_period=2500,
        **common,
    )
    return {"cartpole": Scale("cartpole", 2, 2, cartpole), "r2d2": Scale("r2d2", 64, 18, r2d2)}


def synthetic_batch(config, obs_dim: int, num_actions: int):
    """A full batch of complete windows (every step valid), as SequenceReplay.sample returns it
    with the learner's extra state offsets."""
    from agents.r2d2 import WindowOffsets

    rng = np.random.default_rng(0)
    b = config.batch_size
    spec = config.sequence_spec
    length = spec.length
    units = config.core_units
    offsets = WindowOffsets.of(spec).extra
    learn = np.zeros((b, length), bool)
    learn[:, length - spec.unroll - spec.n_step : length - spec.n_step] = True

    def state():
        return ((rng.standard_normal((b, units)).astype(np.float32) * 0.1,) * 2,)

    start = state()
    extra = tuple(state() for _ in offsets)
    return SimpleNamespace(
        observation=rng.standard_normal((b, length, obs_dim)).astype(np.float32),
        action=rng.integers(0, num_actions, (b, length)).astype(np.int32),
        reward=rng.random((b, length)).astype(np.float32),
        discount=np.ones((b, length), np.float32),
        prev_action=rng.integers(0, num_actions, (b, length)).astype(np.int32),
        prev_reward=rng.random((b, length)).astype(np.float32),
        state=start,
        actor_state=start,
        valid_t=np.ones((b, length), bool),
        final=np.zeros((b, length), bool),
        learn_mask=learn,
        terminal=np.zeros((b, length), bool),
        keys=np.arange(b, dtype=np.int64),
        probabilities=np.full(b, 1.0 / b),
        weights=np.ones(b, np.float32),
        extra_states=extra,
        extra_actor_states=extra,
        extra_state_mask=np.ones((b, len(offsets)), bool),
    )


# ---------------------------------------------------------------------- FLOPs


def step_flops(config, obs_dim: int, num_actions: int) -> dict[str, float]:
    """Forward FLOPs of one time step for the whole batch (multiply-adds count 2)."""
    b = config.batch_size
    torso, prev = 0.0, obs_dim
    for width in config.torso_units:
        torso += 2 * b * prev * width
        prev = width
    core_in = prev + (num_actions + 1 if config.prev_action_reward else 0)
    u = config.core_units
    lstm = 2 * b * (core_in + u) * 4 * u
    h = config.head_units
    heads = 2 * b * u * h * 2 + 2 * b * h * (1 + num_actions)
    return {"torso": torso, "lstm": lstm, "heads": heads, "total": torso + lstm + heads, "core_in": core_in}


def variant_step_counts(config, variant: str) -> dict[str, float]:
    """Forward-equivalent time steps each variant computes per update (backward = 2 × forward)."""
    from agents.r2d2 import WindowOffsets

    spec = config.sequence_spec
    length, burn, unroll, n = spec.length, spec.burn_in, spec.unroll, spec.n_step
    probes = len(WindowOffsets.of(spec).delta_q)
    if variant == "runner":
        # online burn-in + unroll + tail, backward through the trained steps, target over the window, ΔQ probes
        return {"forward": 2 * length + probes, "backward": unroll}
    if variant == "full_bptt":
        return {"forward": 2 * length + probes, "backward": burn + unroll}
    if variant == "no_burn_in":
        short = dataclasses.replace(spec, burn_in=0)
        return {"forward": 2 * short.length + len(WindowOffsets.of(short).delta_q), "backward": unroll}
    if variant == "article":
        # predict: online window + target window; train_on_batch reruns the unroll forward and backward.
        return {"forward": 2 * length + (unroll + n), "backward": unroll + n}
    raise ValueError(f"variant: unknown {variant!r}")


def update_flops(config, obs_dim: int, num_actions: int, variant: str) -> float:
    per_step = step_flops(config, obs_dim, num_actions)["total"]
    counts = variant_step_counts(config, variant)
    return per_step * (counts["forward"] + 2 * counts["backward"])


# ------------------------------------------------------------------ variants


def make_runner_update(scale: Scale, *, burn_in_gradient: bool = False, config=None) -> Callable[[], None]:
    from agents.r2d2 import Learner

    config = config or scale.config
    learner = Learner(config, scale.obs_dim, scale.num_actions, seed=0, burn_in_gradient=burn_in_gradient)
    batch = synthetic_batch(config, scale.obs_dim, scale.num_actions)

    def update() -> None:
        learner.update(batch)

    update.learner = learner  # for callers that adjust the networks before the first update
    return update


def make_no_burn_in_update(scale: Scale) -> Callable[[], None]:
    config = dataclasses.replace(scale.config, burn_in=0, state_strategy="zero")
    return make_runner_update(scale, config=config)


def make_article_update(scale: Scale) -> Callable[[], None]:
    """The update as the article's Keras style leads one to write it: eager, predict, train_on_batch."""
    import keras

    import burnin
    from agents.r2d2.networks import build_q_network

    config = scale.config
    net = config.network(scale.obs_dim, scale.num_actions)
    b = config.batch_size
    online = build_q_network(net, batch_size=b, seed=0, name="online")
    target = build_q_network(net, batch_size=b, seed=0, name="target")
    target.set_weights(online.get_weights())
    online.compile(
        optimizer=keras.optimizers.Adam(
            config.learning_rate, epsilon=config.adam_epsilon, global_clipnorm=config.max_grad_norm
        ),
        loss="mse",
    )
    batch = synthetic_batch(config, scale.obs_dim, scale.num_actions)
    spec = config.sequence_spec
    burn, unroll, n = spec.burn_in, spec.unroll, spec.n_step
    inputs = [batch.observation, batch.prev_action, batch.prev_reward]
    rows = np.arange(b)[:, None]
    gamma, eps = config.gamma, config.value_rescale_eps

    def h(x):
        return np.sign(x) * (np.sqrt(np.abs(x) + 1) - 1) + eps * x

    def h_inv(x):
        return np.sign(x) * (((np.sqrt(1 + 4 * eps * (np.abs(x) + 1 + eps)) - 1) / (2 * eps)) ** 2 - 1)

    def part(a, lo, hi):
        return [x[:, lo:hi] for x in a]

    def update() -> None:
        burnin.set_states(online, batch.state)
        online.predict(part(inputs, 0, burn), batch_size=b, verbose=0)  # burn-in
        after_burn_in = burnin.get_states(online)
        q_online = online.predict(part(inputs, burn, None), batch_size=b, verbose=0)
        burnin.set_states(target, batch.state)
        target.predict(part(inputs, 0, burn), batch_size=b, verbose=0)
        q_target = target.predict(part(inputs, burn, None), batch_size=b, verbose=0)
        # n-step double-Q targets with value rescaling, in numpy
        v = h_inv(q_target[rows, np.arange(q_target.shape[1])[None], q_online.argmax(-1)])
        r = batch.reward[:, burn:]
        g = np.zeros((b, unroll))
        scale_ = np.ones((b, unroll))
        for k in range(n):
            g += scale_ * r[:, k : k + unroll]
            scale_ *= gamma * batch.discount[:, burn + k : burn + k + unroll]
        y_t = h(g + scale_ * v[:, n : n + unroll])
        y = q_online.copy()
        taken = batch.action[:, burn : burn + unroll]
        y[rows, np.arange(unroll)[None], taken] = y_t
        weights = np.zeros((b, unroll + n), np.float32)
        weights[:, :unroll] = batch.weights[:, None]
        burnin.set_states(online, after_burn_in)
        online.train_on_batch(part(inputs, burn, None), y, sample_weight=weights)
        td = np.abs(y_t - q_online[rows, np.arange(unroll)[None], taken])
        _ = 0.9 * td.max(1) + 0.1 * td.mean(1)  # priorities

    return update


VARIANT_FACTORIES = {
    "runner": make_runner_update,
    "article": make_article_update,
    "full_bptt": lambda scale: make_runner_update(scale, burn_in_gradient=True),
    "no_burn_in": make_no_burn_in_update,
}


# ---------------------------------------------------------------------- peak


_PEAK_CHAIN = 64


@functools.cache
def _peak_program(b: int, k: int, n: int, dtype: str):
    """The compiled chain of matmuls and its inputs, built once per shape and dtype."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.cast(rng.standard_normal((b, k)).astype(np.float32), dtype)
    w = tf.cast((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), dtype)

    @tf.function
    def run(x, w):
        acc = tf.zeros((b, n), dtype)
        for i in range(_PEAK_CHAIN):  # independent matmuls: nothing to fuse away, no loop overhead
            acc += tf.matmul(x + tf.cast(i, dtype), w)
        return acc

    run(x, w).numpy()  # trace and warm up
    return run, x, w


def measure_peak(config, obs_dim: int, num_actions: int, *, dtype: str = "float32") -> float:
    """GFLOP/s of the LSTM step's matmul ``[B, in+units] × [in+units, 4·units]``, chained in one tf.function.

    One timed call: the caller measures it between variants and takes the median."""
    sizes = step_flops(config, obs_dim, num_actions)
    b, k, n = config.batch_size, int(sizes["core_in"]) + config.core_units, 4 * config.core_units
    run, x, w = _peak_program(b, k, n, dtype)
    t = time.perf_counter()
    run(x, w).numpy()
    return 2 * b * k * n * _PEAK_CHAIN / (time.perf_counter() - t) / 1e9


# ------------------------------------------------------------------- driver


def benchmark(
    scale: Scale,
    variants: list[str],
    *,
    rounds: int,
    updates_per_round: dict[str, int],
    progress: bool,
    peak_dtypes: tuple[str, ...] = ("float32",),
) -> dict[str, Any]:
    times, peaks = _measure(
        scale,
        variants,
        rounds=rounds,
        updates_per_round=updates_per_round,
        progress=progress,
        peak_dtypes=peak_dtypes,
    )
    return _summarise(scale, variants, times, peaks)


def _measure(
    scale: Scale,
    variants: list[str],
    *,
    rounds: int,
    updates_per_round: dict[str, int],
    progress: bool,
    peak_dtypes: tuple[str, ...],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per update of each variant per round, and the peak GFLOP/s of each dtype measured between them."""
    from tqdm import tqdm

    fns = {}
    for v in variants:
        fn = VARIANT_FACTORIES[v](scale)
        fn()  # trace and warm up
        fns[v] = fn
    times: dict[str, list[float]] = {v: [] for v in variants}
    bar = tqdm(total=rounds * len(variants), desc=f"{scale.name}", disable=not progress, leave=False)
    peaks: dict[str, list[float]] = {d: [] for d in peak_dtypes}
    for _ in range(rounds):
        # A P B P C P D P ...: every variant, and the peak between them, sees the same load;
        # this machine is shared, so only figures measured side by side are compared.
        for v in variants:
            k = updates_per_round[v]
            t = time.perf_counter()
            for _ in range(k):
                fns[v]()
            times[v].append((time.perf_counter() - t) / k)
            bar.update(1)
            for d in peak_dtypes:
                peaks[d].append(measure_peak(scale.config, scale.obs_dim, scale.num_actions, dtype=d))
    bar.close()
    return times, peaks


def _summarise(
    scale: Scale, variants: list[str], times: dict[str, list[float]], peaks: dict[str, list[float]]
) -> dict[str, Any]:
    """The report of one scale from :func:`_measure`'s rounds: medians, FLOP rates, ratios, the FLOP model."""
    # peak_ratio is always against the fp32 peak, as the target is stated.
    peak = float(np.median(peaks["float32"]))
    cfg = scale.config
    results = {}
    for v in variants:
        sec = float(np.median(times[v]))
        flops = update_flops(cfg, scale.obs_dim, scale.num_actions, v)
        ups = 1.0 / sec
        results[v] = {
            "seconds_per_update": sec,
            "updates_per_s": ups,
            "sequences_per_s": ups * cfg.batch_size,
            "replayed_steps_per_s": ups
            * cfg.batch_size
            * (cfg.sequence_spec.length if v != "no_burn_in" else cfg.unroll + cfg.n_step),
            "gflop_per_update": flops / 1e9,
            "gflops": flops / sec / 1e9,
            "peak_ratio": flops / sec / 1e9 / peak,
            "all_seconds": times[v],
        }
    out: dict[str, Any] = {"peak_gflops": peak, "all_peak_gflops": peaks, "variants": results}
    for d in peaks:
        if d != "float32":
            out[f"peak_gflops_{d}"] = float(np.median(peaks[d]))
    if "runner" in results:
        r = results["runner"]
        if "article" in results:
            r["vs_article"] = results["article"]["seconds_per_update"] / r["seconds_per_update"]
        if "full_bptt" in results:
            r["vs_full_bptt"] = results["full_bptt"]["seconds_per_update"] / r["seconds_per_update"]
        out["full_bptt_flop_ratio"] = update_flops(
            cfg, scale.obs_dim, scale.num_actions, "full_bptt"
        ) / update_flops(cfg, scale.obs_dim, scale.num_actions, "runner")
    out["flop_model"] = {
        "per_step_forward": step_flops(cfg, scale.obs_dim, scale.num_actions),
        "step_counts": {v: variant_step_counts(cfg, v) for v in variants},
        "rule": "update FLOPs = per_step_forward.total × (forward steps + 2 × backward steps)",
    }
    out["config"] = {
        "batch_size": cfg.batch_size,
        "burn_in": cfg.burn_in,
        "unroll": cfg.unroll,
        "n_step": cfg.n_step,
        "core_units": cfg.core_units,
        "torso_units": list(cfg.torso_units),
        "head_units": cfg.head_units,
        "obs_dim": scale.obs_dim,
        "num_actions": scale.num_actions,
        "lstm_impl": cfg.lstm_impl,
        "jit_compile": cfg.jit_compile,
        "precision": cfg.precision,
    }
    return out


def print_table(report: dict[str, Any]) -> None:
    for name, res in report["scales"].items():
        fm = res["flop_model"]
        bf16 = f", bf16 {res['peak_gflops_bfloat16']:.0f}" if "peak_gflops_bfloat16" in res else ""
        print(
            f"\n== {name}: peak {res['peak_gflops']:.0f} GFLOP/s fp32{bf16} (matmul of the LSTM step's shape) =="
        )
        print(
            f"   FLOP model: {fm['per_step_forward']['total'] / 1e6:.1f} MFLOP per forward step "
            f"(LSTM {fm['per_step_forward']['lstm'] / 1e6:.1f}); {fm['rule']}"
        )
        head = f"{'variant':<11} {'upd/s':>8} {'seq/s':>8} {'steps/s':>9} {'GFLOP/upd':>10} {'GFLOP/s':>8} {'peak_ratio':>10}"
        print(head)
        for v, r in res["variants"].items():
            print(
                f"{v:<11} {r['updates_per_s']:>8.2f} {r['sequences_per_s']:>8.1f} {r['replayed_steps_per_s']:>9.0f} "
                f"{r['gflop_per_update']:>10.2f} {r['gflops']:>8.1f} {r['peak_ratio']:>10.2f}"
            )
        runner = res["variants"].get("runner", {})
        extras = []
        if "vs_article" in runner:
            extras.append(f"vs_article {runner['vs_article']:.2f}")
        if "vs_full_bptt" in runner:
            extras.append(
                f"vs_full_bptt {runner['vs_full_bptt']:.3f} (full_bptt_flop_ratio {res['full_bptt_flop_ratio']:.3f})"
            )
        if extras:
            print("runner: " + ", ".join(extras))
        if name == "r2d2" and "runner" in res["variants"]:
            refs = ", ".join(f"{k} {v:g}/s" for k, v in REFERENCES.items())
            print(f"references (updates/s): {refs}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["scales"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        res = report["scales"][name]["variants"]
        labels = list(res)
        ups = [res[v]["updates_per_s"] for v in labels]
        bars = ax.bar(labels, ups, color=["tab:blue", "tab:gray", "tab:orange", "tab:green"][: len(labels)])
        for bar_, v in zip(bars, labels):
            ax.annotate(
                f"{res[v]['updates_per_s']:.2f}/s\n{res[v]['peak_ratio']:.0%} peak",
                (bar_.get_x() + bar_.get_width() / 2, bar_.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(f"{name}: learner updates/s (median)")
        ax.set_ylabel("updates / s")
        ax.margins(y=0.2)
    fig.suptitle("burn-in learner throughput (this machine, interleaved rounds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.burnin_throughput", description=__doc__)
    parser.add_argument("--scales", nargs="+", choices=SCALES, default=list(SCALES), help="workloads to run")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="variants to run"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument(
        "--quick", action="store_true", help="tiny run for CI: 2 rounds, cartpole scale only, 1 update each"
    )
    parser.add_argument(
        "--lstm-impl",
        choices=("auto", "fused", "keras", "hoisted", "unrolled"),
        default="auto",
        help="LSTM layer of the networks (auto: the config's default, 'fused')",
    )
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="network dtype policy")
    parser.add_argument("--jit", action="store_true", help="compile the learner update with XLA")
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument(
        "--png",
        type=Path,
        default=None,
        help="bar chart path (default: next to --json, or results/burnin_throughput[_bf16][_quick].png)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: expected >= 1, got {args.rounds}")

    from agents.cli import configure_threads, import_tensorflow_quietly

    import_tensorflow_quietly()
    configure_threads()  # the thread pools every agents script runs with
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    rounds = 2 if args.quick else args.rounds
    chosen = ["cartpole"] if args.quick else args.scales
    all_scales = scales(args.precision, args.lstm_impl, args.jit)
    report: dict[str, Any] = {
        "benchmark": "burnin_throughput",
        "quick": args.quick,
        "rounds": rounds,
        "machine": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        },
        "precision": args.precision,
        "command": "python -m benchmarks.burnin_throughput "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "references_updates_per_s": REFERENCES,
        "scales": {},
    }
    for name in chosen:
        scale = all_scales[name]
        per_round = {v: 1 if args.quick or name == "r2d2" else 5 for v in args.variants}
        report["scales"][name] = benchmark(
            scale,
            list(args.variants),
            rounds=rounds,
            updates_per_round=per_round,
            progress=not args.no_progress,
            peak_dtypes=("float32",) if args.precision == "fp32" else ("float32", "bfloat16"),
        )
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    png = args.png or (
        args.json.with_suffix(".png")
        if args.json
        # Never over the committed chart of a full run: a quick or bf16 run gets its own name.
        else Path("benchmarks/results") / f"burnin_throughput{'_bf16' if args.precision == 'bf16' else ''}"
        f"{'_quick' if args.quick else ''}.png"
    )
    plot(report, png)
    print(f"\nchart: {png}" + (f", json: {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
