"""What the recurrent core holds on POPGym's memory tasks: the answer read from its state under stored, zero and true starts, the Q scale against the reward scale, and the TD error by window position."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from burnin import BurnInRunner
from burnin.diagnostics import delta_q, delta_q_spread
from burnin.losses import r2d2_loss, rewards_and_continuations
from studies.episode_probe import Recorder, pad_rows, true_states

__all__ = [
    "START_NAMES",
    "MemoryProbeHook",
    "count_recall_labels",
    "labeller",
    "least_squares_fit",
    "least_squares_predict",
    "least_squares_value",
    "probe",
    "repeat_previous_labels",
]

START_NAMES = ("stored", "zero", "true")
"""The learner's start states the probe compares: the actor's stored state, zeros, and the episode replayed
from its first step with the current network; each followed by the window's burn-in."""

BINS = 4
"""Trained steps are reported in this many equal bins by window position."""


def count_recall_labels(observation: np.ndarray) -> np.ndarray:
    """CountRecall's right answer at every step of one episode.

    ``observation``: ``[E, 2]`` the stored (dealt card, query card) of steps 0..E−1.
    Returns ``[E]``: y_j = #{i <= j : dealt_i = query_j}, how often step j's query card has been dealt up to
    and including step j (the env rewards the action y_j at step j).
    """
    dealt, query = observation[:, 0], observation[:, 1]
    seen = dealt[None, :] == query[:, None]  # [E(j), E(i)]
    return np.tril(seen).sum(axis=1)


def repeat_previous_labels(observation: np.ndarray, *, k: int) -> np.ndarray:
    """RepeatPrevious's right answer at every step of one episode: y_j = card_{j+1−k} (the card dealt k−1 steps
    before step j's), and −1 (no answer rewarded) for j < k−1. ``observation``: ``[E]`` or ``[E, 1]`` suits."""
    cards = np.asarray(observation).reshape(len(observation))
    labels = np.full(len(cards), -1, np.int64)
    if len(cards) >= k:
        labels[k - 1 :] = cards[: len(cards) - k + 1]
    return labels


def labeller(env_id: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The label function of a POPGym task id, or None for a task the probe has no answer for."""
    name = env_id.removeprefix("popgym-").rsplit("-v", 1)[0]
    if name.startswith("CountRecall"):
        return count_recall_labels
    if name.startswith("RepeatPrevious"):
        import gymnasium as gym

        from agents.envs import ensure_registered

        k = int(gym.make(ensure_registered(env_id), disable_env_checker=True).unwrapped.k)
        return lambda observation: repeat_previous_labels(observation, k=k)
    return None


def least_squares_fit(
    x: np.ndarray, targets: np.ndarray, train: np.ndarray, *, ridge: float = 1e-2
) -> np.ndarray:
    """A linear read-out's output for every row of ``x`` ``[N, S]``: ridge least squares from ``x``
    (standardised on the training rows, plus a bias) onto ``targets`` ``[N, k]``, fitted on the rows where
    ``train`` holds. Closed form and deterministic: W = (ZᵀZ + λ·n·I)⁻¹ ZᵀY over the n training rows."""
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    z = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], axis=1)
    zt = z[train]
    w = np.linalg.solve(zt.T @ zt + ridge * len(zt) * np.eye(z.shape[1]), zt.T @ targets[train])
    return z @ w


def least_squares_predict(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, *, classes: int, ridge: float = 1e-2
) -> np.ndarray:
    """The class a linear read-out gives every row: :func:`least_squares_fit` onto one-hot ``y``, argmax."""
    return least_squares_fit(x, np.eye(classes)[y], train, ridge=ridge).argmax(1)


def least_squares_value(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, *, ridge: float = 1e-2
) -> np.ndarray:
    """The integer a linear read-out of the label's *value* gives every row (a count is ordinal: one
    direction of the state can hold it): :func:`least_squares_fit` onto ``y`` itself, rounded."""
    return np.rint(least_squares_fit(x, y[:, None].astype(float), train, ridge=ridge)[:, 0]).astype(np.int64)


def _episode_labels(recorder: Recorder, where, label_fn, length: int) -> np.ndarray:
    """``[rows, length]`` the right answer at each window step (−1 where none: before the episode, after its
    final observation, or not rewarded)."""
    out = np.full((len(where), length), -1, np.int64)
    for i, (lane, first, start) in enumerate(where):
        log = recorder.logs[lane]
        end = min(start + length, len(log))
        final = np.flatnonzero(log.final[first:end])
        end = first + int(final[0]) if final.size else end  # the final observation has no action
        labels = label_fn(log.observation[first:end])
        for t in range(max(first - start, 0), end - start):
            out[i, t] = labels[start + t - first]
    return out


def _binned(values: np.ndarray, valid: np.ndarray) -> list[float]:
    """Mean of ``values`` [rows, U] over valid entries, in :data:`BINS` equal bins of window position."""
    return [
        float(values[:, part][valid[:, part]].mean()) if valid[:, part].any() else float("nan")
        for part in np.array_split(np.arange(values.shape[1]), BINS)
    ]


def _td_errors(learner, inputs, start, mask, batch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[len(rows), U]`` |δ| and |y| of the learner's loss on these windows from ``start`` (its targets, γ,
    n, ε, reward scale), with the learner's conversions: no reward and continuation 1 where there is no
    action. Both in the learner's units (rewards times ``reward_scale``)."""
    cfg, b, B = learner.config, learner.spec.burn_in, learner.config.batch_size
    q_online = learner.probe_runner(inputs, start, mask=mask).outputs[:, b:]
    q_target = learner.target_runner(inputs, start, mask=mask).outputs
    action, reward, discount, final = (pad_rows(getattr(batch, f)[rows], B)[:, b:] for f in
                                       ("action", "reward", "discount", "final"))  # fmt: skip
    r_t, pcont_t = rewards_and_continuations(
        reward, discount, mask[:, b:] & ~final, gamma=cfg.gamma, reward_scale=cfg.reward_scale
    )
    _, extras = r2d2_loss(
        q_online, q_target, action, r_t, pcont_t,
        mask[:, b:], pad_rows(batch.learn_mask[rows], B)[:, b : b + learner.spec.unroll],
        np.ones(B, np.float32), n=learner.spec.n_step, rescale_eps=cfg.value_rescale_eps or None,
        priority_eta=cfg.priority_eta,
    )  # fmt: skip
    n = len(rows)
    return np.abs(extras.td_errors.numpy()[:n]), np.abs(extras.targets.numpy()[:n])


