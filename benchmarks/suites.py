"""The benchmark suites, each a declaration: specs x variants x seeds at a budget,
how its records are made and which table shows them.

The CPU protocol: shapes at 256 px, configs/shapes/faster_rcnn_R18_FPN_cpu.yaml
(R18-FPN), batch 4, a fixed budget per stage. Adding a suite is one more
``Suite`` in ``SUITES`` (plus, at most, a table function in ``tables.py``).
"""
from dataclasses import dataclass, field

from . import tables
from .measures import kd_records, pruning_records, speed_records, training_records


@dataclass(frozen=True)
class Variant:
    """What a suite trains: a method with config overrides and command-line flags of
    its training tool (tools/train_incremental.py, or train_compression.py for an
    assistant chain); both decide whether a finished folder is reused."""

    name: str
    method: str
    opts: tuple = ()  # KEY VALUE config overrides, after the protocol's and the command line's
    flags: tuple = ()  # e.g. ("--prune", "0.3")
    # Compression suites: the student's and the teacher's configs (relative to the repository
    # root) and the detector they belong to (a table section; --detectors picks some).
    config_file: str = ""
    teacher_config: str = ""
    detector: str = ""
    # A student other than the detector's default (its own table section, compared with its
    # own "no KD" row); the name reads "<detector> <student>, <row>".
    student: str = ""

    @property
    def row(self):
        """The variant's row in its detector's table: its name without detector and student."""
        return self.name[len(self.detector):].strip().removeprefix(f"{self.student}, " if self.student else "")

    @property
    def slug(self):
        """The variant in folder names."""
        return self.name.replace(" ", "_").replace("(", "").replace(")", "")


@dataclass(frozen=True)
class Setting:
    """One size of a suite (``full``, or ``--quick``): its runs and budgets."""

    specs: tuple
    variants: tuple
    iters: int  # per stage after stage 0
    base_iters: int  # stage 0, one model shared by every variant of a spec; 0: the per-stage budget
    num_train: int
    num_test: int
    seeds: tuple = (0,)
    warmup: int = 0  # steps left out of the step-time median (speed suite)


@dataclass(frozen=True)
class Suite:
    name: str
    full: Setting
    quick: Setting
    table: object  # records -> markdown
    records: object = training_records  # (suite, setting, planned, outcomes, extra opts) -> records
    protocol: str = ""  # the suite's protocol in words, formatted with the setting's fields
    # "shared": one stage-0 model per data, first-stage classes, seed and budget, every
    # variant starting from it (--start-stage 1 --teacher-weights); "own": each run trains it;
    # "teacher": a compression suite, one teacher per detector and budget, every variant a
    # student distilled from it (tools/train_compression.py).
    stage0: str = "shared"
    folder: str = "{spec}_{slug}_{budget}it_seed{seed}"  # a run's folder name
    runs_of: str = ""  # the suite whose shared stage 0s and plain-method runs this one reuses
    fresh: bool = False  # retrain its runs on every invocation (timings)
    # Command-line options the suite cannot honour, with the reason.
    refuses: dict = field(default_factory=dict)

    def setting(self, quick):
        return self.quick if quick else self.full

    def label(self, quick, name=None):
        """``SUITE_SIZE`` (``name`` in place of the suite's): its records' and runs' folder name."""
        return f"{name or self.name}_{'quick' if quick else 'full'}"

    @property
    def runs_group(self):
        """The folder (under --runs-dir, with the size) of its shared stage 0s and plain runs."""
        return self.runs_of or self.name


def _methods(*names):
    return tuple(Variant(name, name) for name in names)


