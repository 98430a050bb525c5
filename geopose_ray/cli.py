"""The ``geopose-ray`` command line. Thin: parse arguments, call the library, print, set the exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from geopose_ray.errors import DataError, GeoposeError

T = TypeVar("T")

# One meaning of --workers everywhere: how many run in parallel, processes here or Ray tasks on a cluster.
WORKERS_HELP = (
    "parallel workers (processes, or Ray tasks for cluster commands; default: one per core / the cluster's CPUs "
    "or GPUs)"
)


METADATA_HELP = (
    "the metadata.csv (id, city, gsd; ids full stems or bare ids); default the one beside the tiles, else the one "
    "at the data root above them, as the competition ships it"
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _cmd_validate(args: argparse.Namespace) -> int:
    from geopose_ray.data.validate import validate_dir

    report = validate_dir(args.dir, split=args.split, workers=args.workers, metadata=args.metadata)
    if report.metadata is not None and report.metadata.parent.resolve() != report.directory.resolve():
        print(f"metadata: {report.metadata}")  # the data root's, or --metadata
    for p in report.problems:
        print(p)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_prepare(args: argparse.Namespace) -> int:
    from geopose_ray.data.cache import TrainingCache, prepare_cache

    result = prepare_cache(
        args.dir, args.out, args.downsample, args.folds, args.seed, args.workers,
        metadata=args.metadata, groups=args.groups, on_estimate=lambda e: print(f"prepare: {e.describe()}", flush=True),
    )  # fmt: skip
    for e in result.errors:
        print(e)
    print(f"{result.cache}: {result.written} entries written, {result.skipped} already complete")
    if result.errors:
        print(f"{len(result.errors)} tile(s) failed; fix them (geopose-ray validate) and rerun to complete the cache")
        return 1
    problems = TrainingCache(args.out).verify()
    for p in problems:
        print(p)
    print(f"verified {len(TrainingCache(args.out))} entries: {'all sound' if not problems else 'PROBLEMS above'}")
    return 0 if not problems else 1


def _cmd_synth(args: argparse.Namespace) -> int:
    from geopose_ray.data.synth import synthesize

    out = synthesize(args.out, args.tiles, args.size, args.seed, args.test_tiles, args.rgb_ext, args.workers)
    print(f"{args.out}: {len(out['train'])} train tiles, {len(out['test'])} test tiles of {args.size}px")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from geopose_ray.metrics import format_report
    from geopose_ray.scoring import score_dirs

    report = score_dirs(args.truth, args.pred, workers=args.workers)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from geopose_ray.data.submission import check_submission

    problems = check_submission(args.dir, args.test)
    for p in problems:
        print(p)
    print(f"{args.dir}: {'complete and well formed' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from geopose_ray.demo import run_demo

    run_demo(
        args.name, args.runs_dir, args.tiles, args.size, args.downsample, args.seed, args.workers,
        sweep=not args.no_sweep,
    )  # fmt: skip
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from geopose_ray.data.cache import TrainingCache
    from geopose_ray.engine import TrainConfig, Trainer
    from geopose_ray.engine.retry import fit_with_retries
    from geopose_ray.models import validate_model_config

    cfg = TrainConfig.from_yaml(args.config)
    if args.epochs is not None:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "epochs": args.epochs})
    cfg.validate()
    tile = TrainingCache(cfg.cache).tile_size
    notes: list[str] = []
    for size, batch in sorted({(st.cfg.crop or tile, st.cfg.batch_size) for st in cfg.plan()} | {(tile, 1)}):
        notes += [n for n in validate_model_config(cfg.model, size, max(batch, 2)) if n not in notes]
    for note in notes:
        print(f"note: {note}")

    def report(m: dict[str, float], ckpt: object) -> None:
        shown = {k: m[k] for k in ("train/total", "val/total", "score", "agl_r2", "flow_r2", "images_per_s") if k in m}
        print(f"epoch {int(m['epoch'])}: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()), flush=True)

    if os.path.exists(os.path.join(args.out, "last.pt")):
        from geopose_ray.engine.checkpoint import load_checkpoint

        done = int(load_checkpoint(os.path.join(args.out, "last.pt"), mmap=True)["epoch"])
        print(f"resuming {args.out} after epoch {done}")
    trainer: Trainer = fit_with_retries(cfg, args.out, on_epoch=report)
    kept = ", ".join(str(p) for p in trainer.top_checkpoints()[1:])
    print(
        f"checkpoints: {args.out}/last.pt, {args.out}/best.pt (best validation score {trainer.best_score:.4f})"
        + (f"; top {cfg.top_k}: {kept}" if kept else "")
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from geopose_ray.engine.predict import predict_dir
    from geopose_ray.errors import ConfigError

    if args.window is not None and (args.window % 32 or args.overlap % 32 or args.overlap >= args.window):
        raise ConfigError(
            f"--window {args.window} --overlap {args.overlap}: both must be multiples of 32 with overlap < window"
        )
    n = predict_dir(
        args.checkpoint, args.test, args.out, tta=args.tta, batch_size=args.batch_size, metadata=args.metadata,
        window=args.window, overlap=args.overlap, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"{args.out}: {n} tiles predicted (tta: {args.tta}); complete and well formed")
    return 0


def _read_sweep_mlflow(args: argparse.Namespace, read: Callable[[Any], T]) -> tuple[Any, Any, T]:
    """The sweep config of ``--config``, its tracker (``--tracking-uri`` overriding), and what ``read`` takes from
    it; an unreachable tracking server or database is one line."""
    from geopose_ray.sweep.config import SweepConfig
    from geopose_ray.tracking import Tracker

    cfg = SweepConfig.from_yaml(args.config)
    tracker = Tracker.for_sweep(cfg, args.tracking_uri)
    try:
        return cfg, tracker, read(tracker)
    except Exception as e:  # the tracking server or database is unreachable
        raise GeoposeError(f"cannot read MLflow at {tracker.uri} ({type(e).__name__}: {e})") from e


def _cmd_results(args: argparse.Namespace) -> int:
    from geopose_ray.sweep.table import format_results
    from geopose_ray.tracking import results_table

    cfg, tracker, rows = _read_sweep_mlflow(args, results_table)
    print(format_results(rows) if rows else f"{cfg.name}: no trials recorded yet at {tracker.uri}")
    return 0


def _cmd_sweep_screen(args: argparse.Namespace) -> int:
    from geopose_ray.sweep.commands import screen
    from geopose_ray.sweep.config import config_from_args

    return screen(
        config_from_args(args), smoke_test=args.smoke_test, validate_only=args.validate_only, resume=args.resume
    )


def _cmd_sweep_promote(args: argparse.Namespace) -> int:
    from geopose_ray.sweep.commands import promote
    from geopose_ray.sweep.config import config_from_args

    return promote(config_from_args(args), budget_gpu_hours=args.budget, add_rung=args.add_rung)


def _cmd_sweep_ensemble(args: argparse.Namespace) -> int:
    from geopose_ray.ensemble.job import EnsembleOptions
    from geopose_ray.sweep.commands import ensemble
    from geopose_ray.sweep.config import config_from_args

    members = tuple(n.strip() for n in args.members.split(",") if n.strip()) if args.members else None
    options = EnsembleOptions(
        args.test, args.out, args.truth, members, args.tta, args.amp, args.workers, args.gpus_per_worker,
        metadata=args.metadata,
    )  # fmt: skip
    return ensemble(config_from_args(args), options)


SCREEN_USAGE = """\
ray job submit --working-dir . -- python sweeps/screen.py --config sweeps/configs/demo.yaml \\
    --cache "$PWD/runs/demo/cache" --storage "$PWD/runs/demo/sweeps"   # a job needs absolute paths