class _Pass:
    """One start's pass over the windows: Q over every step and the core's state after every trained step."""

    def __init__(self, learner) -> None:
        b, U = learner.spec.burn_in, learner.spec.unroll
        # The state after trained step t is the state before step t + 1.
        self.runner = BurnInRunner(learner.online, burn_in=0, state_offsets=tuple(range(b + 1, b + U + 1)))

    def __call__(self, inputs, start, mask, n: int) -> tuple[np.ndarray, np.ndarray]:
        out = self.runner(inputs, start, mask=mask)
        states = np.stack(
            [np.concatenate([np.asarray(a)[:n] for layer in s for a in layer], 1) for s in out.offset_states],
            1,
        )  # [n, U, S]
        return np.asarray(out.outputs)[:n], states


def probe(loop, recorder: Recorder, label_fn, *, batches: int, rng: np.random.Generator, passes=None) -> dict:
    """The probe's readings on ``batches`` batches of live windows drawn uniformly with ``rng`` (not the
    replay's sampler), keeping the windows that start mid-episode (elsewhere the three starts coincide) and
    whose episode the recorder holds from its first step.

    Per start (:data:`START_NAMES`), by :data:`BINS` bins of trained window position:
    ``q_right/<start>``, how often the greedy action is the right answer; ``read_out/<start>``, the held-out
    accuracy of a linear read-out of the answer from the core's state after the step
    (:func:`least_squares_predict`, fitted on half the windows, all starts pooled so one read-out serves
    all three); ``read_out_value/<start>``, the same for a read-out of the answer's value
    (:func:`least_squares_value`: a count is ordinal, so one direction of the state can hold it).
    For the stored and the zero start against the true state: ``delta_q/<start>``, the paper's ΔQ
    (:func:`burnin.diagnostics.delta_q`, the max over the trained steps), and ``delta_q_spread/<start>``,
    the same over the spread of the Q-values (:func:`burnin.diagnostics.delta_q_spread`). For the
    learner's own (stored) start: ``td_abs`` (mean |δ|), and the scales ``q_abs_max``
    (max_a |Q|), ``q_gap`` (best minus second-best Q), ``target_abs`` (|y|) and ``reward_abs`` (|r| of the
    rewarded steps), all in the learner's units (rewards times ``reward_scale``)."""
    learner = loop.learner
    b, U, B, L = learner.spec.burn_in, learner.spec.unroll, learner.config.batch_size, learner.spec.length
    passes = passes or _Pass(learner)
    keys = loop.replay.live_keys()
    found: dict[str, list] = {k: [] for k in ("y", "learn", "td", "target", "reward", *START_NAMES)}
    states: dict[str, list] = {name: [] for name in START_NAMES}
    for _ in range(batches if keys.size else 0):
        pick = rng.choice(keys, size=min(B, keys.size), replace=False)
        batch = loop.replay.windows(pick)
        truth = true_states(learner, recorder, batch, np.arange(len(pick)))
        inside = np.array([first < start for _, first, start in truth.where], bool)
        if not inside.any():
            continue
        rows, where = truth.rows[inside], [w for w, keep in zip(truth.where, inside) if keep]
        n = len(rows)
        window = [pad_rows(getattr(batch, f)[rows], B) for f in ("observation", "prev_action", "prev_reward")]
        inputs, mask = learner.model_inputs(*window), pad_rows(batch.valid_t[rows], B)
        stored = tuple(tuple(pad_rows(a[rows], B) for a in layer) for layer in batch.state)
        true = tuple(tuple(pad_rows(a[inside], B) for a in layer) for layer in truth.state)
        y = _episode_labels(recorder, where, label_fn, L)[:, b : b + U]
        zero = tuple(tuple(np.zeros_like(a) for a in layer) for layer in stored)  # one trace for all starts
        for name, start in zip(START_NAMES, (stored, zero, true)):
            q, s = passes(inputs, start, mask, n)
            found[name].append(q[:, b : b + U])
            states[name].append(s)
        found["y"].append(y)
        found["learn"].append(batch.learn_mask[rows][:, b : b + U])
        td, target = _td_errors(learner, inputs, stored, mask, batch, rows)
        found["td"].append(td)
        found["target"].append(target)
        found["reward"].append(np.abs(batch.reward[rows][:, b : b + U]))
    if not found["y"]:
        return {"rows": 0}
    return _readings(found, states, classes=learner.num_actions, scale=learner.config.reward_scale)


