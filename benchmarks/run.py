#!/usr/bin/env python
"""Benchmark suites: accuracy of the incremental methods, and speed / memory.

    python benchmarks/run.py --suite accuracy [--quick] [--seeds 0 1]
    python benchmarks/run.py --suite speed [--quick]
    python benchmarks/run.py --suite pruning [--quick]
    python benchmarks/run.py --suite ablation [--quick]

Each run is a real ``tools/train_incremental.py`` process under
``benchmarks/runs/SUITE/`` (resumable: a finished run is reused, a stage whose
model exists is not retrained). Every teacher method of a spec starts from the
same stage-0 model (stage 0 has no teacher, so its training is the same for
all; it is trained once, for ``--base-iters`` iterations, and copied); run
folders name their budgets and record a fingerprint of their config, so neither
a changed budget nor a changed config reuses a run. Records go to
``benchmarks/results/SUITE.json`` and a table is appended to ``BENCHMARKS.md``.
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from ilmil.config import get_ilmil_cfg
from ilmil.data import generate_shapes_dataset, parse_stage_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train_incremental.py")

# The CPU protocol: shapes at 256 px, R18-FPN, batch 4, a fixed budget per stage.
ACCURACY = {
    # Stage 0 trains four times as long as a later stage: papers train the base model to
    # convergence, and the 10-class teacher reaches AP50 14 / 32 / 78 after 800 / 1600 /
    # 3200 iterations (78: as good as joint training on its classes; BENCHMARKS.md).
    "full": {"specs": ["10+10", "15+5", "19+1", "10+5+5"], "iters": 800, "base_iters": 3200,
             "num_train": 2000, "num_test": 500},
    "quick": {"specs": ["10+10"], "iters": 120, "num_train": 400, "num_test": 100},
}
METHODS = ["finetune", "faster-ilod", "ilmil", "joint"]
BATCH = 4
CONFIG_RECORD = "bench_config.json"  # the fingerprint of what a run folder was trained with
SPEED = {"full": {"iters": 80, "warmup": 20}, "quick": {"iters": 30, "warmup": 10}}
PRUNE_RATIOS = {"full": [0.0, 0.3, 0.5], "quick": [0.0, 0.5]}
# ilmil with one term switched off at a time (the config keys of that term), and changes marked below.
# The full method runs last: the accuracy suite's run is reused when it has finished meanwhile.
ABLATIONS = {
    "without pseudo-labels": ["ILMIL.PSEUDO_LABELS.ENABLED", "False"],
    "without feature term": ["ILMIL.DISTILL.FEAT.ENABLED", "False"],
    "without RPN term": ["ILMIL.DISTILL.RPN.ENABLED", "False"],
    "without RCN term": ["ILMIL.DISTILL.RCN.ENABLED", "False"],
    # Not an ablation: the RCN term without the teacher's "background" on new objects.
    "RCN not on new-class GT": ["ILMIL.DISTILL.RCN.NEW_GT_IOU_THRESH", "0.5"],
    # Not an ablation: the RCN term decides how AP splits between old and new classes;
    # DESIGN.md's weight, which ilmil used until its default became 0.25.
    "RCN weight 1": ["ILMIL.DISTILL.RCN.WEIGHT", "1.0"],
    "RCN logits kl": ["ILMIL.DISTILL.RCN.LOGITS", "kl"],
    # Not an ablation: what the faster bfloat16 teacher pass (the speed suite) costs in AP.
    "bfloat16 teacher": ["ILMIL.TEACHER.PRECISION", "bfloat16"],
    "ilmil (all terms)": [],
}


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine():
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    import detectron2
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
    }


@dataclass
class Run:
    """One tools/train_incremental.py process of a suite. The reuse check
    (``finished``) and the training (``run_training``) both read it, so they cannot
    disagree about which config a folder holds."""

    out_dir: str
    spec: str
    method: str
    seed: int
    iters: int  # per stage
    data: dict  # num_train, num_test
    opts: tuple = ()  # KEY VALUE config overrides, after the protocol's
    flags: tuple = ()  # CLI flags of tools/train_incremental.py

    @property
    def num_stages(self):
        return len(parse_stage_spec(self.spec))

    def overrides(self):
        """The KEY VALUE config overrides: data size, batch, budget, then ``opts``."""
        iters = self.iters
        return [
            "ILMIL.SHAPES.NUM_TRAIN", str(self.data["num_train"]), "ILMIL.SHAPES.NUM_TEST", str(self.data["num_test"]),
            "SOLVER.IMS_PER_BATCH", str(BATCH), "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", f"({int(iters * 0.8)},)", "SOLVER.WARMUP_ITERS", str(min(100, iters // 5)),
            *self.opts,
        ]  # fmt: skip

    def fingerprint(self):
        """What the run trains with: its schedule, CLI flags and resolved config (the
        method's preset, the config file, the overrides); not the code."""
        cfg = get_ilmil_cfg(None, self.overrides(), method=self.method)
        identity = json.dumps([self.spec, self.method, self.seed, list(self.flags)]) + cfg.dump()
        return hashlib.sha256(identity.encode()).hexdigest()[:16]


def run_training(run):
    """Train ``run``; returns its wall time, peak RSS (MiB) and command."""
    cmd = [
        sys.executable, TRAIN, "--stages", run.spec, "--method", run.method, "--seed", str(run.seed),
        "--output-dir", run.out_dir,
        "--resume",  # a suite killed mid-stage continues that stage from its last checkpoint
        *run.flags, *run.overrides(),
    ]  # fmt: skip
    os.makedirs(run.out_dir, exist_ok=True)
    with open(os.path.join(run.out_dir, CONFIG_RECORD), "w") as f:
        json.dump({"fingerprint": run.fingerprint()}, f)
    start = time.perf_counter()
    with open(os.path.join(run.out_dir, "bench_stdout.log"), "a") as logfile:
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"run failed: {' '.join(cmd)}\n  see {run.out_dir}/bench_stdout.log")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, " ".join(cmd[1:])


