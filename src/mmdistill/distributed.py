"""Small torch.distributed helpers for `torchrun`: one process per rank, work sharded round-robin.

Without torchrun (WORLD_SIZE unset or 1) every helper is a no-op, so the same code runs single-process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from mmdistill.utils import resolve_device


def init(device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns (rank, world size).

    NCCL when the run uses CUDA (each rank then drives GPU LOCAL_RANK), gloo otherwise.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    use_cuda = torch.cuda.is_available() and resolve_device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[tuple[int, int]]:
    """`init` for the duration of a block; leaves alone a group that a caller started earlier."""
    started_here = not dist.is_initialized()
    try:
        yield init(device)
    finally:
        if started_here:
            cleanup()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the other ranks do (e.g. it builds a cache that they then read)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Average each tensor over the ranks, in place."""
    if dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor)
            tensor.div_(dist.get_world_size())
    return tensors


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's share of `indices`, round-robin (rank r gets items r, r + world, ...)."""
    return list(indices)[rank() :: world_size()]
