"""How a distributed R2D2 run is spread over Ray (DistributedConfig); the hyper-parameters stay in R2D2Config."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from agents.r2d2.config import R2D2Config, documented
from burnin._checks import check_bool, check_float, check_int, check_str
from burnin.rate_limiter import RateLimiter

__all__ = ["DistributedConfig", "Resources", "parse_resources", "ray_options"]

Resources = tuple[tuple[str, float], ...]
"""A Ray resource request as sorted (name, amount) pairs: ``CPU`` and ``GPU`` are Ray's, others custom."""


def check_resources(name: str, value: Any) -> Resources:
    """``value`` (a mapping or (name, amount) pairs) as :data:`Resources`; TypeError/ValueError naming ``name``."""
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        items = [(key, amount) for key, amount in pairs]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a mapping of resource names to amounts, got {value!r}") from None
    out = {}
    for key, amount in items:
        if not isinstance(key, str) or not key or "=" in key or "," in key:
            raise ValueError(f"{name}: expected resource names (non-empty, no '=' or ','), got {key!r}")
        try:
            check_float(name, amount, low=0.0)
        except (TypeError, ValueError) as err:  # the message names the field, then the resource
            raise type(err)(f"{name}: {key}: {str(err).partition(': ')[2]}") from None
        if key in out:
            raise ValueError(f"{name}: resource {key!r} given twice")
        out[key] = float(amount)
    return tuple(sorted(out.items()))


def parse_resources(name: str, text: str) -> Resources:
    """``'GPU=1,accel=0.5'`` as :data:`Resources` (the CLI's form); ValueError naming ``name``."""
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        key, eq, amount = part.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = None
        if not part or not eq or value is None:
            raise ValueError(f"{name}: expected NAME=AMOUNT[,NAME=AMOUNT...] (e.g. GPU=1), got {text!r}")
        pairs.append((key.strip(), value))
    return check_resources(name, pairs)


