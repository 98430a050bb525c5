"""The budget planner: the sweep's knobs searched on the simulator, the recommendation written as a config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from geopose_ray.simulate.plan import Candidate, measure, plan, scaled
from geopose_ray.sweep.config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]


def test_schedules_scale_to_the_top_rung() -> None:
    assert scaled((20, 60, 200), 200) == (20, 60, 200)
    assert scaled((20, 60, 200), 20) == (2, 6, 20)
    assert scaled((7, 22, 67, 200), 3) == (1, 3)


def test_a_candidate_keeps_its_total_near_the_budget_and_sets_the_fold_runs_aside() -> None:
    budget = 400.0
    m = measure(Candidate((2, 6, 20), 3, 2, "grid"), 30, 4, budget, range(3))
    assert m is not None and m.screen_budget < budget  # room kept for 2 finalists' 4 fold runs
    assert m.gpu_hours <= 1.25 * budget and 0 <= m.within <= 1
    assert measure(Candidate((2, 6, 20), 3, 5, "grid"), 30, 4, 10.0, range(2)) is None  # cannot pay the folds
    everything = measure(Candidate((2, 6, 20), 3, None, "guided"), 30, 4, budget, range(3))
    assert everything is not None and everything.screen_budget == budget  # as configured: nothing set aside


def test_the_plan_ranks_candidates_by_the_share_of_seeds_within_the_tolerance() -> None:
    measured = plan(30, 4, 400.0, seeds=2, top=20, keep=3)
    assert 1 <= len(measured) <= 3
    keys = [(m.gpu_hours > 1.05 * 400.0, -m.within, m.regret, m.gpu_hours) for m in measured]
    assert keys == sorted(keys)


@pytest.mark.slow
def test_the_command_writes_a_config_that_validates_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "planned.yaml"
    cmd = [sys.executable, "-m", "geopose_ray.cli", "plan", "--config", str(ROOT / "sweeps/configs/demo.yaml"),
           "--trials", "24", "--budget", "300", "--workers", "2", "--seeds", "1", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "pick within 0.002" in run.stdout and f"written: {out}" in run.stdout
    planned = SweepConfig.from_yaml(out)
    assert planned.fold_top_k is not None and planned.budget_gpu_hours is not None
    assert (
        planned.budget_gpu_hours < 300
        and planned.rungs[-1] == SweepConfig.from_yaml(ROOT / "sweeps/configs/demo.yaml").rungs[-1]
    )
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "exists; give another --out" in again.stderr and "Traceback" not in again.stderr
