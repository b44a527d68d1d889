"""Side-by-side comparison of runs, e.g. several methods trained from one teacher.

``compare_runs(RUNS, OUT)`` (``tools/compare_runs.py``) writes ``OUT/report.md``
with the table of each run's last stage, one sentence on how much of its
teacher's old-class AP50 each method kept, the forgetting curves of all runs
on one chart (``OUT/forgetting_curve.png``) and links to each run's own report.
The teacher of a run's last stage is its previous stage: the model of stage 0
in a run started with ``--start-stage 1`` (evaluated there, not trained). A
compression run's teacher is the one it was distilled from, and all its classes
are that teacher's: its "old" classes are all of them.
"""
import os

from ..file_io import atomic_write
from ..visualization import plot_forgetting_curve, run_labels
from .forgetting import add_forgetting
from .report import ap_cell, markdown_table
from .run_outputs import load_run_results, run_folder

__all__ = ["compare_runs", "comparison_rows", "retention_sentence"]

COLUMNS = ["method", "teacher AP50_old", "AP50_old", "kept", "AP50_new", "AP50"]


def _share(value):
    return "-" if value is None or value != value else f"{100 * value:.0f} %"


def _last_stage_vs_teacher(results):
    """The run's last stage with its teacher's AP50 on the old classes, the run's AP50 on
    them and the share kept (None where the results hold no teacher); a compression
    run's from its teacher's results, every class being old."""
    last = dict(results["stages"][-1])
    teacher = results.get("teacher")
    if teacher:
        last.update(old_classes=last["old_classes"] + last["new_classes"], new_classes=[], AP50_new=None,
                    AP50_old=last["AP50"], AP50_old_teacher=teacher["AP50"],
                    retention_AP50=last["AP50"] / teacher["AP50"] if teacher["AP50"] else None)
    return last


def comparison_rows(runs, labels):
    """A row per run (``COLUMNS``), from its last stage: the teacher's AP50 on the old
    classes, the run's AP50 on them, the fraction it kept, and AP50 on new and all classes."""
    rows = []
    for results, label in zip(runs, labels):
        last = _last_stage_vs_teacher(results)
        rows.append([label, ap_cell(last.get("AP50_old_teacher")), ap_cell(last.get("AP50_old")),
                     _share(last.get("retention_AP50")), ap_cell(last.get("AP50_new")), ap_cell(last.get("AP50"))])
    return rows


def retention_sentence(runs, labels):
    """What the comparison shows, in one sentence: each run's share of its teacher's
    old-class AP50 after its last stage (runs without a teacher in their results are left out)."""
    kept = [(label, last) for label, last in zip(labels, map(_last_stage_vs_teacher, runs))
            if last.get("retention_AP50") is not None]
    if not kept:
        if any(_last_stage_vs_teacher(r).get("AP50_old_teacher") is not None for r in runs):  # a teacher of 0 AP50
            return "The teacher scores 0 AP50 on the old classes: there is nothing of it to keep."
        return "No run holds the evaluation of its last stage's teacher, so what each kept is not known."
    teachers = {round(last["AP50_old_teacher"], 1) for _, last in kept}
    last = kept[0][1]
    shares = [f"{label} keeps {100 * s['retention_AP50']:.0f} %" for label, s in kept]
    shares = ", ".join(shares[:-1]) + " and " + shares[-1] if len(shares) > 1 else shares[0]
    teacher = (f"the same teacher (AP50 {last['AP50_old_teacher']:.1f} on its {len(last['old_classes'])} classes)"
               if len(teachers) == 1 else "their teachers")
    new = len(last["new_classes"])
    if not new:  # compression runs
        return f"Distilled from {teacher}, {shares} of the teacher's AP50."
    return (f"After learning {new} new class{'es' if new != 1 else ''} from {teacher}, {shares} "
            "of the teacher's AP50 on the old classes.")


def compare_runs(run_dirs, out_dir):
    """Write ``out_dir/report.md`` and ``out_dir/forgetting_curve.png`` comparing the runs
    in ``run_dirs`` (run folders or their results.json); returns (table text, sentence, report path)."""
    # A run still training (or stopped) has its stages' results without the forgetting keys.
    runs = [add_forgetting(load_run_results(d)) for d in run_dirs]
    run_dirs = [run_folder(d) for d in run_dirs]
    labels = run_labels(runs, [os.path.basename(d) for d in run_dirs])
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(COLUMNS, comparison_rows(runs, labels))
    sentence = retention_sentence(runs, labels)
    curve = plot_forgetting_curve(runs, os.path.join(out_dir, "forgetting_curve.png"), labels)
    first = runs[0]
    parts = [
        f"# {' vs '.join(labels)} on {first['dataset']} {first['stages_spec']}",
        "AP50 in % after each run's last stage; old = the classes its teacher knew, kept = AP50_old / the "
        "teacher's AP50_old.",
        table,
        sentence,
        f"![forgetting curve]({os.path.relpath(curve, out_dir)})",
        "## Runs",
        "\n".join(f"- {label}: [{os.path.relpath(os.path.join(d, 'report.md'), out_dir)}]"
                  f"({os.path.relpath(os.path.join(d, 'report.md'), out_dir)})" for d, label in zip(run_dirs, labels)),
    ]
    report = os.path.join(out_dir, "report.md")
    text = "\n\n".join(parts) + "\n"
    atomic_write(report, lambda f: f.write(text), mode="w")
    return table, sentence, report
