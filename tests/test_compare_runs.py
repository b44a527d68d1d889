"""tools/compare_runs.py: two runs from one teacher, side by side."""
import json
import os

import pytest

from tool_runs import run_tool
from ilmil.evaluation import add_forgetting
from ilmil.evaluation.comparison import retention_sentence

TEACHER = {"a": 80.0, "b": 60.0}  # AP50 of the stage-0 model on its two classes: mean 70


def _run_dir(root, method, old_ap50, new_ap50, teacher=TEACHER, finished=True):
    """A 2+1 run folder whose stage 0 is the shared teacher; not ``finished``: its results.json
    as the runner writes it after each stage, before the run's forgetting keys."""
    def entry(stage, old, new, per_class):
        values = list(per_class.values())
        return {"stage": stage, "old_classes": old, "new_classes": new,
                "per_class": {c: {"AP50": v, "AP": v / 2} for c, v in per_class.items()},
                "AP50": sum(values) / len(values),
                "AP50_old": sum(per_class[c] for c in old) / len(old) if old else None,
                "AP50_new": sum(per_class[c] for c in new) / len(new)}

    results = {"method": method, "dataset": "shapes", "stages_spec": "2+1", "seed": 0, "stages": [
        entry(0, [], ["a", "b"], teacher),
        entry(1, ["a", "b"], ["c"], {"a": old_ap50[0], "b": old_ap50[1], "c": new_ap50}),
    ]}
    folder = root / method
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(add_forgetting(results) if finished else results))
    return folder


def _table_rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.parametrize("finished", [True, False])
def test_table_sentence_plot_and_report(tmp_path, tiny_datasets_root, finished):
    finetune = _run_dir(tmp_path, "finetune", (4.0, 3.0), 90.0, finished=finished)  # old mean 3.5 = 5 % of 70
    ilmil = _run_dir(tmp_path, "ilmil", (76.0, 57.0), 70.0, finished=finished)  # old mean 66.5 = 95 % of 70
    out = tmp_path / "compare"
    # A run given by its results.json is the run of that folder: its label and its report's link.
    proc = run_tool("compare_runs.py", [str(finetune), str(ilmil / "results.json"), "--out", str(out)],
                    tiny_datasets_root)
    assert proc.returncode == 0, proc.log
    assert _table_rows(proc.stdout) == [
        ["finetune", "70.0", "3.5", "5 %", "90.0", "32.3"],
        ["ilmil", "70.0", "66.5", "95 %", "70.0", "67.7"],
    ]
    sentence = ("After learning 1 new class from the same teacher (AP50 70.0 on its 2 classes), "
                "finetune keeps 5 % and ilmil keeps 95 % of the teacher's AP50 on the old classes.")
    assert sentence in proc.stdout
    report = (out / "report.md").read_text()
    assert sentence in report and "![forgetting curve](forgetting_curve.png)" in report
    assert "(../finetune/report.md)" in report and "(../ilmil/report.md)" in report
    assert (out / "forgetting_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_a_teacher_of_0_ap50_is_said_to_leave_nothing_to_keep(tmp_path):
    run = json.loads((_run_dir(tmp_path, "ilmil", (0.0, 0.0), 50.0, {"a": 0.0, "b": 0.0}) / "results.json").read_text())
    assert retention_sentence([run], ["ilmil"]) == ("The teacher scores 0 AP50 on the old classes: there is "
                                                    "nothing of it to keep.")
    without_teacher = dict(run, stages=run["stages"][1:])  # a run started at stage 1 of before: no teacher entry
    assert retention_sentence([add_forgetting(without_teacher)], ["ilmil"]).startswith("No run holds")


@pytest.mark.parametrize("tool", ["compare_runs.py", "plot_forgetting.py"])
def test_a_runs_folder_as_out_is_refused_before_its_report_is_overwritten(tool, tmp_path, tiny_datasets_root):
    finetune, ilmil = _run_dir(tmp_path, "finetune", (4.0, 3.0), 90.0), _run_dir(tmp_path, "ilmil", (76.0, 57.0), 70.0)
    (ilmil / "report.md").write_text("ilmil's own report")
    proc = run_tool(tool, [str(finetune), str(ilmil), "--out", str(ilmil)], tiny_datasets_root)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.log
    assert proc.stderr.startswith(f"error: --out {ilmil} holds a run (results.json), whose results and report this "
                                  "would overwrite; fix: give another --out")
    assert (ilmil / "report.md").read_text() == "ilmil's own report" and not (ilmil / "forgetting_curve.png").exists()


def test_a_folder_without_results_is_one_error_line(tmp_path, tiny_datasets_root):
    proc = run_tool("compare_runs.py", [str(tmp_path), "--out", str(tmp_path / "out")], tiny_datasets_root)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "results.json" in proc.stderr and "Traceback" not in proc.log


def _compression_dir(root, name, ap50, terms):
    """A finished compression run of classes a, b distilled with ``terms`` from a teacher of AP50 80."""
    per_class = {"a": ap50 + 10, "b": ap50 - 10}
    stage = {"stage": 0, "old_classes": [], "new_classes": ["a", "b"], "AP50": ap50, "AP50_old": None,
             "AP50_new": ap50, "per_class": {c: {"AP50": v, "AP": v / 2} for c, v in per_class.items()}}
    distill = {term: {"ENABLED": term in terms, "WEIGHT": 1.0} for term in ("FEAT", "RCN", "FGFI")}
    results = {"method": "finetune", "dataset": "shapes", "stages_spec": "2", "seed": 0, "stages": [stage],
               "config": {"ILMIL": {"DISTILL": {"CONNECTOR": "Conv1x1BN", **distill}}},
               "teacher": {"weights": "teacher.pth", "AP50": 80.0, "AP": 40.0}}
    folder = root / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_compression_runs_are_compared_with_the_teacher_they_were_distilled_from(tmp_path, tiny_datasets_root):
    runs = [_compression_dir(tmp_path, "plain", 40.0, ()), _compression_dir(tmp_path, "kd", 60.0, ("FEAT", "RCN"))]
    out = tmp_path / "compare"
    proc = run_tool("compare_runs.py", [*map(str, runs), "--out", str(out)], tiny_datasets_root)
    assert proc.returncode == 0, proc.log
    # Every class is the teacher's: "old" is all of them, kept = AP50 / the teacher's.
    assert _table_rows(proc.stdout) == [["no KD", "80.0", "40.0", "50 %", "-", "40.0"],
                                        ["KD: feat+rcn", "80.0", "60.0", "75 %", "-", "60.0"]]
    assert ("Distilled from the same teacher (AP50 80.0 on its 2 classes), no KD keeps 50 % and "
            "KD: feat+rcn keeps 75 % of the teacher's AP50.") in proc.stdout
