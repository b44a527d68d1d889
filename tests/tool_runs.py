"""Running the command-line tools as real subprocesses, and reading what they write."""
import json
import os
import subprocess
import sys
import time

from conftest import REPO_ROOT


def run_tool(tool, args, datasets_root, timeout=120):
    """``tools/<tool>`` with ``args``; the result has ``.log`` (stdout + stderr) and ``.wall`` (s).

    One OpenMP thread: tiny models gain nothing from more, and on a shared 2-core
    machine a second process with 2 threads makes OpenMP spin (10x slower runs).
    """
    env = dict(os.environ, ILMIL_DATASETS=str(datasets_root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", tool), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    proc.wall = time.perf_counter() - start
    proc.log = proc.stdout + proc.stderr
    return proc


def tail(proc, n=3000):
    return f"rc {proc.returncode}, output tail:\n{proc.log[-n:]}"


def read_json(path):
    with open(path) as f:
        return json.load(f)


def metrics_lines(path):
    """detectron2's event log (JSON lines)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
