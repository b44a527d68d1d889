#!/usr/bin/env python
"""Benchmark suites: accuracy of the incremental methods, the ablation, speed, pruning,
the stage-image rules and compression (kd).

    python benchmarks/run.py --suite accuracy [--quick] [--specs 10+10 15+5] [--seeds 0 1] [--jobs 2]
    python benchmarks/run.py --suite accuracy --specs 10+10 --variants ilmil    # one method's runs
    python benchmarks/run.py --suite ablation [--quick] [--seeds 0 1]
    python benchmarks/run.py --suite speed [--quick]
    python benchmarks/run.py --suite pruning [--quick]
    python benchmarks/run.py --suite stage_images [--quick] [--seeds 0 1]
    python benchmarks/run.py --suite kd [--quick] [--detectors faster_rcnn retinanet fcos] [--jobs 2]
    python benchmarks/run.py --suite accuracy --dry-run    # what would be reused / trained

Each run is a real ``tools/train_incremental.py`` process under ``--runs-dir``
(resumable: a finished run is reused, a stage whose model exists is not
retrained; see benchmarks/harness.py). The records are merged into
``benchmarks/results/SUITE_SIZE.json`` (a record of another spec, seed or
budget is kept) and the suite's tables are regenerated from all of them into
``benchmarks/results/SUITE_SIZE.md``. A flag the suite cannot honour is refused.
"""
import argparse
import dataclasses
import os
import signal
import sys
import time

if not __package__:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ilmil  # noqa: F401,E402  (detectron2 compatibility adjustments come first)
from benchmarks import records  # noqa: E402
from benchmarks.harness import (ROOT, BenchError, describe, execute, log, plan, progress,  # noqa: E402
                                stop_status, stop_trainings)
from benchmarks.suites import SUITES  # noqa: E402
from benchmarks.tables import suite_page  # noqa: E402
from ilmil.engine import RUN_ERRORS, tool_parser  # noqa: E402
from ilmil.file_io import atomic_write  # noqa: E402

# Options that change a suite's runs: each sets the Setting field of its name.
SETTING_OPTIONS = ("specs", "seeds", "iters", "base_iters", "num_train", "num_test")


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--suite", choices=list(SUITES), required=True)
    parser.add_argument("--quick", action="store_true", help="the < 10 minute variant")
    parser.add_argument("--specs", nargs="+", help="the stage specs to run (default: the suite's)")
    parser.add_argument("--variants", nargs="+",
                        help="train only these of the suite's variants (names as in its table, e.g. ilmil)")
    parser.add_argument("--detectors", nargs="+",
                        help="kd and one_stage suites: train only these detectors' runs (e.g. retinanet fcos)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: 0)")
    parser.add_argument("--iters", type=int, help="iterations of each stage after stage 0")
    parser.add_argument("--base-iters", type=int,
                        help="iterations of stage 0 (kd: of the teacher), shared by every method "
                             "(default: the suite's, --dry-run shows it in the folder names)")
    parser.add_argument("--num-train", type=int, help="shapes train images")
    parser.add_argument("--num-test", type=int, help="shapes test images")
    parser.add_argument("--jobs", type=int, help="runs trained at once, each with cores / jobs threads")
    parser.add_argument("--dry-run", action="store_true", help="print what would be reused and trained, train nothing")
    parser.add_argument("--tables-only", action="store_true",
                        help="regenerate the suite's tables from its recorded results, train nothing")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "benchmarks", "runs"))
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE config overrides for every run; after a list option (--variants, "
                             "--specs, --seeds, --detectors) put -- before them")
    args = parser.parse_args(argv)
    if args.opts[:1] == ["--"]:
        args.opts = args.opts[1:]
    return args


