"""Shared fixtures: a seeded synthetic dataset in the real layout, its cache, and no network at all."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from geopose_ray.data.cache import prepare_cache
from geopose_ray.data.synth import synthesize

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
