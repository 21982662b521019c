"""The one set of argument validators of burnin and its agents.

Every check names the argument, shows the value and says what was expected.
A value of the wrong type raises ``TypeError``; a value of the right type that
is out of range raises ``ValueError``. Internal to this repository (the agents
use it too); not part of burnin's public API.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_generator",
    "check_int",
    "check_int_tuple",
    "check_shape",
    "check_str",
    "fmt",
    "int_vector",
    "is_int",
]


def is_int(value: Any) -> bool:
    """An int or numpy integer, but not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int; TypeError if it is not one, ValueError if it is below ``minimum`` or above
    ``maximum``."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    low = minimum is not None and value < minimum
    if low or (maximum is not None and value > maximum):
        bounds = [f">= {minimum}"] * (minimum is not None) + [f"<= {maximum}"] * (maximum is not None)
        raise ValueError(f"{name}: expected an int {' and '.join(bounds)}, got {value}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    strict: bool = False,
    what: str = "number",
) -> float:
    """``value`` as a float; TypeError if it is not a real number, ValueError if not finite or out of bounds.

    The bounds are ``low <= value <= high`` (``low < value`` with ``strict``).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a {what}, got {type(value).__name__} {value!r}")
    above = low is None or (value > low if strict else value >= low)
    below = high is None or value <= high
    if not (math.isfinite(value) and above and below):
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if strict else '>='} {low}")
        if high is not None:
            bounds.append(f"<= {high}")
        bound = (" " + " and ".join(bounds)) if bounds else ""
        raise ValueError(f"{name}: expected a finite {what}{bound}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool; TypeError if it is not a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_generator(seed: Any, rng: Any) -> np.random.Generator:
    """The generator a component draws from: ``rng`` as given, else one seeded with ``seed`` (an int >= 0,
    or None for fresh entropy); both at once is an error."""
    if seed is not None and rng is not None:
        raise ValueError("seed, rng: expected at most one of them, got both")
    if rng is not None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
        return rng
    if seed is not None:
        check_int("seed", seed, minimum=0)
    return np.random.default_rng(seed)


def check_str(name: str, value: Any, *, empty: bool = True) -> str:
    """``value`` as a str; TypeError if it is not one, ValueError if it is empty and ``empty`` is False."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__} {value!r}")
    if not empty and not value:
        raise ValueError(f"{name}: expected a non-empty str, got ''")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    options = tuple(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise ValueError(f"{name}: expected one of {listed}, got {value!r}")
    return value


def check_int_tuple(name: str, value: Any, *, minimum: int = 1) -> tuple[int, ...]:
    """A tuple of ints >= ``minimum``; TypeError if ``value`` is no tuple, ValueError on a bad entry."""
    if not isinstance(value, tuple):
        raise TypeError(
            f"{name}: expected a tuple of ints >= {minimum}, got {type(value).__name__} {value!r}"
        )
    if not all(is_int(v) and v >= minimum for v in value):
        raise ValueError(f"{name}: expected a tuple of ints >= {minimum}, got {value!r}")
    return tuple(int(v) for v in value)


def check_shape(name: str, value: Any) -> tuple[int, ...]:
    """An array shape: a tuple (or list) of ints >= 1; ValueError otherwise."""
    if not isinstance(value, (tuple, list)) or not all(is_int(d) and d >= 1 for d in value):
        raise ValueError(f"{name}: expected a tuple of ints >= 1, got {value!r}")
    return tuple(int(d) for d in value)


def int_vector(name: str, value: Any, what: str) -> np.ndarray:
    """A 1-D integer array as int64; TypeError for a non-integer dtype, ValueError for another rank."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer {what}, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of {what}, got shape {arr.shape}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8 and arr.size:
        # uint64 values past the int64 range would turn negative: name them as they were given.
        big = arr[arr > np.iinfo(np.int64).max]
        if big.size:
            raise ValueError(f"{name}: expected {what} <= {np.iinfo(np.int64).max}, got {fmt(big)}")
    return arr.astype(np.int64, copy=False)


def fmt(values: Any, limit: int = 8) -> str:
    """The first ``limit`` values as a list, for error messages."""
    flat = np.asarray(values).reshape(-1)
    text = str(flat[:limit].tolist())
    return text if flat.size <= limit else f"{text[:-1]}, ... ({flat.size} in all)]"
