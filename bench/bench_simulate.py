"""The sweep simulator at the seed's scale and at 1,000 trials on 64 workers: the tables and the plot of
docs/benchmarks/sweep-policies.md.

Each scale runs every policy on ``--seeds`` populations (``geopose_ray.simulate``); the table is the same one
``geopose-ray simulate`` prints. The plot shows, per policy, the mean regret of the pick and the share of seeds
within 0.002 of the best, as GPU-hours are spent (as % of the full grid's GPU-hours on the same seed).

    .venv/bin/python bench/bench_simulate.py [--seeds 200] [--fold-seeds 50] [--rungs 20,40,100,200]
        [--persistent 0.5] [--plot PNG] [--json out.json]

``--persistent`` is the share of a fold score's noise variance that is the run's own (curves.py);
docs/benchmarks/sweep-targets.md gives the targets at 0, 0.5 and 1 (``--fold-seeds 0`` skips the fold table,
``--plot ''`` the plot).

Rungs, η and min_results are screen-t4.yaml's unless --rungs says otherwise.

200 seeds put a rate's 95 % interval within about ±5 points (50 seeds: ±10), which is what telling 82 % from
90 % needs; the fold-pipeline table, slower to replay, uses 50.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from geopose_ray.simulate import format_table, simulate
from geopose_ray.simulate.curves import PERSISTENT
from geopose_ray.simulate.measure import POLICIES, TOLERANCE, fold_pipeline, format_spread

FOLDS_HEAD = (
    "| then 5 folds per finalist | utilisation while screening % | screening h | whole pipeline h | pipeline "
    "utilisation % | fold-run GPU-hours | GPU-hours to within 0.002, 5-fold pick (% of grid) | mean regret, "
    "screening pick | mean regret, 5-fold pick |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)
FOLDS_COLS = [
    ("screen_utilisation", 100, ".1f"),
    ("screen_h", 1, ".0f"),
    ("pipeline_h", 1, ".0f"),
    ("pipeline_utilisation", 100, ".1f"),
    ("fold_gpu_hours", 1, ".0f"),
    ("fold_pick_share_to_near", 100, ".1f"),
]
SCREEN_T4 = yaml.safe_load((Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "screen-t4.yaml").read_text())
SCALES = {"seed's scale: 240 trials, 16 workers": (240, 16), "1,000 trials, 64 workers": (1000, 64)}


def anytime(outcomes: list[dict[str, Any]], policy: str, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean regret over seeds (NaN until every seed has a pick) and the share of seeds whose pick has come within
    the tolerance, at GPU-hours = xs × the grid's GPU-hours of each seed."""
    ended = np.full((len(outcomes), len(xs)), math.inf)  # inf: no pick yet
    for i, o in enumerate(outcomes):
        grid = o["grid"]["gpu_hours"]
        for spent, regret in o[policy]["anytime"]:  # after the policy ends, its last pick stands
            ended[i, xs * grid >= spent * (1 - 1e-12)] = regret
    mean = np.where(np.isinf(ended).any(axis=0), np.nan, ended.mean(axis=0))
    near = np.maximum.accumulate(ended <= TOLERANCE + 1e-12, axis=1).mean(axis=0)  # has come within, as the table
    return mean, near


def plot(results: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.logspace(-2, 0, 4001)
    fig, axes = plt.subplots(2, len(results), figsize=(6.2 * len(results), 7.5), sharex=True, squeeze=False)
    palette = ["#555555", "#d62728", "#9467bd", "#1f77b4", "#17becf", "#2ca02c"]
    colours = dict(zip(POLICIES, palette, strict=True))
    for col, (title, result) in enumerate(results.items()):
        top, bottom = axes[0, col], axes[1, col]
        for name in POLICIES:
            mean, near = anytime(result["outcomes"], name, xs)
            top.plot(xs * 100, mean, color=colours[name], label=name, lw=1.8)
            bottom.plot(xs * 100, near * 100, color=colours[name], label=name, lw=1.8)
            p = result["policies"][name]
            top.plot(p["grid_share"]["median"] * 100, p["regret"]["mean"], "o", color=colours[name], ms=6)
        for ax in (top, bottom):
            ax.axvline(20, color="grey", ls=":", lw=0.9)
            ax.set_xscale("log")
            ax.set_xlim(2, 100)
            ax.grid(alpha=0.3)
        top.set_title(f"{title} ({result['config']['seeds']} seeds, rungs {result['config']['rungs']})")
        top.set_ylim(bottom=0)
        bottom.set_xlabel("GPU-hours spent, % of the full grid's (log)")
        bottom.set_ylim(0, 102)
    axes[0, 0].set_ylabel("mean regret of the pick (true score)")
    axes[1, 0].set_ylabel(f"% of seeds whose pick has come\nwithin {TOLERANCE} of the best")
    axes[0, 0].legend(fontsize=8, title="dot: where the policy ends", title_fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--fold-seeds", type=int, default=50, help="seeds for the fold-pipeline table")
    ap.add_argument(
        "--rungs", default=",".join(map(str, SCREEN_T4["rungs"])), help="epochs (default: screen-t4.yaml's rungs)"
    )
    ap.add_argument("--persistent", type=float, default=PERSISTENT, help="noise variance share the same every epoch")
    ap.add_argument("--plot", default="bench/simulate.png", help="PNG path ('' for none)")
    ap.add_argument("--json", type=Path, default=None, help="also write every measure here")
    args = ap.parse_args()
    rungs = tuple(int(r) for r in args.rungs.split(","))
    eta, min_results = int(SCREEN_T4["eta"]), int(SCREEN_T4["min_results"])
    results = {}
    for title, (trials, workers) in SCALES.items():
        t = time.perf_counter()
        results[title] = simulate(
            trials, workers, args.seeds, rungs=rungs, eta=eta, min_results=min_results, keep_outcomes=True,
            persistent=args.persistent,
        )  # fmt: skip
        print(f"### {title}: {time.perf_counter() - t:.1f} s for {args.seeds} seeds\n")
        print(format_table(results[title]) + "\n")
        if args.fold_seeds < 1:
            continue
        folds = fold_pipeline(
            trials, workers, args.fold_seeds, rungs=rungs, eta=eta, min_results=min_results,
            persistent=args.persistent,
        )  # fmt: skip
        print(FOLDS_HEAD)
        for name, f in folds.items():
            cells = [format_spread(f[k], fmt, s) for k, s, fmt in FOLDS_COLS]
            cells += [f"{f['regret']['mean']:.4f}", f"{f['fold_pick_regret']['mean']:.4f}"]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()
        results[title]["fold_pipeline"] = folds
    if args.plot:
        plot(results, Path(args.plot))
        print(f"plot: {args.plot}")
    if args.json:
        slim = {k: {kk: vv for kk, vv in v.items() if kk != "outcomes"} for k, v in results.items()}
        args.json.write_text(json.dumps(slim, indent=2))


if __name__ == "__main__":
    main()