# ilmil with one term switched off at a time (the config keys of that term), and
# the not-ablations marked below; the plain runs are the accuracy suite's.
ABLATIONS = (
    Variant("finetune", "finetune"),
    Variant("without pseudo-labels", "ilmil", ("ILMIL.PSEUDO_LABELS.ENABLED", "False")),
    Variant("without feature term", "ilmil", ("ILMIL.DISTILL.FEAT.ENABLED", "False")),
    Variant("without RPN term", "ilmil", ("ILMIL.DISTILL.RPN.ENABLED", "False")),
    Variant("without RCN term", "ilmil", ("ILMIL.DISTILL.RCN.ENABLED", "False")),
    # Not an ablation: the RCN term without the teacher's "background" on new objects.
    Variant("RCN not on new-class GT", "ilmil", ("ILMIL.DISTILL.RCN.NEW_GT_IOU_THRESH", "0.5")),
    # Not an ablation: the RCN term decides how AP splits between old and new classes;
    # the method's original weight, which ilmil used until its default became 0.25.
    Variant("RCN weight 1", "ilmil", ("ILMIL.DISTILL.RCN.WEIGHT", "1.0")),
    Variant("RCN logits kl", "ilmil", ("ILMIL.DISTILL.RCN.LOGITS", "kl")),
    # Not an ablation: MMA's RCN term, the teacher's background compared with the student's
    # "background or a new class", for the new classes ilmil learns worse than finetune.
    Variant("RCN logits unbiased_kl", "ilmil", ("ILMIL.DISTILL.RCN.LOGITS", "unbiased_kl")),
    # Not an ablation: what the faster bfloat16 teacher pass (the speed suite) costs in AP.
    Variant("bfloat16 teacher", "ilmil", ("ILMIL.TEACHER.PRECISION", "bfloat16")),
    # Not ablations: the compression methods' terms added to the recipe (fg/bg from the new
    # classes' GT and the pseudo-labels), so the better one can join it.
    Variant("plus knowledge review", "ilmil", ("ILMIL.DISTILL.REVIEW.ENABLED", "True")),
    Variant("plus attention and FSP relations", "ilmil",
            ("ILMIL.DISTILL.AT.ENABLED", "True", "ILMIL.DISTILL.FSP.ENABLED", "True")),
    Variant("ilmil (all terms)", "ilmil"),
)

SPEED_VARIANTS = (
    Variant("finetune", "finetune"),
    Variant("ilmil", "ilmil"),
    Variant("ilmil_bfloat16_teacher", "ilmil", ("ILMIL.TEACHER.PRECISION", "bfloat16")),
)


def _pruned(ratios, finetune_iters):
    """Unpruned ilmil (the accuracy suite's run), then each ratio with the pruned stage-0
    model fine-tuned plainly and with its unpruned self as teacher, for the same iterations."""
    variants = [Variant("ilmil", "ilmil")]
    for ratio in ratios:
        for teacher in (False, True):
            opts = ("ILMIL.PRUNING.FINETUNE_ITERS", str(finetune_iters),
                    *(("ILMIL.PRUNING.FINETUNE_TEACHER", "True") if teacher else ()))
            name = f"ilmil_prune{ratio}_finetune" + ("_teacher" if teacher else "")
            variants.append(Variant(name, "ilmil", opts, ("--prune", str(ratio))))
    return tuple(variants)


DATA = {"full": {"num_train": 2000, "num_test": 500}, "quick": {"num_train": 400, "num_test": 100}}
ONE_RUN_AT_A_TIME = "the suite times its runs, so it trains them one at a time"

