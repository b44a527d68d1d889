"""A suite's records from its finished runs: the numbers each table reads."""
import json
import os
import statistics
import tempfile
import time

from ilmil.data import generate_shapes_dataset
from ilmil.file_io import atomic_write

from .harness import budget_name, machine, read_outcome, read_results

MEASURE_RECORD = "model_measures.json"  # {stage: size, GFLOPs, latency} of a run's final models


def _iteration_times(run, stage):
    with open(os.path.join(run.out_dir, f"stage_{stage}", "iteration_times.json")) as f:
        return json.load(f)


def step_times(run, stage):
    return _iteration_times(run, stage)["seconds"]


def _without_per_class(stage):
    return {k: v for k, v in stage.items() if k not in ("per_class", "forgetting_per_class")}


def training_records(suite, setting, planned, outcomes, extra):
    """One record per (spec, variant, seed): its last stage, the run summary, the
    median step time of its last stage (less the setting's warm-up steps), and its wall time, peak memory, command and
    machine as measured when it was trained (by this invocation or, for a reused
    folder, by the one that trained it)."""
    env = machine()
    variants = {v.name: v for v in setting.variants}
    records = []
    for (spec, name, seed), run in planned.items():
        results = read_results(run)
        last = results["stages"][-1]
        times = step_times(run, last["stage"])[setting.warmup:]
        outcome = outcomes.get(run.out_dir) or read_outcome(run)
        records.append({
            "suite": suite.name, "spec": spec, "variant": name, "method": run.method,
            "detector": variants[name].detector, "row": variants[name].row,
            "opts": list(variants[name].opts), "seed": seed,
            "budget": budget_name(setting), "num_train": setting.num_train, "num_test": setting.num_test,
            "extra_opts": list(extra),
            "iterations_per_stage": run.iters, "stage0_iterations": setting.base_iters,
            "last_stage": _without_per_class(last), "summary": results.get("summary", {}),
            "step_time_s": statistics.median(times) if times else None,
            "peak_rss_mib": outcome.get("peak_rss_mib"), "wall_s": outcome.get("wall_s"),
            # Where it trained (a folder of an older harness: where it is merged).
            "command": outcome.get("command"), "machine": outcome.get("machine", env),
        })  # fmt: skip
    return records


def pruning_records(suite, setting, planned, outcomes, extra):
    """The training record of each variant, with its pruning (ratio, fine-tuning, the
    AP50 of the model stage 1 starts from) and the final model's size, GFLOPs and latency."""
    records = []
    for record, run in zip(training_records(suite, setting, planned, outcomes, extra), planned.values()):
        last = record["last_stage"]
        results = read_results(run)
        pruning = results.get("pruning")
        ratio = float(dict(zip(run.flags[::2], run.flags[1::2])).get("--prune", 0.0))
        start_ap50 = pruning["after"]["AP50"] if pruning else results["stages"][0]["AP50"]
        records.append({**record, "ratio": ratio, "AP50_all": last["AP50"], "AP_all": last["AP"],
                        "AP50_old": last["AP50_old"], "AP50_new": last["AP50_new"],
                        "finetune_iters": pruning["finetune_iters"] if pruning else 0,
                        "finetune_teacher": bool(pruning and pruning.get("finetune_teacher")),
                        "stage1_start_AP50": start_ap50, **measure_final_model(run, last["stage"])})
    return records


def kd_records(suite, setting, planned, outcomes, extra):
    """The training record of each student with its AP and its teacher's (evaluated by
    the compression run on the same test data), and the parameters and GFLOPs of both models."""
    variants = {v.name: v for v in setting.variants}
    records = []
    for record, run in zip(training_records(suite, setting, planned, outcomes, extra), planned.values()):
        variant = variants[record["variant"]]
        teacher = read_results(run)["teacher"]
        records.append({**record, "student": variant.student,
                        "AP50": record["last_stage"]["AP50"], "AP": record["last_stage"]["AP"],
                        "teacher_AP50": teacher["AP50"], "teacher_AP": teacher["AP"],
                        # Each model measured once, its teacher's too: kept in the run's folder.
                        "student_model": measure_final_model(run, 0),
                        "teacher_model": measure_final_model(run.stage0, 0)})
    return records


