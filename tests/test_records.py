"""The record model of a sweep: trial keys, stages and statuses, and trials.json as every version wrote it."""

from __future__ import annotations

import csv
import io
import json

import pytest

from geopose_ray.errors import DataError
from geopose_ray.sweep.records import (
    Stage,
    Status,
    SweepRecords,
    TrialKey,
    TrialRecord,
    is_fold_run,
    trial_key,
)
from geopose_ray.sweep.table import fold_means, rows_csv

# trials.json as the driver wrote it before the record model (json.dumps(state, indent=1) of plain dicts).
TODAY = """{
 "sweep": "t",
 "round": 1,
 "rungs": [
  1,
  2
 ],
 "finalists": [
  "c37147b8"
 ],
 "trials": {
  "c37147b8": {
   "key": "c37147b8",
   "stage": "screen",
   "cfg": {
    "model": {
     "encoder": "tu-test_resnet",
     "decoder": "Unet"
    },
    "lr": 0.003,
    "val_fold": 0
   },
   "metrics": {
    "epoch": 2,
    "score": 0.64
   },
   "checkpoint": "/runs/t-screen/c37147b8/checkpoint_000001",
   "error": null
  },
  "c37147b8/fold1": {
   "key": "c37147b8/fold1",
   "stage": "fold",
   "cfg": {
    "model": {
     "encoder": "tu-test_resnet",
     "decoder": "Unet"
    },
    "lr": 0.003,
    "val_fold": 1
   },
   "metrics": {
    "epoch": 2,
    "score": 0.6
   },
   "checkpoint": null,
   "error": "RuntimeError: CUDA error"
  }
 }
}"""


def test_a_key_names_a_screening_trial_or_a_finalists_fold_run() -> None:
    fold = TrialKey.fold_of("c37147b8", 3)
    assert fold == "c37147b8/fold3" and isinstance(fold, str)
    assert (fold.trial, fold.fold, fold.is_fold_run, fold.stage) == ("c37147b8", 3, True, Stage.FOLD)
    screen = TrialKey.parse("c37147b8")
    assert (screen.trial, screen.fold, screen.is_fold_run, screen.stage) == ("c37147b8", None, False, Stage.SCREEN)
    assert TrialKey.parse(fold) is fold and TrialKey.parse("c37147b8/fold12").fold == 12
    for text in ("a/foldx", "/fold2", "a/fold"):  # not "<trial>/fold<k>": a screening trial's name
        assert not TrialKey.parse(text).is_fold_run and TrialKey.parse(text).trial == text
    assert is_fold_run("a/fold1") and not is_fold_run("a")


def test_a_key_is_written_as_the_text_it_was_and_reads_back_the_same() -> None:
    key = TrialKey.fold_of("a", 1)
    assert json.dumps({key: key}) == '{"a/fold1": "a/fold1"}' and f"{key}" == str(key) == "a/fold1"
    assert {key: 1}["a/fold1"] == 1 and hash(key) == hash("a/fold1")
    row = next(csv.DictReader(io.StringIO(rows_csv([{"trial": key, "stage": Stage.FOLD, "status": Status.DONE}]))))
    assert (row["trial"], row["stage"], row["status"]) == ("a/fold1", "fold", "done")
    assert TrialKey.parse(row["trial"]) == key and TrialKey.parse(row["trial"]).fold == 1


def test_trial_key_names_fold_runs_and_continued_trials_and_strips_private_keys() -> None:
    key, cfg = trial_key("x1", {"lr": 0.1, "val_fold": 2, "_finalist": "a", "_threads": 1})
    assert key == "a/fold2" and key.fold == 2 and cfg == {"lr": 0.1, "val_fold": 2}
    key, _ = trial_key("x2", {"_trial": "a", "_resume_from": "/c"})
    assert key == "a" and not key.is_fold_run
    assert trial_key("x3", {})[0] == "x3"


def test_statuses_and_stages_are_the_words_the_files_hold() -> None:
    assert [str(s) for s in Status] == ["running", "promoted", "paused", "finalist", "stopped", "done", "errored"]
    assert [str(s) for s in Stage] == ["screen", "fold"]
    assert Status("paused") == "paused" and f"{Status.FINALIST}" == "finalist"


