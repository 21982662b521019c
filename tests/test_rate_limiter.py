"""burnin.rate_limiter.RateLimiter: Reverb's samples-per-insert limiter as counters, without Ray (the replay
server's use of it under threads is in test_distributed.py)."""

from __future__ import annotations

import pytest

from burnin.rate_limiter import RateLimiter


def test_rate_limiter_follows_reverb_sample_to_insert_ratio():
    lim = RateLimiter(0.25, min_size_to_sample=100, error_buffer=5.0)
    assert (lim.min_diff, lim.max_diff) == (20.0, 30.0)  # offset 0.25 · 100 = 25, ± 5
    assert lim.can_insert(100) and not lim.can_sample()
    lim.insert(100)
    assert lim.can_insert(20) and not lim.can_insert(21)  # (100 + 20) · 0.25 − 0 = 30 = max_diff
    for _ in range(5):
        assert lim.can_sample()
        lim.sample()
    assert not lim.can_sample()  # 25 − 5 − 1 < 20: the learner waits for inserts
    lim.insert(4)
    assert lim.can_sample()
    assert lim.measured_samples_per_insert == pytest.approx(5 / 4)
    restored = RateLimiter(0.25, min_size_to_sample=100, error_buffer=5.0)
    restored.load_state_dict(lim.state_dict())
    assert (restored.inserts, restored.samples) == (104, 5)

    unlimited = RateLimiter(None, min_size_to_sample=10)
    assert unlimited.can_insert(10**9) and not unlimited.can_sample()
    unlimited.insert(10)
    assert unlimited.can_sample(10**9)


def test_rate_limiter_rejects_settings_that_can_block_both_sides():
    with pytest.raises(ValueError, match=r"^error_buffer: expected >= max\(1, samples_per_insert\)"):
        RateLimiter(0.25, min_size_to_sample=100, error_buffer=0.5)
    with pytest.raises(
        ValueError, match="^error_buffer: 5.0 updates is too small for inserts of 64 env steps"
    ):
        RateLimiter(0.25, min_size_to_sample=100, error_buffer=5.0).check_insert_size(64)
    with pytest.raises(ValueError, match="^samples_per_insert: expected a finite number > 0"):
        RateLimiter(0.0, min_size_to_sample=1)
    with pytest.raises(TypeError, match="^min_size_to_sample: expected an int"):
        RateLimiter(1.0, min_size_to_sample=1.5)


def test_sampling_waits_for_min_size_then_keeps_within_the_error_buffer():
    """After min_size_to_sample, samples stay within error_buffer of samples_per_insert · (inserts − min)."""
    lim = RateLimiter(2.0, min_size_to_sample=10, error_buffer=4.0)
    inserted = sampled = 0
    for _ in range(200):  # a learner that samples whenever it may, an actor that inserts whenever it may
        if lim.can_sample():
            lim.sample()
            sampled += 1
        elif lim.can_insert(1):
            lim.insert(1)
            inserted += 1
        else:
            raise AssertionError("both sides blocked")
        if inserted > 10:
            assert abs(sampled - 2.0 * (inserted - 10)) <= 4.0 + 2.0
    assert inserted > 10 and sampled > 0
    assert lim.measured_samples_per_insert == pytest.approx(2.0, abs=0.5)


def test_state_dict_restores_the_counters_not_the_limits():
    lim = RateLimiter(0.5, min_size_to_sample=4, error_buffer=2.0)
    lim.insert(10)
    lim.sample(2)
    other = RateLimiter(1.0, min_size_to_sample=0, error_buffer=3.0)
    other.load_state_dict(lim.state_dict())
    assert (other.inserts, other.samples) == (10, 2)
    assert (other.samples_per_insert, other.min_size_to_sample, other.error_buffer) == (1.0, 0, 3.0)
    assert lim.state_dict() == {
        "samples_per_insert": 0.5, "min_size_to_sample": 4, "error_buffer": 2.0, "inserts": 10, "samples": 2,
    }  # fmt: skip