def measure_final_model(run, stage):
    """Parameters, GFLOPs and latency (on the run's device) of a run's stage model on its first
    test image, measured once and kept in the run's folder: the latency depends on the machine's load,
    and records are rebuilt from reused runs at every invocation."""
    path = os.path.join(run.out_dir, MEASURE_RECORD)
    measures = {}
    if os.path.exists(path):
        with open(path) as f:
            measures = json.load(f)
    if str(stage) not in measures:
        measures[str(stage)] = _measure_model(run, stage)
        atomic_write(path, lambda f: json.dump(measures, f), mode="w")
    return measures[str(stage)]


def _measure_model(run, stage):
    import torch
    from detectron2.data import detection_utils

    from ilmil.checkpoint import checkpoint_class_names, safe_load
    from ilmil.config import get_ilmil_cfg, set_num_classes
    from ilmil.data import shapes_num_classes
    from ilmil.modeling import load_detector
    from ilmil.pruning import measure_model

    weights = run.final_model(stage)
    checkpoint = safe_load(weights)
    cfg = get_ilmil_cfg(os.path.join(run.out_dir, "config.yaml"))
    set_num_classes(cfg, len(checkpoint_class_names(checkpoint)))
    cfg.ILMIL.TEACHER.WEIGHTS = ""
    model = load_detector(cfg, weights, checkpoint)
    shapes = cfg.ILMIL.SHAPES
    folder = generate_shapes_dataset(os.path.join(os.environ["ILMIL_DATASETS"], "shapes"),
                                     shapes_num_classes(shapes, run.spec), shapes.NUM_TRAIN, shapes.NUM_TEST,
                                     shapes.IMAGE_SIZE, shapes.SEED, progress=False)
    with open(os.path.join(folder, "ImageSets", "Main", "test.txt")) as f:
        first_image = os.path.join(folder, "JPEGImages", f"{f.readline().strip()}.jpg")
    image = detection_utils.read_image(first_image, format=cfg.INPUT.FORMAT)
    return measure_model(model, torch.as_tensor(image.transpose(2, 0, 1).copy()))


def speed_records(suite, setting, planned, outcomes, extra):
    """One record: step time and peak memory of each variant on stage 1 (less the
    warm-up steps), their ratios to finetune, inference and generation speed."""
    measured = {}
    for (_, name, _), run in planned.items():
        iterations = _iteration_times(run, 1)
        times = iterations["seconds"][setting.warmup:]
        with open(os.path.join(run.out_dir, "stage_1", "metrics_eval.json")) as f:
            evaluation = json.load(f)
        outcome = outcomes[run.out_dir]
        gpu = {"peak_cuda_memory_mib": iterations["peak_cuda_memory_mib"]} if "peak_cuda_memory_mib" in iterations else {}
        measured[name] = {
            "step_time_median_s": statistics.median(times), "steps_timed": len(times),
            "peak_rss_mib": outcome["peak_rss_mib"], **gpu,
            "eval_s_per_100_images": 100 * evaluation["eval_time_s"] / evaluation["num_images"],
            "command": outcome["command"],
        }  # fmt: skip
    count = 200 if setting is suite.quick else 500
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_shapes_dataset(tmp, num_train=count, num_test=0, seed=123, progress=False)
        generation = count / (time.perf_counter() - start)
    f, i = measured["finetune"], measured["ilmil"]
    return [{
        "suite": suite.name, "variant": "quick" if setting is suite.quick else "full",
        # Overrides (a GPU, mixed precision) are a protocol of their own: keyed apart, named on the page.
        "num_train": setting.num_train, "num_test": setting.num_test, "extra_opts": list(extra), **measured,
        "step_time_ratio": i["step_time_median_s"] / f["step_time_median_s"],
        "step_time_ratio_bfloat16_teacher":
            measured["ilmil_bfloat16_teacher"]["step_time_median_s"] / f["step_time_median_s"],
        "peak_memory_ratio": i["peak_rss_mib"] / f["peak_rss_mib"],
        "inference_images_per_s": 100 / i["eval_s_per_100_images"],
        "shapes_generation_images_per_s": generation, "machine": machine(),
    }]  # fmt: skip
