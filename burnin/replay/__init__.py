"""SequenceReplay: R2D2 windows read by index from steps stored once per lane (specification: docs/replay.md).

Modules: ``spec`` (SequenceSpec, ReplayConfig, SequenceBatch, argument checks),
``arrays`` (the arrays a buffer holds), ``kernels`` (numba bookkeeping), ``gather``
(windows read out), ``state_rows`` (stored states as rows), ``buffer`` (SequenceReplay), ``lanes`` (the
writer registry), ``checkpoint`` (the file format), ``invariants`` (the production
checks of a valid buffer), ``listing`` (live keys, fingerprint).
"""

from burnin.replay.buffer import SequenceReplay
from burnin.replay.checkpoint import FORMAT_VERSION
from burnin.replay.spec import RecurrentState, ReplayConfig, SequenceBatch, SequenceSpec

__all__ = [
    "FORMAT_VERSION",
    "RecurrentState",
    "ReplayConfig",
    "SequenceBatch",
    "SequenceReplay",
    "SequenceSpec",
]
