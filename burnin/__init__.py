"""burnin: R2D2-style recurrent replay with burn-in for TensorFlow / Keras 3."""

from burnin.losses import (
    double_q_bootstrap,
    n_step_returns,
    priority_mixture,
    r2d2_targets,
    rewards_and_continuations,
    td_errors,
    value_rescale,
    value_rescale_inverse,
)
from burnin.replay import ReplayConfig, SequenceBatch, SequenceReplay, SequenceSpec
from burnin.runner import BurnInRunner, RunnerOutput
from burnin.state import (
    RecurrentState,
    broadcast_row,
    get_states,
    guard_batch_size,
    reset_rows,
    reset_states,
    set_states,
    state_shapes,
    stateful_layers,
)

__version__ = "0.1.0"

__all__ = [
    "BurnInRunner",
    "RecurrentState",
    "ReplayConfig",
    "RunnerOutput",
    "SequenceBatch",
    "SequenceReplay",
    "SequenceSpec",
    "broadcast_row",
    "double_q_bootstrap",
    "get_states",
    "guard_batch_size",
    "n_step_returns",
    "priority_mixture",
    "r2d2_targets",
    "reset_rows",
    "reset_states",
    "rewards_and_continuations",
    "set_states",
    "state_shapes",
    "stateful_layers",
    "td_errors",
    "value_rescale",
    "value_rescale_inverse",
]