def resolve_setting(suite, args):
    """The suite's setting with the command line's options, refusing those it cannot honour."""
    where = f"benchmarks/run.py --suite {suite.name}"
    for dest in (*SETTING_OPTIONS, "jobs", "variants"):
        value = getattr(args, dest)
        if value is not None and dest in suite.refuses:
            flag = f"--{dest.replace('_', '-')}"
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise BenchError(f"{flag} {shown} is not honoured by the {suite.name} suite ({suite.refuses[dest]}), "
                             f"{where}; fix: drop {flag}")
    if args.jobs is not None and args.jobs < 1:
        raise BenchError(f"--jobs {args.jobs} must be at least 1, {where}; fix: give --jobs 1 or more")
    for dest in ("iters", "base_iters", "num_train", "num_test"):
        value = getattr(args, dest)
        if value is not None and value < 1:
            flag = f"--{dest.replace('_', '-')}"
            raise BenchError(f"{flag} {value} must be at least 1, {where}; fix: give {flag} 1 or more")
    if len(args.opts) % 2:
        raise BenchError(f"config overrides {' '.join(args.opts)} are not KEY VALUE pairs, {where}; "
                         "fix: give each key its value")
    setting = suite.setting(args.quick)
    given = {name: tuple(v) if isinstance(v, list) else v
             for name in SETTING_OPTIONS if (v := getattr(args, name)) is not None}
    setting = dataclasses.replace(setting, **given)
    if args.variants:
        known = {variant.name: variant for variant in setting.variants}
        unknown = [name for name in args.variants if name not in known]
        if unknown:
            raise BenchError(f"--variants {' '.join(unknown)}: not a variant of the {suite.name} suite, {where}; "
                             f"give some of: {', '.join(known)}")
        setting = dataclasses.replace(setting, variants=tuple(known[name] for name in args.variants))
    if args.detectors:
        known = list(dict.fromkeys(variant.detector for variant in setting.variants if variant.detector))
        unknown = [name for name in args.detectors if name not in known]
        if unknown:
            choices = f"give some of: {', '.join(known)}" if known else "drop --detectors"
            of = "the --variants given" if args.variants else f"the {suite.name} suite"
            raise BenchError(f"--detectors {' '.join(unknown)}: not a detector of {of}, {where}; {choices}")
        setting = dataclasses.replace(setting, variants=tuple(v for v in setting.variants
                                                              if v.detector in args.detectors))
    # A zero stage-0 budget is the per-stage one (--quick).
    return dataclasses.replace(setting, base_iters=setting.base_iters or setting.iters)


def main(argv=None):
    args = parse_args(argv)
    suite = SUITES[args.suite]
    size = "quick" if args.quick else "full"
    try:
        if args.tables_only:
            # The tables show every record of the suite: options that choose runs choose none here.
            given = [f"--{dest.replace('_', '-')}" for dest in (*SETTING_OPTIONS, "variants", "detectors", "jobs")
                     if getattr(args, dest) is not None] + (["KEY VALUE overrides"] if args.opts else [])
            if given:
                raise BenchError(f"--tables-only regenerates the {suite.name} suite's tables from all its records, "
                                 f"so {', '.join(given)} would change nothing; fix: drop them")
            write_results(suite, args.quick, args.results_dir)
            return 0
        setting = resolve_setting(suite, args)
        suite_setting = dataclasses.replace(suite, **{size: setting})
        planned = plan(suite_setting, args.quick, setting.specs, setting.seeds, args.runs_dir, args.opts)
        if args.dry_run:
            for out_dir, status in describe(planned.values(), suite.fresh).items():
                where = progress(out_dir) if status == "partial" else ""
                print(f"{status:9} {out_dir}" + (f"  ({where})" if where else ""))
            return 0
        os.environ.setdefault("ILMIL_DATASETS", os.path.join(ROOT, "datasets"))
        jobs = args.jobs or 1
        if jobs > 1:  # one torch thread pool per run, sized so the runs share the cores
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        # Kill, or Ctrl-C: the trainings stop and no queued run starts after it.
        previous = {stop: signal.signal(stop, stop_trainings) for stop in (signal.SIGTERM, signal.SIGINT)}
        start = time.perf_counter()
        try:
            outcomes = execute(list(planned.values()), jobs, suite.fresh)
        finally:  # the records' measurements after them (minutes on the kd suite) stop at once
            for stop, handler in previous.items():
                signal.signal(stop, handler)
        new = suite.records(suite_setting, setting, planned, outcomes, args.opts)
        merged = write_results(suite, args.quick, args.results_dir, new)
    except (BenchError, records.RecordsError, *RUN_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return stop_status() or 1
    except KeyboardInterrupt:
        print("error: interrupted; the trained runs are kept; fix: re-run the same command to merge their records",
              file=sys.stderr)
        return 128 + signal.SIGINT
    log(f"{len(new)} records merged ({len(merged)} in all) in {(time.perf_counter() - start) / 60:.1f} min")
    return stop_status() or 0  # a stop after the last training ended: its records are kept, the status says so


def write_results(suite, quick, results_dir, new=()):
    """Merge ``new`` into the suite's records and regenerate its page from all of them."""
    name = suite.label(quick)
    path = os.path.join(results_dir, f"{name}.json")
    merged = records.merge(records.load(path), list(new))
    if not merged:
        raise BenchError(f"no records in {path}, benchmarks/run.py --suite {suite.name}; fix: run the suite "
                         "first (without --tables-only), or give the --results-dir that holds them")
    if new:
        records.save(path, merged)
    page = suite_page(suite, quick, merged)
    atomic_write(os.path.join(results_dir, f"{name}.md"), lambda f: f.write(page), mode="w")
    print(page)
    return merged


if __name__ == "__main__":
    sys.exit(main())
