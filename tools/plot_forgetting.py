#!/usr/bin/env python
"""Plot class-incremental runs from their results.json: forgetting curves of all runs
on one chart, and per run a per-class AP50 heat map and a when-learned vs final bar chart.

    python tools/plot_forgetting.py OUT_finetune OUT_ilmil OUT_joint --out plots/

Each RUN is a run folder (holding results.json) or a results.json file. Runs are
labelled by their method, with the folder name where two share a method. Every
training run also writes its own plots into its folder (ilmil.evaluation.finalize_run).
"""
import argparse
import json
import os
import sys

from ilmil.engine import require_output_dir, run_tool_main
from ilmil.evaluation import NotARunError
from ilmil.visualization import plot_runs

# What the plots read of a results.json and of each of its stages.
_FIELDS = {"method", "dataset", "stages_spec", "stages"}
_STAGE_FIELDS = {"stage", "old_classes", "new_classes", "per_class"}


def _load(run):
    """The results of ``run``, refused (naming the file) unless it is a run's results.json."""
    path = os.path.join(run, "results.json") if os.path.isdir(run) else run
    fix = "fix: give a run folder of tools/train_incremental.py or eval_incremental.py, or its results.json"
    if not os.path.isfile(path):
        raise NotARunError(f"{path} not found; {fix}")
    try:
        with open(path) as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotARunError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(results, dict) or not _FIELDS <= results.keys():
        raise NotARunError(f"{path} is not a run's results (it needs the fields {', '.join(sorted(_FIELDS))}); {fix}")
    stages = results["stages"]
    if not stages or not isinstance(stages, list) or not all(
            isinstance(s, dict) and _STAGE_FIELDS <= s.keys() for s in stages):
        raise NotARunError(f"{path}: field 'stages' is not a list of evaluated stages "
                           f"({', '.join(sorted(_STAGE_FIELDS))}); {fix}")
    return results


def _name(run):
    run = os.path.abspath(run)
    return os.path.basename(os.path.dirname(run) if os.path.isfile(run) else run)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder or results.json")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    runs = [_load(run) for run in args.runs]
    require_output_dir(args.out, "--out")
    for path in plot_runs(runs, args.out, [_name(run) for run in args.runs]):
        print(path)


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
