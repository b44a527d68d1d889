"""The benchmark harness: tiny suites end to end, and its pure parts (planning,
the reuse check, record merging, refused flags)."""
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO_ROOT, TINY_SHAPES

from benchmarks import records
from benchmarks import harness
from benchmarks.harness import (CONFIG_RECORD, OUTCOME_RECORD, BenchError, Run, describe, execute, machine, plan,
                                reuse_status, same_machine, train)
from benchmarks.run import main as bench_main
from benchmarks.suites import ABLATION, ACCURACY, KD, ONE_STAGE, STAGE_IMAGES
from benchmarks.tables import kd_table, one_stage_table, pruning_table, stage_images_table, suite_page
from ilmil.config import check_lr_steps, get_ilmil_cfg
from ilmil.data import shapes_num_classes
from ilmil.distill import enabled_terms

TINY_OPTS = [
    "ILMIL.SHAPES.NUM_CLASSES", str(TINY_SHAPES["num_classes"]),
    "ILMIL.SHAPES.IMAGE_SIZE", str(TINY_SHAPES["image_size"]),
    "ILMIL.SHAPES.SEED", str(TINY_SHAPES["seed"]),
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def _run_harness(suite, datasets_root, tmp_path, *args, opts=()):
    """``benchmarks/run.py --suite SUITE --quick ARGS`` on the tiny shapes set (and the
    config overrides ``opts``), with its runs and results under ``tmp_path``; asserts
    it succeeds, returns its stdout."""
    cmd = [
        sys.executable, os.path.join(REPO_ROOT, "benchmarks", "run.py"), "--suite", suite, "--quick", *args,
        "--num-train", str(TINY_SHAPES["num_train"]), "--num-test", str(TINY_SHAPES["num_test"]),
        "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"), *TINY_OPTS, *opts,
    ]  # fmt: skip
    env = dict(os.environ, ILMIL_DATASETS=str(datasets_root), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _last_iteration(stage_dir):
    return json.loads((stage_dir / "metrics.json").read_text().splitlines()[-1])["iteration"]


# The accuracy suite's budget of the harness tests: the pruning and ablation suites run at it
# too, so they reuse its stage 0 and its plain methods and train only their own variants.
BUDGET = ("--iters", "4", "--base-iters", "6")


@pytest.fixture(scope="module")
def accuracy_runs(tiny_datasets_root, tmp_path_factory):
    """A folder whose runs and results hold the accuracy suite's tiny 10+10 (two workers: the
    parallel path, whose stage 0 must still be trained once, before its users)."""
    root = tmp_path_factory.mktemp("bench")
    _run_harness("accuracy", tiny_datasets_root, root, "--specs", "10+10", *BUDGET, "--jobs", "2")
    return root


def test_accuracy_harness_shares_stage0_and_reuses_finished_runs(accuracy_runs, tiny_datasets_root):
    root = accuracy_runs
    with open(root / "results" / "accuracy_quick.json") as f:
        data = json.load(f)
    records_ = {r["method"]: r for r in data["records"]}
    assert set(records_) == {"finetune", "faster-ilod", "ilmil", "joint"}
    assert records_["ilmil"]["machine"]["cores"] == os.cpu_count()
    assert records_["joint"]["iterations_per_stage"] == 6 + 4  # stage 0's budget plus stage 1's
    assert records_["ilmil"]["iterations_per_stage"] == 4 and records_["ilmil"]["budget"] == "6+4"
    runs = root / "runs" / "accuracy_quick"
    for method, record in records_.items():
        # The record is the run's own last stage, not a figure of another run.
        folder = f"10+10_{method}_6+4it_seed0" if method != "joint" else "joint_20classes_10it_seed0"
        results = json.loads((runs / folder / "results.json").read_text())
        assert record["last_stage"]["AP50"] == results["stages"][-1]["AP50"]
        assert record["step_time_s"] > 0
    # The shared stage 0's evaluation completes each method's results: forgetting is measured.
    assert records_["finetune"]["last_stage"]["forgetting_AP50"] is not None
    # One stage-0 model of 6 iterations; every method starts from it (--start-stage 1) and
    # evaluates it as its stage 0, nothing is copied into their folders, and stage 1 trains its own 4.
    runs = root / "runs" / "accuracy_quick"
    assert _last_iteration(runs / "base_10classes_6it_seed0" / "stage_0") == 5
    for method in ("finetune", "ilmil"):
        run = runs / f"10+10_{method}_6+4it_seed0"
        assert not (run / "stage_0" / "model_final.pth").exists() and _last_iteration(run / "stage_1") == 3
        assert json.loads((run / CONFIG_RECORD).read_text())["fingerprint"]
        assert "--start-stage 1 --teacher-weights" in json.loads((run / "run.json").read_text())["command"]

    table = (root / "results" / "accuracy_quick.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 10+10 |")]
    assert [line.split("|")[2].strip() for line in rows] == ["finetune", "faster-ilod", "ilmil", "joint"]
    # 10+10 is the suite's spec: the command names the budget only.
    command = next(line for line in table.splitlines() if line.startswith("- command: "))
    assert "python benchmarks/run.py --suite accuracy --quick --base-iters 6 --iters 4 --num-train" in command
    # The overrides follow "--": after a list option they would be read as its values.
    assert " --num-test 8 -- ILMIL.SHAPES.NUM_CLASSES 20 " in command

    # Again: everything is reused, nothing trained, the records are the same ones.
    again = _run_harness("accuracy", tiny_datasets_root, root, "--specs", "10+10", *BUDGET)
    assert "0 runs to train" in again
    assert len(json.loads((root / "results" / "accuracy_quick.json").read_text())["records"]) == 4


def test_pruning_harness_prunes_the_shared_stage0_and_finetunes_it_with_and_without_teacher(
        accuracy_runs, tiny_datasets_root):
    root = accuracy_runs
    out = _run_harness("pruning", tiny_datasets_root, root, *BUDGET)
    assert "2 runs to train" in out  # the stage 0 and the unpruned ilmil run are the accuracy suite's
    with open(root / "results" / "pruning_quick.json") as f:
        records_ = {r["variant"]: r for r in json.load(f)["records"]}
    assert list(records_) == ["ilmil", "ilmil_prune0.5_finetune", "ilmil_prune0.5_finetune_teacher"]
    unpruned, plain, teacher = records_.values()
    assert (unpruned["ratio"], unpruned["finetune_iters"]) == (0.0, 0)
    assert (plain["ratio"], plain["finetune_iters"], plain["finetune_teacher"]) == (0.5, 20, False)
    assert (teacher["ratio"], teacher["finetune_iters"], teacher["finetune_teacher"]) == (0.5, 20, True)
    for pruned in (plain, teacher):
        assert pruned["params"] < 0.8 * unpruned["params"] and pruned["gflops"] < unpruned["gflops"]
        assert 0.0 <= pruned["AP50_all"] <= 100.0 and pruned["latency_ms"] > 0
        assert 0.0 <= pruned["stage1_start_AP50"] <= 100.0
    # The unpruned row is the accuracy suite's ilmil run; each pruned run pruned that run's
    # stage-0 model (--prune with --start-stage 1), trained once, inside itself.
    runs = root / "runs"
    stage0 = runs / "accuracy_quick" / "base_10classes_6it_seed0" / "stage_0" / "model_final.pth"
    for slug, distilled in (("finetune", False), ("finetune_teacher", True)):
        run = runs / "pruning_quick" / f"10+10_ilmil_prune0.5_{slug}_6+4it_seed0"
        assert json.loads((run / "results.json").read_text())["pruning"]["weights"] == str(stage0)
        assert not (run / "stage_0" / "model_final.pth").exists()
        logged = (run / "stage_0" / "pruned" / "finetune" / "metrics.json").read_text()
        assert ("loss_distill_feat" in logged) == distilled
        assert ("its unpruned self as teacher" in (run / "report.md").read_text()) == distilled
    page = (root / "results" / "pruning_quick.md").read_text()
    assert "| 50% | 20 it, plain |" in page and "| 50% | 20 it, unpruned model as teacher |" in page