ACCURACY = Suite(
    "accuracy",
    # Stage 0 trains four times as long as a later stage: papers train the base model to
    # convergence, and the 10-class teacher reaches AP50 14 / 32 / 78 after 800 / 1600 /
    # 3200 iterations (78: as good as joint training on its classes; docs/benchmark-log.md).
    full=Setting(("10+10", "15+5", "19+1", "10+5+5"), _methods("finetune", "faster-ilod", "mma", "ilmil", "joint"),
                 iters=800, base_iters=3200, **DATA["full"]),
    quick=Setting(("10+10",), _methods("finetune", "faster-ilod", "ilmil", "joint"),
                  iters=120, base_iters=0, **DATA["quick"]),
    table=tables.accuracy_table,
    protocol="shapes ({num_train} train / {num_test} test, 256 px), batch 4, {base_iters} iterations for stage 0 "
             "(one model shared by every method), {iters} for each later stage (joint: the sum)",
)
ABLATION = Suite(
    "ablation",
    full=Setting(("10+10",), ABLATIONS, iters=800, base_iters=3200, **DATA["full"]),
    quick=Setting(("10+10",), ABLATIONS, iters=120, base_iters=0, **DATA["quick"]),
    table=tables.ablation_table,
    runs_of="accuracy",
    protocol="shapes ({num_train} train / {num_test} test, 256 px), batch 4, {base_iters} iterations for stage 0, "
             "{iters} for each later stage; every variant from the accuracy suite's stage-0 model",
)
SPEED = Suite(
    "speed",
    # Stage 1 of 10+10 from a short stage 0: only the step time of stage 1 is measured.
    full=Setting(("10+10",), SPEED_VARIANTS, iters=80, base_iters=100, warmup=20, **DATA["full"]),
    quick=Setting(("10+10",), SPEED_VARIANTS, iters=30, base_iters=100, warmup=10, **DATA["quick"]),
    table=tables.speed_table,
    records=speed_records,
    folder="{slug}",
    fresh=True,
    protocol="stage 1 of shapes 10+10 ({num_train} train / {num_test} test), batch 4, {iters} iterations, "
             "the first {warmup} left out of the median",
    refuses={"specs": "the suite times stage 1 of 10+10", "seeds": "the suite times one seed",
             "iters": "the suite's timed budget is fixed", "base_iters": "the suite's stage 0 is fixed",
             "jobs": ONE_RUN_AT_A_TIME, "variants": "its table compares ilmil (with either teacher) with finetune"},
)
PRUNING = Suite(
    "pruning",
    # The accuracy suite's converged 10-class stage 0 (AP50 90 on its classes at 6400
    # iterations): pruning a model of AP50 11.5, as the first table did, measured nothing.
    full=Setting(("10+10",), _pruned((0.3, 0.5), finetune_iters=400), iters=800, base_iters=6400, **DATA["full"]),
    quick=Setting(("10+10",), _pruned((0.5,), finetune_iters=20), iters=120, base_iters=0, **DATA["quick"]),
    table=tables.pruning_table,
    records=pruning_records,
    # Its stage 0 and unpruned ilmil run are the accuracy suite's; each pruned run prunes
    # the shared stage-0 model inside itself (--start-stage 1 --teacher-weights with --prune).
    runs_of="accuracy",
    protocol="shapes 10+10 ilmil ({num_train} train / {num_test} test, 256 px), batch 4, {base_iters} iterations "
             "for stage 0, {iters} for stage 1; the stage-0 model pruned (L1, residual-block inner channels) and, "
             "where the table says so, fine-tuned on its own data, plainly or with its unpruned self as teacher, "
             "before stage 1, whose teacher is unpruned; final model measured on one test image, latency = median "
             "of 20 passes on the run's device (the table's header names it)",
    refuses={"specs": "the suite prunes 10+10", "seeds": "the pruning table shows one seed",
             "jobs": ONE_RUN_AT_A_TIME},
)

# One spec under both stage-image rules (README, Leak-free stages).
STAGE_IMAGE_RULES = (
    Variant("ilmil standard", "ilmil"),
    Variant("ilmil exclusive", "ilmil", ("ILMIL.STAGE_IMAGES", "exclusive")),
)

STAGE_IMAGES = Suite(
    "stage_images",
    full=Setting(("10+10",), STAGE_IMAGE_RULES, iters=800, base_iters=0, **DATA["full"]),
    quick=Setting(("10+10",), STAGE_IMAGE_RULES, iters=120, base_iters=0, **DATA["quick"]),
    table=tables.stage_images_table,
    # Each run trains its own stage 0: under the exclusive rule stage 0's images depend on
    # the whole spec, which a shared one-stage run (where every image stays) cannot know.
    stage0="own",
    protocol="shapes ({num_train} train / {num_test} test, 256 px), ilmil, batch 4, {iters} iterations per "
             "stage, stage 0 included; each stage's training images by the standard rule and by "
             "ILMIL.STAGE_IMAGES exclusive (README, Leak-free stages)",
    refuses={"base_iters": "stage 0 trains the per-stage budget inside each run"},
)