geopose-ray sweep screen --config sweeps/configs/screen-t4.yaml --smoke-test   # a tiny version, locally
"""

PROMOTE_USAGE = """\
ray job submit --working-dir . -- python sweeps/promote.py --config launch/sweeps/screen-t4-cloud.yaml --budget 400
geopose-ray sweep promote --config sweeps/configs/demo.yaml --add-rung 16

Paused trials that qualify under the larger budget are promoted; with a new rung, the best 1/η of the old top
rung go on to it. Every trial continues from its last checkpoint (no epoch is trained again) in its own MLflow
run; the new finalists get their fold runs, and existing fold runs continue to the new top rung.
"""

ENSEMBLE_USAGE = """\
ray job submit --working-dir . -- python sweeps/ensemble.py --config launch/sweeps/screen-t4-cloud.yaml \\
    --test /data/geopose/test --out /home/ray/submission   # a job needs absolute paths
geopose-ray sweep ensemble --config sweeps/configs/demo.yaml --test runs/demo/data/test \\
    --truth runs/demo/data/test_truth
"""


def _add_sweep(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``geopose-ray sweep screen|promote|ensemble``: the sweep's commands on Ray (``sweeps/*.py`` run these)."""
    from geopose_ray.sweep.config import add_config_args

    about = "the sweep on Ray: screen a grid, reopen a finished sweep, ensemble its finalists"
    sweep = sub.add_parser("sweep", help=about, description=about).add_subparsers(dest="sweep_command", required=True)

    def add(name: str, help: str, usage: str) -> argparse.ArgumentParser:
        return sweep.add_parser(
            name, help=help, description=help, epilog=usage, formatter_class=argparse.RawDescriptionHelpFormatter
        )

    p = add(
        "screen", "screen a grid with the promoter on Ray Tune, then train the finalists on every fold", SCREEN_USAGE
    )
    add_config_args(p)
    p.add_argument("--smoke-test", action="store_true", help="a tiny version of the sweep")
    p.add_argument("--validate-only", action="store_true", help="check the config and exit")
    p.add_argument("--resume", action="store_true", help="continue a sweep whose driver stopped")
    p.set_defaults(fn=_cmd_sweep_screen)

    p = add("promote", "reopen a finished sweep: raise its GPU-hour budget, add a rung, or both", PROMOTE_USAGE)
    add_config_args(p, "the sweep's YAML, as it was run (sweeps/configs/)")
    p.add_argument("--budget", type=float, default=None, help="the new GPU-hour budget (above what is spent)")
    p.add_argument("--add-rung", type=int, default=None, help="a new top rung, in epochs")
    p.set_defaults(fn=_cmd_sweep_promote)

    p = add("ensemble", "the ensemble of a sweep's finalists -> submission dir, .tar.gz, score", ENSEMBLE_USAGE)
    add_config_args(p, "the sweep's YAML, as it was run")
    p.add_argument("--test", required=True, help="the test tiles (challenge layout)")
    p.add_argument("--truth", default=None, help="the test truth, if known: the submission is scored")
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default <storage>/<name>/ensemble; runs/<name>/ensemble for a bucket)",
    )
    p.add_argument("--members", default=None, help="comma-separated screening trial ids (default every finalist)")
    p.add_argument("--tta", default="none", choices=["none", "flip", "d4"], help="test-time augmentation")
    p.add_argument("--amp", default="auto", choices=["auto", "off"], help="bf16/fp16 inference where supported")
    p.add_argument("--workers", type=_positive_int, default=None, help=WORKERS_HELP + "; here Ray inference tasks")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs per Ray task (out of fold and inference; fractions share)",
    )
    p.add_argument("--metadata", default=None, metavar="PATH", help=METADATA_HELP)
    p.set_defaults(fn=_cmd_sweep_ensemble)