def _readings(
    found: dict[str, list], states: dict[str, list], *, classes: int, scale: float
) -> dict[str, Any]:
    """The probe's numbers from what :func:`probe` gathered (arrays ``[rows, U, ...]`` per batch)."""
    y, learn = np.concatenate(found["y"]), np.concatenate(found["learn"])
    labelled = learn & (y >= 0)
    rows = len(y)
    train_rows = np.arange(rows) % 2 == 0
    out: dict[str, Any] = {"rows": int(rows)}
    x = np.concatenate([np.concatenate(states[name]) for name in START_NAMES])  # [3·rows, U, S]
    yy, keep = np.tile(y, (len(START_NAMES), 1)), np.tile(labelled, (len(START_NAMES), 1))
    train = np.tile(train_rows, len(START_NAMES))[:, None] & keep
    test = keep & ~np.tile(train_rows, len(START_NAMES))[:, None]
    predicted = np.full(yy.shape, -2, np.int64)  # never a label: unfitted steps count as wrong
    value = np.full(yy.shape, -2, np.int64)
    if train.any() and test.any():
        flat = keep.reshape(-1)
        xf, yf, tf_ = x.reshape(-1, x.shape[-1])[flat], yy.reshape(-1)[flat], train.reshape(-1)[flat]
        predicted.reshape(-1)[flat] = least_squares_predict(xf, yf, tf_, classes=classes)
        value.reshape(-1)[flat] = least_squares_value(xf, yf, tf_)
    for i, name in enumerate(START_NAMES):
        q = np.concatenate(found[name])  # [rows, U, A]
        out[f"q_right/{name}"] = _binned((q.argmax(-1) == y).astype(float), labelled)
        part = slice(i * rows, (i + 1) * rows)
        out[f"read_out/{name}"] = _binned((predicted[part] == yy[part]).astype(float), test[part])
        out[f"read_out_value/{name}"] = _binned((value[part] == yy[part]).astype(float), test[part])
    q_true = np.concatenate(found["true"])
    for name in ("stored", "zero"):  # the learner's two starts, each against the true state
        q_hat = np.concatenate(found[name])
        for key, fn in (("delta_q", delta_q), ("delta_q_spread", delta_q_spread)):
            per_step = np.stack(
                [fn(q_hat[:, t], q_true[:, t], q_hat, learn).numpy() for t in range(q_true.shape[1])], 1
            )
            out[f"{key}/{name}"] = _binned(np.nan_to_num(per_step), learn & np.isfinite(per_step))
    q = np.concatenate(found["stored"])
    top2 = np.sort(q, axis=-1)[..., -2:]
    out["td_abs"] = _binned(np.concatenate(found["td"]), learn)
    out["q_abs_max"] = float(np.abs(q).max(-1)[learn].mean())
    out["q_gap"] = float((top2[..., 1] - top2[..., 0])[learn].mean())
    out["target_abs"] = float(np.concatenate(found["target"])[learn].mean())
    reward = np.concatenate(found["reward"])
    rewarded = learn & (reward > 0)
    out["reward_abs"] = float(reward[rewarded].mean()) * scale if rewarded.any() else 0.0
    return out


