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


# --- group folds and the data-root metadata -----------------------------------------------------------------------


def test_without_groups_the_folds_are_unchanged() -> None:
    """No groups (None or empty) deals exactly the round-robin folds of before groups existed (pinned here)."""
    stems = _stems({"ARG": 5, "ATL": 3, "JAX": 7, "OMA": 4})
    pinned = [1, 1, 0, 2, 0, 1, 2, 0, 1, 0, 1, 0, 2, 2, 2, 2, 0, 1, 0]
    for groups in (None, {}):
        folds = assign_folds(stems, 3, 7, groups)
        assert [folds[s] for s in sorted(stems)] == pinned


@settings(max_examples=60, deadline=None)
@given(
    counts=st.fixed_dictionaries({c: st.integers(0, 40) for c in CITIES}),
    k=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_group_folds_never_split_a_group_and_stay_balanced(
    counts: dict[str, int], k: int, seed: int, data: st.DataObject
) -> None:
    stems = _stems(counts)
    # Each tile joins one of a few groups of its city (up to 20 near-duplicates each), or none (its own group).
    labels = data.draw(st.lists(st.integers(-1, 5), min_size=len(stems), max_size=len(stems)))
    groups = {s: f"{s[:3]}-{g}" for s, g in zip(stems, labels, strict=True) if g >= 0}
    folds = assign_folds(stems, k, seed, groups)
    assert set(folds) == set(stems) and set(folds.values()) <= set(range(k))
    members: dict[str, set[int]] = {}
    for s, g in groups.items():
        members.setdefault(g, set()).add(folds[s])
    assert all(len(f) == 1 for f in members.values())  # never split
    spread = 0
    for city in CITIES:
        sizes = Counter(g for s, g in groups.items() if s.startswith(city))
        largest = max([*sizes.values(), 1])
        per_fold = Counter(folds[s] for s in stems if s.startswith(city))
        loads = [per_fold.get(f, 0) for f in range(k)]
        assert max(loads) - min(loads) <= largest, (city, loads, largest)  # largest first to the smallest fold
        spread += largest
    overall = Counter(folds.values())
    assert max(overall.get(f, 0) for f in range(k)) - min(overall.get(f, 0) for f in range(k)) <= spread
    # Deterministic, and independent of the order of the tiles and of the groups.
    assert assign_folds(list(reversed(stems)), k, seed, dict(reversed(list(groups.items())))) == folds


def test_group_folds_of_single_tiles_are_as_balanced_as_without() -> None:
    stems = _stems({"ARG": 23, "JAX": 11, "OMA": 5})
    folds = assign_folds(stems, 5, 2, {s: s for s in stems})
    for city in ("ARG", "JAX", "OMA"):
        per_fold = Counter(folds[s] for s in stems if s.startswith(city))
        assert max(per_fold.values()) - min(per_fold.get(f, 0) for f in range(5)) <= 1
    assert assign_folds(stems, 5, 2, {s: s for s in stems}) != assign_folds(stems, 5, 3, {s: s for s in stems})


def test_groups_file_keeps_near_duplicates_in_one_fold(dataset: Path, tmp_path: Path) -> None:
    from geopose_ray.data.manifest import read_groups, resolve_groups

    stems = sorted(r.stem for r in build_manifest(dataset / "train", k=4))
    jax = [s for s in stems if s.startswith("JAX")]
    test_stem = next(iter(read_metadata(dataset / "test" / "metadata.csv")))
    groups = tmp_path / "groups.csv"
    # Full stems and bare ids alike; a row for a test tile is ignored.
    lines = ["id,group", *(f"{s.split('_')[1]},dup" for s in jax[:2]), f"{jax[2]},dup", f"{stems[0]},other",
             f"{test_stem},dup"]  # fmt: skip
    groups.write_text("\n".join(lines) + "\n")
    assert resolve_groups(read_groups(groups), stems, groups) == {**dict.fromkeys(jax[:3], "dup"), stems[0]: "other"}
    for seed in range(6):
        rows = build_manifest(dataset / "train", k=4, seed=seed, groups=groups)
        assert len({r.fold for r in rows if r.stem in jax[:3]}) == 1
    assert [r.fold for r in build_manifest(dataset / "train", k=4, seed=1)] == [
        r.fold for r in build_manifest(dataset / "train", k=4, seed=1, groups=None)
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,cluster\nA,1\n", r"missing column\(s\) \['group'\]; a groups file has columns id,group"),
        ("id,group\nA,1\nA,2\n", r"id A is in group '1' and, on line 3, in '2'; keep one"),
        ("id,group\nA,\n", r"line 2 has an empty id or group"),
        ("id,group\nNOSUCH,1\n", r"none of its 1 id\(s\) names a tile here"),
    ],
)
def test_bad_groups_files_are_one_line_naming_the_file(dataset: Path, tmp_path: Path, text: str, message: str) -> None:
    groups = tmp_path / "groups.csv"
    groups.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        build_manifest(dataset / "train", k=4, groups=groups)
    assert str(e.value).startswith(str(groups)) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="--groups file not found"):
        build_manifest(dataset / "train", k=4, groups=tmp_path / "none.csv")


def test_manifest_reads_the_data_root_metadata_or_metadata_path(dataset: Path, tmp_path: Path) -> None:
    from data_root import data_root

    root = data_root(dataset, tmp_path / "root", ("train",))
    assert not (root / "train" / "metadata.csv").exists()
    rows = build_manifest(root / "train", k=4)
    assert rows == build_manifest(dataset / "train", k=4)  # same gsd, bare ids or not
    elsewhere = tmp_path / "meta.csv"
    (root / "metadata.csv").rename(elsewhere)
    with pytest.raises(DataError, match=r"no metadata.csv beside the tiles or at the data root .*--metadata PATH"):
        build_manifest(root / "train", k=4)
    assert build_manifest(root / "train", k=4, metadata=elsewhere) == rows
    lines = elsewhere.read_text().splitlines()
    elsewhere.write_text("\n".join(lines[:1] + lines[4:]) + "\n")  # no rows for three train tiles
    with pytest.raises(DataError, match=r"meta.csv: no row for 3 tile\(s\) of .*add them"):
        build_manifest(root / "train", k=4, metadata=elsewhere)
