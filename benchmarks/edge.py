#!/usr/bin/env python
"""The edge suite: a detector's teacher, its undistilled student, its best distilled
student and that student pruned, each exported to ONNX and measured on the target
runtime (ONNX Runtime on CPU).

    python benchmarks/edge.py --detector faster_rcnn [--kd-runs benchmarks/runs/kd_full] \\
        [--teacher-iters N] [--prune-ratio 0.5 --finetune-iters 200 [--finetune-teacher]] [--repeats 50] \\
        [KEY VALUE ...]

The models come from the kd suite's run folders (benchmarks/run.py --suite kd): of the
finished distilled students (of any width), the one of best AP50, the teacher it was
distilled from, and the "no KD" students trained as long as the best one (the default
student, and a narrower one where the suite has it: the quarter-width Faster R-CNN; those
of the best student's teacher where it has them, another's where not, as their training
never reads a teacher). The pruned model is tools/prune.py's (residual-block inner
channels, fine-tuned with the student's own config, distilled from its unpruned self with
--finetune-teacher) in OUT/edge/. Per model: training iterations, ONNX file size,
parameters, GFLOPs, ONNX Runtime latency per image on 1 thread and on all cores (median of
--repeats after warm-up), PyTorch latency on the same input (1 thread), and AP50 on the
test split through ONNX Runtime and in PyTorch. KEY VALUE overrides are test-time settings
applied alike to every model, in PyTorch and in the exported file (e.g.
MODEL.RPN.POST_NMS_TOPK_TEST 100: fewer proposals for the box head).
Results: benchmarks/results/edge_<detector>.json and .md.
"""
import functools
import glob
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ilmil  # noqa: E402,F401  (detectron2 compatibility adjustments come first)
from ilmil.config import derived_cfg, get_ilmil_cfg  # noqa: E402
from ilmil.data import load_dataset_source  # noqa: E402
from ilmil.deploy import (OnnxDetector, check_export, export_onnx, latency_ms, load_trained_model,  # noqa: E402
                          preprocess)
from ilmil.deploy.predict import read_image  # noqa: E402
from ilmil.engine import RUN_ERRORS, tool_parser  # noqa: E402
from ilmil.engine.run_dir import file_digest  # noqa: E402
from ilmil.evaluation import evaluate_checkpoint  # noqa: E402
from ilmil.file_io import atomic_write  # noqa: E402
from ilmil.pruning import measure_model  # noqa: E402

from benchmarks.harness import STALE_MARK, BenchError, machine  # noqa: E402
from benchmarks.suites import NARROW_STUDENTS  # noqa: E402


def find_models(kd_runs, detector, teacher_iters=None):
    """{label: run folder} of the best distilled student of any width (of a teacher trained
    ``teacher_iters`` iterations, if given), its teacher, and each "no KD" student trained as
    long (the default one, and a narrower one where the suite has it: the quarter-width
    Faster R-CNN)."""
    students = [r for r in sorted(glob.glob(os.path.join(kd_runs, f"*_{detector}_*")))
                if not os.path.basename(r).startswith("teacher") and STALE_MARK not in os.path.basename(r)
                and os.path.isfile(os.path.join(r, "results.json"))]
    plain = [r for r in students if _row(r, detector).endswith("no KD")]
    distilled = [r for r in students if r not in plain
                 and (teacher_iters is None or _train_iters(_teacher_run(r)) == teacher_iters)]
    if not plain or not distilled:
        of_teacher, budget = ((f" of a {teacher_iters}-iteration teacher", f" --base-iters {teacher_iters}")
                              if teacher_iters is not None else ("", ""))
        raise SystemExit(f"error: {kd_runs} lacks a finished 'no KD' or distilled {detector} run{of_teacher}; fix: "
                         f"run benchmarks/run.py --suite kd --detectors {detector}{budget} first")
    best = max(distilled, key=lambda r: _results(r)["stages"][0]["AP50"])
    teacher = _teacher_run(best)
    # Compared at the best student's own budget (as many iterations). An undistilled student's
    # training never reads its teacher (the suite merely names one), so one of another teacher
    # stands in where the best student's teacher has none: that teacher's own are sorted last,
    # so they take their label in the dict below wherever both exist.
    budget = _train_iters(best)
    plain = sorted((r for r in plain if _train_iters(r) == budget), key=lambda r: _teacher_run(r) == teacher)
    if not plain:
        raise SystemExit(f"error: {kd_runs} holds no finished 'no KD' {detector} student of {budget} iterations, the "
                         f"budget of the best distilled one ({os.path.basename(best)}), to compare it with; fix: "
                         f"run benchmarks/run.py --suite kd --detectors {detector} --base-iters "
                         f"{_train_iters(teacher)} --iters {budget} --variants "
                         f"\"{detector} no KD\" first")
    return {"teacher": teacher, **{_label(r, detector): r for r in plain}, _label(best, detector): best}


