#!/usr/bin/env python
"""Compare finished runs side by side, e.g. two methods trained from one teacher.

    python tools/compare_runs.py OUT_finetune OUT_ilmil --out OUT

Prints the table of each run's last stage (the teacher's AP50 on the old classes,
the run's AP50 on old, new and all classes, the share of the teacher's old-class
AP50 it kept) and one sentence saying what it shows, and writes OUT/report.md
with them, the forgetting curves of all runs on one chart and links to each
run's report. Each RUN is a run folder (holding results.json) or its results.json.
"""
import sys

from ilmil.engine import RUN_RECORDS, require_output_dir, run_tool_main, tool_parser
from ilmil.evaluation import compare_runs


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder (holding results.json) or its results.json")
    parser.add_argument("--out", required=True, help="folder for report.md and forgetting_curve.png")
    args = parser.parse_args(argv)
    # A run's folder (or an evaluation's, holding results.json) keeps its own report.md.
    require_output_dir(args.out, "--out", refuse_records=(*RUN_RECORDS, "results.json"))
    table, sentence, report = compare_runs(args.runs, args.out)
    print(f"{table}\n\n{sentence}\nreport: {report}")


if __name__ == "__main__":
    sys.exit(run_tool_main(main))
