"""The trainer of one incremental stage: detectron2's ``DefaultTrainer`` with our
evaluator, crash-safe checkpoints that record the stage they belong to, and a
guard that stops (or skips) an iteration whose loss is not finite."""
import itertools
import json
import logging
import os
import time
import weakref

import torch
import torch.distributed as dist

from detectron2.data import MetadataCatalog
from detectron2.data.common import ToIterableDataset
from detectron2.engine import DefaultTrainer, hooks
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from ..checkpoint import IncrementalCheckpointer, LossNormalizer, ProcessBuffers, RNGStates, StageRecord
from ..config import check_optimizer
from ..evaluation import IncrementalEvaluator
from ..file_io import atomic_write
from ..modeling import build_detector
from ..modeling.small_maps import TooSmallMapError, one_value_per_channel

__all__ = ["IncrementalTrainer", "NonFiniteLossError", "recorded_training_seconds"]

logger = logging.getLogger("ilmil")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names it, the iteration and the fix."""


class _IterationTimesWriter(hooks.HookBase):
    """Saves every iteration's step time (``iteration_times.json``): the event log
    keeps only 20-iteration medians, benchmarks want the distribution. On a GPU it
    adds the peak of the memory torch allocated there (the process's resident
    memory, which benchmarks read on CPUs, does not see it)."""

    def after_train(self):
        if comm.is_main_process() and "time" in self.trainer.storage.histories():
            times = [t for t, _ in self.trainer.storage.history("time").values()]
            record = {"start_iter": self.trainer.start_iter, "seconds": times}
            if str(self.trainer.cfg.MODEL.DEVICE).startswith("cuda"):
                record["peak_cuda_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
            atomic_write(os.path.join(self.trainer.cfg.OUTPUT_DIR, "iteration_times.json"),
                         lambda f: json.dump(record, f), mode="w")


class _TrainingClock(hooks.HookBase):
    """The stage's training-loop seconds across resumes: the trainer saves its hooks' states
    in each checkpoint, so a resumed stage adds its time to what its checkpoint had trained."""

    def __init__(self):
        self._before, self._started = 0.0, None

    def before_train(self):
        self._started = time.perf_counter()

    def state_dict(self):
        return {"seconds": self._before + (0.0 if self._started is None else time.perf_counter() - self._started)}

    def load_state_dict(self, state):
        self._before = state["seconds"]


def recorded_training_seconds(checkpoint):
    """The training seconds a checkpoint's stage took to reach it, resumes included (from a
    checkpoint written before they were recorded, from the resume on); None for one written
    before they were recorded or by another trainer."""
    return checkpoint.get("trainer", {}).get("hooks", {}).get(_TrainingClock.__qualname__, {}).get("seconds")


class _ResumableSampler:
    """detectron2's training sampler, started ``skip`` indices into its stream: a resumed
    stage continues the data where its checkpoint left it instead of replaying the
    stage's first batches."""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def _torch_loader(loader):
    """The torch ``DataLoader`` of detectron2 0.6's training loader: the loader itself, or,
    with aspect-ratio grouping, the one an ``AspectRatioGroupedDataset`` groups."""
    return loader if isinstance(loader, torch.utils.data.DataLoader) else loader.dataset


def _sampled_dataset(loader):
    """The ``ToIterableDataset`` that draws ``loader``'s indices from its sampler (None for
    a loader built otherwise)."""
    dataset = getattr(_torch_loader(loader), "dataset", None)
    return dataset if isinstance(dataset, ToIterableDataset) else None


