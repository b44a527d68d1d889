"""Compression runs (tools/train_compression.py): a teacher trained by the toolkit, a
student of the same classes distilled from it, both evaluated in one folder; the
mistakes refused before training; and the same run under torchrun with two CPU
processes."""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from tool_runs import (SHAPES_OPTS, TRAIN_OPTS, _env, kill_when_exists, metrics_lines, read_json, run_tool,
                       run_tool_here, start_tool, tail)

from ilmil.checkpoint import safe_load
from ilmil.config import ConfigError, get_ilmil_cfg
from ilmil.engine.compression import assistant_cfg

# A narrower student than its teacher of the default config (FPN 64 channels): 32-channel
# FPN maps, compared with the teacher's through connectors.
NARROW = ["--teacher-config", os.path.join(REPO_ROOT, "configs", "shapes", "faster_rcnn_R18_FPN_cpu.yaml")]
NARROW_OPTS = ["MODEL.FPN.OUT_CHANNELS", "32", "ILMIL.DISTILL.FEAT.ENABLED", "True",
               "ILMIL.DISTILL.FEAT.LAYERS", "['p3', 'p4', 'res4']"]


@pytest.fixture(scope="module")
def teacher(tiny_datasets_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    proc = run_tool("train_incremental.py", ["--stages", "4", "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS],
                    tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    return out / "stage_0" / "model_final.pth"


def _compress(out, teacher, datasets_root, flags=(), opts=()):
    args = ["--stages", "4", "--teacher-weights", str(teacher), "--output-dir", str(out), *flags,
            *SHAPES_OPTS, *TRAIN_OPTS, *opts]
    return run_tool("train_compression.py", args, datasets_root, timeout=300)


@pytest.fixture(scope="module")
def student(teacher, tiny_datasets_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "run"
    # The teacher as a user types it, relative to where the tool runs.
    proc = _compress(out, os.path.relpath(teacher, REPO_ROOT), tiny_datasets_root, NARROW, NARROW_OPTS)
    assert proc.returncode == 0, tail(proc)
    return out, proc


def test_a_compression_run_evaluates_teacher_and_student_in_one_folder(student, teacher):
    out, proc = student
    results = read_json(out / "results.json")
    assert [s["stage"] for s in results["stages"]] == [0]
    stage = results["stages"][0]
    assert 0 <= stage["AP50"] <= 100
    # The teacher, evaluated on the same test images, scores what its own run recorded.
    own = read_json(teacher.parent.parent / "results.json")["stages"][0]
    assert results["teacher"]["AP50"] == own["AP50"] and results["teacher"]["AP"] == own["AP"]
    assert results["teacher"]["weights"] == str(teacher)  # recorded absolute: found from any folder
    assert list(results["teacher"]["per_class"]) == stage["new_classes"]
    assert (out / "report.md").is_file() and (out / "teacher" / "metrics_eval.json").is_file()
    assert re.search(r"teacher: AP50 \d+\.\d, AP \d+\.\d", proc.log)


def test_the_student_trained_with_the_feature_term_through_connectors(student):
    out, _ = student
    logged = set().union(*(line.keys() for line in metrics_lines(out / "stage_0" / "metrics.json")))
    assert "loss_distill_feat" in logged and not any(k.startswith("loss_distill_r") for k in logged)
    log = (out / "log.txt").read_text()
    assert "connectors" in log and "Conv1x1BN" in log  # p3 / p4: 32 -> 64 channels


def test_a_rerun_reuses_the_finished_run(student, teacher, tiny_datasets_root):
    out, _ = student
    proc = _compress(out, teacher, tiny_datasets_root, NARROW, NARROW_OPTS)
    assert proc.returncode == 0, tail(proc)
    assert "exists, not retraining" in proc.log


def test_a_rerun_names_a_missing_teacher_and_force_spares_one_inside_the_folder(student, teacher, tiny_datasets_root,
                                                                               monkeypatch, capsys):
    out, _ = student
    stage = out / "stage_0"
    mistyped = teacher.parent / "model_finl.pth"
    inside = stage / "model_final.pth"  # the finished student as the teacher of another run into its folder
    cases = [([str(mistyped)], f"--teacher-weights: checkpoint {mistyped} not found; fix: give the path of a .pth "),
             ([str(inside), "--force"], f"--teacher-weights {inside} lies inside --output-dir {out}, whose outputs "
                                        "--force removes; fix: copy the teacher out of that folder")]
    for flags, message in cases:
        proc = run_tool_here("train_compression.py", [
            "--stages", "4", "--teacher-weights", *flags, "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS,
            "SOLVER.BASE_LR", "0.005"], tiny_datasets_root, monkeypatch, capsys)
        assert proc.returncode == 1, tail(proc)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert inside.is_file() and (out / "results.json").is_file()  # nothing removed


@pytest.mark.parametrize("extra, message", [
    (["--stages", "2+2"], r"ILMIL.STAGES 2\+2: a compression run trains one stage of all its classes; fix: --stages N"),
    (["--stages", "3"], r"--teacher-weights: checkpoint .* holds 4 unnamed classes|--teacher-weights: .* holds \["),
    (["--teacher-config", "nope.yaml"], r"ILMIL.TEACHER.CONFIG_FILE nope.yaml: no such file"),
])  # fmt: skip
def test_mistakes_end_in_one_error_line_before_training(extra, message, teacher, tiny_datasets_root, tmp_path,
                                                        monkeypatch, capsys):
    args = ["--teacher-weights", str(teacher), "--output-dir", str(tmp_path / "run"), *SHAPES_OPTS, *TRAIN_OPTS]
    stages = [] if "--stages" in extra else ["--stages", "4"]
    # In this process (its entry is every tool's run_tool_main, whose process test_cli_errors.py checks).
    proc = run_tool_here("train_compression.py", [*stages, *extra, *args, "ILMIL.DISTILL.FEAT.ENABLED", "True"],
                         tiny_datasets_root, monkeypatch, capsys)
    assert proc.returncode == 1, tail(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "stage_0").exists()


def test_an_incremental_run_refuses_a_teacher_assistant_it_would_ignore(tiny_datasets_root, tmp_path, monkeypatch,
                                                                       capsys):
    assistant = os.path.join(REPO_ROOT, "configs", "shapes", "kd", "faster_rcnn_R18_FPN_assistant_cpu.yaml")
    proc = run_tool_here("train_incremental.py", [
        "--stages", "4", "--output-dir", str(tmp_path / "run"), *SHAPES_OPTS, *TRAIN_OPTS,
        "ILMIL.TEACHER.ASSISTANT_CONFIG_FILE", assistant,
    ], tiny_datasets_root, monkeypatch, capsys)
    assert proc.returncode == 1, tail(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(r"ILMIL.TEACHER.ASSISTANT_CONFIG_FILE .*assistant_cpu.yaml: a teacher "
                                          r"assistant belongs to a compression run.*fix: tools/train_compression.py "
                                          r"--assistant-config", errors[0]), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "stage_0").exists()


def test_a_chain_aimed_at_another_runs_folder_is_refused_before_its_assistant_trains(teacher, tiny_datasets_root,
                                                                                     monkeypatch, capsys):
    # The student's folder is the chain's: here the teacher's finished run of another method.
    folder = teacher.parent.parent
    assistant = os.path.join(REPO_ROOT, "configs", "shapes", "kd", "faster_rcnn_R18_FPN_assistant_cpu.yaml")
    proc = run_tool_here("train_compression.py", [
        "--stages", "4", "--teacher-weights", str(teacher), "--output-dir", str(folder), *NARROW,
        "--assistant-config", assistant, *SHAPES_OPTS, *TRAIN_OPTS, *NARROW_OPTS,
    ], tiny_datasets_root, monkeypatch, capsys)
    assert proc.returncode == 1, tail(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "this folder holds another run" in errors[0], proc.stderr[-2000:]
    assert not (folder / "assistant" / "stage_0").exists()


def test_a_teacher_retrained_in_place_is_another_teacher(teacher, tiny_datasets_root, tmp_path, monkeypatch,
                                                         capsys):
    # The student's folder keeps its teacher's evaluation too: reused, it would be the old teacher's.
    copy = tmp_path / "teacher.pth"
    shutil.copy(teacher, copy)
    out = tmp_path / "run"
    args = ["--stages", "4", "--teacher-weights", str(copy), "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS]
    kill_when_exists(start_tool("train_compression.py", args, tiny_datasets_root, tmp_path / "first.log"),
                     out / "run.json")  # the folder is claimed: enough of the first run
    assert (out / "run.json").is_file(), (tmp_path / "first.log").read_text()[-3000:]
    checkpoint = safe_load(str(copy))
    name = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][name] = checkpoint["model"][name] + 1
    torch.save(checkpoint, copy)
    proc = run_tool_here("train_compression.py", args, tiny_datasets_root, monkeypatch, capsys)
    assert proc.returncode == 1, tail(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "this folder holds another run (teacher_weights_sha256: " in errors[0], errors


def test_a_compression_run_under_torchrun_on_two_cpu_processes(teacher, tiny_datasets_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO_ROOT, "tools", "train_compression.py"), "--stages", "4", "--teacher-weights",
           str(teacher), "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS, "ILMIL.DISTILL.FEAT.ENABLED", "True"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(tiny_datasets_root), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    digests = [re.findall(r"Stage 0: weights digest (\w+) \(rank (\d)\)", (out / name).read_text())
               for name in ("log.txt", "log.txt.rank1")]
    assert [r for _, r in digests[0]] == ["0"] and [r for _, r in digests[1]] == ["1"]
    assert digests[0][0][0] == digests[1][0][0]  # the same weights on both ranks
    results = read_json(out / "results.json")
    assert [s["stage"] for s in results["stages"]] == [0] and "teacher" in results
    assert "Stage 0 done:" not in (out / "log.txt.rank1").read_text()  # results written by rank 0 only


def test_an_assistant_needs_its_config_file_and_the_teachers_own():
    assistant = os.path.join(REPO_ROOT, "configs", "shapes", "kd", "faster_rcnn_R18_FPN_assistant_cpu.yaml")
    cfg = get_ilmil_cfg(None, ["ILMIL.TEACHER.ASSISTANT_CONFIG_FILE", "nope.yaml"])
    with pytest.raises(ConfigError, match=r"^ILMIL.TEACHER.ASSISTANT_CONFIG_FILE \(--assistant-config\) nope.yaml: "
                                          "no such file; fix:"):
        assistant_cfg(cfg)
    # Without the teacher's config the assistant's run would build its teacher in the assistant's layout.
    with pytest.raises(ConfigError, match=r"needs the teacher's own config, ILMIL.TEACHER.CONFIG_FILE "
                                          r"\(--teacher-config\).*; fix: give it"):
        assistant_cfg(get_ilmil_cfg(None, ["ILMIL.TEACHER.ASSISTANT_CONFIG_FILE", assistant]))
    given = assistant_cfg(get_ilmil_cfg(None, ["ILMIL.TEACHER.ASSISTANT_CONFIG_FILE", assistant,
                                               "ILMIL.TEACHER.CONFIG_FILE", NARROW[1]]))
    assert given.ILMIL.TEACHER.CONFIG_FILE == NARROW[1] and given.OUTPUT_DIR.endswith("assistant")


def test_a_teacher_assistant_chain_runs_end_to_end_and_resumes_a_killed_student(teacher, tiny_datasets_root,
                                                                                 tmp_path):
    out = tmp_path / "chain"
    assistant = os.path.join(REPO_ROOT, "configs", "shapes", "kd", "faster_rcnn_R18_FPN_assistant_cpu.yaml")
    # The half-width student of configs/shapes/kd/, its feature term only.
    student_config = os.path.join(REPO_ROOT, "configs", "shapes", "kd", "faster_rcnn_R18_FPN32_student_cpu.yaml")
    args = ["--stages", "4", "--teacher-weights", str(teacher), "--output-dir", str(out), *NARROW,
            "--config-file", student_config, "--assistant-config", assistant, *SHAPES_OPTS, *TRAIN_OPTS,
            *NARROW_OPTS, "ILMIL.DISTILL.RCN.ENABLED", "False",
            "SOLVER.MAX_ITER", "16", "SOLVER.STEPS", "(12,)", "SOLVER.CHECKPOINT_PERIOD", "4"]
    proc = start_tool("train_compression.py", args, tiny_datasets_root, tmp_path / "first.log")
    student_stage = out / "stage_0"
    status = kill_when_exists(proc, student_stage / "last_checkpoint")
    assert status == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    # The first step finished: the assistant, distilled from the teacher, with its evaluation.
    first = read_json(out / "assistant" / "results.json")
    assert first["teacher"]["weights"] == str(teacher) and 0 <= first["stages"][0]["AP50"] <= 100
    assert not (student_stage / "model_final.pth").exists(), "the kill came too late: the student had finished"
    killed_at = safe_load(str(student_stage / (student_stage / "last_checkpoint").read_text().strip()))["iteration"]

    resumed = run_tool("train_compression.py", [*args[:6], "--resume", *args[6:]], tiny_datasets_root, timeout=300)
    assert resumed.returncode == 0, tail(resumed)
    assert "exists, not retraining" in resumed.log  # the assistant is reused
    assert f"resuming at iteration {killed_at + 1} of 16" in resumed.log
    results = read_json(out / "results.json")
    # The chain's teacher is the first one; the assistant taught the student.
    assert results["teacher"]["weights"] == str(teacher)
    assert results["assistant"]["weights"] == str(out / "assistant" / "stage_0" / "model_final.pth")
    assert results["assistant"]["AP50"] == first["stages"][0]["AP50"]
    assert not (out / "teacher").exists()  # the assistant's own step evaluated it: not again as a teacher
    assert re.search(r"assistant: AP50 \d+\.\d", resumed.log)
    # Sizes: the assistant (three-quarter-width blocks) sits between teacher and student.
    sizes = [sum(v.numel() for k, v in safe_load(str(path))["model"].items() if not k.startswith("distiller."))
             for path in (teacher, out / "assistant" / "stage_0" / "model_final.pth",
                          student_stage / "model_final.pth")]
    assert sizes[0] > sizes[1] > sizes[2]


def test_a_forced_chain_stopped_in_its_assistant_step_resumes_and_force_keeps_an_assistant_of_the_same_chain(
        teacher, tiny_datasets_root, tmp_path):
    out = tmp_path / "chain"
    # Another run's folder first: a plain compression run, stopped once it claimed the folder.
    plain = ["--stages", "4", "--teacher-weights", str(teacher), "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS]
    kill_when_exists(start_tool("train_compression.py", plain, tiny_datasets_root, tmp_path / "plain.log"),
                     out / "run.json")
    assert (out / "run.json").is_file(), (tmp_path / "plain.log").read_text()[-3000:]
    assistant = os.path.join(REPO_ROOT, "configs", "shapes", "kd", "faster_rcnn_R18_FPN_assistant_cpu.yaml")
    chain = ["--stages", "4", "--teacher-weights", str(teacher), "--output-dir", str(out), *NARROW,
             "--assistant-config", assistant]
    opts = [*SHAPES_OPTS, *TRAIN_OPTS, *NARROW_OPTS, "SOLVER.MAX_ITER", "16", "SOLVER.STEPS", "(12,)",
            "SOLVER.CHECKPOINT_PERIOD", "4"]
    # --force over it, stopped while the assistant trains ...
    proc = start_tool("train_compression.py", [*chain, "--force", *opts], tiny_datasets_root, tmp_path / "first.log")
    kill_when_exists(proc, out / "assistant" / "stage_0" / "last_checkpoint")
    assert not (out / "assistant" / "stage_0" / "model_final.pth").exists(), "the kill came too late"
    # ... is this chain to --resume, not the run it replaced.
    resumed = run_tool("train_compression.py", [*chain, "--resume", *opts], tiny_datasets_root, timeout=300)
    assert resumed.returncode == 0, tail(resumed)
    assert re.search(r"resuming at iteration \d+ of 16", resumed.log), tail(resumed)
    assistant_model = out / "assistant" / "stage_0" / "model_final.pth"
    before = assistant_model.read_bytes()
    # A student-only change with --force: the student starts over, the assistant of this chain is kept.
    again = run_tool("train_compression.py", [*chain, "--force", *opts, "MODEL.ROI_BOX_HEAD.FC_DIM", "64"],
                     tiny_datasets_root, timeout=300)
    assert again.returncode == 0, tail(again)
    assert "exists, not retraining" in again.log and assistant_model.read_bytes() == before
    assert read_json(out / "results.json")["config"]["MODEL"]["ROI_BOX_HEAD"]["FC_DIM"] == 64
    # A change of both: the assistant starts over too, its data and terms checked once all the same.
    last = run_tool("train_compression.py", [*chain, "--force", *opts, "SOLVER.BASE_LR", "0.005"],
                    tiny_datasets_root, timeout=300)
    assert last.returncode == 0, tail(last)
    assert "removed the previous run's outputs from " + str(out / "assistant") in last.log, tail(last)
    assert last.log.count("class order (") == 2, tail(last)  # the assistant's step and the student's
