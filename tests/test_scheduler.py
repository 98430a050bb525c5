"""The Ray Tune adapter of the dispatch policy: Tune's trials as the policy's views, and one scripted sweep whose
decisions must be the simulator's, decision for decision."""

from __future__ import annotations

import json
import math
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from geopose_ray.simulate import Curves, SweepPolicy, replay
from geopose_ray.sweep.dispatch import Dispatch, State
from geopose_ray.sweep.promoter import Decision, Promoter

# Eight screening trials, four epochs each, scripted so that the promoter pauses trials on arrival, promotes
# some later, closes its rungs at the end and stops the rest.
SCORES = np.array(
    [
        [0.40, 0.45, 0.50, 0.52],
        [0.50, 0.55, 0.60, 0.62],
        [0.20, 0.25, 0.30, 0.32],
        [0.15, 0.60, 0.70, 0.72],
        [0.10, 0.12, 0.14, 0.15],
        [0.35, 0.50, 0.66, 0.80],
        [0.40, 0.42, 0.44, 0.46],
        [0.25, 0.45, 0.55, 0.58],
    ]
)
RUNGS, ETA = (1, 2, 4), 2


class Recording(Dispatch):
    """The dispatch policy, noting every decision it makes on a result: (trial, epoch, decision)."""

    def __init__(self, promoter: Promoter, **kw: Any) -> None:
        super().__init__(promoter, **kw)
        self.log: list[tuple[str, int, str]] = []

    def on_result(self, trial: Any, value: float, gpu_hours: float, *rest: Any) -> Decision:
        decision = super().on_result(trial, value, gpu_hours, *rest)
        self.log.append((trial.key, trial.epoch, str(decision)))
        return decision


def scripted_trial(config: dict[str, Any]) -> None:
    """A Tune function trainable that reports its config's scripted scores, an epoch at a time, with a
    checkpoint, resuming from Tune's checkpoint when it is resumed."""
    from ray import tune

    cfg = config["cfg"]
    checkpoint = tune.get_checkpoint()
    start = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = int((Path(d) / "epoch").read_text())
    for epoch in range(start + 1, len(cfg["_scores"]) + 1):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "epoch").write_text(str(epoch))
            tune.report(
                {"epoch": epoch, "score": cfg["_scores"][epoch - 1]}, checkpoint=tune.Checkpoint.from_directory(d)
            )


