"""Data-parallel training on torch.distributed: what torchrun provides, and nothing home-made.

`torchrun --nproc_per_node N -m lorakit train ...` sets RANK, LOCAL_RANK and WORLD_SIZE; `lorakit train
--nproc N` re-launches the same command line through torchrun. Multi-node runs use torchrun's own
rendezvous (`--nnodes`, `--rdzv-endpoint`). NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 when not distributed."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and draws the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world() -> World:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); a single process otherwise."""
    if not launched_by_torchrun():
        return World()
    rank, local_rank, size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return World(rank, local_rank, size)


def device_for(world: World) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def all_sum(world: World, *values: float) -> list[float]:
    """Sum numbers over all ranks (identity for one process)."""
    if not world.distributed:
        return list(values)
    device = torch.device("cuda", world.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(world: World, obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (used for per-rank RNG states in checkpoints)."""
    if not world.distributed:
        return [obj]
    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus `--nproc N` / `--nproc=N` (torchrun would take it for its own option)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run `lorakit <argv>` in `nproc` processes through torchrun on this machine; returns its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "lorakit"]
    return subprocess.call(command + without_nproc(argv))
