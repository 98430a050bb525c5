"""Real Ray heads for the tests that need a cluster of their own: `ray start --head` on loopback with token
authentication, optionally Ray's fake multi-node autoscaler, torn down without touching any other Ray.

`ray stop` would end every Ray on the machine (the test session's own included), so a head is started with
``--block`` in a process group of its own and its temp dir is unique: the teardown ends that group, then any
process still naming the temp dir (Ray starts some of its daemons in sessions of their own).
"""

from __future__ import annotations

import json
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
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Head:
    gcs_address: str  # what RAY_ADDRESS takes
    dashboard: str  # the job API, http://127.0.0.1:<port>
    env: dict[str, str]  # the environment a client (driver, `ray job submit`) needs
    tmp: Path  # RAY_TMPDIR

    @property
    def logs(self) -> Path:
        return self.tmp / "ray" / "session_latest" / "logs"


def submit(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`ray job submit ...`, retried while the head's job agent is still starting (the job API answers before
    the agent has registered, and says "please try again later")."""
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
        if done.returncode == 0 or "No available agent" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def fake_t4_cluster(gcs_address: str, max_workers: int = 2, idle_minutes: float = 0.1) -> dict[str, Any]:
    """A cluster config for Ray's fake multi-node provider: a head with no CPU for trials and a "t4" worker
    type carrying a GPU resource, min 0 workers. Fake nodes are raylets on this machine."""
    return {
        "cluster_name": "fake-t4",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # the provider otherwise assumes port 6379
            "launch_multiple": True,  # one raylet per requested node, not one per request
            "use_node_id_as_ip": True,  # fake nodes share this machine's IP; tell them apart by node id
            "disable_node_updaters": True,  # nothing to ssh into
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "t4": {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "head_node_type": "ray.head.default",
        **{k: {} for k in ("file_mounts",)},
        **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands")},
        **{k: [] for k in ("setup_commands", "head_setup_commands", "worker_setup_commands")},
        **{k: [] for k in ("head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts_sync_continuously": False,
    }


def _end(proc: subprocess.Popen[bytes], tmp: Path) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # `ray start --block` can take 30 s and more after a job: nothing to keep
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-f", str(tmp)], capture_output=True, text=True).stdout.split()
        if not left:
            break
        for pid in left:
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL if time.monotonic() > deadline - 10 else signal.SIGTERM)
        time.sleep(1)
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def ray_head(
    num_cpus: int = 2, autoscaling: dict[str, Any] | None = None, autoscaler_interval_s: int | None = None
) -> Iterator[Head]:
    """A Ray head on loopback with the job API; ``autoscaling`` is a fake multi-node cluster config (its
    ``provider.gcs_address`` is filled in)."""
    gcs, dash = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's socket paths must stay short
    # Ray's token authentication, as a cluster should run: the head and the client share a fresh token.
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # a job's `python` is this environment's
    start = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", str(num_cpus),
             "--include-dashboard", "true", "--disable-usage-stats",
             # Its own port for the job agent: another Ray on this machine (the test session's) may hold the default.
             "--dashboard-agent-listen-port", str(free_port())]  # fmt: skip
    head_env = dict(env)
    if autoscaling is not None:
        autoscaling = json.loads(json.dumps(autoscaling))
        autoscaling["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
        (tmp / "cluster.json").write_text(json.dumps(autoscaling))
        start.append(f"--autoscaling-config={tmp / 'cluster.json'}")
        head_env["RAY_FAKE_CLUSTER"] = "1"
        if autoscaler_interval_s is not None:  # Ray's default is 5 s
            head_env["AUTOSCALER_UPDATE_INTERVAL_S"] = str(autoscaler_interval_s)
    proc = subprocess.Popen(
        start, env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # it answers (token authentication may refuse an anonymous request): it is up
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the Ray head's job API did not come up within 120 s")
        yield Head(f"127.0.0.1:{gcs}", address, env, tmp)
    finally:
        _end(proc, tmp)
