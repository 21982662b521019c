"""Reverb-style samples-per-insert rate limiter: pure counters, no threads and no Ray."""

from __future__ import annotations

from typing import Any

from burnin._checks import check_float, check_int

__all__ = ["RateLimiter"]


class RateLimiter:
    """Reverb's ``SampleToInsertRatio`` rate limiter (``MinSize`` when ``samples_per_insert`` is None), as counters.

    ``inserts`` counts env steps, ``samples`` learner batches. With ``offset =
    samples_per_insert · min_size_to_sample`` and ``error = inserts ·
    samples_per_insert − samples``:

    - sampling ``n`` batches is allowed once ``inserts >= min_size_to_sample`` and
      while ``error − n >= offset − error_buffer``;
    - inserting ``n`` env steps is allowed while ``inserts + n <= min_size_to_sample``
      or ``error + n · samples_per_insert <= offset + error_buffer``.

    So after ``min_size_to_sample`` steps, ``samples`` stays within ``error_buffer``
    of ``samples_per_insert · (inserts − min_size_to_sample)``: whichever side runs
    ahead is the one that waits. The caller does the waiting (e.g. a replay server on a
    condition variable).
    """

    def __init__(
        self, samples_per_insert: float | None, *, min_size_to_sample: int, error_buffer: float = 1.0
    ) -> None:
        if samples_per_insert is not None:
            check_float("samples_per_insert", samples_per_insert, low=0.0, strict=True)
        check_int("min_size_to_sample", min_size_to_sample, minimum=0)
        check_float("error_buffer", error_buffer, low=0.0, strict=True)
        if samples_per_insert is not None and error_buffer < max(1.0, samples_per_insert):
            raise ValueError(
                f"error_buffer: expected >= max(1, samples_per_insert) = {max(1.0, samples_per_insert)} "
                f"(a smaller one can block both sides), got {error_buffer}"
            )
        self.samples_per_insert = None if samples_per_insert is None else float(samples_per_insert)
        self.min_size_to_sample = int(min_size_to_sample)
        self.error_buffer = float(error_buffer)
        offset = (self.samples_per_insert or 0.0) * self.min_size_to_sample
        self.min_diff = offset - self.error_buffer
        self.max_diff = offset + self.error_buffer
        self.inserts = 0
        self.samples = 0

    def check_insert_size(self, n: int) -> None:
        """Raise ValueError if one insert of ``n`` env steps could leave both sides blocked."""
        spi = self.samples_per_insert
        # Learner blocked means error < min_diff + 1; the insert must still fit under max_diff.
        if spi is not None and n * spi + 1.0 > 2.0 * self.error_buffer:
            raise ValueError(
                f"error_buffer: {self.error_buffer} updates is too small for inserts of {n} env steps "
                f"({n * spi:g} updates' worth); expected >= {(n * spi + 1.0) / 2:g}, or push fewer steps"
            )

    def can_insert(self, n: int) -> bool:
        if self.samples_per_insert is None or self.inserts + n <= self.min_size_to_sample:
            return True
        return (self.inserts + n) * self.samples_per_insert - self.samples <= self.max_diff

    def can_sample(self, n: int = 1) -> bool:
        if self.inserts < self.min_size_to_sample:
            return False
        if self.samples_per_insert is None:
            return True
        return self.inserts * self.samples_per_insert - self.samples - n >= self.min_diff

    def insert(self, n: int) -> None:
        self.inserts += int(n)

    def sample(self, n: int = 1) -> None:
        self.samples += int(n)

    @property
    def measured_samples_per_insert(self) -> float:
        """Samples per env step inserted after ``min_size_to_sample`` (NaN before)."""
        after = self.inserts - self.min_size_to_sample
        return self.samples / after if after > 0 else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {
            "samples_per_insert": self.samples_per_insert,
            "min_size_to_sample": self.min_size_to_sample,
            "error_buffer": self.error_buffer,
            "inserts": self.inserts,
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters; the limits stay those of this limiter (they come from the config)."""
        self.inserts = int(state["inserts"])
        self.samples = int(state["samples"])