# Each detector's CPU config (the teacher of the kd suite, stage 0 of the incremental ones)
# and its compression student.
DETECTOR_CONFIGS = {
    "faster_rcnn": "configs/shapes/faster_rcnn_R18_FPN_cpu.yaml",
    "retinanet": "configs/shapes/retinanet_R18_FPN_cpu.yaml",
    "fcos": "configs/shapes/fcos_R18_FPN_cpu.yaml",
    "yolov3": "configs/shapes/yolov3_cpu.yaml",
    # Incremental only (the compression student's detector): a YOLO whose incremental suite fits
    # a 2-core CPU (the full model's stage 0 and joint take ~12 core-hours on a slow one).
    "yolov3_tiny": "configs/shapes/yolov3_tiny_cpu.yaml",
}
# Students narrower than the default one, for the edge: label and config per detector.
NARROW_STUDENTS = {
    "faster_rcnn": ("quarter-width student", "configs/shapes/kd/faster_rcnn_R18_quarter_FPN32_student_cpu.yaml"),
}
STUDENT_CONFIGS = {
    "faster_rcnn": "configs/shapes/kd/faster_rcnn_R18_FPN32_student_cpu.yaml",
    "retinanet": "configs/shapes/kd/retinanet_R18_FPN32_student_cpu.yaml",
    "fcos": "configs/shapes/kd/fcos_R18_FPN32_student_cpu.yaml",
    "yolov3": "configs/shapes/kd/yolov3_tiny_student_cpu.yaml",
}
# M-KD's teacher assistants: the teacher's detector at three-quarter width (YOLO: and half depth).
ASSISTANT_CONFIGS = {
    "faster_rcnn": "configs/shapes/kd/faster_rcnn_R18_FPN_assistant_cpu.yaml",
    "retinanet": "configs/shapes/kd/retinanet_R18_FPN_assistant_cpu.yaml",
    "fcos": "configs/shapes/kd/fcos_R18_FPN_assistant_cpu.yaml",
    "yolov3": "configs/shapes/kd/yolov3_assistant_cpu.yaml",
}
# The knowledge review's fg/bg split of the rows measured before FG 0.25 : BG 1 became the default.
REVIEW_SPLIT_1_2 = ("ILMIL.DISTILL.REVIEW.FG_WEIGHT", "1.0", "ILMIL.DISTILL.REVIEW.BG_WEIGHT", "2.0")

# YOLO's M-KD at its student config's defaults (the neck's layers, the dense term averaged, no box part).
YOLO_MKD = "M-KD on the neck, mean over anchors, class scores only"


def _enabled(opts):
    """The distillation terms a row's KEY VALUE overrides switch on."""
    return {key.split(".")[2] for key, value in zip(opts[::2], opts[1::2]) if key.endswith(".ENABLED") and value == "True"}


