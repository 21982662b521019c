"""The POPGym tasks the memory suite runs: budgets, evaluation intervals, overrides with their reasons, and the best published figures they are held against."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "DEFAULT_TASKS",
    "PRESET",
    "QUICK_CONFIG",
    "QUICK_TASKS",
    "SOLVED",
    "TARGET_TASKS",
    "TASKS",
    "Published",
    "Task",
    "task_order",
]

PRESET = "popgym"
"""The R2D2Config preset every task starts from (:data:`agents.r2d2.config.PRESETS`)."""
SOLVED = 0.9
"""The return that counts as solved where a task has no published target (POPGym scales every task's return
into [-1, 1])."""

POPGYM_TABLE = (
    "POPGym (Morad et al., ICLR 2023), appendix table: MMER (the best mean return over training episodes), "
    "mean of 3 trials at 15M env steps"
)


@dataclasses.dataclass(frozen=True)
class Published:
    """The best published figure for a task, and where it comes from."""

    score: float
    method: str
    budget: str
    """Env steps of the published run, as printed (``"15M"``)."""
    source: str = POPGYM_TABLE


@dataclasses.dataclass(frozen=True)
class Task:
    """One row of the suite: a POPGym env (by its class name), its env-step budget, the env steps between
    greedy evaluations, R2D2Config overrides on top of the preset, and the published figure it must reach
    (None: the task counts as solved at :data:`SOLVED`)."""

    name: str
    env_steps: int
    eval_every: int
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    target: Published | None = None

    @property
    def env_id(self) -> str:
        return f"popgym-{self.name}-v0"

    @property
    def threshold(self) -> float:
        """The greedy return a run must reach: the published figure, else :data:`SOLVED`."""
        return SOLVED if self.target is None else self.target.score


BLIND = {"gamma": 0.0}
"""The one override: γ = 0 on the tasks whose actions never change what the agent sees next (the card games
that deal regardless of the answer; only the immediate reward depends on the action), so the return of any
later step is noise to the action's value. The memoroids paper (Morad et al., NeurIPS 2024) likewise sets γ
per task. Measured in docs/studies/long_memory.md."""

# fmt: off
TASKS: dict[str, Task] = {t.name: t for t in (
    #    POPGym class                     env steps  eval every  overrides  published target
    Task("RepeatFirstEasy",                 200_000,      8_000,  BLIND),
    Task("RepeatPreviousEasy",              200_000,      8_000,  BLIND),
    Task("PositionOnlyCartPoleEasy",        200_000,      8_000,  {}),
    Task("CountRecallEasy",               1_000_000,     20_000,  BLIND, Published(0.51, "PPO-LSTM", "15M")),
    Task("AutoencodeEasy",                1_000_000,     20_000,  BLIND, Published(-0.28, "PPO-GRU", "15M")),
    Task("NoisyPositionOnlyCartPoleEasy", 1_000_000,     20_000,  {},    Published(0.99, "PPO-GRU (0.995)", "15M")),
    Task("MultiarmedBanditEasy",            200_000,     10_000,  {}),
    Task("HigherLowerEasy",               1_000_000,     20_000,  BLIND, Published(0.53, "PPO-GRU", "15M")),
    Task("MineSweeperEasy",                 200_000,     10_000,  {}),
    Task("BattleshipEasy",                  200_000,     10_000,  {}),
    Task("ConcentrationEasy",               200_000,     10_000,  {}),
    Task("RepeatPreviousMedium",          1_000_000,     20_000,  BLIND, Published(0.79, "PPO-LMU", "15M")),
    Task("RepeatFirstMedium",               400_000,     20_000,  BLIND),  # 415-step episodes
)}
# fmt: on
"""The suite. Budgets: 1M env steps for the long-memory targets (a fifteenth of the published 15M), 200k
for the other Easy tasks, 400k for RepeatFirstMedium; 20 to 50 evaluations each."""

TARGET_TASKS = tuple(name for name, task in TASKS.items() if task.target is not None)
"""``--tasks targets``: the tasks held against a published figure."""

DEFAULT_TASKS = ("RepeatFirstEasy", "RepeatPreviousEasy", "PositionOnlyCartPoleEasy")
"""The default run: the three solve targets × 3 seeds at 200k env steps each. One run of the popgym
preset with one TensorFlow thread measured about 33 learner updates/s (136 env steps/s) on this 2-core
machine with two runs side by side, so a whole budget takes about 25 min and the nine runs on 2 workers
about 2 h; with ``--stop-when-solved`` (each run ends at its first evaluation at its threshold) the nine
took 20 min. ``--tasks all`` runs every task; ``--tasks targets`` the published targets; ``--tasks NAME …``
some; ``--env-steps N`` sets every selected task's budget."""

QUICK_TASKS = ("RepeatFirstEasy", "RepeatPreviousEasy")
QUICK_CONFIG = dict(
    torso_units=(16,), core_units=16, head_units=16, batch_size=8, num_envs=4, replay_capacity=2000,
    min_replay_steps=300, env_steps_per_update=8.0,
)  # fmt: skip
"""``--quick`` (CI, about 20 s): these two tasks, seed 0, 1000 env steps, a tiny network, 2 evaluations
of 8 episodes, 20 random episodes, outputs in a temp dir."""


def task_order(name: str) -> int:
    """A task's place in :data:`TASKS` (unknown names last): the order of every table and plot."""
    return list(TASKS).index(name) if name in TASKS else len(TASKS)
