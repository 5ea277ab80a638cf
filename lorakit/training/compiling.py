"""`--compile`: `torch.compile` of the model's forward, block by block, while it trains.

The model's repeated transformer blocks (the largest list of same-class layers) are compiled, not the whole forward
at once: every block shares one compiled graph, so compiling costs one block's time (PyTorch's "regional
compilation"; on 2 CPU cores a tiny Llama's whole training forward took 296 s to compile, its blocks 104 s, both
then as fast). The first micro-batches compile (a second length makes the length dynamic); later ones run the
generated kernels (Triton on GPUs, C++/OpenMP on the CPU). Evaluation and generation (no gradients, or eval mode)
run the blocks as they are: no second compilation for them, no recompiling for each generated token.

Refused up front, with one line, where it cannot work: a Python or platform that TorchDynamo does not support
(`torch._dynamo.is_dynamo_supported()`), a CUDA run without Triton, a CPU run without a C++ compiler, and a
bitsandbytes base (8-bit or 4-bit: its quantized matmuls).
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from ..errors import LorakitError


def compile_problem(device: torch.device, bits: int | None) -> str | None:
    """Why `torch.compile` cannot train here (None: it can); `bits`: 8 or 4 for a bitsandbytes base."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        import sys

        return f"torch {torch.__version__} cannot compile on {sys.platform} with Python {sys.version.split()[0]}"
    if bits:
        return f"a base in {bits} bits (bitsandbytes) cannot be compiled; drop --compile or --load-in-{bits}bit"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "compiling for CUDA needs Triton (pip install triton)"
    elif device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "compiling on the CPU needs a C++ compiler (c++, g++ or clang++ on the PATH)"
    return None


def check(device: torch.device, bits: int | None) -> None:
    problem = compile_problem(device, bits)
    if problem:
        raise LorakitError(f"--compile: {problem}")


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's transformer blocks: the list of same-class modules holding the most parameters."""
    lists = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1
    ]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def compile_blocks(model: nn.Module) -> int:
    """Compile the forward of each transformer block for training (train mode with gradients); returns the number
    of blocks. A model without a list of blocks has its whole forward compiled the same way."""
    blocks = repeated_blocks(model)
    targets = list(blocks) if blocks is not None else [model]
    for block in targets:
        plain = block.forward
        fast = torch.compile(plain)

        def forward(*args, _plain=plain, _fast=fast, _block=block, **kwargs):
            if _block.training and torch.is_grad_enabled():
                return _fast(*args, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward
    return len(targets)
