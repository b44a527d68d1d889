"""The trainer of one incremental stage: detectron2's ``DefaultTrainer`` with our
evaluator and checkpoints that record the classes they were trained on."""
import json
import os

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm

from ..evaluation import IncrementalEvaluator

__all__ = ["IncrementalTrainer"]


class _ClassNames:
    """Checkpointable record of the model's classes (in logit order), saved under
    the ``ilmil`` key so the next stage can check its teacher."""

    def __init__(self, class_names):
        self.class_names = list(class_names)

    def state_dict(self):
        return {"class_names": self.class_names}

    def load_state_dict(self, state):
        if list(state["class_names"]) != self.class_names:
            raise ValueError(
                f"checkpoint classes {state['class_names']} differ from this stage's {self.class_names}"
            )


class _IterationTimesWriter(hooks.HookBase):
    """Saves every iteration's step time (``iteration_times.json``): the event log
    keeps only 20-iteration medians, benchmarks want the distribution."""

    def after_train(self):
        if comm.is_main_process() and "time" in self.trainer.storage.histories():
            times = [t for t, _ in self.trainer.storage.history("time").values()]
            with open(os.path.join(self.trainer.cfg.OUTPUT_DIR, "iteration_times.json"), "w") as f:
                json.dump({"start_iter": self.trainer.start_iter, "seconds": times}, f)


class IncrementalTrainer(DefaultTrainer):
    """Trains one stage. The stage runner evaluates after training, so the
    periodic evaluation hook is left out (it would evaluate the final model twice)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        class_names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
        self.checkpointer.add_checkpointable("ilmil", _ClassNames(class_names))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return IncrementalEvaluator(dataset_name)

    def build_hooks(self):
        kept = [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]
        return kept + [_IterationTimesWriter()]