class MemoryProbeHook:
    """A run hook (:mod:`agents.experiment`): :func:`probe` at every ``every``-th evaluation, added to that
    evaluation's entry of the history under ``memory_probe``.

    Put it after the :class:`agents.experiment.Evaluation` hook. It records the actor's steps
    (:class:`studies.episode_probe.Recorder`), so it needs a single-process loop with a recurrent network;
    on any other loop it does nothing. It draws windows with its own generator and leaves the training's
    random streams alone, so a run with it is the run without it (tested).
    """

    def __init__(self, label_fn, *, batches: int, seed: int, every: int = 1) -> None:
        self.label_fn, self.batches, self.every = label_fn, batches, every
        self.rng = np.random.default_rng(seed)
        self.recorder: Recorder | None = None
        self.passes: _Pass | None = None

    def on_start(self, run) -> None:
        loop = run.loop
        if hasattr(loop, "actor") and loop.learner.network_config.recurrent:
            self.recorder, self.passes = Recorder(loop), _Pass(loop.learner)
        self.seen = len(run.history.evals)

    def on_step(self, run, stats) -> None:
        evals = run.history.evals
        if self.recorder is not None and len(evals) > self.seen and len(evals) % self.every == 0:
            evals[-1]["memory_probe"] = probe(
                run.loop, self.recorder, self.label_fn, batches=self.batches, rng=self.rng, passes=self.passes
            )
        self.seen = len(evals)

    def on_end(self, run, summary: dict[str, Any]) -> None:
        # A run that stops at its solving evaluation ends before on_step sees that evaluation: read it here.
        evals = run.history.evals
        if self.recorder is not None and evals and "memory_probe" not in evals[-1]:
            if summary.get("stop_reason") in ("budget", "solved"):
                self.seen = len(evals) - 1
                self.on_step(run, None)


def at_start(
    env_id: str, *, overrides: dict[str, Any], steps: int, batches: int, seed: int
) -> dict[str, Any]:
    """The probe on an untrained network: the ``popgym`` preset (with ``overrides``) acts ``steps`` env steps
    without learning, then :func:`probe` reads its replay. The Q scale the learner starts from."""
    from agents.envs import make_vector_env
    from agents.r2d2.config import preset
    from agents.r2d2.loop import TrainLoop

    config = preset("popgym", **{**overrides, "min_replay_steps": 10**9})  # act, never learn
    loop = TrainLoop(config, make_vector_env(config.num_envs, seed=seed, env_id=env_id), seed=seed)
    recorder = Recorder(loop)
    while loop.env_steps < steps:
        loop.iterate()
    label_fn = labeller(env_id)
    if label_fn is None:
        raise ValueError(f"env_id: no labels for {env_id!r} (CountRecall and RepeatPrevious have them)")
    return probe(loop, recorder, label_fn, batches=batches, rng=np.random.default_rng(seed))


def _main(argv: list[str] | None) -> int:
    import json
    import sys

    from agents.cli import ArgumentParser, parse_overrides

    parser = ArgumentParser(
        prog=PROG, description="The memory probe on an untrained network (the Q scale at the start)."
    )
    parser.add_argument("--env", default="popgym-CountRecallEasy-v0", help="a POPGym id with labels")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="R2D2Config overrides (JSON)"
    )
    parser.add_argument("--steps", type=int, default=4000, help="env steps of acting before the probe [4000]")
    parser.add_argument("--batches", type=int, default=8, help="batches of windows [8]")
    parser.add_argument("--seed", type=int, default=0, help="[0]")
    args = parser.parse_args(argv)
    parser.require_at_least(args, {"steps": 1, "batches": 1})
    overrides = parse_overrides(parser, args.set)
    if labeller(args.env) is None:
        parser.error(f"--env: no labels for {args.env!r} (CountRecall and RepeatPrevious have them)")
    reading = at_start(args.env, overrides=overrides, steps=args.steps, batches=args.batches, seed=args.seed)
    print(json.dumps({"command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]), **reading}))
    return 0


PROG = "python -m studies.memory_probe"


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 when done, 2 for a bad flag (one line on stderr)."""
    from agents.cli import run_script

    return run_script(PROG, lambda: _main(argv), tf_threads=True)


if __name__ == "__main__":
    import sys

    sys.exit(main())
