"""The replay server's ``server.json`` read back as untrusted input: every counter, owner and lane count checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agents.r2d2.checkpoint import CheckpointError, meta_field
from burnin._checks import check_float, check_int

__all__ = ["OWNER_COUNTERS", "check_server_meta"]

OWNER_COUNTERS = ("env_steps", "pushes", "busy", "registrations")


def check_server_meta(file: Path, meta: dict[str, Any], owners: list[str], num_lanes: int) -> dict[str, Any]:
    """The fields of ``server.json`` checked as untrusted input (counters ints >= 0, one entry per owner the
    replay registered, a step count per lane); CheckpointError naming the file and the field."""
    limiter = {
        name: meta_field(file, meta, f"limiter.{name}", check_int, minimum=0)
        for name in ("inserts", "samples")
    }
    episodes_total = meta_field(file, meta, "episodes_total", check_int, minimum=0)
    for name in ("incarnations", "owners"):
        found = meta.get(name)
        if not isinstance(found, dict) or sorted(found) != owners:
            raise CheckpointError(
                f"checkpoint {file}: {name}: expected an entry for each registered owner {owners}, got {found!r:.80}"
            )
    incarnations = {o: meta_field(file, meta, f"incarnations.{o}", check_int, minimum=0) for o in owners}
    stats = {}
    for o in owners:
        entry = {k: meta_field(file, meta, f"owners.{o}.{k}", check_int, minimum=0) for k in OWNER_COUNTERS}
        entry["insert_blocked_s"] = meta_field(
            file, meta, f"owners.{o}.insert_blocked_s", check_float, low=0.0
        )
        stats[o] = entry
    lane_steps = meta.get("lane_steps")
    if not isinstance(lane_steps, list) or len(lane_steps) != num_lanes:
        raise CheckpointError(
            f"checkpoint {file}: lane_steps: expected a list of {num_lanes} counts, got {lane_steps!r:.80}"
        )
    try:
        counts = [check_int(f"lane_steps[{i}]", v, minimum=0) for i, v in enumerate(lane_steps)]
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {file}: {err}") from None
    return {
        "limiter": limiter,
        "episodes_total": episodes_total,
        "incarnations": incarnations,
        "owners": stats,
        "lane_steps": np.asarray(counts, dtype=np.int64),
    }
