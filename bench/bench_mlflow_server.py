"""What an `mlflow server` costs its host, with and without MLflow's job execution.

MLflow's server (3.17 here) starts, next to its web workers, a job runner and a pool of huey consumer processes (for
MLflow's own background jobs, which the sweep never submits) unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` is
false. The servers this project starts (``launch/local.sh``, the KubeRay manifest, the tests) turn it off. This
measures, for each setting on the same machine in one run: the processes the server runs, the CPU seconds its
process group spends to become healthy, the CPU seconds it spends over ``--idle`` seconds with no client, and the
median latency of ``--calls`` metric logs from one client. Medians over ``--reps`` alternating starts.

    .venv/bin/python bench/bench_mlflow_server.py [--reps 3] [--idle 60] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_load import mlflow_server  # bench/ is the script's directory, so on sys.path

TICK = os.sysconf("SC_CLK_TCK")


def _group(pgid: int) -> dict[int, float]:
    """CPU seconds (user + system, children that exited included) of every live process in process group ``pgid``."""
    out: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) != pgid:  # field 5 of stat: the process group
            continue
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        out[int(entry)] = (utime + stime + cutime + cstime) / TICK
    return out


def measure(jobs: bool, root: Path, idle_s: float, calls: int) -> dict[str, Any]:
    root.mkdir(parents=True)
    start = time.perf_counter()
    with mlflow_server(root, jobs=jobs, timeout_s=120) as (pid, uri):
        ready_s = time.perf_counter() - start
        time.sleep(5)  # the job runner and its consumers start after the web server answers
        before = _group(pid)
        time.sleep(idle_s)
        after = _group(pid)
        idle_cpu = sum(after.get(p, 0.0) - before.get(p, 0.0) for p in after)

        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("bench")).info.run_id
        latencies = []
        for step in range(calls):
            t = time.perf_counter()
            client.log_metric(run, "score", step / calls, step=step)
            latencies.append(time.perf_counter() - t)
        return {
            "processes": len(after),
            "startup_s": round(ready_s, 2),
            "startup_cpu_s": round(sum(before.values()), 2),
            "idle_cpu_s_per_min": round(idle_cpu * 60 / idle_s, 2),
            "log_metric_median_ms": round(1000 * statistics.median(latencies), 2),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    settings = {"jobs on (MLflow's default)": True, "jobs off (this project)": False}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, jobs in settings.items():
                runs[name].append(measure(jobs, Path(tmp) / f"{rep}-{jobs}", args.idle, args.calls))
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(json.dumps({"runs": runs, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
