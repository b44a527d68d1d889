"""Forgetting, retention and average incremental AP (ilmil.evaluation.forgetting) on a
hand-built 3-stage run, and their round trip through results.json."""
import json
import math

import pytest

from ilmil.evaluation import add_forgetting, finalize_run, summarize_old_new

# Per-class (AP50, AP) after each stage: a, b learned at stage 0, c at 1, d at 2.
PER_STAGE = [
    {"a": (80, 40), "b": (60, 30)},
    {"a": (50, 20), "b": (70, 35), "c": (90, 50)},
    {"a": (60, 25), "b": (40, 20), "c": (45, 30), "d": (80, 40)},
]
SCHEDULE = [([], ["a", "b"]), (["a", "b"], ["c"]), (["a", "b", "c"], ["d"])]


def _results(per_stage=PER_STAGE, schedule=SCHEDULE, first_stage=0):
    stages = []
    for k, (scores, (old, new)) in enumerate(zip(per_stage, schedule), first_stage):
        per_class = {c: {"AP": math.nan if ap is None else float(ap), "AP50": math.nan if ap50 is None else float(ap50)}
                     for c, (ap50, ap) in scores.items()}
        stages.append({"stage": k, "index": k, "old_classes": old, "new_classes": new,
                       **summarize_old_new(per_class, old, new), "train_time_s": 10.0, "eval_time_s": 1.0})
    return {"dataset": "toy", "stages_spec": "2+1+1", "method": "finetune", "seed": 0, "config": {}, "stages": stages}


def test_forgetting_is_the_drop_from_the_best_earlier_ap():
    first, second, third = add_forgetting(_results())["stages"]
    assert first["forgetting_AP50"] is None and first["forgetting_per_class"] == {}
    assert second["forgetting_per_class"] == {"a": {"AP": 20, "AP50": 30}, "b": {"AP": -5, "AP50": -10}}
    assert second["forgetting_AP50"] == pytest.approx(10)
    assert second["forgetting_AP"] == pytest.approx(7.5)
    # a: best 80 (stage 0); b: best 70 (stage 1); c: 90
    assert {c: f["AP50"] for c, f in third["forgetting_per_class"].items()} == {"a": 20, "b": 30, "c": 45}
    assert third["forgetting_AP50"] == pytest.approx(95 / 3)


def test_retention_divides_by_the_previous_stage_ap_of_the_same_classes():
    first, second, third = add_forgetting(_results())["stages"]
    assert first["retention_AP50"] is None
    assert second["AP50_old_teacher"] == pytest.approx(70)
    assert second["retention_AP50"] == pytest.approx(60 / 70)
    assert third["AP50_old_teacher"] == pytest.approx(70)  # a, b, c at stage 1
    assert third["retention_AP50"] == pytest.approx((145 / 3) / 70)
    assert third["retention_AP"] == pytest.approx((75 / 3) / (105 / 3))


def test_summary_holds_average_incremental_and_final_values():
    summary = add_forgetting(_results())["summary"]
    assert summary["num_stages"] == 3 and summary["final_stage"] == 2
    assert summary["average_incremental_AP50"] == pytest.approx((70 + 70 + 56.25) / 3)
    assert summary["average_incremental_AP"] == pytest.approx((35 + 35 + 28.75) / 3)
    assert summary["final_AP50_new"] == 80 and summary["final_AP50_old"] == pytest.approx(145 / 3)
    assert summary["final_forgetting_AP50"] == pytest.approx(95 / 3)
    assert summary["final_retention_AP50"] == pytest.approx((145 / 3) / 70)


def test_classes_without_test_objects_are_left_out():
    per_stage = [dict(PER_STAGE[0]), dict(PER_STAGE[1], b=(None, None)), PER_STAGE[2]]
    _, second, third = add_forgetting(_results(per_stage))["stages"]
    assert second["forgetting_per_class"]["b"] == {"AP": None, "AP50": None}
    assert second["forgetting_AP50"] == pytest.approx(30)  # a only
    assert second["retention_AP50"] == pytest.approx(50 / 80)  # a only, at both stages
    assert third["forgetting_per_class"]["b"]["AP50"] == pytest.approx(20)  # best is stage 0's 60


def test_a_run_started_at_a_later_stage_has_no_teacher_for_its_first_stage():
    results = _results(PER_STAGE[1:], SCHEDULE[1:], first_stage=1)
    first, second = add_forgetting(results)["stages"]
    assert first["forgetting_AP50"] is None and first["retention_AP50"] is None
    assert first["forgetting_per_class"] == {"a": {"AP": None, "AP50": None}, "b": {"AP": None, "AP50": None}}
    assert second["forgetting_per_class"]["a"]["AP50"] == pytest.approx(-10)
    assert second["retention_AP50"] == pytest.approx((145 / 3) / 70)


def test_a_selection_of_stages_measures_forgetting_from_the_stages_it_holds():
    # Stages 0 and 2 re-evaluated (--stages 0,2): a and b from stage 0, c never seen; no stage 1 to retain from.
    results = _results()
    results["stages"] = [results["stages"][0], results["stages"][2]]
    _, third = add_forgetting(results)["stages"]
    assert {c: f["AP50"] for c, f in third["forgetting_per_class"].items()} == {"a": 20, "b": 20, "c": None}
    assert third["forgetting_AP50"] == pytest.approx(20)
    assert third["retention_AP50"] is None and third["AP50_old_teacher"] is None


def test_single_stage_run_has_a_summary_without_forgetting():
    results = add_forgetting(_results(PER_STAGE[:1], SCHEDULE[:1]))
    assert results["summary"]["average_incremental_AP50"] == pytest.approx(70)
    assert results["summary"]["final_forgetting_AP50"] is None


def test_results_json_round_trip_keeps_every_existing_key(tmp_path):
    original = _results()
    original["stages"][0]["per_class"]["b"]["AP"] = math.nan  # NaN in memory is null on disk
    with open(tmp_path / "results.json", "w") as f:
        json.dump(original, f)
    finalize_run(str(tmp_path))
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    for key in ("dataset", "stages_spec", "method", "seed", "config"):
        assert saved[key] == original[key]
    for before, after in zip(original["stages"], saved["stages"]):
        assert set(before) < set(after)
        assert after["AP50"] == before["AP50"] and after["per_class"]["a"] == before["per_class"]["a"]
    assert saved["stages"][0]["per_class"]["b"]["AP"] is None
    assert saved["stages"][2]["forgetting_AP50"] == pytest.approx(95 / 3)
    assert saved["stages"][2]["forgetting_per_class"]["c"] == {"AP": 20, "AP50": 45}
    assert saved["summary"]["average_incremental_AP50"] == pytest.approx((70 + 70 + 56.25) / 3)