def test_the_scheduler_and_the_simulator_make_the_same_decisions(ray_cluster: None, tmp_path: Path) -> None:
    """The same eight scripted curves, one worker, rungs 1/2/4 and η 2, through real Ray Tune with the project's
    scheduler and through the simulator: the same results reach the policy in the same order and get the same
    decisions (pauses, promotions, finalists), and the same trials end the sweep stopped."""
    import sys

    from ray import cloudpickle, tune

    from geopose_ray.cluster.scheduler import PromoterScheduler

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests
    names = [f"t{i:05d}" for i in range(len(SCORES))]
    points = [{"_trial": n, "_scores": [float(v) for v in s]} for n, s in zip(names, SCORES, strict=True)]
    scheduler = PromoterScheduler(Promoter(RUNGS, ETA, "max", 1))
    ray_side = scheduler.dispatch = Recording(scheduler.promoter)
    tuner = tune.Tuner(
        tune.with_resources(scripted_trial, {"cpu": 2}),  # the whole test cluster: one trial at a time
        param_space={"cfg": tune.grid_search(points)},
        tune_config=tune.TuneConfig(
            scheduler=scheduler, metric="score", mode="max", reuse_actors=True, time_budget_s=300
        ),
        run_config=tune.RunConfig(
            name="scripted", storage_path=str(tmp_path), verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )  # fmt: skip
    grid = tuner.fit()
    assert not grid.errors

    curves = Curves(names, np.full(len(names), 60.0), SCORES, np.full(len(names), 5), SCORES[:, -1].copy())
    policy = SweepPolicy(curves, list(range(len(names))), RUNGS, ETA, 1, lag=len(names))
    sim_side = policy.dispatch = Recording(policy.dispatch.promoter, preempt=False)
    replay(curves, 1, policy)

    assert ray_side.log == sim_side.log
    decisions = {d for _, _, d in sim_side.log}
    assert {"pause", "continue", "finalist"} <= decisions  # the script exercises every decision
    assert any(e == RUNGS[0] and d == "pause" for _, e, d in sim_side.log[:3])  # paused on arrival...
    resumed = {k for k, e, d in sim_side.log if e == RUNGS[0] + 1}
    paused_first = {k for k, e, d in sim_side.log if e == RUNGS[0] and d == "pause"}
    assert resumed & paused_first  # ...and promoted later
    assert ray_side.stopped == sim_side.stopped != set()
    assert ray_side.promoter.finalists == sim_side.promoter.finalists


def trial(name: str, status: str, hours: float | None = None, decoder: str = "Unet", epochs: int = 10) -> Any:
    """A Tune Trial of a fold run (``hours``: its finalist's, in its config) with Tune's resources, no cluster."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory
    from ray.tune.experiment import Trial

    cfg: dict[str, Any] = {"model": {"encoder": "e", "decoder": decoder}, "epochs": epochs, "val_fold": 1}
    if hours is not None:
        cfg.update(_finalist=name, _epoch_hours=hours)
    t = Trial("train_trial", config={"cfg": cfg}, trial_id=name, stub=True)
    t.placement_group_factory = PlacementGroupFactory([{"CPU": 1}])  # what Tune gives a trial it runs
    t.set_status(status)
    return t


class Controller:
    def __init__(self, *trials: Any) -> None:
        self.trials = list(trials)
        self.stopped: list[Any] = []

    def get_trials(self) -> list[Any]:
        return self.trials

    def stop_trial(self, t: Any) -> None:
        self.stopped.append(t)


def test_tune_trials_are_seen_as_views_with_their_config_cost_and_the_clusters_free_workers(
    ray_cluster: None,
) -> None:
    from ray.tune.experiment import Trial

    from geopose_ray.cluster.scheduler import free_workers, view

    a = trial("va", Trial.RUNNING, 0.01)
    a.update_last_result({"epoch": 3})
    v = view(a)
    assert (v.key, v.fold, v.state, v.epoch, v.epochs, v.cost, v.arch, v.finalist) == (
        "va/fold1", True, State.RUNNING, 3, 10, 0.01, "e/Unet", "va",
    )  # fmt: skip
    paused = view(trial("vp", Trial.PAUSED))
    assert paused.state is State.PAUSED and math.isnan(paused.cost) and not paused.fold
    assert view(trial("vc", Trial.TERMINATED)).state is State.ENDED
    # The test cluster has 2 CPUs: one running trial leaves room for one more, two for none.
    b = trial("vb", Trial.RUNNING, 0.01)
    assert free_workers([a], a) == 1 and free_workers([a, b], a) == 0


def test_the_scheduler_answers_tune_with_the_policys_decisions(ray_cluster: None) -> None:
    """Yield → PAUSE, an epoch taken up again after a restore → CONTINUE whatever the policy would say; the
    policy's pick → the trial Tune runs next."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from geopose_ray.cluster.scheduler import PromoterScheduler

    a, b = trial("sa", Trial.RUNNING, 0.01), trial("sb", Trial.RUNNING, 0.01)
    c = trial("sc", Trial.PENDING, 0.03, decoder="FPN")
    s = PromoterScheduler(Promoter(rungs=[10], eta=2), preempt_after_s=0)
    ctl = Controller(a, b, c)
    assert s.on_trial_result(ctl, a, {"epoch": 2, "replayed": 1.0}) == TrialScheduler.CONTINUE
    assert s.on_trial_result(ctl, a, {"epoch": 2}) == TrialScheduler.PAUSE
    a.set_status(Trial.PAUSED)
    assert s.choose_trial_to_run(ctl) is c
    c.set_status(Trial.RUNNING)
    b.set_status(Trial.TERMINATED)
    assert s.choose_trial_to_run(ctl) is a


def test_a_restored_scheduler_takes_its_state_from_promoter_json_and_the_drivers_config(tmp_path: Path) -> None:
    """Unpickled by Tune in a restarted driver: the policy's state is the newer promoter.json, the pre-emption
    switch the restarted driver's config; a pickle of the version that kept the state on the scheduler itself
    still loads."""
    from geopose_ray.cluster.restore import restoring_into
    from geopose_ray.cluster.scheduler import PromoterScheduler
    from geopose_ray.sweep.files import PROMOTER, SweepFiles

    s = PromoterScheduler(Promoter(rungs=[1, 2], eta=2))
    blob = pickle.dumps(s)
    newer = Dispatch(Promoter(rungs=[1, 2], eta=2))
    newer.promoter.on_result("t0", 1, 0.5)
    files = SweepFiles(home=str(tmp_path), local=tmp_path)
    files.write(PROMOTER, json.dumps({**newer.to_dict(), "resume": ["t0"]}))
    with restoring_into(files, preempt_folds=False):
        back = pickle.loads(blob)
    assert back.preempt_folds is False and back.dispatch.resume == ["t0"]
    assert back.promoter.paused == {"t0": 0}
    old = {"promoter": Promoter(rungs=[1, 2]), "preempt_folds": False, "preempt_after_s": 5.0, "_resume": ["x"],
           "_score_key": "score", "_waiting_since": {}, "_leaving": set(), "files": None}  # fmt: skip
    legacy = PromoterScheduler.__new__(PromoterScheduler)
    legacy.__setstate__(old)
    assert legacy.dispatch.resume == ["x"] and legacy.dispatch.preempt_after_s == 5.0 and not legacy.preempt_folds


@pytest.mark.parametrize("preempt", [True, False])
def test_the_simulator_runs_the_same_policy_object(preempt: bool) -> None:
    """The simulator's policy is the project's Dispatch, configured as the driver configures it."""
    curves = Curves(["a/x/1/1"], np.array([60.0]), SCORES[:1], np.array([5]), SCORES[:1, -1].copy())
    policy = SweepPolicy(curves, [0], RUNGS, ETA, 1, fold_runs=1, preempt=preempt)
    assert type(policy.dispatch) is Dispatch and policy.dispatch.preempt is preempt


def test_the_policys_state_is_written_when_it_changes_not_on_every_step(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune asks the scheduler for a trial every step of its loop (10 a second): promoter.json is rewritten when a
    result or a pick changes the policy's state, not on every question."""
    from ray.tune.experiment import Trial

    from geopose_ray.cluster.scheduler import PromoterScheduler
    from geopose_ray.sweep.files import PROMOTER, SweepFiles

    files = SweepFiles(home=str(tmp_path), local=tmp_path)
    writes: list[str] = []
    real = SweepFiles.write

    def counted(self: SweepFiles, name: str, text: str, required: bool = True) -> None:
        writes.append(name)
        real(self, name, text, required)

    monkeypatch.setattr(SweepFiles, "write", counted)
    s = PromoterScheduler(Promoter(rungs=[1, 2], eta=2), files=files)
    a, b = trial("wa", Trial.RUNNING, None), trial("wb", Trial.PENDING, None)
    ctl = Controller(a, b)
    for _ in range(5):
        assert s.choose_trial_to_run(ctl) is b
    assert writes == [PROMOTER]  # the first question wrote the state once
    s.on_trial_result(ctl, a, {"epoch": 1, "score": 0.5})  # a pauses at rung 1: the state changed
    assert writes == [PROMOTER, PROMOTER]
    assert json.loads((tmp_path / PROMOTER).read_text())["promoter"]["paused"] == {"wa": 0}
