#!/usr/bin/env python
"""Plot class-incremental runs from their results.json: forgetting curves of all runs
on one chart, and per run a per-class AP50 heat map and a when-learned vs final bar chart.

    python tools/plot_forgetting.py OUT_finetune OUT_ilmil OUT_joint --out plots/

Each RUN is a run folder (holding results.json) or a results.json file. Runs are
labelled by their method, with the folder name where two share a method. Every
training run also writes its own plots into its folder (ilmil.evaluation.finalize_run).
"""
import os
import sys

from ilmil.engine import RUN_RECORDS, require_output_dir, run_tool_main, tool_parser
from ilmil.evaluation import load_run_results, run_folder
from ilmil.visualization import plot_runs


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder or results.json")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    runs = [load_run_results(run) for run in args.runs]
    # A run's folder keeps its own plots, which its report.md shows.
    require_output_dir(args.out, "--out", refuse_records=(*RUN_RECORDS, "results.json"))
    for path in plot_runs(runs, args.out, [os.path.basename(run_folder(run)) for run in args.runs]):
        print(path)


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
