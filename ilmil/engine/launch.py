"""Joining the process group that ``torchrun`` describes, for detectron2's engine.

``torchrun --nproc_per_node N [--nnodes M --node_rank K --rdzv_endpoint HOST:PORT]
tools/train_incremental.py ...`` starts one process per GPU (or per CPU worker)
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the
rendezvous address in the environment. detectron2 0.6's own ``launch()`` spawns
its workers itself, asserts CUDA and hard-codes NCCL, so it is not used.
"""
import os

import torch
import torch.distributed as dist

from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..compat import use_local_process_group

__all__ = ["init_distributed", "main_process_first", "seed_this_process"]


def init_distributed(device="cpu"):
    """Join torchrun's process group: NCCL when ``device`` is CUDA, else gloo.

    Does nothing in a single process (no ``WORLD_SIZE`` > 1) or when already joined.
    Returns the world size.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or dist.is_initialized():
        return max(world_size, 1)
    local_rank = int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    machine = dist.get_rank() // local_size
    for index in range(world_size // local_size):
        # Every process must create every group, in the same order.
        group = dist.new_group(list(range(index * local_size, (index + 1) * local_size)))
        if index == machine:
            use_local_process_group(group)
    comm.synchronize()
    return world_size


def main_process_first(work):
    """``work()`` on the first process, then on each machine's first process, then
    on the rest: processes that would write one cache folder (the generated shapes
    dataset) at the same time take turns, on a shared or a per-machine disk."""
    if comm.get_world_size() == 1:
        return work()
    turn = 0 if comm.get_rank() == 0 else 1 if comm.get_local_rank() == 0 else 2
    result = None
    for current in range(3):
        if current == turn:
            result = work()
        comm.synchronize()
    return result


def seed_this_process(seed, offset=0):
    """Seed python, numpy and torch with ``seed + offset`` plus this process's rank (a
    negative ``seed``: a fresh one): each torchrun process draws its own augmentations,
    as under detectron2's ``default_setup``, and rank 0 (a single process) draws as it
    did without torchrun. The weights agree anyway: DistributedDataParallel broadcasts
    rank 0's."""
    seed_all_rng(None if seed < 0 else seed + offset + comm.get_rank())
