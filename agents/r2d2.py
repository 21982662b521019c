"""R2D2 on burnin: the config, the learner (burn-in, n-step double Q, priorities, ΔQ) and the vector-env actor."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import keras
import numpy as np
import tensorflow as tf
from gymnasium.vector import AutoresetMode

from agents.networks import NetworkConfig, build_q_network, network_inputs
from burnin.diagnostics import delta_q
from burnin.losses import r2d2_loss
from burnin.replay import SequenceBatch, SequenceReplay, SequenceSpec
from burnin.runner import BurnInRunner
from burnin.state import stateful_layers

__all__ = [
    "Actor",
    "Learner",
    "LearnerStep",
    "R2D2Config",
    "StateStrategy",
    "TrainLoop",
    "apex_epsilons",
    "delta_q_offsets",
    "evaluate",
    "extra_state_offsets",
    "make_replay",
    "stored_state_offsets",
]


class StateStrategy(enum.Enum):
    """Where the learner's recurrent state comes from at window step 0 (R2D2 §3).

    ::

        window step:  0 ......... burn_in-1 | burn_in ........... L-1
        STORED:       h_0 = actor's stored   | trained from the burned-in state
                      state, then burn-in    |
        ZERO:         h_0 = 0, then burn-in  | trained from the burned-in state

    With ``burn_in = 0`` the two give the paper's "stored state" and "zero
    state" strategies; with ``burn_in > 0`` their burn-in variants.
    """

    STORED = "stored"
    ZERO = "zero"


def _field(default: Any, doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class R2D2Config:
    """R2D2 hyper-parameters. Defaults are tuned for masked CartPole; the paper's (Atari) values are in each doc."""

    # Network (paper: conv torso, LSTM 512, dueling heads 512).
    torso_units: tuple[int, ...] = _field((64,), "Dense ReLU torso widths (paper: conv torso).")
    core: str = _field(
        "lstm", "'lstm' (stateful recurrent core) or 'dense' (feed-forward ablation of equal width)."
    )
    core_units: int = _field(128, "LSTM (or Dense) core width (paper: 512).")
    head_units: int = _field(128, "Hidden width of each dueling head (paper: 512).")
    lstm_impl: str = _field(
        "keras",
        "'keras' (keras.layers.LSTM), 'hoisted' or 'unrolled' (burnin.layers.HoistedLSTM: same outputs).",
    )
    precision: str = _field(
        "float32", "Keras dtype policy of the networks: 'float32' or 'mixed_bfloat16' (AMX/AVX512_BF16)."
    )
    prev_action_reward: bool = _field(
        True, "Feed the previous action (one-hot) and reward to the core (paper: yes)."
    )
    # Sequences.
    burn_in: int = _field(20, "Burn-in steps per window, no gradient (paper: 40).")
    unroll: int = _field(40, "Trained steps per window (paper: 80).")
    period: int = _field(20, "Steps between window starts; windows overlap by unroll-period (paper: 40).")
    n_step: int = _field(5, "n of the n-step double-Q target (paper: 5).")
    gamma: float = _field(0.99, "Discount γ (paper: 0.997).")
    value_rescale_eps: float = _field(1e-3, "ε of the value rescaling h; 0 turns it off (paper: 1e-3).")
    # Learner.
    batch_size: int = _field(32, "Windows per learner update (paper: 64).")
    learning_rate: float = _field(1e-3, "Adam learning rate (paper: 1e-4).")
    adam_epsilon: float = _field(1e-3, "Adam ε (paper: 1e-3).")
    max_grad_norm: float = _field(40.0, "Clip gradients to this global norm (paper: 40, from Ape-X).")
    target_update_period: int = _field(400, "Learner updates between target-network copies (paper: 2500).")
    state_strategy: str = _field("stored", "Learner start state: 'stored' (actor's) or 'zero'.")
    refresh_states: bool = _field(False, "Write recomputed states back into the replay after each update.")
    jit_compile: bool = _field(False, "Compile the learner update with XLA.")
    # Replay.
    replay_capacity: int = _field(
        100_000, "Replay size in env steps, split evenly over the actor's lanes (paper: 1M windows)."
    )
    min_replay_steps: int = _field(2_000, "Env steps stored before learning starts.")
    env_steps_per_update: float = _field(8.0, "Env steps between learner updates: the fixed replay ratio.")
    priority_exponent: float = _field(0.9, "Priority exponent α (paper: 0.9).")
    importance_exponent: float = _field(0.6, "Importance-sampling exponent β (paper: 0.6).")
    priority_eta: float = _field(0.9, "η of the priority mixture η·max|δ| + (1−η)·mean|δ| (paper: 0.9).")
    # Actor.
    num_envs: int = _field(
        16, "Envs stepped together by the actor, one network row each (paper: 256 actors)."
    )
    actor_update_period: int = _field(
        25, "Actor steps between weight pulls from the learner (paper: 400 env steps)."
    )
    epsilon_base: float = _field(0.4, "Ape-X ε_i = base^(1 + alpha·i/(N−1)) (paper: 0.4).")
    epsilon_alpha: float = _field(7.0, "Ape-X ε exponent spread (paper: 7).")

    def __post_init__(self) -> None:
        positive_ints = (
            "core_units", "head_units", "unroll", "period", "n_step", "batch_size",
            "target_update_period", "replay_capacity", "num_envs", "actor_update_period",
        )  # fmt: skip
        for name in positive_ints:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("burn_in", "min_replay_steps"):
            _check_int(name, getattr(self, name), minimum=0)
        if not isinstance(self.torso_units, tuple) or any(
            isinstance(u, bool) or not isinstance(u, int) or u < 1 for u in self.torso_units
        ):
            raise ValueError(f"torso_units: expected a tuple of positive ints, got {self.torso_units!r}")
        if self.core not in ("lstm", "dense"):
            raise ValueError(f"core: expected 'lstm' or 'dense', got {self.core!r}")
        if self.lstm_impl not in ("keras", "hoisted", "unrolled"):
            raise ValueError(f"lstm_impl: expected 'keras', 'hoisted' or 'unrolled', got {self.lstm_impl!r}")
        if self.precision not in ("float32", "mixed_bfloat16"):
            raise ValueError(f"precision: expected 'float32' or 'mixed_bfloat16', got {self.precision!r}")
        if self.state_strategy not in {s.value for s in StateStrategy}:
            raise ValueError(f"state_strategy: expected 'stored' or 'zero', got {self.state_strategy!r}")
        if self.period > self.unroll:
            raise ValueError(f"period: {self.period} > unroll={self.unroll} would leave steps untrained")
        _check_float("gamma", self.gamma, low=0.0, high=1.0)
        _check_float("priority_eta", self.priority_eta, low=0.0, high=1.0)
        _check_float("epsilon_base", self.epsilon_base, low=0.0, high=1.0)
        for name in ("value_rescale_eps", "priority_exponent", "importance_exponent", "epsilon_alpha"):
            _check_float(name, getattr(self, name), low=0.0)
        for name in ("learning_rate", "adam_epsilon", "max_grad_norm", "env_steps_per_update"):
            _check_float(name, getattr(self, name), low=0.0, strict=True)
        for name in ("prev_action_reward", "refresh_states", "jit_compile"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.replay_capacity // self.num_envs < self.sequence_spec.length + 1:
            raise ValueError(
                f"replay_capacity: {self.replay_capacity} over {self.num_envs} lanes leaves "
                f"{self.replay_capacity // self.num_envs} steps per lane, expected at least one window "
                f"and the step before it ({self.sequence_spec.length + 1})"
            )
        if self.refresh_states and self.state_strategy != StateStrategy.STORED.value:
            raise ValueError(
                f"refresh_states: only meaningful with state_strategy='stored', got {self.state_strategy!r}"
            )

    @property
    def sequence_spec(self) -> SequenceSpec:
        """Window layout: ``length = burn_in + unroll + n_step``."""
        return SequenceSpec(burn_in=self.burn_in, unroll=self.unroll, period=self.period, n_step=self.n_step)

    @property
    def strategy(self) -> StateStrategy:
        return StateStrategy(self.state_strategy)

    @property
    def replay_ratio(self) -> float:
        """Average number of times each stored step is trained on: batch·unroll / env_steps_per_update."""
        return self.batch_size * self.unroll / self.env_steps_per_update

    def network(self, obs_dim: int, num_actions: int) -> NetworkConfig:
        """The Q-network architecture for an env with these sizes."""
        return NetworkConfig(
            obs_dim=obs_dim,
            num_actions=num_actions,
            torso_units=self.torso_units,
            core=self.core,
            core_units=self.core_units,
            head_units=self.head_units,
            lstm_impl=self.lstm_impl,
            dtype_policy=self.precision,
            prev_action=self.prev_action_reward,
            prev_reward=self.prev_action_reward,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> R2D2Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        values = dict(data)
        if "torso_units" in values:
            values["torso_units"] = tuple(values["torso_units"])
        return cls(**values)

    @staticmethod
    def field_docs() -> dict[str, str]:
        """One-line doc of every field, for ``--help``."""
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(R2D2Config)}


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_float(
    name: str, value: Any, *, low: float, high: float | None = None, strict: bool = False
) -> None:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if strict else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")


def apex_epsilons(num: int, *, base: float = 0.4, alpha: float = 7.0) -> np.ndarray:
    """Ape-X per-actor exploration: ε_i = base^(1 + alpha · i / (N − 1)), i = 0 … N−1 (ε_0 = base)."""
    _check_int("num", num, minimum=1)
    if num == 1:
        return np.array([base], dtype=np.float64)
    i = np.arange(num, dtype=np.float64)
    return base ** (1.0 + alpha * i / (num - 1))


def stored_state_offsets(spec: SequenceSpec) -> tuple[int, ...]:
    """Window steps after 0 with a stored state: the multiples of ``period`` (burn-in starts of later windows)."""
    return tuple(range(spec.period, spec.length, spec.period))


def delta_q_offsets(spec: SequenceSpec) -> tuple[int, ...]:
    """Window steps where ΔQ is measured: the stored-state steps (0 included) from the first trained step on."""
    return tuple(o for o in range(0, spec.length, spec.period) if o >= spec.burn_in)


def extra_state_offsets(spec: SequenceSpec) -> tuple[int, ...]:
    """Window steps whose stored states the learner samples beside the window's own: the ΔQ references
    after step 0 (a refresh writes states back by key, it reads none)."""
    return tuple(o for o in delta_q_offsets(spec) if o > 0)


def make_replay(
    config: R2D2Config, obs_dim: int, num_actions: int, *, num_lanes: int | None = None, seed: int = 0
) -> SequenceReplay:
    """A SequenceReplay sized for ``config``: one lane per env row, states shaped like the network's."""
    lanes = config.num_envs if num_lanes is None else num_lanes
    shapes = _network_state_shapes(config)
    return SequenceReplay(
        config.sequence_spec,
        num_lanes=lanes,
        lane_capacity=config.replay_capacity // lanes,
        obs_shape=(obs_dim,),
        obs_dtype=np.float32,
        state_shapes=shapes,
        alpha=config.priority_exponent,
        beta=config.importance_exponent,
        keep_actor_states=config.refresh_states,
        seed=seed,
    )


def _network_state_shapes(config: R2D2Config) -> tuple:
    if config.core != "lstm":
        return ()
    # LSTM: [h, c], each [units]; derived from the config, no model needed.
    return (((config.core_units,), (config.core_units,)),)


class LearnerStep(NamedTuple):
    """What one learner update reports."""

    loss: float
    priorities: np.ndarray
    """[B] new priorities, already written back when the replay was given."""
    delta_q_first: float
    """Mean ΔQ at the first trained step (NaN when burn_in is not a multiple of period)."""
    delta_q_last: float
    """Mean ΔQ at the last window step that has a stored state (NaN if none)."""
    refreshed: int
    """Stored states written back to the replay (refresh_states)."""


class Learner:
    """R2D2 learner: online and target fixed-batch stateful networks, each driven by a BurnInRunner.

    One update, compiled as one ``tf.function``:

    1. restore the window's stored state (or zeros) into the online and target nets;
    2. burn in both without gradient, unroll the rest (online under the tape);
    3. n-step double-Q targets with value rescaling; IS-weighted masked TD loss;
    4. Adam with global-norm clipping; priorities η·max|δ| + (1−η)·mean|δ|;
    5. ΔQ: Q from the recomputed state vs Q from the actor's stored state at
       the same step, with the same parameters.

    The target network is copied every ``target_update_period`` updates.
    """

    def __init__(
        self,
        config: R2D2Config,
        obs_dim: int,
        num_actions: int,
        *,
        seed: int = 0,
        burn_in_gradient: bool = False,
    ) -> None:
        """Build the networks, runners and optimizer.

        Args:
            config: hyper-parameters.
            obs_dim: observation size.
            num_actions: number of discrete actions.
            seed: weight initialisation seed (the same seed gives the actor's weights).
            burn_in_gradient: backpropagate through the burn-in as well, with the
                burn-in only masked out of the loss, as Acme's JAX R2D2 learner and
                RLlib do. It exists to measure what burn-in without gradient saves.
        """
        self.config = config
        self.burn_in_gradient = bool(burn_in_gradient)
        self.obs_dim = int(obs_dim)
        self.num_actions = int(num_actions)
        self.network_config = config.network(self.obs_dim, self.num_actions)
        spec = config.sequence_spec
        self.spec = spec
        b = config.batch_size
        self.online = build_q_network(self.network_config, batch_size=b, seed=seed, name="online")
        self.target = build_q_network(self.network_config, batch_size=b, seed=seed, name="target")
        self.update_target()
        recurrent = self.network_config.recurrent
        self.refresh_offsets = stored_state_offsets(spec) if recurrent else ()
        self.delta_q_offsets = delta_q_offsets(spec) if recurrent else ()
        self._extra_offsets = extra_state_offsets(spec) if recurrent else ()
        # The n-step tail only feeds the (stopped) double-Q bootstrap, so it runs
        # without gradient; burn_in_gradient moves the burn-in into the unroll.
        self.online_runner = BurnInRunner(
            self.online,
            burn_in=0 if burn_in_gradient else spec.burn_in,
            gradient_steps=spec.burn_in + spec.unroll if burn_in_gradient else spec.unroll,
            state_offsets=self.refresh_offsets if config.refresh_states else (),
            allow_stateless=not recurrent,
        )
        self.target_runner = BurnInRunner(self.target, burn_in=spec.burn_in, allow_stateless=not recurrent)
        self.probe_runner = BurnInRunner(self.online, burn_in=0, allow_stateless=not recurrent)
        self.optimizer = keras.optimizers.Adam(
            learning_rate=config.learning_rate,
            epsilon=config.adam_epsilon,
            global_clipnorm=config.max_grad_norm,
        )
        self.optimizer.build(self.online.trainable_variables)
        self.num_updates = 0
        self._update_fn = tf.function(self._update, jit_compile=config.jit_compile, reduce_retracing=False)

    # ------------------------------------------------------------- weights

    def get_weights(self) -> list[np.ndarray]:
        """Online-network weights (for actors)."""
        return self.online.get_weights()

    def update_target(self) -> None:
        self.target.set_weights(self.online.get_weights())

    @property
    def extra_state_offsets(self) -> tuple[int, ...]:
        """Window offsets whose stored states the learner asks the replay for."""
        return self._extra_offsets

    # ------------------------------------------------------------- update

    def step(self, replay: SequenceReplay) -> LearnerStep:
        """Sample a batch, update, and write priorities (and refreshed states) back to ``replay``."""
        batch = replay.sample(self.config.batch_size, extra_state_offsets=self._extra_offsets)
        return self.update(batch, replay=replay)

    def update(self, batch: SequenceBatch, *, replay: SequenceReplay | None = None) -> LearnerStep:
        """One learner update on ``batch``; with ``replay``, priorities (and refreshed states) go back to it."""
        self._check_batch(batch)
        feed = self._feed(batch)
        out = self._update_fn(feed)
        self.num_updates += 1
        if self.num_updates % self.config.target_update_period == 0:
            self.update_target()
        priorities = out["priorities"].numpy()
        refreshed = 0
        if replay is not None:
            replay.update_priorities(batch.keys, priorities)
            if self.config.refresh_states and self.refresh_offsets:
                states = tuple(
                    tuple(tuple(a.numpy() for a in entry) for entry in offset_state)
                    for offset_state in out["offset_states"]
                )
                refreshed = replay.update_states(batch.keys, self.refresh_offsets, states)
        return LearnerStep(
            loss=float(out["loss"].numpy()),
            priorities=priorities,
            delta_q_first=float(out["delta_q_first"].numpy()),
            delta_q_last=float(out["delta_q_last"].numpy()),
            refreshed=refreshed,
        )

    def _check_batch(self, batch: SequenceBatch) -> None:
        b, length = self.config.batch_size, self.spec.length
        if batch.observation.shape != (b, length, self.obs_dim):
            raise ValueError(
                f"batch.observation: expected shape {(b, length, self.obs_dim)}, got {batch.observation.shape}"
            )

    def _feed(self, batch: SequenceBatch) -> dict[str, Any]:
        offsets = self._extra_offsets
        # ΔQ compares with the actor's own states, even where a refresh replaced them.
        extra = {o: batch.extra_actor_states[i] for i, o in enumerate(offsets)}
        extra_mask = {o: batch.extra_state_mask[:, i] for i, o in enumerate(offsets)}
        probe_states = []
        probe_masks = []
        for o in self.delta_q_offsets:
            if o == 0:
                probe_states.append(batch.actor_state)
                probe_masks.append(batch.mask[:, 0])
            else:
                probe_states.append(extra[o])
                probe_masks.append(extra_mask[o])
        final = batch.final
        return {
            "observation": batch.observation,
            "prev_action": batch.prev_action,
            "prev_reward": batch.prev_reward,
            "action": batch.action,
            "reward": batch.reward,
            "discount": batch.discount,
            "mask": batch.mask,
            "actionable": batch.mask & ~final,
            "learn_mask": batch.learn_mask,
            "weights": batch.weights.astype(np.float32),
            "state": batch.state if self.network_config.recurrent else (),
            "probe_states": tuple(probe_states),
            "probe_masks": tuple(probe_masks),
        }

    def _inputs(self, feed: dict[str, Any]) -> list[tf.Tensor]:
        return network_inputs(
            self.network_config,
            tf.cast(feed["observation"], tf.float32),
            tf.cast(feed["prev_action"], tf.int32),
            tf.cast(feed["prev_reward"], tf.float32),
        )

    def _update(self, feed: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        burn_in, unroll = self.spec.burn_in, self.spec.unroll
        inputs = self._inputs(feed)
        mask = feed["mask"]
        recurrent = self.network_config.recurrent
        stored = feed["state"] if recurrent else None
        start = stored if cfg.strategy == StateStrategy.STORED else None

        # Target pass first, outside the tape: its activations are never needed for gradients.
        q_target = tf.stop_gradient(self.target_runner.run(inputs, start, mask=mask).outputs)  # [B, U+n, A]
        with tf.GradientTape() as tape:
            out = self.online_runner.run(inputs, start, mask=mask)
            q_online = out.outputs  # [B, U+n, A] (or [B, L, A] with burn_in_gradient)
            if self.burn_in_gradient:
                q_online = q_online[:, burn_in:]
            actionable = feed["actionable"][:, burn_in:]
            r_t = tf.where(actionable, feed["reward"][:, burn_in:], 0.0)
            pcont_t = tf.where(actionable, cfg.gamma * feed["discount"][:, burn_in:], 1.0)
            loss, extras = r2d2_loss(
                q_online,
                q_target,
                feed["action"][:, burn_in:],
                r_t,
                pcont_t,
                mask[:, burn_in:],
                feed["learn_mask"][:, burn_in : burn_in + unroll],
                feed["weights"],
                n=self.spec.n_step,
                rescale_eps=cfg.value_rescale_eps or None,
                priority_eta=cfg.priority_eta,
            )
        variables = self.online.trainable_variables
        grads = tape.gradient(loss, variables)
        dq_first, dq_last = self._delta_q(inputs, feed, tf.stop_gradient(q_online), mask)
        self.optimizer.apply_gradients(zip(grads, variables))
        return {
            "loss": loss,
            "priorities": extras.priorities,
            "delta_q_first": dq_first,
            "delta_q_last": dq_last,
            "offset_states": out.offset_states,
        }

    def _delta_q(self, inputs, feed, q_hat, mask) -> tuple[tf.Tensor, tf.Tensor]:
        """Mean ΔQ over rows at the first trained step and at the last step with a stored state."""
        nan = tf.constant(float("nan"))
        if not self.delta_q_offsets:
            return nan, nan
        burn_in = self.spec.burn_in
        seq_mask = mask[:, burn_in:]  # the j of max_{a,j} q(ĥ_j): every valid unrolled step
        values, avail = [], []
        for o, state, ok in zip(self.delta_q_offsets, feed["probe_states"], feed["probe_masks"]):
            step_inputs = [x[:, o : o + 1] for x in inputs]
            q_stored = self.probe_runner.run(step_inputs, state).outputs[:, 0]  # [B, A]
            dq = delta_q(q_hat[:, o - burn_in], q_stored, q_hat, seq_mask)  # [B]
            ok = tf.cast(ok, tf.bool) & mask[:, o] & tf.math.is_finite(dq)
            values.append(tf.where(ok, dq, 0.0))
            avail.append(ok)
        values = tf.stack(values, axis=1)  # [B, K]
        avail = tf.stack(avail, axis=1)  # [B, K]

        def masked_mean(v, m):
            m = tf.cast(m, v.dtype)
            count = tf.reduce_sum(m)
            return tf.where(count > 0, tf.reduce_sum(v * m) / tf.maximum(count, 1.0), nan)

        first = masked_mean(values[:, 0], avail[:, 0]) if self.delta_q_offsets[0] == burn_in else nan
        # Per row, the largest offset that has a stored state.
        k = tf.shape(avail)[1]
        last_idx = tf.reduce_max(tf.where(avail, tf.range(k)[None, :], -1), axis=1)  # [B]
        has_any = last_idx >= 0
        last_vals = tf.gather(values, tf.maximum(last_idx, 0), axis=1, batch_dims=1)
        return first, masked_mean(last_vals, has_any)

    # -------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every array needed to resume exactly: weights, target weights, optimizer slots, counters."""
        arrays: dict[str, np.ndarray] = {}
        for i, w in enumerate(self.online.get_weights()):
            arrays[f"online/{i}"] = w
        for i, w in enumerate(self.target.get_weights()):
            arrays[f"target/{i}"] = w
        for i, v in enumerate(self.optimizer.variables):
            arrays[f"optimizer/{i}"] = np.asarray(v.numpy())
        arrays["num_updates"] = np.asarray(self.num_updates, dtype=np.int64)
        arrays["config"] = np.asarray(json.dumps(self.config.to_json(), sort_keys=True))
        arrays["sizes"] = np.asarray([self.obs_dim, self.num_actions], dtype=np.int64)
        return arrays

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` naming the field if it came from another config."""
        saved = json.loads(str(arrays["config"]))
        mine = self.config.to_json()
        mine = json.loads(json.dumps(mine))  # tuples -> lists, as saved
        for name in sorted(set(saved) | set(mine)):
            if saved.get(name) != mine.get(name):
                raise ValueError(
                    f"checkpoint: config field {name!r} is {saved.get(name)!r} in the checkpoint "
                    f"but {mine.get(name)!r} here"
                )
        sizes = [int(s) for s in arrays["sizes"]]
        if sizes != [self.obs_dim, self.num_actions]:
            raise ValueError(
                f"checkpoint: env sizes (obs_dim, num_actions) are {tuple(sizes)} in the checkpoint "
                f"but {(self.obs_dim, self.num_actions)} here"
            )
        self.online.set_weights(_numbered(arrays, "online"))
        self.target.set_weights(_numbered(arrays, "target"))
        slots = _numbered(arrays, "optimizer")
        if len(slots) != len(self.optimizer.variables):
            raise ValueError(
                f"checkpoint: {len(slots)} optimizer variables, expected {len(self.optimizer.variables)}"
            )
        for var, value in zip(self.optimizer.variables, slots):
            var.assign(value)
        self.num_updates = int(arrays["num_updates"])


def _numbered(arrays: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    items = sorted(
        ((int(k.split("/", 1)[1]), v) for k, v in arrays.items() if k.startswith(prefix + "/")),
        key=lambda kv: kv[0],
    )
    return [v for _, v in items]


class Actor:
    """Steps a gymnasium vector env of N envs with one fixed-batch stateful network of batch N.

    Per env row i: ε-greedy with the Ape-X ε_i; the recurrent state row is
    zeroed at each episode start; the state before every observation is passed
    to the replay beside the step. gymnasium's NEXT_STEP autoreset is handled
    explicitly: after a step that terminated or truncated, the row holds the
    episode's final observation; the next ``env.step`` ignores that row's
    action and returns the reset observation, and this step is what the replay
    stores as the final observation (see :mod:`burnin.replay`).
    """

    def __init__(
        self,
        config: R2D2Config,
        env: gym.vector.VectorEnv,
        *,
        replay: SequenceReplay | None = None,
        lanes: Sequence[int] | None = None,
        seed: int = 0,
        epsilons: np.ndarray | None = None,
    ) -> None:
        autoreset = getattr(env, "metadata", {}).get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if autoreset != AutoresetMode.NEXT_STEP:
            raise ValueError(
                f"env: autoreset mode {autoreset}, expected NEXT_STEP (the replay's step convention)"
            )
        self.config = config
        self.env = env
        self.num_envs = int(env.num_envs)
        obs_space = env.single_observation_space
        self.obs_dim = int(np.prod(obs_space.shape))
        self.num_actions = int(env.single_action_space.n)
        self.network_config = config.network(self.obs_dim, self.num_actions)
        self.model = build_q_network(self.network_config, batch_size=self.num_envs, seed=seed, name="actor")
        self.recurrent = self.network_config.recurrent
        if replay is not None and replay.config.obs_shape != (self.obs_dim,):
            raise ValueError(
                f"env: observation shape {(self.obs_dim,)} does not match the replay's {replay.config.obs_shape}"
            )
        self.replay = replay
        self.lanes = np.arange(self.num_envs) if lanes is None else np.asarray(lanes, dtype=np.int64)
        if self.lanes.shape != (self.num_envs,):
            raise ValueError(f"lanes: expected {self.num_envs} lane ids, got shape {self.lanes.shape}")
        if epsilons is None:
            epsilons = apex_epsilons(self.num_envs, base=config.epsilon_base, alpha=config.epsilon_alpha)
        self.epsilons = np.asarray(epsilons, dtype=np.float64)
        if self.epsilons.shape != (self.num_envs,):
            raise ValueError(f"epsilons: expected shape ({self.num_envs},), got {self.epsilons.shape}")
        self.rng = np.random.default_rng(seed)
        self._variables = (
            [v for layer in stateful_layers(self.model) for v in keras.tree.flatten(layer.states)]
            if self.recurrent
            else []
        )
        self._policy = tf.function(self._policy_step, reduce_retracing=False)
        self.steps = 0  # calls of step()
        self.env_steps = 0  # real transitions (autoreset steps not counted)
        self.episodes = 0
        self.last_q: np.ndarray | None = None
        self.reset(seed=seed)

    def reset(self, *, seed: int | None = None) -> None:
        """Reset every env and start fresh episodes; the replay's open episodes in our lanes are closed."""
        obs, _ = self.env.reset(seed=seed)
        self._check_obs(obs)
        if self.replay is not None:
            self.replay.close_lanes(self.lanes)
        n = self.num_envs
        self.obs = obs.astype(np.float32)
        self.prev_action = np.zeros(n, np.int32)
        self.prev_reward = np.zeros(n, np.float32)
        self.new_episode = np.ones(n, bool)
        self.final_pending = np.zeros(n, bool)
        self.episode_return = np.zeros(n, np.float64)
        self.episode_length = np.zeros(n, np.int64)

    def _check_obs(self, obs: np.ndarray) -> None:
        if obs.shape != (self.num_envs, self.obs_dim):
            raise ValueError(
                f"env: observation batch has shape {obs.shape}, expected {(self.num_envs, self.obs_dim)}"
            )

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.model.set_weights(weights)

    def _policy_step(self, obs, prev_action, prev_reward, reset):
        before = []
        for v in self._variables:
            # Zero only the rows that start an episode; tf.where keeps the others bit for bit.
            v.assign(tf.where(reset[:, None], tf.zeros_like(v.value), v.value))
            before.append(tf.identity(v.value))
        inputs = network_inputs(self.network_config, obs[:, None], prev_action[:, None], prev_reward[:, None])
        q = self.model(inputs, training=False)[:, 0]  # [N, A]
        return q, before

    def act(self, *, greedy: bool = False) -> tuple[np.ndarray, np.ndarray, Any]:
        """Q-values, actions and the state before this step, for the current observations."""
        q, before = self._policy(
            tf.constant(self.obs),
            tf.constant(self.prev_action),
            tf.constant(self.prev_reward),
            tf.constant(self.new_episode),
        )
        q = q.numpy()
        greedy_actions = q.argmax(axis=1).astype(np.int32)
        if greedy:
            actions = greedy_actions
        else:
            explore = self.rng.random(self.num_envs) < self.epsilons
            random_actions = self.rng.integers(0, self.num_actions, self.num_envs, dtype=np.int32)
            actions = np.where(explore, random_actions, greedy_actions)
        states = ((before[0].numpy(), before[1].numpy()),) if self.recurrent else ()
        return q, actions, states

    def step(self, *, greedy: bool = False) -> list[tuple[int, float, int]]:
        """One env.step for all rows; returns (row, return, length) of the episodes that ended."""
        q, actions, states = self.act(greedy=greedy)
        self.last_q = q
        next_obs, reward, terminated, truncated, _ = self.env.step(actions)
        self._check_obs(next_obs)
        reward = np.asarray(reward, np.float32)
        terminated = np.asarray(terminated, bool)
        truncated = np.asarray(truncated, bool)
        if self.replay is not None:
            self.replay.add(
                self.lanes,
                observation=self.obs,
                action=actions,
                reward=reward,
                terminated=terminated,
                truncated=truncated,
                states=states if self.recurrent else None,
            )
        real = ~self.final_pending
        self.env_steps += int(real.sum())
        self.episode_return += np.where(real, reward, 0.0)
        self.episode_length += real
        done = terminated | truncated
        finished = [
            (int(i), float(self.episode_return[i]), int(self.episode_length[i])) for i in np.flatnonzero(done)
        ]
        self.episodes += len(finished)
        self.episode_return[done] = 0.0
        self.episode_length[done] = 0
        # A row that just stored its final observation starts a new episode at the next step.
        self.new_episode = self.final_pending.copy()
        self.final_pending = done
        self.prev_action = np.where(self.new_episode, 0, actions).astype(np.int32)
        self.prev_reward = np.where(self.new_episode, 0.0, reward).astype(np.float32)
        self.obs = np.asarray(next_obs, np.float32)
        self.steps += 1
        return finished

    # -------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Counters and the ε RNG (envs restart from a fresh reset when resumed)."""
        return {
            "steps": self.steps,
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.env_steps = int(state["env_steps"])
        self.episodes = int(state["episodes"])
        self.rng.bit_generator.state = state["rng"]


def evaluate(
    config: R2D2Config,
    weights: list[np.ndarray],
    *,
    num_episodes: int = 20,
    seed: int = 0,
    env_id: str | None = None,
    actor: Actor | None = None,
) -> np.ndarray:
    """Greedy returns of ``num_episodes`` episodes, one per env row, run side by side.

    Pass ``actor`` (built on a vector env of ``num_episodes`` envs) to reuse its
    compiled step across evaluations.
    """
    from agents.envs import MASKED_CARTPOLE_ID, make_vector_env

    if actor is None:
        env = make_vector_env(num_episodes, env_id=env_id or MASKED_CARTPOLE_ID, seed=seed)
        actor = Actor(config, env, seed=seed, epsilons=np.zeros(num_episodes))
    if actor.num_envs != num_episodes:
        raise ValueError(f"actor: has {actor.num_envs} envs, expected num_episodes={num_episodes}")
    actor.set_weights(weights)
    actor.reset(seed=seed)
    returns = np.full(num_episodes, np.nan)
    while np.isnan(returns).any():
        for row, ret, _ in actor.step(greedy=True):
            if np.isnan(returns[row]):
                returns[row] = ret
    return returns


class LoopStats(NamedTuple):
    """Counters after one :meth:`TrainLoop.iterate` step."""

    env_steps: int
    updates: int
    episodes: int
    finished: list[tuple[int, float, int]]
    """(row, return, length) of the episodes that ended in this step."""
    learner: LearnerStep | None
    """The last learner update of this step, if any ran."""


class TrainLoop:
    """Single-process R2D2: one actor (a vector env) and one learner, at a fixed replay ratio.

    Every actor step adds ``num_envs`` env steps and earns ``new_steps /
    env_steps_per_update`` learner updates, spent as soon as the replay holds
    ``min_replay_steps`` steps; so the ratio of updates to env steps is fixed
    and deterministic. The actor pulls the learner's weights every
    ``actor_update_period`` actor steps.
    """

    def __init__(self, config: R2D2Config, env: gym.vector.VectorEnv, *, seed: int = 0) -> None:
        if env.num_envs != config.num_envs:
            raise ValueError(f"env: has {env.num_envs} envs, but config.num_envs is {config.num_envs}")
        obs_shape = env.single_observation_space.shape
        if len(obs_shape) != 1:
            raise ValueError(f"env: observation shape {obs_shape}, expected a vector (1-D)")
        self.config = config
        self.seed = int(seed)
        obs_dim, num_actions = int(obs_shape[0]), int(env.single_action_space.n)
        self.replay = make_replay(config, obs_dim, num_actions, seed=seed)
        self.learner = Learner(config, obs_dim, num_actions, seed=seed)
        self.actor = Actor(config, env, replay=self.replay, seed=seed + 1)
        self.actor.set_weights(self.learner.get_weights())
        self.credit = 0.0
        self.resumes = 0
        self._reset_envs_before_acting = False

    @property
    def env_steps(self) -> int:
        return self.actor.env_steps

    def iterate(self) -> LoopStats:
        """One actor step, then the learner updates it has earned."""
        cfg = self.config
        if self._reset_envs_before_acting:
            self.actor.reset(seed=self.seed + 7919 * self.resumes)
            self._reset_envs_before_acting = False
        before = self.actor.env_steps
        finished = self.actor.step()
        last = None
        if self.replay.num_steps >= cfg.min_replay_steps and self.replay.num_sampleable > 0:
            self.credit += (self.actor.env_steps - before) / cfg.env_steps_per_update
            while self.credit >= 1.0:
                last = self.learner.step(self.replay)
                self.credit -= 1.0
        if self.actor.steps % cfg.actor_update_period == 0:
            self.actor.set_weights(self.learner.get_weights())
        return LoopStats(self.actor.env_steps, self.learner.num_updates, self.actor.episodes, finished, last)

    # -------------------------------------------------------- checkpoints

    def save(self, directory: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path:
        """Write a complete checkpoint into ``directory`` (created atomically: temp dir, then rename).

        Holds the learner (online and target weights, optimizer slots,
        counters), the replay, the actor's counters and ε RNG, the loop's
        update credit, and ``extra`` (JSON, e.g. the caller's history).
        """
        final = Path(directory)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_json(),
            "seed": self.seed,
            "credit": self.credit,
            "resumes": self.resumes,
            "actor": self.actor.state_dict(),
            "extra": extra or {},
        }

        def fill(tmp: Path) -> None:
            _atomic_savez(tmp / "learner.npz", self.learner.state_dict())
            self.replay.save(tmp / "replay.npz")
            _atomic_write_text(tmp / "loop.json", json.dumps(meta, indent=1, sort_keys=True))

        write_checkpoint_dir(final, fill)
        return final

    def load(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save` into this loop; returns its ``extra``.

        The envs restart from a fresh reset (seeded from the seed and the number
        of resumes) at the next :meth:`iterate`; episodes that were open at save
        time are then closed in the replay as truncated, so no window spans the gap.
        """
        path = readable_checkpoint(Path(directory), "loop.json")
        meta_path = path / "loop.json"
        if not meta_path.is_file():
            raise ValueError(f"checkpoint: {path} has no loop.json (not a complete checkpoint)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        saved_config = R2D2Config.from_json(meta["config"])
        if saved_config != self.config:
            diff = [
                f.name for f in dataclasses.fields(R2D2Config)
                if getattr(saved_config, f.name) != getattr(self.config, f.name)
            ]  # fmt: skip
            name = diff[0]
            raise ValueError(
                f"checkpoint: config field {name!r} is {getattr(saved_config, name)!r} in the checkpoint "
                f"but {getattr(self.config, name)!r} here"
            )
        with np.load(path / "learner.npz", allow_pickle=False) as data:
            self.learner.load_state_dict({k: data[k] for k in data.files})
        replay = SequenceReplay.load(path / "replay.npz")
        if replay.config != self.replay.config:
            saved, mine = replay.config.to_json(), self.replay.config.to_json()
            name = next(k for k in mine if saved.get(k) != mine[k])
            raise ValueError(
                f"checkpoint: replay layout field {name!r} is {saved.get(name)!r} in the checkpoint "
                f"but {mine[name]!r} here"
            )
        self.replay = replay
        self.actor.replay = replay
        self.actor.load_state_dict(meta["actor"])
        self.credit = float(meta["credit"])
        self.resumes = int(meta["resumes"]) + 1
        self.actor.set_weights(self.learner.get_weights())
        # The envs restart from a fresh reset when acting resumes; until then the
        # loaded replay is exactly what was saved.
        self._reset_envs_before_acting = True
        return meta.get("extra", {})


CHECKPOINT_FORMAT = 1


def _previous(final: Path) -> Path:
    """Where save() keeps the last good checkpoint while it swaps in the new one."""
    return final.with_name(f".{final.name}.previous")


def write_checkpoint_dir(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory with ``fill(tmp)`` and swap it in for ``final`` atomically.

    Between the two renames the last good checkpoint is at ``_previous(final)``;
    :func:`readable_checkpoint` falls back to it, so a crash there loses nothing.
    A failure inside ``fill`` leaves the last good checkpoint as it was.
    """
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    previous = _previous(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(final, previous)
        os.replace(tmp, final)
        shutil.rmtree(previous)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def readable_checkpoint(path: Path, marker: str) -> Path:
    """``path``, or the previous checkpoint if a save was interrupted between its two renames."""
    if not path.exists() and (_previous(path) / marker).is_file():
        return _previous(path)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    _atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, lambda f: f.write(text.encode()))
