"""A distilled student built in-process: its teacher an untrained model of another
config saved to disk, the student's config checked as a run checks it."""
import torch

from detectron2.modeling import build_model

from ilmil.config import CONFIGS_DIR, get_ilmil_cfg, set_num_classes
from ilmil.distill import check_distill_config


def distilled_student(tmp_path, config, teacher_config, num_classes, opts=(), method="finetune"):
    """The student of ``configs/shapes/<config>`` (``num_classes``) in training mode, with
    ``opts``, taught by a 3-class model of ``configs/shapes/<teacher_config>``."""
    teacher_file = f"{CONFIGS_DIR}/shapes/{teacher_config}"
    teacher_cfg = set_num_classes(get_ilmil_cfg(teacher_file, ["MODEL.DEVICE", "cpu"], method="finetune"), 3)
    torch.manual_seed(0)
    path = tmp_path / "teacher.pth"
    torch.save({"model": build_model(teacher_cfg).state_dict()}, path)
    cfg = set_num_classes(get_ilmil_cfg(f"{CONFIGS_DIR}/shapes/{config}", [
        "MODEL.DEVICE", "cpu", "ILMIL.TEACHER.WEIGHTS", str(path), "ILMIL.TEACHER.CONFIG_FILE", teacher_file,
        *opts], method=method), num_classes)  # fmt: skip
    check_distill_config(cfg)
    return build_model(cfg).train()