def _kd_variants():
    """Per detector: its default CPU config as the teacher, the small student of
    configs/shapes/kd/ without distillation, with each baseline alone and with each
    method of the papers."""
    terms = ("FEAT", "RCN", "FGFI", "DENSE", "REVIEW", "AT", "FSP", "INFOMAP")

    def only(*on):
        return tuple(x for term in terms for x in (f"ILMIL.DISTILL.{term}.ENABLED", str(term in on)))

    # Output distillation, the classification head's soft targets: the box head's softened
    # softmax on Faster R-CNN, the dense head's class scores (and confident boxes) on the others.
    outputs = {"faster_rcnn": ("RCN", ("ILMIL.DISTILL.RCN.LOGITS", "kl")), "retinanet": ("DENSE", ()),
               "fcos": ("DENSE", ()), "yolov3": ("DENSE", ())}
    variants = []
    for detector, (output, output_opts) in outputs.items():
        mkd = (only(output, "AT", "FSP") + output_opts
               + ("ILMIL.DISTILL.TERM_WEIGHTS", "uncertainty", "ILMIL.DISTILL.DETECTION_WEIGHT", "uncertainty"))
        rows = {
            "no KD": (only(), ()), "PKD": (only("FEAT") + ("ILMIL.DISTILL.FEAT.DISTANCE", "normalized"), ()),
            "FGFI": (only("FGFI"), ()), "output": (only(output) + output_opts, ()),
            # The teacher pass in bfloat16 (its share of the step time), and what it costs in AP.
            "output, bfloat16 teacher": (only(output) + output_opts + ("ILMIL.TEACHER.PRECISION", "bfloat16"), ()),
        }  # fmt: skip
        if detector in ("retinanet", "fcos", "yolov3"):
            # The class KL (YOLO: the objectness KL) averaged over every anchor instead of
            # divided by the teacher's soft object count (the default).
            rows["output, mean over anchors"] = (only(output) + ("ILMIL.DISTILL.DENSE.NORMALIZER", "mean"), ())
            # The class KL alone (YOLO: and objectness), its box part off (no teacher score reaches
            # 1.01): FCOS's box outputs are distances in strides (~1-8), an L1 on them outweighs
            # its GIoU loss.
            class_only = ("ILMIL.DISTILL.DENSE.BOX_SCORE_THRESH", "1.01")
            rows["output, class scores only"] = (only(output) + class_only, ())
        if detector in ("retinanet", "fcos"):
            rows["M-KD, class scores only"] = (mkd + class_only, ())
            # The box part as the deltas' L1 instead of the decoded boxes' 1 - GIoU (the
            # default): on FCOS's distances in strides it outweighed the detector's losses.
            l1_boxes = ("ILMIL.DISTILL.DENSE.BOX_LOSS", "l1")
            rows["output, L1 boxes"] = (only(output) + l1_boxes, ())
            rows["M-KD, L1 boxes"] = (mkd + l1_boxes, ())
        if detector == "yolov3":
            backbone, neck = ["dark3", "dark4", "dark5"], ["p3", "p4", "p5"]
            # The dense term at what its parts measured best on YOLO, the objectness KL averaged
            # over anchors and the box part off: alone, and in M-KD.
            best_dense = ("ILMIL.DISTILL.DENSE.NORMALIZER", "mean") + class_only
            rows["output, mean over anchors, class scores only"] = (only(output) + best_dense, ())
            rows["M-KD, mean over anchors, class scores only"] = (mkd + best_dense, ())
            # Attention on the Darknet stages cost YOLO AP (the tiny backbone's plain convs and
            # max-pools attend unlike Darknet's residual stages): on the neck's levels instead.
            neck_attention = ("ILMIL.DISTILL.AT.LAYERS", str(neck))
            rows["attention, neck"] = (only("AT") + neck_attention, ())
            rows["M-KD, neck attention, mean over anchors, class scores only"] = (mkd + best_dense + neck_attention, ())
            # The relations cost YOLO most (alone 22.2 against no KD's 49.1, seed 1) on the same
            # stages: on the neck's level pairs instead, alone and with all of M-KD on the neck.
            neck_relations = ("ILMIL.DISTILL.FSP.PAIRS", str([neck[:2], neck[1:]]))
            rows["layer relations, neck"] = (only("FSP") + neck_relations, ())
            rows[YOLO_MKD] = (mkd + best_dense + neck_attention + neck_relations, ())
            rows.update({
                # Multi-layer feature alignment: the squared distance on every backbone stage and
                # neck level through connectors, each layer weighted by its running disagreement.
                "alignment": (only("FEAT") + ("ILMIL.DISTILL.FEAT.DISTANCE", "l2",
                                              "ILMIL.DISTILL.FEAT.LAYER_WEIGHTING", "adaptive"), ()),
                # Information-map distillation of backbone and neck, and its ablations.
                "information map": (only("INFOMAP"), ()),
                "uniform map": (only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.WEIGHTING", "uniform"), ()),
                # Backbone or neck alone, at the weight where the map is above no KD (0.02, below).
                "information map, backbone": (only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.LAYERS", str(backbone),
                                                                 "ILMIL.DISTILL.INFOMAP.WEIGHT", "0.02"), ()),
                "information map, neck": (only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.LAYERS", str(neck),
                                                             "ILMIL.DISTILL.INFOMAP.WEIGHT", "0.02"), ()),
                # The backbone alone is the map's best half (the neck's imitation costs AP): there,
                # floored as below, and against the uniform map on the same layers.
                "information map, backbone, background 0.1": (
                    only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.LAYERS", str(backbone), "ILMIL.DISTILL.INFOMAP.WEIGHT",
                                       "0.02", "ILMIL.DISTILL.INFOMAP.BACKGROUND_WEIGHT", "0.1"), ()),
                "uniform map, backbone": (only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.LAYERS", str(backbone),
                                                             "ILMIL.DISTILL.INFOMAP.WEIGHTING", "uniform",
                                                             "ILMIL.DISTILL.INFOMAP.WEIGHT", "0.02"), ()),
                # The imitation sums the squared error over channels (hundreds here): at weight 1 it
                # is ~500x the detection loss; 0.02 brings it to the alignment term's scale.
                "information map, weight 0.02": (only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.WEIGHT", "0.02"), ()),
                "uniform map, weight 0.02": (only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.WEIGHTING", "uniform",
                                                                "ILMIL.DISTILL.INFOMAP.WEIGHT", "0.02"), ()),
                # At 0.02 the map's loss is about twice the uniform one's (the logs): 0.01 matches it.
                "information map, weight 0.01": (only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.WEIGHT", "0.01"), ()),
                # The map floored at 0.1: the background (most of each map) keeps about the
                # objects' share of the imitation instead of almost none.
                "information map, background 0.1, weight 0.02": (
                    only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.BACKGROUND_WEIGHT", "0.1",
                                       "ILMIL.DISTILL.INFOMAP.WEIGHT", "0.02"), ()),
                # Both maps standardised per channel (NORMALIZE): the raw error's scale no longer
                # depends on the layer, only on its channel count; 0.05 puts it near the detection loss.
                "information map, standardised": (
                    only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.NORMALIZE", "True", "ILMIL.DISTILL.INFOMAP.WEIGHT", "0.05"),
                    ()),
                # The standardised map floored at 0.5: the uniform map (above) beat the map, so the
                # background keeps half the objects' weight instead of almost none.
                "information map, standardised, background 0.5": (
                    only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.NORMALIZE", "True", "ILMIL.DISTILL.INFOMAP.WEIGHT", "0.05",
                                       "ILMIL.DISTILL.INFOMAP.BACKGROUND_WEIGHT", "0.5"), ()),
                "uniform map, standardised": (
                    only("INFOMAP") + ("ILMIL.DISTILL.INFOMAP.NORMALIZE", "True", "ILMIL.DISTILL.INFOMAP.WEIGHTING",
                                       "uniform", "ILMIL.DISTILL.INFOMAP.WEIGHT", "0.05"), ()),
            })  # fmt: skip
        else:
            rows.update({
                # Knowledge review, fg/bg decoupled, with pyramid pooling, at the split of its first
                # measurements (FG 1 : BG 2, then the default), and its ablation: the review alone,
                # then with the decoupling.
                "review": (only("REVIEW") + REVIEW_SPLIT_1_2, ()),
                "review alone": (only("REVIEW") + REVIEW_SPLIT_1_2 + ("ILMIL.DISTILL.REVIEW.DECOUPLE", "False",
                                                                      "ILMIL.DISTILL.REVIEW.POOL_SIZES", "[]"), ()),
                "review + decoupling": (only("REVIEW") + REVIEW_SPLIT_1_2 + ("ILMIL.DISTILL.REVIEW.POOL_SIZES", "[]"),
                                        ()),
                # The review near PKD's strength: per level it weighs a background location's squared
                # error 2/N (BG_WEIGHT) where PKD weighs it 1/(2N), 4x; 0.25 evens that out.
                "review, weight 0.25": (only("REVIEW") + REVIEW_SPLIT_1_2 + ("ILMIL.DISTILL.REVIEW.WEIGHT", "0.25"), ()),
                # Objects cover 14 % of a shapes image, so the review without the split weighs the
                # background's mean error 6x the foreground's (0.86 : 0.14) where 1 : 2 weighs it
                # 2x; 0.25 : 1 (4x, the default since) sits between, the background at about its
                # weight there.
                "review, fg 0.25, bg 1": (only("REVIEW") + ("ILMIL.DISTILL.REVIEW.FG_WEIGHT", "0.25",
                                                            "ILMIL.DISTILL.REVIEW.BG_WEIGHT", "1.0"), ()),
            })  # fmt: skip
        rows.update({
            # M-KD: soft targets, attention, layer relations, and its exploration (learned
            # uncertainty weights over the terms and the detection loss); then the same through
            # a teacher assistant between teacher and student in size.
            "M-KD": (mkd, ()),
            "M-KD + assistant": (mkd, ("--assistant-config", ASSISTANT_CONFIGS[detector])),
            # M-KD's ablation: each other kind of knowledge alone (the soft targets alone are
            # `output`), and all three with fixed weights instead of the exploration's learned ones.
            "attention": (only("AT"), ()),
            "layer relations": (only("FSP"), ()),
            "M-KD without exploration": (only(output, "AT", "FSP") + output_opts, ()),
        })  # fmt: skip
        if detector == "yolov3":
            # The YOLO student's settings before its config took the neck's layers and the dense
            # term without its box part, averaged (2026-12-07): the rows measured with them keep
            # them (a row's own settings, after these, still win).
            before = {"DENSE": ("ILMIL.DISTILL.DENSE.NORMALIZER", "objects", "ILMIL.DISTILL.DENSE.BOX_SCORE_THRESH", "0.5"),
                      "AT": ("ILMIL.DISTILL.AT.LAYERS", str(backbone)),
                      "FSP": ("ILMIL.DISTILL.FSP.PAIRS", str([backbone[:2], backbone[1:]]))}
            for name, (opts, flags) in rows.items():
                if name != "M-KD + assistant":  # not measured before: M-KD on the neck's settings
                    pins = tuple(x for term, pin in before.items() if term in _enabled(opts) for x in pin)
                    rows[name] = (pins + opts, flags)
            # M-KD at YOLO's defaults with the teacher's pass in bfloat16: that pass (~8.5x the tiny
            # student's GFLOPs) is most of YOLO's step time under distillation.
            rows[f"{YOLO_MKD}, bfloat16 teacher"] = (rows[YOLO_MKD][0] + ("ILMIL.TEACHER.PRECISION", "bfloat16"), ())
        for name, (opts, flags) in rows.items():
            variants.append(Variant(f"{detector} {name}", "finetune", opts, flags, detector=detector,
                                    config_file=STUDENT_CONFIGS[detector], teacher_config=DETECTOR_CONFIGS[detector]))
        if detector in NARROW_STUDENTS:
            student, config = NARROW_STUDENTS[detector]
            for name in ("no KD", "output"):
                variants.append(Variant(f"{detector} {student}, {name}", "finetune", *rows[name], detector=detector,
                                        config_file=config, teacher_config=DETECTOR_CONFIGS[detector],
                                        student=student))
    return tuple(variants)


