"""Shared fixtures: a seeded synthetic dataset in the real layout, its cache, and no network at all."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs
import pytest

from geopose_ray.data.cache import prepare_cache
from geopose_ray.data.synth import synthesize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_load import MlflowServer

_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address: object) -> None:
    host = address[0] if isinstance(address, tuple) else None
    if host is not None:
        try:
            allowed = ipaddress.ip_address(host).is_loopback
        except ValueError:
            allowed = host == "localhost"
        if not allowed:
            raise RuntimeError(f"tests must not use the network (tried to connect to {address}); nothing downloads")
    _real_connect(self, address)  # type: ignore[arg-type]


@pytest.fixture(scope="session", autouse=True)
def no_downloads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Any attempt to download (weights, datasets) fails the test: hubs offline, sockets loopback-only."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # and for every process a test starts
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        mp.setattr(socket.socket, "connect", _loopback_only)
        yield


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small seeded synthetic dataset: ``train/`` (16 tiles), ``test/`` and ``test_truth/`` (4 tiles), 64 px."""
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, tiles=16, size=64, seed=123, workers=1)
    return root


@pytest.fixture(scope="session")
def cache(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training cache of :func:`dataset` at downsample 2, 4 folds."""
    out = tmp_path_factory.mktemp("cache")
    result = prepare_cache(dataset / "train", out, downsample=2, folds=4, seed=0, workers=1)
    assert not result.errors
    return out


@pytest.fixture(scope="session")
def checkpoint_dir(checkpoint_config: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint directory (``last.pt``, ``best.pt``) of a tiny model trained one epoch on :func:`cache`
    (U-Net on timm's test ResNet, batch 4, validated on fold 0, seed 0), shared by the whole run: copy it before
    changing it. Its training config is :func:`checkpoint_config`."""
    import torch

    from geopose_ray.engine import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    Trainer(TrainConfig.from_dict(checkpoint_config), out).fit()
    return out


@pytest.fixture(scope="session")
def checkpoint_config(cache: Path) -> dict[str, object]:
    """The training config :func:`checkpoint_dir`'s model was trained with."""
    return {"cache": str(cache), "model": {"encoder": "tu-test_resnet"}, "epochs": 1, "batch_size": 4, "val_fold": 0}


@pytest.fixture(scope="session")
def _mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(_mlflow_server: MlflowServer) -> MlflowServer:
    """One real `mlflow server` (SQLite) for the whole run, running when a test starts: a test may stop it and
    start it again (an outage), on the same port and database. Tests share it, so each uses experiments of its
    own."""
    if not _mlflow_server.running:
        _mlflow_server.stop()  # whatever is left of its process group holds the port
        _mlflow_server.start()
    return _mlflow_server


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """A bucket on a local S3-compatible server (moto's, on loopback) for the sweep's remote storage; yields the
    storage path a sweep config would name, with the credentials and endpoint in the URI as pyarrow (and so Ray
    Tune, in every worker) reads them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the local S3 server did not start") from None
                time.sleep(0.1)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://key:secret@bucket?{query}&allow_bucket_creation=true")
        fs.create_dir("bucket")
        yield f"s3://key:secret@bucket/sweeps?{query}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the session: 2 CPUs, 1 per trial, and 2 GPUs as logical resources (none is real: a
    trial that holds one trains on the CPU, and counts GPU-hours as a GPU trial would)."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run the full-size soak tests (marked soak; make soak)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests (the full-size runs of tests the suite also runs small) are deselected unless ``--soak`` is
    given. Slow tests go first, so that the workers of a parallel run (``-n 2``) start the long ones while the
    short ones fill the gaps; within each group the order is the files' own."""
    if not config.getoption("--soak"):
        soak = [item for item in items if item.get_closest_marker("soak")]
        if soak:
            config.hook.pytest_deselected(items=soak)
            items[:] = [item for item in items if not item.get_closest_marker("soak")]
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)
