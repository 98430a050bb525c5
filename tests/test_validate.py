"""`geopose-ray validate`: every kind of bad file is reported with its name and a fix, never a traceback."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geopose_ray.cli import main
from geopose_ray.data.rasters import write_agl_cm
from geopose_ray.data.validate import validate_dir


@pytest.fixture
def train(dataset: Path, tmp_path: Path) -> Path:
    d = tmp_path / "train"
    shutil.copytree(dataset / "train", d)
    return d


def _first(d: Path, suffix: str) -> Path:
    return sorted(d.glob(f"*{suffix}"))[0]


def _truncate(d: Path) -> str:
    p = _first(d, "_RGB.j2k")
    p.write_bytes(p.read_bytes()[:300])
    return p.name


def _one_band_rgb(d: Path) -> str:
    p = _first(d, "_RGB.j2k")
    p.unlink()
    tif = p.with_name(p.name.replace(".j2k", ".tif"))
    with rasterio.open(tif, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as ds:
        ds.write(np.zeros((1, 64, 64), dtype=np.uint8))
    return tif.name


def _float_agl(d: Path) -> str:
    p = _first(d, "_AGL.tif")
    with rasterio.open(p, "w", driver="GTiff", width=64, height=64, count=1, dtype="float32") as ds:
        ds.write(np.zeros((1, 64, 64), dtype=np.float32))
    return p.name


def _small_agl(d: Path) -> str:
    p = _first(d, "_AGL.tif")
    write_agl_cm(p, np.zeros((32, 64), dtype=np.uint16))
    return p.name


def _json_text(text: str) -> Callable[[Path], str]:
    def breaker(d: Path) -> str:
        p = _first(d, "_VFLOW.json")
        p.write_text(text)
        return p.name

    return breaker


def _missing(suffix: str) -> Callable[[Path], str]:
    def breaker(d: Path) -> str:
        p = _first(d, suffix)
        p.unlink()
        return p.name.split("_")[0] + "_" + p.name.split("_")[1]

    return breaker


def _unknown_city(d: Path) -> str:
    for p in d.glob("ARG_*"):
        p.rename(p.with_name(p.name.replace("ARG_", "XYZ_", 1)))
    return "XYZ_"


def _metadata(edit: Callable[[list[str]], list[str]]) -> Callable[[Path], str]:
    def breaker(d: Path) -> str:
        m = d / "metadata.csv"
        m.write_text("\n".join(edit(m.read_text().splitlines())) + "\n")
        return "metadata.csv"

    return breaker


def _set_gsd(lines: list[str], gsd: str) -> list[str]:
    return [lines[0], lines[1].rsplit(",", 1)[0] + "," + gsd, *lines[2:]]


def _no_metadata(d: Path) -> str:
    (d / "metadata.csv").unlink()
    return "metadata.csv"


def _duplicate_stem(d: Path) -> str:
    p = _first(d, "_RGB.j2k")
    shutil.copy(p, p.with_name(p.name.replace(".j2k", ".tif")))
    return p.name.replace("_RGB.j2k", "")


DEFECTS = {
    "truncated image": (_truncate, "unreadable RGB image"),
    "RGB not 3-band uint8": (_one_band_rgb, "RGB is 1-band uint8, expected 3-band uint8"),
    "AGL wrong dtype": (_float_agl, "AGL is 1-band float32, expected 1-band uint16"),
    "AGL/RGB size mismatch": (_small_agl, "AGL is 64x32 but RGB is 64x64"),
    "VFLOW missing": (_missing("_VFLOW.json"), "missing partner file VFLOW"),
    "VFLOW not JSON": (_json_text("{oops"), "not valid JSON"),
    "VFLOW missing key": (_json_text('{"scale": 0.01}'), "missing key"),
    "VFLOW non-finite": (_json_text('{"scale": NaN, "angle": 1.0}'), "scale is nan px/cm"),
    "VFLOW infinite angle": (_json_text('{"scale": 0.01, "angle": Infinity}'), "angle is inf"),
    "angle out of range": (
        _json_text('{"scale": 0.01, "angle": 6.5}'), r"angle is 6\.5; it must be radians in \[0, 2π\)"
    ),
    "negative angle": (_json_text('{"scale": 0.01, "angle": -0.1}'), "angle is -0.1"),
    "AGL missing": (_missing("_AGL.tif"), "missing partner file AGL"),
    "RGB missing": (_missing("_RGB.j2k"), "missing partner file RGB"),
    "unknown city": (_unknown_city, "unknown city prefix"),
    "id missing from metadata": (_metadata(lambda lines: lines[:1] + lines[2:]), "no row for"),
    "gsd not positive": (_metadata(lambda lines: _set_gsd(lines, "-0.5")), "gsd of .* is -0.5"),
    "gsd not a number": (_metadata(lambda lines: _set_gsd(lines, "abc")), "gsd of .* is nan"),
    "duplicate metadata id": (_metadata(lambda lines: [*lines, lines[1]]), "appears more than once"),
    "duplicate stem": (_duplicate_stem, "duplicate stem"),
    "metadata missing": (_no_metadata, "missing; the dataset needs a metadata.csv"),
}  # fmt: skip


def test_clean_dataset_passes(dataset: Path) -> None:
    report = validate_dir(dataset / "train", workers=1)
    assert report.ok and report.split == "train" and report.stems == 16
    assert validate_dir(dataset / "test", workers=1).split == "test"
    assert validate_dir(dataset / "test_truth", workers=1).split == "truth"
    assert validate_dir(dataset / "test_truth", workers=1).ok


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_is_reported_with_file_and_fix(
    train: Path, defect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    breaker, message = DEFECTS[defect]
    name = breaker(train)
    code = main(["validate", str(train), "--workers", "2"])
    out, err = capsys.readouterr()
    assert code == 1, out
    problems = [line for line in out.splitlines() if name in line]
    assert problems, f"no line names {name}:\n{out}"
    assert any(re.search(message, line) for line in problems), out
    assert "; " in problems[0]  # "file: what is wrong; what to do"
    assert "Traceback" not in out + err
    assert out.strip().splitlines()[-1].endswith("file(s)")  # the summary comes last


def test_several_problems_are_all_reported(train: Path) -> None:
    _truncate(train)
    _json_text('{"scale": 0.01, "angle": 9}')(train)
    _missing("_AGL.tif")(train)
    report = validate_dir(train, workers=2)
    assert len(report.problems) >= 3


def test_nonexistent_directory_is_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(tmp_path / "nope")])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and "nope: not a directory" in err


def test_vflow_with_wrong_types_is_reported(train: Path) -> None:
    p = _first(train, "_VFLOW.json")
    p.write_text(json.dumps({"scale": True, "angle": 1.0}))
    report = validate_dir(train, workers=1)
    assert next(str(x) for x in report.problems if p.name in x.path).endswith(
        'write {"scale": <px per cm>, "angle": <radians>}'
    )


def test_the_data_root_metadata_serves_every_split(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The competition's layout: one metadata.csv at the root, bare ids, train and test rows together. Each split
    is judged only on its own tiles' rows: test tiles' rows, even a duplicated one, are no problem of train."""
    from data_root import data_root

    root = data_root(dataset, tmp_path / "root")
    meta = root / "metadata.csv"
    for split in ("train", "test", "test_truth"):
        report = validate_dir(root / split, workers=1)
        assert report.ok, report.problems
        assert report.metadata == meta
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([*lines, lines[-1]]) + "\n")  # a test tile's row twice
    assert validate_dir(root / "train", workers=1).ok
    assert "appears more than once" in str(validate_dir(root / "test", workers=1).problems[0])
    assert main(["validate", str(root / "train"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"metadata: {meta}" in out and "all files valid" in out
    meta.write_text("\n".join([*lines, lines[1]]) + "\n")  # a train tile's row twice
    (problem,) = validate_dir(root / "train", workers=1).problems
    assert str(problem) == f"{meta}: id {lines[1].split(',')[0]} appears more than once; keep one row per tile"


def test_metadata_path_is_used_and_a_missing_one_is_one_line(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from data_root import data_root

    root = data_root(dataset, tmp_path / "root", ("train",))
    elsewhere = tmp_path / "meta.csv"
    (root / "metadata.csv").rename(elsewhere)
    assert main(["validate", str(root / "train"), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'train' / 'metadata.csv'}: missing; the dataset needs a metadata.csv" in out
    assert "--metadata PATH" in out
    assert main(["validate", str(root / "train"), "--workers", "1", "--metadata", str(elsewhere)]) == 0
    assert f"metadata: {elsewhere}" in capsys.readouterr().out
    assert main(["validate", str(root / "train"), "--metadata", str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.csv: --metadata file not found" in err