KD_VARIANTS = _kd_variants()
KD = Suite(
    "kd",
    # The teacher is the student's detector at the default width, trained twice as long: on
    # 2 cores a deeper backbone would cost its students' budget (their teacher pass) too.
    full=Setting(("20",), KD_VARIANTS, iters=800, base_iters=1600, **DATA["full"]),
    quick=Setting(("20",), KD_VARIANTS, iters=30, base_iters=60, **DATA["quick"]),
    table=tables.kd_table,
    records=kd_records,
    stage0="teacher",
    protocol="compression on shapes, one stage of all classes ({num_train} train / {num_test} test, 256 px), "
             "batch 4: per detector a teacher of its default CPU config (R18, FPN 64 channels; YOLO: Darknet-53 at "
             "half width and depth) trained {base_iters} iterations, and students of configs/shapes/kd/ (half-width "
             "residual blocks, FPN 32 channels; Faster R-CNN also at quarter width from the stem up; YOLO: "
             "YOLOv3-tiny at half width, three levels) trained "
             "{iters} iterations, without "
             "distillation and with each row's terms; step time = median over the run, two runs sharing the "
             "2 cores (one thread each)",
)

# The kd rows whose step time KD_SPEED measures: the baselines and each paper's method.
KD_SPEED_ROWS = ("no KD", "PKD", "FGFI", "output", "review, fg 0.25, bg 1", "M-KD", "alignment", "information map",
                 YOLO_MKD, f"{YOLO_MKD}, bfloat16 teacher")
