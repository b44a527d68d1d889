"""Planning a suite's runs, deciding which to reuse, and training the rest.

Each run is a real ``tools/train_incremental.py`` process with its own folder under
``--runs-dir``. A folder is named by spec, variant, budget and seed, and records a
record of the config it was trained with (``bench_config.json``): every resolved
value, and the fingerprint of older harnesses. A finished run whose record matches
is reused, a run of another config is *stale* and is moved aside
(``NAME.stale-DATE``) only when it is about to be retrained. The values are compared
key by key, so a key added to the toolkit since (at its default) leaves a folder
reusable, and a changed default makes the folders trained under the old one stale
whether or not their suite pinned the key, unless the key belongs to a distillation
term the run leaves off (its ``ENABLED`` still counts). A folder of an older harness holds only
the fingerprint (a hash of the values that differ from *today's* defaults), which a
changed default misleads; it stays the rule there. The toolkit's own ``run.json``
guards the folder too, but its identity holds a hash of the dataset, which the
harness cannot compute without loading the data.

A spec's stage 0 has no teacher, so it trains the same for every variant: it is
trained once, as a one-stage run keyed by its data (the spec's dataset, its
first-stage classes, the seed and the budget), and every variant starts from it
with ``--start-stage 1 --teacher-weights``. A compression suite's teacher is such a
run too (one stage of all classes, its detector's config): each student is a
``tools/train_compression.py`` run that it teaches.
"""
import functools
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from ilmil.config import changed_from_defaults, config_items, default_cfg, get_ilmil_cfg
from ilmil.data import parse_stage_spec, shapes_num_classes
from ilmil.file_io import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train_incremental.py")
COMPRESS = os.path.join(ROOT, "tools", "train_compression.py")
CONFIG_RECORD = "bench_config.json"  # the config a run folder was trained with
# Wall time, peak memory and command of the training that finished a run folder, so a
# record made by a later invocation (which reuses the run) still has them.
OUTCOME_RECORD = "bench_outcome.json"
BATCH = 4


class BenchError(ValueError):
    """A benchmark invocation that cannot run as asked; the message says why and the fix."""


# The trainings in flight: a harness stopped by a signal stops them too rather than
# leaving them to run on, unwatched, into the folder a restarted harness resumes.
_TRAININGS = set()
_stop_signal = None  # the signal that stopped the harness, once one has


def stop_trainings(signum, frame=None):
    """Signal handler: terminate the trainings in flight (each keeps its last checkpoint,
    so the same command resumes) and start no other; each worker then returns STOPPED and
    the harness exits with ``stop_status()``. It raises nothing: a handler runs wherever the
    main thread is, a finaliser included, where an exception is printed and dropped (the
    harness went on and exited 1)."""
    global _stop_signal
    _stop_signal = signum
    for proc in list(_TRAININGS):
        proc.terminate()


def stop_status():
    """The exit status of a harness a signal stopped (128 + its number), else None."""
    return None if _stop_signal is None else 128 + _stop_signal


def _stopping():
    return _stop_signal is not None


STOPPED = "stopped by a signal; fix: re-run the same command to resume"

# A folder trained with another config is renamed NAME + STALE_MARK + date before it is retrained.
STALE_MARK = ".stale-"


def log(message):
    # One write with its newline: print() writes the end apart, and two training threads'
    # lines ran together.
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}\n", end="", flush=True)


@functools.lru_cache(maxsize=None)
def _resolved_config(config_file, overrides, method):
    cfg = get_ilmil_cfg(os.path.join(ROOT, config_file) if config_file else None, overrides, method=method)
    cfg.freeze()
    return cfg


@functools.lru_cache(maxsize=None)
def _default_values():
    return {key: repr(value) for key, value in config_items(default_cfg()).items()}


