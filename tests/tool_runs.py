"""Running the command-line tools, as real subprocesses or in this process, and reading
what they write."""
import functools
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

from conftest import REPO_ROOT, TINY_SHAPES
from detectron2.utils.logger import setup_logger

from ilmil.checkpoint import safe_load
from ilmil.engine.cli import run_tool_main

# Overrides that point the CLI at the tiny shapes set and train a few 128 px iterations.
SHAPES_OPTS = [
    "ILMIL.SHAPES.NUM_CLASSES", str(TINY_SHAPES["num_classes"]),
    "ILMIL.SHAPES.NUM_TRAIN", str(TINY_SHAPES["num_train"]),
    "ILMIL.SHAPES.NUM_TEST", str(TINY_SHAPES["num_test"]),
    "ILMIL.SHAPES.IMAGE_SIZE", str(TINY_SHAPES["image_size"]),
    "ILMIL.SHAPES.SEED", str(TINY_SHAPES["seed"]),
]
TRAIN_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "(4,)", "SOLVER.WARMUP_ITERS", "2",
    "DATALOADER.NUM_WORKERS", "0",
]


def run_tool(tool, args, datasets_root, timeout=120):
    """``tools/<tool>`` with ``args``; the result has ``.log`` (stdout + stderr) and ``.wall`` (s).

    One OpenMP thread: tiny models gain nothing from more, and on a shared 2-core
    machine a second process with 2 threads makes OpenMP spin (10x slower runs).
    """
    start = time.perf_counter()
    proc = subprocess.run(_command(tool, args), cwd=REPO_ROOT, env=_env(datasets_root),
                          capture_output=True, text=True, timeout=timeout)
    proc.wall = time.perf_counter() - start
    proc.log = proc.stdout + proc.stderr
    return proc


def run_tool_here(tool, args, datasets_root, monkeypatch, capsys):
    """``tools/<tool>`` with ``args`` through the entry its ``__main__`` runs, in this process:
    the checks and the error line of ``run_tool`` without a new interpreter's start-up (10-15 s
    of imports on a slow CPU). For what a tool checks; what the process itself shows (exit
    status, nothing else on stderr) is for ``run_tool``. The result is shaped as ``run_tool``'s."""
    monkeypatch.setenv("ILMIL_DATASETS", str(datasets_root))
    monkeypatch.chdir(REPO_ROOT)
    capsys.readouterr()
    loggers = _logger_states()
    try:
        returncode = run_tool_main(_tool_module(tool).main, list(args))
    except SystemExit as e:  # argparse's own refusals
        returncode = e.code
    finally:
        # The loggers as they were: a handler the tool set up writes to this test's captured
        # streams, closed after it, and setup_logger stops its logger's propagation, which
        # would hide the records from later tests' caplog. (detectron2 caches setup_logger's
        # handlers: the next run sets up its own.)
        for logger in _logger_states():
            handlers, logger.propagate, level = loggers.get(logger, ([], True, logging.NOTSET))
            logger.handlers[:] = handlers
            logger.setLevel(level)
        setup_logger.cache_clear()
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=returncode, stdout=out, stderr=err, log=out + err)


def _logger_states():
    """{logger: (handlers, propagate, level)} of the root logger and every named one."""
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    return {logger: (list(logger.handlers), logger.propagate, logger.level) for logger in loggers}


@functools.cache
def _tool_module(tool):
    spec = importlib.util.spec_from_file_location(f"tool_{tool[:-3]}", os.path.join(REPO_ROOT, "tools", tool))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_tool(tool, args, datasets_root, log_file):
    """``tools/<tool>`` started in the background (a ``Popen``), output to ``log_file``."""
    with open(log_file, "w") as log:
        # SIGINT at its default: a shell starts background jobs (`make test &`) with it ignored.
        return subprocess.Popen(_command(tool, args), cwd=REPO_ROOT, env=_env(datasets_root), stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def kill_when_exists(proc, path, timeout=300, sig=signal.SIGKILL):
    """Send ``sig`` to the tool ``proc`` as soon as ``path`` exists (or it ended, or
    ``timeout`` passed); returns its exit status."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc.wait()


def _command(tool, args):
    return [sys.executable, os.path.join(REPO_ROOT, "tools", tool), *args]


def _env(datasets_root):
    env = dict(os.environ, ILMIL_DATASETS=str(datasets_root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def resumed_checkpoint(stage_dir):
    """The checkpoint a killed run resumes from, loaded (a loaded machine decides which):
    the one ``last_checkpoint`` names, else (killed before the first was named) the newest
    periodic one."""
    tag = stage_dir / "last_checkpoint"
    path = stage_dir / tag.read_text().strip() if tag.exists() else max(stage_dir.glob("model_[0-9]*.pth"))
    return safe_load(str(path))


def checkpoint_iteration(stage_dir):
    """The iteration of the checkpoint a killed run resumes from."""
    return resumed_checkpoint(stage_dir)["iteration"]


def killed_copy(run, copy, stage, checkpoint):
    """``run`` copied to ``copy`` as if killed in ``stage`` right after saving ``checkpoint``
    (e.g. "model_0000003.pth"): that stage's later checkpoints and its end removed; the
    copy's stage folder."""
    shutil.copytree(run, copy)
    stage_dir = copy / f"stage_{stage}"
    for name in os.listdir(stage_dir):
        if (name.startswith("model_") and name.endswith(".pth") and name > checkpoint) or name == "metrics_eval.json":
            (stage_dir / name).unlink()
    (stage_dir / "last_checkpoint").write_text(checkpoint)
    return stage_dir


def tail(proc, n=3000):
    return f"rc {proc.returncode}, output tail:\n{proc.log[-n:]}"


def read_json(path):
    with open(path) as f:
        return json.load(f)


def metrics_lines(path):
    """detectron2's event log (JSON lines)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