KD_SPEED_VARIANTS = tuple(v for v in KD_VARIANTS if v.row in KD_SPEED_ROWS and not v.student)
KD_SPEED = Suite(
    "kd_speed",
    # The kd suite's step times come from two runs sharing the cores, so their ratios depend
    # on what shared them; here each student trains alone, a short run from a short teacher
    # (a step costs the same whatever the teacher learned).
    full=Setting(("20",), KD_SPEED_VARIANTS, iters=40, base_iters=100, warmup=10, **DATA["quick"]),
    quick=Setting(("20",), KD_SPEED_VARIANTS, iters=8, base_iters=8, warmup=2, **DATA["quick"]),
    table=tables.kd_speed_table,
    stage0="teacher",
    fresh=True,
    protocol="the kd suite's students (one stage of all shapes classes, {num_train} train / {num_test} test, "
             "256 px, batch 4), each trained {iters} iterations alone on the machine from a teacher of "
             "{base_iters} iterations; step time = median after the first {warmup}",
    refuses={"specs": "the suite times the kd suite's one stage", "seeds": "the suite times one seed",
             "iters": "the suite's timed budget is fixed", "base_iters": "the step time does not depend on it",
             "jobs": ONE_RUN_AT_A_TIME},
)

# Incremental RetinaNet, FCOS and YOLO: the one-stage recipe of configs/methods/dense/ against
# finetune and joint, from a stage 0 trained to convergence (a one-stage detector trained
# from scratch converges later than Faster R-CNN: AP50 8-14 after 800 iterations). YOLO's
# recipe adds the multi-layer alignment with adaptive weights (the feature term), the
# YOLO systems' incremental method, on standardised maps (FEAT.DISTANCE normalized, the
# default): teacher and student share their widths here, and the raw squared error of
# features trained from scratch is ~500x YOLO's detection loss (the kd suite's "alignment"
# row, teacher to a narrower student, runs l2). Its dense term leaves out the anchors on a
# new-class GT box: there the old-class teacher's objectness says "no object", and the
# objectness KL (divided by the teacher's object count) pulled the new classes down (tiny
# YOLO 10+10, 2026-12-06: new-class AP50 29.4 with them, 39.9 without; old 72.6 and 73.0).
# The alignment at a tenth of its weight: at weight 1 it held the new classes 6.8 AP50 below
# the recipe without it, at 0.1 1.3 (tiny YOLO 10+10, 1600-iteration stage, 2026-12-06).
ONE_STAGE_OPTS = {(yolo, "ilmil"): ("ILMIL.DISTILL.FEAT.ENABLED", "True", "ILMIL.DISTILL.FEAT.WEIGHT", "0.1",
                                    "ILMIL.DISTILL.DENSE.EXCLUDE_NEW_GT", "True")
                  for yolo in ("yolov3", "yolov3_tiny")}
