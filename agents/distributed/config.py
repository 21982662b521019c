"""How a distributed R2D2 run is spread over Ray (DistributedConfig); the hyper-parameters stay in R2D2Config."""

from __future__ import annotations

import dataclasses

from agents.r2d2.config import R2D2Config, documented
from burnin._checks import check_bool, check_float, check_int, check_str
from burnin.rate_limiter import RateLimiter

__all__ = ["DistributedConfig"]


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

    def __post_init__(self) -> None:
        for name in ("num_actors", "push_every", "actor_threads"):
            check_int(name, getattr(self, name), minimum=1)
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
        spi = self.samples_per_insert(config)
        if spi is not None:
            RateLimiter(
                spi,
                min_size_to_sample=config.min_replay_steps,
                error_buffer=self.resolved_error_buffer(config),
            ).check_insert_size(self.push_env_steps(config))
