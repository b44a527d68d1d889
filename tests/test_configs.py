"""Every shipped config loads with the ILMIL keys and builds its model (on the CPU,
without running it)."""
import glob
import os

import pytest

from detectron2.modeling import build_model

from ilmil.config import (CONFIGS_DIR, DEFAULT_CONFIG, METHOD_PRESETS, ConfigError, check_test_input,
                          check_training_values, derived_cfg, get_ilmil_cfg, method_presets)
from ilmil.data import BUILTIN_DATASETS, parse_stage_spec
from ilmil.checkpoint import state_dict_num_classes

CONFIGS = sorted(
    path for path in glob.glob(os.path.join(CONFIGS_DIR, "**", "*.yaml"), recursive=True)
    if not os.path.basename(path).startswith("Base-")
)


def test_configs_are_found():
    names = {os.path.relpath(p, CONFIGS_DIR) for p in CONFIGS}
    assert os.path.relpath(DEFAULT_CONFIG, CONFIGS_DIR) in names
    assert len(names) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, CONFIGS_DIR))
def test_config_loads_and_builds_its_model(path):
    cfg = get_ilmil_cfg(path, ["MODEL.DEVICE", "cpu"])
    assert cfg.ILMIL.DATASET in BUILTIN_DATASETS
    assert cfg.ILMIL.METHOD in METHOD_PRESETS
    assert cfg.SEED == 0  # seeded: detectron2's -1 draws a new seed each run
    counts = parse_stage_spec(cfg.ILMIL.STAGES)
    # The model's class count is set per stage; the config's is the whole schedule, under
    # the key of its detector.
    heads = {"RetinaNet": cfg.MODEL.RETINANET, "FCOS": cfg.MODEL.FCOS}
    num_classes = heads.get(cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.ROI_HEADS).NUM_CLASSES
    assert sum(counts) <= num_classes
    model = build_model(cfg)
    assert state_dict_num_classes(model.state_dict()) == num_classes
    assert next(model.parameters()).device.type == "cpu"


def test_default_config_is_the_shapes_cpu_config():
    cfg = get_ilmil_cfg()
    assert cfg.ILMIL.DATASET == "shapes"
    assert cfg.MODEL.DEVICE == "cpu"
    assert cfg.MODEL.RESNETS.DEPTH == 18


def test_overrides_are_applied_after_the_file():
    cfg = get_ilmil_cfg(None, ["ILMIL.STAGES", "15+1x5", "SOLVER.MAX_ITER", 7])
    assert cfg.ILMIL.STAGES == "15+1x5" and cfg.SOLVER.MAX_ITER == 7


def test_a_separator_before_the_overrides_and_a_value_like_a_flag_are_overrides():
    cfg = get_ilmil_cfg(None, ["--", "SOLVER.MAX_ITER", "5", "MODEL.WEIGHTS", "--odd-name.pkl"])
    assert cfg.SOLVER.MAX_ITER == 5 and cfg.MODEL.WEIGHTS == "--odd-name.pkl"
    with pytest.raises(ConfigError, match=r"^--resume --force after the KEY VALUE config overrides"):
        get_ilmil_cfg(None, ["SOLVER.MAX_ITER", "5", "--resume", "--force"])


def test_a_one_stage_spec_stays_text_from_overrides_and_from_a_saved_config(tmp_path):
    # yacs reads "20" as a number; a compression run (--stages 20) saves it in config.yaml.
    cfg = get_ilmil_cfg(None, ["ILMIL.STAGES", "20"])
    assert cfg.ILMIL.STAGES == "20" and parse_stage_spec(cfg.ILMIL.STAGES) == [20]
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.dump())
    assert "STAGES: '20'" in saved.read_text()
    assert get_ilmil_cfg(str(saved)).ILMIL.STAGES == "20"
    assert get_ilmil_cfg(str(saved), ["ILMIL.STAGES", "15+5"]).ILMIL.STAGES == "15+5"


def test_a_whole_number_is_taken_for_a_decimal_key_from_overrides_and_from_a_file(tmp_path):
    cfg = get_ilmil_cfg(None, ["ILMIL.DISTILL.DENSE.WEIGHT", "1", "SOLVER.BASE_LR", "2"])
    assert type(cfg.ILMIL.DISTILL.DENSE.WEIGHT) is float and cfg.ILMIL.DISTILL.DENSE.WEIGHT == 1.0
    assert type(cfg.SOLVER.BASE_LR) is float and cfg.SOLVER.BASE_LR == 2.0
    assert get_ilmil_cfg(None, ["SOLVER.BASE_LR", "0.02", "SOLVER.BASE_LR", "1"]).SOLVER.BASE_LR == 1.0  # the last
    config = tmp_path / "config.yaml"
    config.write_text("_BASE_: %s\nILMIL:\n  DISTILL:\n    REVIEW:\n      BG_WEIGHT: 3\n" % DEFAULT_CONFIG)
    assert type(get_ilmil_cfg(str(config)).ILMIL.DISTILL.REVIEW.BG_WEIGHT) is float
    # A whole number stays refused where it is no number of the key's (a bool, a text key).
    for key, value in (("ILMIL.DISTILL.DENSE.WEIGHT", "True"), ("MODEL.WEIGHTS", "3")):
        with pytest.raises(ConfigError, match=rf"Type mismatch .* {key}"):
            get_ilmil_cfg(None, [key, value])


