"""Several SequenceReplay shards sampled as one buffer: draws split by total priority, weights over the whole, keys naming their shard."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from burnin._checks import check_float, check_generator, check_int
from burnin.replay import SequenceBatch, SequenceReplay
from burnin.replay.spec import check_keys

__all__ = ["ShardedReplay", "allocate_draws", "merge_draws", "shard_keys", "split_keys"]


def allocate_draws(totals: Any, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """How many of ``batch_size`` draws each shard makes: multinomial with shard ``s`` at ``totals[s] / sum``.

    ``batch_size`` independent draws from one buffer pick shard ``s`` with that
    probability each, so their counts per shard are this multinomial; drawing
    each shard's count from the shard (∝ priority inside it) then gives every
    window probability ``leaf / sum(totals)``, as the single buffer does.
    ValueError when no shard has priority mass.
    """
    check_int("batch_size", batch_size, minimum=1)
    mass = np.asarray(totals, dtype=np.float64)
    if mass.ndim != 1 or mass.size == 0:
        raise ValueError(f"totals: expected one total priority per shard, got shape {mass.shape}")
    if not np.isfinite(mass).all() or (mass < 0).any():
        raise ValueError(f"totals: expected finite values >= 0, got {mass.tolist()}")
    whole = mass.sum()
    if not whole > 0:
        raise ValueError("totals: no shard has a sampleable window with priority > 0")
    return rng.multinomial(batch_size, mass / whole).astype(np.int64)


def shard_keys(keys: Any, shard: int, num_shards: int) -> np.ndarray:
    """Keys of shard ``shard`` as keys of the whole: ``key · num_shards + shard`` (unchanged for one shard)."""
    check_int("num_shards", num_shards, minimum=1)
    check_int("shard", shard, minimum=0, maximum=num_shards - 1)
    return check_keys("keys", keys) * num_shards + shard


def split_keys(keys: Any, num_shards: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per shard, (rows of ``keys`` that belong to it, their keys in the shard): :func:`shard_keys` undone."""
    check_int("num_shards", num_shards, minimum=1)
    whole = check_keys("keys", keys)
    owner = whole % num_shards
    return [
        (rows, whole[rows] // num_shards) for rows in (np.flatnonzero(owner == s) for s in range(num_shards))
    ]


def _concat(parts: list[Any]) -> Any:
    """Concatenate along axis 0 arrays that sit at the same place of nested tuples."""
    if isinstance(parts[0], tuple):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(parts[0])))
    return np.concatenate(parts, axis=0)


def _take(tree: Any, rows: np.ndarray) -> Any:
    if isinstance(tree, tuple):
        return tuple(_take(t, rows) for t in tree)
    return np.asarray(tree)[rows]


def merge_draws(
    parts: Sequence[SequenceBatch | None],
    totals: Any,
    *,
    beta: float,
    rng: np.random.Generator | None = None,
) -> SequenceBatch:
    """One batch of the whole from each shard's draws (None for a shard that drew nothing).

    Each part's ``probabilities`` (within its shard) become probabilities in the
    whole, ``p · totals[s] / sum(totals)``, with ``totals`` the shard totals the
    draws were allocated by; the importance weights are recomputed over the merged
    batch as :meth:`SequenceReplay.sample` computes them, ``(P / min P) ** -beta``;
    keys become :func:`shard_keys`. With ``rng`` the rows are shuffled, so the
    batch is exchangeable like ``B`` independent draws (rather than grouped by shard).
    """
    check_float("beta", beta, low=0.0)
    mass = np.asarray(totals, dtype=np.float64)
    if len(parts) != mass.size:
        raise ValueError(f"parts: expected one entry per shard ({mass.size}), got {len(parts)}")
    drawn = [(s, p) for s, p in enumerate(parts) if p is not None and len(p.keys)]
    if not drawn:
        raise ValueError("parts: no shard drew a window")
    num_shards = mass.size
    keys = np.concatenate([shard_keys(p.keys, s, num_shards) for s, p in drawn])
    prob = np.concatenate(
        [np.asarray(p.probabilities, np.float64) * (mass[s] / mass.sum()) for s, p in drawn]
    )
    order = np.arange(keys.size) if rng is None else rng.permutation(keys.size)
    fields = {"keys": keys[order], "probabilities": prob[order]}
    for name in SequenceBatch._fields:
        if name not in fields and name != "weights":
            fields[name] = _take(_concat([getattr(p, name) for _, p in drawn]), order)
    # The buffer's own convention, kept: without separate actor states both names hold one set of arrays.
    if all(p.actor_state is p.state for _, p in drawn):
        fields["actor_state"] = fields["state"]
    if all(p.extra_actor_states is p.extra_states for _, p in drawn):
        fields["extra_actor_states"] = fields["extra_states"]
    with np.errstate(over="ignore"):
        fields["weights"] = ((fields["probabilities"] / prob.min()) ** -float(beta)).astype(np.float32)
    return SequenceBatch(**fields)


