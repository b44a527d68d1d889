"""Every ilmil module imports on its own, and the package's imports point one way.

A module that imports only after another one has been imported hides an import
cycle: ``import ilmil.x`` as a script's first line then fails with a partially
initialised module. The static check names the cycle; the subprocess check runs
each real import first thing in an interpreter where no ilmil (or detectron2) module
has been imported yet.
"""
import ast
import os
import pkgutil
import subprocess
import sys

import ilmil
from conftest import REPO_ROOT

MODULES = ["ilmil"] + sorted(name for _, name, _ in pkgutil.walk_packages(ilmil.__path__, "ilmil."))


def _source_path(module):
    path = os.path.join(REPO_ROOT, *module.split("."))
    return os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"


def _is_package(module):
    return _source_path(module).endswith("__init__.py")


def _ancestors(module):
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _module_level_imports(tree):
    """Import statements run when the module is imported (not those inside functions)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            pending.extend(ast.iter_child_nodes(node))


def _imported_modules(module):
    """The ilmil modules ``module`` imports at import time, each with the parent
    packages that the import runs first (other than ``module``'s own)."""
    with open(_source_path(module)) as f:
        tree = ast.parse(f.read(), _source_path(module))
    package = module if _is_package(module) else module.rpartition(".")[0]
    targets = set()
    for node in _module_level_imports(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            prefix = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(prefix + ([base] if base else []))
        targets.add(base)
        targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    targets = {t for t in targets if t in MODULES}
    own = set(_ancestors(module)) | {module}
    return {m for t in targets for m in _ancestors(t) + [t]} - own


def _find_cycle(graph):
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state = {}  # node -> "open" while on the DFS path, "done" after

    def visit(node, path):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_find_cycle_names_the_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_module_level_imports_have_no_cycle():
    graph = {module: _imported_modules(module) for module in MODULES}
    # Resolution sanity: the engine imports the modeling package and its trainer.
    assert {"ilmil.modeling", "ilmil.checkpoint"} <= graph["ilmil.engine.trainer"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle between ilmil modules: " + " -> ".join(cycle)


# One interpreter loads the third-party libraries once (seconds; torchvision.ops brings
# torch._dynamo, 6 s on a slow CPU), then forks a child per
# module that imports it first of every ilmil and detectron2 module (~0.3 s each): a
# fresh interpreter per module spent ~5 minutes of the suite re-importing torch.
_IMPORT_EACH_IN_A_FORK = """
import importlib, os, sys, traceback
import cv2, fvcore.nn, matplotlib, numpy, onnx, onnxruntime, pycocotools.coco, scipy, torch, torchvision.ops
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            assert not any(m.split(".")[0] in ("ilmil", "detectron2") for m in sys.modules)
            importlib.import_module(module)
        except BaseException:
            print(f"import {module} failed:\\n{traceback.format_exc()[-1500:]}", flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        print(f"FAILED {module}", flush=True)
"""


def _import_each_first(modules, path=()):
    """The fork script on ``modules``, with ``path`` (folders) before the repository on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, path), REPO_ROOT]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _IMPORT_EACH_IN_A_FORK, *modules], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_a_module_that_imports_only_second_fails_the_check(tmp_path):
    # Two modules importing each other by name from the start: the first one imported fails.
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic.b import B\nA = 1\n")
    (package / "b.py").write_text("from cyclic.a import A\nB = 2\n")
    result = _import_each_first(["cyclic.a", "json"], path=[tmp_path])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FAILED cyclic.a" in result.stdout and "partially initialized" in result.stdout
    assert "FAILED json" not in result.stdout


def test_every_module_imports_before_any_other_ilmil_module():
    assert len(MODULES) > 30 and "ilmil.engine.runner" in MODULES
    result = _import_each_first(MODULES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FAILED" not in result.stdout, result.stdout[-6000:]
