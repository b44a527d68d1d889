"""Shared fixtures. ``import ilmil`` comes first: it adjusts detectron2 0.6 to this
stack (placeholder C++ ops, Pillow aliases) before any detectron2 module loads."""
import ilmil  # noqa: F401  (must precede every detectron2 import)

import json
import os

import pytest
import torch

from ilmil.data.shapes import generate_shapes_dataset

# Tiny models gain nothing from threads, and on a shared 2-core machine two
# processes with 2 OpenMP threads each spin-wait and run several times slower.
torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny shapes set of the end-to-end runs. Seed 10 (generator v3) is chosen so that each of
# the first 4 classes (the classes of a 2+2 schedule) has objects in both the 24
# training and the 8 test images: every old/new AP is then a number, not n/a.
TINY_SHAPES = dict(num_classes=20, num_train=24, num_test=8, image_size=128, seed=10)


@pytest.fixture(scope="session")
def tiny_datasets_root(tmp_path_factory):
    """A datasets root (``$ILMIL_DATASETS``) whose ``shapes/`` cache holds the tiny
    set, generated once per session; runs with the same parameters reuse it."""
    root = tmp_path_factory.mktemp("datasets")
    folder = generate_shapes_dataset(str(root / "shapes"), progress=False, **TINY_SHAPES)
    for split in ("train", "test"):
        with open(os.path.join(folder, "annotations", f"instances_{split}.json")) as f:
            present = {a["category_id"] for a in json.load(f)["annotations"]}
        # A generator change reshuffles the objects: then pick another seed here.
        assert {1, 2, 3, 4} <= present, f"TINY_SHAPES seed leaves a class of 2+2 without {split} objects"
    return root


@pytest.fixture(scope="session")
def tiny_shapes_dir(tiny_datasets_root):
    """The folder of the tiny shapes set (VOC XML + COCO json, one JPEGImages/)."""
    return generate_shapes_dataset(str(tiny_datasets_root / "shapes"), progress=False, **TINY_SHAPES)


def pytest_configure(config):
    # ilmil.compat silences these detectron2-0.6-on-new-torch warnings at import;
    # pytest resets warning filters per test, so repeat them here.
    config.addinivalue_line("filterwarnings", r"ignore:torch\.meshgrid:UserWarning")
    config.addinivalue_line("filterwarnings", r"ignore:`torch\.jit\.script` is deprecated:FutureWarning")


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the marks
def pytest_collection_modifyitems(config, items):
    # `make test` spreads the tests over worker processes one by one (`--dist loadgroup`),
    # except that a module's tests sharing a module-scoped fixture (a run trained once for
    # them) stay together on one worker, which trains it once.
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        if defs and any(d.scope == "module" for group in defs.name2fixturedefs.values() for d in group):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
