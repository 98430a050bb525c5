"""The command line as users run it: real subprocesses for the entry point, the demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from geopose_ray.cli import main
from geopose_ray.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]


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


def _sweep_yaml(tmp_path: Path, cache: Path, extra: str = "") -> Path:
    y = tmp_path / "s.yaml"
    y.write_text(
        f"name: s\ncache: {cache}\nstorage_path: {tmp_path / 'runs'}\n"
        "grid: {encoders: [tu-test_resnet], lrs: [0.001, 0.01], accumulation: [1, 4]}\ntrain: {batch_size: 4}\n"
        f"rungs: [1, 2]\n{extra}"
    )
    return y


def test_sweep_screen_validates_a_config_without_ray(cache: Path, tmp_path: Path) -> None:
    """``geopose-ray sweep screen --validate-only`` and its script checks the config and never imports Ray;
    ``--smoke-test`` validates the tiny version."""
    y = _sweep_yaml(tmp_path, cache)
    r = _run("sweep", "screen", "--config", str(y), "--validate-only")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2] == "s: 4 trials (grid), rungs [1, 2], eta 3"
    assert r.stdout.splitlines()[-1].startswith("4 grid points; expected T4-hours (costed by pixels and encoder): ")
    r = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "screen.py"), "--config", str(y), "--validate-only", "--smoke-test"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2] == "s-smoke: 4 trials (grid), rungs [1, 2, 3], eta 2"
    code = (
        "import sys; from geopose_ray.cli import main; "
        f"assert main(['sweep', 'screen', '--config', {str(y)!r}, '--validate-only']) == 0; "
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'Ray was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("grid: {encoders: [resnet-34]}\n", "Wrong encoder name `resnet-34`"),
        ("eta: 1\n", "The value of `eta` is 1, but must be `eta >= 2`"),
        ("min_results: 0\n", "The value of `min_results` is 0, but must be `min_results >= 1`"),
        ("budget_gpu_hours: 0\n", "The value of `budget_gpu_hours` is 0, but must be > 0 or null"),
        ("mode: maximum\n", "The value of `mode` is 'maximum', but must be 'max' or 'min'"),
        ("grid_size: 3\n", "unknown key(s) ['grid_size'] in the sweep config"),
    ],
)
def test_sweep_screen_bad_config_is_one_line_and_exit_2(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, message: str
) -> None:
    y = _sweep_yaml(tmp_path, cache)
    y.write_text("\n".join(line for line in y.read_text().splitlines() if not line.startswith(extra.split(":")[0]))
                 + "\n" + extra)  # fmt: skip
    assert main(["sweep", "screen", "--config", str(y), "--validate-only"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("geopose-ray sweep screen: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in out + err


def test_sweep_rungs_are_checked_as_integers_then_by_the_promoter(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for rungs, message in [
        ("[1, 2.5]", "The value of `rungs` is [1, 2.5], but must be a list of integer epochs"),
        ("[0, 2]", "The value of `rungs` is [0, 2], but must be positive epochs"),
        ("[2, 2]", "The value of `rungs` is [2, 2], but must be strictly increasing"),
        ("[]", "The value of `rungs` is [], but must be positive epochs"),
    ]:
        y = _sweep_yaml(tmp_path, cache)
        y.write_text(y.read_text().replace("rungs: [1, 2]", f"rungs: {rungs}"))
        assert main(["sweep", "screen", "--config", str(y), "--validate-only"]) == 2
        assert message in capsys.readouterr().err, rungs


def test_sweep_ensemble_refuses_a_sweep_that_has_not_run(
    cache: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ensemble's checks come before Ray: a sweep with no trials.json is one line and exit 2."""
    y = _sweep_yaml(tmp_path, cache)
    argv = ["--config", str(y), "--test", str(dataset / "test"), "--members", "a, b", "--workers", "2"]
    assert main(["sweep", "ensemble", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geopose-ray sweep ensemble: error: ") and err.count("\n") == 1
    assert "no finished sweep here (trials.json missing)" in err
    with pytest.raises(SystemExit) as e:
        main(["sweep", "ensemble", *argv[:4], "--workers", "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_sweep_ensemble_passes_its_options_through(
    monkeypatch: pytest.MonkeyPatch, cache: Path, tmp_path: Path
) -> None:
    from geopose_ray.ensemble.job import EnsembleOptions
    from geopose_ray.sweep import commands

    seen: list[EnsembleOptions] = []
    monkeypatch.setattr(commands, "ensemble", lambda cfg, options: seen.append(options) or 0)
    y = _sweep_yaml(tmp_path, cache)
    argv = ["sweep", "ensemble", "--config", str(y), "--test", "t", "--members", "a, b,", "--tta", "flip",
            "--amp", "off", "--workers", "3", "--gpus-per-worker", "0.5", "--out", "o", "--truth", "tr"]  # fmt: skip
    assert main(argv) == 0
    assert seen == [EnsembleOptions("t", "o", "tr", ("a", "b"), "flip", "off", 3, 0.5)]


def test_the_version_is_printed() -> None:
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == "geopose-ray 0.1.0"