def test_ablation_harness_switches_one_term_off_per_variant(accuracy_runs, tiny_datasets_root):
    # Two ablated variants beside the two methods they sit between (each variant is one more
    # training; the other variants differ only in their overrides).
    root = accuracy_runs
    variants = ["finetune", "without pseudo-labels", "without RCN term", "ilmil (all terms)"]
    out = _run_harness("ablation", tiny_datasets_root, root, "--specs", "10+10", *BUDGET, "--variants", *variants)
    assert "2 runs to train" in out  # the plain methods and their stage 0 are the accuracy suite's
    with open(root / "results" / "ablation_quick.json") as f:
        records_ = json.load(f)["records"]
    assert [r["variant"] for r in records_] == variants
    runs = root / "runs"
    # Each variant's run really had its term off: its resolved config says so.
    config = (runs / "ablation_quick" / "10+10_without_RCN_term_6+4it_seed0" / "config.yaml").read_text()
    assert "RCN:" in config and config.split("RCN:")[1].split("ENABLED:")[1].split()[0] == "false"
    ablated = runs / "ablation_quick" / "10+10_without_pseudo-labels_6+4it_seed0"
    assert (ablated / "results.json").exists() and not (ablated / "stage_0" / "model_final.pth").exists()
    assert all(0.0 <= r["last_stage"]["AP50_old"] <= 100.0 for r in records_)
    page = (root / "results" / "ablation_quick.md").read_text()
    table = [line.split("|")[1].strip() for line in page.splitlines() if line.startswith("| ") and "variant" not in line]
    assert table[:3] == ["finetune", "ilmil (all terms)", "without pseudo-labels"]
    assert "| without pseudo-labels | `ILMIL.PSEUDO_LABELS.ENABLED False` |" in page


def _accuracy_plan(tmp_path, specs, extra=()):
    return plan(ACCURACY, False, specs, (0,), str(tmp_path), list(extra))


def test_a_stage0_is_keyed_by_its_data(tmp_path):
    planned = _accuracy_plan(tmp_path, ("10+10", "15+5", "40+40"))
    ten, fifteen, forty = (planned[spec, "ilmil", 0].stage0 for spec in ("10+10", "15+5", "40+40"))
    # 10+10 and 15+5 train on the 20-class data, as a spec of 10 or 15 alone would:
    # their folders keep the names the recorded runs have.
    assert os.path.basename(ten.out_dir) == "base_10classes_3200it_seed0"
    assert shapes_num_classes(ten.config().ILMIL.SHAPES, ten.spec) == 20
    assert fifteen.out_dir != ten.out_dir
    # 40 classes alone would generate 40-class data; a 40+40 stage 0 needs the 80-class data.
    assert os.path.basename(forty.out_dir) == "base_40of80classes_3200it_seed0"
    assert shapes_num_classes(forty.config().ILMIL.SHAPES, forty.spec) == 80
    # joint of 10+10 and 15+5 is one run; the start model is not in a run's identity.
    assert planned["10+10", "joint", 0] is planned["15+5", "joint", 0]
    ilmil = planned["10+10", "ilmil", 0]
    assert ilmil.fingerprint() == dataclasses.replace(ilmil, stage0=None).fingerprint()
    assert "--teacher-weights" in ilmil.command() and ten.final_model(0) in ilmil.command()


def test_an_ablation_variant_never_points_at_the_accuracy_suites_folder(tmp_path):
    planned = plan(ABLATION, False, ("10+10",), (0,), str(tmp_path), [])
    accuracy = _accuracy_plan(tmp_path, ("10+10",))
    assert planned["10+10", "ilmil (all terms)", 0].out_dir == accuracy["10+10", "ilmil", 0].out_dir
    assert planned["10+10", "without RCN term", 0].out_dir.endswith("ablation_full/10+10_without_RCN_term_3200+800it_seed0")
    assert planned["10+10", "without RCN term", 0].stage0 == accuracy["10+10", "ilmil", 0].stage0


def test_the_stage_images_suite_trains_one_spec_under_both_rules_each_run_with_its_stage_0(tmp_path):
    planned = plan(STAGE_IMAGES, False, ("10+10",), (0,), str(tmp_path), [])
    standard, exclusive = planned["10+10", "ilmil standard", 0], planned["10+10", "ilmil exclusive", 0]
    # Not a shared one-stage stage 0: under the exclusive rule its images depend on the whole spec.
    assert standard.stage0 is None and exclusive.stage0 is None
    assert "--start-stage" not in exclusive.command()
    assert (standard.config().ILMIL.STAGE_IMAGES, exclusive.config().ILMIL.STAGE_IMAGES) == ("standard", "exclusive")
    assert standard.fingerprint() != exclusive.fingerprint()
    assert os.path.dirname(exclusive.out_dir) == str(tmp_path / "stage_images_full")
    last = {"num_train_images": 900, "AP50_old": 40.0, "AP50_new": 50.0, "AP50": 45.0, "AP": 20.0,
            "forgetting_AP50": 30.0}
    seed_runs = [{"spec": "10+10", "variant": "ilmil exclusive", "opts": ["ILMIL.STAGE_IMAGES", "exclusive"],
                  "last_stage": stage} for stage in (last, dict(last, num_train_images=800, AP50_old=42.0))]
    table = stage_images_table(seed_runs)
    assert ("| 10+10 | ilmil exclusive | `ILMIL.STAGE_IMAGES exclusive` | 850.0 ± 50.0 | 41.0 ± 1.0 | 50.0 ± 0.0 "
            "| 45.0 ± 0.0 | 20.0 ± 0.0 | 30.0 ± 0.0 |") in table


def test_the_reuse_check_renames_nothing(tmp_path):
    now = Run(str(tmp_path / "2+2_ilmil_6+4it_seed0"), "2+2", "ilmil", 0, 4, 8, 4)
    before = dataclasses.replace(now, opts=("ILMIL.DISTILL.FEAT.WEIGHT", "2.0"))
    assert before.fingerprint() != now.fingerprint() == dataclasses.replace(now).fingerprint()
    assert now.fingerprint() != dataclasses.replace(now, method="faster-ilod").fingerprint()
    assert reuse_status(now) == "new"
    run = tmp_path / "2+2_ilmil_6+4it_seed0"
    run.mkdir()
    (run / CONFIG_RECORD).write_text(json.dumps({"fingerprint": before.fingerprint()}))
    assert reuse_status(before) == "partial"
    (run / "results.json").write_text(json.dumps({"stages": [{"stage": 1}]}))  # started at stage 1
    assert reuse_status(before) == "finished"
    assert reuse_status(now) == "stale" and describe([now]) == {str(run): "stale"}
    # Checked twice, listed, and still where it was: only retraining moves it aside.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2+2_ilmil_6+4it_seed0"]


def test_a_run_too_short_for_a_learning_rate_step_gets_none():
    for iters, steps in ((1, ()), (2, (1,)), (10, (8,))):
        cfg = Run("unused", "20", "finetune", 0, iters, 8, 4).config()
        assert tuple(cfg.SOLVER.STEPS) == steps
        check_lr_steps(cfg)  # what the training tool checks first


def test_a_run_begun_from_a_stage0_that_is_to_be_trained_is_stale(tmp_path, monkeypatch):
    base = Run(str(tmp_path / "base"), "10", "joint", 0, 8, 8, 4)
    runs = [Run(str(tmp_path / name), "10+10", "ilmil", 0, 4, 8, 4, stage0=base, flags=("--start-stage", "1"))
            for name in ("finished", "partial", "new")]
    for run, stages in zip(runs, ([{"stage": 0}, {"stage": 1}], [{"stage": 0}], None)):
        if stages is not None:
            os.makedirs(run.out_dir)
            (Path(run.out_dir) / CONFIG_RECORD).write_text(json.dumps(run.record()))
            (Path(run.out_dir) / "results.json").write_text(json.dumps({"stages": stages}))
    os.makedirs(base.out_dir)
    (Path(base.out_dir) / CONFIG_RECORD).write_text(json.dumps(base.record()))
    (Path(base.out_dir) / "results.json").write_text(json.dumps({"stages": [{"stage": 0}]}))
    assert describe(runs) == {base.out_dir: "finished", runs[0].out_dir: "finished", runs[1].out_dir: "partial",
                              runs[2].out_dir: "new"}
    # The stage 0 retrained (here: its folder gone, as when it was lost): what began from it is set aside.
    shutil.rmtree(base.out_dir)
    assert describe(runs) == {base.out_dir: "new", runs[0].out_dir: "stale", runs[1].out_dir: "stale",
                              runs[2].out_dir: "new"}
    # Its training sets it aside, though the folder alone looks finished.
    monkeypatch.setattr(Run, "command", lambda self: [sys.executable, "-c", "pass"])
    assert harness.reuse_status(runs[0]) == "finished"
    harness.train(runs[0], status=describe(runs)[runs[0].out_dir])
    assert len(list(tmp_path.glob(f"finished{harness.STALE_MARK}*"))) == 1


