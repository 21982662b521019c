"""The R2D2 learner: burn-in from stored states, n-step double-Q with value rescaling, priorities, ΔQ."""

from __future__ import annotations

import json
from typing import Any, NamedTuple, Protocol

import keras
import numpy as np
import tensorflow as tf

from agents.r2d2.checkpoint import check_same, comparable_config
from agents.r2d2.config import (
    R2D2Config,
    StateStrategy,
    delta_q_offsets,
    extra_state_offsets,
    stored_state_offsets,
)
from agents.r2d2.networks import build_q_network, network_inputs, row_state_shapes
from agents.spaces import ObservationEncoding
from burnin.diagnostics import delta_q
from burnin.losses import r2d2_loss
from burnin.replay import RecurrentState, SequenceBatch, SequenceReplay
from burnin.runner import BurnInRunner

__all__ = ["Learner", "LearnerStep", "PriorityWriter", "saved_observation"]


class PriorityWriter(Protocol):
    """What the learner writes back to after an update: a local :class:`SequenceReplay` or a remote one."""

    def update_priorities(self, keys: Any, priorities: Any) -> None: ...

    def update_states(self, keys: Any, offsets: Any, states: tuple[RecurrentState, ...]) -> int: ...


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
        observation: int | ObservationEncoding,
        num_actions: int,
        *,
        seed: int = 0,
        burn_in_gradient: bool = False,
    ) -> None:
        """Build the networks, runners and optimizer.

        Args:
            config: hyper-parameters.
            observation: how the env's observations are stored and encoded
                (:func:`agents.spaces.observation_encoding`), or the size of a float vector.
            num_actions: number of discrete actions.
            seed: weight initialisation seed (the same seed gives the actor's weights).
            burn_in_gradient: backpropagate through the burn-in as well, with the
                burn-in only masked out of the loss, as Acme's JAX R2D2 learner and
                RLlib do. It exists to measure what burn-in without gradient saves.
        """
        self.config = config
        self.burn_in_gradient = bool(burn_in_gradient)
        self.num_actions = int(num_actions)
        self.network_config = config.network(observation, self.num_actions)
        self.observation = self.network_config.observation
        self.obs_dim = self.observation.size
        spec = config.sequence_spec
        self.spec = spec
        b = config.batch_size
        self.online = build_q_network(self.network_config, batch_size=b, seed=seed, name="online")
        self.target = build_q_network(self.network_config, batch_size=b, seed=seed, name="target")
        self.update_target()
        self.state_shapes = row_state_shapes(self.online)
        """Per stateful layer and state array, its shape without the batch (what the replay stores)."""
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

    def update(self, batch: SequenceBatch, *, replay: PriorityWriter | None = None) -> LearnerStep:
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
        expected = (self.config.batch_size, self.spec.length, *self.observation.shape)
        if batch.observation.shape != expected:
            raise ValueError(f"batch.observation: expected shape {expected}, got {batch.observation.shape}")

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

    def model_inputs(self, observation: Any, prev_action: Any, prev_reward: Any) -> list[tf.Tensor]:
        """The network's input list for windows ``[B, T, ...]`` (the order :func:`build_q_network` declares)."""
        return network_inputs(
            self.network_config,
            tf.cast(observation, self.observation.dtype),
            tf.cast(prev_action, tf.int32),
            tf.cast(prev_reward, tf.float32),
        )

    def _update(self, feed: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        burn_in, unroll = self.spec.burn_in, self.spec.unroll
        inputs = self.model_inputs(feed["observation"], feed["prev_action"], feed["prev_reward"])
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
        arrays["observation"] = np.asarray(json.dumps(self.observation.to_json(), sort_keys=True))
        return arrays

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` naming the field if it came from another config."""
        check_same(
            comparable_config(json.loads(str(arrays["config"]))),
            comparable_config(self.config),
            "config field",
        )
        sizes = [int(s) for s in arrays["sizes"]]
        if sizes != [self.obs_dim, self.num_actions]:
            raise ValueError(
                f"checkpoint: env sizes (obs_dim, num_actions) are {tuple(sizes)} in the checkpoint "
                f"but {(self.obs_dim, self.num_actions)} here"
            )
        if "observation" in arrays:  # checkpoints before any-env training held vectors only
            saved = ObservationEncoding.from_json(json.loads(str(arrays["observation"])))
            if saved != self.observation:
                raise ValueError(
                    f"checkpoint: observation encoding {saved} in the checkpoint but {self.observation} here"
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


def saved_observation(arrays: dict[str, np.ndarray]) -> tuple[ObservationEncoding, int]:
    """The observation encoding and number of actions a :meth:`Learner.state_dict` was made for (a
    float vector of ``sizes[0]`` in checkpoints from before any-env training)."""
    obs_size, num_actions = (int(s) for s in arrays["sizes"])
    if "observation" not in arrays:
        return ObservationEncoding.vector(obs_size), num_actions
    return ObservationEncoding.from_json(json.loads(str(arrays["observation"]))), num_actions


def _numbered(arrays: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    items = sorted(
        ((int(k.split("/", 1)[1]), v) for k, v in arrays.items() if k.startswith(prefix + "/")),
        key=lambda kv: kv[0],
    )
    return [v for _, v in items]