def _rungs(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of epochs, e.g. 20,60,200") from None


def _cmd_simulate(args: argparse.Namespace) -> int:
    from geopose_ray.simulate import format_table, simulate

    if args.curves is not None:
        from geopose_ray.simulate.recorded import format_replay, read_curves, replay_table

        curves = read_curves(args.curves, args.mode)
        rungs = None if args.rungs_given is None else list(args.rungs_given)
        replayed = replay_table(curves, args.workers, args.seeds, rungs, args.eta, args.min_results, args.tolerance)
        print(json.dumps(replayed, indent=1) if args.json else format_replay(replayed))
        return 0
    args.rungs = args.rungs_given or (20, 60, 200)
    result = simulate(
        args.trials, args.workers, args.seeds, args.budget, args.rungs, args.eta, args.min_results, args.first_seed,
        **({} if args.persistent_noise is None else {"persistent": args.persistent_noise}),
    )  # fmt: skip
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import yaml

    from geopose_ray.fsutil import atomic_write_text
    from geopose_ray.simulate.plan import format_plan, plan
    from geopose_ray.sweep.config import SweepConfig

    cfg = SweepConfig.from_yaml(args.config)
    out = Path(args.out) if args.out else Path(args.config).with_name(f"{Path(args.config).stem}-planned.yaml")
    if out.exists():
        raise DataError(f"{out}: exists; give another --out (plan does not overwrite files)")
    trials = args.trials or cfg.n_trials
    print(f"{cfg.name}: planning {trials} configurations (the simulator's population of that size) ...", flush=True)
    chosen = (cfg.fold_runs or {}).get("folds")
    folds = len(chosen) + 1 if chosen else args.folds  # the fold runs' folds and the screening one
    measured = plan(trials, args.workers, args.budget, args.seeds, int(cfg.rungs[-1]), folds)
    print(format_plan(measured, args.budget, args.workers))
    best = measured[0].candidate
    raw = yaml.safe_load(Path(args.config).read_text())
    folds = {**(raw.get("fold_runs") or {}), "top_k": best.top_k}
    raw.update(rungs=list(best.rungs), eta=best.eta, search=best.search, fold_runs=folds,
               budget_gpu_hours=round(measured[0].screen_budget, 1))  # fmt: skip
    head = (
        f"# Planned by `geopose-ray plan --budget {args.budget:g} --workers {args.workers}` from {args.config}: "
        f"simulated, {measured[0].within:.0%} of seeds pick within 0.002 of the best after the fold runs,\n"
        f"# median {measured[0].gpu_hours:,.0f} GPU-hours and {measured[0].wall_h:,.0f} h wall-clock in all; "
        "budget_gpu_hours is screening's share.\n"
    )
    atomic_write_text(out, head + yaml.safe_dump(raw, sort_keys=False))
    print(f"written: {out}")
    return 0


def _cmd_curves_export(args: argparse.Namespace) -> int:
    from geopose_ray.simulate.recorded import write_curves
    from geopose_ray.tracking import sweep_curves

    cfg, tracker, (curves, params) = _read_sweep_mlflow(args, sweep_curves)
    if not curves:
        raise DataError(f"{cfg.name}: no screening trial has reported at {tracker.uri}; run the sweep first")
    rows = write_curves(Path(args.out), curves, params)
    print(f"{args.out}: {len(curves)} trials, {rows} epochs")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geopose-ray")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geopose-ray", description=__doc__)
    parser.add_argument("--version", action="version", version=f"geopose-ray {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--workers", type=_positive_int, default=None, help=WORKERS_HELP)
        return p

    p = add("validate", "check every file of a dataset directory; exit 0 if clean, 1 if not")
    p.add_argument("dir")
    p.add_argument("--split", choices=["auto", "train", "test", "truth"], default="auto")
    p.add_argument("--metadata", default=None, metavar="PATH", help=METADATA_HELP)
    p.set_defaults(fn=_cmd_validate)

    p = add("prepare", "decode a labelled dataset once into a memory-mappable training cache")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--downsample", type=_positive_int, default=2, help="integer factor (default 2: 2048 -> 1024)")
    p.add_argument("--folds", type=int, default=5, help="city-stratified folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    p.add_argument("--metadata", default=None, metavar="PATH", help=METADATA_HELP)
    p.add_argument(
        "--groups", default=None, metavar="FILE",
        help="CSV with columns id,group (ids: stems or bare ids): tiles of one group share a fold; tiles not in "
        "it are their own group",
    )  # fmt: skip
    p.set_defaults(fn=_cmd_prepare)

    p = add("synth", "write a synthetic dataset in the challenge layout (train/, test/, test_truth/)")
    p.add_argument("out")
    p.add_argument("--tiles", type=_positive_int, default=48, help="training tiles")
    p.add_argument("--test-tiles", type=_positive_int, default=None, help="test tiles (default tiles/4, >= 4)")
    p.add_argument("--size", type=int, default=256, help="tile side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rgb-ext", choices=[".j2k", ".tif"], default=".j2k")
    p.set_defaults(fn=_cmd_synth)

    p = add("score", "the challenge score of a prediction directory against the truth")
    p.add_argument("--truth", required=True)
    p.add_argument("--pred", required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(fn=_cmd_score)

    p = add("check-submission", "check that a submission directory is complete and well formed")
    p.add_argument("dir")
    p.add_argument("--test", required=True, help="the test image directory")
    p.set_defaults(fn=_cmd_check)

    p = add("train", "train one configuration outside Ray (resumes from OUT/last.pt if present)")
    p.add_argument("--config", required=True, help="a training YAML (see sweeps/configs/train-demo.yaml)")
    p.add_argument("--out", default="runs/train", help="checkpoint directory (default runs/train)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="override the config's epochs")
    p.set_defaults(fn=_cmd_train)

    p = add("predict", "predict test tiles with a checkpoint into a submission directory")
    p.add_argument("checkpoint")
    p.add_argument("--test", required=True, help="the test image directory")
    p.add_argument("--out", required=True, help="submission directory to write")
    p.add_argument("--tta", choices=["none", "flip", "d4"], default="none", help="test-time augmentation")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--metadata", default=None, metavar="PATH", help=METADATA_HELP)
    p.add_argument(
        "--window",
        type=_positive_int,
        default=None,
        metavar="PX",
        help="predict in overlapping windows of this side (default one pass; windows on out of memory)",
    )
    p.add_argument("--overlap", type=int, default=128, metavar="PX", help="the windows' overlap (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace prediction files already in --out")
    p.set_defaults(fn=_cmd_predict)

    p = add("results", "print a sweep's results table, as the MLflow run table holds it")
    p.add_argument("--config", required=True, help="the sweep's YAML")
    p.add_argument("--tracking-uri", default=None, help="override the config's MLflow tracking URI")
    p.set_defaults(fn=_cmd_results)

    p = add("demo", "run the embedded default end to end under runs/<name>/")
    p.add_argument("--name", default="demo")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--tiles", type=_positive_int, default=48)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--downsample", type=_positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sweep", action="store_true", help="stop after scoring the trivial predictor")
    p.set_defaults(fn=_cmd_demo)

    _add_sweep(sub)

    about = "replay a sweep on simulated T4 workers: promoter vs full grid, Ray's ASHA and random search"
    p = sub.add_parser("simulate", help=about, description=about)
    p.add_argument("--trials", type=_positive_int, default=240, help="configurations (240: the seed's grid)")
    p.add_argument("--workers", type=_positive_int, default=16, help="simulated GPU workers (default 16)")
    p.add_argument("--seeds", type=_positive_int, default=50, help="populations to draw (default 50)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument(
        "--budget", type=float, default=None,
        help="GPU-hours: the promoter's budget, random search's, and B for 'regret at B' (default: no promoter "
        "budget; B = what the promoter spent)",
    )  # fmt: skip
    p.add_argument(
        "--rungs", type=_rungs, default=None, dest="rungs_given",
        help="epochs, comma-separated (default 20,60,200; with --curves: last/η², last/η and the table's last epoch)",
    )  # fmt: skip
    p.add_argument(
        "--curves", default=None, metavar="CSV",
        help="replay a table of real learning curves (trial,epoch,score,hours[,param.<name>...]) instead of drawing "
        "them: `geopose-ray curves export` writes one from a finished sweep",
    )  # fmt: skip
    p.add_argument("--mode", choices=["max", "min"], default="max", help="with --curves: is a higher score better")
    p.add_argument("--tolerance", type=float, default=0.002, help="with --curves: 'within' this of the best")
    p.add_argument("--eta", type=int, default=3, help="reduction factor (default 3)")
    p.add_argument("--min-results", type=int, default=9, help="promoter's min_results (default 9, as screen-t4)")
    p.add_argument(
        "--persistent-noise", type=float, default=None, metavar="SHARE",
        help="share of a fold score's noise variance that is the run's own, the same every epoch (the rest "
        "averages out over the last epochs); 0 to 1 (default: the simulator's, PERSISTENT in simulate/curves.py)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(fn=_cmd_simulate)

    about = "search the sweep's knobs (rungs, eta, fold_runs.top_k, search) on the simulator for a budget"
    p = sub.add_parser("plan", help=about, description=about)
    p.add_argument("--config", required=True, help="a sweep YAML; its grid's size is simulated")
    p.add_argument("--budget", type=float, required=True, help="GPU-hours for the whole sweep, fold runs included")
    p.add_argument("--workers", type=_positive_int, default=16, help="GPU workers (default 16)")
    p.add_argument("--seeds", type=_positive_int, default=10, help="populations per candidate (default 10)")
    p.add_argument(
        "--folds", type=_positive_int, default=5,
        help="folds of the cache (default 5; the config's fold_runs.folds and val_fold when it names them)",
    )  # fmt: skip
    p.add_argument("--trials", type=_positive_int, default=None, help="configurations (default: the grid's size)")
    p.add_argument("--out", default=None, help="the planned config (default <config>-planned.yaml; not overwritten)")
    p.set_defaults(fn=_cmd_plan)

    about = "learning curves of a finished sweep, for planning the next one"
    curves = sub.add_parser("curves", help=about, description=about).add_subparsers(
        dest="curves_command", required=True
    )
    p = curves.add_parser("export", help="write a sweep's screening curves from MLflow as a CSV for simulate --curves")
    p.add_argument("--config", required=True, help="the sweep's YAML")
    p.add_argument("--out", required=True, help="the CSV to write (never overwritten)")
    p.add_argument("--tracking-uri", default=None, help="override the config's MLflow tracking URI")
    p.set_defaults(fn=_cmd_curves_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: project errors become one line on stderr, ``geopose-ray <command>: error: ...``, and exit code
    2, never a traceback; an interrupt exits 130."""
    args = build_parser().parse_args(argv)
    command = " ".join(c for c in (args.command, getattr(args, "sweep_command", None)) if c)
    try:
        code: int = args.fn(args)
        return code
    except GeoposeError as e:
        print(f"geopose-ray {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"geopose-ray {command}: interrupted; rerun to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
