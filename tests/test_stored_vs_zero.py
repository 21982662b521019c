"""studies.stored_vs_zero: rows from the runs' summaries, both ΔQ readings, the table and the CLI's refusals."""

from __future__ import annotations

import json

import pytest

from studies import stored_vs_zero as svz


def _summary(strategy: str, returns: list[float], dq: float, probe_dq: float) -> dict:
    evals = [
        {"env_steps": 1000 * (i + 1), "mean_return": r,
         "memory_probe": {"rows": 5, f"delta_q/{strategy}": [probe_dq] * 4, f"delta_q_spread/{strategy}": [0.1] * 4,
                          f"read_out/{strategy}": [0.5] * 4}}
        for i, r in enumerate(returns)
    ]  # fmt: skip
    learner = [{"delta_q_first": 100.0}, {"delta_q_first": dq}, {"delta_q_first": float("nan")}]
    return {
        "config": {"state_strategy": strategy}, "args": {"solve_return": 0.5, "total_env_steps": 1000 * len(returns)},
        "history": {"evals": evals, "episodes": [[500, 0.0]], "learner": learner},
    }  # fmt: skip


def test_rows_read_the_curve_and_both_delta_q_readings(tmp_path):
    for strategy, returns in (("stored", [0.0, 0.6, 0.4]), ("zero", [0.0, 0.1, 0.2])):
        run = tmp_path / strategy / "CountRecallEasy-s0"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(_summary(strategy, returns, dq=2.0, probe_dq=3.0)))
    assert svz.main(["--stored", str(tmp_path / "stored"), "--zero", str(tmp_path / "zero"),
                     "--tasks", "CountRecallEasy", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    out = json.loads((tmp_path / "out" / "stored_vs_zero.json").read_text())["tasks"]["CountRecallEasy"]
    stored, zero = out["stored"][0], out["zero"][0]
    assert (stored["mmer"], stored["steps_to"], zero["steps_to"]) == (0.6, 2000, None)
    assert stored["auc"] == pytest.approx((0.3 + 0.5) / 2)  # trapezoid over [1000, 3000]
    assert stored["delta_q_vs_stored"] == 2.0  # second half of the learner log, NaN skipped
    assert stored["delta_q_vs_true"] == 3.0 and stored["read_out"] == 0.5
    md = (tmp_path / "out" / "stored_vs_zero.md").read_text()
    assert (
        "| CountRecallEasy | stored | 3,000 | 1 | 0.60 ± 0.00 |" in md and "| CountRecallEasy | zero |" in md
    )


def test_a_run_of_the_other_start_is_refused(tmp_path, capsys):
    run = tmp_path / "stored" / "CountRecallEasy-s0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(_summary("zero", [0.0, 0.1], dq=1.0, probe_dq=1.0)))
    (tmp_path / "zero").mkdir()
    with pytest.raises(SystemExit) as exc:
        svz.main(
            [
                "--stored",
                str(tmp_path / "stored"),
                "--zero",
                str(tmp_path / "zero"),
                "--tasks",
                "CountRecallEasy",
            ]
        )
    assert exc.value.code == 2 and "trained with the zero start" in capsys.readouterr().err
