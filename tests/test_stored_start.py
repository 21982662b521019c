"""The stored-start study on RepeatFirstEasy: the stored path reproduces the actor exactly; the quick run writes its outputs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("popgym")

from studies import stored_start


def test_stored_burn_in_reproduces_the_actor_on_repeat_first_episodes():
    """θ unchanged: restoring the stored state and burning in gives the actor's Q-values on the windows whose
    burn-in starts mid-episode, as does replaying the episode from its start; the zero start does not."""
    result = stored_start.check(0, actor_steps=200, quick=True)
    assert result["compared_rows"] >= 8
    assert result["max_rel_err/stored_burn_in"] <= 1e-5
    assert result["max_rel_err/true"] <= 1e-5
    assert result["max_rel_err/zero_burn_in"] > 1e-2
    assert result["dq_mean/stored_burn_in"] <= 1e-5 < result["dq_mean/zero_burn_in"]


def test_quick_study_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "stored_start"
    argv = ["--quick", "--variants", "stored", "zero", "--seeds", "0", "--env-steps", "1200",
            "--eval-every", "600", "--run-dir", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    assert stored_start.main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["table"]) == {"stored", "zero"}
    for run in data["runs"]:
        assert len(run["history"]) == 2 and run["mmer"] == max(h["return"] for h in run["history"])
        assert -1.0 <= run["final"] <= 1.0
    assert "| stored | 1 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bad_flag_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        stored_start.main(["--env-steps", "0"])
    assert exc.value.code == 2
    assert "--env-steps: expected an int >= 1, got 0" in capsys.readouterr().err
