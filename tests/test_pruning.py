"""Structured L1 pruning of the shapes CPU detector (ResNet-18 FPN): the requested
fraction of the targeted channels goes, the model still runs with the unpruned
output shapes, checkpoints rebuild it exactly, the fine-tuning distils from the
unpruned model when asked, and the tools report the savings."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from tool_runs import SHAPES_OPTS, TRAIN_OPTS, metrics_lines, read_json, run_tool, tail
from ilmil.checkpoint import CheckpointError, IncrementalCheckpointer, StageRecord, safe_load
from ilmil.config import get_ilmil_cfg
from ilmil.data import load_dataset_source, register_stage_datasets
from ilmil.data.stages import Stage
from ilmil.distill import student as distill_student
from ilmil.engine.pruning_stage import check_pruning_config, prune_checkpoint
from ilmil.modeling import build_detector, with_checkpoint_layout
from ilmil.pruning import PruningError, channel_layout, format_pruning_table, measure_model, prunable_layers, prune_l1

IMAGE = (3, 64, 96)


def _cfg(*opts):
    return get_ilmil_cfg(None, ["MODEL.ROI_HEADS.NUM_CLASSES", 3, *opts])


def _model(*opts):
    torch.manual_seed(0)
    return build_model(_cfg(*opts))


def _inputs():
    torch.manual_seed(1)
    image = torch.randint(0, 255, IMAGE, dtype=torch.uint8)
    instances = Instances(IMAGE[1:])
    instances.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 30.0]]))
    instances.gt_classes = torch.tensor([0, 2])
    return [{"image": image, "height": IMAGE[1], "width": IMAGE[2], "instances": instances}]


def _ratios(backbone, box_head=0.0):
    return lambda name: box_head if ".box_head." in name else backbone


def test_pruning_removes_the_requested_fraction_of_the_targeted_channels():
    model = _model()
    before = channel_layout(model)
    after = prune_l1(model, _ratios(0.3, box_head=0.5))
    blocks = [n for n in before if ".bottom_up." in n]
    assert len(blocks) == 8  # ResNet-18: 2 basic blocks per stage, one inner conv each
    for name in blocks:
        assert after[name] == round(before[name] * 0.7)
    assert after["roi_heads.box_head.fc1"] == 128 and after["roi_heads.box_head.fc2"] == 128
    layers = prunable_layers(model)
    conv1, (conv2,) = layers["backbone.bottom_up.res3.0.conv1"]
    assert conv1.weight.shape[0] == conv1.norm.num_features == conv1.norm.running_mean.numel() == 90
    assert conv2.weight.shape[1] == 90
    assert model.roi_heads.box_predictor.cls_score.weight.shape == (4, 128)


@pytest.mark.parametrize("width, ratio, kept", [(9, 0.5, 5), (45, 0.3, 32)], ids=["even_below", "float_below"])
def test_a_half_channel_is_kept(width, ratio, kept):
    # 4.5 up, not to the even 4; 45 x 0.7 is 31.5, which floats make 31.4999...
    model = _model()
    name = "backbone.bottom_up.res2.0.conv1"
    prune_l1(model, lambda n: 1 - width / 64 if n == name else 0.0)
    assert prune_l1(model, lambda n: ratio if n == name else 0.0)[name] == kept


def test_the_filters_of_smallest_l1_norm_go():
    model = _model()
    conv1, _ = prunable_layers(model)["backbone.bottom_up.res2.0.conv1"]
    with torch.no_grad():
        conv1.weight.copy_(torch.arange(64, dtype=torch.float32).roll(7).view(64, 1, 1, 1).expand_as(conv1.weight))
    kept_norms = sorted(range(64), key=lambda i: (i - 7) % 64)[-32:]  # the 32 largest, in channel order
    expected = conv1.weight[sorted(kept_norms)].clone()
    prune_l1(model, lambda name: 0.5 if name == "backbone.bottom_up.res2.0.conv1" else 0.0)
    assert torch.equal(conv1.weight, expected)


def test_pruned_model_runs_in_train_and_eval_with_unpruned_output_shapes():
    unpruned, pruned = _model(), _model()
    prune_l1(pruned, _ratios(0.5, box_head=0.5))
    with EventStorage():
        losses = pruned.train()(_inputs())
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    pruned.eval(), unpruned.eval()
    with torch.no_grad():
        image = pruned.preprocess_image(_inputs()).tensor
        features, reference = pruned.backbone(image), unpruned.backbone(image)
        assert {k: v.shape for k, v in features.items()} == {k: v.shape for k, v in reference.items()}
        instances = pruned(_inputs())[0]["instances"]
    assert instances.pred_boxes.tensor.shape[1] == 4 and instances.image_size == IMAGE[1:]


def test_a_zero_ratio_changes_nothing():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_l1(model, _ratios(0.0))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _save_pruned(tmp_path):
    model = _model()
    prune_l1(model, _ratios(0.3, box_head=0.25))
    model.eval()
    record = StageRecord(model, ["a", "b", "c"], {})
    IncrementalCheckpointer(model, str(tmp_path), ilmil=record).save("model_pruned")
    return model, str(tmp_path / "model_pruned.pth")


def test_a_pruned_checkpoint_rebuilds_the_same_model_bit_for_bit(tmp_path):
    model, path = _save_pruned(tmp_path)
    checkpoint = safe_load(path)
    rebuilt = build_detector(with_checkpoint_layout(_cfg(), checkpoint))
    IncrementalCheckpointer(rebuilt).load(path)
    rebuilt.eval()
    with torch.no_grad():
        expected, got = model(_inputs())[0]["instances"], rebuilt(_inputs())[0]["instances"]
    assert len(expected) > 0
    assert torch.equal(expected.pred_boxes.tensor, got.pred_boxes.tensor)
    assert torch.equal(expected.scores, got.scores)


def test_loading_a_pruned_checkpoint_into_an_unpruned_model_is_refused(tmp_path):
    _, path = _save_pruned(tmp_path)
    with pytest.raises(CheckpointError, match=r"is pruned: 10 layer\(s\) differ.*with_checkpoint_layout"):
        IncrementalCheckpointer(_model()).load(path)


def test_frozen_layers_stay_frozen_when_pruned_and_rebuilt(tmp_path):
    # FREEZE_AT 2 (detectron2's default): the stem and res2 do not train, pruned or not.
    model = _model("MODEL.BACKBONE.FREEZE_AT", 2)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert any(".res2." in name for name in frozen)
    layout = prune_l1(model, _ratios(0.5))
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen
    rebuilt = build_detector(_cfg("MODEL.BACKBONE.FREEZE_AT", 2, "ILMIL.PRUNING.CHANNELS",
                                  [[name, width] for name, width in layout.items()]))
    assert {name for name, p in rebuilt.named_parameters() if not p.requires_grad} == frozen


def test_a_layout_wider_than_the_configs_model_is_refused_naming_the_layer():
    layout = channel_layout(_model())
    name = next(iter(layout))
    with pytest.raises(PruningError, match=rf"^the channel layout gives {name} {2 * layout[name]} outputs, this "
                                           rf"model's has {layout[name]}$"):
        build_detector(_cfg("ILMIL.PRUNING.CHANNELS", [[name, 2 * layout[name]]]))


@pytest.mark.parametrize("opts, named", [
    (["MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256, "MODEL.RESNETS.NUM_GROUPS", 2],
     "MODEL.RESNETS.NUM_GROUPS 2"),
    (["MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256, "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
      [False, False, True, True]], r"MODEL.RESNETS.DEFORM_ON_PER_STAGE \[False, False, True, True\]"),
])  # fmt: skip
def test_grouped_and_deformable_blocks_are_refused_before_any_work(opts, named):
    with pytest.raises(PruningError, match=rf"^ILMIL.PRUNING.RATIO \(--ratio, --prune\): {named}: grouped and "
                                           r"deformable residual blocks cannot be pruned; fix:"):
        check_pruning_config(_cfg("ILMIL.PRUNING.RATIO", 0.3, *opts))


def test_groupnorm_blocks_are_refused_with_the_fix():
    model = _model("MODEL.RESNETS.NORM", "GN")
    with pytest.raises(PruningError, match="MODEL.RESNETS.NORM to BN"):
        prune_l1(model, _ratios(0.3))


def test_syncbn_blocks_are_narrowed_with_their_norms():
    # detectron2's SyncBN is torch's SyncBatchNorm, which is not a BatchNorm2d.
    model = _model("MODEL.RESNETS.NORM", "SyncBN")
    block = model.backbone.bottom_up.res3[0]
    assert isinstance(block.conv1.norm, torch.nn.SyncBatchNorm)
    prune_l1(model, _ratios(0.5))
    assert block.conv1.out_channels == block.conv1.norm.num_features == block.conv1.norm.running_mean.numel() == 64
    with torch.no_grad():
        assert model.eval()(_inputs())[0]["instances"].pred_boxes.tensor.isfinite().all()


def test_pruning_makes_the_model_smaller_and_cheaper():
    model = _model()
    image = torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)
    before = measure_model(model, image, latency_repeats=3)
    prune_l1(model, _ratios(0.5))
    after = measure_model(model, image, latency_repeats=3)
    assert after["params"] < 0.8 * before["params"]
    assert 0 < after["gflops_backbone"] < 0.8 * before["gflops_backbone"]
    assert after["gflops"] > after["gflops_backbone"] and after["latency_ms"] > 0
    assert after["latency_device"] == "cpu"
    assert "| CPU latency (ms / image) |" in format_pruning_table({"before": before, "after": after})


# ------------------------------------------- fine-tuning with the unpruned teacher


@pytest.fixture
def unpruned_stage0(tiny_datasets_root, tmp_path, monkeypatch):
    """A saved unpruned model of the tiny set's first two classes (untrained: the test is
    of what the fine-tuning runs, not of what it learns), its config and its data."""
    monkeypatch.setenv("ILMIL_DATASETS", str(tiny_datasets_root))
    cfg = get_ilmil_cfg(None, [*SHAPES_OPTS, *TRAIN_OPTS], method="finetune")
    source = load_dataset_source(cfg)
    classes = tuple(source.class_names[:2])
    train_name, test_name = register_stage_datasets("test_prune_teacher", source, Stage(0, (), classes))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(classes)
    cfg.freeze()
    torch.manual_seed(0)
    model = build_detector(cfg)
    IncrementalCheckpointer(model, str(tmp_path), ilmil=StageRecord(model, classes, {})).save("model_final")
    return cfg, str(tmp_path / "model_final.pth"), classes, train_name, test_name


def _prune_and_finetune(stage0, output_dir, monkeypatch, *opts, resume=False):
    """``prune_checkpoint`` at ratio 0.5 with 3 fine-tuning iterations; returns its
    summary, the teachers built meanwhile and the loss terms the fine-tuning logged."""
    cfg, weights, classes, train_name, test_name = stage0
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(["ILMIL.PRUNING.RATIO", 0.5, "ILMIL.PRUNING.FINETUNE_ITERS", 3, *opts])
    cfg.freeze()
    teachers, build_teacher = [], distill_student.build_teacher

    def recording_build_teacher(*args, **kwargs):
        teachers.append(build_teacher(*args, **kwargs))
        return teachers[-1]

    monkeypatch.setattr(distill_student, "build_teacher", recording_build_teacher)
    summary = prune_checkpoint(cfg, weights, str(output_dir), classes, train_name, test_name, resume)
    logged = set().union(*(line.keys() for line in metrics_lines(output_dir / "finetune" / "metrics.json")))
    return summary, teachers, logged


def test_finetuning_with_the_teacher_distils_the_pruned_model_from_its_unpruned_self(
        unpruned_stage0, tmp_path, monkeypatch):
    _, weights, _, _, _ = unpruned_stage0
    # Learned term weights: the student holds distillation parameters, which the deployed model does not.
    summary, teachers, logged = _prune_and_finetune(
        unpruned_stage0, tmp_path / "pruned", monkeypatch,
        "ILMIL.PRUNING.FINETUNE_TEACHER", True, "ILMIL.DISTILL.RPN.ENABLED", True,
        "ILMIL.DISTILL.TERM_WEIGHTS", "uncertainty")
    assert summary["finetune_teacher"] is True and read_json(tmp_path / "pruned" / "pruning.json")["finetune_teacher"]
    # The feature term always; the RPN term as configured (on), the RCN term too (off).
    assert {"loss_distill_feat", "loss_distill_rpn"} <= logged and "loss_distill_rcn" not in logged
    # The teacher is the unpruned checkpoint: its widths and its weights.
    unpruned = safe_load(weights)
    (teacher,) = teachers
    assert channel_layout(teacher) == unpruned["ilmil"]["channel_layout"]
    assert torch.equal(teacher.roi_heads.box_predictor.cls_score.weight,
                       unpruned["model"]["roi_heads.box_predictor.cls_score.weight"])
    # The fine-tuned student keeps the pruned widths.
    pruned = safe_load(summary["pruned_weights"])["ilmil"]["channel_layout"]
    name = "backbone.bottom_up.res4.1.conv1"
    assert pruned[name] == unpruned["ilmil"]["channel_layout"][name] // 2
    assert summary["after"]["params"] < 0.8 * summary["before"]["params"]
    # The pruned detector's size: the same layout fine-tuned without the teacher measures the same.
    plain, _, _ = _prune_and_finetune(unpruned_stage0, tmp_path / "plain", monkeypatch)
    assert summary["after"]["params"] == plain["after"]["params"]


def test_plain_finetuning_has_no_teacher(unpruned_stage0, tmp_path, monkeypatch):
    summary, teachers, logged = _prune_and_finetune(unpruned_stage0, tmp_path / "pruned", monkeypatch,
                                                    "ILMIL.DISTILL.RPN.ENABLED", True)
    assert summary["finetune_teacher"] is False and summary["finetune_iters"] == 3
    assert teachers == [] and "loss_cls" in logged
    assert not any(term.startswith("loss_distill") for term in logged)


@pytest.mark.parametrize("opts, message", [
    (["ILMIL.PRUNING.FINETUNE_TEACHER", True],
     r"FINETUNE_TEACHER \(--finetune-teacher\) True with ILMIL.PRUNING.FINETUNE_ITERS \(--finetune-iters\) 0: .*"
     r"fix: give fine-tuning iterations"),
    (["ILMIL.PRUNING.FINETUNE_TEACHER", True, "ILMIL.PRUNING.FINETUNE_ITERS", 5,
      "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"],
     r"needs a student MODEL.META_ARCHITECTURE \(IncrementalRCNN, .*\) to hold the teacher, got GeneralizedRCNN; fix:"),
])  # fmt: skip
def test_a_teacher_without_finetuning_or_a_model_to_hold_it_is_refused(opts, message):
    with pytest.raises(PruningError, match=message):
        check_pruning_config(_cfg(*opts))


# ------------------------------------------------------------------ the tools


def test_the_fine_tuning_is_seeded_and_resumes_from_its_checkpoint(unpruned_stage0, tmp_path, monkeypatch):
    # Twice in one process: the second starts from another global random state, as a
    # re-run whose stage before was reused (not trained in this process) does.
    opts = ("ILMIL.PRUNING.FINETUNE_ITERS", 6, "SOLVER.CHECKPOINT_PERIOD", 2)
    first, _, _ = _prune_and_finetune(unpruned_stage0, tmp_path / "first", monkeypatch, *opts)
    second, _, _ = _prune_and_finetune(unpruned_stage0, tmp_path / "second", monkeypatch, *opts)
    expected = safe_load(first["pruned_weights"])["model"]
    got = safe_load(second["pruned_weights"])["model"]
    assert all(torch.equal(got[key], expected[key]) for key in expected)

    # Killed after the fine-tuning's checkpoint of iteration 1: resumed from it.
    finetune = tmp_path / "second" / "finetune"
    for name in ("model_final.pth", "model_0000003.pth", "model_0000005.pth", "iteration_times.json"):
        (finetune / name).unlink()
    (finetune / "last_checkpoint").write_text("model_0000001.pth")
    _prune_and_finetune(unpruned_stage0, tmp_path / "second", monkeypatch, *opts, resume=True)
    assert read_json(finetune / "iteration_times.json")["start_iter"] == 2  # timed after 3 iterations
    assert safe_load(str(finetune / "model_final.pth"))["iteration"] == 5
    resumed = safe_load(second["pruned_weights"])["model"]  # no loader workers: the same weights
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)


def test_train_incremental_prunes_at_the_stage_boundary(tiny_datasets_root, tmp_path):
    out = tmp_path / "run"
    proc = run_tool("train_incremental.py", [
        "--stages", "2+2", "--method", "ilmil", "--prune", "0.5", "--output-dir", str(out), *SHAPES_OPTS,
        *TRAIN_OPTS, "ILMIL.PRUNING.BOX_HEAD_RATIO", "0.5", "ILMIL.PRUNING.FINETUNE_ITERS", "2"], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    summary = read_json(out / "stage_0" / "pruned" / "pruning.json")
    assert summary["after"]["params"] < 0.8 * summary["before"]["params"]
    assert summary["after"]["gflops_backbone"] < summary["before"]["gflops_backbone"]
    assert all(0 <= summary[k]["AP50"] <= 100 for k in ("before", "after"))
    assert safe_load(str(out / "stage_0" / "pruned" / "finetune" / "model_final.pth"))["iteration"] == 1
    # The teacher stays unpruned; the student of stage 1 and its checkpoint keep the pruned widths.
    teacher_layout = safe_load(str(out / "stage_0" / "model_final.pth"))["ilmil"]["channel_layout"]
    student_layout = safe_load(str(out / "stage_1" / "model_final.pth"))["ilmil"]["channel_layout"]
    assert student_layout["backbone.bottom_up.res4.1.conv1"] == teacher_layout["backbone.bottom_up.res4.1.conv1"] // 2
    assert student_layout == safe_load(summary["pruned_weights"])["ilmil"]["channel_layout"]
    results = read_json(out / "results.json")
    assert results["pruning"]["after_stage"] == 0 and len(results["stages"]) == 2
    assert "## Pruning" in (out / "report.md").read_text()
    # The evaluation tool rebuilds the pruned model from its checkpoint alone.
    proc = run_tool("eval_incremental.py", ["--run-dir", str(out), "--output-dir", str(tmp_path / "eval"),
                                            *SHAPES_OPTS, *TRAIN_OPTS], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)


def test_prune_tool_reports_before_and_after(tiny_datasets_root, tmp_path):
    out = tmp_path / "base"
    proc = run_tool("train_incremental.py", ["--stages", "2+2", "--output-dir", str(out), *SHAPES_OPTS, *TRAIN_OPTS],
                    tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    weights = str(out / "stage_0" / "model_final.pth")
    args = ["--weights", weights, "--ratio", "0.3", "--finetune-iters", "2", "--finetune-teacher",
            "--output-dir", str(tmp_path / "pruned"), *SHAPES_OPTS, *TRAIN_OPTS, "SOLVER.CHECKPOINT_PERIOD", "1"]
    proc = run_tool("prune.py", args, tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    summary = read_json(tmp_path / "pruned" / "pruning.json")
    assert summary["ratio"] == 0.3 and summary["finetune_iters"] == 2 and summary["finetune_teacher"] is True
    assert "loss_distill_feat" in metrics_lines(tmp_path / "pruned" / "finetune" / "metrics.json")[-1]
    assert summary["after"]["params"] < summary["before"]["params"]
    assert "| parameters (M) |" in proc.stdout and "AP50 (all classes)" in proc.stdout
    # Killed after the fine-tuning's first iteration: --resume continues it.
    finetune = tmp_path / "pruned" / "finetune"
    for name in ("model_final.pth", "model_0000001.pth"):
        (finetune / name).unlink()
    (finetune / "last_checkpoint").write_text("model_0000000.pth")
    proc = run_tool("prune.py", ["--resume", *args], tiny_datasets_root)
    assert proc.returncode == 0, tail(proc)
    assert "resuming at iteration 1" in proc.log and (finetune / "model_final.pth").is_file()
    # Ratios that prune nothing: one error line, nothing written.
    for ratios, said in ((["--ratio", "0"], "--ratio, --stage-ratios and --box-head-ratio prune nothing"),
                         (["--ratio", "0.3", "--stage-ratios", "0,0,0,0"], "nothing would be pruned")):
        nothing = tmp_path / f"nothing{len(ratios)}"
        proc = run_tool("prune.py", ["--weights", weights, *ratios, "--output-dir", str(nothing), *SHAPES_OPTS,
                                     *TRAIN_OPTS], tiny_datasets_root)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and said in proc.stderr, tail(proc)
        assert not nothing.exists()
