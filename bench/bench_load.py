"""Load: many short trials through the promoter on the local Ray, tracked on a real `mlflow server`.

Counts what must match (every epoch a trial reported to Ray Tune is in MLflow, once; no trial errored; one run
per trial) and records how long MLflow calls took. A tiny cache (8 px tiles would be too small for the encoder:
32 px) keeps epochs short so that the scheduler and the tracking, not training, are what is loaded.

    .venv/bin/python bench/bench_load.py [--trials 300] [--mlflow-jobs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """A real `mlflow server` on loopback, SQLite in ``root/mlflow.db`` and artifacts in ``root/art``, in a process
    group of its own, on one port for its whole life: :meth:`stop` kills the group (as an outage would) and
    :meth:`start` brings it back on the same port and database. ``jobs``: MLflow's job execution on (MLflow's
    default; ``launch/local.sh`` turns it off)."""

    def __init__(self, root: Path, jobs: bool = False, timeout_s: float = 90.0) -> None:
        self.root, self.jobs, self.timeout_s = root, jobs, timeout_s
        self.port = _port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server's pid, which is also its process group's id."""
        assert self.proc is not None, "the server is not running"
        return self.proc.pid

    def start(self) -> None:
        """Start the server and return once ``/health`` answers; raises RuntimeError if it exits first or does not
        answer within ``timeout_s`` (its process group is then killed)."""
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--default-artifact-root", (self.root / "art").as_uri(), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(self.jobs).lower(),
                 "MLFLOW_DISABLE_TELEMETRY": "true"},
        )  # fmt: skip
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return
            except OSError:
                exited = self.proc.poll()
                if exited is not None or time.monotonic() > deadline:
                    self.stop()
                    late = f"did not start within {self.timeout_s:g} s"
                    raise RuntimeError(f"mlflow server {late if exited is None else f'exited with {exited}'}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Kill the server's process group, whatever of it is left (no-op when it was never started)."""
        if self.proc is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextmanager
def mlflow_server(root: Path, jobs: bool = False, timeout_s: float = 90.0) -> Iterator[tuple[int, str]]:
    """:class:`MlflowServer` for the length of a ``with`` block: yields its pid (the group's id) and URI once
    ``/health`` answers, and kills the group on exit."""
    server = MlflowServer(root, jobs, timeout_s)
    server.start()
    try:
        yield server.pid, server.uri
    finally:
        server.stop()


def run_load(
    trials: int, root: Path, mlflow_jobs: bool = False, uri: str | None = None, experiment: str = "load"
) -> dict[str, Any]:
    """Run the load sweep under ``root`` and return its counts; raises if the MLflow server does not start.
    ``mlflow_jobs``: start the server with MLflow's job execution on (MLflow's default; ``launch/local.sh`` turns
    it off; ignored with ``uri``). ``uri``: track on this running server instead of starting one;
    ``experiment``: the sweep's name and its MLflow experiment, which must not exist yet there."""
    import yaml

    from geopose_ray.data.cache import prepare_cache
    from geopose_ray.data.synth import synthesize
    from geopose_ray.tracking import Tracker

    synthesize(root / "data", 8, 32, seed=0, test_tiles=1, workers=1)
    prepare_cache(root / "data" / "train", root / "cache", 1, folds=2, workers=1)
    with nullcontext((0, uri)) if uri else mlflow_server(root, jobs=mlflow_jobs) as (_, uri):
        lrs = [round(1e-3 * (1 + i / 100), 6) for i in range(math.ceil(trials / 2))]
        sweep = {
            "name": experiment, "cache": str(root / "cache"), "storage_path": str(root / "runs"), "tracking_uri": uri,
            # Linknet: a fifth of U-Net's weights, so 330 trials' checkpoints stay small on disk.
            "grid": {"encoders": ["tu-test_resnet"], "decoders": ["Linknet"], "lrs": lrs[: math.ceil(trials / 2)],
                     "accumulation": [1, 2]},
            "train": {"batch_size": 2, "augment": None}, "rungs": [1, 2], "eta": 10,
        }  # fmt: skip
        (root / "load.yaml").write_text(yaml.safe_dump(sweep))
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(ROOT / "sweeps" / "screen.py"), "--config", str(root / "load.yaml")],
            capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"the load sweep failed: {done.stderr[-2000:]}")
        # What every trial trained, from the driver's record (each trial's last epoch); Tune's own result.json
        # is not the reference: it was seen missing a line once in a few runs.
        saved = json.loads((root / "runs" / experiment / "trials.json").read_text())["trials"]
        reported = {k: list(range(1, int(r["metrics"]["epoch"]) + 1)) for k, r in saved.items()}
        errored = sum(1 for r in saved.values() if r.get("error"))
        t = Tracker(uri, experiment, experiment)
        runs = t.runs()
        keys = [r.data.tags["trial"] for r in runs]
        history = t._client.get_metric_history
        steps = {k: [m.step for m in history(r.info.run_id, "score")] for k, r in zip(keys, runs, strict=True)}
        logged = sum(len(v) for v in steps.values())
        duplicates = sum(len(v) - len(set(v)) for v in steps.values())
        mismatched = [k for k in reported if sorted(steps.get(k, [])) != reported[k]]
        parent = t._client.get_run(t.parent().id).data.metrics
        return {
            "trials": len([k for k in reported if "/fold" not in k]),
            "fold_runs": len([k for k in reported if "/fold" in k]),
            "runs_in_mlflow": len(runs),
            "duplicate_runs": len(keys) - len(set(keys)),
            "epochs_reported": sum(len(v) for v in reported.values()),
            "epochs_in_mlflow": logged,
            "duplicate_epochs": duplicates,
            "trials_with_lost_or_extra_epochs": len(mismatched),
            "mismatches": {k: {"reported": reported[k], "mlflow": sorted(steps.get(k, []))} for k in mismatched[:5]},
            "errored_trials": errored,
            "scheduler_errors": done.stderr.count("Traceback"),
            "sweep_s": round(seconds, 1),
            "mlflow_calls": parent.get("mlflow_calls"),
            "mlflow_latency_median_ms": parent.get("mlflow_latency_median_ms"),
            "mlflow_latency_p95_ms": parent.get("mlflow_latency_p95_ms"),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--mlflow-jobs", action="store_true", help="the server with MLflow's job execution on")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run_load(args.trials, Path(tmp), args.mlflow_jobs), indent=1))


if __name__ == "__main__":
    main()
