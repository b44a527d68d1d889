"""The benchmark harness runs a tiny accuracy suite end to end and writes parseable results."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

from conftest import REPO_ROOT, TINY_SHAPES

TINY_OPTS = [
    "ILMIL.SHAPES.NUM_CLASSES", str(TINY_SHAPES["num_classes"]),
    "ILMIL.SHAPES.IMAGE_SIZE", str(TINY_SHAPES["image_size"]),
    "ILMIL.SHAPES.SEED", str(TINY_SHAPES["seed"]),
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def _run_harness(suite, datasets_root, tmp_path, *args):
    """``benchmarks/run.py --suite SUITE --quick ARGS`` on the tiny shapes set, with
    its runs, results and ``BENCHMARKS.md`` under ``tmp_path``; asserts it succeeds."""
    cmd = [
        sys.executable, os.path.join(REPO_ROOT, "benchmarks", "run.py"), "--suite", suite, "--quick", *args,
        "--num-train", str(TINY_SHAPES["num_train"]), "--num-test", str(TINY_SHAPES["num_test"]),
        "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"),
        "--markdown", str(tmp_path / "BENCHMARKS.md"), *TINY_OPTS,
    ]  # fmt: skip
    env = dict(os.environ, ILMIL_DATASETS=str(datasets_root), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _last_iteration(stage_dir):
    return json.loads((stage_dir / "metrics.json").read_text().splitlines()[-1])["iteration"]


def test_accuracy_harness_writes_records_and_a_markdown_table(tiny_datasets_root, tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    # Two workers: the parallel path, whose stage 0 must still be trained once, before its users.
    _run_harness("accuracy", tiny_datasets_root, tmp_path, "--specs", "2+2", "--iters", "4", "--base-iters", "6",
                 "--jobs", "2")

    with open(tmp_path / "results" / "accuracy_quick.json") as f:
        data = json.load(f)
    assert data["machine"]["cores"] == os.cpu_count()
    records = {r["method"]: r for r in data["records"]}
    assert set(records) == {"finetune", "faster-ilod", "ilmil", "joint"}
    assert records["joint"]["iterations_per_stage"] == 6 + 4  # stage 0's budget plus stage 1's
    assert records["ilmil"]["iterations_per_stage"] == 4 and records["ilmil"]["stage0_iterations"] == 6
    for record in records.values():
        assert 0.0 <= record["last_stage"]["AP50"] <= 100.0
        assert record["step_time_s"] > 0
    # Every method starts from one stage-0 model of 6 iterations, copied, not retrained;
    # stage 1 trains its own 4.
    runs = tmp_path / "runs" / "accuracy_quick"
    base = runs / "base_2classes_6it_seed0" / "stage_0"
    assert _last_iteration(base) == 5
    for method in ("finetune", "ilmil"):
        run = runs / f"2+2_{method}_6+4it_seed0"
        assert (run / "stage_0" / "model_final.pth").read_bytes() == (base / "model_final.pth").read_bytes()
        assert not (run / "stage_0" / "metrics.json").exists() and _last_iteration(run / "stage_1") == 3
        assert json.loads((run / "bench_config.json").read_text())["fingerprint"]

    table = [line for line in markdown.read_text().splitlines() if line.startswith("| 2+2 |")]
    assert [line.split("|")[2].strip() for line in table] == ["finetune", "faster-ilod", "ilmil", "joint"]
    assert "python benchmarks/run.py --suite accuracy --quick" in markdown.read_text()


def test_a_run_trained_with_another_config_is_set_aside_not_reused(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(REPO_ROOT, "benchmarks", "run.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = tmp_path / "2+2_ilmil_6+4it_seed0"
    now = bench.Run(str(run), "2+2", "ilmil", 0, 4, {"num_train": 8, "num_test": 4})
    before = dataclasses.replace(now, opts=("ILMIL.DISTILL.FEAT.WEIGHT", "2.0"))
    assert before.fingerprint() != now.fingerprint() == dataclasses.replace(now).fingerprint()
    assert now.fingerprint() != dataclasses.replace(now, method="faster-ilod").fingerprint()
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"stages": [{"stage": 0}, {"stage": 1}]}))
    (run / bench.CONFIG_RECORD).write_text(json.dumps({"fingerprint": before.fingerprint()}))

    assert bench.finished(before)["stages"][1] == {"stage": 1}  # same config: reused
    assert bench.finished(now) is None  # the config changed since: trained anew
    assert not run.exists()
    (stale,) = tmp_path.glob("2+2_ilmil_6+4it_seed0.stale-*")
    assert json.loads((stale / bench.CONFIG_RECORD).read_text())["fingerprint"] == before.fingerprint()


def test_pruning_harness_measures_each_ratio(tiny_datasets_root, tmp_path):
    _run_harness("pruning", tiny_datasets_root, tmp_path, "--iters", "4")
    with open(tmp_path / "results" / "pruning_quick.json") as f:
        unpruned, pruned = json.load(f)["records"]
    assert (unpruned["ratio"], pruned["ratio"]) == (0.0, 0.5)
    assert pruned["params"] < 0.8 * unpruned["params"] and pruned["gflops"] < unpruned["gflops"]
    assert 0.0 <= pruned["AP50_all"] <= 100.0 and pruned["latency_ms"] > 0
    assert "| 50% |" in (tmp_path / "BENCHMARKS.md").read_text()


def test_ablation_harness_switches_one_term_off_per_variant(tiny_datasets_root, tmp_path):
    _run_harness("ablation", tiny_datasets_root, tmp_path, "--specs", "2+2", "--iters", "4")
    with open(tmp_path / "results" / "ablation_quick.json") as f:
        records = json.load(f)["records"]
    assert [r["variant"] for r in records] == [
        "finetune", "without pseudo-labels", "without feature term", "without RPN term", "without RCN term",
        "RCN not on new-class GT", "RCN weight 1", "RCN logits kl",
        "bfloat16 teacher", "ilmil (all terms)"]
    runs = tmp_path / "runs" / "ablation_quick"
    # Each variant's run really had its term off: its resolved config says so.
    config = (runs / "2+2_without_RCN_term_4+4it_seed0" / "config.yaml").read_text()
    assert "RCN:" in config and config.split("RCN:")[1].split("ENABLED:")[1].split()[0] == "false"
    stage0 = [runs / f"2+2_{name}_4+4it_seed0" / "stage_0" / "model_final.pth" for name in ("finetune", "without_feature_term")]
    assert stage0[0].read_bytes() == stage0[1].read_bytes()
    assert all(0.0 <= r["last_stage"]["AP50_old"] <= 100.0 for r in records)
    table = [line.split("|")[1].strip() for line in (tmp_path / "BENCHMARKS.md").read_text().splitlines()
             if line.startswith("| ") and "variant" not in line]
    assert table[:3] == ["finetune", "ilmil (all terms)", "without pseudo-labels"]
    assert "| without pseudo-labels | `ILMIL.PSEUDO_LABELS.ENABLED False` |" in (tmp_path / "BENCHMARKS.md").read_text()
