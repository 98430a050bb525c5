"""Checkpoints: everything a run needs to continue exactly, written atomically, loadable with weights_only."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import torch

from geopose_ray.errors import DataError
from geopose_ray.fsutil import atomic_write_bytes
from geopose_ray.storage import local_file, redact

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, dicts, lists and plain values) atomically: the old file stays intact until
    the new one is complete."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code is unpickled). ``path`` may be a location on a
    sweep's remote storage (``s3://...``): it is downloaded first (:func:`geopose_ray.storage.local_file`).
    ``mmap``: map the tensors' storage from the file instead of reading it, for a look at the metadata."""
    shown = redact(path)  # messages name the location, not a downloaded copy, and never its credentials
    try:
        local = local_file(path)
        if mmap and local.is_file() and not zipfile.is_zipfile(local):  # torch's own error would blame mmap
            raise DataError(f"{shown}: not a readable checkpoint (not a torch.save archive)")
        state: dict[str, Any] = torch.load(local, map_location=map_location, weights_only=True, mmap=mmap)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{shown}: checkpoint not found") from e
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise DataError(f"{shown}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{shown}: not a geopose-ray checkpoint (format {CHECKPOINT_FORMAT})")
    return state
