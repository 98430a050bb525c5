"""The command line as users run it: real subprocesses for the entry point, the demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from geopose_ray.cli import main
from geopose_ray.demo import run_demo


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("geopose-ray")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_console_script_runs_synth_validate_prepare_score(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    r = _run("synth", str(data), "--tiles", "8", "--size", "64", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "8 train tiles, 4 test tiles" in r.stdout
    r = _run("validate", str(data / "train"))
    assert r.returncode == 0 and "all files valid" in r.stdout
    r = _run("prepare", str(data / "train"), "--out", str(cache), "--downsample", "4", "--folds", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "8 entries written" in r.stdout and "verified 8 entries: all sound" in r.stdout
    r = _run("prepare", str(data / "train"), "--out", str(cache), "--downsample", "4", "--folds", "2")
    assert "0 entries written, 8 already complete" in r.stdout
    r = _run("score", "--truth", str(data / "test_truth"), "--pred", str(data / "test_truth"), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["score"] == pytest.approx(1.0, abs=1e-6)  # the truth scored against itself


@pytest.mark.parametrize(
    "args",
    [
        ["prepare", "/nonexistent/dir", "--out", "/tmp/x-cache-never"],
        ["score", "--truth", "/nonexistent/t", "--pred", "/nonexistent/p"],
        ["check-submission", "/nonexistent/s", "--test", "/nonexistent/t"],
    ],
)
def test_bad_paths_give_one_line_and_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.startswith(f"geopose-ray {args[0]}: error: /nonexistent/") and err.count("\n") == 1


def test_bad_option_values_are_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["prepare", "x", "--out", "y", "--downsample", "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path: Path) -> None:
    lines: list[str] = []
    report = run_demo("t", tmp_path, tiles=12, size=64, workers=2, log=lines.append, sweep=False)
    root = tmp_path / "t"
    assert (root / "score.json").exists() and (root / "cache" / "manifest.csv").exists()
    assert sorted(p.name for p in (root / "submission-means").iterdir())[0].endswith(("_AGL.tif", "_VFLOW.json"))
    saved = json.loads((root / "score.json").read_text())
    assert saved["score"] == pytest.approx(report.score)
    # Training means are the floor: roughly zero R² on unseen tiles, never close to a real model.
    assert -1.0 < report.score < 0.3
    assert any("final score" in line for line in lines)
    # A rerun with other settings replaces the demo's own outputs instead of mixing old and new tiles.
    again = run_demo("t", tmp_path, tiles=8, size=64, seed=1, workers=1, log=lines.append, sweep=False)
    assert len(list((root / "data" / "train").glob("*_RGB.j2k"))) == 8
    assert again.score != report.score


def test_train_then_resume_then_predict(
    cache: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"cache: {cache}\nmodel:\n  encoder: tu-test_resnet\nepochs: 1\nbatch_size: 4\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1: train/total" in printed and "score" in printed
    assert main(["train", "--config", str(cfg), "--out", str(out), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming {out} after epoch 1" in printed and "epoch 2:" in printed and "epoch 1:" not in printed
    sub = tmp_path / "sub"
    assert main(["predict", str(out / "best.pt"), "--test", str(dataset / "test"), "--out", str(sub)]) == 0
    assert main(["check-submission", str(sub), "--test", str(dataset / "test")]) == 0


def test_train_with_a_typo_fails_before_training(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"cache: {cache}\nmodel:\n  encoder: resnet344\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Wrong encoder name `resnet344`, supported encoders: [resnet34," in err
    assert not (tmp_path / "run" / "last.pt").exists()
