"""Replaying a table of real learning curves through every policy (`geopose-ray simulate --curves`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from geopose_ray.errors import DataError
from geopose_ray.simulate.recorded import default_rungs, read_curves, replay_table, write_curves


def _table(tmp_path: Path, n: int = 12, top: int = 9) -> Path:
    """n trials over `top` epochs: trial i plateaus at 0.5 + 0.03 i but rises slowly for odd i (late bloomers);
    trial 0 diverges after epoch 3. Each epoch costs 0.1 h, trial 5's 0.3 h."""
    lines = ["trial,epoch,score,hours,param.encoder"]
    for i in range(n):
        for e in range(1, top + 1):
            if i == 0 and e > 3:
                break
            rise = 2.0 if i % 2 else 0.5
            score = 0.5 + 0.03 * i - rise / (e + 1)
            lines.append(f"t{i},{e},{score},{0.3 if i == 5 else 0.1},enc{i % 3}")
    path = tmp_path / "curves.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_curves_table_reads_as_the_simulators_curves(tmp_path: Path) -> None:
    curves = read_curves(_table(tmp_path))
    assert len(curves) == 12 and curves.top == 9
    assert curves.fail_epoch[0] == 4 and np.isnan(curves.true_final[0])  # diverged: fails after its last row
    assert np.all(np.isnan(curves.observed[0, 3:])) and not np.isnan(curves.observed[0, 2])
    assert curves.true_final[11] == pytest.approx(0.5 + 0.33 - 2.0 / 10)
    assert curves.minutes[5] == pytest.approx(18.0) and curves.minutes[1] == pytest.approx(6.0)
    assert curves.params is not None and curves.params[4] == {"encoder": "enc1"}
    low = read_curves(_table(tmp_path), mode="min")  # lower is better: scores negated
    assert low.true_final[11] == pytest.approx(-curves.true_final[11])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trial,epoch,score\nt,1,0.5\n", r"lacks the column\(s\) \['hours'\]"),
        ("trial,epoch,score,hours\nt,one,0.5,0.1\n", r"curves.csv:2: epoch 'one'"),
        ("trial,epoch,score,hours\nt,1,0.5,0.1\nt,1,0.6,0.1\n", r"curves.csv:3: trial 't' has epoch 1 twice"),
        ("trial,epoch,score,hours\nt,1,0.5,0.1\nt,3,0.6,0.1\n", r"trial 't' has no row for epoch 2"),
        ("trial,epoch,score,hours\nt,1,0.5,-1\n", r"hours are >= 0"),
        ("trial,epoch,score,hours\n", r"has no rows"),
    ],
)
def test_a_bad_curves_table_is_one_line_naming_the_file_and_row(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "curves.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_curves(path)


def test_every_policy_replays_the_table_and_seeds_vary_only_the_order(tmp_path: Path) -> None:
    curves = read_curves(_table(tmp_path))
    assert default_rungs(9, 3) == [1, 3, 9]
    result = replay_table(curves, workers=3, seeds=4, rungs=[1, 3, 9], eta=3, min_results=1)
    expected_grid = 0.1 * 4 + 0.3 * 9 + 0.1 * 9 * 10  # trial 0's failing 4th epoch is paid for, as it ran
    assert result["grid_hours"] == pytest.approx(expected_grid) and result["best"] == pytest.approx(0.80 - 0.05)  # t10
    grid = result["policies"]["grid"]
    assert grid["hours"] == pytest.approx([expected_grid] * 4)  # every trial, whatever the order
    assert grid["regret"] == pytest.approx([0.0] * 4)  # no noise: the full grid picks the best
    for name, m in result["policies"].items():
        assert all(len(v) == 4 for v in m.values()), name
        assert all(r is None or r >= -1e-12 for r in m["regret"])
        assert all(h is None or h <= hours + 1e-9 for h, hours in zip(m["hours_to_within"], m["hours"], strict=True))
    promoter = result["policies"]["promoter"]
    assert max(promoter["hours"]) < expected_grid  # it screened, not trained everything
    with pytest.raises(DataError, match="the top rung 5 must be the table's last epoch 9"):
        replay_table(curves, rungs=[1, 5])


def test_the_command_prints_the_replay_as_json(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "geopose_ray.cli", "simulate", "--curves", str(_table(tmp_path)), "--workers",
           "3", "--seeds", "2", "--rungs", "1,3,9", "--min-results", "1", "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert set(result) == {"grid_hours", "best", "rungs", "policies"}
    assert set(result["policies"]["asha"]) == {"hours", "regret", "hours_to_within", "utilisation"}
    bad = subprocess.run([*cmd[:5], str(tmp_path / "none.csv")], capture_output=True, text=True)
    assert bad.returncode == 2 and "none.csv: cannot read the curves table" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_written_curves_read_back_and_are_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    curves = {"a": [(2, 0.6, 0.2), (1, 0.5, 0.1)], "b": [(1, 0.4, 0.1)]}
    assert write_curves(path, curves, {"a": {"encoder": "x"}, "b": {"encoder": "y"}}) == 3
    back = read_curves(path)
    assert back.names == ["a", "b"] and back.top == 2 and back.params == [{"encoder": "x"}, {"encoder": "y"}]
    before = path.read_text()
    with pytest.raises(DataError, match="exists; give another --out"):
        write_curves(path, curves, {})
    assert path.read_text() == before
