"""The single-process R2D2 loop (one actor, one learner, one replay at a fixed replay ratio), the Loop
protocol the run harness drives, and the replay sized for a config."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import gymnasium as gym
import numpy as np

from agents.interrupts import deferred_interrupts
from agents.r2d2.actor import Actor
from agents.r2d2.checkpoint import (
    CHECKPOINT_FORMAT,
    MISMATCH_OVERRIDES,
    CheckpointError,
    check_identity,
    check_same,
    meta_config,
    meta_field,
    read_meta,
    read_replay,
    run_identity,
    write_checkpoint_dir,
    write_learner,
    write_meta,
)
from agents.r2d2.config import R2D2Config
from agents.r2d2.learner import Learner, LearnerStep
from agents.seeds import RunSeeds
from agents.spaces import ObservationEncoding, action_encoding, observation_encoding
from burnin._checks import check_float, check_int, check_str
from burnin.replay import SequenceReplay

__all__ = ["Loop", "LoopStats", "TrainLoop", "check_overrides", "check_replay_fill", "make_replay"]


class LoopStats(NamedTuple):
    """Counters after one :meth:`Loop.iterate` step."""

    env_steps: int
    updates: int
    episodes: int
    finished: list[tuple[int, float, int]]
    """(row, return, length) of the episodes that ended in this step."""
    learner: LearnerStep | None
    """The last learner update of this step, if any ran."""


class ReplayStats(Protocol):
    def stats(self) -> dict[str, Any]: ...


class Loop(Protocol):
    """What the run harness (:mod:`agents.experiment`) drives: :class:`TrainLoop`, or the distributed loop."""

    learner: Learner
    replay: ReplayStats
    loaded_from: Path | None
    """The directory the last :meth:`load` actually read (the previous one after a crash between the
    renames of a save), or None."""

    @property
    def env_steps(self) -> int: ...

    def iterate(self) -> LoopStats: ...

    def save(self, directory: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path: ...

    def load(
        self, directory: str | os.PathLike[str], *, allow_mismatch: Collection[str] = ()
    ) -> dict[str, Any]: ...


def check_replay_fill(config: R2D2Config) -> None:
    """ValueError naming ``min_replay_steps`` when a single-process replay (one lane per env) can never hold
    that many steps: a :class:`TrainLoop` would act for ever and never learn. A training run refuses such a
    config (the train CLI does); a loop that only acts (a probe) may set it on purpose."""
    capacity = config.replay_capacity // config.num_envs * config.num_envs
    if config.min_replay_steps > capacity:
        raise ValueError(
            f"min_replay_steps: expected an int <= {capacity} (the replay holds at most replay_capacity "
            f"{config.replay_capacity} // num_envs {config.num_envs} × num_envs steps), got {config.min_replay_steps}"
        )


def check_overrides(name: str, allow: Collection[str]) -> frozenset[str]:
    """``allow`` as a set of :data:`agents.r2d2.checkpoint.MISMATCH_OVERRIDES`; TypeError/ValueError naming ``name``."""
    if isinstance(allow, str) or not isinstance(allow, Collection):
        raise TypeError(f"{name}: expected a collection of {MISMATCH_OVERRIDES}, got {allow!r}")
    bad = sorted(str(a) for a in allow if a not in MISMATCH_OVERRIDES)
    if bad:
        raise ValueError(f"{name}: expected entries among {MISMATCH_OVERRIDES}, got {bad}")
    return frozenset(allow)


def make_replay(
    config: R2D2Config,
    observation: int | ObservationEncoding,
    row_state_shapes: tuple[tuple[tuple[int, ...], ...], ...],
    *,
    num_lanes: int | None = None,
    seed: int = 0,
) -> SequenceReplay:
    """A SequenceReplay sized for ``config``: one lane per env row, observations in the stored form of
    ``observation`` (an encoding, or the size of a float vector), states of ``row_state_shapes``
    (:func:`agents.r2d2.networks.row_state_shapes` of the network, e.g. ``Learner.row_state_shapes``)."""
    if not isinstance(observation, ObservationEncoding):
        observation = ObservationEncoding.vector(check_int("obs_dim", observation, minimum=1))
    lanes = config.num_envs if num_lanes is None else check_int("num_lanes", num_lanes, minimum=1)
    return SequenceReplay(
        config.sequence_spec,
        num_lanes=lanes,
        lane_capacity=config.replay_capacity // lanes,
        obs_shape=observation.shape,
        obs_dtype=np.dtype(observation.dtype),
        row_state_shapes=row_state_shapes,
        alpha=config.priority_exponent,
        beta=config.importance_exponent,
        keep_actor_states=config.refresh_states,
        seed=seed,
    )


class TrainLoop:
    """Single-process R2D2: one actor (a vector env) and one learner, at a fixed replay ratio.

    Every actor step adds ``num_envs`` env steps and earns ``new_steps /
    env_steps_per_update`` learner updates, spent as soon as the replay holds
    ``min_replay_steps`` steps; so the ratio of updates to env steps is fixed
    and deterministic. The actor pulls the learner's weights every
    ``actor_update_period`` actor steps. Every seed derives from ``seed``
    (:class:`agents.seeds.RunSeeds`).
    """

    def __init__(
        self, config: R2D2Config, env: gym.vector.VectorEnv, *, seed: int = 0, env_id: str | None = None
    ) -> None:
        """``env_id``: the env's gymnasium id as checkpoints record it (default: its spec's id, if any)."""
        if not isinstance(config, R2D2Config):
            raise TypeError(f"config: expected an R2D2Config, got {type(config).__name__}")
        check_int("seed", seed, minimum=0)
        if env.num_envs != config.num_envs:
            raise ValueError(f"env: has {env.num_envs} envs, but config.num_envs is {config.num_envs}")
        encoding = observation_encoding(env.single_observation_space, where="env.observation_space")
        actions = action_encoding(env.single_action_space, where="env.action_space")
        if env_id is None:
            env_id = getattr(getattr(env, "spec", None), "id", None)
        self.config = config
        self.seed = int(seed)
        self.seeds = RunSeeds(self.seed)
        self.identity = run_identity(
            env_id=None if env_id is None else check_str("env_id", env_id, empty=False),
            observation=encoding,
            actions=actions,
        )
        """What checkpoints record this loop belongs to (:func:`agents.r2d2.checkpoint.run_identity`)."""
        self.learner = Learner(config, encoding, actions.num_actions, seed=self.seeds.weights)
        self.replay = make_replay(config, encoding, self.learner.row_state_shapes, seed=self.seeds.replay)
        self.actor = Actor(config, env, replay=self.replay, seed=self.seeds.actor)
        self.actor.set_weights(self.learner.get_weights())
        self.credit = 0.0
        self.resumes = 0
        self.loaded_from: Path | None = None
        self._reset_envs_before_acting = False

    @property
    def env_steps(self) -> int:
        return self.actor.env_steps

    def iterate(self) -> LoopStats:
        """One actor step, then the learner updates it has earned."""
        cfg = self.config
        if self._reset_envs_before_acting:
            self.actor.reset(seed=self.seeds.env_reset(self.resumes))
            self._reset_envs_before_acting = False
        before = self.actor.env_steps
        finished = self.actor.step()
        last = None
        if self.replay.num_steps >= cfg.min_replay_steps and self.replay.num_sampleable > 0:
            self.credit += (self.actor.env_steps - before) / cfg.env_steps_per_update
            while self.credit >= 1.0:
                # The update and its debit are one commit: Ctrl-C between them would save an update twice.
                with deferred_interrupts():
                    last = self.learner.step(self.replay)
                    self.credit -= 1.0
        if self.actor.steps % cfg.actor_update_period == 0:
            self.actor.set_weights(self.learner.get_weights())
        return LoopStats(self.actor.env_steps, self.learner.num_updates, self.actor.episodes, finished, last)

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
            "identity": self.identity,
            "credit": self.credit,
            "resumes": self.resumes,
            "actor": self.actor.state_dict(),
            "extra": extra or {},
        }

        def fill(tmp: Path) -> None:
            write_learner(tmp, self.learner.state_dict())
            self.replay.save(tmp / "replay.npz")
            write_meta(tmp, meta)

        write_checkpoint_dir(final, fill)
        return final

    def load(
        self, directory: str | os.PathLike[str], *, allow_mismatch: Collection[str] = ()
    ) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save` into this loop; returns its ``extra``.

        All or nothing: every file is read and checked first (``loop.json``'s
        fields, the learner's arrays, the replay), then swapped in as a whole
        with Ctrl-C held; a bad checkpoint raises :class:`CheckpointError` naming
        the file and leaves this loop exactly as it was. :attr:`loaded_from` is
        the directory actually read (see :func:`agents.r2d2.checkpoint.read_meta`).

        A checkpoint of another seed, env or layout is refused
        (:class:`agents.r2d2.checkpoint.IdentityMismatch`, naming both sides)
        unless ``allow_mismatch`` names the field ('env', 'seed'); this loop's
        seed and env then hold from here on. One written before the env and
        layout were recorded has only its seed checked.

        The envs restart from a fresh reset (seeded from the seed and the number
        of resumes) at the next :meth:`iterate`; episodes that were open at save
        time are then closed in the replay as truncated, so no window spans the gap.
        """
        path, meta = read_meta(directory)
        file = path / "loop.json"
        if "kind" in meta:
            raise CheckpointError(
                f"checkpoint {file}: kind {meta['kind']!r}, expected a single-process checkpoint "
                "(a distributed one resumes with --actors)"
            )
        meta_config(file, meta, self.config)
        allow = check_overrides("allow_mismatch", allow_mismatch)
        check_identity(file, meta, seed=self.seed, identity=self.identity, allow=allow)
        # Stopped among an iterate's updates (Ctrl-C, a failed update), a loop still owes the rest.
        most_owed = 1.0 + self.config.num_envs / self.config.env_steps_per_update
        credit = meta_field(file, meta, "credit", check_float, low=0.0, high=most_owed)
        resumes = meta_field(file, meta, "resumes", check_int, minimum=0)
        extra = meta.get("extra", {})
        if not isinstance(extra, dict):
            raise CheckpointError(f"checkpoint {file}: extra: expected a JSON object, got {extra!r:.80}")
        for name in ("steps", "env_steps", "episodes"):
            meta_field(file, meta, f"actor.{name}", check_int, minimum=0)
        try:
            actor = Actor.check_state_dict(meta["actor"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {file}: {err}") from None
        learner = self._read_learner(path, actor["env_steps"])
        replay = self._read_replay(path)
        with deferred_interrupts():
            learner_before, actor_before = self.learner.state_dict(), self.actor.model.get_weights()
            try:
                self.learner.assign_state(learner)
                self.actor.set_weights(self.learner.get_weights())
            except BaseException:
                self.learner.assign_state(learner_before)
                self.actor.set_weights(actor_before)
                raise
            self.replay = self.actor.replay = replay
            self.actor.steps, self.actor.env_steps = actor["steps"], actor["env_steps"]
            self.actor.episodes, self.actor.rng = actor["episodes"], actor["rng"]
            self.credit, self.resumes, self.loaded_from = credit, resumes + 1, path
            # The envs restart from a fresh reset when acting resumes; until then the
            # loaded replay is exactly what was saved.
            self._reset_envs_before_acting = True
        return extra

    def _read_learner(self, path: Path, env_steps: int) -> dict[str, Any]:
        """``learner.npz``, checked against this learner, with no more updates than ``env_steps`` earn."""
        arrays = self.learner.read_checkpoint(path)
        most = env_steps / self.config.env_steps_per_update
        if int(arrays["num_updates"]) > most + 1:
            raise CheckpointError(
                f"checkpoint {path / 'learner.npz'}: num_updates is {int(arrays['num_updates'])}, but the "
                f"{env_steps} env steps of loop.json earn at most {int(most)} "
                f"(env_steps_per_update {self.config.env_steps_per_update})"
            )
        return arrays

    def _read_replay(self, path: Path) -> SequenceReplay:
        """``replay.npz``, its layout checked against this loop's replay."""
        file = path / "replay.npz"
        replay = read_replay(file)
        check_same(replay.config.to_json(), self.replay.config.to_json(), "replay layout field", where=file)
        return replay
