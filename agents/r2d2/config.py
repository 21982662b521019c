"""R2D2 hyper-parameters (R2D2Config), the learner's start-state strategy, presets, and the window
offsets the learner uses stored states at (WindowOffsets)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from agents.r2d2.networks import NetworkConfig, check_architecture
from agents.spaces import ObservationEncoding
from burnin._checks import check_bool, check_choice, check_float, check_int
from burnin.replay import SequenceSpec

__all__ = [
    "PRESETS",
    "PRESET_DOCS",
    "R2D2Config",
    "StateStrategy",
    "WindowOffsets",
    "documented",
    "preset",
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


def documented(default: Any, doc: str) -> Any:
    """A dataclass field with a one-line doc (shown by ``--help``)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


_field = documented


@dataclasses.dataclass(frozen=True)
class R2D2Config:
    """R2D2 hyper-parameters. Defaults are tuned for masked CartPole; the paper's (Atari) values are in each doc."""

    # Network (paper: conv torso, LSTM 512, dueling heads 512).
    torso_units: tuple[int, ...] = _field(
        (64,),
        "Dense ReLU torso widths, after the observation encoder (images: after the conv torso and its "
        "Dense 512; paper: none).",
    )
    core: str = _field(
        "lstm", "'lstm' (stateful recurrent core) or 'dense' (feed-forward ablation of equal width)."
    )
    core_units: int = _field(128, "Width of each recurrent core layer (or of the Dense core) (paper: 512).")
    core_layers: tuple[str, ...] = _field(
        ("lstm",),
        "Stateful layers of the recurrent core, input side first: 'lstm' or 'gru' (paper: one LSTM).",
    )
    head_units: int = _field(128, "Hidden width of each dueling head (paper: 512).")
    lstm_impl: str = _field(
        "fused",
        "'fused' (burnin.layers.HoistedLSTM with its own sequence gradient, XLA loops up to 128 units: "
        "fastest, equal to rounding), 'keras' (keras.layers.LSTM), 'hoisted' or 'unrolled' (HoistedLSTM: same outputs).",
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
    reward_scale: float = _field(
        1.0,
        "Rewards are multiplied by this where the agent learns from them (the n-step targets and the "
        "previous-reward input); returns, evaluations and the replay keep the env's own (paper: 1).",
    )
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
            check_int(name, getattr(self, name), minimum=1)
        for name in ("burn_in", "min_replay_steps"):
            check_int(name, getattr(self, name), minimum=0)
        check_architecture(
            self.torso_units,
            self.core,
            self.core_layers,
            self.lstm_impl,
            self.precision,
            dtype_name="precision",
        )
        check_choice("state_strategy", self.state_strategy, [s.value for s in StateStrategy])
        if self.period > self.unroll:
            raise ValueError(
                f"period: expected an int <= unroll ({self.unroll}), got {self.period} "
                "(a longer period would leave steps untrained)"
            )
        for name in ("gamma", "priority_eta", "epsilon_base"):
            check_float(name, getattr(self, name), low=0.0, high=1.0)
        for name in ("value_rescale_eps", "priority_exponent", "importance_exponent", "epsilon_alpha"):
            check_float(name, getattr(self, name), low=0.0)
        for name in (
            "learning_rate",
            "adam_epsilon",
            "max_grad_norm",
            "env_steps_per_update",
            "reward_scale",
        ):
            check_float(name, getattr(self, name), low=0.0, strict=True)
        for name in ("prev_action_reward", "refresh_states", "jit_compile"):
            check_bool(name, getattr(self, name))
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

    def network(self, observation: int | ObservationEncoding, num_actions: int) -> NetworkConfig:
        """The Q-network architecture for an env with this observation (an encoding, or the size of a
        float vector) and this many actions."""
        if not isinstance(observation, ObservationEncoding):
            observation = ObservationEncoding.vector(observation)
        return NetworkConfig(
            obs_dim=observation.size,
            observation=observation,
            num_actions=num_actions,
            torso_units=self.torso_units,
            core=self.core,
            core_units=self.core_units,
            core_layers=self.core_layers,
            head_units=self.head_units,
            lstm_impl=self.lstm_impl,
            dtype_policy=self.precision,
            prev_action=self.prev_action_reward,
            prev_reward=self.prev_action_reward,
            reward_scale=self.reward_scale,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> R2D2Config:
        """Inverse of :meth:`to_json`; a field missing from ``data`` (an older checkpoint) takes its default."""
        if not isinstance(data, dict):
            raise TypeError(f"config: expected a dict of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        values = dict(data)
        for name in ("torso_units", "core_layers"):
            if isinstance(values.get(name), list):  # JSON has no tuples; anything else fails the check
                values[name] = tuple(values[name])
        return cls(**values)

    @staticmethod
    def field_docs() -> dict[str, str]:
        """One-line doc of every field, for ``--help``."""
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(R2D2Config)}


PRESETS: dict[str, dict[str, Any]] = {
    "masked-cartpole": {},
    "popgym": dict(
        burn_in=10, unroll=40, period=10, learning_rate=3e-4, adam_epsilon=1e-8, env_steps_per_update=8.0,
        replay_capacity=50_000, min_replay_steps=2_000, reward_scale=50.0,
    ),
    "atari": dict(
        torso_units=(), core_units=512, head_units=512, burn_in=40, unroll=80, period=40, n_step=5,
        gamma=0.997, batch_size=64, learning_rate=1e-4, adam_epsilon=1e-3, target_update_period=2500,
        replay_capacity=200_000, min_replay_steps=5_000, env_steps_per_update=16.0, num_envs=16,
        actor_update_period=25,
    ),
}  # fmt: skip
"""R2D2Config overrides by name (``--preset NAME``); :data:`PRESET_DOCS` says what each is for."""

PRESET_DOCS: dict[str, str] = {
    "masked-cartpole": "the defaults, tuned for masked CartPole.",
    "popgym": (
        "a starting point for POPGym's card and memory games (episodes of tens of steps, returns in "
        "[-1, 1]): burn-in 10, period 10 (ΔQ is measured at the first trained step), lr 3e-4, Adam ε "
        "1e-8 (the paper's 1e-3 outweighs gradients of returns this small and stalls learning), rewards ×50 "
        "(POPGym divides a game's per-step reward by its length, about 50: ×50 brings the targets back to "
        "about ±1, above the network's initial Q noise), 8 env steps per update (as sample-efficient as 4 on "
        "CountRecall, in half the time), 50k replay steps; per-task "
        "overrides in studies.popgym_tasks.TASKS."
    ),
    "atari": (
        "the paper's values (Kapturowski et al. 2019): conv torso, LSTM 512, heads 512, burn-in 40, "
        "unroll 80, period 40, n 5, γ 0.997, batch 64, lr 1e-4, target period 2500, weights every 400 "
        "env steps; scaled to one machine: 16 envs (paper: 256 actors), 200k replay steps (paper: 1M "
        "windows; a frame is 7 KB), 16 env steps per update."
    ),
}


def preset(name: str, **overrides: Any) -> R2D2Config:
    """The R2D2Config of preset ``name`` (see :data:`PRESETS`), with ``overrides`` on top."""
    check_choice("name", name, PRESETS)
    return R2D2Config(**{**PRESETS[name], **overrides})


@dataclasses.dataclass(frozen=True)
class WindowOffsets:
    """The window steps at which the learner uses stored states, computed once from a SequenceSpec (:meth:`of`).

    The replay stores a state before every window step that is a multiple of
    ``period`` (the burn-in starts of the windows of an episode)::

        window step:  0     period   2·period  ...   (< length)
        refresh:            x        x         ...   every stored state after step 0
        delta_q:      those >= burn_in (the first trained step on; 0 included when burn_in = 0)
        extra:        delta_q without step 0

    A feed-forward network uses no states: ``WindowOffsets()``, every field empty.
    """

    refresh: tuple[int, ...] = ()
    """Where a refresh writes the recomputed state back (``SequenceReplay.update_states``); it reads none."""
    delta_q: tuple[int, ...] = ()
    """Where ΔQ compares the recomputed state with the actor's stored one."""
    extra: tuple[int, ...] = ()
    """The stored states sampled beside the window's own (``SequenceReplay.sample(extra_state_offsets=...)``):
    the ΔQ references after step 0, in the order of ``batch.extra_states``."""

    def __post_init__(self) -> None:
        for name in ("refresh", "delta_q", "extra"):
            offsets = getattr(self, name)
            if not isinstance(offsets, tuple) or not all(type(o) is int and o >= 0 for o in offsets):
                raise ValueError(f"{name}: expected a tuple of ints >= 0, got {offsets!r}")
        if not set(self.extra) <= set(self.delta_q):
            raise ValueError(f"extra: expected a subset of delta_q {self.delta_q}, got {self.extra}")

    @classmethod
    def of(cls, spec: SequenceSpec) -> WindowOffsets:
        """The offsets of windows cut as ``spec`` says."""
        stored = range(0, spec.length, spec.period)
        delta_q = tuple(o for o in stored if o >= spec.burn_in)
        return cls(
            refresh=tuple(o for o in stored if o > 0),
            delta_q=delta_q,
            extra=tuple(o for o in delta_q if o > 0),
        )
