"""Updates per second of a callable: untimed warm-up calls, then timed rounds with nothing between them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def rates(update: Callable[[], Any], *, rounds: int, updates: int, warmup: int) -> list[float]:
    """Calls per second of ``update`` in each of ``rounds`` rounds of ``updates`` calls, after ``warmup``."""
    for _ in range(warmup):
        update()
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(updates):
            update()
        out.append(updates / (time.perf_counter() - start))
    return out


def paired(numerator: list[float], denominator: list[float]) -> dict[str, Any]:
    """Two alternating runs' samples: both medians, their ratio, and each pair's ratio."""
    n, d = statistics.median(numerator), statistics.median(denominator)
    return {
        "numerator": n,
        "denominator": d,
        "ratio": n / d,
        "pair_ratios": [a / b for a, b in zip(numerator, denominator)],
    }


def describe(p: dict[str, Any]) -> str:
    """:func:`paired`'s ratios as one line: ``ratio  1.05  (pair ratios 1.00, 1.14, …)``."""
    return f"ratio {p['ratio']:5.2f}  (pair ratios {', '.join(f'{r:.2f}' for r in p['pair_ratios'])})"
