"""The device a command runs on, and what lorakit sets and measures there.

- `best_device()`: the GPU when there is one (CUDA device 0, or the process's current device), else the CPU.
- TF32: on Ampere and newer GPUs fp32 matmuls and convolutions may run as TF32 (10-bit mantissa inputs, fp32
  accumulation), several times faster; training in fp32 turns it on unless `--no-tf32`.
- bf16: native on compute capability 8.0 and newer; older GPUs are refused up front (`check_bf16`).
- Peak memory: CUDA's allocated and reserved peaks, reset when training starts (after the base's evaluation);
  the CPU's peak resident set size.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import LorakitError

AMPERE = (8, 0)
"""The first compute capability with TF32 and native bf16."""


def best_device() -> torch.device:
    """The current CUDA device when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def set_tf32(device: torch.device, precision: str, allowed: bool) -> bool:
    """TF32 matmuls for an fp32 run on a GPU that has them, unless not `allowed`; returns whether it is on.

    Only fp32 runs are affected (bf16 and fp16 autocast do not use TF32 for their matmuls). Off restores torch's
    default (`highest`, exact fp32)."""
    if device.type != "cuda":
        return False
    on = allowed and precision == "fp32" and _capability(device) >= AMPERE
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


def check_bf16(precision: str, device: torch.device) -> None:
    """`--precision bf16` on a GPU without native bf16 (before Ampere) is refused with one line."""
    if precision != "bf16" or device.type != "cuda":
        return
    major, minor = _capability(device)
    if (major, minor) < AMPERE:
        name = torch.cuda.get_device_name(device)
        raise LorakitError(
            f"--precision bf16: {name} (compute capability {major}.{minor}) has no bf16 (it needs 8.0, Ampere, or "
            "newer); use --precision fp16 or fp32"
        )


def start_cuda_peak(device: torch.device) -> None:
    """Forget the peaks so far (the base evaluation's): what is reported from here is the training's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """`peak_memory_mb` (CUDA: max allocated; CPU: the process's peak resident set) and, on CUDA,
    `peak_reserved_mb` (what the caching allocator held at most: what other processes could not use), in MiB."""
    if device.type == "cuda":
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    import resource

    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB


def memory_record(device: torch.device) -> dict[str, Any]:
    """The peaks for a metrics line, rounded to 0.1 MiB."""
    return {k: round(v, 1) for k, v in peak_memory(device).items()}