@functools.cache  # a finished run's results.json does not change; find_models asks for each several times
def _results(run):
    path = os.path.join(run, "results.json")
    if not os.path.isfile(path):  # a teacher folder named by a student's results, since moved or deleted
        raise BenchError(f"{path} is missing; fix: re-run the kd suite's command that trained {os.path.basename(run)} "
                         "(benchmarks/run.py --suite kd ...), or give --teacher-iters of a teacher still there")
    with open(path) as f:
        return json.load(f)


def _train_iters(run):
    """The iterations a kd run (teacher or student) was trained for."""
    return _results(run)["config"]["SOLVER"]["MAX_ITER"]


def _teacher_run(student):
    """The run folder of the teacher a compression run names (``RUN/stage_0/model_final.pth``)."""
    return os.path.dirname(os.path.dirname(_results(student)["teacher"]["weights"]))


def _row(run, detector):
    name = os.path.basename(run).split(f"_{detector}_", 1)[1]
    return name.rsplit("_", 2)[0].replace("_", " ")


def _label(run, detector):
    """The default student's rows read "student, ROW"; a narrower student's (the suite's
    ``NARROW_STUDENTS``) its name itself, "quarter-width student, ROW"."""
    row = _row(run, detector)
    narrow = NARROW_STUDENTS.get(detector)
    return row if narrow and row.startswith(f"{narrow[0]}, ") else f"student, {row}"


def prune(best, out, ratio, finetune_iters, finetune_teacher=False):
    """tools/prune.py on the best student (reused when done); returns the pruned checkpoint.
    With ``finetune_teacher`` the fine-tuning distils the pruned model from its unpruned self
    (the teacher is built from the student's own config: ``ILMIL.TEACHER.CONFIG_FILE`` "")."""
    weights = os.path.join(out, "model_pruned.pth")
    if not os.path.isfile(weights):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prune.py"), "--weights",
                               os.path.join(best, "stage_0", "model_final.pth"), "--config-file",
                               os.path.join(best, "config.yaml"), "--ratio", str(ratio), "--finetune-iters",
                               str(finetune_iters), "--output-dir", out]
                              + (["--finetune-teacher"] if finetune_teacher else []) + ["ILMIL.TEACHER.CONFIG_FILE", ""],
                              cwd=ROOT)
        if proc.returncode:
            raise BenchError(f"tools/prune.py failed on {best}; fix: what its error line above names, then re-run "
                             "(the kd runs and a finished pruning are reused)")
    return weights


def _file_stem(label):
    """The name of a model's files in OUT/edge/<detector>/ (its .onnx, its kept figures)."""
    return label.replace(" ", "_").replace(",", "")


def measure(label, weights, config_file, out, repeats, opts=()):
    """The figures of one model (see the module docstring) under the test-time
    overrides ``opts`` (KEY VALUE)."""
    trained = load_trained_model(weights, config_file, ["ILMIL.DATA.CHECK_IMAGES", "False", *opts])
    onnx_path = os.path.join(out, f"{_file_stem(label)}.onnx")
    export_onnx(trained, onnx_path)
    cfg = trained.cfg
    eval_cfg = derived_cfg(cfg, {"ILMIL.DATA.CHECK_IMAGES": False})
    source = load_dataset_source(eval_cfg, splits=("test",))
    image = preprocess(cfg, read_image(source.test[0]["file_name"], cfg.INPUT.FORMAT))
    check = check_export(trained, OnnxDetector(onnx_path), [image] + [
        preprocess(cfg, read_image(r["file_name"], cfg.INPUT.FORMAT)) for r in source.test[1:8]])
    torch.set_num_threads(1)
    size = measure_model(trained.model, image, latency_repeats=repeats)
    with torch.no_grad():
        torch_ms = latency_ms(lambda: trained.model([{"image": image}]), repeats)
    one, every = OnnxDetector(onnx_path, threads=1), OnnxDetector(onnx_path)
    figures = {
        "model": label,
        "weights": weights,
        "onnx_mib": os.path.getsize(onnx_path) / 2**20,
        "params_m": size["params"] / 1e6,
        "gflops": size["gflops"],
        "ort_1_thread_ms": latency_ms(lambda: one.run(image), repeats),
        "ort_all_cores_ms": latency_ms(lambda: every.run(image), repeats),
        "pytorch_1_thread_ms": torch_ms,
        "export_check_passed": check["passed"],
        "input_size": list(image.shape[-2:]),
    }
    figures["AP50_ort"] = evaluate_checkpoint(eval_cfg, onnx_path, progress=False)["stages"][0]["AP50"]
    figures["AP50_pytorch"] = evaluate_checkpoint(eval_cfg, weights, progress=False)["stages"][0]["AP50"]
    return figures


