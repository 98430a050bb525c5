"""`ray job submit` against a local `ray start --head`, as users launch a sweep."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def head() -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head on loopback with the job API, run with --block in its own process group so that the
    teardown ends exactly what it started (``ray stop`` would end every Ray on the machine)."""
    gcs, dash = _free_port(), _free_port()
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    # Ray's token authentication, as a cluster should run: the head and the client share a fresh token.
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's
    start = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
             "--include-dashboard", "true", "--disable-usage-stats"]  # fmt: skip
    proc = subprocess.Popen(
        start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # it answers (Ray's token authentication may refuse an anonymous request): it is up
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the Ray head's job API did not come up within 120 s")
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.cluster
def test_ray_job_submit_runs_the_screen(head: tuple[str, dict[str, str]], cache: Path, tmp_path: Path) -> None:
    address, env = head
    storage = tmp_path / "sweeps"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "python", "sweeps/screen.py", "--config", "sweeps/configs/demo.yaml", "--smoke-test",
           "--cache", str(cache), "--storage", str(storage)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finalists: [" in done.stdout
    assert (storage / "demo-smoke" / "results.csv").exists()
    assert (storage / "demo-smoke" / "mlflow.db").exists()
