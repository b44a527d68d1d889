"""Distributed training: two CPU processes with gloo, launched by torchrun, on a
tiny shapes 10+10 ilmil run."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from ilmil.checkpoint import safe_load
from tool_runs import SHAPES_OPTS, TRAIN_OPTS, _env, killed_copy, read_json, run_tool, tail


@pytest.fixture(scope="module")
def torchrun_run(tiny_datasets_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO_ROOT, "tools", "train_incremental.py"),
           "--stages", "10+10", "--method", "ilmil", "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS,
           "SOLVER.CHECKPOINT_PERIOD", "3"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(tiny_datasets_root), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def _digests(log_file):
    with open(log_file) as f:
        return re.findall(r"Stage (\d): weights digest (\w+) \(rank (\d)\)", f.read())


def test_both_ranks_end_every_stage_with_the_same_weights(torchrun_run):
    rank0, rank1 = _digests(torchrun_run / "log.txt"), _digests(torchrun_run / "log.txt.rank1")
    assert [(s, r) for s, _, r in rank0] == [("0", "0"), ("1", "0")]
    assert [(s, r) for s, _, r in rank1] == [("0", "1"), ("1", "1")]
    assert [d for _, d, _ in rank0] == [d for _, d, _ in rank1]


def test_only_rank_0_writes_the_results(torchrun_run):
    results = read_json(torchrun_run / "results.json")
    assert [s["stage"] for s in results["stages"]] == [0, 1]
    with open(torchrun_run / "log.txt") as f:
        assert f.read().count("Stage 1 done:") == 1
    with open(torchrun_run / "log.txt.rank1") as f:
        assert "Stage 1 done:" not in f.read()  # logged where results.json is written
    assert (torchrun_run / "stage_1" / "model_final.pth").exists()


def test_evaluation_counts_every_test_image_once(torchrun_run):
    stages = read_json(torchrun_run / "stages.json")["stages"]
    for info, entry in zip(stages, read_json(torchrun_run / "results.json")["stages"]):
        assert entry["num_images_evaluated"] == entry["num_images"] == info["num_test_images"] > 1


def test_the_stages_evaluation_is_that_of_its_saved_model(torchrun_run, tiny_datasets_root, tmp_path):
    # Each process trained its own BatchNorm statistics; the saved model holds rank 0's, and its
    # evaluation by one process finds the detections the two processes' evaluation found.
    proc = run_tool("eval_incremental.py", ["--run-dir", str(torchrun_run), "--output-dir", str(tmp_path / "eval")],
                    tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    for stage in ("stage_0", "stage_1"):
        during, after = (read_json(folder / stage / "detections.json") for folder in (torchrun_run, tmp_path / "eval"))
        key = lambda d: (d["image_id"], d["category_id"], d["bbox"])  # noqa: E731
        assert during and sorted(during, key=key) == sorted(after, key=key), stage


def test_a_resumed_stage_ends_where_the_uninterrupted_one_does_in_both_processes(torchrun_run, tiny_datasets_root,
                                                                                  tmp_path):
    # Each process's random streams (the RCN term's proposal sampling) and buffers (the adaptive
    # layer weights' running average of its own batches) are its own and come back as its own.
    halfway = safe_load(str(torchrun_run / "stage_1" / "model_0000002.pth"))
    assert len(halfway["rng"]) == 2 and not torch.equal(halfway["rng"][0]["torch"], halfway["rng"][1]["torch"])
    resumed = tmp_path / "resumed"
    stage1 = killed_copy(torchrun_run, resumed, 1, "model_0000002.pth")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO_ROOT, "tools", "train_incremental.py"), "--stages", "10+10", "--method", "ilmil",
           "--output-dir", str(resumed), "--resume", *SHAPES_OPTS, *TRAIN_OPTS, "SOLVER.CHECKPOINT_PERIOD", "3"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(tiny_datasets_root), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Stage 1: resuming at iteration 3 of 6" in (resumed / "log.txt").read_text()
    expected = safe_load(str(torchrun_run / "stage_1" / "model_final.pth"))["model"]
    got = safe_load(str(stage1 / "model_final.pth"))["model"]
    differing = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not differing, f"differ after resuming: {differing[:5]}"


def test_a_non_finite_forward_pass_on_one_rank_is_skipped_by_both(tiny_datasets_root, tmp_path):
    # detectron2 raises its non-finite-proposals error inside rank 1's forward pass; rank 0,
    # whose pass was finite, must learn of it (not wait in an all-reduce rank 1 never joins).
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO_ROOT, "tests", "one_rank_diverges.py"),
           "--stages", "4", "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS,
           "ILMIL.SKIP_NONFINITE_ITERS", "1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(tiny_datasets_root), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rank0, rank1 = (out / "log.txt").read_text(), (out / "log.txt.rank1").read_text()
    assert "iteration 1: a loss term is not finite on another process; iteration skipped (1 of " in rank0
    assert "iteration 1: Predicted boxes or scores contain Inf/NaN" in rank1 and "iteration skipped (1 of " in rank1
    assert _digests(out / "log.txt")[0][1] == _digests(out / "log.txt.rank1")[0][1]  # still in step


def test_each_process_draws_its_own_random_stream_and_rank_0_that_of_a_single_process(monkeypatch):
    from detectron2.utils.env import seed_all_rng

    from ilmil.engine import launch

    def draws(rank, seed, offset):
        monkeypatch.setattr(launch.comm, "get_rank", lambda: rank)
        launch.seed_this_process(seed, offset)
        return torch.rand(4)

    seed_all_rng(7 + 2)
    single = torch.rand(4)
    assert torch.equal(draws(0, 7, 2), single)
    assert not torch.equal(draws(1, 7, 2), single)
    assert torch.equal(draws(1, 7, 2), draws(1, 7, 2))  # still seeded: the same draws each time
    assert not torch.equal(draws(0, -1, 2), draws(0, -1, 2))  # a negative seed: a fresh one