@pytest.mark.parametrize("frozen", [True, False])
def test_derived_cfg_sets_the_changes_on_a_copy_frozen_as_the_original(frozen):
    cfg = get_ilmil_cfg(None, ["SOLVER.MAX_ITER", 7])
    if frozen:
        cfg.freeze()
    derived = derived_cfg(cfg, {"SOLVER.MAX_ITER": 3, "DATASETS.TRAIN": ("a",), "OUTPUT_DIR": "out",
                                "ILMIL.PRUNING.CHANNELS": [["backbone.x", 4]]})
    assert (derived.SOLVER.MAX_ITER, derived.DATASETS.TRAIN, derived.OUTPUT_DIR) == (3, ("a",), "out")
    assert derived.ILMIL.PRUNING.CHANNELS == [["backbone.x", 4]]
    assert derived.SOLVER.BASE_LR == cfg.SOLVER.BASE_LR  # the rest is copied
    assert (cfg.SOLVER.MAX_ITER, cfg.OUTPUT_DIR, cfg.ILMIL.PRUNING.CHANNELS) == (7, get_ilmil_cfg().OUTPUT_DIR, [])
    assert derived.is_frozen() == cfg.is_frozen() == frozen


@pytest.mark.parametrize("key", ["SOLVER.MAX_ITERS", "SOLVR.MAX_ITER", "SOLVER.MAX_ITER.X"])
def test_derived_cfg_refuses_a_key_the_config_lacks(key):
    with pytest.raises(KeyError, match=f"config key {key}: no such key"):
        derived_cfg(get_ilmil_cfg(), {key: 1})


@pytest.mark.parametrize("path", CONFIGS)
def test_every_method_preset_of_a_config_loads(path):
    architecture = get_ilmil_cfg(path).MODEL.META_ARCHITECTURE
    presets = method_presets(architecture)
    assert set(presets) <= set(METHOD_PRESETS) and {"finetune", "joint", "ilmil"} <= set(presets)
    for method in presets:
        cfg = get_ilmil_cfg(path, ["MODEL.DEVICE", "cpu"], method=method)
        assert cfg.ILMIL.METHOD == method


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_solver_optimizer_builds_that_optimizer_with_detectron2s_parameter_groups(name):
    from ilmil.engine import IncrementalTrainer

    cfg = get_ilmil_cfg(None, ["SOLVER.OPTIMIZER", name, "SOLVER.WEIGHT_DECAY", 0.05, "SOLVER.BASE_LR", 3e-4])
    model = build_model(cfg)
    optimizer = IncrementalTrainer.build_optimizer(cfg, model)
    assert type(optimizer).__name__ == name
    groups = optimizer.param_groups
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    # Norm layers are not decayed (SOLVER.WEIGHT_DECAY_NORM 0), the other weights are.
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    assert all(g["lr"] == 3e-4 for g in groups)


def test_unknown_optimizer_is_refused_with_the_choices():
    from ilmil.config import ConfigError, check_optimizer

    with pytest.raises(ConfigError, match="SOLVER.OPTIMIZER 'Adam': choose one of SGD, AdamW"):
        check_optimizer(get_ilmil_cfg(None, ["SOLVER.OPTIMIZER", "Adam"]))


def test_lr_steps_are_checked_as_the_multi_step_schedule_takes_them():
    from ilmil.config import ConfigError, check_lr_steps

    def check(*opts):
        check_lr_steps(get_ilmil_cfg(None, list(opts)))

    check("SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(8, 20)")  # a step past MAX_ITER is dropped, as detectron2 does
    check("SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(10,)", "SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR")  # no steps read
    with pytest.raises(ConfigError, match=r'SOLVER.STEPS \(1,\) with SOLVER.MAX_ITER 1: .*fix: e.g. SOLVER.STEPS "\(\)"'):
        check("SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "(1,)")


def test_unknown_teacher_precision_is_refused_before_any_work(tmp_path):
    from ilmil.config import ConfigError
    from ilmil.engine.runner import IncrementalRun

    cfg = get_ilmil_cfg(None, ["ILMIL.TEACHER.PRECISION", "half", "OUTPUT_DIR", str(tmp_path / "run")], method="ilmil")
    with pytest.raises(ConfigError, match="ILMIL.TEACHER.PRECISION 'half': choose one of float32, bfloat16, float16"):
        IncrementalRun(cfg)
    assert not (tmp_path / "run").exists()


def test_training_and_test_values_refused_and_the_ones_detectron2_reads_as_all_or_none_kept():
    rcnn, dense = get_ilmil_cfg(), get_ilmil_cfg(os.path.join(CONFIGS_DIR, "shapes", "retinanet_R18_FPN_cpu.yaml"))
    # -1 detections: R-CNN's box head keeps them all; a dense head would cut the last one off.
    check_test_input(derived_cfg(rcnn, {"TEST.DETECTIONS_PER_IMAGE": -1}))
    with pytest.raises(ConfigError, match=r"^TEST.DETECTIONS_PER_IMAGE -1: must be at least 1"):
        check_test_input(derived_cfg(dense, {"TEST.DETECTIONS_PER_IMAGE": -1}))
    # Size 0: no resizing, in training as at test time.
    check_training_values(derived_cfg(rcnn, {"INPUT.MIN_SIZE_TRAIN": (0,), "INPUT.MIN_SIZE_TEST": 0}))
    for key, value, message in (("SOLVER.BASE_LR", float("nan"), "must be 0 or above"),
                                ("SOLVER.WEIGHT_DECAY", -0.1, "must be 0 or above"),
                                ("SOLVER.IMS_PER_BATCH", 0, "must be at least 1")):
        with pytest.raises(ConfigError, match=rf"^{key} {value}: {message}; fix: e.g. {key} "):
            check_training_values(derived_cfg(rcnn, {key: value}))
    sgd = derived_cfg(rcnn, {"SOLVER.OPTIMIZER": "SGD", "SOLVER.MOMENTUM": 1.0})
    with pytest.raises(ConfigError, match=r"^SOLVER.MOMENTUM 1.0: must be in \[0, 1\)"):
        check_training_values(sgd)

