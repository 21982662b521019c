"""studies.repeated_moves: hand-counted repeat rates, and the CLI on a --quick suite run."""

from __future__ import annotations

import numpy as np
import pytest

from studies import repeated_moves as rm

pytest.importorskip("popgym")


@pytest.mark.parametrize(
    ("actions", "dones", "earlier", "previous"),
    [
        (
            [[0], [1], [0], [0]],
            [0, 0, 0, 0],
            2 / 4,
            1 / 4,
        ),  # step 3 made before; step 4 made before and = step 3
        ([[0], [0], [0]], [0, 1, 0], 1 / 3, 1 / 3),  # an episode ends after step 2: step 3 starts afresh
        ([[1, 0], [2, 1], [1, 1]], [[0, 0]] * 3, 2 / 6, 1 / 6),  # 2 envs: 1 2 1 (earlier) and 0 1 1 (both)
        ([[[0, 1]], [[0, 2]], [[0, 1]]], [[0]] * 3, 1 / 3, 0.0),  # MultiDiscrete moves compare whole
    ],
)
def test_repeat_rates_count_by_hand(actions, dones, earlier, previous):
    rates = rm.repeat_rates(
        [np.array(a) for a in actions], [np.array(d, dtype=bool).reshape(-1) for d in dones]
    )
    assert rates["earlier"] == pytest.approx(earlier) and rates["previous"] == pytest.approx(previous)
    assert rates["steps"] == sum(len(a) for a in actions)


def test_cli_on_a_quick_suite_run(tmp_path, capsys):
    from studies import memory_suite as suite

    assert suite.main(["--quick", "--tasks", "RepeatFirstEasy", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert rm.main([str(tmp_path / "runs" / "RepeatFirstEasy-s0"), "--episodes", "4"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| Repeat")]
    assert [r[1] for r in rows] == ["greedy", "random"]
    assert (
        rows[0][5].rstrip(" |") == rows[1][5].rstrip(" |") == "204"
    )  # 4 episodes of 51 steps, and as many random steps
    assert all(0.0 <= float(r[i]) <= 1.0 for r in rows for i in (3, 4))


def test_a_directory_without_a_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        rm.main([str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and err.startswith(f"{rm.PROG}: error: ")
        and "no checkpoint/loop.json" in err
    )
