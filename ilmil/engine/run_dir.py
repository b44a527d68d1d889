"""A run folder's identity (``run.json``) and the checks made before any training.

``run.json`` records the toolkit version, the command line, the seed and what
the run trains on (dataset, schedule, method, the resolved config). A finished
stage is reused on a re-run into the same folder, so a re-run that asks for
something else is refused (its stages would be silently mixed with the old
ones) unless ``--force``, which first removes this toolkit's outputs from the folder.
"""
import datetime
import glob
import hashlib
import json
import math
import os
import shutil
import sys

from .. import __version__
from ..config import config_items, default_cfg
from ..file_io import atomic_write
from ..data import problem_lines
from ..evaluation.run_outputs import write_json

__all__ = ["RUN_FILE", "RUN_RECORDS", "RunDirError", "RunValidationError", "check_run_dir", "claim_run_dir",
           "dataset_content_fingerprint", "dataset_fingerprint", "file_digest", "output_dir_problem",
           "require_output_dir", "training_config", "write_problem_report"]

RUN_FILE = "run.json"
# The records of a training run's folder (identity, schedule): no other tool writes into one.
RUN_RECORDS = (RUN_FILE, "stages.json")
PREFLIGHT_FILE = "preflight_problems.txt"
# Config keys (and sections, ending in ".") a re-run may change: where and how the run
# executes rather than what it trains (device, loader processes, how often it logs or
# checkpoints, the non-finite-loss allowance), so a resume on another machine is
# accepted; the per-stage datasets the runner sets; and what the rest of the identity
# already holds (seed, dataset, schedule, method).
_NOT_IN_IDENTITY = ("OUTPUT_DIR", "MODEL.DEVICE", "DATALOADER.NUM_WORKERS", "SOLVER.CHECKPOINT_PERIOD",
                    "TEST.EVAL_PERIOD", "VIS_PERIOD", "CUDNN_BENCHMARK", "ILMIL.SKIP_NONFINITE_ITERS",
                    "DATASETS.", "SEED", "ILMIL.DATASET", "ILMIL.DATA.", "ILMIL.SHAPES.", "ILMIL.STAGES",
                    "ILMIL.CLASS_ORDER", "ILMIL.METHOD")
# What the toolkit writes into a run folder; --force removes these and nothing else.
# ("teacher": a compression run's evaluation of its teacher, reused while the folder lives.)
_RUN_OUTPUTS = ("stage_*", "results.json", "stages.json", "config.yaml", "report.md", "per_class_*.csv",
                "forgetting_curve.png", "per_class_heatmap.png", "per_class_first_vs_final.png", "teacher",
                PREFLIGHT_FILE, RUN_FILE)


class RunDirError(ValueError):
    """An output folder a tool cannot use: a file, not writable, or holding a different run."""


class RunValidationError(ValueError):
    """Problems found before training. The message lists the first
    ``MAX_LISTED_PROBLEMS`` of them (a broken dataset can have thousands);
    ``report``, when given, is the file that holds all of them."""

    def __init__(self, problems, fixes=(), report=None):
        self.problems = list(problems)
        if len(self.problems) == 1 and report is None:  # one problem, one line
            fix = "".join(f"; fix: {f}" for f in fixes)
            super().__init__(f"{self.problems[0]}{fix} (found before training; nothing was trained)")
            return
        listed = "\n".join(problem_lines(self.problems, "- ", report) + [f"  fix: {f}" for f in fixes])
        super().__init__(f"{len(self.problems)} problem(s) found before training; nothing was trained:\n{listed}")


def write_problem_report(output_dir, problems):
    """All of ``problems`` in ``output_dir/PREFLIGHT_FILE`` and its path, or, with
    no problems, None and no such file (a report of an earlier attempt would mislead)."""
    path = os.path.join(output_dir, PREFLIGHT_FILE)
    if not problems:
        if os.path.exists(path):
            os.remove(path)
        return None
    atomic_write(path, lambda f: f.write("".join(f"{p}\n" for p in problems)), mode="w")
    return path


