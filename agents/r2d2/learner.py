"""The R2D2 learner: burn-in from stored states, n-step double-Q with value rescaling, priorities, ΔQ."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import keras
import numpy as np
import tensorflow as tf

from agents.interrupts import deferred_interrupts
from agents.r2d2 import learner_checkpoint
from agents.r2d2.config import R2D2Config, StateStrategy, WindowOffsets
from agents.r2d2.feed import Feed, FeedLayout, UpdateFeed, make_feed, unpack_feed
from agents.r2d2.networks import build_q_network, network_inputs, row_state_shapes
from agents.spaces import ObservationEncoding
from burnin._checks import check_bool, check_int
from burnin.diagnostics import delta_q
from burnin.losses import r2d2_loss, rewards_and_continuations
from burnin.replay import RecurrentState, SequenceBatch, SequenceReplay
from burnin.runner import BurnInRunner

__all__ = ["Learner", "LearnerStep", "PriorityWriter"]


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

    An update is all or nothing: the batch is checked first (shapes, dtypes,
    ranges, finite values), and the step is kept only if the loss, the
    priorities, the recomputed states and every weight and optimizer slot after
    it are finite; otherwise the learner is left as it was and ``ValueError``
    says why. A Ctrl-C or SIGTERM during an update is delivered after it.
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
        if not isinstance(config, R2D2Config):
            raise TypeError(f"config: expected an R2D2Config, got {type(config).__name__}")
        self.config = config
        self.burn_in_gradient = check_bool("burn_in_gradient", burn_in_gradient)
        if not isinstance(observation, ObservationEncoding):
            observation = ObservationEncoding.vector(check_int("obs_dim", observation, minimum=1))
        self.num_actions = check_int("num_actions", num_actions, minimum=1)
        check_int("seed", seed, minimum=0)
        self.network_config = config.network(observation, self.num_actions)
        self.observation = self.network_config.observation
        self.obs_dim = self.observation.size
        spec = config.sequence_spec
        self.spec = spec
        b = config.batch_size
        self.online = build_q_network(self.network_config, batch_size=b, seed=seed, name="online")
        self.target = build_q_network(self.network_config, batch_size=b, seed=seed, name="target")
        # Never trained, only copied into: frozen, its fused LSTM keeps no activations for a gradient
        # (1.04× the update at the demo's scale, interleaved; benchmarks/README.md).
        self.target.trainable = False
        self.update_target()
        self.row_state_shapes = row_state_shapes(self.online)
        """Per stateful layer and state array, its shape without the batch (what the replay stores)."""
        recurrent = self.network_config.recurrent
        self.offsets = WindowOffsets.of(spec) if recurrent else WindowOffsets()
        """Where the update reads and writes stored states (refresh, ΔQ, the extra states it samples)."""
        # The n-step tail only feeds the (stopped) double-Q bootstrap, so it runs
        # without gradient; burn_in_gradient moves the burn-in into the unroll.
        self.online_runner = BurnInRunner(
            self.online,
            burn_in=0 if burn_in_gradient else spec.burn_in,
            gradient_steps=spec.burn_in + spec.unroll if burn_in_gradient else spec.unroll,
            state_offsets=self.offsets.refresh if config.refresh_states else (),
            allow_stateless=not recurrent,
        )
        self.target_runner = BurnInRunner(self.target, burn_in=spec.burn_in, allow_stateless=not recurrent)
        self.probe_runner = BurnInRunner(self.online, burn_in=0, allow_stateless=not recurrent)
        self.feed_layout = FeedLayout(
            batch_size=b,
            length=spec.length,
            num_actions=self.num_actions,
            observation_shape=self.observation.shape,
            observation_dtype=np.dtype(self.observation.dtype),
            row_state_shapes=self.row_state_shapes,
            offsets=self.offsets,
        )
        """What the update expects of a batch (:func:`agents.r2d2.feed.make_feed` checks it)."""
        self.optimizer = keras.optimizers.Adam(
            learning_rate=config.learning_rate,
            epsilon=config.adam_epsilon,
            global_clipnorm=config.max_grad_norm,
        )
        self.optimizer.build(self.online.trainable_variables)
        self._update_fn = tf.function(self._update, jit_compile=config.jit_compile, reduce_retracing=False)
        # Every feed has the same shapes and dtypes (make_feed checks them), so after the first trace the
        # update calls its one concrete function: that skips tf.function's signature matching,
        # 0.3–0.6 ms of the 17–18 ms of a demo-scale update (measured, interleaved).
        self._update_concrete: Any = None

    @property
    def num_updates(self) -> int:
        """Updates applied so far: the optimizer's step counter, committed with the step itself."""
        return int(self.optimizer.iterations.numpy())

    # ------------------------------------------------------------- weights

    def get_weights(self) -> list[np.ndarray]:
        """Online-network weights (for actors)."""
        return self.online.get_weights()

    def update_target(self) -> None:
        self.target.set_weights(self.online.get_weights())

    # ------------------------------------------------------------- update

    def step(self, replay: SequenceReplay) -> LearnerStep:
        """Sample a batch, update, and write priorities (and refreshed states) back to ``replay``."""
        batch = replay.sample(self.config.batch_size, extra_state_offsets=self.offsets.extra)
        return self.update(batch, replay=replay)

    def update(self, batch: SequenceBatch, *, replay: PriorityWriter | None = None) -> LearnerStep:
        """One learner update on ``batch``; with ``replay``, priorities (and refreshed states) go back to it.

        ``ValueError``/``TypeError`` naming the field for a bad batch, and
        ``ValueError`` for a step that would leave anything non-finite: in both
        cases nothing was changed. The step and its write-back to ``replay``
        run with Ctrl-C and SIGTERM held until they are done.
        """
        feed = make_feed(batch, self.feed_layout)
        if self._update_concrete is None:
            self._update_concrete = self._update_fn.get_concrete_function(feed)
        with deferred_interrupts():
            out = self._update_concrete(feed)
            if not bool(out["applied"]):
                raise ValueError(_rejection({k: bool(v) for k, v in out["finite"].items()}))
            priorities = out["priorities"].numpy()
            refreshed = 0
            if replay is not None:
                replay.update_priorities(batch.keys, priorities)
                if self.config.refresh_states and self.offsets.refresh:
                    states = tuple(
                        tuple(tuple(a.numpy() for a in entry) for entry in offset_state)
                        for offset_state in out["offset_states"]
                    )
                    refreshed = replay.update_states(batch.keys, self.offsets.refresh, states)
        return LearnerStep(
            loss=float(out["loss"].numpy()),
            priorities=priorities,
            delta_q_first=float(out["delta_q_first"].numpy()),
            delta_q_last=float(out["delta_q_last"].numpy()),
            refreshed=refreshed,
        )

    def model_inputs(self, observation: Any, prev_action: Any, prev_reward: Any) -> list[tf.Tensor]:
        """The network's input list for windows ``[B, T, ...]`` (the order :func:`build_q_network` declares)."""
        return network_inputs(
            self.network_config,
            tf.cast(observation, self.observation.dtype),
            tf.cast(prev_action, tf.int32),
            tf.cast(prev_reward, tf.float32),
        )

    def _update(self, packed: UpdateFeed) -> dict[str, Any]:
        """The compiled update (steps 1-5 of the class docstring) on :func:`make_feed`'s arrays."""
        feed = unpack_feed(packed, self.feed_layout)
        cfg, burn_in, unroll = self.config, self.spec.burn_in, self.spec.unroll
        inputs = self.model_inputs(feed.observation, feed.prev_action, feed.prev_reward)
        stored = feed.state if self.network_config.recurrent else None
        start = stored if cfg.strategy == StateStrategy.STORED else None

        # Target pass first, outside the tape: its activations are never needed for gradients.
        q_target = tf.stop_gradient(self.target_runner.run(inputs, start, mask=feed.valid_t).outputs)
        with tf.GradientTape() as tape:
            out = self.online_runner.run(inputs, start, mask=feed.valid_t)
            q_online = out.outputs  # [B, U+n, A] (or [B, L, A] with burn_in_gradient), as q_target
            if self.burn_in_gradient:
                q_online = q_online[:, burn_in:]
            r_t, pcont_t = rewards_and_continuations(
                feed.reward[:, burn_in:],
                feed.discount[:, burn_in:],
                feed.has_action[:, burn_in:],
                gamma=cfg.gamma,
                reward_scale=cfg.reward_scale,
            )
            loss, extras = r2d2_loss(
                q_online,
                q_target,
                feed.action[:, burn_in:],
                r_t,
                pcont_t,
                feed.valid_t[:, burn_in:],
                feed.learn_mask[:, burn_in : burn_in + unroll],
                feed.weights,
                n=self.spec.n_step,
                rescale_eps=cfg.value_rescale_eps or None,
                priority_eta=cfg.priority_eta,
            )
        grads = tape.gradient(loss, self.online.trainable_variables)
        dq_first, dq_last = self._delta_q(inputs, feed, tf.stop_gradient(q_online))
        finite = {
            "loss": _all_finite([loss]),
            "priorities": _all_finite([extras.priorities]),
            "states": _all_finite(tf.nest.flatten(out.offset_states)),
        }
        finite["weights"], applied = self._commit(
            grads, finite["loss"] & finite["priorities"] & finite["states"]
        )
        return {
            "loss": loss,
            "priorities": extras.priorities,
            "delta_q_first": dq_first,
            "delta_q_last": dq_last,
            "offset_states": out.offset_states,
            "finite": finite,
            "applied": applied,
        }

    def _commit(self, grads: list[tf.Tensor], finite: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Apply the optimizer step; keep it only if ``finite`` and every weight and slot after it is finite,
        else restore what was there. Copy the target every ``target_update_period`` kept steps.
        Returns (weights finite, step kept)."""
        variables = self.online.trainable_variables
        slots = self.optimizer.variables
        saved = [tf.identity(v) for v in (*variables, *slots)]  # the values before the step
        self.optimizer.apply_gradients(zip(grads, variables))
        weights_finite = _all_finite([v for v in (*variables, *slots) if "float" in str(v.dtype)])
        applied = finite & weights_finite

        def restore() -> tf.Tensor:
            for v, value in zip((*variables, *slots), saved):
                v.assign(value)
            return tf.constant(False)

        tf.cond(applied, lambda: tf.constant(True), restore)
        period = self.config.target_update_period

        def copy_target() -> tf.Tensor:
            for t, o in zip(self.target.weights, self.online.weights):
                t.assign(o)
            return tf.constant(True)

        tf.cond(applied & (self.optimizer.iterations % period == 0), copy_target, lambda: tf.constant(False))
        return weights_finite, applied

    def _delta_q(self, inputs: list[tf.Tensor], feed: Feed, q_hat: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Mean ΔQ over rows at the first trained step and at the last step with a stored state."""
        nan = tf.constant(float("nan"))
        if not self.offsets.delta_q:
            return nan, nan
        burn_in = self.spec.burn_in
        seq_mask = feed.valid_t[:, burn_in:]  # the j of max_{a,j} q(ĥ_j): every valid unrolled step
        values, avail = [], []
        for o, state, ok in zip(self.offsets.delta_q, feed.delta_q_states, feed.delta_q_state_mask):
            step_inputs = [x[:, o : o + 1] for x in inputs]
            q_stored = self.probe_runner.run(step_inputs, state).outputs[:, 0]  # [B, A]
            dq = delta_q(q_hat[:, o - burn_in], q_stored, q_hat, seq_mask)  # [B]
            ok = tf.cast(ok, tf.bool) & feed.valid_t[:, o] & tf.math.is_finite(dq)
            values.append(tf.where(ok, dq, 0.0))
            avail.append(ok)
        values = tf.stack(values, axis=1)  # [B, K]
        avail = tf.stack(avail, axis=1)  # [B, K]
        first = _masked_mean(values[:, 0], avail[:, 0]) if self.offsets.delta_q[0] == burn_in else nan
        # Per row, the largest offset that has a stored state.
        k = tf.shape(avail)[1]
        last_idx = tf.reduce_max(tf.where(avail, tf.range(k)[None, :], -1), axis=1)  # [B]
        has_any = last_idx >= 0
        last_vals = tf.gather(values, tf.maximum(last_idx, 0), axis=1, batch_dims=1)
        return first, _masked_mean(last_vals, has_any)

    # ------------------------------------------------ checkpoints (learner.npz)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every array needed to resume exactly (:func:`agents.r2d2.learner_checkpoint.state_dict`)."""
        return learner_checkpoint.state_dict(self)

    def array_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Name -> (shape, dtype) of every array of :meth:`state_dict`."""
        return learner_checkpoint.array_specs(self)

    def check_state_dict(self, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The arrays of a :meth:`state_dict`, checked as untrusted input; changes nothing
        (:func:`agents.r2d2.learner_checkpoint.check_state_dict` says what is refused)."""
        return learner_checkpoint.check_state_dict(self, arrays)

    def read_checkpoint(self, directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
        """``learner.npz`` of a checkpoint directory, read and checked for this learner; changes nothing."""
        return learner_checkpoint.read_checkpoint(self, directory)

    def load_state_dict(self, arrays: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: everything is checked first (:meth:`check_state_dict`), then assigned
        as a whole; on any failure (KeyboardInterrupt included) the learner is as it was."""
        self.assign_state(self.check_state_dict(arrays))

    def assign_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Assign arrays that :meth:`check_state_dict` returned, all or nothing (Ctrl-C held meanwhile)."""
        learner_checkpoint.assign_state(self, arrays)


def _all_finite(tensors: list[tf.Tensor]) -> tf.Tensor:
    if not tensors:
        return tf.constant(True)
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(t, tf.float32))) for t in tensors])


def _rejection(finite: dict[str, bool]) -> str:
    what = {
        "loss": "the loss",
        "priorities": "the priorities",
        "states": "the recomputed states",
        "weights": "the weights or optimizer slots after the step",
    }
    bad = ", ".join(what[k] for k, ok in finite.items() if not ok) or "the step"
    return (
        f"update: the batch gives non-finite values in {bad}; nothing was applied (the learner is as it was)"
    )


def _masked_mean(v: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
    """mean(v[m]) over a [B] mask; NaN for an empty one."""
    m = tf.cast(m, v.dtype)
    count = tf.reduce_sum(m)
    return tf.where(count > 0, tf.reduce_sum(v * m) / tf.maximum(count, 1.0), tf.constant(float("nan")))