def measured_row(label, weights, config_file, out, args):
    """``measure``'s figures, kept in OUT/edge/<detector>/<label>.row.json as soon as they are
    taken and reused while the model file, the settings and the machine are the same: a
    failure at one model loses none of the models measured before it."""
    key = {"weights": weights, "weights_sha256": file_digest(weights), "config_file": config_file,
           "repeats": args.repeats, "opts": list(args.opts), "machine": machine()}
    path = os.path.join(out, f"{_file_stem(label)}.row.json")
    if os.path.isfile(path):
        with open(path) as f:
            kept = json.load(f)
        if kept.get("key") == key:
            print(f"[edge] {label}: measured before ({path}), reused", flush=True)
            return kept["figures"]
    print(f"[edge] measuring {label}", flush=True)
    figures = measure(label, weights, config_file, out, args.repeats, args.opts)
    atomic_write(path, lambda f: json.dump({"key": key, "figures": figures}, f, indent=2), mode="w")
    return figures


def table(rows, detector, repeats, opts=()):
    teacher = rows[0]
    settings = f"; every model with {' '.join(opts)}" if opts else ""
    size = "x".join(map(str, teacher.get("input_size", [256, 256])))  # records of before it was kept: 256 px
    lines = [f"Edge suite, {detector} (input {size} px, median of {repeats} runs after warm-up"
             f"{settings})",
             "", "| model | trained (iterations) | ONNX (MiB) | params (M) | GFLOPs | ORT 1 thread (ms) | "
                 "ORT all cores (ms) | PyTorch 1 thread (ms) | speed-up vs teacher (ORT 1 thread) | AP50 (ORT) | "
                 "AP50 (PyTorch) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['train_iters']} | {r['onnx_mib']:.1f} | {r['params_m']:.2f} | "
                     f"{r['gflops']:.2f} | {r['ort_1_thread_ms']:.1f} | {r['ort_all_cores_ms']:.1f} | "
                     f"{r['pytorch_1_thread_ms']:.1f} | {teacher['ort_1_thread_ms'] / r['ort_1_thread_ms']:.2f}x | "
                     f"{r['AP50_ort']:.1f} | {r['AP50_pytorch']:.1f} |")
    small = [r for r in rows[1:] if teacher["ort_1_thread_ms"] / r["ort_1_thread_ms"] >= 3]
    met = [r["model"] for r in small if teacher["AP50_ort"] - r["AP50_ort"] <= 5]
    lines += ["", "Target (a small model >= 3x faster than the teacher in ORT on 1 thread, within 5 AP50 of it): "
              + (f"met by {'; '.join(met)}" if met else "not met")]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--detector", default="faster_rcnn")
    parser.add_argument("--kd-runs", default=os.path.join(ROOT, "benchmarks", "runs", "kd_full"))
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--finetune-iters", type=int, default=200)
    parser.add_argument("--finetune-teacher", action="store_true",
                        help="fine-tune the pruned student distilled from its unpruned self (tools/prune.py's flag)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--teacher-iters", type=int,
                        help="only students of the teacher trained this many iterations (default: any teacher)")
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="test-time config overrides applied to every model (module docstring)")
    args = parser.parse_args(argv)
    try:
        get_ilmil_cfg(opts=args.opts)  # the overrides are checked before anything is pruned, exported or measured
        return measure_models(args)
    except (BenchError, *RUN_ERRORS) as e:
        raise SystemExit(f"error: {e}") from None


def measure_models(args):
    """Prune the best student, measure it and the models it is compared with, write the page."""
    models = find_models(args.kd_runs, args.detector, args.teacher_iters)
    entries = [(label, os.path.join(run, "stage_0", "model_final.pth"), os.path.join(run, "config.yaml"),
                str(_train_iters(run))) for label, run in models.items()]
    out = os.path.join(os.path.dirname(os.path.abspath(args.kd_runs)), "edge", args.detector)
    os.makedirs(out, exist_ok=True)
    best_label, best_run = list(models.items())[-1]
    # Named by what it is pruned from and how, so a later, better student gets its own.
    pruned_dir = os.path.join(out, f"pruned_{os.path.basename(best_run)}_{args.prune_ratio}_{args.finetune_iters}it"
                                   + ("_self-distilled" if args.finetune_teacher else ""))
    pruned = prune(best_run, pruned_dir, args.prune_ratio, args.finetune_iters, args.finetune_teacher)
    entries.append((f"{best_label}, pruned {args.prune_ratio:.0%}", pruned, os.path.join(best_run, "config.yaml"),
                    f"{_train_iters(best_run)} + {args.finetune_iters}"))
    rows = []
    for label, weights, config_file, iters in entries:
        rows.append({**measured_row(label, weights, config_file, out, args), "train_iters": iters})
    page = table(rows, args.detector, args.repeats, args.opts)
    os.makedirs(args.results_dir, exist_ok=True)
    name = os.path.join(args.results_dir, f"edge_{args.detector}")
    record = {"machine": machine(), "opts": args.opts, "records": rows}
    atomic_write(f"{name}.json", lambda f: json.dump(record, f, indent=2), mode="w")
    atomic_write(f"{name}.md", lambda f: f.write(page), mode="w")
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
