"""The same-network ΔQ probe: exact zeros where the start state is the actor's own, and its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_loop, small_config

from studies import delta_q_probe


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    # No update ever runs (min_replay_steps = capacity): the learner still has the actor's weights.
    config = small_config(min_replay_steps=2000)
    loop, losses = run_loop(config, 100)
    assert not losses
    path = tmp_path_factory.mktemp("probe") / "stored-s0" / "checkpoint"
    loop.save(path)
    return path


def test_unchanged_parameters_give_zero_delta_q_from_the_stored_state(untrained_checkpoint):
    result = delta_q_probe.probe(untrained_checkpoint, batches=2)
    assert result["stored"]["first"] == 0.0  # the probe starts from h(t₁) itself
    # Burned in from the stored h(0), or unrolled from h(t₁), with the actor's own parameters, the
    # learner recomputes the actor's states: ΔQ is zero to float32 rounding.
    for start, key in (("stored_burn_in", "first"), ("stored_burn_in", "last"), ("stored", "last")):
        assert result[start][key] < 1e-5, (start, key, result[start][key])
    # A zero start differs from the actor's state unless the window starts its episode.
    assert result["zero"]["first"] > 1e-3
    assert all(np.isfinite(v) and v >= 0 for r in result.values() for v in r.values())


def test_cli_writes_the_table(untrained_checkpoint, tmp_path):
    out = tmp_path / "probe"
    run_dir = untrained_checkpoint.parent.parent
    assert delta_q_probe.main(["--run-dir", str(run_dir), "--batches", "1", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["runs"]) == {"stored-s0"}
    assert set(report["table"]["stored"]) == set(delta_q_probe.START_STRATEGIES)
    assert "| stored (1 seeds) |" in out.with_suffix(".md").read_text()


def test_bad_batches_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        delta_q_probe.main(["--run-dir", str(tmp_path), "--batches", "0"])