class IncrementalTrainer(DefaultTrainer):
    """Trains one stage. The stage runner evaluates after training, so the
    periodic evaluation hook is left out (it would evaluate the final model twice).

    Args:
        cfg: the stage's config.
        schedule: what the checkpoints record besides the classes (stage index,
            stage spec, method), so a checkpoint says where it belongs.
    """

    def __init__(self, cfg, schedule=None):
        self._schedule = schedule or {}
        self._skipped_iterations = 0
        self._last_losses = {}
        super().__init__(cfg)
        self._trainer.model.register_forward_hook(self._check_losses_finite)

    @classmethod
    def build_model(cls, cfg):
        """The detector in the channel layout of ``cfg.ILMIL.PRUNING.CHANNELS``."""
        model = build_detector(cfg)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's SGD, or AdamW over the same parameter groups (``SOLVER.OPTIMIZER``)."""
        if check_optimizer(cfg) == "SGD":
            return super().build_optimizer(cfg, model)
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY
        )

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader, its torch ``DataLoader`` given a generator of its own and
        its sampler one that ``resume_stage`` can start where the checkpoint left it.

        The ``DataLoader`` draws its workers' base seed when its iterator starts, at
        the first step, which is after ``--resume`` has restored the random states:
        from the global torch generator, a resumed stage's random stream (ROI and RCN
        proposal sampling) would be one draw off the uninterrupted stage's.
        """
        loader = super().build_train_loader(cfg)
        _torch_loader(loader).generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        sampled = _sampled_dataset(loader)
        if sampled is not None:
            sampled.sampler = _ResumableSampler(sampled.sampler)
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return IncrementalEvaluator(dataset_name)

    def build_hooks(self):
        # Replaces DefaultTrainer's checkpointer before its PeriodicCheckpointer hook takes it.
        class_names = MetadataCatalog.get(self.cfg.DATASETS.TRAIN[0]).thing_classes
        model = getattr(self._trainer.model, "module", self._trainer.model)  # unwrap DistributedDataParallel
        self.checkpointer = IncrementalCheckpointer(
            model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
            ilmil=StageRecord(model, class_names, self._schedule), rng=RNGStates(),
            loss_normalizer=LossNormalizer(model), buffers=ProcessBuffers(model),
        )
        # detectron2 checkpoints on the main process only; here every process takes part in
        # each save (it gathers their random states, loss normaliser and buffers, so a resumed
        # torchrun run restores each process its own). In its place: just before the EvalHook,
        # which every process has and which is left out (stages are evaluated by the runner).
        kept = []
        for hook in super().build_hooks():
            if isinstance(hook, hooks.EvalHook):
                kept.append(hooks.PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD))
            elif not isinstance(hook, hooks.PeriodicCheckpointer):
                kept.append(hook)
        return kept + [_IterationTimesWriter(), _TrainingClock()]

    def state_dict(self):
        """The iteration and the hooks' states (the LR scheduler's), as detectron2
        0.6 saves them, plus what it leaves out: the optimizer's state (SGD momentum,
        AdamW moments; later detectron2 versions save it the same way) and the count
        of skipped non-finite iterations."""
        return {
            **super().state_dict(),
            "_trainer": self._trainer.state_dict(),
            "skipped_nonfinite_iterations": self._skipped_iterations,
        }

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # absent in checkpoints written before it was saved
            self._trainer.load_state_dict(state_dict["_trainer"])
        # ILMIL.SKIP_NONFINITE_ITERS bounds the whole stage, not each resumed part of it.
        self._skipped_iterations = state_dict.get("skipped_nonfinite_iterations", 0)

    def resume_stage(self):
        """Continue from the newest readable checkpoint in the stage folder (model,
        optimizer, scheduler, iteration, random states). Returns the iteration
        training continues at, or None when there is nothing to resume from."""
        extra = self.checkpointer.resume_or_load("", resume=True)
        if "iteration" not in extra:
            return None
        self.start_iter = extra["iteration"] + 1
        sampled = _sampled_dataset(self._trainer.data_loader)
        if sampled is not None and isinstance(sampled.sampler, _ResumableSampler):
            # The images the iterations before took: exactly when aspect-ratio grouping (detectron2's
            # default) keeps every image in one group, then each batch takes the next images of the
            # stream; without grouping, exactly with 0 or 1 loader workers (2 or more take turns,
            # each batching its own share of the stream), at the same point of the epoch otherwise.
            sampled.sampler.skip = self.start_iter * (self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
            # detectron2 made the trainer's iterator when it was built; a loader without
            # grouping and with worker processes started them then, with the sampler unskipped.
            self._trainer._data_loader_iter = iter(self._trainer.data_loader)
        return self.start_iter

    def run_step(self):
        try:
            super().run_step()
        except ValueError as e:
            input_size = one_value_per_channel(e)
            if input_size is None:
                raise
            per_process = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            raise TooSmallMapError(
                f"stage {self._schedule.get('stage', '?')} stopped at iteration {self.iter}: a normalisation layer "
                f"got one value per channel ({input_size}): a 1 x 1 feature map of one image; fix: "
                f"larger inputs (INPUT.MIN_SIZE_TRAIN, now {tuple(self.cfg.INPUT.MIN_SIZE_TRAIN)}) or at least 2 "
                f"images per process (SOLVER.IMS_PER_BATCH {self.cfg.SOLVER.IMS_PER_BATCH} over "
                f"{comm.get_world_size()} process(es): {per_process} each)") from None
        except FloatingPointError as e:
            if not isinstance(e, NonFiniteLossError):
                # detectron2's own check (non-finite proposals), raised inside the forward
                # pass: the other processes are waiting in _check_losses_finite's all-reduce.
                self._any_process_nonfinite(True)
                # The weights have already diverged: name the terms of the last iteration
                # that had finite losses.
                last = {name: float(value) for name, value in self._last_losses.items()}
                last = ", ".join(f"{k} = {v:.3g}" for k, v in sorted(last.items(), key=lambda kv: -kv[1]))
                e = NonFiniteLossError(f"iteration {self.iter}: {e} (losses of the iteration before, largest first: {last})")
            self._skipped_iterations += 1
            allowed = self.cfg.ILMIL.SKIP_NONFINITE_ITERS
            if self._skipped_iterations > allowed:
                raise NonFiniteLossError(self._stop_message(e, allowed)) from None
            # Raised in the forward pass: no gradient was computed, no weight changed.
            logger.warning("%s; iteration skipped (%d of ILMIL.SKIP_NONFINITE_ITERS %d)",
                           e, self._skipped_iterations, allowed)

    def _check_losses_finite(self, model, inputs, losses):
        if not model.training:
            return
        # One check (one device sync) for all terms; the values are read only for a message.
        values = {name: value.detach() for name, value in losses.items()}
        finite = torch.isfinite(torch.stack([v.reshape(()) for v in values.values()]))
        bad = {} if finite.all() else {name: float(values[name]) for name, ok in zip(values, finite) if not ok}
        if self._any_process_nonfinite(bool(bad)) and not bad:
            raise NonFiniteLossError(f"iteration {self.iter}: a loss term is not finite on another process")
        if bad:
            terms = ", ".join(f"{name} = {value}" for name, value in sorted(bad.items()))
            raise NonFiniteLossError(f"iteration {self.iter}: loss not finite: {terms}")
        self._last_losses = values

    def _any_process_nonfinite(self, bad):
        """Whether this or another process had a non-finite iteration: every process
        must skip or stop together, or the others wait in DDP's all-reduce forever."""
        if comm.get_world_size() == 1:
            return bad
        flag = torch.tensor([float(bad)], device=next(self._trainer.model.parameters()).device)
        dist.all_reduce(flag)
        return bool(flag.item())

    def _stop_message(self, error, allowed):
        saved = self.checkpointer.resume_candidates()
        kept = (f"the last checkpoint, {saved[0]}, is kept: --resume continues from it"
                if saved else "no checkpoint of this stage was saved yet")
        return (
            f"stage {self._schedule.get('stage', '?')} stopped at {error}"
            + (f" (after skipping {allowed} such iteration(s))" if allowed else "")
            + f"; {kept}.\n  fix: lower SOLVER.BASE_LR (now {self.cfg.SOLVER.BASE_LR:g}) or lengthen "
            f"SOLVER.WARMUP_ITERS (now {self.cfg.SOLVER.WARMUP_ITERS}); clip gradients with "
            "SOLVER.CLIP_GRADIENTS.ENABLED True; or let up to K bad iterations be skipped "
            "with ILMIL.SKIP_NONFINITE_ITERS K"
        )
