"""The competition's layout for tests: one metadata.csv at the data root, keyed by bare id, covering train and test,
with ``train/`` and ``test/`` beside it and no metadata.csv in either."""

from __future__ import annotations

import shutil
from pathlib import Path

from geopose_ray.data.layout import MetadataRow, bare_id, read_metadata, write_metadata


def data_root(dataset: Path, root: Path, splits: tuple[str, ...] = ("train", "test", "test_truth")) -> Path:
    """Copy ``dataset``'s ``splits`` under ``root`` without their metadata.csv, and write ``root/metadata.csv``
    with the rows of the train and test tiles under their bare ids. Returns ``root``."""
    rows: list[MetadataRow] = []
    for split in splits:
        shutil.copytree(dataset / split, root / split, ignore=shutil.ignore_patterns("metadata.csv"))
    for split in ("train", "test"):
        rows += [
            MetadataRow(bare_id(r.id), r.city, r.gsd) for r in read_metadata(dataset / split / "metadata.csv").values()
        ]
    write_metadata(root / "metadata.csv", rows)
    return root
