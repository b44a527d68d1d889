"""The trainer of one incremental stage: detectron2's ``DefaultTrainer`` with our
evaluator and checkpoints that record the classes they were trained on."""
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import inference_on_dataset

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
        return [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]

    @classmethod
    def evaluate(cls, cfg, model):
        """Old/new/per-class AP of ``model`` on the stage's test set (``DATASETS.TEST[0]``).

        Unlike ``DefaultTrainer.test`` the result keeps per-class dicts, which
        detectron2's flat-metric printing cannot take.
        """
        dataset_name = cfg.DATASETS.TEST[0]
        loader = cls.build_test_loader(cfg, dataset_name)
        # Only the main process gets the gathered numbers; the others an empty dict.
        return inference_on_dataset(model, loader, cls.build_evaluator(cfg, dataset_name)).get("bbox", {})