def test_fold_means_pair_fold_runs_with_their_trial_by_key() -> None:
    rows = [
        {"trial": "a", "stage": "screen", "epoch": 2, "score": 0.5},
        {"trial": "a/fold1", "stage": "fold", "epoch": 2, "score": 0.7},
        {"trial": "a/fold2", "stage": "fold", "epoch": 1, "score": 0.1},  # not as far: left out
        {"trial": "a/foldx", "stage": "screen", "epoch": 2, "score": 0.9},  # a name, not a fold run of a
    ]
    by = {r["trial"]: r for r in fold_means(rows)}
    assert by["a"]["cv_score"] == pytest.approx(0.6) and by["a"]["cv_folds"] == 2
    assert by["a/foldx"]["cv_folds"] == 1 and by["a/fold1"]["cv_score"] == ""


def test_trials_json_in_todays_format_loads_typed_and_is_written_back_the_same() -> None:
    records = SweepRecords.from_json(TODAY, "runs/t/trials.json")
    assert (records.sweep, records.round, records.rungs, records.finalists) == ("t", 1, [1, 2], ["c37147b8"])
    fold = records.trials["c37147b8/fold1"]
    assert isinstance(fold.key, TrialKey) and fold.key.trial == "c37147b8" and fold.key.fold == 1
    assert fold.stage is Stage.FOLD and fold.checkpoint is None and fold.error == "RuntimeError: CUDA error"
    screen = records.trials["c37147b8"]
    assert screen.stage is Stage.SCREEN and screen.metrics == {"epoch": 2, "score": 0.64}
    assert screen.cfg["model"]["encoder"] == "tu-test_resnet"
    assert records.to_json() == TODAY


def test_trials_json_without_round_or_rungs_loads() -> None:
    trial = {"key": "a", "stage": "screen", "cfg": {}, "metrics": {}, "checkpoint": "/c", "error": None}
    records = SweepRecords.from_json(json.dumps({"sweep": "s", "finalists": [], "trials": {"a": trial}}), "x")
    assert records.round == 0 and records.rungs == [] and records.trials["a"].checkpoint == "/c"


def test_records_round_trip() -> None:
    key = TrialKey.fold_of("b", 2)
    records = SweepRecords("s", 2, [1, 3], ["b"], {key: TrialRecord(key, Stage.FOLD, {"val_fold": 2}, {}, None)})
    again = SweepRecords.from_json(records.to_json(), "x")
    assert again == records and json.loads(again.to_json())["trials"]["b/fold2"]["stage"] == "fold"


def _with(**over: object) -> str:
    d = json.loads(TODAY)
    for path, value in over.items():
        *parents, last = path.split("__")
        node = d
        for p in parents:
            node = node[p.replace("_fold", "/fold")]
        node[last] = value
    return json.dumps(d)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"Expecting property name"),
        ("[]", r"a JSON object expected, found list"),
        (json.dumps({"sweep": "s", "finalists": []}), r"no `trials`"),
        (_with(finalists="c37147b8"), r"`finalists` must be a list"),
        (_with(trials__c37147b8__stage="screening"), r"trial 'c37147b8': stage 'screening' is none of"),
        (_with(trials__c37147b8__cfg=[]), r"trial 'c37147b8': `cfg` must be a dict, not list"),
        (_with(trials__c37147b8_fold1__checkpoint=3), r"trial 'c37147b8/fold1': `checkpoint` must be text or null"),
        (_with(trials__c37147b8__key="other"), r"trial 'c37147b8' is recorded under key 'other'"),
        (_with(rungs=["1"]), r"`rungs` must be a list of epochs"),
    ],
)
def test_a_malformed_trials_json_is_one_clear_error_naming_the_file_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as e:
        SweepRecords.from_json(text, "s3://***@bucket/sweeps/t/trials.json")
    text = str(e.value)
    assert text.startswith("s3://***@bucket/sweeps/t/trials.json: not a sweep's trial records (")
    assert text.endswith("rerun the sweep with --resume to write it again") and "\n" not in text