@dataclass(frozen=True)
class Run:
    """One tools/train_incremental.py (or train_compression.py) process. The reuse check
    and the training both read it, so they cannot disagree about which config a folder holds."""

    out_dir: str
    spec: str
    method: str
    seed: int
    iters: int  # per stage
    num_train: int
    num_test: int
    opts: tuple = ()  # KEY VALUE config overrides, after the protocol's
    flags: tuple = ()  # command-line flags of the training tool that change what is trained
    # The run whose stage-0 model this one needs: the shared stage 0 it starts from or, for a
    # compression run, its teacher.
    stage0: "Run" = None
    config_file: str = ""  # the detector's yaml config, relative to the repository root ("": the default)
    compression: bool = False  # a student of stage0's classes, distilled from it (tools/train_compression.py)

    @property
    def num_stages(self):
        return len(parse_stage_spec(self.spec))

    def overrides(self):
        """The KEY VALUE config overrides: data size, batch, budget, then ``opts``."""
        iters = self.iters
        step = int(iters * 0.8)  # none in a run too short for one (check_lr_steps refuses a step at 0)
        return [
            "ILMIL.SHAPES.NUM_TRAIN", str(self.num_train), "ILMIL.SHAPES.NUM_TEST", str(self.num_test),
            "SOLVER.IMS_PER_BATCH", str(BATCH), "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", f"({step},)" if step else "()", "SOLVER.WARMUP_ITERS", str(min(100, iters // 5)),
            *self.opts,
        ]  # fmt: skip

    def config(self):
        """The resolved config, frozen: the reuse check, the records and the tables ask for
        it many times, and each resolution reads yaml files."""
        return _resolved_config(self.config_file, tuple(self.overrides()), self.method)

    def schedule(self):
        """What the run trains besides its config: spec, method, seed and training flags;
        not the code, and not where its stage 0 comes from."""
        return [self.spec, self.method, self.seed, list(self.flags)]

    def resolved(self):
        """``{"SECTION.KEY": repr(value)}`` of every value the run trains with."""
        return {key: repr(value) for key, value in config_items(self.config()).items()}

    def compared(self):
        """The resolved values that decide reuse: all but the settings of the distillation
        terms the run leaves off, which it never reads; their ``ENABLED`` flags count."""
        cfg = self.config()
        off = tuple(f"ILMIL.DISTILL.{section}." for section, node in cfg.ILMIL.DISTILL.items()
                    if isinstance(node, dict) and not node.get("ENABLED", True))
        return {key: repr(value) for key, value in config_items(cfg).items()
                if not key.startswith(off) or key.endswith(".ENABLED")}

    def fingerprint(self):
        """The schedule and the resolved config's values that differ from today's defaults
        (the reuse rule of the folders that older harnesses recorded)."""
        changed = sorted((key, repr(value)) for key, value in changed_from_defaults(self.config()).items())
        identity = json.dumps([*self.schedule(), changed])
        return hashlib.sha256(identity.encode()).hexdigest()[:16]

    def record(self):
        """The folder's ``bench_config.json``."""
        return {"schedule": self.schedule(), "config": self.resolved(), "fingerprint": self.fingerprint()}

    def trained_as(self, record):
        """Whether a folder's record says it was trained as this run is: same schedule and,
        key by key, the same values (``compared``); a key the record lacks (added to the
        toolkit since) must be at its default. A record of an older harness: the same fingerprint."""
        if "config" not in record:  # no fingerprint either: a record of unknown make, retrained
            return record.get("fingerprint") == self.fingerprint()
        if record["schedule"] != self.schedule():
            return False
        defaults = _default_values()
        return all(record["config"].get(key, defaults.get(key)) == value for key, value in self.compared().items())

    def command(self):
        config = ("--config-file", self.config_file) if self.config_file else ()
        if self.compression:
            tool = (COMPRESS, "--stages", self.spec)
            start = ("--teacher-weights", self.stage0.final_model(0), "--teacher-config", self.stage0.config_file)
        else:
            tool = (TRAIN, "--stages", self.spec, "--method", self.method)
            start = ("--start-stage", "1", "--teacher-weights", self.stage0.final_model(0)) if self.stage0 else ()
        return [
            sys.executable, *tool, "--seed", str(self.seed), "--output-dir", self.out_dir,
            "--resume",  # a suite killed mid-stage continues that stage from its last checkpoint
            *start, *config, *self.flags, *self.overrides(),
        ]  # fmt: skip

    def final_model(self, stage):
        return os.path.join(self.out_dir, f"stage_{stage}", "model_final.pth")


def budget_name(setting):
    return f"{setting.base_iters}+{setting.iters}"


def parse_budget(budget):
    """``(base_iters, iters)`` of a record's ``budget_name``."""
    base_iters, iters = budget.split("+")
    return int(base_iters), int(iters)


def _detector_prefix(variant):
    """A folder-name prefix for the runs of a variant's own detector ("" for the default one)."""
    return f"{variant.detector}_" if variant.detector else ""


def stage0_run(runs_dir, spec, seed, setting, extra, variant):
    """The one-stage run that trains ``spec``'s stage 0 of ``variant``'s detector, keyed
    by its data: the spec's dataset (a 40+40 stage 0 is trained on the 80-class data,
    not on the 40-class data a spec of 40 alone would generate), its first-stage
    classes, the seed and the budget."""
    first = parse_stage_spec(spec)[0]
    cfg = get_ilmil_cfg(None, list(extra))
    data_classes = shapes_num_classes(cfg.ILMIL.SHAPES, spec)
    classes, opts = f"{first}classes", tuple(extra)
    if shapes_num_classes(cfg.ILMIL.SHAPES, str(first)) != data_classes:
        # Only then is the data named: the recorded folders (10, 15, 19 of 20) keep their names.
        classes = f"{first}of{data_classes}classes"
        opts += ("ILMIL.SHAPES.NUM_CLASSES", str(data_classes))
    name = f"base_{_detector_prefix(variant)}{classes}_{setting.base_iters}it_seed{seed}"
    return Run(os.path.join(runs_dir, name), str(first), "finetune", seed, setting.base_iters,
               setting.num_train, setting.num_test, opts, config_file=variant.config_file)


def teacher_run(runs_dir, variant, spec, seed, setting, extra):
    """The one-stage run of ``variant``'s teacher config that a compression suite's
    students of ``variant.detector`` share: all of the spec's classes, the stage-0 budget."""
    name = f"teacher_{variant.detector}_{spec}classes_{setting.base_iters}it_seed{seed}"
    return Run(os.path.join(runs_dir, name), spec, "finetune", seed, setting.base_iters, setting.num_train,
               setting.num_test, tuple(extra), config_file=variant.teacher_config)


def plan(suite, quick, specs, seeds, runs_dir, extra):
    """``{(spec, variant name, seed): Run}`` of the suite; runs shared by several
    keys (joint, by specs of the same classes) are one ``Run``."""
    setting = suite.setting(quick)
    own_dir = os.path.join(runs_dir, suite.label(quick))
    shared_dir = os.path.join(runs_dir, suite.label(quick, suite.runs_group))
    runs = {}
    for seed in seeds:
        for spec in specs:
            counts = parse_stage_spec(spec)
            for variant in setting.variants:
                opts = (*extra, *variant.opts)
                shared = suite.stage0 == "shared"
                stage0 = stage0_run(shared_dir, spec, seed, setting, extra, variant) if shared else None
                if suite.stage0 == "teacher":
                    teacher = teacher_run(shared_dir, variant, spec, seed, setting, extra)
                    folder = suite.folder.format(spec=spec, slug=variant.slug, budget=budget_name(setting), seed=seed)
                    run = Run(os.path.join(own_dir, folder), spec, variant.method, seed, setting.iters,
                              setting.num_train, setting.num_test, opts, variant.flags, teacher,
                              variant.config_file, compression=True)
                elif variant.method == "joint":
                    # One stage of all classes for the whole budget (stage 0's plus the later
                    # stages'): shared by specs of the same sum and budget, e.g. 10+10 and 15+5.
                    iters = setting.base_iters + (len(counts) - 1) * setting.iters
                    name = f"joint_{_detector_prefix(variant)}{sum(counts)}classes_{iters}it_seed{seed}"
                    run = Run(os.path.join(shared_dir, name), str(sum(counts)), "joint", seed, iters,
                              setting.num_train, setting.num_test, opts, variant.flags,
                              config_file=variant.config_file)
                else:
                    # A plain method is the run of the suite this one shares runs with.
                    plain = suite.runs_of and not variant.opts and not variant.flags
                    folder = suite.folder.format(spec=spec, slug=variant.method if plain else variant.slug,
                                                 budget=budget_name(setting), seed=seed)
                    out_dir = os.path.join(shared_dir if plain else own_dir, folder)
                    run = Run(out_dir, spec, variant.method, seed, setting.iters, setting.num_train,
                              setting.num_test, opts, variant.flags, stage0, variant.config_file)
                runs[spec, variant.name, seed] = run
    distinct = {}
    return {key: distinct.setdefault(run.out_dir, run) for key, run in runs.items()}


def read_results(run):
    path = os.path.join(run.out_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def machine():
    """The machine a run trains on. A virtual machine's CPU name often gives only the line
    ("AMD EPYC"): its family and model tell two generations of it apart, whose step times
    differ several-fold."""
    cpu, model = "unknown CPU", {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n", 1)[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("model name", cpu)
        if "cpu family" in fields and "model" in fields:
            model = {"cpu_model": f"family {fields['cpu family']}, model {fields['model']}"}
    import detectron2
    import torch

    gpu = {"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}
    return {"cpu": cpu, **model, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "detectron2": detectron2.__version__, **gpu}


def same_machine(a, b):
    """Whether two records' machines are the same kind, as far as both tell (a record of an
    older harness has no ``cpu_model``)."""
    model = "cpu_model" not in a or "cpu_model" not in b or a["cpu_model"] == b["cpu_model"]
    return model and all(a.get(key) == b.get(key) for key in ("cpu", "cores", "gpu"))


def read_outcome(run):
    """What ``train`` measured when it finished ``run`` ({} for a folder of an older harness)."""
    path = os.path.join(run.out_dir, OUTCOME_RECORD)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def reuse_status(run):
    """``"finished"``, ``"stale"`` (trained with another config), ``"partial"`` or
    ``"new"``; reads the folder and changes nothing. A folder without a
    fingerprint (an older harness) is taken as is. (``describe`` also calls a run stale
    whose stage 0 is to be trained.)"""
    if not os.path.isdir(run.out_dir):
        return "new"
    record = os.path.join(run.out_dir, CONFIG_RECORD)
    if os.path.exists(record):
        with open(record) as f:
            if not run.trained_as(json.load(f)):
                return "stale"
    results = read_results(run)
    # A run started at stage 1 records its given stage 0 too: the last stage decides.
    last = results["stages"][-1]["stage"] if results and results["stages"] else None
    return "finished" if last == run.num_stages - 1 else "partial"  # joint runs: one stage of every class


def progress(out_dir):
    """Where a partial run stands: the folder it trained last, the last iteration it logged
    there and the one a resume starts at ("" when it logged none)."""
    logs = glob.glob(os.path.join(out_dir, "**", "metrics.json"), recursive=True)
    if not logs:
        return ""
    folder = os.path.dirname(max(logs, key=os.path.getmtime))
    with open(os.path.join(folder, "metrics.json")) as f:
        logged = [json.loads(line)["iteration"] for line in f if line.strip().endswith("}")]
    checkpoint = os.path.join(folder, "last_checkpoint")
    resumes = "resumes at 0"
    if os.path.exists(checkpoint):
        with open(checkpoint) as f:
            name = f.read().strip()  # model_0000749.pth
        digits = name[len("model_"):-len(".pth")]
        resumes = f"resumes at {int(digits) + 1}" if digits.isdigit() else f"resumes from {name}"
    where = os.path.relpath(folder, out_dir)
    return f"{where}: logged to iteration {logged[-1] + 1 if logged else 0}, {resumes}"


def train(run, fresh=False, status=None):
    """Train ``run`` (setting a stale folder aside first); returns wall time, peak RSS (MiB),
    command and machine. ``status``: ``describe``'s, which knows the run's stage 0 (default:
    ``reuse_status``'s, of the folder alone)."""
    if _stopping():  # before the folder is touched: --fresh would delete it
        raise BenchError(STOPPED)
    status = status or reuse_status(run)
    if status == "stale":
        stale = f"{run.out_dir}{STALE_MARK}{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(run.out_dir, stale)
        log(f"{run.out_dir} was trained with another config or stage 0: moved to {stale}, training anew")
    elif fresh and os.path.isdir(run.out_dir):
        shutil.rmtree(run.out_dir)
    os.makedirs(run.out_dir, exist_ok=True)
    atomic_write(os.path.join(run.out_dir, CONFIG_RECORD),
                 lambda f: json.dump(run.record(), f, indent=1), mode="w")
    cmd = run.command()
    start = time.perf_counter()
    with open(os.path.join(run.out_dir, "bench_stdout.log"), "a") as logfile:
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, cwd=ROOT)
        _TRAININGS.add(proc)
        # A signal since the check above found no process of this run to stop: stopped here. (The
        # handler records the stop before it lists the processes, so one of the two sees the other.)
        if _stopping():
            proc.terminate()
        try:
            _, status_code, usage = os.wait4(proc.pid, 0)
        except ChildProcessError:  # a stop's terminate() polls first, and so reaps a child just ended
            if not _stopping():
                raise
            raise BenchError(STOPPED) from None
        finally:
            _TRAININGS.discard(proc)
    if os.waitstatus_to_exitcode(status_code) != 0:
        if _stopping():  # terminated by the harness's stop, not failed
            raise BenchError(STOPPED)
        raise BenchError(f"training failed ({' '.join(cmd[1:])}), {run.out_dir}/bench_stdout.log; "
                         "fix what its last lines name and re-run the same command (finished runs are reused)")
    outcome = {"wall_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
               "command": " ".join(cmd[1:]), "machine": machine()}
    atomic_write(os.path.join(run.out_dir, OUTCOME_RECORD), lambda f: json.dump(outcome, f), mode="w")
    return outcome


def complete_record(run):
    """Give a reused folder of an older harness (its fingerprint only) the full record: the
    fingerprint matched under today's defaults, and a default changed later would mislead it."""
    path = os.path.join(run.out_dir, CONFIG_RECORD)
    if not os.path.exists(path):
        return
    with open(path) as f:
        if "config" in json.load(f):
            return
    atomic_write(path, lambda f: json.dump(run.record(), f, indent=1), mode="w")


def describe(runs, fresh=False):
    """What an invocation would do with each distinct run: a dict out_dir -> status."""
    statuses = {}
    for run in runs:
        for r in (run.stage0, run) if run.stage0 else (run,):
            statuses.setdefault(r.out_dir, reuse_status(r))
    # A run begun from a stage 0 that is to be trained (anew) learned from another model.
    for run in runs:
        if run.stage0 and statuses[run.stage0.out_dir] != "finished" and statuses[run.out_dir] != "new":
            statuses[run.out_dir] = "stale"
    if fresh:
        statuses.update({run.out_dir: "fresh" for run in runs})
    return statuses


def execute(runs, jobs=1, fresh=False):
    """Train every run of ``runs`` not finished (all of them when ``fresh``) on
    ``jobs`` workers; returns ``{out_dir: training outcome}`` of those trained.
    The stage-0 runs are queued first, then the runs that need none, then those
    that start from one, so no worker waits on a stage 0 while another could start."""
    statuses = describe(runs, fresh)
    distinct = {run.out_dir: run for run in runs}
    every_run = {r.out_dir: r for run in runs for r in (run.stage0, run) if r}
    to_train = [run for run in distinct.values() if statuses[run.out_dir] != "finished"]
    stage0s = {run.stage0.out_dir: run.stage0 for run in to_train
               if run.stage0 and statuses[run.stage0.out_dir] != "finished"}
    for out_dir, status in statuses.items():
        if status == "finished":
            log(f"reusing {out_dir}")
            complete_record(every_run[out_dir])
        elif status == "stale":
            log(f"{out_dir} was trained with another config or stage 0: it will be moved aside and retrained")
    log(f"{len(stage0s) + len(to_train)} runs to train, {jobs} at a time")
    with ThreadPoolExecutor(jobs) as pool:
        stage0_done = {out_dir: pool.submit(_train_logged, run, statuses[out_dir]) for out_dir, run in stage0s.items()}

        def train_after_stage0(run):
            if run.stage0 and run.stage0.out_dir in stage0_done:
                stage0_done[run.stage0.out_dir].result()
            return _train_logged(run, statuses[run.out_dir], fresh)

        queued = sorted(to_train, key=lambda run: run.stage0 is not None)
        trained = {run.out_dir: pool.submit(train_after_stage0, run) for run in queued}
        outcomes = {out_dir: future.result() for out_dir, future in trained.items()}
    for future in stage0_done.values():
        future.result()
    return outcomes


def _train_logged(run, status, fresh=False):
    """``train`` with its start, end or failure logged; ``status`` is ``describe``'s ("fresh" under --fresh)."""
    if _stopping():  # a queued run after a signal: refused without a word per run
        raise BenchError(STOPPED)
    where = progress(run.out_dir) if status == "partial" else ""
    log(f"{os.path.basename(run.out_dir)}: training" + (f" ({where})" if where else ""))
    try:
        outcome = train(run, fresh, status)
    except BenchError as error:
        # Said now, not after the runs still training (hours, maybe), which go on to their end.
        log(f"{os.path.basename(run.out_dir)}: failed: {error}")
        raise
    log(f"{os.path.basename(run.out_dir)}: finished in {outcome['wall_s'] / 60:.1f} min")
    return outcome
