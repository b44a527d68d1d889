"""Human-readable summaries of a run's results: the per-stage table printed at the
end of a run, and ``report.md`` (schedule, AP tables, forgetting, time, plots)."""
import os

from tabulate import tabulate

from ..pruning.measure import format_pruning_table
from ..visualization import method_label
from .forgetting import per_class_metrics

__all__ = ["ap_cell", "format_report", "format_results_table", "markdown_table"]


def ap_cell(value):
    return "-" if value is None or value != value else f"{value:.1f}"


def format_results_table(results):
    """One row per stage: classes learned and AP50/AP over old, new and all classes."""
    rows = []
    for entry in results["stages"]:
        rows.append(
            [
                entry["stage"],
                f"{len(entry['old_classes'])}+{len(entry['new_classes'])}",
                *(ap_cell(entry.get(k)) for k in ("AP50_old", "AP50_new", "AP50", "AP_old", "AP_new", "AP")),
            ]
        )
    headers = ["stage", "classes", "AP50_old", "AP50_new", "AP50", "AP_old", "AP_new", "AP"]
    title = f"{method_label(results)} on {results['dataset']} {results['stages_spec']}"
    return title + "\n" + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def markdown_table(headers, rows):
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _ratio(value):
    return "-" if value is None else f"{value:.2f}"


def _seconds(value):
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _schedule_section(results):
    rows = [
        [
            e["stage"],
            len(e["old_classes"]),
            f"{len(e['new_classes'])}: {', '.join(e['new_classes'])}",
            e.get("num_train_images", "-"),
            e.get("num_test_images", e.get("num_images", "-")),
        ]
        for e in results["stages"]
    ]
    return markdown_table(["stage", "old classes", "new classes", "train images", "test images"], rows)


def _ap_section(results, metrics):
    headers = ["stage", "classes"] + [m + suffix for m in metrics for suffix in ("_old", "_new", "")]
    rows = [
        [e["stage"], f"{len(e['old_classes'])}+{len(e['new_classes'])}"]
        + [ap_cell(e.get(m + suffix)) for m in metrics for suffix in ("_old", "_new", "")]
        for e in results["stages"]
    ]
    return markdown_table(headers, rows)


def _forgetting_section(results, metrics):
    headers = ["stage"] + [f"{kind} {m}" for m in metrics for kind in ("forgetting", "retention")]
    formats = (("forgetting", ap_cell), ("retention", _ratio))
    rows = [[e["stage"]] + [f(e.get(f"{kind}_{m}")) for m in metrics for kind, f in formats] for e in results["stages"]]
    summary = results.get("summary", {})
    lines = [markdown_table(headers, rows), ""]
    for m in metrics:
        lines.append(
            f"- {m}: average incremental {ap_cell(summary.get(f'average_incremental_{m}'))}, "
            f"final {ap_cell(summary.get(f'final_{m}'))} (old {ap_cell(summary.get(f'final_{m}_old'))}, "
            f"new {ap_cell(summary.get(f'final_{m}_new'))}), "
            f"final forgetting {ap_cell(summary.get(f'final_forgetting_{m}'))}, "
            f"final retention {_ratio(summary.get(f'final_retention_{m}'))}"
        )
    return "\n".join(lines)


def _time_section(results):
    keys = ("train_time_s", "eval_time_s")
    rows = [[e["stage"]] + [_seconds(e.get(key)) for key in keys] for e in results["stages"]]
    # "-" where no stage has one (an evaluation of a run has no training times)
    totals = [sum(times) if (times := [e[key] for e in results["stages"] if e.get(key) is not None]) else None
              for key in keys]
    rows.append(["total"] + [_seconds(t) for t in totals])
    return markdown_table(["stage", "training (s)", "evaluation (s)"], rows)


def format_report(results, output_dir, plot_paths=(), data_files=()):
    """``report.md`` of a run whose results carry the forgetting keys (``add_forgetting``).

    ``plot_paths`` and ``data_files`` are embedded / listed relative to ``output_dir``.
    """
    metrics = sorted(per_class_metrics(results), key=lambda m: m != "AP50")  # the primary metric first
    parts = [
        f"# {method_label(results)} on {results['dataset']} {results['stages_spec']}",
        f"{len(results['stages'])} stage(s), seed {results.get('seed', '-')}. AP values in %, "
        "AP = COCO AP@[.5:.95]; _old / _new = mean over the classes of earlier stages / of the stage.",
        "## Schedule",
        _schedule_section(results),
        "## AP after each stage",
        _ap_section(results, metrics),
        "## Forgetting",
        "Forgetting of a class: its best AP at an earlier stage minus its AP now (points), averaged over the "
        "old classes. Retention: AP of the old classes now / their AP at the previous stage (the teacher).",
        _forgetting_section(results, metrics),
        "## Time per stage",
        _time_section(results),
    ]
    if results.get("pruning"):
        p = results["pruning"]
        teacher = ", its unpruned self as teacher" if p.get("finetune_teacher") else ""
        parts += ["## Pruning",
                  f"The model of stage {p['after_stage']} was pruned (ratio {p['ratio']}, stage ratios "
                  f"{p['stage_ratios'] or '-'}, box head {p['box_head_ratio']}; {p['finetune_iters']} fine-tuning "
                  f"iterations{teacher}) and the next stage's student started from it; measured at "
                  f"{p['image_size'][1]}x{p['image_size'][0]} px on that stage's test data:",
                  format_pruning_table(p)]
    if plot_paths:
        parts.append("## Plots")
        for path in plot_paths:
            name = os.path.splitext(os.path.basename(path))[0].replace("_", " ")
            parts.append(f"![{name}]({os.path.relpath(path, output_dir)})")
    if data_files:
        parts.append("## Files")
        parts.append("\n".join(f"- `{os.path.relpath(p, output_dir)}`" for p in data_files))
    return "\n\n".join(parts) + "\n"
