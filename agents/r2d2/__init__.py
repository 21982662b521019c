"""R2D2 on burnin: config, Q-network, learner, actor, the single-process loop and its checkpoints.

Modules: ``config`` (R2D2Config, StateStrategy, presets, WindowOffsets), ``networks``,
``learner``, ``feed`` (the learner's batch), ``actor`` (and greedy evaluation), ``loop``
(TrainLoop, the Loop protocol), ``checkpoint``, ``learner_checkpoint`` (``learner.npz``).
"""

from agents.r2d2.actor import Actor, EnvError, ReplayWriter, apex_epsilons, evaluate
from agents.r2d2.config import (
    PRESET_DOCS,
    PRESETS,
    R2D2Config,
    StateStrategy,
    WindowOffsets,
    preset,
)
from agents.r2d2.learner import Learner, LearnerStep, PriorityWriter
from agents.r2d2.loop import Loop, LoopStats, TrainLoop, make_replay

__all__ = [
    "PRESETS",
    "PRESET_DOCS",
    "Actor",
    "EnvError",
    "Learner",
    "LearnerStep",
    "Loop",
    "LoopStats",
    "PriorityWriter",
    "R2D2Config",
    "ReplayWriter",
    "StateStrategy",
    "TrainLoop",
    "WindowOffsets",
    "apex_epsilons",
    "evaluate",
    "make_replay",
    "preset",
]