# Not methods of their own: the compression suite's best new term (the knowledge review,
# fg from the new classes' GT and the pseudo-labels) added to the recipe, at its kd weight
# and at a tenth of it (every term that holds the student to the teacher costs new classes).
# Both measured at the review's first split (FG 1 : BG 2).
ONE_STAGE_PLUS = {"ilmil + review": ("ILMIL.DISTILL.REVIEW.ENABLED", "True", *REVIEW_SPLIT_1_2),
                  "ilmil + review, weight 0.1": ("ILMIL.DISTILL.REVIEW.ENABLED", "True", *REVIEW_SPLIT_1_2,
                                                 "ILMIL.DISTILL.REVIEW.WEIGHT", "0.1")}
ONE_STAGE_VARIANTS = tuple(
    Variant(f"{detector} {method}", method, opts=ONE_STAGE_OPTS.get((detector, method), ()), detector=detector,
            config_file=DETECTOR_CONFIGS[detector])
    for detector in ("retinanet", "fcos", "yolov3", "yolov3_tiny") for method in ("finetune", "ilmil", "joint")) + tuple(
    Variant(f"{detector} {row}", "ilmil", opts=opts, detector=detector, config_file=DETECTOR_CONFIGS[detector])
    for detector in ("retinanet", "fcos") for row, opts in ONE_STAGE_PLUS.items())
ONE_STAGE = Suite(
    "one_stage",
    full=Setting(("10+10", "10+5+5"), ONE_STAGE_VARIANTS, iters=800, base_iters=6400, **DATA["full"]),
    quick=Setting(("10+10",), ONE_STAGE_VARIANTS, iters=120, base_iters=0, **DATA["quick"]),
    table=tables.one_stage_table,
    protocol="incremental RetinaNet, FCOS (configs/shapes/, R18-FPN) and YOLO (configs/shapes/yolov3_cpu.yaml, "
             "yolov3_tiny_cpu.yaml) on shapes ({num_train} train / {num_test} "
             "test, 256 px), batch 4, {base_iters} iterations for stage 0 (one model per detector shared by its "
             "methods), {iters} for each later stage (joint: the sum)",
)

SUITES = {suite.name: suite for suite in (ACCURACY, ABLATION, SPEED, PRUNING, STAGE_IMAGES, KD, KD_SPEED, ONE_STAGE)}
