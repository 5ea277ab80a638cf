"""`--compile`: `torch.compile` of the training forward (the model and its loss on a micro-batch).

The first micro-batches of each new shape compile (seconds to minutes); later ones run the generated kernels
(Triton on GPUs, C++/OpenMP on the CPU). Shapes vary with the batch's longest row, so after the first
recompilation the length is treated as dynamic. Evaluation and generation run the model as it is.

Refused up front, with one line, where it cannot work: a Python or platform that TorchDynamo does not support
(`torch._dynamo.is_dynamo_supported()`), a CUDA run without Triton, a CPU run without a C++ compiler, and an
8-bit base (bitsandbytes' int8 matmul is a custom autograd function with host-side state that Dynamo cannot
trace).
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from ..errors import LorakitError


def compile_problem(device: torch.device, load_in_8bit: bool) -> str | None:
    """Why `torch.compile` cannot train here (None: it can)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        import sys

        return f"torch {torch.__version__} cannot compile on {sys.platform} with Python {sys.version.split()[0]}"
    if load_in_8bit:
        return "an 8-bit base (bitsandbytes) cannot be compiled; drop --compile or --load-in-8bit"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "compiling for CUDA needs Triton (pip install triton)"
    elif device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "compiling on the CPU needs a C++ compiler (c++, g++ or clang++ on the PATH)"
    return None


def check(device: torch.device, load_in_8bit: bool) -> None:
    problem = compile_problem(device, load_in_8bit)
    if problem:
        raise LorakitError(f"--compile: {problem}")


def compiled(module: nn.Module) -> nn.Module:
    """`module` compiled (an `OptimizedModule` sharing its parameters)."""
    return torch.compile(module)
