"""The per-stage results table printed at the end of a run."""
from ilmil.evaluation import format_results_table

RESULTS = {
    "method": "finetune",
    "dataset": "shapes",
    "stages_spec": "1+1",
    "stages": [
        {"stage": 0, "old_classes": [], "new_classes": ["a"], "AP50_old": None, "AP50_new": 12.0,
         "AP50": 12.0, "AP_old": None, "AP_new": 5.0, "AP": 5.0},
        {"stage": 1, "old_classes": ["a"], "new_classes": ["b"], "AP50_old": 3.0, "AP50_new": 40.0,
         "AP50": 21.5, "AP_old": 1.0, "AP_new": 20.0, "AP": 10.5},
    ],
}


def _rows(table):
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_table_has_a_title_and_one_row_per_stage():
    table = format_results_table(RESULTS)
    assert table.splitlines()[0] == "finetune on shapes 1+1"
    header = [cell.strip() for cell in table.splitlines()[1].strip("|").split("|")]
    assert header == ["stage", "classes", "AP50_old", "AP50_new", "AP50", "AP_old", "AP_new", "AP"]
    assert [row[:2] for row in _rows(table)] == [["0", "0+1"], ["1", "1+1"]]


def test_missing_values_show_as_a_dash():
    first = _rows(format_results_table(RESULTS))[0]
    assert first[2] == "-" and first[5] == "-"


def test_every_ap_is_shown_with_one_decimal():
    # AP50_new 12.0 and 40.0 must read "12.0" / "40.0" as AP50_old's "3.0" does,
    # not "12" / "40" (tabulate re-parses the formatted strings as numbers).
    rows = _rows(format_results_table(RESULTS))
    assert rows[0][2:] == ["-", "12.0", "12.0", "-", "5.0", "5.0"]
    assert rows[1][2:] == ["3.0", "40.0", "21.5", "1.0", "20.0", "10.5"]


def test_a_compression_run_is_titled_by_its_terms_not_its_method_preset():
    compression = {**RESULTS, "stages_spec": "20", "teacher": {"AP50": 60.0},
                   "config": {"ILMIL": {"DISTILL": {"FEAT": {"ENABLED": True}, "RCN": {"ENABLED": True},
                                                    "RPN": {"ENABLED": False}}}}}
    assert format_results_table(compression).splitlines()[0] == "KD: feat+rcn on shapes 20"
    undistilled = {**compression, "config": {"ILMIL": {"DISTILL": {"FEAT": {"ENABLED": False}}}}}
    assert format_results_table(undistilled).splitlines()[0] == "no KD on shapes 20"


def _incremental(method, architecture, **enabled):
    distill = {term: {"ENABLED": on} for term, on in enabled.items()}
    return {**RESULTS, "method": method,
            "config": {"MODEL": {"META_ARCHITECTURE": architecture},
                       "ILMIL": {"DISTILL": distill, "PSEUDO_LABELS": {"ENABLED": method == "ilmil"}}}}


def test_an_incremental_run_is_titled_by_its_method_and_the_terms_it_changed_from_the_preset():
    title = lambda results: format_results_table(results).splitlines()[0]  # noqa: E731
    # ilmil's preset (configs/methods/ilmil.yaml) switches FEAT, RPN and RCN on.
    assert title(_incremental("ilmil", "IncrementalRCNN", FEAT=True, RPN=True, RCN=True)) == "ilmil on shapes 1+1"
    assert title(_incremental("ilmil", "IncrementalRCNN", FEAT=True, RPN=False, RCN=True, FGFI=True)) == (
        "ilmil +fgfi -rpn on shapes 1+1")
    assert title(_incremental("finetune", "IncrementalRCNN", FEAT=True)) == "finetune +feat on shapes 1+1"
    # The one-stage presets (configs/methods/dense/): ilmil is pseudo-labels + the dense term.
    assert title(_incremental("ilmil", "IncrementalFCOS", DENSE=True, FEAT=True)) == "ilmil +feat on shapes 1+1"
    # Pseudo-labels, part of ilmil's preset and none of finetune's.
    pseudo = _incremental("finetune", "IncrementalRCNN")
    pseudo["config"]["ILMIL"]["PSEUDO_LABELS"] = {"ENABLED": True}
    assert title(pseudo) == "finetune +pseudo-labels on shapes 1+1"
    # A results file of a method this version lacks: its name alone.
    assert title(_incremental("retired", "IncrementalRCNN", FEAT=True)) == "retired on shapes 1+1"
