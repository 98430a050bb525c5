"""`ray job submit` against a local `ray start --head`, as users launch a sweep."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_heads import BIN, ray_head, submit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def head() -> Iterator[tuple[str, dict[str, str]]]:
    with ray_head(num_cpus=2) as h:
        yield h.dashboard, h.env


@pytest.mark.slow
@pytest.mark.cluster
def test_ray_job_submit_runs_the_screen(head: tuple[str, dict[str, str]], cache: Path, tmp_path: Path) -> None:
    address, env = head
    storage = tmp_path / "sweeps"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "python", "sweeps/screen.py", "--config", "sweeps/configs/demo.yaml", "--smoke-test",
           "--cache", str(cache), "--storage", str(storage)]  # fmt: skip
    done = submit(cmd, env, ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finalists: [" in done.stdout
    assert (storage / "demo-smoke" / "results.csv").exists()
    assert (storage / "demo-smoke" / "mlflow.db").exists()
