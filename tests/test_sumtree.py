"""Tests of the k-ary sum-tree against a brute-force prefix sum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burnin.sumtree import SumTree


def brute_find(leaves: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index of the first leaf whose inclusive prefix sum exceeds u."""
    return np.searchsorted(np.cumsum(leaves), u, side="right")


@pytest.mark.parametrize(
    ("capacity", "fanout"),
    [(1, 2), (2, 2), (7, 2), (63, 64), (64, 64), (65, 64), (1000, 3), (5000, 64), (4097, 16)],
)
def test_matches_brute_force_on_integer_values(capacity: int, fanout: int) -> None:
    # Integer-valued leaves make every sum exact, so the descent must agree with
    # a plain prefix sum bit for bit, including at the interval boundaries.
    rng = np.random.default_rng(capacity * 31 + fanout)
    tree = SumTree(capacity, fanout=fanout)
    leaves = np.zeros(capacity)
    for _ in range(5):
        idx = rng.integers(0, capacity, size=max(1, capacity // 3))
        vals = rng.integers(0, 5, size=idx.size).astype(np.float64)
        tree.update(idx, vals)
        for i, v in zip(idx, vals):
            leaves[i] = v  # in order: the last write wins
        np.testing.assert_array_equal(tree.values(), leaves)
        assert tree.total() == leaves.sum()
        if leaves.sum() == 0:
            continue
        boundaries = np.cumsum(leaves)[:-1]
        u = np.concatenate([rng.random(200) * leaves.sum(), [0.0], boundaries[boundaries < leaves.sum()]])
        found = tree.find(u)
        np.testing.assert_array_equal(found, brute_find(leaves, u))
        assert (leaves[found] > 0).all()


def test_random_float_values_land_in_their_interval() -> None:
    rng = np.random.default_rng(7)
    tree = SumTree(3000)
    leaves = rng.random(3000) * (rng.random(3000) < 0.5)
    tree.update(np.arange(3000), leaves)
    assert tree.total() == pytest.approx(leaves.sum(), rel=1e-12)
    u = rng.random(5000) * tree.total()
    found = tree.find(u)
    csum = np.cumsum(leaves)
    lo = np.where(found > 0, csum[found - 1], 0.0)
    tol = 1e-9 * csum[-1]
    assert (leaves[found] > 0).all()
    assert ((lo - tol <= u) & (u < csum[found] + tol)).all()


def test_target_at_the_total_falls_back_to_the_last_positive_leaf() -> None:
    tree = SumTree(100, fanout=4)
    tree.update([3, 50, 97], [1.0, 2.0, 3.0])
    # u == total cannot come from rng.random() * total in exact arithmetic, but rounding can
    # produce it; the kernel must still return a positive leaf.
    out = np.empty(1, dtype=np.int64)
    from burnin.sumtree import tree_find

    tree_find(tree.nodes, tree.offsets, tree.fanout, np.array([tree.total()]), out)
    assert out[0] == 97


def test_repeated_indices_keep_the_last_value() -> None:
    tree = SumTree(10)
    tree.update([2, 2, 2], [1.0, 5.0, 3.0])
    assert tree.values([2])[0] == 3.0
    assert tree.total() == 3.0


def test_zero_leaves_are_never_found() -> None:
    tree = SumTree(256, fanout=4)
    tree.update(np.arange(256), np.ones(256))
    tree.update(np.arange(0, 256, 2), np.zeros(128))
    found = tree.find(np.linspace(0, tree.total(), 1000, endpoint=False))
    assert (found % 2 == 1).all()


def test_state_round_trip_and_corruption() -> None:
    tree = SumTree(500, fanout=8)
    tree.update(np.arange(0, 500, 3), np.arange(0, 500, 3) * 0.5)
    other = SumTree(500, fanout=8)
    other.set_state(tree.state())
    np.testing.assert_array_equal(other.state(), tree.state())
    bad = tree.state()
    bad[-1] += 1.0  # a top-level sum that no longer matches its children
    with pytest.raises(ValueError, match="do not match"):
        other.set_state(bad)
    with pytest.raises(ValueError, match="expected float64"):
        other.set_state(tree.state()[:-1])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: t.update([10], [1.0]), ValueError, r"indices: expected values in \[0, 10\)"),
        (lambda t: t.update([-1], [1.0]), ValueError, "indices"),
        (lambda t: t.update([1.5], [1.0]), TypeError, "indices: expected integers"),
        (lambda t: t.update([1], [-1.0]), ValueError, "values: expected finite values >= 0"),
        (lambda t: t.update([1], [np.nan]), ValueError, "values: expected finite"),
        (lambda t: t.update([1, 2], [1.0]), ValueError, "values: expected shape"),
        (lambda t: t.update([1], ["a"]), TypeError, "values: expected real numbers"),
        (lambda t: t.find([0.5]), ValueError, "the tree is empty"),
    ],
)
def test_bad_input(call, error: type[Exception], match: str) -> None:
    tree = SumTree(10)
    with pytest.raises(error, match=match):
        call(tree)
    assert tree.total() == 0.0


def test_find_rejects_targets_outside_the_total() -> None:
    tree = SumTree(10)
    tree.update([1], [2.0])
    for u in (-0.1, 2.0, np.inf, np.nan):
        with pytest.raises(ValueError, match=r"targets: expected values in \[0, 2.0\)"):
            tree.find([u])


@pytest.mark.parametrize(("capacity", "fanout"), [(0, 4), (4, 1)])
def test_bad_construction(capacity: int, fanout: int) -> None:
    with pytest.raises(ValueError, match="expected an int >="):
        SumTree(capacity, fanout=fanout)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 300),
    fanout=st.integers(2, 9),
    ops=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 9)), min_size=1, max_size=80),
)
def test_property_against_brute_force(capacity: int, fanout: int, ops: list[tuple[int, int]]) -> None:
    tree = SumTree(capacity, fanout=fanout)
    leaves = np.zeros(capacity)
    for raw_index, value in ops:
        i = raw_index % capacity
        tree.update([i], [float(value)])
        leaves[i] = value
    assert tree.total() == leaves.sum()
    if leaves.sum():
        u = np.arange(int(leaves.sum())) + 0.5
        np.testing.assert_array_equal(tree.find(u), brute_find(leaves, u))
