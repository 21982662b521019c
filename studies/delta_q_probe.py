"""ΔQ of the four start strategies on one trained network and its own replay, for every run of the study."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from agents.cli import ArgumentParser, run_script, script_imports

PROG = "python -m studies.delta_q_probe"

with script_imports(PROG, __name__):  # TensorFlow first, quietly (the probe's functions use it)
    import numpy as np

    from studies import sweep

START_STRATEGIES = ("zero", "zero_burn_in", "stored", "stored_burn_in")
"""How the probe starts the state before the first trained step t₁ = period of a window:

    window step:   0 ........ t₁=P ........ t₂=2P ..... 2P+n
    zero:                     0 ─────────────────────────▶
    zero_burn_in:  0 ───────────────────────────────────▶
    stored:                   h(t₁) ────────────────────▶
    stored_burn_in: h(0) ───────────────────────────────▶

ΔQ is then taken at t₁ and t₂ against the actor's stored h(t₁), h(t₂), on the
same network and the same windows for all four.
"""


def probe(checkpoint: Path, *, batches: int = 20) -> dict[str, dict[str, float]]:
    """Mean ΔQ at t₁ = period and t₂ = 2·period for each start strategy, on ``checkpoint``'s network and replay.

    ``checkpoint`` is a single-process checkpoint directory (``loop.json``,
    ``learner.npz``, ``replay.npz``); no env is needed, and the batches are drawn
    with the replay's own saved RNG. A bad checkpoint is a ``CheckpointError``
    naming the file.
    """
    import tensorflow as tf

    from agents.r2d2 import Learner
    from agents.r2d2.checkpoint import (
        CheckpointError,
        meta_config,
        read_learner_sizes,
        read_meta,
        read_replay,
    )
    from burnin.diagnostics import delta_q

    path, meta = read_meta(checkpoint)
    config = meta_config(path / "loop.json", meta)
    if config.core != "lstm":
        raise CheckpointError(f"checkpoint {path}: core {config.core!r}; ΔQ needs a recurrent core")
    t1, t2 = config.period, 2 * config.period
    end = t2 + config.n_step
    if config.sequence_spec.length < end:
        raise CheckpointError(
            f"checkpoint {path}: windows of {config.sequence_spec.length} steps, the probe needs {end}"
        )
    learner = Learner(config, *read_learner_sizes(path))
    learner.assign_state(learner.read_checkpoint(path))
    replay = read_replay(path / "replay.npz")
    runner = learner.probe_runner  # the online network, no burn-in: the learner's own ΔQ probe
    sums = {s: {"first": [], "last": []} for s in START_STRATEGIES}
    for _ in range(batches):
        batch = replay.sample(config.batch_size, extra_state_offsets=(t1, t2))
        inputs = learner.model_inputs(batch.observation, batch.prev_action, batch.prev_reward)
        mask = tf.constant(batch.valid_t)

        def part(lo: int, hi: int, inputs=inputs) -> list:
            return [x[:, lo:hi] for x in inputs]

        h_t1, h_t2 = batch.extra_actor_states
        q_ref = {
            t: runner(part(t, t + 1), h, mask=mask[:, t : t + 1]).outputs[:, 0]
            for t, h in ((t1, h_t1), (t2, h_t2))
        }  # [B, A], from the actor's stored state at t
        starts = {
            "zero": (t1, None),
            "zero_burn_in": (0, None),
            "stored": (t1, h_t1),
            "stored_burn_in": (0, batch.actor_state),
        }
        seq_mask = mask[:, t1:end]
        for name, (lo, state) in starts.items():
            q = runner(part(lo, end), state, mask=mask[:, lo:end]).outputs[:, t1 - lo :]  # [B, end - t1, A]
            for key, t, ok in (
                ("first", t1, batch.extra_state_mask[:, 0]),
                ("last", t2, batch.extra_state_mask[:, 1]),
            ):
                dq = delta_q(q[:, t - t1], q_ref[t], q, seq_mask).numpy()  # [B]
                rows = ok & batch.valid_t[:, t] & np.isfinite(dq)
                sums[name][key].extend(dq[rows].tolist())
    return {s: {k: float(np.mean(v)) if v else float("nan") for k, v in d.items()} for s, d in sums.items()}


def recurrent_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints ``RUN/checkpoint`` under ``run_dir`` whose network is recurrent."""
    from agents.r2d2.checkpoint import CheckpointError, read_meta

    found = []
    for ckpt in sorted(run_dir.glob("*/checkpoint")):
        try:
            path, meta = read_meta(ckpt)
        except CheckpointError:
            continue  # not a complete checkpoint: nothing to probe
        config = meta.get("config")
        if isinstance(config, dict) and config.get("core", "lstm") == "lstm":
            found.append(path)
    return found


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag or checkpoint (one line on stderr), 130 when interrupted."""
    return run_script(PROG, lambda: _main(argv), tf_threads=True)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs/ablation"), help="the study's per-run outputs"
    )
    parser.add_argument("--batches", type=int, default=20, help="sampled batches per checkpoint")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/delta_q_probe"), help="output prefix"
    )
    args = parser.parse_args(argv)
    parser.require_at_least(args, {"batches": 1})
    if not args.run_dir.is_dir():
        parser.error(
            f"--run-dir: expected a directory of runs, got {str(args.run_dir)!r} (no such directory)"
        )
    checkpoints = recurrent_checkpoints(args.run_dir)
    if not checkpoints:
        parser.error(f"--run-dir: expected runs with a recurrent checkpoint, found none under {args.run_dir}")
    from tqdm import tqdm

    runs: dict[str, Any] = {}
    for ckpt in tqdm(checkpoints, desc="checkpoints"):
        runs[ckpt.parent.name] = probe(ckpt, batches=args.batches)
    trained = sorted({sweep.split_run_name(name)[0] for name in runs})
    table: dict[str, Any] = {}
    lines = [
        f"ΔQ on each trained network and its own replay, {args.batches} batches per checkpoint; "
        "rows: how the network was trained, columns: how the probe starts the state; mean ± std over seeds.",
        "",
        "| trained as | " + " | ".join(f"{s} first / last" for s in START_STRATEGIES) + " |",
        "| --- |" + " --- |" * len(START_STRATEGIES),
    ]
    for t in trained:
        seeds = [v for name, v in runs.items() if sweep.split_run_name(name)[0] == t]
        row = {}
        cells = []
        for s in START_STRATEGIES:
            first = np.array([r[s]["first"] for r in seeds])
            last = np.array([r[s]["last"] for r in seeds])
            row[s] = {
                "first": [float(first.mean()), float(first.std())],
                "last": [float(last.mean()), float(last.std())],
            }
            cells.append(f"{first.mean():.3g} ± {first.std():.2g} / {last.mean():.3g} ± {last.std():.2g}")
        table[t] = row
        lines.append(f"| {t} ({len(seeds)} seeds) | " + " | ".join(cells) + " |")
    command = f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"Command: `{command.strip()}`"]
    md = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"table": table, "runs": runs, "command": command}, indent=1)
    )
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