def ray_options(resources: Resources, *, cpus: float = 0.0) -> dict[str, Any]:
    """Keyword arguments of Ray's ``.options()`` for ``resources`` (``CPU`` else ``cpus``, ``GPU``, custom)."""
    custom = {k: v for k, v in resources if k not in ("CPU", "GPU")}
    named = dict(resources)
    return {"num_cpus": named.get("CPU", cpus), "num_gpus": named.get("GPU", 0.0), "resources": custom}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How a run is spread over Ray. The R2D2 hyper-parameters stay in :class:`R2D2Config`.

    Every worker runs ``config.num_envs`` envs, so the replay has
    ``num_actors · num_envs`` lanes sharing ``config.replay_capacity`` steps, and
    the Ape-X ε spans all ``num_actors · num_envs`` rows.
    """

    env_id: str = dataclasses.field(metadata={"doc": "Gymnasium env id every worker runs (no default)."})
    num_actors: int = documented(2, "Actor worker processes (Ray actors).")
    push_every: int = documented(
        8, "Actor steps a worker collects before sending them to the replay in one call."
    )
    weights_every: int | None = documented(
        None,
        "Learner updates between weight publishes; None: the single-process pull period in updates "
        "(actor_update_period · num_envs / env_steps_per_update).",
    )
    error_buffer: float | None = documented(
        None,
        "Rate-limiter slack in learner updates (Reverb's error_buffer); None: the updates' worth of "
        "one push from every worker, plus max(1, samples_per_insert).",
    )
    rate_limited: bool = documented(
        True, "Hold samples per insert at 1 / env_steps_per_update; False: inserts never block."
    )
    checkpoint_seconds: float = documented(
        60.0, "Seconds between replay checkpoints by the server (0: only on request)."
    )
    max_restarts: int = documented(8, "Times Ray restarts a dead actor worker.")
    wait_timeout: float = documented(
        0.5, "Seconds a blocked server call waits before returning, so that nothing can hang on shutdown."
    )
    actor_cpus: float = documented(1.0, "Ray CPUs reserved per actor worker.")
    actor_threads: int = documented(
        1, "TensorFlow intra- and inter-op threads in each worker (the actor net is small)."
    )
    actor_resources: tuple[tuple[str, float], ...] = documented(
        (),
        "Ray resources each worker asks for besides actor_cpus (e.g. a custom resource of the actor nodes).",
    )
    learner_resources: tuple[tuple[str, float], ...] | None = documented(
        None,
        "None: the learner runs in the driver; else it runs as a Ray actor asking for these resources "
        "(e.g. GPU=1), and the driver can run on any node.",
    )
    replay_shards: int = documented(
        1,
        "Replay server actors; worker i writes to shard i % replay_shards; the learner samples them as one.",
    )

    def __post_init__(self) -> None:
        for name in ("num_actors", "push_every", "actor_threads", "replay_shards"):
            check_int(name, getattr(self, name), minimum=1)
        if self.replay_shards > self.num_actors:
            raise ValueError(
                f"replay_shards: expected <= num_actors={self.num_actors} (a shard without a worker never "
                f"fills), got {self.replay_shards}"
            )
        # Stored as sorted pairs: the options stay hashable and their JSON form is stable.
        object.__setattr__(self, "actor_resources", check_resources("actor_resources", self.actor_resources))
        if self.learner_resources is not None:
            learner = check_resources("learner_resources", self.learner_resources)
            object.__setattr__(self, "learner_resources", learner)
        check_int("max_restarts", self.max_restarts, minimum=0)
        if self.weights_every is not None:
            check_int("weights_every", self.weights_every, minimum=1)
        if self.error_buffer is not None:
            check_float("error_buffer", self.error_buffer, low=0.0, strict=True)
        check_bool("rate_limited", self.rate_limited)
        check_float("checkpoint_seconds", self.checkpoint_seconds, low=0.0, strict=False)
        check_float("wait_timeout", self.wait_timeout, low=0.0, strict=True)
        check_float("actor_cpus", self.actor_cpus, low=0.0, strict=False)
        check_str("env_id", self.env_id, empty=False)

    @classmethod
    def from_flags(
        cls,
        num_actors: int,
        env_id: str,
        *,
        learner_resources: str = "",
        actor_resources: str = "",
        **options: Any,
    ) -> DistributedConfig:
        """Options with the resources written as the train CLI takes them, ``'GPU=1,accel=0.5'``
        (:func:`parse_resources`); ``learner_resources=''`` keeps the learner in the driver."""
        learner = parse_resources("learner_resources", learner_resources) if learner_resources else None
        actor = parse_resources("actor_resources", actor_resources) if actor_resources else ()
        return cls(
            num_actors=num_actors, env_id=env_id, learner_resources=learner, actor_resources=actor, **options
        )

    def shard_of(self, worker: int) -> int:
        """The replay shard worker ``worker`` writes to."""
        return worker % self.replay_shards

    def shard_workers(self, shard: int) -> range:
        """The workers that write to ``shard``."""
        return range(shard, self.num_actors, self.replay_shards)

    def shard_lanes(self, config: R2D2Config, shard: int) -> int:
        """Lanes of ``shard``: one per env of each of its workers."""
        return len(self.shard_workers(shard)) * config.num_envs

    def shard_config(self, config: R2D2Config, shard: int) -> R2D2Config:
        """``config`` with the replay capacity of ``shard``: every lane of the run keeps the same capacity."""
        if self.replay_shards == 1:
            return config
        per_lane = config.replay_capacity // (self.num_actors * config.num_envs)
        return dataclasses.replace(config, replay_capacity=per_lane * self.shard_lanes(config, shard))

    def limiter(self, config: R2D2Config, shard: int = 0) -> RateLimiter:
        """The rate limiter of replay shard ``shard``.

        One server counts learner batches against env steps. With several
        shards each counts the windows drawn from it (``batch_size`` per batch
        over all shards) against its own env steps, at ``batch_size`` times the
        ratio: the sum over shards is the run's ratio, whichever shard the
        priorities favour. Its minimum fill and slack are its lanes' share.
        """
        spi = self.samples_per_insert(config)
        if self.replay_shards == 1:
            return RateLimiter(
                spi,
                min_size_to_sample=config.min_replay_steps,
                error_buffer=self.resolved_error_buffer(config),
            )
        share = self.shard_lanes(config, shard) / (self.num_actors * config.num_envs)
        windows = config.batch_size
        return RateLimiter(
            None if spi is None else spi * windows,
            min_size_to_sample=math.ceil(config.min_replay_steps * share),
            error_buffer=self.resolved_error_buffer(config) * share * windows + windows,
        )

    def samples_per_insert(self, config: R2D2Config) -> float | None:
        """Learner batches per env step (None when not rate limited)."""
        return 1.0 / config.env_steps_per_update if self.rate_limited else None

    def push_env_steps(self, config: R2D2Config) -> int:
        """Most env steps one push can carry."""
        return self.push_every * config.num_envs

    def resolved_weights_every(self, config: R2D2Config) -> int:
        if self.weights_every is not None:
            return self.weights_every
        return max(1, round(config.actor_update_period * config.num_envs / config.env_steps_per_update))

    def resolved_error_buffer(self, config: R2D2Config) -> float:
        if self.error_buffer is not None:
            return float(self.error_buffer)
        spi = 1.0 / config.env_steps_per_update
        return self.num_actors * self.push_env_steps(config) * spi + max(1.0, spi)

    def check(self, config: R2D2Config) -> None:
        """Raise ValueError when these options cannot work with ``config``."""
        lanes = self.num_actors * config.num_envs
        if config.replay_capacity // lanes < config.sequence_spec.length + 1:
            raise ValueError(
                f"num_actors: {self.num_actors} workers × num_envs={config.num_envs} = {lanes} lanes leave "
                f"{config.replay_capacity // lanes} of replay_capacity={config.replay_capacity} steps per lane, "
                f"fewer than a window and the step before it ({config.sequence_spec.length + 1})"
            )
        push = self.push_env_steps(config)
        for shard in range(self.replay_shards):
            limiter = self.limiter(config, shard)
            limiter.check_insert_size(push)
            spi = limiter.samples_per_insert
            # A shard's learner side waits for up to a whole batch of windows: the slack must hold that too.
            if (
                self.replay_shards > 1
                and spi is not None
                and push * spi + config.batch_size > 2 * limiter.error_buffer
            ):
                raise ValueError(
                    f"error_buffer: {self.error_buffer} updates is too small for {self.replay_shards} replay "
                    f"shards: shard {shard} could block both its workers and the learner; raise it or leave it None"
                )
