"""Data-parallel training on torch.distributed: what torchrun provides, and nothing home-made.

`torchrun --nproc_per_node N -m lorakit train ...` sets RANK, LOCAL_RANK and WORLD_SIZE; `lorakit train
--nproc N` re-launches the same command line through torchrun. Multi-node runs use torchrun's own
rendezvous (`--nnodes`, `--rdzv-endpoint`). NCCL on GPUs, gloo on CPU.
torch is imported inside the functions: the `--nproc` launcher process only re-runs the command line.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 when not distributed."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    """Processes on this machine (`size` on one machine; torchrun's LOCAL_WORLD_SIZE)."""

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
    import torch
    import torch.distributed as dist

    rank, local_rank, size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if not dist.is_initialized():
        check_nproc(int(os.environ.get("LOCAL_WORLD_SIZE", size)))  # torchrun's --nproc-per-node, on CUDA
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return World(rank, local_rank, size, int(os.environ.get("LOCAL_WORLD_SIZE", size)))


def device_for(world: World) -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def all_sum(world: World, *values: float) -> list[float]:
    """Sum numbers over all ranks (identity for one process)."""
    if not world.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", world.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(world: World, obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (used for per-rank RNG states in checkpoints)."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def shutdown(world: World) -> None:
    """Leave the process group (at the end of a run, also after an error)."""
    import torch.distributed as dist

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


def check_nproc(nproc: int | None) -> None:
    """`--nproc N` with CUDA needs N visible GPUs (one per process): refused by name before anything starts.
    Without CUDA (gloo on the CPU) any N runs."""
    if not nproc or nproc < 2:
        return
    import torch

    from ..errors import LorakitError

    if torch.cuda.is_available() and nproc > (visible := torch.cuda.device_count()):
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
        raise LorakitError(
            f"--nproc {nproc}: only {visible} GPU(s) visible{where}; one process per GPU: use --nproc {visible} "
            "or fewer"
        )


def _elastic_launch(nproc: int, args: list[str]) -> None:
    """`python ARGS` in `nproc` processes through torchrun's launcher (`torchrun --standalone`); the processes
    inherit this one's environment."""
    import logging
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the processes say what failed
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    elastic_launch(config, sys.executable)(*args)


def launch(nproc: int, argv: list[str], threads: int | None = None) -> int:
    """Run `lorakit <argv>` in `nproc` processes through torchrun's launcher on this machine; returns the exit code
    (the first failed process's).

    Like `torchrun --standalone`: a rendezvous on a free local port, so two runs on one machine do not collide. A
    process that fails ends the others (`failure.py`) and prints its own one-line error; the launcher adds none of
    torchrun's failure report. Each process gets `threads` CPU threads (default: the cores shared out), set as
    OMP_NUM_THREADS.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    check_nproc(nproc)
    if threads:  # asked for on this command line: wins over the environment's setting
        os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        _elastic_launch(nproc, ["-m", "lorakit", *without_nproc(argv)])
    except ChildFailedError as e:
        first = min(e.failures.values(), key=lambda f: (f.exitcode < 0, f.timestamp))  # an error before a kill
        code = first.exitcode
        if code < 0:  # killed by a signal, which printed nothing: say so
            import signal

            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            print(f"error: rank {first.local_rank} was killed by {name}", file=sys.stderr)
            return 128 - code
        return code
    return 0
