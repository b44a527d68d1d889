"""Training under mixed precision (``SOLVER.AMP.ENABLED``: detectron2's AMPTrainer runs
the forward under autocast), and with a reduced-precision teacher (``ILMIL.TEACHER.PRECISION``). Every detector, with the distillation terms its kd rows
use, gives finite losses whose gradients reach the student. The GPU run is
benchmarks/gpu_check.sh; here the same code runs under the CPU's autocast in float16,
CUDA's AMP dtype, where the same mixes of dtypes fail and the same sums overflow."""
import pytest
import torch

from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ilmil.distill.distiller import Distiller
from ilmil.distill.losses.relation import FSPRelation
from ilmil.distill.teacher import FrozenTeacher
from student_models import distilled_student


def _on(*terms):
    return [x for term in terms for x in (f"ILMIL.DISTILL.{term}.ENABLED", "True")]


CASES = {
    # student config, its teacher's, the terms switched on (M-KD's with learned weights)
    "faster_rcnn": ("kd/faster_rcnn_R18_FPN32_student_cpu.yaml", "faster_rcnn_R18_FPN_cpu.yaml",
                    _on("FEAT", "RPN", "RCN", "FGFI", "REVIEW", "AT", "FSP")),
    "retinanet": ("kd/retinanet_R18_FPN32_student_cpu.yaml", "retinanet_R18_FPN_cpu.yaml",
                  _on("FEAT", "FGFI", "DENSE", "REVIEW", "AT", "FSP")),
    "fcos": ("kd/fcos_R18_FPN32_student_cpu.yaml", "fcos_R18_FPN_cpu.yaml",
             _on("FEAT", "FGFI", "DENSE", "REVIEW", "AT", "FSP")),
    "yolov3": ("kd/yolov3_tiny_student_cpu.yaml", "yolov3_cpu.yaml", _on("FEAT", "DENSE", "INFOMAP")),
}
LEARNED_WEIGHTS = ["ILMIL.DISTILL.TERM_WEIGHTS", "uncertainty", "ILMIL.DISTILL.DETECTION_WEIGHT", "uncertainty"]


def _batch():
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(3, 128, 128, generator=gen) * 255
    instances = Instances((128, 128))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 50.0, 54.0], [60.0, 30.0, 118.0, 100.0]]))
    instances.gt_classes = torch.tensor([0, 2])
    return [{"image": image, "instances": instances}, {"image": image.flip(2), "instances": instances}]


@pytest.mark.parametrize("detector", list(CASES))
def test_a_distilled_training_step_under_autocast_gives_finite_losses_and_student_gradients(tmp_path, detector):
    config, teacher_config, terms = CASES[detector]
    opts = [*terms, *LEARNED_WEIGHTS, "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128"]
    model = distilled_student(tmp_path, config, teacher_config, 3, opts)
    torch.manual_seed(0)
    with EventStorage(), torch.autocast("cpu", dtype=torch.float16):
        losses = model(_batch())
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_the_terms_run_in_float32_where_float16_overflows():
    # Two correlated maps of 32 x 32: an FSP matrix's diagonal sums ~1024 products of ~100,
    # past float16's largest value (65504) before its division by H x W.
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(2, 8, 32, 32, generator=gen) * 10
    maps = {"a": first, "b": first + torch.randn(2, 8, 32, 32, generator=gen)}
    student = {name: x.half() for name, x in maps.items()}  # as recorded under float16 autocast
    teacher = {name: (0.9 * x).half() for name, x in maps.items()}
    fsp = FSPRelation(pairs=[["a", "b"]])
    expected = fsp({n: x.float() for n, x in student.items()}, {n: x.float() for n, x in teacher.items()})
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(fsp(student, teacher)).all()  # the term itself, under autocast
        value = Distiller({"FSP": fsp}, {"FSP": 1.0})(student, teacher, None)["loss_distill_fsp"]
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected)


def test_a_bfloat16_teacher_gives_a_one_stage_student_its_pseudo_labels(tmp_path):
    # FCOS: its untrained teacher has detections above its test threshold (RetinaNet's and
    # YOLO's have none, and no NMS runs); their scores and boxes come out in bfloat16.
    config, teacher_config, _ = CASES["fcos"]
    opts = ["ILMIL.TEACHER.PRECISION", "bfloat16", "ILMIL.PSEUDO_LABELS.ENABLED", "True",
            "ILMIL.PSEUDO_LABELS.SCORE_THRESH", "0.0", *_on("DENSE")]
    model = distilled_student(tmp_path, config, teacher_config, 5, opts)
    with EventStorage() as storage:
        losses = model(_batch())
        assert storage.latest()["pseudo_boxes_per_image"][0] > 0
    assert all(torch.isfinite(v).all() for v in losses.values())


def test_a_float32_teacher_stays_float32_inside_mixed_precision_training():
    teacher = FrozenTeacher(torch.nn.Conv2d(3, 4, 3), "float32")
    with torch.autocast("cpu", dtype=torch.float16):
        with teacher.autocast():
            assert teacher.module(torch.rand(1, 3, 8, 8)).dtype == torch.float32
        assert teacher.module(torch.rand(1, 3, 8, 8)).dtype == torch.float16  # the student's pass


def test_a_reduced_precision_teacher_runs_channels_last():
    bfloat16, float32 = (FrozenTeacher(torch.nn.Conv2d(3, 4, 3), p) for p in ("bfloat16", "float32"))
    assert bfloat16.module.weight.is_contiguous(memory_format=torch.channels_last)
    assert not bfloat16.module.weight.is_contiguous()
    assert float32.module.weight.is_contiguous()


@pytest.mark.parametrize("detector", list(CASES))
def test_a_bfloat16_teacher_gives_every_detector_finite_terms_and_student_gradients(tmp_path, detector):
    config, teacher_config, terms = CASES[detector]
    opts = [*terms, "ILMIL.TEACHER.PRECISION", "bfloat16", "INPUT.MIN_SIZE_TRAIN", "(128,)",
            "INPUT.MAX_SIZE_TRAIN", "128"]
    model = distilled_student(tmp_path, config, teacher_config, 3, opts)
    torch.manual_seed(0)
    with EventStorage():
        losses = model(_batch())
    distill = {k: v for k, v in losses.items() if k.startswith("loss_distill")}
    assert distill and all(torch.isfinite(v) and v > 0 for v in distill.values()), distill
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