def split_rows(tree: Any, rows: np.ndarray) -> Any:
    """The rows ``rows`` of every array of a (nested tuple of) ``[B, ...]`` arrays, e.g. a RecurrentState."""
    return _take(tree, rows)


class ShardedReplay:
    """``S`` :class:`SequenceReplay` shards in one process, sampled as one buffer of all their windows.

    Writers add to the shard that holds their lanes (``shards[s].add``). A
    :meth:`sample` draws each window with probability ``leaf / sum of every
    shard's leaves``, exactly as one buffer holding every window would
    (:func:`allocate_draws`, :func:`merge_draws`); its keys name their shard,
    so :meth:`update_priorities` and :meth:`update_states` route each row to it.
    The shards must share the window layout and the priority exponents; each keeps
    its own checkpoint (``shards[s].save``). The Ray replay server uses the same
    functions across processes (``agents.distributed``).
    """

    def __init__(
        self,
        shards: Sequence[SequenceReplay],
        *,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        shards = list(shards)
        if not shards or not all(isinstance(s, SequenceReplay) for s in shards):
            raise TypeError("shards: expected a non-empty sequence of SequenceReplay")
        first = shards[0].config
        for i, shard in enumerate(shards[1:], start=1):
            cfg = shard.config
            if (cfg.spec, cfg.alpha, cfg.beta) != (first.spec, first.alpha, first.beta):
                raise ValueError(
                    f"shards[{i}]: its spec, alpha or beta differ from shards[0]'s; sampled as one buffer, "
                    "every shard needs the same"
                )
        self.shards = shards
        self._rng = check_generator(seed, rng)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_sampleable(self) -> int:
        return sum(s.num_sampleable for s in self.shards)

    def totals(self) -> np.ndarray:
        """Each shard's total priority (sum of priority ** alpha over its sampleable windows)."""
        return np.asarray([s.stats()["total_priority"] for s in self.shards], dtype=np.float64)

    def sample(self, batch_size: int, *, extra_state_offsets: Sequence[int] = ()) -> SequenceBatch:
        """``batch_size`` windows of the whole, as :meth:`SequenceReplay.sample` draws them from one buffer."""
        totals = self.totals()
        if self.num_sampleable == 0:
            raise ValueError("sample: no window is sampleable yet (add more steps, or end an episode)")
        counts = allocate_draws(totals, batch_size, self._rng)
        parts = [
            shard.sample(int(n), extra_state_offsets=extra_state_offsets) if n else None
            for shard, n in zip(self.shards, counts)
        ]
        return merge_draws(parts, totals, beta=self.shards[0].config.beta, rng=self._rng)

    def update_priorities(self, keys: Any, priorities: Any) -> None:
        """:meth:`SequenceReplay.update_priorities` of each row in its shard."""
        pr = np.asarray(priorities)
        if pr.shape != np.shape(keys):
            raise ValueError(f"priorities: expected shape {np.shape(keys)} (like keys), got {pr.shape}")
        for shard, (rows, local) in zip(self.shards, split_keys(keys, self.num_shards)):
            if rows.size:
                shard.update_priorities(local, pr[rows])

    def update_states(self, keys: Any, offsets: Sequence[int], states: Sequence[Any]) -> int:
        """:meth:`SequenceReplay.update_states` of each row in its shard; the stored states written in all."""
        written = 0
        for shard, (rows, local) in zip(self.shards, split_keys(keys, self.num_shards)):
            if rows.size:
                written += shard.update_states(local, offsets, [split_rows(s, rows) for s in states])
        return written