def test_a_folder_is_reused_only_if_every_value_it_was_trained_with_is_todays(tmp_path):
    run = Run(str(tmp_path / "20_output"), "20", "finetune", 0, 4, 8, 4, ("ILMIL.DISTILL.DENSE.ENABLED", "True"),
              config_file="configs/shapes/retinanet_R18_FPN_cpu.yaml")
    (tmp_path / "20_output").mkdir()
    (tmp_path / "20_output" / "results.json").write_text(json.dumps({"stages": [{"stage": 0}]}))

    def status_of(record):
        (tmp_path / "20_output" / CONFIG_RECORD).write_text(json.dumps(record))
        return reuse_status(run)

    record = run.record()
    assert status_of(record) == "finished"
    # Trained when the box part's default was L1 (today's is GIoU): not this run, though
    # neither the run nor the suite names the key (the old fingerprint could not tell).
    assert record["config"]["ILMIL.DISTILL.DENSE.BOX_LOSS"] == "'giou'"
    assert status_of(dict(record, config=dict(record["config"], **{"ILMIL.DISTILL.DENSE.BOX_LOSS": "'l1'"}))) == "stale"
    # A key added to the toolkit since the folder was trained counts as trained at its default...
    older = dict(record, config={k: v for k, v in record["config"].items() if k != "ILMIL.DISTILL.DENSE.BOX_LOSS"})
    assert status_of(older) == "finished"
    # ...so a run that sets it otherwise is not that folder's.
    l1 = dataclasses.replace(run, opts=run.opts + ("ILMIL.DISTILL.DENSE.BOX_LOSS", "l1"))
    assert l1.trained_as(older) is False and l1.trained_as(l1.record())
    assert status_of(dict(record, schedule=["20", "finetune", 1, []])) == "stale"  # another seed
    # The settings of a term the run leaves off are never read: a default changed there keeps the
    # folder; the term switched on, or a run that uses it, does not.
    other_split = dict(record, config=dict(record["config"], **{"ILMIL.DISTILL.REVIEW.BG_WEIGHT": "7.0"}))
    assert status_of(other_split) == "finished"
    assert status_of(dict(record, config=dict(record["config"], **{"ILMIL.DISTILL.REVIEW.ENABLED": "True"}))) == "stale"
    review = dataclasses.replace(run, opts=run.opts + ("ILMIL.DISTILL.REVIEW.ENABLED", "True"))
    assert review.trained_as(review.record())
    review_record = review.record()
    review_record["config"]["ILMIL.DISTILL.REVIEW.BG_WEIGHT"] = "7.0"
    assert not review.trained_as(review_record)
    # A folder of an older harness: its fingerprint decides.
    assert status_of({"fingerprint": run.fingerprint()}) == "finished"
    assert status_of({"fingerprint": l1.fingerprint()}) == "stale"
    # Reused, it gets the full record, which a default changed later cannot mislead.
    assert status_of({"fingerprint": run.fingerprint()}) == "finished"
    assert execute([run]) == {}
    assert json.loads((tmp_path / "20_output" / CONFIG_RECORD).read_text()) == run.record()


def test_a_stale_run_is_moved_aside_only_when_retrained(tmp_path, monkeypatch):
    # A run the toolkit refuses at once (more classes than the data has): the training
    # fails, but the stale folder was set aside first, as the retraining needs.
    run = Run(str(tmp_path / "30+30_ilmil"), "30+30", "ilmil", 0, 4, 8, 4, ("ILMIL.SHAPES.NUM_CLASSES", "20"))
    (tmp_path / "30+30_ilmil").mkdir()
    (tmp_path / "30+30_ilmil" / CONFIG_RECORD).write_text(json.dumps({"fingerprint": "another config"}))
    monkeypatch.setenv("ILMIL_DATASETS", str(tmp_path / "datasets"))
    with pytest.raises(BenchError, match="bench_stdout.log"):
        train(run)
    (stale,) = tmp_path.glob("30+30_ilmil.stale-*")
    assert json.loads((stale / CONFIG_RECORD).read_text())["fingerprint"] == "another config"
    assert json.loads((tmp_path / "30+30_ilmil" / CONFIG_RECORD).read_text()) == run.record()


