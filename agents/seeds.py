"""Every seed of a run, derived in one place from the run's one seed with numpy's ``SeedSequence``.

Each purpose is a child of ``SeedSequence(seed)`` (the one ``spawn`` would hand
out at that position), and so are its sub-purposes: the seeds are independent
streams rather than neighbouring integers, and the same run seed always gives
the same seeds.
"""

from __future__ import annotations

import enum

import numpy as np

from burnin._checks import check_int

__all__ = ["Purpose", "RunSeeds", "derive_seed"]


class Purpose(enum.IntEnum):
    """What a derived seed is for: the first entry of its spawn key."""

    WEIGHTS = 0
    """Network initialisation (every copy of the Q-network, so their weights agree)."""
    REPLAY = 1
    """The replay's sampling RNG."""
    ACTOR = 2
    """The actor's ε-greedy RNG and its first env reset."""
    ENV_RESET = 3
    """The env reset when acting resumes after a checkpoint load (one per resume)."""
    EVALUATION = 4
    """Greedy evaluations (one per evaluation) and the evaluation env."""
    WORKER = 5
    """A distributed actor worker (one per worker and incarnation)."""
    PROBE = 6
    """Windows drawn for a diagnostic probe (not the replay's sampler: the training stays the same)."""


def derive_seed(seed: int, purpose: Purpose, *path: int) -> int:
    """The seed for ``purpose`` (and sub-purpose ``path``) of a run seeded with ``seed``: an int in [0, 2**31)."""
    check_int("seed", seed, minimum=0)
    key = (int(purpose), *(check_int("path", p, minimum=0) for p in path))
    state = np.random.SeedSequence(int(seed), spawn_key=key).generate_state(1, dtype=np.uint32)
    return int(state[0] >> 1)  # 31 bits: valid for numpy, gymnasium, TensorFlow and Keras alike


class RunSeeds:
    """The named seeds of one run (see :class:`Purpose`)."""

    def __init__(self, seed: int) -> None:
        self.seed = check_int("seed", seed, minimum=0)

    @property
    def weights(self) -> int:
        return derive_seed(self.seed, Purpose.WEIGHTS)

    @property
    def replay(self) -> int:
        return derive_seed(self.seed, Purpose.REPLAY)

    @property
    def actor(self) -> int:
        return derive_seed(self.seed, Purpose.ACTOR)

    def env_reset(self, resume: int) -> int:
        """The env reset seed after the ``resume``-th checkpoint load."""
        return derive_seed(self.seed, Purpose.ENV_RESET, resume)

    def evaluation(self, index: int) -> int:
        """The seed of the ``index``-th greedy evaluation."""
        return derive_seed(self.seed, Purpose.EVALUATION, index)

    @property
    def probe(self) -> int:
        """The seed of the windows a diagnostic probe draws (e.g. :class:`studies.episode_probe.SecondReadingHook`)."""
        return derive_seed(self.seed, Purpose.PROBE)

    @property
    def evaluation_env(self) -> int:
        """The seed the evaluation env and actor are built with."""
        return derive_seed(self.seed, Purpose.EVALUATION)

    def worker(self, index: int, incarnation: int) -> int:
        """The seed of distributed actor worker ``index`` in its ``incarnation`` (0 first, +1 per restart)."""
        return derive_seed(self.seed, Purpose.WORKER, index, incarnation)
