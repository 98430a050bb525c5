"""The manifest and the city-stratified folds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geopose_ray.data.layout import CITIES, read_metadata
from geopose_ray.data.manifest import assign_folds, build_manifest, read_manifest, refold, write_manifest
from geopose_ray.errors import ConfigError, DataError


def _stems(counts: dict[str, int]) -> list[str]:
    return [f"{city}_{i:06d}" for city, n in counts.items() for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(
    counts=st.fixed_dictionaries({c: st.integers(0, 40) for c in CITIES}),
    k=st.integers(2, 7),
    seed=st.integers(0, 2**32 - 1),
)
def test_folds_are_stratified_balanced_and_deterministic(counts: dict[str, int], k: int, seed: int) -> None:
    stems = _stems(counts)
    folds = assign_folds(stems, k, seed)
    assert set(folds) == set(stems) and set(folds.values()) <= set(range(k))
    for city, n in counts.items():
        per_fold = Counter(folds[s] for s in stems if s.startswith(city))
        sizes = [per_fold.get(f, 0) for f in range(k)]
        assert max(sizes) - min(sizes) <= 1, (city, sizes)
        if n >= k:
            assert min(sizes) >= 1  # every city in every fold where it has >= k tiles
    overall = Counter(folds.values())
    total = [overall.get(f, 0) for f in range(k)]
    assert max(total) - min(total) <= 1
    assert assign_folds(list(reversed(stems)), k, seed) == folds  # order of input does not matter


def test_folds_depend_on_the_seed() -> None:
    stems = _stems({"ARG": 30, "JAX": 30})
    assert assign_folds(stems, 5, 0) != assign_folds(stems, 5, 1)


def test_adding_a_city_does_not_reshuffle_another() -> None:
    a = assign_folds(_stems({"JAX": 25}), 5, 3)
    b = assign_folds(_stems({"JAX": 25, "OMA": 9}), 5, 3)
    # Within JAX the grouping into folds is the same (fold labels may rotate).
    groups_a = sorted(sorted(s for s in a if a[s] == f) for f in range(5))
    groups_b = sorted(sorted(s for s in a if b[s] == f) for f in range(5))
    assert groups_a == groups_b


def test_too_few_folds_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="`folds >= 2`"):
        assign_folds(["JAX_A"], 1)


def test_manifest_of_the_synthetic_dataset(dataset: Path) -> None:
    rows = build_manifest(dataset / "train", k=4, seed=0)
    meta = read_metadata(dataset / "train" / "metadata.csv")
    assert len(rows) == 16 and {r.city for r in rows} == set(CITIES)
    for r in rows:
        raw = json.loads((dataset / "train" / r.vflow).read_text())
        assert r.scale == pytest.approx(raw["scale"] * 100, rel=1e-15)
        assert r.angle == raw["angle"]
        assert r.gsd == meta[r.stem].gsd
        assert r.city == r.stem[:3]
        assert (dataset / "train" / r.rgb).exists() and r.rgb.endswith("_RGB.j2k")


def test_manifest_csv_round_trip_is_exact(dataset: Path, tmp_path: Path) -> None:
    rows = build_manifest(dataset / "train", k=4, seed=0)
    write_manifest(tmp_path / "m.csv", rows)
    assert read_manifest(tmp_path / "m.csv") == rows
    assert refold(rows, 3, 9) != rows and {r.fold for r in refold(rows, 3, 9)} == {0, 1, 2}


def test_manifest_refuses_an_incomplete_dataset(dataset: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "train"
    shutil.copytree(dataset / "train", d)
    victim = next(d.glob("*_AGL.tif"))
    victim.unlink()
    with pytest.raises(DataError, match="not all present; run geopose-ray validate"):
        build_manifest(d)
    with pytest.raises(DataError, match="missing"):
        read_manifest(tmp_path / "nope.csv")


def test_metadata_round_trip_and_id_forms(tmp_path: Path) -> None:
    from geopose_ray.data.layout import MetadataRow, lookup_metadata, write_metadata

    rows = [MetadataRow("JAX_ABCDEF", "JAX", 0.1 + 0.2), MetadataRow("OMA_GHIJKL", "OMA", 0.31)]
    write_metadata(tmp_path / "metadata.csv", rows)
    back = read_metadata(tmp_path / "metadata.csv")
    assert list(back.values()) == rows  # floats survive exactly (repr)
    # Some copies of the data key metadata by the six-letter ID alone: both forms resolve.
    (tmp_path / "short.csv").write_text("id,city,gsd\nABCDEF,JAX,0.4\n")
    short = read_metadata(tmp_path / "short.csv")
    assert lookup_metadata(short, "JAX_ABCDEF") == MetadataRow("ABCDEF", "JAX", 0.4)
    assert lookup_metadata(back, "JAX_ABCDEF") == rows[0]
    (tmp_path / "bad.csv").write_text("id,gsd\nA,1\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['city'\]"):
        read_metadata(tmp_path / "bad.csv")