def test_a_stopped_harness_stops_its_trainings_and_starts_no_other(tmp_path, monkeypatch):
    # A training that would run for a minute, in a worker thread as execute() runs them.
    monkeypatch.setattr(Run, "command", lambda self: [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(harness, "_stop_signal", None)
    run = Run(str(tmp_path / "10+10_ilmil"), "10+10", "ilmil", 0, 4, 8, 4, ())
    errors = []

    def worker():
        try:
            train(run)
        except BenchError as e:
            errors.append(str(e))

    thread = threading.Thread(target=worker)
    thread.start()
    deadline = time.monotonic() + 60  # the folder's records are fsynced first: a busy disk delays the start
    while not harness._TRAININGS and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    (proc,) = harness._TRAININGS
    assert harness.stop_status() is None
    harness.stop_trainings(signal.SIGTERM)
    assert harness.stop_status() == 128 + signal.SIGTERM
    thread.join(timeout=10)
    assert errors and "stopped by a signal" in errors[0]  # terminated by the stop, not failed
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(proc.pid, 0)
    with pytest.raises(BenchError, match="stopped by a signal"):
        train(run)


# The harness with every training replaced by a 60-second sleep (run in its own process).
SLEEPING_HARNESS = """
import sys
from benchmarks import harness
from benchmarks.run import main
harness.Run.command = lambda self: [sys.executable, "-c", "import time; time.sleep(60)"]
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_the_harness_and_its_queue(tmp_path):
    stop = signal.SIGINT  # as a kill does (SIGTERM: the test above)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.Popen([sys.executable, "-c", SLEEPING_HARNESS, "--suite", "accuracy", "--quick", "--variants",
                             "finetune", "ilmil", "joint", "--specs", "10+10", "--runs-dir", str(tmp_path / "runs"),
                             "--results-dir", str(tmp_path)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # the first training (a stage 0) has started
        lines.append(line)
        if ": training" in line:
            break
    proc.send_signal(stop)
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=60) == 128 + stop, "".join(lines)
    # No queued run started after the signal: one training began, in all.
    assert sum(line.rstrip().endswith(": training") for line in lines) == 1, "".join(lines)
    assert "stopped by a signal" in lines[-1]


def test_a_stop_signal_handled_in_a_finaliser_still_stops_the_harness(tmp_path, monkeypatch):
    # Python runs a signal handler wherever the main thread is, a __del__ included, which
    # drops any exception it raises: the handler must stop the harness without one.
    import benchmarks.run as bench_run

    class Finalised:
        def __del__(self):
            harness.stop_trainings(signal.SIGINT)

    def execute_stopped(runs, jobs, fresh=False):
        Finalised()  # collected at once: the signal is handled inside its __del__
        raise BenchError(harness.STOPPED)  # what every worker then returns

    monkeypatch.setattr(bench_run, "execute", execute_stopped)
    monkeypatch.setattr(bench_run.signal, "signal", lambda *args: None)  # pytest keeps its own handlers
    monkeypatch.setattr(harness, "_stop_signal", None)
    monkeypatch.setenv("ILMIL_DATASETS", str(tmp_path / "datasets"))
    assert bench_main(["--suite", "accuracy", "--quick", "--variants", "ilmil", "--specs", "10+10",
                       "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]) == 128 + signal.SIGINT


def test_a_training_reaped_by_the_stop_is_stopped_not_an_error(tmp_path, monkeypatch):
    # terminate() polls before it signals, and so reaps a training that has just ended: the
    # worker's wait then finds no child.
    monkeypatch.setattr(Run, "command", lambda self: [sys.executable, "-c", "pass"])
    monkeypatch.setattr(harness, "_stop_signal", None)
    real_wait4 = os.wait4

    def wait4_after_the_stop_reaped(pid, options):
        real_wait4(pid, options)  # the stop's poll()
        harness._stop_signal = signal.SIGTERM  # the stop, recorded by its handler
        return real_wait4(pid, options)

    monkeypatch.setattr(os, "wait4", wait4_after_the_stop_reaped)
    with pytest.raises(BenchError, match="stopped by a signal"):
        train(Run(str(tmp_path / "10+10_ilmil"), "10+10", "ilmil", 0, 4, 8, 4, ()))


def test_the_stop_handlers_are_the_trainings_only(tmp_path, monkeypatch, capsys):
    # The records' measurements after the trainings take minutes: a signal there stops at once.
    import benchmarks.run as bench_run
    during = {}

    def execute_failing(runs, jobs, fresh=False):
        during.update({stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGINT)})
        raise BenchError("a training failed")

    before = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(bench_run, "execute", execute_failing)
    monkeypatch.setenv("ILMIL_DATASETS", str(tmp_path / "datasets"))
    assert bench_main(["--suite", "accuracy", "--quick", "--variants", "ilmil", "--specs", "10+10",
                       "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]) == 1
    assert during == {signal.SIGTERM: harness.stop_trainings, signal.SIGINT: harness.stop_trainings}
    assert {stop: signal.getsignal(stop) for stop in before} == before
    assert "error: a training failed" in capsys.readouterr().err


def test_a_log_line_is_one_write(monkeypatch):
    # Two training threads log at once: a line written in two parts ran into the other's.
    writes = []
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(write=writes.append, flush=lambda: None))
    harness.log("20_yolov3_output: training")
    (line,) = [text for text in writes if text]  # print's own empty end write splits nothing
    assert line.endswith("] 20_yolov3_output: training\n")


def test_a_dry_run_says_where_a_partial_run_stands(tmp_path, capsys):
    common = ["--suite", "accuracy", "--variants", "ilmil", "--specs", "10+10", "--dry-run",
              "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]
    assert bench_main(common) == 0
    stage0 = capsys.readouterr().out.splitlines()[0].split()[1]
    # Killed at iteration 47: logged up to 39 (the last line cut mid-write), checkpointed at 29.
    stage_dir = tmp_path / stage0 / "stage_0"
    stage_dir.mkdir(parents=True)
    (stage_dir / "metrics.json").write_text('{"iteration": 19}\n{"iteration": 39}\n{"iterat')
    (stage_dir / "last_checkpoint").write_text("model_0000029.pth")
    assert harness.progress(str(tmp_path / stage0)) == "stage_0: logged to iteration 40, resumes at 30"
    assert bench_main(common) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"partial   {tmp_path / stage0}  (stage_0: logged to iteration 40, resumes at 30)")
    (stage_dir / "last_checkpoint").unlink()
    assert harness.progress(str(tmp_path / stage0)) == "stage_0: logged to iteration 40, resumes at 0"


def test_a_failed_run_is_reported_at_once_while_the_others_finish(tmp_path, monkeypatch, capsys):
    # The good run ends 2 s after the bad one has failed, however late a busy machine starts that.
    failed_marker = tmp_path / "bad_exited"
    script = {"bad": f"import sys; open({str(failed_marker)!r}, 'w'); sys.exit(1)",
              "good": f"import os, time\nend = time.time() + 60\n"
                      f"while not os.path.exists({str(failed_marker)!r}) and time.time() < end: time.sleep(0.05)\n"
                      "time.sleep(2)"}
    monkeypatch.setattr(Run, "command", lambda self: [sys.executable, "-c", script[os.path.basename(self.out_dir)]])
    runs = [Run(str(tmp_path / name), "10+10", "ilmil", 0, 4, 8, 4, ()) for name in ("good", "bad")]
    with pytest.raises(BenchError, match="training failed"):
        execute(runs, jobs=2)
    logged = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    failed = next(i for i, line in enumerate(logged) if line.startswith("bad: failed: training failed"))
    assert failed < logged.index(next(line for line in logged if line.startswith("good: finished")))


def test_merging_keeps_every_other_record():
    def record(spec, seed, ap, budget="3200+800"):
        return {"suite": "accuracy", "spec": spec, "variant": "ilmil", "seed": seed, "budget": budget,
                "num_train": 2000, "num_test": 500, "extra_opts": [], "AP50": ap}

    old = [record("10+10", 0, 74.5), record("10+10", 1, 75.0), record("15+5", 0, 84.1)]
    new = [record("10+10", 1, 76.0), record("19+1", 0, 83.6), record("10+10", 0, 80.0, budget="6400+800")]
    merged = records.merge(old, new)
    assert [(r["spec"], r["seed"], r["budget"], r["AP50"]) for r in merged] == [
        ("10+10", 0, "3200+800", 74.5), ("10+10", 1, "3200+800", 76.0), ("15+5", 0, "3200+800", 84.1),
        ("19+1", 0, "3200+800", 83.6), ("10+10", 0, "6400+800", 80.0)]


def test_tables_only_without_readable_records_is_one_error_line(tmp_path, capsys):
    args = ["--suite", "accuracy", "--tables-only", "--results-dir", str(tmp_path / "results")]
    assert bench_main(args) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: no records in {tmp_path / 'results' / 'accuracy_full.json'}") and "fix: " in line
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "accuracy_full.json").write_text('{"records": [')  # cut off mid-write
    assert bench_main(args) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "is not a records file (JSONDecodeError" in line and "git checkout" in line
    assert not (tmp_path / "results" / "accuracy_full.md").exists()


def test_the_recorded_results_still_make_their_tables(tmp_path):
    for name in ("accuracy_full", "ablation_full", "speed_full", "speed_quick", "pruning_full", "kd_full"):
        path = os.path.join(REPO_ROOT, "benchmarks", "results", f"{name}.json")
        (tmp_path / f"{name}.json").write_text(open(path).read())
        suite, size = name.split("_")
        assert bench_main(["--suite", suite, *(["--quick"] if size == "quick" else []), "--tables-only",
                           "--results-dir", str(tmp_path)]) == 0
    assert "| 10+10 | faster-ilod | 77.6 | 60.3 | 68.9 | 52.3 | 0.7 | 79.1 % |" in (tmp_path / "accuracy_full.md").read_text()
    assert "| without RCN term | `ILMIL.DISTILL.RCN.ENABLED False` |" in (tmp_path / "ablation_full.md").read_text()
    # Recorded before the fine-tuning was: "–" where it is not known.
    old_row = "| 30% | – | 9.02 | 2.43 | 1.96 | 101 | – | 11.4 | 9.0 | 13.7 | params -27 %, GFLOPs -21 %, AP50 -0.1 |"
    assert old_row in (tmp_path / "pruning_full.md").read_text()
    kd = (tmp_path / "kd_full.md").read_text()
    # Gaps against the section's latest no-KD record (11.2 AP50, 6.7 AP).
    assert "| faster_rcnn | output | 42.4 | 28.3 | 61.5 % | 54.1 % |" in kd
    assert "| retinanet | review | 47.7 | 36.7 | 101.0 % | 94.6 % |" in kd
    # At 3200 student iterations the student without distillation (81.6) is above its
    # 1600-iteration teacher (62.0): no gap, and output KD's 70.7 is no share of one.
    assert "| faster_rcnn | output | 70.7 | 56.2 | teacher below no KD | teacher below no KD |" in kd


@pytest.mark.parametrize("args, flag", [
    (["--suite", "speed", "--seeds", "0", "1"], "--seeds"),
    (["--suite", "speed", "--jobs", "2"], "--jobs"),
    (["--suite", "speed", "--variants", "finetune", "ilmil"], "--variants"),
    (["--suite", "pruning", "--specs", "15+5"], "--specs"),
    (["--suite", "pruning", "--seeds", "0", "1"], "--seeds"),
])  # fmt: skip
def test_a_flag_the_suite_cannot_honour_is_refused(tmp_path, capsys, args, flag):
    assert bench_main([*args, "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {flag} ") and "not honoured" in line and f"; fix: drop {flag}" in line
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_tables_only_refuses_the_options_that_choose_runs(tmp_path, capsys):
    args = ["--suite", "speed", "--tables-only", "--seeds", "3", "--jobs", "4", "--results-dir", str(tmp_path)]
    assert bench_main(args) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == ("error: --tables-only regenerates the speed suite's tables from all its records, so --seeds, "
                    "--jobs would change nothing; fix: drop them")


@pytest.mark.parametrize("flag", ["--iters", "--base-iters", "--num-train", "--num-test"])
def test_a_budget_or_data_size_below_1_is_refused(tmp_path, capsys, flag):
    args = ["--suite", "accuracy", flag, "0", "--dry-run", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path)]
    assert bench_main(args) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: {flag} 0 must be at least 1, benchmarks/run.py --suite accuracy; "
                    f"fix: give {flag} 1 or more")


def test_variants_narrow_the_plan_and_an_unknown_one_is_refused(tmp_path, capsys):
    common = ["--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path), "--specs", "10+10", "--dry-run"]
    assert bench_main(["--suite", "accuracy", "--variants", "ilmil", *common]) == 0
    planned = [line.split()[1] for line in capsys.readouterr().out.strip().splitlines()]
    assert [os.path.basename(p) for p in planned] == ["base_10classes_3200it_seed0", "10+10_ilmil_3200+800it_seed0"]
    assert bench_main(["--suite", "accuracy", "--variants", "ilmil", "lwf", *common]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --variants lwf: not a variant of the accuracy suite") and "finetune" in line
    # Config overrides after a list option: "--" ends the list.
    assert bench_main(["--suite", "accuracy", *common, "--variants", "ilmil", "--", "MODEL.DEVICE", "cpu"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert bench_main(["--suite", "accuracy", *common, "--variants", "ilmil", "MODEL.DEVICE", "cpu"]) == 1
    assert "error: --variants MODEL.DEVICE cpu: not a variant" in capsys.readouterr().err
    # A detector none of the given variants trains: the error says it is the variants' choice.
    kd = ["--suite", "kd", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path), "--dry-run"]
    assert bench_main([*kd, "--detectors", "fcos", "retinanet", "--variants", "fcos PKD"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --detectors retinanet: not a detector of the --variants given") and "fcos" in line
    assert bench_main([*kd, "--detectors", "ssd"]) == 1
    assert "error: --detectors ssd: not a detector of the kd suite" in capsys.readouterr().err


# The terms each kd row switches on, in the order the distiller logs them.
KD_ROW_TERMS = {"no KD": [], "PKD": ["feat"], "FGFI": ["fgfi"], "output": ["dense"],
                "output, bfloat16 teacher": ["dense"], "output, mean over anchors": ["dense"],
                "output, class scores only": ["dense"], "M-KD, class scores only": ["dense", "at", "fsp"],
                "M-KD, mean over anchors, class scores only": ["dense", "at", "fsp"],
                "output, mean over anchors, class scores only": ["dense"], "attention, neck": ["at"],
                "M-KD, neck attention, mean over anchors, class scores only": ["dense", "at", "fsp"],
                "layer relations, neck": ["fsp"], "M-KD on the neck, mean over anchors, class scores only": [
                    "dense", "at", "fsp"],
                "M-KD on the neck, mean over anchors, class scores only, bfloat16 teacher": ["dense", "at", "fsp"],
                "output, L1 boxes": ["dense"], "M-KD, L1 boxes": ["dense", "at", "fsp"], "review": ["review"],
                "review alone": ["review"], "review + decoupling": ["review"], "review, weight 0.25": ["review"],
                "review, fg 0.25, bg 1": ["review"],
                "M-KD": ["dense", "at", "fsp"], "M-KD + assistant": ["dense", "at", "fsp"],
                "attention": ["at"], "layer relations": ["fsp"], "M-KD without exploration": ["dense", "at", "fsp"],
                # YOLO's own rows: multi-layer alignment and the information map with its ablations.
                "alignment": ["feat"], "information map": ["infomap"], "uniform map": ["infomap"],
                "information map, backbone": ["infomap"], "information map, neck": ["infomap"],
                "information map, backbone, background 0.1": ["infomap"], "uniform map, backbone": ["infomap"],
                "information map, weight 0.02": ["infomap"], "uniform map, weight 0.02": ["infomap"],
                "information map, weight 0.01": ["infomap"], "information map, background 0.1, weight 0.02": ["infomap"],
                "information map, standardised": ["infomap"], "uniform map, standardised": ["infomap"],
                "information map, standardised, background 0.5": ["infomap"]}


def test_kd_rows_switch_on_their_terms_only():
    planned = plan(KD, False, ("20",), (0,), "runs", ())
    variants = {v.name: v for v in KD.full.variants}
    for (_, name, _), run in planned.items():
        detector, row = variants[name].detector, variants[name].row
        terms = [section.lower() for section in enabled_terms(run.config())]
        expected = KD_ROW_TERMS[row] if detector != "faster_rcnn" else [
            {"dense": "rcn"}.get(t, t) for t in KD_ROW_TERMS[row]]
        assert sorted(terms) == sorted(expected), name
        assert ("--assistant-config" in run.command()) == (row == "M-KD + assistant")
        if row == "M-KD + assistant":  # an assistant of the teacher's detector, between the two in size
            assistant, teacher = (get_ilmil_cfg(os.path.join(REPO_ROOT, path)).MODEL.META_ARCHITECTURE for path in
                                  (run.flags[run.flags.index("--assistant-config") + 1], variants[name].teacher_config))
            assert assistant == teacher, name
        assert run.config().ILMIL.TEACHER.PRECISION == ("bfloat16" if "bfloat16" in row else "float32"), name
    # The quarter-width student: its own config (narrow from the stem), the default rows' terms.
    quarter = {variants[name].row: run for (_, name, _), run in planned.items() if variants[name].student}
    assert sorted(quarter) == ["no KD", "output"]
    assert all(run.config().MODEL.RESNETS.STEM_OUT_CHANNELS == 16 for run in quarter.values())
    # The review's ablation: alone (one full-size distance), + decoupling, + pooling (the default).
    review = {name: run.config().ILMIL.DISTILL.REVIEW for (_, name, _), run in planned.items()
              if name.startswith("retinanet review")}
    assert [(r.DECOUPLE, list(r.POOL_SIZES), r.WEIGHT, r.FG_WEIGHT, r.BG_WEIGHT) for r in review.values()] == [
        (True, [4, 2, 1], 1.0, 1.0, 2.0), (False, [], 1.0, 1.0, 2.0), (True, [], 1.0, 1.0, 2.0),
        (True, [4, 2, 1], 0.25, 1.0, 2.0), (True, [4, 2, 1], 1.0, 0.25, 1.0)]
    # M-KD's exploration: learned weights over its terms and the detection loss, off in its ablation row.
    weightings = {(variants[name].detector, variants[name].row): (run.config().ILMIL.DISTILL.TERM_WEIGHTS,
                                                                  run.config().ILMIL.DISTILL.DETECTION_WEIGHT)
                  for (_, name, _), run in planned.items() if variants[name].row.startswith("M-KD")}
    assert {key for key, weighting in weightings.items() if weighting != ("uncertainty", "uncertainty")} == {
        (d, "M-KD without exploration") for d in ("faster_rcnn", "retinanet", "fcos", "yolov3")}
    assert all(weighting == ("fixed", "fixed") for (_, row), weighting in weightings.items() if "exploration" in row)
    dense = {name: run.config().ILMIL.DISTILL.DENSE for (_, name, _), run in planned.items()
             if run.config().ILMIL.DISTILL.DENSE.ENABLED}
    # YOLO's student config averages the objectness KL and drops the box part (2026-12-07); the
    # rows measured before keep the settings they had.
    assert {name for name, d in dense.items() if d.NORMALIZER == "mean"} == {
        f"{d} output, mean over anchors" for d in ("retinanet", "fcos", "yolov3")} | {
        f"yolov3 {row}, mean over anchors, class scores only" for row in ("output", "M-KD", "M-KD, neck attention",
                                                                           "M-KD on the neck")} | {
        "yolov3 M-KD + assistant", "yolov3 M-KD on the neck, mean over anchors, class scores only, bfloat16 teacher"}
    assert {name for name, d in dense.items() if d.BOX_SCORE_THRESH == 1.01 and "class scores only" not in name} == {
        "yolov3 M-KD + assistant"}
    for row in ("output", "output, bfloat16 teacher", "M-KD", "M-KD without exploration"):
        assert (dense[f"yolov3 {row}"].NORMALIZER, dense[f"yolov3 {row}"].BOX_SCORE_THRESH) == ("objects", 0.5), row
    box_thresholds = {name: run.config().ILMIL.DISTILL.DENSE.BOX_SCORE_THRESH for (_, name, _), run in planned.items()
                      if "class scores only" in name}
    assert box_thresholds == {f"{d} {row}, class scores only": 1.01 for d in ("retinanet", "fcos") for row in ("output", "M-KD")
                              } | {f"yolov3 {row}": 1.01 for row in ("output, class scores only",
                                                                     "output, mean over anchors, class scores only",
                                                                     "M-KD, mean over anchors, class scores only",
                                                                     "M-KD, neck attention, mean over anchors, "
                                                                     "class scores only",
                                                                     "M-KD on the neck, mean over anchors, "
                                                                     "class scores only",
                                                                     "M-KD on the neck, mean over anchors, "
                                                                     "class scores only, bfloat16 teacher")}
    yolo_distill = {name: run.config().ILMIL.DISTILL for (_, name, _), run in planned.items() if name.startswith("yolov3")}
    attention = {name: list(d.AT.LAYERS) for name, d in yolo_distill.items() if d.AT.ENABLED}
    assert {name for name, layers in attention.items() if layers == ["p3", "p4", "p5"]} == {
        "yolov3 attention, neck", "yolov3 M-KD, neck attention, mean over anchors, class scores only",
        "yolov3 M-KD on the neck, mean over anchors, class scores only", "yolov3 M-KD + assistant",
        "yolov3 M-KD on the neck, mean over anchors, class scores only, bfloat16 teacher"}
    assert all(layers in (["p3", "p4", "p5"], ["dark3", "dark4", "dark5"]) for layers in attention.values())
    relations = {name: [list(pair) for pair in d.FSP.PAIRS] for name, d in yolo_distill.items() if d.FSP.ENABLED}
    assert {name for name, pairs in relations.items() if pairs == [["p3", "p4"], ["p4", "p5"]]} == {
        "yolov3 layer relations, neck", "yolov3 M-KD on the neck, mean over anchors, class scores only",
        "yolov3 M-KD + assistant", "yolov3 M-KD on the neck, mean over anchors, class scores only, bfloat16 teacher"}
    assert all(pairs in ([["p3", "p4"], ["p4", "p5"]], [["dark3", "dark4"], ["dark4", "dark5"]])
               for pairs in relations.values())
    box_losses = {name: run.config().ILMIL.DISTILL.DENSE.BOX_LOSS for (_, name, _), run in planned.items()
                  if variants[name].row.startswith(("output", "M-KD"))}
    assert {name for name, box_loss in box_losses.items() if box_loss == "l1"} == {
        f"{d} {row}, L1 boxes" for d in ("retinanet", "fcos") for row in ("output", "M-KD")}
    yolo = {variants[name].row: run.config().ILMIL.DISTILL for (_, name, _), run in planned.items()
            if variants[name].detector == "yolov3"}
    assert yolo["alignment"].FEAT.DISTANCE == "l2" and yolo["alignment"].FEAT.LAYER_WEIGHTING == "adaptive"
    assert yolo["uniform map"].INFOMAP.WEIGHTING == "uniform"
    assert list(yolo["information map, backbone"].INFOMAP.LAYERS) == ["dark3", "dark4", "dark5"]
    assert list(yolo["information map, neck"].INFOMAP.LAYERS) == ["p3", "p4", "p5"]
    assert yolo["information map, backbone"].INFOMAP.WEIGHT == yolo["information map, neck"].INFOMAP.WEIGHT == 0.02
    assert yolo["information map, background 0.1, weight 0.02"].INFOMAP.BACKGROUND_WEIGHT == 0.1
    floored, uniform = yolo["information map, backbone, background 0.1"].INFOMAP, yolo["uniform map, backbone"].INFOMAP
    assert list(floored.LAYERS) == list(uniform.LAYERS) == ["dark3", "dark4", "dark5"]
    assert (floored.BACKGROUND_WEIGHT, floored.WEIGHTING, uniform.WEIGHTING) == (0.1, "information", "uniform")
    standardised = {name: yolo[name].INFOMAP for name in ("information map, standardised", "uniform map, standardised",
                                                          "information map, standardised, background 0.5")}
    assert [(m.NORMALIZE, m.WEIGHTING, m.BACKGROUND_WEIGHT) for m in standardised.values()] == [
        (True, "information", 0.0), (True, "uniform", 0.0), (True, "information", 0.5)]
    assert not any(d.INFOMAP.NORMALIZE for name, d in yolo.items() if name not in standardised)


def test_kd_harness_trains_one_teacher_per_detector_and_compares_its_students(tiny_datasets_root, tmp_path):
    classes = str(TINY_SHAPES["num_classes"])
    # Two rows of one detector: no distillation, and every kind of it through an assistant
    # (which rows switch on which terms is checked on the plan, without training).
    rows = ["no KD", "M-KD + assistant"]
    args = ("--variants", *[f"fcos {row}" for row in rows], "--specs", classes, "--iters", "4", "--base-iters", "6",
            "--jobs", "2")
    # The narrow head's GroupNorms have one channel per group: its p7 map must be larger than
    # 1 x 1 at test time (batch 1), so images of 160 px (p7: 2 x 2).
    test_size = ("ILMIL.SHAPES.IMAGE_SIZE", "160", "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "160")
    _run_harness("kd", tiny_datasets_root, tmp_path, *args, opts=test_size)
    with open(tmp_path / "results" / "kd_quick.json") as f:
        records_ = {r["row"]: r for r in json.load(f)["records"]}
    assert list(records_) == rows
    runs = tmp_path / "runs" / "kd_quick"
    teacher = runs / f"teacher_fcos_{classes}classes_6it_seed0"
    assert _last_iteration(teacher / "stage_0") == 5
    for row, record in records_.items():
        assert record["detector"] == "fcos"
        assert record["step_time_s"] > 0 and record["peak_rss_mib"] > 0
        # Every student is the narrow one, its teacher the one trained above and evaluated in its run.
        assert record["student_model"]["params"] < 0.9 * record["teacher_model"]["params"]
        run = runs / f"{classes}_fcos_{row.replace(' ', '_')}_6+4it_seed0"
        results = json.loads((run / "results.json").read_text())
        assert results["teacher"]["weights"] == str(teacher / "stage_0" / "model_final.pth")
        assert record["teacher_AP50"] == results["teacher"]["AP50"]
        assert record["AP50"] == results["stages"][0]["AP50"]
        logged = (run / "stage_0" / "metrics.json").read_text()
        terms = ("feat", "fgfi", "dense", "review", "at", "fsp")
        assert [t for t in terms if f"loss_distill_{t}" in logged] == KD_ROW_TERMS[row]
        assert ("loss_detection_uncertainty" in logged) == row.startswith("M-KD")
        # The chain's teacher is the suite's; its assistant taught the student.
        assert ("assistant" in results) == (row == "M-KD + assistant")
    table = (tmp_path / "results" / "kd_quick.md").read_text()
    table_rows = [line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| fcos |")]
    assert table_rows == ["teacher", *rows]
    # Each run keeps the machine it trained on; a record names that machine, not the one merging it.
    outcome = runs / f"{classes}_fcos_no_KD_6+4it_seed0" / OUTCOME_RECORD
    assert json.loads(outcome.read_text())["machine"] == records_["no KD"]["machine"] == machine()
    outcome.write_text(json.dumps({**json.loads(outcome.read_text()),
                                   "machine": {**machine(), "cpu_model": "family 0, model 0"}}))
    # A later invocation reuses every run, still has each one's peak memory, and does not
    # re-time the models (a latency measured under another load).
    again = _run_harness("kd", tiny_datasets_root, tmp_path, *args, opts=test_size)
    assert "0 runs to train" in again
    reused = {r["row"]: r for r in json.loads((tmp_path / "results" / "kd_quick.json").read_text())["records"]}
    assert all(r["peak_rss_mib"] for r in reused.values())
    assert reused["no KD"]["machine"]["cpu_model"] == "family 0, model 0"
    assert [(r["student_model"], r["teacher_model"]) for r in reused.values()] == [
        (r["student_model"], r["teacher_model"]) for r in records_.values()]


def test_kd_speed_times_each_student_alone_after_its_warm_up_and_retrains_them_every_time(
        tiny_datasets_root, tmp_path):
    classes = str(TINY_SHAPES["num_classes"])
    args = ("--variants", "fcos no KD", "fcos PKD", "--detectors", "fcos")
    test_size = ("ILMIL.SHAPES.IMAGE_SIZE", "160", "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "160")
    out = _run_harness("kd_speed", tiny_datasets_root, tmp_path, *args, opts=test_size)
    assert "3 runs to train, 1 at a time" in out
    records_ = {r["row"]: r for r in json.loads((tmp_path / "results" / "kd_speed_quick.json").read_text())["records"]}
    assert list(records_) == ["no KD", "PKD"]
    runs = tmp_path / "runs" / "kd_speed_quick"
    for row, record in records_.items():
        seconds = json.loads((runs / f"{classes}_fcos_{row.replace(' ', '_')}_8+8it_seed0" / "stage_0" /
                              "iteration_times.json").read_text())["seconds"]
        assert len(seconds) > 2 and record["step_time_s"] == pytest.approx(statistics.median(seconds[2:]))
    ratio = records_["PKD"]["step_time_s"] / records_["no KD"]["step_time_s"]
    assert f"| fcos | PKD | {records_['PKD']['step_time_s']:.3f} | {ratio:.2f}x |" in (
        tmp_path / "results" / "kd_speed_quick.md").read_text()
    # Timings are of this invocation: the students train again, the teacher is reused.
    again = _run_harness("kd_speed", tiny_datasets_root, tmp_path, *args, opts=test_size)
    assert "2 runs to train" in again and f"reusing {runs / f'teacher_fcos_{classes}classes_8it_seed0'}" in again


def test_a_pruning_table_without_its_unpruned_row_compares_with_nothing():
    pruned = {"ratio": 0.5, "params": 5e6, "gflops": 1.0, "gflops_backbone": 0.5, "latency_ms": 10.0,
              "AP50_all": 50.0, "AP50_old": 55.0, "AP50_new": 45.0, "finetune_iters": 20, "finetune_teacher": False}
    unpruned = {**pruned, "ratio": 0.0, "params": 10e6, "gflops": 2.0, "AP50_all": 52.0, "finetune_iters": 0}
    assert pruning_table([pruned]).splitlines()[-1].endswith("| 50.0 | 55.0 | 45.0 | – |")
    assert pruning_table([unpruned, pruned]).splitlines()[-1].endswith(
        "| 50.0 | 55.0 | 45.0 | params -50 %, GFLOPs -50 %, AP50 -2.0 |")


def _kd_record(row, ap50, step_time, student=None):
    record = {"detector": "faster_rcnn", "row": row, "seed": 0, "AP50": ap50, "AP": ap50 / 2,
              "teacher_AP50": 60.0, "teacher_AP": 30.0, "step_time_s": step_time, "peak_rss_mib": 1000.0,
              "student_model": {"params": 1e6, "gflops": 0.5}, "teacher_model": {"params": 12e6, "gflops": 3.0}}
    return record if student is None else {**record, "student": student}  # older records name no student


def test_kd_table_compares_a_narrower_student_with_its_own_no_kd_row():
    table = kd_table([_kd_record("no KD", 40.0, 1.0), _kd_record("output", 50.0, 1.5),
                      _kd_record("no KD", 20.0, 0.5, "quarter-width student"),
                      _kd_record("output", 40.0, 1.0, "quarter-width student")])
    rows = [[cell.strip() for cell in line.split("|")[1:9]] for line in table.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["faster_rcnn", "teacher"], ["faster_rcnn", "no KD"],
                                         ["faster_rcnn", "output"], ["faster_rcnn, quarter-width student", "no KD"],
                                         ["faster_rcnn, quarter-width student", "output"]]
    # Gap closed and step time against the row's own student without distillation:
    # (50 - 40) / (60 - 40) and (40 - 20) / (60 - 20).
    assert (rows[2][4], rows[2][7]) == ("50.0 %", "1.50x")
    assert (rows[4][4], rows[4][7]) == ("50.0 %", "2.00x")
    # A section of the narrower student alone still names its teacher first.
    table = kd_table([_kd_record("output", 40.0, 1.0, "quarter-width student"),
                      _kd_record("no KD", 20.0, 0.5, "quarter-width student")])
    assert [line.split("|")[2].strip() for line in table.splitlines()[2:]] == ["teacher", "no KD", "output"]
    # A section of distilled students only still gives the teacher's AP (their records name it).
    teacher_row = kd_table([_kd_record("output", 40.0, 1.0, "quarter-width student")]).splitlines()[2]
    assert [cell.strip() for cell in teacher_row.split("|")[2:5]] == ["teacher", "60.0", "30.0"]


def test_kd_gap_closed_counts_an_undistilled_student_of_ap_0():
    # (10 - 0) / (40 - 0): a no-KD AP of 0 is a value, not a missing one.
    table = kd_table([{**_kd_record("no KD", 0.0, 1.0), "teacher_AP50": 40.0},
                      {**_kd_record("PKD", 10.0, 1.5), "teacher_AP50": 40.0}])
    cells = [cell.strip() for cell in table.splitlines()[-1].split("|")]
    assert cells[2] == "PKD" and cells[5] == "25.0 %" and cells[8] == "1.50x"


def test_a_section_of_some_variants_names_them_in_its_command():
    page = suite_page(KD, False, [{**_kd_record(row, 50.0, 1.0), "variant": f"faster_rcnn {row}", "seed": 0,
                                   "spec": "20", "budget": "1600+800", "num_train": 2000, "num_test": 500}
                                  for row in ("no KD", "PKD")])
    command = next(line for line in page.splitlines() if line.startswith("- command: "))
    assert command.endswith('--suite kd --variants "faster_rcnn no KD" "faster_rcnn PKD"`')


def test_a_pruning_table_names_the_device_its_latency_was_timed_on():
    row = {"ratio": 0.0, "params": 5e6, "gflops": 1.0, "gflops_backbone": 0.5, "latency_ms": 10.0,
           "AP50_all": 50.0, "AP50_old": 55.0, "AP50_new": 45.0}
    assert "| CPU latency (ms) |" in pruning_table([row])  # records of before the device was recorded
    assert "| CUDA latency (ms) |" in pruning_table([{**row, "latency_device": "cuda"}])


def test_kd_table_times_a_row_against_no_kd_only_on_the_same_machine():
    fast = {"cpu": "AMD EPYC", "cpu_model": "family 25, model 1", "cores": 2}
    slow = {**fast, "cpu_model": "family 23, model 1"}
    older = {"cpu": "AMD EPYC", "cores": 2}  # a record of before the CPU's family and model were kept

    def step_time_cell(no_kd_machine, row_machine):
        table = kd_table([{**_kd_record("no KD", 40.0, 1.0), "machine": no_kd_machine},
                          {**_kd_record("output", 50.0, 3.0), "machine": row_machine}])
        return table.splitlines()[-1].split("|")[8].strip()

    assert step_time_cell(slow, slow) == "3.00x"
    assert step_time_cell(fast, slow) == "other machine"
    assert step_time_cell(older, slow) == "3.00x"  # as far as the older record tells, the same machine
    assert not same_machine(slow, {**slow, "gpu": "NVIDIA H100"})


def test_one_stage_suite_plans_a_stage0_and_a_joint_run_per_detector_with_its_config(tmp_path):
    planned = plan(ONE_STAGE, False, ("10+10",), (0,), str(tmp_path), ())
    runs = {name: run for (_, name, _), run in planned.items()}
    for detector in ("retinanet", "fcos"):
        ilmil, joint = runs[f"{detector} ilmil"], runs[f"{detector} joint"]
        config = f"configs/shapes/{detector}_R18_FPN_cpu.yaml"
        assert ilmil.config_file == joint.config_file == ilmil.stage0.config_file == config
        assert os.path.basename(ilmil.stage0.out_dir) == f"base_{detector}_10classes_6400it_seed0"
        assert os.path.basename(joint.out_dir) == f"joint_{detector}_20classes_7200it_seed0"
        assert ilmil.stage0 == runs[f"{detector} finetune"].stage0  # one stage 0 per detector
        command = " ".join(ilmil.command())
        assert f"--config-file {config}" in command and "--method ilmil" in command
        # The one-stage recipe: its preset, not Faster R-CNN's.
        assert ilmil.config().ILMIL.DISTILL.DENSE.ENABLED and not ilmil.config().ILMIL.DISTILL.RPN.ENABLED
        assert not ilmil.config().ILMIL.DISTILL.FEAT.ENABLED
        # The review added to the recipe, from the same stage 0, at its kd weight and a tenth.
        for row, weight in (("ilmil + review", 1.0), ("ilmil + review, weight 0.1", 0.1)):
            plus = runs[f"{detector} {row}"].config().ILMIL.DISTILL
            assert runs[f"{detector} {row}"].stage0 == ilmil.stage0
            assert plus.REVIEW.ENABLED and plus.REVIEW.WEIGHT == weight
            assert plus.DENSE.ENABLED and plus.DENSE.WEIGHT == 0.05 and not plus.FEAT.ENABLED
    # YOLO's recipe adds the multi-layer alignment; the tiny YOLO's too, on its own config.
    for yolo in ("yolov3", "yolov3_tiny"):
        assert runs[f"{yolo} ilmil"].config().ILMIL.DISTILL.FEAT.ENABLED
        assert runs[f"{yolo} ilmil"].config_file == f"configs/shapes/{yolo}_cpu.yaml"
        assert not runs[f"{yolo} finetune"].config().ILMIL.DISTILL.FEAT.ENABLED  # no teacher, no term
    assert runs["yolov3_tiny ilmil"].config().MODEL.BACKBONE.NAME == "build_darknet_tiny_backbone"


def test_the_one_stage_table_keeps_a_term_added_to_ilmil_apart_from_ilmil():
    def record(variant, method, ap50, seed=0):
        return {"spec": "10+10", "variant": f"retinanet {variant}", "row": variant, "method": method,
                "detector": "retinanet", "seed": seed,
                "last_stage": {"AP50_old": ap50, "AP50_new": ap50, "AP50": ap50, "AP": ap50 / 2}}

    table = one_stage_table([record("ilmil", "ilmil", 76.0), record("ilmil", "ilmil", 78.0, seed=1),
                             record("ilmil + review", "ilmil", 70.0), record("joint", "joint", 80.0),
                             record("joint", "joint", 80.0, seed=1)])
    rows = {line.split("|")[2].strip(): line for line in table.splitlines()[4:]}
    assert sorted(rows) == ["ilmil", "ilmil + review", "joint"]
    assert "| 77.0 ± 1.0 |" in rows["ilmil"] and rows["ilmil"].endswith("| 96.2 ± 1.2 % |")  # two seeds
    assert rows["ilmil + review"].endswith("| 87.5 % |")


def _edge_row(model, ms, ap50):
    return {"model": model, "train_iters": "3200", "onnx_mib": 1.0, "params_m": 1.0, "gflops": 1.0,
            "ort_1_thread_ms": ms, "ort_all_cores_ms": ms, "pytorch_1_thread_ms": ms, "AP50_ort": ap50, "AP50_pytorch": ap50}


def test_the_edge_target_needs_both_speed_and_accuracy_and_the_table_names_the_settings():
    from benchmarks.edge import table

    teacher = _edge_row("teacher", 90.0, 70.0)
    fast_but_weak, slow = _edge_row("fast", 29.0, 64.0), _edge_row("slow", 31.0, 70.0)
    page = table([teacher, fast_but_weak, slow], "faster_rcnn", 50)
    assert "3.10x" in page and "2.90x" in page
    assert page.rstrip().endswith("not met")  # 3.1x but 6 AP50 down; the other within 5 AP50 but 2.9x
    page = table([teacher, _edge_row("small", 30.0, 65.0)], "faster_rcnn", 50,
                 ["MODEL.RPN.POST_NMS_TOPK_TEST", "100"])
    assert page.rstrip().endswith("met by small")
    assert "every model with MODEL.RPN.POST_NMS_TOPK_TEST 100" in page.splitlines()[0]
    # Labels hold commas: the models that meet it are separated by semicolons.
    page = table([teacher, _edge_row("small, no KD", 30.0, 65.0), _edge_row("small, output", 29.0, 66.0)],
                 "faster_rcnn", 50)
    assert page.rstrip().endswith("met by small, no KD; small, output")
    # The input size the models were measured at (older rows: 256 px).
    assert "(input 256x256 px," in page.splitlines()[0]
    assert "(input 128x192 px," in table([{**teacher, "input_size": [128, 192]}], "faster_rcnn", 50).splitlines()[0]


def test_the_edge_suite_takes_the_best_distilled_student_of_any_width_its_teacher_and_its_no_kd_students(tmp_path):
    from benchmarks.edge import find_models

    def run(name, ap50=None, teacher=None, iters=3200):
        folder = tmp_path / name
        folder.mkdir()
        if name.startswith("teacher"):
            (folder / "results.json").write_text(json.dumps({"config": {"SOLVER": {"MAX_ITER": iters}}}))
        elif ap50 is not None:
            weights = os.path.join(teacher, "stage_0", "model_final.pth")
            results = {"stages": [{"AP50": ap50}], "teacher": {"weights": weights},
                       "config": {"SOLVER": {"MAX_ITER": iters}}}
            (folder / "results.json").write_text(json.dumps(results))
        return str(folder)

    teacher = run("teacher_faster_rcnn_20classes_1600it_seed0", iters=1600)
    other = run("teacher_faster_rcnn_20classes_800it_seed0", iters=800)
    plain = run("20_faster_rcnn_no_KD_1600+3200it_seed0", 80.0, teacher)
    other_plain = run("20_faster_rcnn_no_KD_800+3200it_seed0", 85.0, other)  # another teacher's student
    quarter_plain = run("20_faster_rcnn_quarter-width_student,_no_KD_1600+3200it_seed0", 60.0, teacher)
    run("20_faster_rcnn_output_1600+3200it_seed0", 70.0, teacher)
    quarter_output = run("20_faster_rcnn_quarter-width_student,_output_1600+3200it_seed0", 72.0, teacher)
    run("20_faster_rcnn_no_KD_1600+6400it_seed0", 90.0, teacher, iters=6400)  # not the best student's budget
    run("20_faster_rcnn_PKD_1600+3200it_seed0")  # unfinished: no results
    run("20_fcos_output_1600+3200it_seed0", 90.0, teacher)  # another detector's
    run("20_faster_rcnn_output_1600+3200it_seed0.stale-20261205-120000", 95.0, teacher)  # set aside: another config
    assert find_models(str(tmp_path), "faster_rcnn") == {
        "teacher": teacher, "student, no KD": plain, "quarter-width student, no KD": quarter_plain,
        "quarter-width student, output": quarter_output}

    # A better student of a teacher that has no undistilled students of its budget: another
    # teacher's stand in (their training never reads one), the quarter-width one too.
    stronger = run("teacher_faster_rcnn_20classes_3200it_seed0", iters=3200)
    best = run("20_faster_rcnn_quarter-width_student,_output_3200+3200it_seed0", 75.0, stronger)
    models = find_models(str(tmp_path), "faster_rcnn")
    assert models.pop("student, no KD") in (plain, other_plain)
    assert models == {"teacher": stronger, "quarter-width student, no KD": quarter_plain,
                      "quarter-width student, output": best}
    # --teacher-iters: the best student of that teacher, the others' left out.
    of_first = find_models(str(tmp_path), "faster_rcnn", teacher_iters=1600)
    assert of_first["teacher"] == teacher and of_first["quarter-width student, output"] == quarter_output
    with pytest.raises(SystemExit, match="^error: .* of a 400-iteration teacher; fix: .* --base-iters 400 first"):
        find_models(str(tmp_path), "faster_rcnn", teacher_iters=400)
    # The best student trained longer than every undistilled one: nothing to compare it with.
    run("20_faster_rcnn_output_3200+9600it_seed0", 99.0, stronger, iters=9600)
    with pytest.raises(SystemExit, match=r"^error: .* no finished 'no KD' faster_rcnn student of 9600 iterations, the "
                                         r"budget of the best distilled one \(20_faster_rcnn_output_3200\+9600it_seed0"):
        find_models(str(tmp_path), "faster_rcnn")


@pytest.mark.parametrize("opts, message", [
    (["MODEL.RPN.POST_NMS_TOPK_TEST"], "a KEY without its VALUE"),
    (["MODEL.RPN.POST_NMS_TOP", "100"], "MODEL.RPN.POST_NMS_TOP: no such config key"),
])
def test_the_edge_suite_refuses_bad_overrides_before_anything_runs(tmp_path, opts, message):
    from benchmarks.edge import main as edge_main

    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        edge_main(["--kd-runs", str(tmp_path / "no_runs_here"), *opts])


def test_the_edge_suite_names_a_teacher_folder_gone_in_one_error_line(tmp_path):
    from benchmarks.edge import main as edge_main

    runs = tmp_path / "kd_full"
    gone = runs / "teacher_faster_rcnn_20classes_1600it_seed0"  # never there: moved or deleted
    for name, ap50 in (("20_faster_rcnn_no_KD_1600+800it_seed0", 40.0), ("20_faster_rcnn_output_1600+800it_seed0", 50.0)):
        (runs / name).mkdir(parents=True)
        results = {"stages": [{"AP50": ap50}], "teacher": {"weights": str(gone / "stage_0" / "model_final.pth")},
                   "config": {"SOLVER": {"MAX_ITER": 800}}}
        (runs / name / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=f"^error: {gone}/results.json is missing; fix: re-run .*--suite kd"):
        edge_main(["--kd-runs", str(runs)])
    assert not (tmp_path / "edge").exists()  # nothing pruned or measured


def test_a_speed_record_under_overrides_is_kept_apart_and_its_page_names_them(tmp_path):
    from benchmarks.measures import speed_records
    from benchmarks.suites import SPEED
    from benchmarks.tables import suite_page

    setting = SPEED.quick  # the first 10 steps are warm-up
    planned, outcomes = {}, {}
    for k, name in enumerate(("finetune", "ilmil", "ilmil_bfloat16_teacher")):
        stage = tmp_path / name / "stage_1"
        stage.mkdir(parents=True)
        seconds = [9.0] * setting.warmup + [0.1 * (k + 1), 0.2 * (k + 1), 0.3 * (k + 1)]
        (stage / "iteration_times.json").write_text(json.dumps({"seconds": seconds, "peak_cuda_memory_mib": 100.0 * (k + 1)}))
        (stage / "metrics_eval.json").write_text(json.dumps({"eval_time_s": 2.0, "num_images": 50}))
        planned["10+10", name, 0] = Run(str(tmp_path / name), "10+10", "finetune", 0, 30, 400, 100)
        outcomes[str(tmp_path / name)] = {"peak_rss_mib": 1000.0 + k, "command": f"train {name}"}
    extra = ["MODEL.DEVICE", "cuda"]
    (gpu,) = speed_records(SPEED, setting, planned, outcomes, extra)
    # Medians of the steps after the warm-up: 0.2 and 0.4 s.
    assert gpu["finetune"]["step_time_median_s"] == pytest.approx(0.2) and gpu["step_time_ratio"] == pytest.approx(2.0)
    assert (gpu["num_train"], gpu["num_test"], gpu["extra_opts"]) == (400, 100, extra)
    cpu = {**gpu, "extra_opts": []}
    merged = records.merge([cpu], [gpu])
    assert merged == [cpu, gpu]  # a GPU measurement does not replace the CPU one
    page = suite_page(SPEED, True, merged)
    assert "overrides `MODEL.DEVICE cuda`" in page and "`python benchmarks/run.py --suite speed --quick -- MODEL.DEVICE cuda`" in page
    assert page.count("| peak GPU memory allocated (MiB) | 100 | 200 | 2.00 | 300 | 3.00 |") == 2


def test_an_edge_row_is_kept_when_measured_and_reused_while_model_settings_and_machine_stay(tmp_path, monkeypatch):
    import benchmarks.edge as edge

    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"weights")
    args = SimpleNamespace(repeats=5, opts=["MODEL.RPN.POST_NMS_TOPK_TEST", "100"])
    calls = []
    monkeypatch.setattr(edge, "measure", lambda label, *a, **k: calls.append(label) or {"model": label, "gflops": 1.0})
    first = edge.measured_row("student, no KD", str(weights), "config.yaml", str(tmp_path), args)
    again = edge.measured_row("student, no KD", str(weights), "config.yaml", str(tmp_path), args)
    assert first == again == {"model": "student, no KD", "gflops": 1.0} and calls == ["student, no KD"]
    weights.write_bytes(b"other weights")  # retrained in place: measured anew
    edge.measured_row("student, no KD", str(weights), "config.yaml", str(tmp_path), args)
    edge.measured_row("student, no KD", str(weights), "config.yaml", str(tmp_path),
                      SimpleNamespace(repeats=50, opts=args.opts))
    assert calls == ["student, no KD"] * 3