def step_times(stage_dir):
    with open(os.path.join(stage_dir, "iteration_times.json")) as f:
        return json.load(f)["seconds"]


def finished(run):
    """The run's results if all its stages are done, else None. A folder trained
    with another config (a method's preset changed since, say) is set aside, never
    reused nor resumed: folders are named by spec, method, budget and seed, not by
    config. A folder without a fingerprint (older harness) is taken as is."""
    record = os.path.join(run.out_dir, CONFIG_RECORD)
    if os.path.exists(record):
        with open(record) as f:
            recorded = json.load(f)["fingerprint"]
        if recorded != run.fingerprint():
            stale = f"{run.out_dir}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(run.out_dir, stale)
            log(f"{run.out_dir} was trained with another config: moved to {stale}, training anew")
            return None
    path = os.path.join(run.out_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    return results if len(results["stages"]) == run.num_stages else None


def seed_stage0(base_dir, out_dir):
    """Copy the shared stage-0 model and evaluation of ``base_dir`` into ``out_dir``."""
    src, dst = os.path.join(base_dir, "stage_0"), os.path.join(out_dir, "stage_0")
    if not os.path.exists(os.path.join(dst, "model_final.pth")):
        os.makedirs(dst, exist_ok=True)
        for name in ("model_final.pth", "metrics_eval.json", "iteration_times.json"):
            if os.path.exists(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def base_run(runs_dir, first_stage, seed, setting, extra):
    """The stage-0 model shared by every method of every spec that starts with
    ``first_stage`` classes (stage 0 has no teacher, so it trains the same for all):
    a one-stage run of ``setting["base_iters"]`` iterations, trained once."""
    out_dir = os.path.join(runs_dir, f"base_{first_stage}classes_{setting['base_iters']}it_seed{seed}")
    run = Run(out_dir, str(first_stage), "finetune", seed, setting["base_iters"], setting, tuple(extra))
    if finished(run) is None:
        log(f"stage 0 ({first_stage} classes, seed {seed}, {setting['base_iters']} iterations): training")
        run_training(run)
    return out_dir


def method_run_dir(runs_dir, spec, method, seed, setting, variant=None):
    budget = f"{setting['base_iters']}+{setting['iters']}it"
    return os.path.join(runs_dir, f"{spec}_{variant or method}_{budget}_seed{seed}")


def accuracy_run(runs_dir, spec, method, seed, setting, extra):
    """The run of one (spec, method, seed) of the accuracy suite."""
    counts = parse_stage_spec(spec)
    if method == "joint":
        # One stage of all classes for the whole budget (stage 0's plus the later
        # stages'): shared by specs of the same sum and budget, e.g. 10+10 and 15+5.
        iters = setting["base_iters"] + (len(counts) - 1) * setting["iters"]
        out_dir = os.path.join(runs_dir, f"joint_{sum(counts)}classes_{iters}it_seed{seed}")
        return Run(out_dir, str(sum(counts)), method, seed, iters, setting, tuple(extra))
    out_dir = method_run_dir(runs_dir, spec, method, seed, setting)
    return Run(out_dir, spec, method, seed, setting["iters"], setting, tuple(extra))


def accuracy_suite(setting, seeds, runs_dir, extra, jobs=1):
    """Every (spec, method, seed) of the suite, trained on ``jobs`` workers: the
    shared stage-0 models are queued first, then the joint runs (which need none),
    then the runs that start from a stage-0 model, so no worker waits on a stage 0
    while another run could start."""
    plan = {(spec, method, seed): accuracy_run(runs_dir, spec, method, seed, setting, extra)
            for seed in seeds for spec in setting["specs"] for method in METHODS}
    to_train = {}  # out_dir -> (spec, run); a joint run shared by several specs trains once
    for (spec, method, seed), run in plan.items():
        if finished(run) is None:
            to_train.setdefault(run.out_dir, (spec, run))
        else:
            log(f"{spec} {method} seed {seed}: reusing {run.out_dir}")
    log(f"{len(to_train)} runs to train, {jobs} at a time")
    with ThreadPoolExecutor(jobs) as pool:
        bases = {}
        for spec, run in to_train.values():
            first = parse_stage_spec(spec)[0]
            if run.method != "joint" and (first, run.seed) not in bases:
                bases[first, run.seed] = pool.submit(base_run, runs_dir, first, run.seed, setting, extra)

        def train(spec, run):
            if run.method != "joint":
                seed_stage0(bases[parse_stage_spec(spec)[0], run.seed].result(), run.out_dir)
            log(f"{spec} {run.method} seed {run.seed}: training")
            outcome = run_training(run)
            log(f"{spec} {run.method} seed {run.seed}: finished in {outcome[0] / 60:.1f} min")
            return outcome

        joint_first = sorted(to_train.items(), key=lambda item: item[1][1].method != "joint")
        trained = {out_dir: pool.submit(train, spec, run) for out_dir, (spec, run) in joint_first}
    records = []
    for (spec, method, seed), run in plan.items():
        wall, rss, command = trained[run.out_dir].result() if run.out_dir in trained else (None, None, None)
        results = finished(run)
        last = results["stages"][-1]
        times = step_times(os.path.join(run.out_dir, f"stage_{last['stage']}"))
        records.append(
            {
                "suite": "accuracy",
                "spec": spec,
                "method": method,
                "seed": seed,
                "iterations_per_stage": run.iters,
                "stage0_iterations": setting["base_iters"],
                "last_stage": {k: v for k, v in last.items() if k not in ("per_class", "forgetting_per_class")},
                "summary": results.get("summary", {}),
                "step_time_s": statistics.median(times) if times else None,
                "peak_rss_mib": rss,
                "wall_s": wall,
                "command": command,
            }
        )
    return records


def ablation_suite(setting, seed, runs_dir, accuracy_dir, extra, jobs=1):
    """The first spec of the suite (10+10) with ``finetune`` and ``ilmil`` minus
    each term in turn, trained on ``jobs`` workers, every variant starting from the
    accuracy suite's stage-0 model (in ``accuracy_dir``, same protocol), whose
    finetune and full ilmil runs are reused when they are finished."""
    spec = setting["specs"][0]
    variants = {"finetune": ("finetune", []), **{name: ("ilmil", opts) for name, opts in ABLATIONS.items()}}
    runs = {}
    for name, (method, opts) in variants.items():
        slug = name.replace(" ", "_").replace("(", "").replace(")", "")
        in_accuracy_suite = Run(method_run_dir(accuracy_dir, spec, method, seed, setting), spec, method, seed,
                                setting["iters"], setting, (*extra, *opts))
        reuse = not opts and finished(in_accuracy_suite) is not None
        own_dir = method_run_dir(runs_dir, spec, method, seed, setting, variant=slug)
        runs[name] = in_accuracy_suite if reuse else replace(in_accuracy_suite, out_dir=own_dir)
    to_train = [name for name in variants if finished(runs[name]) is None]
    for name in variants.keys() - set(to_train):
        log(f"{spec} {name}: reusing {runs[name].out_dir}")
    log(f"{len(to_train)} runs to train, {jobs} at a time")
    if to_train:
        base = base_run(accuracy_dir, parse_stage_spec(spec)[0], seed, setting, extra)

    def train(name):
        seed_stage0(base, runs[name].out_dir)
        log(f"{spec} {name}: training")
        run_training(runs[name])
        log(f"{spec} {name}: finished")

    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(train, name) for name in to_train]:
            future.result()
    records = []
    for name, (method, opts) in variants.items():
        last = finished(runs[name])["stages"][-1]
        records.append({"suite": "ablation", "spec": spec, "variant": name, "method": method, "opts": opts,
                        "seed": seed, "iterations_per_stage": setting["iters"],
                        "stage0_iterations": setting["base_iters"],
                        "last_stage": {k: v for k, v in last.items() if k not in ("per_class", "forgetting_per_class")}})
    return records


def ablation_table(records):
    full = next(r["last_stage"] for r in records if r["variant"] == "ilmil (all terms)")
    lines = ["| variant | config change | AP50_old | AP50_new | AP50_all | AP_all | AP50_old vs ilmil |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["last_stage"] is not full and r["method"] != "finetune"):
        last = r["last_stage"]
        off = f"`{' '.join(r['opts'])}`" if r["opts"] else ("every term (no teacher)" if r["method"] == "finetune" else "")
        change = "" if last is full else f"{last['AP50_old'] - full['AP50_old']:+.1f}"
        lines.append(f"| {r['variant']} | {off} | {_fmt(last['AP50_old'])} | {_fmt(last['AP50_new'])} | "
                     f"{_fmt(last['AP50'])} | {_fmt(last['AP'])} | {change} |")
    return "\n".join(lines)


def _fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}"


def accuracy_table(records):
    by_key = {}
    for r in records:
        by_key.setdefault((r["spec"], r["method"]), []).append(r)
    lines = [
        "| spec | method | AP50_old | AP50_new | AP50_all | AP_all | forgetting AP50 | AP50_all / joint |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (spec, method), runs in by_key.items():
        joint = {r["seed"]: r["last_stage"]["AP50"] for r in by_key.get((spec, "joint"), [])}
        ratios = [r["last_stage"]["AP50"] / joint[r["seed"]] for r in runs if joint.get(r["seed"])]
        cells = [
            _mean_spread([r["last_stage"].get(k) for r in runs]) for k in ("AP50_old", "AP50_new", "AP50", "AP")
        ]
        forgetting = _mean_spread([r["last_stage"].get("forgetting_AP50") for r in runs])
        ratio = _mean_spread([100 * x for x in ratios])
        lines.append(f"| {spec} | {method} | {' | '.join(cells)} | {forgetting} | {ratio} % |")
    return "\n".join(lines)


# The speed suite's runs: (record key, method, config overrides).
SPEED_RUNS = [
    ("finetune", "finetune", []),
    ("ilmil", "ilmil", []),
    ("ilmil_bfloat16_teacher", "ilmil", ["ILMIL.TEACHER.PRECISION", "bfloat16"]),
]


def speed_suite(variant, runs_dir, data, extra):
    """Step time, peak memory of finetune vs ilmil (teacher in float32 and in
    bfloat16) on stage 1 of shapes 10+10, from one shared stage-0 model; inference
    and evaluation speed; generation speed."""
    setting = SPEED[variant]
    base = Run(os.path.join(runs_dir, "stage0"), "10", "finetune", 0, 100, data, tuple(extra))
    if finished(base) is None:
        log("speed: training a short stage-0 model to start stage 1 from")
        run_training(base)
    teacher = os.path.join(base.out_dir, "stage_0", "model_final.pth")
    measured = {}
    for key, method, opts in SPEED_RUNS:
        run = Run(os.path.join(runs_dir, key), "10+10", method, 0, setting["iters"], data, (*extra, *opts),
                  flags=("--start-stage", "1", "--teacher-weights", teacher))
        shutil.rmtree(run.out_dir, ignore_errors=True)  # timings are always fresh
        log(f"speed: {key}, {setting['iters']} iterations of stage 1")
        wall, rss, command = run_training(run)
        times = step_times(os.path.join(run.out_dir, "stage_1"))[setting["warmup"]:]
        with open(os.path.join(run.out_dir, "stage_1", "metrics_eval.json")) as f:
            evaluation = json.load(f)
        measured[key] = {
            "step_time_median_s": statistics.median(times),
            "steps_timed": len(times),
            "peak_rss_mib": rss,
            "eval_s_per_100_images": 100 * evaluation["eval_time_s"] / evaluation["num_images"],
            "command": command,
        }
    count = 200 if variant == "quick" else 500
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_shapes_dataset(tmp, num_train=count, num_test=0, seed=123, progress=False)
        generation = count / (time.perf_counter() - start)
    f = measured["finetune"]
    return [
        {
            "suite": "speed",
            "variant": variant,
            **measured,
            "step_time_ratio": measured["ilmil"]["step_time_median_s"] / f["step_time_median_s"],
            "step_time_ratio_bfloat16_teacher": (
                measured["ilmil_bfloat16_teacher"]["step_time_median_s"] / f["step_time_median_s"]
            ),
            "peak_memory_ratio": measured["ilmil"]["peak_rss_mib"] / f["peak_rss_mib"],
            "inference_images_per_s": 100 / measured["ilmil"]["eval_s_per_100_images"],
            "shapes_generation_images_per_s": generation,
        }
    ]


def pruning_suite(variant, setting, runs_dir, extra):
    """shapes 10+10 ilmil, unpruned and with the stage-0 model pruned at each ratio
    (one shared stage 0); the final model's size, speed and AP50_all."""
    records = []
    base = None
    for ratio in PRUNE_RATIOS[variant]:
        run = Run(os.path.join(runs_dir, f"10+10_ilmil_prune{ratio}"), "10+10", "ilmil", 0, setting["iters"],
                  setting, tuple(extra), flags=("--prune", str(ratio)) if ratio else ())
        if finished(run) is None:
            if base is not None:
                seed_stage0(base, run.out_dir)
            log(f"pruning: 10+10 ilmil, ratio {ratio}: training")
            run_training(run)
        else:
            log(f"pruning: ratio {ratio}: reusing {run.out_dir}")
        base = base or run.out_dir
        last = finished(run)["stages"][-1]
        records.append({"suite": "pruning", "spec": "10+10", "method": "ilmil", "ratio": ratio,
                        "iterations_per_stage": setting["iters"], "AP50_all": last["AP50"], "AP_all": last["AP"],
                        "AP50_old": last["AP50_old"], "AP50_new": last["AP50_new"],
                        **measure_final_model(run.out_dir, last["stage"])})
    return records


def measure_final_model(run_dir, stage):
    """Parameters, GFLOPs and CPU latency of a run's stage model on its first test image."""
    import torch
    from detectron2.data import detection_utils

    from ilmil.checkpoint import safe_load
    from ilmil.config import get_ilmil_cfg
    from ilmil.modeling import checkpoint_class_names, load_detector
    from ilmil.pruning import measure_model

    weights = os.path.join(run_dir, f"stage_{stage}", "model_final.pth")
    checkpoint = safe_load(weights)
    cfg = get_ilmil_cfg(os.path.join(run_dir, "config.yaml"))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(checkpoint_class_names(checkpoint))
    cfg.ILMIL.TEACHER.WEIGHTS = ""
    model = load_detector(cfg, weights, checkpoint)
    shapes = cfg.ILMIL.SHAPES
    folder = generate_shapes_dataset(os.path.join(os.environ["ILMIL_DATASETS"], "shapes"), 20, shapes.NUM_TRAIN,
                                     shapes.NUM_TEST, shapes.IMAGE_SIZE, shapes.SEED, progress=False)
    with open(os.path.join(folder, "ImageSets", "Main", "test.txt")) as f:
        first_image = os.path.join(folder, "JPEGImages", f"{f.readline().strip()}.jpg")
    image = detection_utils.read_image(first_image, format=cfg.INPUT.FORMAT)
    return measure_model(model, torch.as_tensor(image.transpose(2, 0, 1).copy()))


def pruning_table(records):
    base = records[0]
    lines = ["| pruned | parameters (M) | GFLOPs (detector) | GFLOPs (backbone+FPN) | CPU latency (ms) | "
             "AP50_all | AP50_old | AP50_new | vs unpruned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        change = (f"params {100 * (r['params'] / base['params'] - 1):+.0f} %, GFLOPs "
                  f"{100 * (r['gflops'] / base['gflops'] - 1):+.0f} %, AP50 {r['AP50_all'] - base['AP50_all']:+.1f}")
        lines.append(f"| {r['ratio']:.0%} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {r['gflops_backbone']:.2f} | "
                     f"{r['latency_ms']:.0f} | {_fmt(r['AP50_all'])} | {_fmt(r['AP50_old'])} | "
                     f"{_fmt(r['AP50_new'])} | {change if r is not base else ''} |")
    return "\n".join(lines)


def speed_table(record):
    f, i, b = record["finetune"], record["ilmil"], record["ilmil_bfloat16_teacher"]
    return "\n".join(
        [
            "| measure | finetune | ilmil | ratio | ilmil, bfloat16 teacher | ratio |",
            "|---|---|---|---|---|---|",
            f"| training step, median over {i['steps_timed']} it (s) | {f['step_time_median_s']:.3f} | "
            f"{i['step_time_median_s']:.3f} | {record['step_time_ratio']:.2f} | {b['step_time_median_s']:.3f} | "
            f"{record['step_time_ratio_bfloat16_teacher']:.2f} |",
            f"| peak resident memory (MiB) | {f['peak_rss_mib']:.0f} | {i['peak_rss_mib']:.0f} | "
            f"{record['peak_memory_ratio']:.2f} | {b['peak_rss_mib']:.0f} | {b['peak_rss_mib'] / f['peak_rss_mib']:.2f} |",
            f"| evaluation time per 100 images (s) | {f['eval_s_per_100_images']:.1f} | "
            f"{i['eval_s_per_100_images']:.1f} | | | |",
            f"| inference + evaluation (images/s) | | {record['inference_images_per_s']:.1f} | | | |",
            f"| shapes generation (images/s) | | {record['shapes_generation_images_per_s']:.0f} | | | |",
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["accuracy", "speed", "pruning", "ablation"], required=True)
    parser.add_argument("--quick", action="store_true", help="the < 10 minute variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "benchmarks", "runs"))
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--markdown", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--specs", nargs="+", help="override the suite's stage specs")
    parser.add_argument("--iters", type=int, help="override the iterations per stage")
    parser.add_argument("--base-iters", type=int,
                        help="iterations of stage 0, shared by every method (default: 3200, --quick: --iters)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each with cores / jobs threads (accuracy and ablation suites)")
    parser.add_argument("--num-train", type=int, help="override the shapes train images")
    parser.add_argument("--num-test", type=int, help="override the shapes test images")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every run")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and args.suite not in ("accuracy", "ablation"):
        parser.error(f"--jobs applies to the accuracy and ablation suites; the {args.suite} suite times its runs alone")

    os.environ.setdefault("ILMIL_DATASETS", os.path.join(ROOT, "datasets"))
    if args.jobs > 1:  # one torch thread pool per run, sized so the runs share the cores
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    variant = "quick" if args.quick else "full"
    suite_name = f"{args.suite}_{variant}"
    runs_dir = os.path.join(args.runs_dir, suite_name)
    start = time.perf_counter()
    setting = dict(ACCURACY[variant])
    for key in ("specs", "iters", "num_train", "num_test"):
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key)
    setting["base_iters"] = args.base_iters or setting.get("base_iters", setting["iters"])
    if args.suite == "accuracy":
        records = accuracy_suite(setting, args.seeds, runs_dir, args.opts, args.jobs)
        table = accuracy_table(records)
        protocol = (
            f"shapes ({setting['num_train']} train / {setting['num_test']} test, 256 px), "
            f"configs/shapes/faster_rcnn_R18_FPN_cpu.yaml, batch {BATCH}, {setting['base_iters']} iterations for "
            f"stage 0 (one model shared by every method), {setting['iters']} for each later stage "
            f"(joint: the sum), seeds {' '.join(map(str, args.seeds))}"
        )
    elif args.suite == "ablation":
        accuracy_dir = os.path.join(args.runs_dir, f"accuracy_{variant}")
        records = ablation_suite(setting, args.seeds[0], runs_dir, accuracy_dir, args.opts, args.jobs)
        table = ablation_table(records)
        protocol = (
            f"shapes {setting['specs'][0]} ({setting['num_train']} train / {setting['num_test']} test, 256 px), "
            f"batch {BATCH}, {setting['base_iters']} iterations for stage 0, {setting['iters']} for stage 1, "
            f"seed {args.seeds[0]}; ilmil variants: {', '.join(ABLATIONS)}; every variant from the same "
            "stage-0 model"
        )
    elif args.suite == "pruning":
        records = pruning_suite(variant, setting, runs_dir, args.opts)
        table = pruning_table(records)
        protocol = (
            f"shapes 10+10 ilmil ({setting['num_train']} train / {setting['num_test']} test, 256 px), "
            f"batch {BATCH}, {setting['iters']} iterations per stage; the stage-0 model pruned (L1, residual-block "
            "inner channels) before stage 1, teacher unpruned; final (stage-1) model measured on one test image, "
            "latency = median of 20 CPU passes"
        )
    else:
        records = speed_suite(variant, runs_dir, setting, args.opts)
        table = speed_table(records[0])
        protocol = f"stage 1 of shapes 10+10, batch {BATCH}, {SPEED[variant]['iters']} iterations"
    os.makedirs(args.results_dir, exist_ok=True)
    env = machine()
    with open(os.path.join(args.results_dir, f"{suite_name}.json"), "w") as f:
        json.dump({"machine": env, "records": records}, f, indent=2)
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = (
        f"\n## {suite_name} — {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"- machine: {env['cpu']}, {env['cores']} cores; Python {env['python']}, torch {env['torch']}, "
        f"detectron2 {env['detectron2']}\n- command: `{command}`\n- protocol: {protocol}\n"
        f"- suite wall time: {(time.perf_counter() - start) / 60:.1f} min\n\n{table}\n"
    )
    with open(args.markdown, "a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()