def dataset_fingerprint(source):
    """A hash of the image names and boxes a run trains and tests on (the first
    fingerprint, compared with folders recorded before ``dataset_content_fingerprint``)."""
    digest = hashlib.sha1()
    for split in (source.train, source.test):
        for record in split:
            boxes = sorted((a["category_name"], *(round(v, 2) for v in a["bbox"])) for a in record["annotations"])
            digest.update(json.dumps([os.path.basename(record["file_name"]), boxes]).encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def dataset_content_fingerprint(source):
    """A hash of what the first fingerprint leaves out: each image's path below its
    split's common folder (so a dataset moved, its splits apart or together, is the same
    one), its size in bytes and in pixels (an image replaced by another), and the boxes'
    crowd / difficult flags, which decide the stages' images and what evaluation ignores."""
    digest = hashlib.sha1()
    for split in (source.train, source.test):
        names = [os.path.abspath(r["file_name"]) for r in split]
        root = os.path.commonpath(names) if len(names) > 1 else os.path.dirname(names[0]) if names else ""
        for record, path in zip(split, names):
            file_bytes = os.path.getsize(path) if os.path.isfile(path) else None
            boxes = sorted((a["category_name"], *(round(v, 2) for v in a["bbox"]), int(a.get("iscrowd", 0)),
                            int(a.get("difficult", 0))) for a in record["annotations"])
            digest.update(json.dumps([os.path.relpath(path, root), file_bytes, record["width"], record["height"],
                                      boxes]).encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def file_digest(path):
    """A hash of a file's bytes (a given model, a teacher), None while it does not exist:
    a checkpoint retrained in place is another model under the same path."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def training_config(cfg):
    """The resolved config as ``{"SECTION.KEY": value}`` (JSON values), minus the keys
    a re-run may change (``_NOT_IN_IDENTITY``)."""

    def kept(key):
        return not any(key == skip or (skip.endswith(".") and key.startswith(skip)) for skip in _NOT_IN_IDENTITY)

    def strict(value):  # run.json is strict JSON: an infinite loss weight, say, is kept as "inf"
        return repr(value) if isinstance(value, float) and not math.isfinite(value) else value

    return json.loads(json.dumps({key: strict(value) for key, value in config_items(cfg).items() if kept(key)}))


def _differences(key, before, now):
    """``key``'s change between the recorded run and this one, one clause per value."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [f"{k}: {before.get(k)!r} there, {now.get(k)!r} now"
                for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
    return [f"{key}: {before!r} there, {now!r} now"]


def output_dir_problem(output_dir, flag="--output-dir"):
    """Why ``output_dir`` (given as ``flag``) cannot hold the outputs, or None (it is created if missing)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return f"{flag} {output_dir} is a file, not a folder; fix: choose another {flag} or move the file away"
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return f"{flag} {output_dir} is not writable ({e.strerror}); fix: choose a folder you can write to"
    return None


def require_output_dir(output_dir, flag="--output-dir", refuse_records=()):
    """Create ``output_dir`` if missing; :class:`RunDirError` if it cannot hold outputs, or
    if it holds one of ``refuse_records`` (files of a run whose report and results the
    tool's outputs would overwrite, e.g. ``RUN_RECORDS``)."""
    problem = output_dir_problem(output_dir, flag)
    if problem:
        raise RunDirError(problem)
    held = [name for name in refuse_records if os.path.isfile(os.path.join(output_dir, name))]
    if held:
        raise RunDirError(f"{flag} {output_dir} holds a run ({', '.join(held)}), whose results and report this "
                          f"would overwrite; fix: give another {flag}")


def _remove_run_outputs(output_dir):
    removed = []
    for pattern in _RUN_OUTPUTS:
        for path in sorted(glob.glob(os.path.join(output_dir, pattern))):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(os.path.basename(path))
    return removed


def _recorded_run(output_dir):
    """The folder's ``run.json`` record (None without one) and its path; RunDirError when unreadable."""
    path = os.path.join(output_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None, path
    fix = "fix: choose another --output-dir, or add --force to remove that run's outputs and start over"
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("identity"), dict):
        raise RunDirError(f"{path} is not a run record (no \"identity\" object: edited by hand?); {fix}")
    return recorded, path


def _read_settings(config):
    """``config`` (a run identity's) without the settings of the distillation terms it
    leaves off, which the run never reads (their ``ENABLED`` counts); a pruned model's
    fine-tuning from its teacher reads the feature term's whatever its switch."""
    off = {key[: -len("ENABLED")] for key, value in config.items()
           if key.startswith("ILMIL.DISTILL.") and key.endswith(".ENABLED") and value is False}
    if config.get("ILMIL.PRUNING.FINETUNE_TEACHER"):
        off.discard("ILMIL.DISTILL.FEAT.")
    return {key: value for key, value in config.items() if key.endswith(".ENABLED") or not key.startswith(tuple(off))}


def check_run_dir(output_dir, identity, force=False):
    """Refuse (RunDirError) an ``output_dir`` that holds another run, changing nothing:
    what ``claim_run_dir`` checks before it writes, for a run to check before any work.
    Returns the folder's ``run.json`` record (None without one, or with ``force``)."""
    if force:
        return None
    recorded, path = _recorded_run(output_dir)
    if recorded is None:
        return None
    before = dict(recorded.get("identity", {}))
    comparable = dict(identity)
    if isinstance(before.get("config"), dict) and "config" in identity:
        # Keys the recorded run's version lacked, still at their default, changed nothing.
        defaults = training_config(default_cfg())
        comparable["config"] = _read_settings({k: v for k, v in identity["config"].items()
                                               if k in before["config"] or defaults.get(k) != v})
        before["config"] = _read_settings(before["config"])
    changed = [key for key in comparable if key in before and before[key] != comparable[key]]
    if changed:
        listed = "; ".join(clause for key in changed for clause in _differences(key, before[key], comparable[key]))
        raise RunDirError(
            f"{path}: this folder holds another run ({listed}), whose finished stages would be "
            f"mixed into this one; fix: choose another --output-dir, or add --force to remove "
            f"that run's outputs and start over"
        )
    return recorded


def claim_run_dir(output_dir, identity, seed, force=False, logger=None):
    """Record this run in ``output_dir/run.json``, refusing a folder of another run.

    Args:
        identity (dict): what must match for the folder's finished stages to be
            reused (dataset and its fingerprint, schedule, method, seed, config).
            A key that the folder's record lacks (written by an older version)
            is not compared.
        force: remove the folder's previous outputs and start over instead.
    """
    recorded = check_run_dir(output_dir, identity, force)
    if force:
        removed = _remove_run_outputs(output_dir)
        if removed and logger:
            logger.info("--force: removed the previous run's outputs from %s: %s", output_dir, ", ".join(removed))
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record = {
        "ilmil_version": __version__,
        "command": " ".join(sys.argv),
        "seed": seed,
        "identity": identity,
        "created": recorded.get("created", now) if recorded else now,
        "last_started": now,
    }
    write_json(os.path.join(output_dir, RUN_FILE), record)
    return record
