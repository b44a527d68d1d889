"""Human-readable summaries of a run's results."""
from tabulate import tabulate

__all__ = ["format_results_table"]


def _cell(value):
    return "-" if value is None or value != value else f"{value:.1f}"


def format_results_table(results):
    """One row per stage: classes learned and AP50/AP over old, new and all classes."""
    rows = []
    for entry in results["stages"]:
        rows.append(
            [
                entry["stage"],
                f"{len(entry['old_classes'])}+{len(entry['new_classes'])}",
                *(_cell(entry.get(k)) for k in ("AP50_old", "AP50_new", "AP50", "AP_old", "AP_new", "AP")),
            ]
        )
    headers = ["stage", "classes", "AP50_old", "AP50_new", "AP50", "AP_old", "AP_new", "AP"]
    title = f"{results['method']} on {results['dataset']} {results['stages_spec']}"
    return title + "\n" + tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
